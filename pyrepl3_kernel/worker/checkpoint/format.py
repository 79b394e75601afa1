"""What a checkpoint is on disk: the manifest's format and version, and a
blob's framing (header, in-band pickle, out-of-band buffers) and digest."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

from .errors import CheckpointError

FORMAT = "pyrepl3-checkpoint"
FORMAT_VERSION = 3
#: Versions this kernel reads (2 added chunked buffers, 3 big dicts saved in
#: parts, see :mod:`.parts`).
READABLE_VERSIONS = (1, 2, 3)


def version_of(entries: dict[str, dict[str, Any]]) -> int:
    """The oldest version that can read a manifest with these entries: 3
    only when a dict is saved in parts, so that a kernel of version 2 still
    reads every other checkpoint."""
    return FORMAT_VERSION if any("parts" in e for e in entries.values()) else 2


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


def blob_header(head: bytes | memoryview, size: int) -> tuple[int, int]:
    """(number of buffers, in-band length) from a blob's first 16 bytes;
    ``size`` is the blob's whole length."""
    if len(head) < 16 or size < 16 or head[:4] != _BLOB_MAGIC:
        raise CheckpointError("blob is corrupt (bad header)")
    count, inband_len = struct.unpack(">IQ", head[4:16])
    if 16 + 8 * count > size:
        raise CheckpointError("blob is corrupt (truncated)")
    return int(count), int(inband_len)


def blob_lengths(table: bytes | memoryview, count: int, inband_len: int, size: int) -> list[int]:
    """The buffers' lengths from the table after the header; checks that
    header, in-band pickle and buffers make up exactly ``size`` bytes."""
    if len(table) != 8 * count:
        raise CheckpointError("blob is corrupt (truncated)")
    lengths = [int(n) for (n,) in struct.iter_unpack(">Q", table)] if count else []
    if 16 + 8 * count + inband_len + sum(lengths) != size:
        raise CheckpointError("blob is corrupt (truncated)")
    return lengths


def unpack_blob(data: bytes | bytearray) -> tuple[memoryview, list[memoryview]]:
    view = memoryview(data)
    count, inband_len = blob_header(view[:16], len(view))
    pos = 16 + 8 * count
    lengths = blob_lengths(view[16:pos], count, inband_len, len(view))
    inband = view[pos : pos + inband_len]
    pos += inband_len
    buffers = []
    for n in lengths:
        buffers.append(view[pos : pos + n])
        pos += n
    return inband, buffers


def objects_of(manifest: dict[str, Any]) -> set[str]:
    """Every file of ``objects/`` a manifest needs: its blobs and chunks."""
    used: set[str] = set()
    for entry in manifest.get("names", {}).values():
        if entry.get("blob"):
            used.add(entry["blob"])
        for digests in (entry.get("chunks") or {}).values():
            used.update(digests)
    return used
