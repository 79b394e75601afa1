"""Fork a live session: a new supervised :class:`~.supervised.Session` whose
worker is a copy-on-write fork of a running session's worker.

How the new worker comes to its new supervisor (docs/fork.md): the
supervisor listens on a Unix socket in an owner-only directory and sends the
running worker a ``fork`` request naming it and a random token; the worker
forks at an idle point (the request waits for no cell: a session running a
cell refuses to fork, :class:`ForkBusyError`); the new worker, in a session
and process group of its own, connects, sends the token, and receives the
write ends of its stdout and stderr pipes. That connection is its protocol
socket. The supervisor checks the peer's uid and pid (``SO_PEERCRED``)
against the fork reply.

:class:`ForkedWorkerProcess` is a :class:`~.worker.WorkerProcess` for a
process that is not this process's child: its death is seen through a pidfd
(and its socket's end), its exit status is read from ``/proc`` while it is a
zombie (when the reaper has not been faster: then it is unknown), and it is
killed, interrupted and measured by its process group and pid as a started
worker is. Limits, autosave and crash recovery work as for any worker: the
session's replacement for a dead fork is a cold worker with the fork's last
automatic checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import shutil
import signal
import socket
import struct
import tempfile
from typing import Any

from ..errors import Pyrepl3Error
from ..protocol import ForkMessage, ForkReplyMessage
from .forked import ForkedWorker, zombie_exit_status
from .supervised import Session
from .worker import (
    WorkerProcess,
    WorkerStartError,
    _ControlProtocol,
    _ProcessProtocol,
    describe_exit,
)
from .workers import ColdWorkers

log = logging.getLogger("pyrepl3.session")

#: How long the fork may take to connect to its new supervisor.
CONNECT_TIMEOUT_S = 30.0
_TOKEN_MAX = 256


class ForkError(Pyrepl3Error, RuntimeError):
    """The kernel could not be forked; the message says why."""


class ForkBusyError(ForkError):
    """The kernel is running a cell: a fork is taken only at an idle point."""

    def __init__(self, running: str | None = None) -> None:
        super().__init__(
            "the kernel is running a cell; fork it when the cell has finished "
            "(or interrupt the cell first)"
        )
        self.running = running


class ForkListener:
    """An owner-only Unix socket that one forked worker connects to."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="pyrepl3-fork-")  # mode 0700
        self.path = os.path.join(self.directory, "s")
        self.token = secrets.token_hex(16)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(4)
        self._sock.setblocking(False)

    async def accept(self) -> tuple[socket.socket, int, int, int]:
        """The fork's connection, the read ends of its stdout and stderr
        pipes, and its pid. Connections without the token are dropped."""
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            try:
                pid, uid, _gid = struct.unpack(
                    "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                )
                line = await self._read_line(conn)
                if uid != os.getuid() or not hmac.compare_digest(line, self.token.encode()):
                    log.warning("fork listener: dropped a connection without the token")
                    conn.close()
                    continue
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
                try:
                    conn.setblocking(True)
                    socket.send_fds(conn, [b"p"], [out_w, err_w])
                finally:
                    os.close(out_w)
                    os.close(err_w)
                return conn, out_r, err_r, pid
            except OSError as exc:
                log.warning("fork listener: connection failed: %s", exc)
                conn.close()

    @staticmethod
    async def _read_line(conn: socket.socket) -> bytes:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        data = b""
        while not data.endswith(b"\n") and len(data) <= _TOKEN_MAX:
            chunk = await loop.sock_recv(conn, _TOKEN_MAX + 1 - len(data))
            if not chunk:
                break
            data += chunk
        return data.rstrip(b"\n")

    def close(self) -> None:
        self._sock.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class ForkedWorkerProcess(WorkerProcess):
    """A worker forked from another one, adopted over its own connection.

    ``fork_report`` is what the fork did not carry over (``lost``) or shares
    with its parent (``shared``), by name."""

    def __init__(
        self,
        conn: socket.socket,
        stdout: int,
        stderr: int,
        pid: int,
        *,
        fork_report: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self._adoption: tuple[socket.socket, int, int] | None = (conn, stdout, stderr)
        self._adopted_pid = pid
        self.fork_report: dict[str, Any] = fork_report or {"lost": {}, "shared": {}}
        self._killed = False  # by us: an unreadable exit status is SIGKILL
        self._exit_seen = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self._adopted_pid

    async def start(self) -> None:
        """Wire up the connection and pipes; wait for the fork's READY."""
        if self._adoption is None:
            raise WorkerStartError("a forked worker cannot be started again; fork anew")
        conn, stdout, stderr = self._adoption
        self._adoption = None
        self._reset()
        generation = self._generation
        loop = asyncio.get_running_loop()
        protocol = _ProcessProtocol(self, generation)
        process = ForkedWorker(self._adopted_pid, protocol)
        self._killed = False
        self._exit_seen = asyncio.Event()
        self._process = process  # before any await: its end may come at once
        self._process_protocol = protocol
        try:
            await process.adopt(stdout, stderr, self._on_gone, must_watch=True)
        except OSError as exc:  # gone already
            self._process = self._process_protocol = None
            conn.close()
            raise WorkerStartError(f"the forked worker is gone: {exc}") from None
        self._ready_future = loop.create_future()
        conn.setblocking(False)
        control, _ = await loop.create_unix_connection(
            lambda: _ControlProtocol(self, generation), sock=conn
        )
        self._control = control
        try:
            ready = await asyncio.wait_for(asyncio.shield(self._ready_future), self.startup_timeout)
        except Exception as exc:
            await self._kill()
            raise WorkerStartError(f"the forked worker did not become ready: {exc}") from None
        self.ready = ready

    async def restart(self) -> None:
        raise WorkerStartError("a forked worker cannot be restarted; its session starts a new one")

    def _on_gone(self, process: ForkedWorker) -> None:
        """The fork's pidfd says it ended: its status, read while it is a
        zombie (unknown once reaped, unless we killed it)."""
        status = zombie_exit_status(process.get_pid())
        if status is None and self._killed:
            status = -signal.SIGKILL
        self._exit_seen.set()
        process.exited(status)

    async def _kill(self) -> None:
        # Not WorkerProcess._kill: the return code comes with the pidfd's
        # event (_on_gone), and may stay unknown.
        process = self._process
        if process is None:
            return
        if not self._exit_seen.is_set():
            self._killed = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.get_pid(), signal.SIGKILL)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._exit_seen.wait(), 2.0)
        self.returncode = process.get_returncode()
        if self._control is not None:
            self._control.close()
        process.close()


