"""A worker forked by a fork server, as :class:`~.worker.WorkerProcess`
sees a started one: an ``asyncio.SubprocessTransport`` (``get_pid``,
``get_returncode``, ``close``) for a process that is not our child, its
stdout and stderr read from pipes, its end told by the fork server (exit
code or signal) or, if the server is gone, by a pidfd."""

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

    def watch(self, on_gone: Callable[[ForkedWorker], None]) -> None:
        """Call ``on_gone`` when the process ends (a pidfd: the worker is not
        our child, so no SIGCHLD reaches us)."""
        try:
            self._pidfd = os.pidfd_open(self._pid)
        except (OSError, AttributeError):
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
