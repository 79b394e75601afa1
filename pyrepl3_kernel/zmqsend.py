"""Sending Jupyter messages on ``zmq.asyncio`` sockets without losing input.

``jupyter_client.Session.send`` sends through a blocking shadow of an asyncio
socket. A blocking send processes the socket's pending commands (a peer's
pipe attached, "a message arrived") behind pyzmq's back: that consumes the
edge of the socket's file descriptor, and pyzmq, not having sent, does not
look for input again. A message that arrived in that instant then stays in
the socket, unread, until the next unrelated event on it: a kernel that
never answers an execute_request sent right after a reply went out, or a
client that never sees a reply. Sending through the asyncio socket itself
makes pyzmq check for waiting input after the send.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import zmq.asyncio
from jupyter_client.session import Session

log = logging.getLogger("pyrepl3.zmq")

#: Frames at least this large are sent without a copy (jupyter_client's
#: ``Session.copy_threshold``).
COPY_THRESHOLD = 2**16


def send(
    session: Session,
    sock: zmq.asyncio.Socket,
    msg: dict[str, Any],
    ident: bytes | list[bytes] | None = None,
    buffers: list[Any] | None = None,
) -> None:
    """Sign ``msg`` with ``session`` and send it on ``sock`` (never blocks:
    a send the socket cannot take at once is queued by pyzmq)."""
    frames: list[Any] = session.serialize(msg, ident)
    send_frames(sock, frames, buffers, session.copy_threshold)


def send_frames(
    sock: zmq.asyncio.Socket,
    frames: list[Any],
    buffers: list[Any] | None = None,
    copy_threshold: int = COPY_THRESHOLD,
) -> None:
    """Send a message's signed ``frames`` and its ``buffers`` on ``sock``
    (never blocks, as :func:`send`)."""
    if buffers:
        frames = [*frames, *buffers]
    # As Session.send: small messages are copied, large ones sent zero-copy.
    copy = max(len(frame) for frame in frames) < copy_threshold
    sent = asyncio.ensure_future(sock.send_multipart(frames, copy=copy))
    sent.add_done_callback(_log_failure)


def _log_failure(sent: asyncio.Future[Any]) -> None:
    if not sent.cancelled() and sent.exception() is not None:
        log.warning("could not send a message: %s", sent.exception())
