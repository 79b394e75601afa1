"""``pyrepl3-pool``: a jupyter_client kernel provisioner that leases warm
kernels from the per-user manager daemon.

``launch_kernel`` asks the daemon (starting it if none answers) for a lease:
a kernel whose ports are bound, whose key is chosen and whose worker has
already run the warm-up code, then moved to the launch's cwd and environment.
If the daemon cannot be reached or started, the kernel is started cold, as a
standalone process, with a warning: a launch never fails for want of a
daemon. Restarts happen in place: same ports, same key, a new warm worker.
A kernel whose daemon is gone is dead: ``poll``, ``kill``, ``terminate`` and
``cleanup`` say so and never raise.

Configure it in the kernelspec (``metadata.kernel_provisioner.config``) or in
a Jupyter config file (``c.PoolProvisioner.pool_size = 2``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.local_provisioner import LocalProvisioner
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Bool, Float, Integer, Unicode

from .curve import PUBLIC, CurveKeys, manager_keys
from .daemon.client import (
    DAEMON_PROTOCOL_VERSION,
    DaemonClient,
    DaemonError,
    DaemonPaths,
    DaemonUnavailable,
)
from .processes import alive

_T = TypeVar("_T")

#: In a launch's environment: start the kernel as a fork of the daemon's
#: lease of this id, not from a pool (the REST fork, docs/fork.md).
FORK_OF_ENV = "PYREPL3_FORK_OF"
#: In a launch's environment: take over the running fork of this lease id
#: (a Jupyter server registering a kernel ``%fork`` made, server/fork.py).
ADOPT_ENV = "PYREPL3_ADOPT_LEASE"


class PoolProvisioner(KernelProvisionerBase):  # type: ignore[misc]
    """Lease kernels from the pyrepl3 manager daemon; start cold if it fails."""

    pool_size = Integer(1, config=True, help="Warm workers kept ready for this kernelspec.")
    warmup_code = Unicode(
        "", config=True, help="Code every warm worker runs before it is leased (e.g. imports)."
    )
    max_kernels = Integer(256, config=True, help="Most kernels of this kernelspec at once.")
    idle_timeout = Float(
        600.0,
        config=True,
        help="A daemon started by this provisioner exits after this many seconds without leases.",
    )
    pool_enabled = Bool(
        True, config=True, help="Lease from the daemon at all (False: always start cold)."
    )
    daemon_start_timeout = Float(30.0, config=True, help="Seconds to wait for a daemon to come up.")
    lease_timeout = Float(120.0, config=True, help="Seconds a lease request may take.")

    lease_id: str | None = None
    #: Whether this kernel was started as a fork of another (``FORK_OF_ENV``).
    _forked = False
    #: What did not carry over the fork, by name (the daemon's report).
    fork_report: dict[str, Any] | None = None
    #: Whether the last launch was served by a warm worker (None: cold fallback).
    warm: bool | None = None
    #: The leased kernel's working directory (for resolve_path).
    cwd: str | None = None
    _fallback: LocalProvisioner | None = None
    _exit_code: int | None = None
    #: The daemon this provisioner's lease lives in: fixed at the first launch,
    #: so a runtime directory that changes later does not lose the kernel.
    _daemon_paths: DaemonPaths | None = None
    #: The KernelManager's CurveZMQ keys the leased kernel serves with (None: plain).
    _curve: CurveKeys | None = None

    # -- Popen-like -----------------------------------------------------------------

    @property
    def has_process(self) -> bool:
        if self._fallback is not None:
            return bool(self._fallback.has_process)
        return self.lease_id is not None

    async def poll(self) -> int | None:
        if self._fallback is not None:
            return await self._fallback.poll()  # type: ignore[no-any-return]
        if self.lease_id is None:
            return self._exit_code
        try:
            reply = await self._call("poll", timeout=10.0, lease_id=self.lease_id)
        except DaemonUnavailable:
            return -int(signal.SIGKILL)  # the daemon, and so the kernel, is gone
        except DaemonError:
            return 1
        return None if reply.get("running") else int(reply.get("exit_code", 0))

    async def wait(self) -> int | None:
        if self._fallback is not None:
            return await self._fallback.wait()  # type: ignore[no-any-return]
        while True:
            code = await self.poll()
            if code is not None:
                return code
            await asyncio.sleep(0.1)

    async def send_signal(self, signum: int) -> None:
        if self._fallback is not None:
            await self._fallback.send_signal(signum)
        elif self.lease_id is not None:
            await self._lease_op("signal", signum=int(signum))

    async def kill(self, restart: bool = False) -> None:
        """Kill the kernel's worker; the lease (its gateway, ports and key)
        ends in :meth:`cleanup`. jupyter_client kills without ``restart``
        also on the way to a restart (``restart_kernel(now=True)``, the
        restarter after a death), and the restart reuses the lease, so that
        the clients made before it keep working."""
        if self._fallback is not None:
            await self._fallback.kill(restart=restart)
        elif self.lease_id is not None:
            await self._lease_op("kill", restart=True)

    async def terminate(self, restart: bool = False) -> None:
        if self._fallback is not None:
            await self._fallback.terminate(restart=restart)
        elif self.lease_id is not None:
            await self._lease_op("kill", restart=True)

    async def _lease_op(self, op: str, **fields: Any) -> None:
        """``op`` on the lease. If the daemon is gone, so is the kernel (the
        daemon's workers die with it): the lease is over and ``poll`` says
        the kernel was killed. Only an interrupt reports other errors."""
        lease_id = self.lease_id
        try:
            await self._call(op, lease_id=lease_id, **fields)
        except DaemonUnavailable as exc:
            self.log.debug("pyrepl3: %s of lease %s: the daemon is gone (%s)", op, lease_id, exc)
            self._lease_gone()
        except DaemonError as exc:
            if exc.code == "unknown_lease":
                self._lease_gone()
            elif op == "signal" and fields.get("signum") == signal.SIGINT:
                raise
            else:
                self.log.warning("pyrepl3: %s of lease %s failed: %s", op, lease_id, exc)

    def _lease_gone(self) -> None:
        self.lease_id = None
        self._exit_code = -int(signal.SIGKILL)

    # -- launch -----------------------------------------------------------------------

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        if self.pool_enabled and self._fallback is None:
            try:
                await self._ensure_daemon()
            except Exception as exc:
                self._warn("no manager daemon (%s); starting the kernel cold", exc)
            else:
                kwargs.pop("extra_arguments", None)
                kwargs.pop("transport_encryption", None)  # the KernelManager's, as LocalProvisioner
                self._curve = manager_keys(self.parent)
                kwargs = await super().pre_launch(**kwargs)
                kwargs["cmd"] = list(self.kernel_spec.argv)
                return kwargs
        return await self._use_fallback().pre_launch(**_standalone(kwargs))  # type: ignore[no-any-return]

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        if self._fallback is not None:
            info = await self._fallback.launch_kernel(cmd, **kwargs)
            self.connection_info = info
            return info
        env: dict[str, str] = dict(kwargs.get("env") or os.environ)
        # As jupyter_client's launcher tells a kernel process who started it
        # (code checks it to know it runs under Jupyter).
        env["JPY_PARENT_PID"] = str(os.getpid())
        # Without a cwd, a kernel process would inherit this process's working
        # directory (papermill --cwd and jupyter console rely on it): so must
        # a leased one, which would otherwise stay in the daemon's.
        cwd = os.fspath(kwargs.get("cwd") or env.get("KERNEL_WORKING_DIR") or os.getcwd())
        self.cwd = cwd
        if self.lease_id is not None:
            try:
                reply = await self._call(
                    "restart", lease_id=self.lease_id, timeout=self.lease_timeout
                )
            except (DaemonError, DaemonUnavailable) as exc:
                self.log.warning(
                    "pyrepl3: could not restart lease %s in place (%s); leasing a new kernel",
                    self.lease_id,
                    exc,
                )
                self.lease_id = None
            else:
                self.warm = bool(reply.get("warm"))
        fork_of = env.pop(FORK_OF_ENV, None)
        adopt = env.pop(ADOPT_ENV, None)
        if fork_of and self.lease_id is None and not self._forked:
            # A fork of a running kernel (docs/fork.md); no cold fallback: a
            # fork that fails fails the start.
            self._forked = True
            curve = self._curve.as_info() if self._curve is not None else {}
            fork = {"lease_id": fork_of, "kernel_id": self.kernel_id, "owner_pid": os.getpid()}
            reply = await self._call("fork", timeout=self.lease_timeout, **fork, **curve)
            self.lease_id = reply["lease_id"]
            self.warm = False
            self.fork_report = reply.get("report") or {}
        elif adopt and self.lease_id is None and not self._forked:
            # A kernel %fork made: this manager takes it over, as it runs.
            self._forked = True
            reply = await self._call("adopt", lease_id=adopt, owner_pid=os.getpid())
            self.lease_id = reply["lease_id"]
            self.warm = False
        if self.lease_id is None:
            lease = {
                "kernel_name": self._kernel_name(),
                "kernel_id": self.kernel_id,
                "python": self._python(),
                "env": env,
                "cwd": cwd,
                "owner_pid": os.getpid(),
                "pool": {
                    "size": self.pool_size,
                    "warmup_code": self.warmup_code,
                    "max_kernels": self.max_kernels,
                    "enabled": True,
                },
                **(self._curve.as_info() if self._curve is not None else {}),
            }
            try:
                try:
                    reply = await self._call("lease", timeout=self.lease_timeout + 10, **lease)
                except DaemonUnavailable:
                    # It may have exited (idle) since pre_launch found it:
                    # start another and ask once more.
                    await self._ensure_daemon()
                    reply = await self._call("lease", timeout=self.lease_timeout + 10, **lease)
                await self._check_curve(reply)
            except (DaemonError, DaemonUnavailable) as exc:
                self._warn("the daemon could not lease a kernel (%s); starting it cold", exc)
                fallback = self._use_fallback()
                fallback_kwargs = await fallback.pre_launch(**_standalone(kwargs))
                return await self.launch_kernel(fallback_kwargs.pop("cmd"), **fallback_kwargs)
            self.lease_id = reply["lease_id"]
            self.warm = bool(reply.get("warm"))
        leased: dict[str, Any] = dict(reply["connection_info"])
        # jupyter_client adopts the key only as bytes (a str key fails the start).
        leased["key"] = leased["key"].encode()
        self.connection_info = leased  # type: ignore[assignment]
        self._exit_code = None
        return leased  # type: ignore[return-value]

    async def _check_curve(self, reply: dict[str, Any]) -> None:
        """Raise DaemonError (after releasing the lease) if the leased kernel
        does not serve with this launch's Curve keys: a daemon older than
        Curve support ignores them, and a client would then wait forever."""
        wanted = self._curve.as_info()[PUBLIC] if self._curve is not None else None
        if reply.get("connection_info", {}).get(PUBLIC) != wanted:
            await self._call("release", timeout=30.0, lease_id=reply.get("lease_id"))
            raise DaemonError(
                "no_curve",
                "the running daemon did not apply the CurveZMQ keys (a pyrepl3-kernel "
                "older than Curve support? stop it with `pyrepl3-kernel stop`)",
            )

    async def cleanup(self, restart: bool = False) -> None:
        if self._fallback is not None:
            await self._fallback.cleanup(restart=restart)
            if not restart:
                self._fallback = None
            return
        if not restart and self.lease_id is not None:
            lease_id, self.lease_id = self.lease_id, None
            self._exit_code = 0
            try:
                await self._call("release", timeout=30.0, lease_id=lease_id)
            except (DaemonError, DaemonUnavailable) as exc:
                self.log.debug("pyrepl3: release of lease %s: %s", lease_id, exc)

    def resolve_path(self, path_str: str) -> str | None:
        """``path_str`` (``~`` expanded, relative to the kernel's working
        directory) if such a file exists, as jupyter_client's
        LocalProvisioner answers (jupyter_server's ``/api/resolvePath``)."""
        if self._fallback is not None:
            return self._fallback.resolve_path(path_str)  # type: ignore[no-any-return]
        path = pathlib.Path(path_str).expanduser()
        if not path.is_absolute() and self.cwd:
            path = (pathlib.Path(self.cwd) / path).resolve()
        if path.exists():
            return path.as_posix()
        return None

    async def get_provisioner_info(self) -> dict[str, Any]:
        info: dict[str, Any] = await super().get_provisioner_info()
        info["lease_id"] = self.lease_id
        info["cwd"] = self.cwd
        if self._daemon_paths is not None:
            info["daemon_runtime_dir"] = os.fspath(self._daemon_paths.lock.parent)
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        await super().load_provisioner_info(provisioner_info)
        self.lease_id = provisioner_info.get("lease_id")
        self.cwd = provisioner_info.get("cwd")
        runtime_dir = provisioner_info.get("daemon_runtime_dir")
        if runtime_dir:
            self._daemon_paths = DaemonPaths.default(runtime_dir)

    # -- helpers ----------------------------------------------------------------------

    def _kernel_name(self) -> str:
        # KernelSpecManager leaves ``KernelSpec.name`` empty: the name is the
        # KernelManager's, or that of the kernelspec's directory.
        parent: Any = self.parent
        spec: Any = self.kernel_spec
        name = str(getattr(parent, "kernel_name", "") or getattr(spec, "name", "") or "")
        resource_dir = str(getattr(spec, "resource_dir", "") or "")
        if not name and resource_dir:
            name = os.path.basename(os.path.normpath(resource_dir))
        return name or "pyrepl3"

    def _python(self) -> str:
        argv = list(self.kernel_spec.argv)
        return str(argv[0]) if argv and os.path.isabs(argv[0]) else sys.executable

    def _client(self) -> DaemonClient:
        if self._daemon_paths is None:
            from jupyter_core.paths import jupyter_runtime_dir

            # Absolute: the daemon runs elsewhere (in /).
            self._daemon_paths = DaemonPaths.default(os.path.abspath(jupyter_runtime_dir()))
        return DaemonClient(self._daemon_paths)

    async def _call(self, op: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        client = self._client()
        try:
            return await client.acall(op, timeout, **fields)
        except DaemonUnavailable:
            _forget_hello(client)  # the next launch asks (and starts one) again
            raise

    def _warn(self, message: str, *args: Any) -> None:
        """A warning the user sees: in the application's log (jupyter_server,
        jupyter console, papermill), or on stderr if no log would show it (a
        script using nbclient or jupyter_client without configuring logging,
        where the provisioner's logger has only a NullHandler)."""
        message = "pyrepl3: " + message
        self.log.warning(message, *args)
        if not _shows(self.log, logging.WARNING):
            print(f"[pyrepl3] WARNING {message % args}", file=sys.stderr, flush=True)

    def _use_fallback(self) -> LocalProvisioner:
        if self._fallback is None:
            self._fallback = LocalProvisioner(
                kernel_id=self.kernel_id,
                kernel_spec=self.kernel_spec,
                parent=self.parent,
            )
        return self._fallback

    async def _ensure_daemon(self) -> None:
        """Make sure a daemon answers; start one if none does."""
        client = self._client()
        hello = await _shared_hello(client)
        if hello is None:
            pid = await _in_thread(lambda: self._start_daemon(client.paths))
            deadline = time.monotonic() + self.daemon_start_timeout
            while hello is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                hello = await client.aping()
                if hello is None and not alive(pid):
                    # It exited: it lost the race to another daemon (then
                    # that one answers now) or it failed (see its log).
                    hello = await client.aping()
                    if hello is None:
                        raise DaemonUnavailable(
                            f"the daemon exited at start: {_tail(client.paths.log)}"
                        )
            if hello is None:
                raise DaemonUnavailable(
                    f"the daemon did not come up within {self.daemon_start_timeout:.0f} s "
                    f"(see {client.paths.log})"
                )
        if hello.get("protocol") != DAEMON_PROTOCOL_VERSION:
            raise DaemonError(
                "unsupported_version",
                f"the running daemon speaks protocol {hello.get('protocol')}, "
                f"this provisioner {DAEMON_PROTOCOL_VERSION}; stop it with `pyrepl3-kernel stop`",
            )

    def _server_info_file(self) -> str | None:
        """The info file (``jpserver-PID.json``) of the Jupyter server this
        kernel is started for, if it is one and the file exists: a server
        keeps it while it runs."""
        owner: Any = self.parent
        for _ in range(4):  # KernelManager, MappingKernelManager, ServerApp
            if owner is None:
                break
            info_file = getattr(owner, "info_file", None)
            if isinstance(info_file, str) and any(
                c.__name__ == "ServerApp" for c in type(owner).__mro__
            ):
                return info_file if os.path.exists(info_file) else None
            owner = getattr(owner, "parent", None)
        return None

    def _start_daemon(self, paths: DaemonPaths) -> int:
        """Start a daemon in the background; returns its pid."""
        from .daemonstart import start_daemon

        # Debug: a console shows INFO, and this is routine (failures warn).
        self.log.debug("pyrepl3: starting the manager daemon for %s", paths.lock.parent)
        # Who started it: the daemon may exit once this process is gone
        # (docs/daemon.md, "Lifecycle"); it prepares this launch's fork server.
        return start_daemon(
            paths,
            starter_pid=os.getpid(),
            python=self._python(),
            server_info_file=self._server_info_file(),
            warmup_code=self.warmup_code,
            idle_timeout=self.idle_timeout,
        )


#: How long a daemon's hello answers for later launches in this process.
HELLO_REUSE_S = 1.0
#: The last hello per event loop and daemon socket (in flight, or answered
#: when asked at the time given): the launches of a burst ask the daemon once.
_hellos: dict[tuple[int, str], tuple[float, asyncio.Task[dict[str, Any] | None]]] = {}


async def _shared_hello(client: DaemonClient) -> dict[str, Any] | None:
    """The daemon's hello (None if none answers), shared with the launches
    of this process that ask at the same time or asked within
    :data:`HELLO_REUSE_S` and got an answer."""
    loop = asyncio.get_running_loop()
    key = (id(loop), os.fspath(client.paths.socket))
    now = time.monotonic()
    known = _hellos.get(key)
    if known is not None:
        asked, task = known
        if task.get_loop() is loop and (
            not task.done()
            or (
                now - asked < HELLO_REUSE_S
                and not task.cancelled()
                and task.exception() is None
                and task.result() is not None
            )
        ):
            return await asyncio.shield(task)
    task = asyncio.ensure_future(client.aping())
    _hellos[key] = (now, task)
    if len(_hellos) > 64:  # old loops' entries
        for stale in [k for k, (t, _) in _hellos.items() if now - t > HELLO_REUSE_S]:
            _hellos.pop(stale, None)
    return await asyncio.shield(task)


def _forget_hello(client: DaemonClient) -> None:
    """No launch takes a hello of this daemon from before now for an answer."""
    path = os.fspath(client.paths.socket)
    for key in [k for k in _hellos if k[1] == path]:
        _hellos.pop(key, None)


def _standalone(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The cold fallback's launch: the kernelspec's argv as a standalone
    kernel, not handed to the daemon that just failed (handoff.py)."""
    env = dict(kwargs.get("env") or os.environ)
    env["PYREPL3_HANDOFF"] = "0"
    return {**kwargs, "env": env}


async def _in_thread(func: Callable[[], _T]) -> _T:
    """``func()`` in a worker thread; in this one if the default executor no
    longer takes work (at interpreter exit, or after the loop's executor was
    shut down: shutting kernels down then must still work)."""
    started = False

    def run() -> _T:
        nonlocal started
        started = True
        return func()

    try:
        return await asyncio.to_thread(run)
    except RuntimeError:
        if started:
            raise  # func's own error
    return func()


def _shows(logger: logging.Logger | logging.LoggerAdapter[Any], level: int) -> bool:
    """Whether a record of ``level`` on ``logger`` reaches a handler that
    outputs it (not only NullHandlers, nor Python's last-resort handler,
    which a NullHandler turns off)."""
    base = logger.logger if isinstance(logger, logging.LoggerAdapter) else logger
    if not base.isEnabledFor(level):
        return True  # deliberately silenced: respect that
    found = 0
    current: logging.Logger | None = base
    while current is not None:
        for handler in current.handlers:
            found += 1
            if not isinstance(handler, logging.NullHandler) and level >= handler.level:
                return True
        current = current.parent if current.propagate else None
    return found == 0  # no handler at all: logging's last resort prints it


def _tail(path: os.PathLike[str], lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-lines:]) or f"(empty log {path})"
    except OSError:
        return f"(no log at {path})"
