"""A forked worker, as :class:`~.worker.WorkerProcess` sees a started one:
an ``asyncio.SubprocessTransport`` (``get_pid``, ``get_returncode``,
``close``) for a process that is not our child, its stdout and stderr read
from pipes, its end seen through a pidfd. How it ended is the adopter's to
say (:meth:`ForkedWorker.exited`): a fork server's worker's, the server
reports it (or, if the server is gone, nobody can); a live fork's
(session/fork.py), :func:`zombie_exit_status` reads it while the fork is a
zombie."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from typing import Any


class ForkedWorker(asyncio.SubprocessTransport):
    """A forked worker as :class:`~.worker.WorkerProcess` sees a started one:
    the subprocess transport's ``get_pid``, ``get_returncode`` and ``close``;
    its stdout and stderr reach the protocol's ``pipe_data_received``."""

    def __init__(self, pid: int, protocol: asyncio.SubprocessProtocol) -> None:
        super().__init__()
        self._pid = pid
        self._protocol = protocol
        self._returncode: int | None = None
        self._exited = False
        self._pipes: list[asyncio.BaseTransport] = []
        self._pidfd: int | None = None
        self._closed = False

    def get_pid(self) -> int:
        return self._pid

    def get_returncode(self) -> int | None:
        return self._returncode

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for pipe in self._pipes:
            pipe.close()
        self._stop_watch()
        if not self._exited:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._pid, 9)

    def get_pipe_transport(self, fd: int) -> Any:
        return None

    def send_signal(self, signal: int) -> None:
        os.kill(self._pid, signal)

    def terminate(self) -> None:
        self.send_signal(15)

    def kill(self) -> None:
        self.send_signal(9)

    def exited(self, returncode: int | None) -> None:
        """The worker ended (``returncode`` None: nobody can tell how)."""
        if self._exited:
            return
        self._exited = True
        self._returncode = returncode
        self._stop_watch()
        self._protocol.process_exited()

    async def adopt(
        self,
        stdout: int,
        stderr: int,
        on_gone: Callable[[ForkedWorker], None],
        *,
        must_watch: bool = False,
    ) -> None:
        """Wire the worker up as a started one: the protocol's
        ``connection_made``, its end watched (``on_gone``, see :meth:`watch`),
        its ``stdout`` and ``stderr`` pipes (read ends, taken over) read. With
        ``must_watch``, a pidfd that cannot be opened (the worker is gone)
        closes both pipes and raises that ``OSError``."""
        self._protocol.connection_made(self)
        try:
            self.watch(on_gone, must=must_watch)
        except OSError:
            os.close(stdout)
            os.close(stderr)
            raise
        loop = asyncio.get_running_loop()
        for fd, read_end in ((1, stdout), (2, stderr)):
            pipe, _ = await loop.connect_read_pipe(
                lambda fd=fd: PipeReader(self._protocol, fd),  # type: ignore[misc]
                os.fdopen(read_end, "rb", buffering=0),
            )
            self._pipes.append(pipe)

    def watch(self, on_gone: Callable[[ForkedWorker], None], *, must: bool = False) -> None:
        """Call ``on_gone`` when the process ends (a pidfd: the worker is not
        our child, so no SIGCHLD reaches us). If no pidfd can be opened, no
        watch, or with ``must`` the ``OSError``."""
        try:
            self._pidfd = os.pidfd_open(self._pid)
        except (OSError, AttributeError):
            if must:
                raise
            return
        asyncio.get_running_loop().add_reader(self._pidfd, on_gone, self)

    def _stop_watch(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


class PipeReader(asyncio.Protocol):
    """Forwards a pipe's data to a subprocess protocol as its ``fd``."""

    def __init__(self, protocol: asyncio.SubprocessProtocol, fd: int) -> None:
        self.protocol = protocol
        self.fd = fd

    def data_received(self, data: bytes) -> None:
        self.protocol.pipe_data_received(self.fd, data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.pipe_connection_lost(self.fd, exc)


def zombie_exit_status(pid: int) -> int | None:
    """The exit status of ``pid`` while it is a zombie (``/proc/PID/stat``
    field 52), as ``Popen.returncode``; None once it is reaped."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is field 3 (state); exit_code is field 52.
    if len(fields) < 50 or fields[0] != b"Z":
        return None
    return os.waitstatus_to_exitcode(int(fields[49]))
