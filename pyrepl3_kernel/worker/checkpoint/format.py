"""What a checkpoint is on disk: the manifest's format and version, and a
blob's framing (header, in-band pickle, out-of-band buffers) and digest."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

from .errors import CheckpointError

FORMAT = "pyrepl3-checkpoint"
FORMAT_VERSION = 1
_BLOB_MAGIC = b"P3CK"


try:
    import xxhash

    def _hasher() -> Any:
        return xxhash.xxh3_128()

except ImportError:  # pragma: no cover - xxhash is a dependency

    def _hasher() -> Any:
        return hashlib.blake2b(digest_size=16)


def blob_digest(parts: list[bytes | memoryview]) -> str:
    """Content digest of a blob (xxh3-128: change detection and integrity)."""
    h = _hasher()
    for part in parts:
        h.update(part)
    return str(h.hexdigest())


def pack_blob(inband: bytes, buffers: list[memoryview]) -> list[bytes | memoryview]:
    """A blob as the parts to write one after the other (no copies of the
    out-of-band buffers): header, in-band pickle, buffers."""
    header = _BLOB_MAGIC + struct.pack(">IQ", len(buffers), len(inband))
    header += b"".join(struct.pack(">Q", b.nbytes) for b in buffers)
    return [header, inband, *(b.cast("B") for b in buffers)]


def unpack_blob(data: bytes | bytearray) -> tuple[memoryview, list[memoryview]]:
    view = memoryview(data)
    if len(view) < 16 or view[:4] != _BLOB_MAGIC:
        raise CheckpointError("blob is corrupt (bad header)")
    count, inband_len = struct.unpack(">IQ", view[4:16])
    pos = 16
    if pos + 8 * count > len(view):
        raise CheckpointError("blob is corrupt (truncated)")
    lengths = []
    for _ in range(count):
        lengths.append(struct.unpack(">Q", view[pos : pos + 8])[0])
        pos += 8
    inband = view[pos : pos + inband_len]
    pos += inband_len
    buffers = []
    for n in lengths:
        buffers.append(view[pos : pos + n])
        pos += n
    if pos != len(view):
        raise CheckpointError("blob is corrupt (truncated)")
    return inband, buffers