async def fork_worker(
    parent: WorkerProcess, *, timeout: float = CONNECT_TIMEOUT_S
) -> ForkedWorkerProcess:
    """Fork ``parent`` (a ready worker, idle) and adopt the fork, a worker
    with ``parent``'s settings (interpreter, directory, environment, start-up
    timeout, log level, IPython options)."""
    listener = ForkListener()
    try:
        accepted = asyncio.ensure_future(listener.accept())
        try:
            reply = await parent.request(ForkMessage(path=listener.path, token=listener.token))
            if not reply.ok:
                raise ForkError(f"the worker could not fork: {reply.ename}: {reply.evalue}")
            assert isinstance(reply, ForkReplyMessage)
            conn, stdout, stderr, pid = await _connection_of(accepted, reply.pid, timeout)
        finally:
            accepted.cancel()
    finally:
        listener.close()
    if pid != reply.pid:
        conn.close()
        os.close(stdout)
        os.close(stderr)
        raise ForkError(f"the fork's connection came from pid {pid}, not the fork ({reply.pid})")
    worker = ForkedWorkerProcess(
        conn,
        stdout,
        stderr,
        pid,
        fork_report=reply.report,
        python=parent.python,
        cwd=parent.cwd,
        env=parent.env,
        startup_timeout=parent.startup_timeout,
        worker_log_level=parent.worker_log_level,
        ipython_options=parent.ipython_options,
    )
    await worker.start()
    return worker


async def _connection_of(
    accepted: asyncio.Future[tuple[socket.socket, int, int, int]], pid: int, timeout: float
) -> tuple[socket.socket, int, int, int]:
    """The fork's connection; a ForkError at once if the fork dies before
    it connects, or after ``timeout`` (then it is killed)."""
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[Any] = loop.create_future()

    def exited() -> None:
        if not gone.done():
            gone.set_result(None)

    pidfd: int | None = None
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        exited()
    else:
        loop.add_reader(pidfd, exited)
    waiting: set[asyncio.Future[Any]] = {accepted, gone}
    try:
        done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if pidfd is not None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
    if accepted in done:
        return accepted.result()
    if gone in done:
        status = zombie_exit_status(pid)
        how = f" ({describe_exit(status)})" if status is not None else ""
        raise ForkError(f"the forked worker (pid {pid}) exited before it connected{how}")
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # it never got here
    raise ForkError(f"the forked worker (pid {pid}) did not connect within {timeout:g} s")


class ForkedSession(Session):
    """A session forked from another; ``fork_report`` says what its first
    worker did not carry over the fork (``lost``) and what it shares with
    the parent's worker (``shared``), by name."""

    fork_report: dict[str, Any]
    #: The id of the session it was forked from.
    forked_from: str


async def fork_session(
    parent: Session,
    *,
    session_id: str | None = None,
    autosave: str | bool | None = None,
    on_unrouted: Any = None,
) -> ForkedSession:
    """A new session, started, whose worker is a fork of ``parent``'s (see
    :meth:`Session.fork`). ``autosave``: as :class:`Session` takes it; by
    default on (a directory of its own) if ``parent`` saves automatically. Raises :class:`ForkBusyError` while ``parent``
    runs a cell, :class:`ForkError` if the fork fails (``parent`` is
    untouched either way)."""
    if parent.running is not None:
        raise ForkBusyError(parent.running)
    await parent.ensure_worker()
    if autosave is None:
        autosave = parent.autosave_dir is not None
    worker = await fork_worker(parent.worker)
    child = ForkedSession(
        python=parent.python,
        cwd=parent.cwd,
        env=parent.env,
        workers=ColdWorkers(python=parent.python, cwd=parent.cwd, env=parent.env),
        worker=worker,
        session_id=session_id,
        autosave=autosave,
        limits=parent.limits,
        on_unrouted=on_unrouted,
    )
    child.fork_report = worker.fork_report
    child.forked_from = parent.id
    child.execution_count = parent.execution_count
    try:
        await child.start()
    except BaseException:
        await child.shutdown()
        raise
    return child
