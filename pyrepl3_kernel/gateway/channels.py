"""The five Jupyter channels of one kernel: ZMQ sockets bound on the
connection's ports, and signed messages in and out.

:class:`KernelChannels` knows the wire (socket kinds and options, ports,
HMAC signing, the iopub topic); it knows nothing of what the messages mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from .. import zmqsend
from ..curve import CurveKeys, serve_on
from . import ready_channels
from .heartbeat import Heartbeat
from .wire import Wire

JupyterMsg = dict[str, Any]
CHANNELS = ("shell", "control", "stdin", "iopub")
_KINDS = {"shell": zmq.ROUTER, "control": zmq.ROUTER, "stdin": zmq.ROUTER, "iopub": zmq.XPUB}


@dataclass
class BoundSockets:
    """The four channel sockets and the heartbeat of one kernel, bound
    (the heartbeat not yet answering: :meth:`Heartbeat.start`)."""

    sockets: dict[str, zmq.asyncio.Socket]
    ports: dict[str, int]  # by channel, "hb" included
    heartbeat: Heartbeat

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.heartbeat.stop()


def bind_sockets(
    transport: str, ip: str, ports: dict[str, int], curve: CurveKeys | None
) -> BoundSockets:
    """One kernel's sockets, bound on ``ports`` (by channel, ``hb``
    included; 0 or missing: a free port, tcp only); Curve servers with ``curve``."""
    url = f"{transport}://{ip}"
    ctx = zmq.asyncio.Context.instance()
    sockets: dict[str, zmq.asyncio.Socket] = {}
    bound: dict[str, int] = {}
    try:
        for channel, kind in _KINDS.items():
            sock = ctx.socket(kind)
            sockets[channel] = sock
            sock.linger = 1000
            serve_on(sock, curve)
            if kind == zmq.ROUTER:
                # As ipykernel: a client that reconnects with its identity
                # (all clients of one KernelManager share one) takes over.
                sock.router_handover = 1
            if kind == zmq.XPUB:
                sock.setsockopt(zmq.XPUB_VERBOSE, 1)
            port = ports.get(channel, 0)
            if transport == "tcp":
                if port:
                    sock.bind(f"{url}:{port}")
                else:
                    port = sock.bind_to_random_port(url)
            else:
                if not port:
                    raise ValueError("ipc transport needs explicit port numbers")
                sock.bind(f"{url}-{port}")
            bound[channel] = port
        heartbeat = Heartbeat(url, ports.get("hb", 0), curve)
    except BaseException:
        for sock in sockets.values():
            sock.close(linger=0)
        raise
    bound["hb"] = heartbeat.port
    return BoundSockets(sockets, bound, heartbeat)


class KernelChannels:
    """Shell, control and stdin (ROUTER), iopub (XPUB) and the heartbeat.

    ``connection_info`` is completed with defaults, its key made bytes; ports
    given as 0 are chosen at :meth:`bind` time, and ``connection_info``
    holds the final ones.
    """

    def __init__(self, connection_info: dict[str, Any], kernel_id: str) -> None:
        info = dict(connection_info)
        key = info.get("key", b"")
        if isinstance(key, str):
            key = key.encode()
        info["key"] = key
        info.setdefault("transport", "tcp")
        info.setdefault("ip", "127.0.0.1")
        info.setdefault("signature_scheme", "hmac-sha256")
        #: CurveZMQ: every socket a Curve server with the manager's keys (None: plain).
        self.curve = CurveKeys.of(info)
        if self.curve is not None:
            info.update(self.curve.as_info())
        self.connection_info = info
        self.kernel_id = kernel_id
        self.wire = Wire(key, info["signature_scheme"])
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._heartbeat: Heartbeat | None = None

    def bind(self) -> None:
        info = self.connection_info
        transport, ip = info["transport"], info["ip"]
        ports = {channel: int(info.get(f"{channel}_port") or 0) for channel in (*CHANNELS, "hb")}
        ready = None
        if self.curve is None and not any(ports.values()):
            # Curve options must be set before bind: only plain kernels that
            # let the ports be chosen can take sockets bound in advance.
            ready = ready_channels.take(transport, ip)
        if ready is None:
            ready = bind_sockets(transport, ip, ports, self.curve)
        self._sockets, self._heartbeat = ready.sockets, ready.heartbeat
        for channel, port in ready.ports.items():
            info[f"{channel}_port"] = port
        self._heartbeat.start()

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close(linger=200)
        if self._heartbeat is not None:
            self._heartbeat.stop()

    def open(self, channel: str) -> bool:
        sock = self._sockets.get(channel)
        return sock is not None and not sock.closed

    async def recv(self, channel: str) -> list[bytes]:
        return await self._sockets[channel].recv_multipart()  # type: ignore[no-any-return]

    def parse(self, frames: list[bytes]) -> tuple[list[bytes], JupyterMsg]:
        """(routing identities, the message) of a received multipart
        message; raises on a bad signature or malformed frames."""
        return self.wire.parse(frames)

    def send(
        self,
        channel: str,
        msg_type: str,
        content: dict[str, Any],
        *,
        parent: JupyterMsg | None,
        ident: bytes | list[bytes] | None,
        metadata: dict[str, Any] | None = None,
        buffers: list[Any] | None = None,
    ) -> JupyterMsg:
        """Sign and send one message (see :mod:`pyrepl3_kernel.zmqsend`)."""
        msg = self.wire.new_message(msg_type, content, parent, metadata)
        zmqsend.send_frames(self._sockets[channel], self.wire.frames(msg, ident), buffers)
        return msg

    def publish(
        self,
        msg_type: str,
        content: dict[str, Any],
        parent: JupyterMsg | None,
        metadata: dict[str, Any] | None = None,
        buffers: list[Any] | None = None,
    ) -> None:
        """Send on iopub, under the topic ``kernel.<id>.<msg_type>``; nothing
        once iopub is closed."""
        if not self.open("iopub"):
            return
        topic = f"kernel.{self.kernel_id}.{msg_type}".encode()
        self.send(
            "iopub",
            msg_type,
            content,
            parent=parent or None,
            ident=topic,
            metadata=metadata,
            buffers=buffers,
        )
