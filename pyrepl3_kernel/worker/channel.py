"""The worker's end of the native protocol: one socket, framed messages.

Reading happens on a dedicated I/O thread with every signal blocked, so a
SIGINT always lands on the main thread where user code runs. Sending may happen
from any thread; a send is atomic with respect to SIGINT (the signal is held
back until the frame is fully written) so an interrupt can never cut a frame.

When the supervisor's end closes (it died, even by SIGKILL), the worker ends
and takes along every process user code started in its process group
(:func:`end_process_group`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from typing import NoReturn

from ..protocol import (
    FrameDecoder,
    Message,
    ProtocolError,
    ProtocolErrorMessage,
    decode,
    encode,
    frame,
)

log = logging.getLogger("pyrepl3.worker")

_SIGINT = {signal.SIGINT}


class Channel:
    """Framed message I/O over the socket inherited from the supervisor."""

    def __init__(self, sock: socket.socket, stream_fds: tuple[int, ...]) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self._main_ident = threading.main_thread().ident
        # Private copies of the stream pipes' write ends: user code may dup2
        # something else onto fd 1/2, the pipes stay measurable.
        self._stream_fds = tuple(os.dup(fd) for fd in stream_fds if _is_pipe(fd))
        for fd in self._stream_fds:
            os.set_inheritable(fd, False)

    @property
    def private_fds(self) -> list[int]:
        """Descriptors only the worker itself may hold (not a forked child)."""
        return list(self._stream_fds)

    def send(self, msg: Message) -> None:
        data = frame(encode(msg))
        on_main = threading.get_ident() == self._main_ident
        if on_main:
            signal.pthread_sigmask(signal.SIG_BLOCK, _SIGINT)
        try:
            with self._send_lock:
                self.sock.sendall(data)
        except OSError:
            # The supervisor is gone; the reader thread exits the process.
            pass
        finally:
            if on_main:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGINT)

    def drain_streams(self, timeout: float = 5.0) -> None:
        """Wait until the supervisor has read everything written to stdout and
        stderr so far, so stream output stays ahead of the next message."""
        deadline = None
        for fd in self._stream_fds:
            while _unread(fd) > 0:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + timeout
                elif now > deadline:
                    return
                time.sleep(0.0002)

    def serve(self, dispatch: Callable[[Message], None]) -> None:
        """Read messages until EOF (run on the I/O thread)."""
        signal.pthread_sigmask(
            signal.SIG_BLOCK, set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}
        )
        decoder = FrameDecoder()
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                # The supervisor closed its end or died: nobody can see our
                # results any more, so there is no point in running on.
                end_process_group()
            for item in decoder.feed(data):
                if isinstance(item, ProtocolError):
                    self.report(item)
                    continue
                try:
                    msg = decode(item)
                except ProtocolError as exc:
                    self.report(exc)
                    continue
                dispatch(msg)

    def report(self, exc: ProtocolError) -> None:
        log.warning("protocol error: %s", exc)
        self.send(ProtocolErrorMessage(code=exc.code, detail=exc.detail, parent_id=exc.message_id))


def end_process_group() -> NoReturn:
    """Exit now, with the processes user code started (``subprocess.Popen``
    of a cell, multiprocessing children, their children): the supervisor
    starts the worker in a session of its own, so they share its process
    group unless they left it. The supervisor kills that group when it stops
    a worker; when the supervisor itself was killed, this does it."""
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)  # this process included
    os._exit(0)


def _is_pipe(fd: int) -> bool:
    import stat

    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


_FIONREAD_BUF = struct.pack("i", 0)


def _unread(fd: int) -> int:
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, _FIONREAD_BUF))[0]  # type: ignore[no-any-return]
    except OSError:
        return 0
