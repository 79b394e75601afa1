"""The manager daemon: one per user, many kernels, warm workers.

``pyrepl3-kernel serve`` runs it. It listens on an owner-only Unix socket in
the Jupyter runtime directory (the wire contract is in ``client.py``), checks
each caller's uid, and serves the ops on :class:`~.leases.Leases` (kernels
with warm workers). It runs no user code.

When it exits (see :meth:`ManagerDaemon._why_exit`, ``lifetime.py`` and
docs/daemon.md): its runtime directory, lock or socket is removed or
replaced (no client can reach it any more); or nothing is leased and the
process that started it is gone, if that was a Jupyter server or the runtime
directory is not the user's usual one; or nothing was leased for
``idle_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import struct
import sys
import time
import uuid
from typing import Any

from .._version import __version__
from ..curve import PUBLIC, SECRET, CurveKeyError, CurveKeys
from ..errors import Pyrepl3Error
from ..processes import alive
from . import forks
from .client import (
    DAEMON_PROTOCOL_VERSION,
    HEADER,
    MAX_FRAME,
    STARTER_ENV,
    DaemonError,
    DaemonPaths,
    decode_payload,
    encode_frame,
)
from .forkservers import op_prepare
from .handoff import op_handoff, op_watch
from .leases import Leases
from .lifetime import ExitPolicy, Starter, is_usual_runtime_dir

log = logging.getLogger("pyrepl3.daemon")


class DaemonAlreadyRunning(Pyrepl3Error, RuntimeError):
    """Another daemon holds the lock of this runtime directory."""


class ManagerDaemon:
    """Serve leases on ``paths.socket`` until stopped or idle."""

    def __init__(
        self,
        paths: DaemonPaths | None = None,
        *,
        idle_timeout: float = 600.0,
        reap_interval: float = 2.0,
        lease_timeout: float = 120.0,
    ) -> None:
        self.paths = paths or DaemonPaths.default()
        self.reap_interval = reap_interval
        self.started = time.time()
        starter = Starter.from_env(os.environ.pop(STARTER_ENV, None))
        self.exit_policy = ExitPolicy(self.paths.lock.parent, idle_timeout, starter)
        self.leases = Leases(lease_timeout=lease_timeout, on_activity=self.exit_policy.touch)
        self._stop = asyncio.Event()
        self._lock_fd: int | None = None
        self._socket_id: tuple[int, int] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._inflight = 0  # requests being served
        self._preparing: asyncio.Future[None] | None = None  # an argv kernelspec's pool

    # -- lifecycle ----------------------------------------------------------------

    async def serve(self) -> None:
        """Run until stopped; clean up every kernel and worker on the way out."""
        self._take_lock()
        self.exit_policy.usual_runtime_dir = is_usual_runtime_dir(self.paths.lock.parent)
        try:
            await self._listen()
            # The first kernel is forked too; an argv launch's kernelspec
            # gets its pool now, so the next launch is leased warm.
            kernel_name = self.leases.fork_servers.prepare_own()
            if kernel_name is not None:
                self._prepare_pool(kernel_name)
            self.exit_policy.prime()  # its imports now, not on the first lease
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._stop.set)
            watch = asyncio.ensure_future(self._watch())
            log.info("pyrepl3 daemon %s serving on %s", os.getpid(), self.paths.socket)
            try:
                await self._stop.wait()
            finally:
                watch.cancel()
                await self._cleanup()
        finally:
            self._release_lock()

    def stop(self) -> None:
        self._stop.set()

    def _take_lock(self) -> None:
        self.paths.lock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DaemonAlreadyRunning(
                f"another pyrepl3 daemon holds {self.paths.lock}; use `pyrepl3-kernel status`"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _listen(self) -> None:
        path = self.paths.socket
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.parent.stat().st_uid != os.getuid():
            raise RuntimeError(f"{path.parent} belongs to another user; refusing to listen there")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # stale: we hold the lock, so no daemon uses it
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=os.fspath(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        st = os.stat(path)
        self._socket_id = (st.st_dev, st.st_ino)

    async def _cleanup(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            if self._socket_is_ours():
                self.paths.socket.unlink()
        # No client reaches this daemon any more: a new one may start at
        # once, while this one stops its kernels.
        self._release_lock()
        if self._preparing is not None:
            self._preparing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._preparing
        await self.leases.stop()

    async def _watch(self) -> None:
        """Reap leases of dead owners; stop when it is time (see _why_exit)."""
        while True:
            await asyncio.sleep(self.reap_interval)
            await self.leases.reap()
            reason = self._why_exit()
            if reason is not None:
                log.info("exiting: %s", reason)
                self._stop.set()
                return

    def _why_exit(self) -> str | None:
        """Why the daemon should stop now, or None to keep serving."""
        unreachable = self._unreachable()
        if unreachable is not None:
            return unreachable  # with its kernels: nobody could manage them
        return self.exit_policy.why_exit(busy=bool(self.leases) or self._inflight > 0)

    def _unreachable(self) -> str | None:
        """Why clients can no longer reach this daemon (its lock file or
        socket was removed or replaced), or None."""
        if self._lock_fd is not None:
            held = os.fstat(self._lock_fd)
            try:
                st = os.stat(self.paths.lock)
            except OSError:
                return f"its lock file {self.paths.lock} (or the runtime directory) was removed"
            if (st.st_dev, st.st_ino) != (held.st_dev, held.st_ino):
                return f"its lock file {self.paths.lock} was replaced"
        if self._socket_id is not None and not self._socket_is_ours():
            return f"its socket {self.paths.socket} was removed or replaced"
        return None

    def _socket_is_ours(self) -> bool:
        try:
            st = os.stat(self.paths.socket)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._socket_id

    # -- requests -------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reply: dict[str, Any]
        after: Any = None
        try:
            self._check_peer(writer)
            header = await asyncio.wait_for(reader.readexactly(HEADER.size), 10)
            (length,) = HEADER.unpack(header)
            if length > MAX_FRAME:
                raise DaemonError("too_large", f"request of {length} bytes exceeds {MAX_FRAME}")
            request = decode_payload(await asyncio.wait_for(reader.readexactly(length), 10))
            reply, after = await self._dispatch(request)
        except DaemonError as exc:
            reply = {"ok": False, "code": exc.code, "error": str(exc)}
        except (asyncio.IncompleteReadError, asyncio.TimeoutError):
            reply = {"ok": False, "code": "malformed", "error": "incomplete request frame"}
        except Exception as exc:
            log.exception("error serving a daemon request")
            reply = {"ok": False, "code": "internal", "error": f"{type(exc).__name__}: {exc}"}
        reply["v"] = DAEMON_PROTOCOL_VERSION
        with contextlib.suppress(Exception):
            writer.write(encode_frame(reply))
            await writer.drain()
            if not reply["ok"]:
                # An error may leave the request unread (forbidden, too_large),
                # and closing a socket with unread input resets the connection:
                # the client could lose the reply. Read (a bounded amount of)
                # what is left until the client closes its end.
                writer.write_eof()
                await asyncio.wait_for(_discard(reader, MAX_DISCARD), 2.0)
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        if after is not None:
            after()

    def _check_peer(self, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid():
            raise DaemonError(
                "forbidden",
                f"this pyrepl3 daemon belongs to uid {os.getuid()}; uid {uid} may not use it",
            )

    async def _dispatch(self, request: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        version = request.get("v")
        if type(version) is not int or version != DAEMON_PROTOCOL_VERSION:
            raise DaemonError(
                "unsupported_version",
                f"daemon protocol version {version!r} is not supported "
                f"(this daemon speaks {DAEMON_PROTOCOL_VERSION}, pyrepl3-kernel {__version__})",
            )
        op = request.get("op")
        handler = self._ops.get(op) if isinstance(op, str) else None
        if handler is None:
            raise DaemonError(
                "unknown_op", f"unknown daemon op {op!r} (known: {sorted(self._ops)})"
            )
        self.exit_policy.touch()
        self._inflight += 1
        try:
            result = await handler(self, request)
        finally:
            self._inflight -= 1
            self.exit_policy.touch()
        if isinstance(result, tuple):
            reply, after = result
        else:
            reply, after = result, None
        return {"ok": True, **reply}, after

    async def _op_hello(self, request: dict[str, Any]) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "version": __version__,
            "protocol": DAEMON_PROTOCOL_VERSION,
            "uptime_s": round(time.time() - self.started, 1),
        }

    async def _op_lease(self, request: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        kernel_name = _field(request, "kernel_name", str, "pyrepl3")
        python = _field(request, "python", str, "") or self._python_of(kernel_name)
        if not (os.path.isfile(python) and os.access(python, os.X_OK)):
            raise DaemonError("bad_request", f"python {python!r} is not an executable file")
        env = _field(request, "env", dict, None)
        if env is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise DaemonError("bad_request", "env must map strings to strings")
        cwd = _field(request, "cwd", str, None)
        if cwd is not None and not os.path.isdir(cwd):
            raise DaemonError("bad_request", f"cwd {cwd!r} is not a directory")
        owner_pid = _field(request, "owner_pid", int, 0)
        if owner_pid <= 0 or not alive(owner_pid):
            raise DaemonError("bad_request", f"owner_pid {owner_pid} is not a running process")
        kernel_id = _field(request, "kernel_id", str, None) or str(uuid.uuid4())
        pool_cfg = _field(request, "pool", dict, {})
        size = _pool_int(pool_cfg, "size", 1, 0, 64)
        max_kernels = _pool_int(pool_cfg, "max_kernels", 256, 1, 4096)
        warmup_code = pool_cfg.get("warmup_code", "")
        if not isinstance(warmup_code, str):
            raise DaemonError("bad_request", "pool.warmup_code must be a string")
        enabled = bool(pool_cfg.get("enabled", True))
        try:  # the KernelManager's CurveZMQ keys, if it asked for encryption
            curve = CurveKeys.of({name: request.get(name) for name in (PUBLIC, SECRET)})
        except CurveKeyError as exc:
            raise DaemonError("bad_request", str(exc)) from None
        lease, refill = await self.leases.create(
            kernel_name=kernel_name,
            kernel_id=kernel_id,
            python=python,
            env=env,
            cwd=cwd,
            owner_pid=owner_pid,
            pooled=enabled,
            pool_size=size,
            max_kernels=max_kernels,
            warmup_code=warmup_code,
            curve=curve,
        )
        gateway = lease.gateway
        connection_info = dict(gateway.connection_info)
        connection_info["key"] = connection_info["key"].decode()
        reply = {
            "lease_id": lease.id,
            "kernel_id": kernel_id,
            "connection_info": connection_info,
            "worker_pid": gateway.session.pid,
            "daemon_pid": os.getpid(),
            "warm": lease.warm,
        }
        return reply, refill

    async def _op_restart(self, request: dict[str, Any]) -> dict[str, Any]:
        lease = self._lease(request)
        if lease.state == "ending":
            raise DaemonError("unknown_lease", f"lease {lease.id!r} is ending")
        await self.leases.restart(lease)
        info = dict(lease.gateway.connection_info)
        info["key"] = info["key"].decode()
        return {
            "connection_info": info,
            "worker_pid": lease.gateway.session.pid,
            "warm": lease.warm,
        }

    async def _op_kill(self, request: dict[str, Any]) -> dict[str, Any]:
        lease = self._lease(request, missing_ok=True)
        if lease is None:
            return {"ended": True}
        if bool(request.get("restart", False)):
            await self.leases.let_worker_go(lease)
            return {"ended": False}
        await self.leases.end(lease)
        return {"ended": True}

    async def _op_poll(self, request: dict[str, Any]) -> dict[str, Any]:
        lease = self._lease(request, missing_ok=True)
        if lease is None or lease.state == "awaiting_restart":
            return {"running": False, "exit_code": 0}
        return {"running": True}

    async def _op_signal(self, request: dict[str, Any]) -> dict[str, Any]:
        signum = _field(request, "signum", int, 0)
        lease = self._lease(request, missing_ok=signum != signal.SIGINT)
        if lease is None:
            return {"running": False}
        if signum == signal.SIGINT:
            await lease.gateway.interrupt()
        elif signum != 0:
            await self.leases.end(lease)
            return {"running": False}
        return {"running": lease.state != "awaiting_restart"}

    async def _op_release(self, request: dict[str, Any]) -> dict[str, Any]:
        lease = self._lease(request, missing_ok=True)
        if lease is not None:
            await self.leases.end(lease)
        return {}

    async def _op_status(self, request: dict[str, Any]) -> dict[str, Any]:
        return {
            "daemon": {
                "pid": os.getpid(),
                "version": __version__,
                "socket": os.fspath(self.paths.socket),
                "uptime_s": round(time.time() - self.started, 1),
                # what the exit policy sees (docs/daemon.md, "Lifecycle")
                **self.exit_policy.describe(),
                "leases_served": self.leases.served,
                "warm_leases": self.leases.served_warm,
            },
            "pools": self.leases.describe_pools(),
            "fork_servers": self.leases.fork_servers.describe_all(),
            "leases": [lease.describe() for lease in self.leases],
        }

    async def _op_shutdown(self, request: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        return {"stopping": True}, self._stop.set

    async def _op_fork(self, request: dict[str, Any]) -> dict[str, Any]:
        """A new lease whose worker is a fork of ``lease_id``'s (docs/fork.md)."""
        return await forks.op_fork(self.leases, self._lease(request), request)

    async def _op_forks(self, request: dict[str, Any]) -> dict[str, Any]:
        return forks.op_forks(self.leases)

    async def _op_adopt(self, request: dict[str, Any]) -> dict[str, Any]:
        return forks.op_adopt(self._lease(request), request)

    _ops: dict[str, Any] = {
        "hello": _op_hello,
        "lease": _op_lease,
        "restart": _op_restart,
        "kill": _op_kill,
        "poll": _op_poll,
        "signal": _op_signal,
        "release": _op_release,
        "status": _op_status,
        "shutdown": _op_shutdown,
        "handoff": op_handoff,
        "watch": op_watch,
        "prepare": op_prepare,
        "fork": _op_fork,
        "forks": _op_forks,
        "adopt": _op_adopt,
        # the fork of a kernel not hosted here (a standalone kernel's %fork)
        "fork_listen": forks.op_fork_listen,
        "fork_adopt": forks.op_fork_adopt,
    }

    def _lease(self, request: dict[str, Any], missing_ok: bool = False) -> Any:
        """The request's lease; an unknown one is an ``unknown_lease`` error
        unless ``missing_ok`` (then None)."""
        lease_id = _field(request, "lease_id", str, "")
        lease = self.leases.get(lease_id)
        if lease is None and not missing_ok:
            raise DaemonError("unknown_lease", f"no lease {lease_id!r} (ended, or never existed)")
        return lease

    def _prepare_pool(self, kernel_name: str) -> None:
        """Warm the pool a handed-off launch of ``kernel_name`` takes its
        worker from (daemon/handoff.py: this interpreter and environment,
        no warm-up code), in the background; a failure is logged."""

        async def prepare() -> None:
            try:
                await self.leases.prepare(
                    kernel_name=kernel_name,
                    python=sys.executable,
                    env=dict(os.environ),
                    pool_size=1,
                    max_kernels=256,
                    warmup_code="",
                )
            except Exception as exc:
                log.warning("could not prepare the pool of %s: %s", kernel_name, exc)

        task = asyncio.ensure_future(prepare())
        self._preparing = task  # kept: a task nobody holds may be collected

    def _python_of(self, kernel_name: str) -> str:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

        try:
            spec = KernelSpecManager().get_kernel_spec(kernel_name)
        except NoSuchKernel:
            raise DaemonError("unknown_kernel", f"no kernelspec named {kernel_name!r}") from None
        return str(spec.argv[0])


#: Most bytes of an unread request the daemon reads (and drops) after an error.
MAX_DISCARD = 1 << 20


async def _discard(reader: asyncio.StreamReader, limit: int) -> None:
    while limit > 0:
        chunk = await reader.read(min(limit, 65536))
        if not chunk:
            return
        limit -= len(chunk)


def _field(request: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = request.get(name, default)
    if value is None or value is default:
        return value
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DaemonError("bad_request", f"field {name!r} must be {kind.__name__}")
    return value


def _pool_int(cfg: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = cfg.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise DaemonError("bad_request", f"pool.{name} must be an integer from {lo} to {hi}")
    return value


def run(paths: DaemonPaths | None = None, idle_timeout: float = 600.0) -> int:
    """Entry point of ``pyrepl3-kernel serve``: 0 on a clean exit, 1 if
    another daemon already serves this runtime directory."""
    daemon = ManagerDaemon(paths, idle_timeout=idle_timeout)
    try:
        asyncio.run(daemon.serve())
    except DaemonAlreadyRunning as exc:
        log.error("%s", exc)
        return 1
    return 0
