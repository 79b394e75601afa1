"""The heartbeat channel: an echo on its own thread, so a busy event loop
never makes a live kernel look dead."""

from __future__ import annotations

import threading

import zmq

from ..curve import CurveKeys, serve_on


class Heartbeat:
    def __init__(self, url: str, port: int, curve: CurveKeys | None = None) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.linger = 0
        serve_on(self._sock, curve)
        if port:
            self._sock.bind(f"{url}:{port}" if url.startswith("tcp") else f"{url}-{port}")
            self.port = port
        elif url.startswith("tcp"):
            self.port = self._sock.bind_to_random_port(url)
        else:
            raise ValueError("an ipc heartbeat needs an explicit port number")
        self._thread = threading.Thread(target=self._run, daemon=True, name="pyrepl3-heartbeat")

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            zmq.proxy(self._sock, self._sock)
        except zmq.ContextTerminated:
            pass
        finally:
            self._sock.close(linger=0)

    def stop(self) -> None:
        if not self._thread.is_alive():
            self._sock.close(linger=0)
        self._ctx.term()
        self._thread.join(timeout=2)
