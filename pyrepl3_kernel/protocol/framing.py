"""Length-prefixed framing for byte-stream transports (sans-I/O).

A frame is a 4-byte big-endian unsigned length followed by that many bytes of
one encoded message. :class:`FrameDecoder` takes bytes as they arrive and
returns whole payloads; an oversized frame is skipped (its bytes are consumed
and dropped) and reported, so the stream stays in sync and the peer survives.
"""

from __future__ import annotations

import struct

from .codec import DEFAULT_MAX_MESSAGE_SIZE, ProtocolError

HEADER = struct.Struct(">I")
#: The largest length a 4-byte header can announce.
MAX_FRAME_SIZE = 2**32 - 1


def frame(payload: bytes) -> bytes:
    """Prefix ``payload`` with its length."""
    if len(payload) > MAX_FRAME_SIZE:
        raise ValueError(f"payload of {len(payload)} bytes does not fit in one frame")
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Incremental frame parser.

    ``feed(data)`` returns the list of complete payloads, in order. A frame
    longer than ``max_size`` yields a :class:`ProtocolError` item (code
    ``too_large``) in its place; the decoder skips its bytes and goes on.
    """

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._skip = 0

    @property
    def pending(self) -> int:
        """Bytes held for an incomplete frame (non-zero at EOF = truncated)."""
        return len(self._buf) + self._skip

    def feed(self, data: bytes) -> list[bytes | ProtocolError]:
        out: list[bytes | ProtocolError] = []
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        self._buf += data
        buf = self._buf
        pos = 0
        while len(buf) - pos >= HEADER.size:
            (length,) = HEADER.unpack_from(buf, pos)
            if length > self.max_size:
                out.append(
                    ProtocolError(
                        "too_large", f"frame of {length} bytes exceeds the limit of {self.max_size}"
                    )
                )
                available = len(buf) - pos - HEADER.size
                if available >= length:
                    pos += HEADER.size + length
                    continue
                self._skip = length - available
                pos = len(buf)
                break
            end = pos + HEADER.size + length
            if end > len(buf):
                break
            out.append(bytes(buf[pos + HEADER.size : end]))
            pos = end
        if pos:
            del buf[:pos]
        return out
