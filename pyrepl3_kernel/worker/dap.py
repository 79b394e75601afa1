"""A Debug Adapter Protocol client over TCP (to debugpy's adapter).

DAP messages are JSON bodies behind a ``Content-Length`` header. The client
numbers its own requests and matches each response by ``request_seq``, so the
frontend's numbers never collide with requests the worker makes on its own
(``threads``, ``evaluate`` for a rich view); a response goes back with the
number the caller gave. Events go to ``on_event`` on the reader thread.

Every thread here is invisible to the debugger (``pydev_do_not_trace``):
stopping at a breakpoint stops the threads of user code, never these.
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from ..errors import Pyrepl3Error

log = logging.getLogger("pyrepl3.worker")

HEADER = b"Content-Length: "
SEPARATOR = b"\r\n\r\n"
#: How long a request waits for the adapter's response.
RESPONSE_TIMEOUT = 30.0


class DapError(Pyrepl3Error):
    """The adapter is gone, or did not answer in time."""


def hide_from_debugger(thread: threading.Thread) -> None:
    """Keep pydevd from tracing or suspending ``thread`` (as ipykernel marks
    its control, iopub and heartbeat threads)."""
    thread.pydev_do_not_trace = True  # type: ignore[attr-defined]
    thread.is_pydev_daemon_thread = True  # type: ignore[attr-defined]


def encode(msg: dict[str, Any]) -> bytes:
    body = json.dumps(msg, ensure_ascii=False, allow_nan=False, default=repr).encode("utf-8")
    return HEADER + str(len(body)).encode("ascii") + SEPARATOR + body


class FrameReader:
    """Bytes in, DAP messages (dicts) out."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        out: list[dict[str, Any]] = []
        while True:
            start = self._buffer.find(HEADER)
            if start < 0:
                return out
            end = self._buffer.find(SEPARATOR, start)
            if end < 0:
                return out
            size = int(self._buffer[start + len(HEADER) : end])
            body_start = end + len(SEPARATOR)
            if len(self._buffer) - body_start < size:
                return out
            body = self._buffer[body_start : body_start + size]
            self._buffer = self._buffer[body_start + size :]
            out.append(json.loads(body))


class _Pending:
    __slots__ = ("event", "response")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.response: dict[str, Any] | None = None


class DapClient:
    """One connection to the adapter; :meth:`request` from any thread."""

    def __init__(
        self,
        address: tuple[str, int],
        on_event: Callable[[dict[str, Any]], None],
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._sock = socket.create_connection(address, timeout=10)
        self._sock.settimeout(None)
        self._on_event = on_event
        self._on_close = on_close
        self._seq = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="pyrepl3-dap", daemon=True)
        hide_from_debugger(self._reader)
        self._reader.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def request(
        self, msg: dict[str, Any], timeout: float = RESPONSE_TIMEOUT, before_wait: Any = None
    ) -> dict[str, Any]:
        """Send the request ``msg`` (its ``seq`` is replaced by the client's
        own); returns the response with ``request_seq`` set back to the
        caller's ``seq``. ``before_wait``, if given, is called after the send
        and before the wait (the attach sequence answers an event meanwhile)."""
        pending = self.send(msg)
        if before_wait is not None:
            before_wait()
        return self.wait(msg, pending, timeout)

    def send(self, msg: dict[str, Any]) -> tuple[int, _Pending]:
        seq = next(self._seq)
        pending = _Pending()
        with self._lock:
            if self._closed:
                raise DapError("the debug adapter connection is closed")
            self._pending[seq] = pending
            try:
                self._sock.sendall(encode({**msg, "seq": seq}))
            except OSError as exc:
                self._pending.pop(seq, None)
                raise DapError(f"the debug adapter connection failed: {exc}") from None
        return seq, pending

    def wait(
        self, msg: dict[str, Any], sent: tuple[int, _Pending], timeout: float = RESPONSE_TIMEOUT
    ) -> dict[str, Any]:
        seq, pending = sent
        if not pending.event.wait(timeout):
            with self._lock:
                self._pending.pop(seq, None)
            raise DapError(
                f"the debug adapter did not answer {msg.get('command')!r} in {timeout:g} s"
            )
        response = pending.response
        if response is None:
            raise DapError("the debug adapter connection closed before its response")
        response["request_seq"] = msg.get("seq", response.get("request_seq"))
        return response

    def abandon(self) -> None:
        """In a forked child: let go of the parent's connection without
        touching it (no shutdown, no lock: its threads are not here)."""
        self._closed = True
        self._pending = {}
        self._sock.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def _read(self) -> None:
        reader = FrameReader()
        try:
            while True:
                try:
                    data = self._sock.recv(1 << 16)
                except OSError:
                    data = b""
                if not data:
                    break
                for msg in reader.feed(data):
                    self._dispatch(msg)
        except Exception:
            log.exception("debug adapter connection failed")
        finally:
            with self._lock:
                self._closed = True
                pending, self._pending = self._pending, {}
            for item in pending.values():
                item.event.set()  # response None: the caller raises DapError
            if self._on_close is not None:
                self._on_close()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "response":
            with self._lock:
                pending = self._pending.pop(int(msg.get("request_seq", -1)), None)
            if pending is not None:
                pending.response = msg
                pending.event.set()
            return
        if kind == "event":
            try:
                self._on_event(msg)
            except Exception:
                log.exception("error handling debug event %s", msg.get("event"))
