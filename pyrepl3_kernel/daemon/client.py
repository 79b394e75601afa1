"""The manager daemon's wire contract and a blocking client for it.

One request per connection, over the daemon's Unix socket: a frame (4-byte
big-endian length + UTF-8 JSON) each way. Requests are ``{"v": 1, "op": ...}``
plus the op's fields; replies are ``{"v": 1, "ok": true, ...}`` or
``{"v": 1, "ok": false, "code": ..., "error": ...}``. A connection per request
keeps the client free of any event loop (jupyter_client calls providers from
whatever loop it has) and lets the daemon check the caller's credentials on
every request.

Ops: ``hello``, ``lease``, ``restart``, ``kill``, ``poll``, ``signal``,
``release``, ``status``, ``shutdown`` (see docs/daemon.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Pyrepl3Error

DAEMON_PROTOCOL_VERSION = 1
#: Set by the provisioner in the environment of a daemon it starts: JSON
#: ``{"pid", "started", "server_info_file"}`` of the process that started it
#: (see docs/daemon.md, "Lifecycle": the daemon may exit once it is gone).
STARTER_ENV = "PYREPL3_DAEMON_STARTER"
#: Set by whoever starts a daemon: JSON ``{"warmup_code"}`` of the fork
#: server the daemon prepares at start (see forkservers.py).
PREPARE_ENV = "PYREPL3_DAEMON_PREPARE"
MAX_FRAME = 16 * 1024 * 1024
#: A frame's header: the payload's length, 4 bytes big-endian.
HEADER = struct.Struct(">I")
# AF_UNIX paths are limited to 108 bytes on Linux.
_MAX_SOCKET_PATH = 100


class DaemonError(Pyrepl3Error, RuntimeError):
    """The daemon answered with an error (``code`` says which)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class DaemonUnavailable(Pyrepl3Error, ConnectionError):
    """No daemon answers on the socket."""


@dataclass(frozen=True)
class DaemonPaths:
    """Where a user's daemon lives: socket, lock and log, all owner-only."""

    socket: Path
    lock: Path
    log: Path

    @classmethod
    def default(cls, runtime_dir: str | os.PathLike[str] | None = None) -> DaemonPaths:
        if runtime_dir is None:
            from jupyter_core.paths import jupyter_runtime_dir

            runtime_dir = jupyter_runtime_dir()
        base = Path(runtime_dir)
        sock = base / "pyrepl3-daemon.sock"
        if len(os.fsencode(sock)) > _MAX_SOCKET_PATH:
            import hashlib

            digest = hashlib.sha256(os.fsencode(base.resolve())).hexdigest()[:12]
            short = Path("/tmp") / f"pyrepl3-{os.getuid()}"
            sock = short / f"{digest}.sock"
        return cls(socket=sock, lock=base / "pyrepl3-daemon.lock", log=base / "pyrepl3-daemon.log")


def encode_frame(obj: dict[str, Any]) -> bytes:
    payload = json.dumps(obj, separators=(",", ":")).encode()
    if len(payload) > MAX_FRAME:
        raise ValueError(f"daemon message of {len(payload)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(len(payload)) + payload


def decode_payload(payload: bytes) -> dict[str, Any]:
    """Parse one frame's payload; raises ``DaemonError("malformed", ...)``."""
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DaemonError("malformed", f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise DaemonError("malformed", "a daemon message must be a JSON object")
    return obj


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise DaemonUnavailable("the daemon closed the connection")
        buf += chunk
    return bytes(buf)


class DaemonClient:
    """Blocking client (:meth:`call`) with an asyncio twin (:meth:`acall`);
    each call is one connection."""

    def __init__(self, paths: DaemonPaths | None = None, timeout: float = 60.0) -> None:
        self.paths = paths or DaemonPaths.default()
        self.timeout = timeout

    def call(self, op: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send one request; return the reply or raise DaemonError/DaemonUnavailable."""
        request = {"v": DAEMON_PROTOCOL_VERSION, "op": op, **fields}
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            try:
                sock.connect(os.fspath(self.paths.socket))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise DaemonUnavailable(f"no daemon at {self.paths.socket}: {exc}") from None
            sock.sendall(encode_frame(request))
            (length,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
            if length > MAX_FRAME:
                raise DaemonError("too_large", f"reply of {length} bytes exceeds {MAX_FRAME}")
            reply = decode_payload(_recv_exact(sock, length))
        except OSError as exc:
            if isinstance(exc, (DaemonUnavailable, DaemonError)):
                raise
            raise DaemonUnavailable(
                f"daemon at {self.paths.socket} did not answer: {exc}"
            ) from None
        finally:
            sock.close()
        return _checked(reply)

    async def acall(self, op: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """:meth:`call` on the running event loop: no thread per request, so
        a burst of launches in one process reaches the daemon all at once
        (a thread pool would let a handful through at a time)."""
        import asyncio  # here: an argv launch (sync calls only) does not pay its import

        request = {"v": DAEMON_PROTOCOL_VERSION, "op": op, **fields}
        limit = self.timeout if timeout is None else timeout
        try:
            reply = await asyncio.wait_for(self._aexchange(request), limit)
        except asyncio.TimeoutError:
            raise DaemonUnavailable(
                f"daemon at {self.paths.socket} did not answer within {limit:g} s"
            ) from None
        return _checked(reply)

    async def _aexchange(self, request: dict[str, Any]) -> dict[str, Any]:
        import asyncio

        try:
            reader, writer = await asyncio.open_unix_connection(os.fspath(self.paths.socket))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonUnavailable(f"no daemon at {self.paths.socket}: {exc}") from None
        except OSError as exc:
            raise DaemonUnavailable(f"daemon at {self.paths.socket}: {exc}") from None
        try:
            writer.write(encode_frame(request))
            await writer.drain()
            (length,) = HEADER.unpack(await reader.readexactly(HEADER.size))
            if length > MAX_FRAME:
                raise DaemonError("too_large", f"reply of {length} bytes exceeds {MAX_FRAME}")
            return decode_payload(await reader.readexactly(length))
        except asyncio.IncompleteReadError:
            raise DaemonUnavailable("the daemon closed the connection") from None
        except OSError as exc:
            raise DaemonUnavailable(
                f"daemon at {self.paths.socket} did not answer: {exc}"
            ) from None
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def ping(self) -> dict[str, Any] | None:
        """The daemon's hello, or ``None`` if none answers."""
        try:
            return self.call("hello", timeout=2.0)
        except (DaemonUnavailable, DaemonError):
            return None

    async def aping(self) -> dict[str, Any] | None:
        """:meth:`ping` on the running event loop."""
        try:
            return await self.acall("hello", timeout=2.0)
        except (DaemonUnavailable, DaemonError):
            return None


def _checked(reply: dict[str, Any]) -> dict[str, Any]:
    """The reply, or its error raised as :class:`DaemonError`."""
    if not reply.get("ok"):
        raise DaemonError(str(reply.get("code", "error")), str(reply.get("error", "unknown error")))
    return reply
