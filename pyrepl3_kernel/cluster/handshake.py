"""The kernel side of gateway_provisioners' launch protocol (its launchers'
``server_listener.py``, payload version 1), spoken by PyREPL3's launcher.

1. The server starts the launcher with ``--response-address IP:PORT``,
   ``--public-key`` (an RSA public key, base64 DER without the PEM lines)
   and ``--kernel-id``.
2. The launcher binds the kernel's ports and sends the connection info, plus
   ``pid``, ``pgid``, ``comm_port`` and ``kernel_id``, to the response
   address: JSON, AES-128-ECB encrypted under a random key, that key
   encrypted with the public key (PKCS#1 v1.5), all wrapped in base64 JSON
   ``{"version": 1, "key": ..., "conn_info": ...}``.
3. The server then sends requests to ``comm_port`` (one JSON object per TCP
   connection): ``{"signum": N}`` (0 is a liveness poll: being reachable is
   the answer) and ``{"shutdown": 1}`` (stop listening; the kernel exits on
   its own after its shutdown_request).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("pyrepl3.cluster")

PAYLOAD_VERSION = 1


def encrypt_payload(connection_info: dict[str, Any], public_key: str) -> bytes:
    """The version-1 payload carrying ``connection_info`` to the server."""
    try:
        from Cryptodome.Cipher import AES, PKCS1_v1_5
        from Cryptodome.PublicKey import RSA
        from Cryptodome.Random import get_random_bytes
        from Cryptodome.Util.Padding import pad
    except ImportError:
        raise RuntimeError(
            "the launch protocol of gateway_provisioners needs pycryptodomex on the kernel's "
            "host: pip install 'pyrepl3-kernel[cluster]' (or pycryptodomex)"
        ) from None
    aes_key = get_random_bytes(16)
    body = AES.new(aes_key, AES.MODE_ECB).encrypt(pad(json.dumps(connection_info).encode(), 16))
    rsa = RSA.importKey(base64.b64decode(public_key.encode()))
    wrapped_key = PKCS1_v1_5.new(rsa).encrypt(aes_key)
    payload = {
        "version": PAYLOAD_VERSION,
        "key": base64.b64encode(wrapped_key).decode(),
        "conn_info": base64.b64encode(body).decode(),
    }
    return base64.b64encode(json.dumps(payload).encode())


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"bad response address {address!r}: expected IP:PORT")
    return host, int(port)


def send_connection_info(response_address: str, payload: bytes, timeout: float = 30.0) -> None:
    host, port = parse_address(response_address)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(payload)


def parse_port_range(port_range: str | None) -> tuple[int, int]:
    """``"LOW..HIGH"`` as a pair; ``(0, 0)`` for no range (or an unfilled
    ``{port_range}`` placeholder)."""
    if not port_range or port_range.startswith("{"):
        return 0, 0
    try:
        low, high = (int(p) for p in port_range.split(".."))
    except ValueError:
        raise ValueError(f"bad port range {port_range!r}: expected LOW..HIGH") from None
    if low and (high < low or not (0 < low <= 65535 and high <= 65535)):
        raise ValueError(f"bad port range {port_range!r}")
    return low, high


def bind_in_range(ip: str, low: int, high: int, attempts: int = 50) -> socket.socket:
    """A TCP socket bound on ``ip`` to a port in [low, high] (any port for 0..0)."""
    for _ in range(attempts):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((ip, random.randint(low, high) if high else 0))
            return sock
        except OSError:
            sock.close()
    raise RuntimeError(f"no free port in {low}..{high} on {ip} after {attempts} attempts")


class Listener:
    """The comm port: answers the server's signal, poll and shutdown
    requests from a daemon thread (it works while the event loop is busy).

    A signal is raised in this process, where the kernel's handlers turn
    SIGINT into an interrupt of the running cell and SIGTERM into a stop
    that keeps the state (see :mod:`.launcher`).
    """

    def __init__(
        self,
        ip: str,
        port_range: tuple[int, int] = (0, 0),
        on_signal: Callable[[int], None] | None = None,
    ) -> None:
        self.sock = bind_in_range(ip, *port_range)
        self.sock.listen(8)
        self.port: int = self.sock.getsockname()[1]
        self.on_signal = on_signal or (lambda signum: os.kill(os.getpid(), signum))
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="pyrepl3-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        try:
            self.sock.close()
        except OSError:
            pass

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self._closed.is_set():
                    return
                continue  # a connection reset before it was accepted
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while len(data) < 65536:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                except OSError:
                    pass
            try:
                self.handle(data)
            except Exception:  # the listener must outlive any bad request
                log.exception("listener: request %r", data[:200])

    def handle(self, data: bytes) -> None:
        if not data:
            return
        try:
            request = json.loads(data)
        except ValueError:
            log.warning("listener: ignored a request that is not JSON")
            return
        if not isinstance(request, dict):
            return
        signum = request.get("signum")
        if signum is not None:
            try:
                signum = int(signum)
            except (TypeError, ValueError):
                log.warning("listener: bad signal number %r", signum)
                return
            if signum > 0:
                try:
                    name = signal.Signals(signum).name
                except ValueError:
                    log.warning("listener: ignored unknown signal number %s", signum)
                    return
                log.info("listener: signal %s from the server", name)
                try:
                    self.on_signal(signum)
                except OSError as exc:
                    log.warning("listener: signal %s: %s", name, exc)
        if request.get("shutdown"):
            log.info("listener: shutdown from the server")
            self.close()
