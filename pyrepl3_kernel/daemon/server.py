"""The manager daemon: one per user, many kernels, warm workers.

``pyrepl3-kernel serve`` runs it. It listens on an owner-only Unix socket in
the Jupyter runtime directory and hands out **leases**: a kernel (a
:class:`JupyterGateway` with its ports bound and its key chosen) whose worker
came from a warm pool. A lease is never handed out twice and its workers never
go back to a pool. Leases whose owner process died are reaped. It runs no
user code.

When it exits (see :meth:`ManagerDaemon._why_exit` and docs/daemon.md):
its runtime directory, lock or socket is removed or replaced (no client can
reach it any more); or nothing is leased and the process that started it is
gone, if that was a Jupyter server or the runtime directory is not the
user's usual one; or nothing was leased for ``idle_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .._version import __version__
from ..gateway.kernel import JupyterGateway
from ..session import PoolConfig, PoolExhausted, SessionPool, WorkerStartError
from ..session.workers import ColdWorkers, PooledWorkers, WorkerSource
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

log = logging.getLogger("pyrepl3.daemon")

#: Environment variables that act when an interpreter (or the worker's
#: shell) starts: workers started with different values of these are kept in
#: different pools. Every ``PYTHON*`` variable counts too (see
#: :func:`startup_key`).
STARTUP_ENV = (
    "LD_LIBRARY_PATH",
    "LD_PRELOAD",
    # the locale at start-up fixes the encodings (UTF-8 mode, stdio, file names)
    "LC_ALL",
    "LC_CTYPE",
    "LANG",
    # IPython adds the active virtualenv to sys.path when the shell starts
    "VIRTUAL_ENV",
)
#: PYTHON* variables read later, not at start-up (PYTHONSTARTUP: never, by a worker).
_NOT_STARTUP = frozenset({"PYTHONSTARTUP", "PYTHONBREAKPOINT", "PYTHONEXECUTABLE"})


def startup_key(env: dict[str, str]) -> tuple[Any, ...]:
    """What of ``env`` a worker takes in when it starts and cannot change
    later: two launches with the same key can share warm workers."""
    python_vars = tuple(
        sorted((k, v) for k, v in env.items() if k.startswith("PYTHON") and k not in _NOT_STARTUP)
    )
    # The shell's profile directory (history, startup files) is fixed when it starts.
    ipython_dir = env.get("IPYTHONDIR") or os.path.join(env.get("HOME", "~"), ".ipython")
    return (python_vars, ipython_dir, *(env.get(k) for k in STARTUP_ENV))


class DaemonAlreadyRunning(RuntimeError):
    pass


@dataclass
class Lease:
    id: str
    kernel_name: str
    kernel_id: str
    gateway: JupyterGateway
    workers: WorkerSource
    owner_pid: int
    owner_started: float | None
    pool_key: tuple[Any, ...] | None
    warm: bool
    created: float = field(default_factory=time.time)
    state: str = "running"  # running | awaiting_restart | ending

    def describe(self) -> dict[str, Any]:
        session = self.gateway.session
        return {
            "lease_id": self.id,
            "kernel_name": self.kernel_name,
            "kernel_id": self.kernel_id,
            "state": self.state,
            "owner_pid": self.owner_pid,
            "worker_pid": session.pid if session.is_alive else None,
            "warm": self.warm,
            "age_s": round(time.time() - self.created, 1),
            "restarts": session.restarts,
            "last_crash": session.last_crash,
            "health": session.monitor.sample() if session.is_alive else None,
            "ports": {k: v for k, v in self.gateway.connection_info.items() if k.endswith("_port")},
        }


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, ValueError):
        return None


def _is_usual_runtime_dir(path: os.PathLike[str]) -> bool:
    """Whether ``path`` is the runtime directory Jupyter uses when
    ``JUPYTER_RUNTIME_DIR`` does not choose another (``<data dir>/runtime``)."""
    from jupyter_core.paths import jupyter_data_dir

    usual = os.path.join(jupyter_data_dir(), "runtime")
    try:
        return os.path.samefile(usual, path)
    except OSError:
        return False


@dataclass
class Starter:
    """The process that started the daemon (a provisioner's), as the exit
    policy sees it: gone when its process ended, or, for a Jupyter server,
    when its info file (``jpserver-PID.json``, kept in its runtime
    directory while it runs) was removed: an in-process server (a test
    suite's) stops while its process lives on."""

    pid: int
    started: float | None
    server_info_file: str | None = None
    is_server: bool = False
    gone: bool = False

    @classmethod
    def from_env(cls, value: str | None) -> Starter | None:
        """From :data:`STARTER_ENV` (``{"pid", "started", "server_info_file"}``)."""
        if not value:
            return None
        try:
            fields = json.loads(value)
            pid = int(fields["pid"])
            started = float(fields["started"]) if fields.get("started") else None
            info_file = fields.get("server_info_file")
        except (ValueError, TypeError, KeyError):
            log.warning("ignoring %s=%r (not the JSON a provisioner sets)", STARTER_ENV, value)
            return None
        if pid <= 0:
            return None
        return cls(pid, started, str(info_file) if info_file else None, bool(info_file))

    def check(self, runtime_dir: os.PathLike[str]) -> bool:
        """Whether it is gone now."""
        if self.server_info_file:
            info_files = [self.server_info_file]
        else:  # a server that had not written its file yet when it started us
            info_files = [
                os.path.join(runtime_dir, f"{prefix}-{self.pid}.json")
                for prefix in ("jpserver", "nbserver")
            ]
        serving = any(os.path.exists(f) for f in info_files)
        self.is_server = self.is_server or serving
        alive = _owner_alive(self.pid, self.started)
        self.gone = not alive or (self.is_server and not serving)
        return self.gone

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid, "server": self.is_server, "gone": self.gone}


def _owner_alive(pid: int, started: float | None) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - started) < 1.0
    except psutil.Error:
        return False


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
        self.idle_timeout = idle_timeout
        self.reap_interval = reap_interval
        self.lease_timeout = lease_timeout
        self.started = time.time()
        self.leases: dict[str, Lease] = {}
        self.pools: dict[tuple[Any, ...], SessionPool] = {}
        self._pool_info: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._last_activity = time.monotonic()
        self._stop = asyncio.Event()
        self._lock_fd: int | None = None
        self._socket_id: tuple[int, int] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._inflight = 0  # requests being served
        #: The process that started this daemon (a provisioner's), if any.
        self.starter = Starter.from_env(os.environ.pop(STARTER_ENV, None))
        self._usual_runtime_dir = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.leases_served = 0
        self.warm_leases = 0

    # -- lifecycle ----------------------------------------------------------------

    async def serve(self) -> None:
        """Run until stopped; clean up every kernel and worker on the way out."""
        self._take_lock()
        self._usual_runtime_dir = _is_usual_runtime_dir(self.paths.lock.parent)
        try:
            await self._listen()
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
        await asyncio.gather(*(self._end_lease(lease) for lease in list(self.leases.values())))
        await asyncio.gather(*(pool.stop() for pool in self.pools.values()), return_exceptions=True)
        self.pools.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _watch(self) -> None:
        """Reap leases of dead owners; stop when it is time (see _why_exit)."""
        while True:
            await asyncio.sleep(self.reap_interval)
            for lease in list(self.leases.values()):
                if not _owner_alive(lease.owner_pid, lease.owner_started):
                    log.info("owner %s of lease %s is gone: reaping it", lease.owner_pid, lease.id)
                    await self._end_lease(lease)
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
        starter = self.starter
        starter_gone = starter is not None and starter.check(self.paths.lock.parent)
        if self.leases or self._inflight:
            return None
        if starter is not None and starter_gone:
            if starter.is_server:
                return (
                    f"the Jupyter server {starter.pid} that started it is gone, "
                    "and nothing is leased"
                )
            if not self._usual_runtime_dir:
                return (
                    f"the process {starter.pid} that started it is gone, nothing is leased, "
                    f"and {self.paths.lock.parent} is not the usual runtime directory"
                )
        idle = time.monotonic() - self._last_activity
        if idle > self.idle_timeout:
            return f"no leases for {idle:.0f} s"
        return None

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

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        self._last_activity = time.monotonic()
        self._inflight += 1
        try:
            result = await handler(self, request)
        finally:
            self._inflight -= 1
            self._last_activity = time.monotonic()
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
        if owner_pid <= 0 or not _owner_alive(owner_pid, None):
            raise DaemonError("bad_request", f"owner_pid {owner_pid} is not a running process")
        kernel_id = _field(request, "kernel_id", str, None) or str(uuid.uuid4())
        pool_cfg = _field(request, "pool", dict, {})
        size = _pool_int(pool_cfg, "size", 1, 0, 64)
        max_kernels = _pool_int(pool_cfg, "max_kernels", 256, 1, 4096)
        warmup_code = pool_cfg.get("warmup_code", "")
        if not isinstance(warmup_code, str):
            raise DaemonError("bad_request", "pool.warmup_code must be a string")
        enabled = bool(pool_cfg.get("enabled", True))
        launch_env = env if env is not None else dict(os.environ)

        pool_key: tuple[Any, ...] | None = None
        pool: SessionPool | None = None
        workers: WorkerSource
        if enabled:
            pool_key = (kernel_name, python, warmup_code, startup_key(launch_env))
            pool = await self._pool(pool_key, python, launch_env, size, max_kernels, warmup_code)
            workers = PooledWorkers(
                pool, cwd=cwd, env=env, timeout=self.lease_timeout, defer_refill=True
            )
        else:
            workers = ColdWorkers(python=python, cwd=cwd, env=launch_env)
        with _worker_errors():
            session = await workers.acquire()
        warm = isinstance(workers, PooledWorkers) and workers.last_was_warm
        if isinstance(workers, PooledWorkers):
            workers.defer_refill = False  # later acquires (restarts) refill at once
        lease_id = uuid.uuid4().hex
        info = {
            "transport": "tcp",
            "ip": "127.0.0.1",
            "key": secrets.token_hex(32),
            "signature_scheme": "hmac-sha256",
        }
        lease: Lease | None = None

        def on_shutdown(restart: bool) -> Any:
            assert lease is not None
            return self._on_kernel_shutdown(lease, restart)

        gateway = JupyterGateway(
            info,
            workers=workers,
            session=session,
            kernel_id=kernel_id,
            on_shutdown=on_shutdown,
            env=launch_env,  # limits (PYREPL3_MEMORY_LIMIT, ...) come with the launch
        )
        try:
            await gateway.start()
        except BaseException:
            await gateway.stop()
            raise
        lease = Lease(
            id=lease_id,
            kernel_name=kernel_name,
            kernel_id=kernel_id,
            gateway=gateway,
            workers=workers,
            owner_pid=owner_pid,
            owner_started=_process_started(owner_pid),
            pool_key=pool_key,
            warm=warm,
        )
        self.leases[lease_id] = lease
        self.leases_served += 1
        self.warm_leases += int(warm)
        connection_info = dict(gateway.connection_info)
        connection_info["key"] = connection_info["key"].decode()
        reply = {
            "lease_id": lease_id,
            "kernel_id": kernel_id,
            "connection_info": connection_info,
            "worker_pid": session.pid,
            "daemon_pid": os.getpid(),
            "warm": warm,
        }
        refill = pool.refill if pool is not None else None
        return reply, refill

    async def _op_restart(self, request: dict[str, Any]) -> dict[str, Any]:
        lease = self._lease(request)
        if lease.state == "ending":
            raise DaemonError("unknown_lease", f"lease {lease.id!r} is ending")
        with _worker_errors():
            await lease.gateway.restart_worker()
        lease.state = "running"
        lease.warm = isinstance(lease.workers, PooledWorkers) and lease.workers.last_was_warm
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
            await lease.gateway.session.release_worker()
            lease.state = "awaiting_restart"
            return {"ended": False}
        await self._end_lease(lease)
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
            await self._end_lease(lease)
            return {"running": False}
        return {"running": lease.state != "awaiting_restart"}

    async def _op_release(self, request: dict[str, Any]) -> dict[str, Any]:
        lease = self._lease(request, missing_ok=True)
        if lease is not None:
            await self._end_lease(lease)
        return {}

    async def _op_status(self, request: dict[str, Any]) -> dict[str, Any]:
        pools = []
        for key, pool in self.pools.items():
            pools.append({**self._pool_info[key], **pool.stats})
        return {
            "daemon": {
                "pid": os.getpid(),
                "version": __version__,
                "socket": os.fspath(self.paths.socket),
                "uptime_s": round(time.time() - self.started, 1),
                "idle_timeout_s": self.idle_timeout,
                # what the exit policy sees (docs/daemon.md, "Lifecycle")
                "usual_runtime_dir": self._usual_runtime_dir,
                "starter": None if self.starter is None else self.starter.describe(),
                "leases_served": self.leases_served,
                "warm_leases": self.warm_leases,
            },
            "pools": pools,
            "leases": [lease.describe() for lease in self.leases.values()],
        }

    async def _op_shutdown(self, request: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        return {"stopping": True}, self._stop.set

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
    }

    # -- leases and pools ---------------------------------------------------------

    def _lease(self, request: dict[str, Any], missing_ok: bool = False) -> Any:
        lease_id = _field(request, "lease_id", str, "")
        lease = self.leases.get(lease_id)
        if lease is None and not missing_ok:
            raise DaemonError("unknown_lease", f"no lease {lease_id!r} (ended, or never existed)")
        return lease

    async def _on_kernel_shutdown(self, lease: Lease, restart: bool) -> None:
        if restart:
            # jupyter_client follows with a restart op; a client that restarts
            # by message alone gets a new worker on its next request.
            await lease.gateway.session.release_worker()
            lease.state = "awaiting_restart"
        else:
            # Not awaited here: the gateway's own task is running this.
            self._spawn(self._end_lease(lease))

    async def _end_lease(self, lease: Lease) -> None:
        """Stop the lease's kernel; returns once its worker is gone (a second
        caller waits for the first). Until then the lease is ``ending``, and
        ``poll`` says it still runs: a client that sees the kernel as exited
        finds its worker gone and its ports closed."""
        if self.leases.get(lease.id) is not lease:
            return
        lease.state = "ending"
        self._last_activity = time.monotonic()
        try:
            await lease.gateway.stop()
        finally:
            self.leases.pop(lease.id, None)
            self._last_activity = time.monotonic()

    async def _pool(
        self,
        key: tuple[Any, ...],
        python: str,
        env: dict[str, str],
        size: int,
        max_kernels: int,
        warmup_code: str,
    ) -> SessionPool:
        pool = self.pools.get(key)
        if pool is not None:
            # The latest launch's settings win for size and limit.
            pool.config.min_idle = min(size, pool.config.max_sessions)
            return pool
        config = PoolConfig(
            min_idle=min(size, max_kernels),
            max_sessions=max_kernels,
            warmup_code=warmup_code,
            python=python,
            env=env,
            acquire_timeout=self.lease_timeout,
        )
        pool = SessionPool(config)
        await pool.start(wait=False)
        self.pools[key] = pool
        self._pool_info[key] = {"kernel_name": key[0], "python": python, "warmup_code": warmup_code}
        return pool

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


@contextlib.contextmanager
def _worker_errors() -> Iterator[None]:
    """Report a worker that cannot be had with its own error code."""
    try:
        yield
    except PoolExhausted as exc:
        raise DaemonError("exhausted", str(exc)) from None
    except WorkerStartError as exc:
        raise DaemonError("worker_failed", str(exc)) from None


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
