"""The heartbeat channel: an echo on its own thread, so a busy event loop
never makes a live kernel look dead.

Every kernel of a process shares one echo thread and one ZMQ context (the
daemon hosts many kernels: a context and a thread each cost three threads
and about a millisecond per kernel). Each kernel keeps its own socket, bound
on its own port: the thread echoes every message back to the peer that sent
it (the REP behaviour jupyter_client's heartbeat pings expect), and a
kernel's :meth:`Heartbeat.stop` closes its socket, so its port stops
answering while the others' still do.
"""

from __future__ import annotations

import contextlib
import os
import threading

import zmq

from ..curve import CurveKeys, serve_on

#: How long :meth:`Heartbeat.stop` waits for the echo thread to close the socket.
STOP_WAIT = 2.0


class _Echo:
    """The process's echo thread and its context. Sockets are handed to it
    bound and from then on touched by that thread alone (ZMQ sockets are
    not thread-safe); a pipe wakes its poll for a new one or a closing."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.ctx = zmq.Context()
        self._lock = threading.Lock()
        self._adds: list[zmq.Socket[bytes]] = []
        self._closes: list[tuple[zmq.Socket[bytes], threading.Event]] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, daemon=True, name="pyrepl3-heartbeat")
        self._thread.start()

    def add(self, sock: zmq.Socket[bytes]) -> None:
        with self._lock:
            self._adds.append(sock)
        self._wake()

    def close(self, sock: zmq.Socket[bytes]) -> None:
        """Close ``sock`` on the echo thread; returns once it is closed (or
        after :data:`STOP_WAIT` if the thread is gone)."""
        done = threading.Event()
        with self._lock:
            self._closes.append((sock, done))
        self._wake()
        if not done.wait(STOP_WAIT if self._thread.is_alive() else 0):
            sock.close(linger=0)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        while True:
            for sock, flags in poller.poll():
                if sock == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self._wake_r, 4096):
                            pass
                    self._take_orders(poller)
                elif flags & zmq.POLLIN and isinstance(sock, zmq.Socket) and not sock.closed:
                    _echo(sock)

    def _take_orders(self, poller: zmq.Poller) -> None:
        with self._lock:
            adds, self._adds = self._adds, []
            closes, self._closes = self._closes, []
        for sock in adds:
            poller.register(sock, zmq.POLLIN)
        for sock, done in closes:
            with contextlib.suppress(KeyError):
                poller.unregister(sock)
            sock.close(linger=0)
            done.set()


def _echo(sock: zmq.Socket[bytes]) -> None:
    """Send back everything queued on ``sock`` (a ROUTER: the first frame
    is the peer's identity, so each ping goes back to its sender)."""
    for _ in range(1000):
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
        except zmq.Again:
            return
        with contextlib.suppress(zmq.ZMQError):
            sock.send_multipart(frames, zmq.NOBLOCK)


_echo_lock = threading.Lock()
_process_echo: _Echo | None = None


def _shared() -> _Echo:
    """This process's echo thread (a new one in a forked child: the
    parent's thread does not exist there)."""
    global _process_echo
    with _echo_lock:
        if _process_echo is None or _process_echo.pid != os.getpid():
            _process_echo = _Echo()
        return _process_echo


class Heartbeat:
    """One kernel's heartbeat socket, bound at construction on ``port`` (0:
    a free port, tcp only); echoing from :meth:`start` to :meth:`stop`."""

    def __init__(self, url: str, port: int, curve: CurveKeys | None = None) -> None:
        self._echo = _shared()
        self._sock: zmq.Socket[bytes] = self._echo.ctx.socket(zmq.ROUTER)
        self._sock.linger = 0
        serve_on(self._sock, curve)
        try:
            if port:
                self._sock.bind(f"{url}:{port}" if url.startswith("tcp") else f"{url}-{port}")
                self.port = port
            elif url.startswith("tcp"):
                self.port = self._sock.bind_to_random_port(url)
            else:
                raise ValueError("an ipc heartbeat needs an explicit port number")
        except BaseException:
            self._sock.close(linger=0)
            raise
        self._started = False
        self._stopped = False

    def start(self) -> None:
        if self._started or self._stopped:
            return
        self._started = True
        self._echo.add(self._sock)

    def stop(self) -> None:
        """Stop answering and free the port (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        if self._started:
            self._echo.close(self._sock)
        else:
            self._sock.close(linger=0)
