"""Large out-of-band buffers saved by the chunk.

An out-of-band buffer (a numpy array's memory, a pandas block, a large
``bytearray``) of at least ``CHUNK_FROM`` bytes is not written into its
object's blob: it is cut into ``CHUNK_SIZE`` chunks, each a content-addressed
file of its own in ``objects/`` (its name is the xxh3-128 of its bytes), and
the entry lists their digests (``chunks``: buffer index -> digests). A save
after a change to part of a big array writes only the chunks that changed;
chunks shared with other states cost nothing. The hashing runs in the saving
child, and only for buffers of names that may have changed (:mod:`.dirty`).

A restore reads each chunk straight into the buffer's aligned memory and
checks it against its digest.
"""

from __future__ import annotations

import os
from typing import Any

from .buffers import aligned
from .errors import CheckpointError
from .format import blob_digest

CHUNK_FROM = 16 << 20
CHUNK_SIZE = 4 << 20


def chunked_indexes(buffers: list[memoryview]) -> list[int]:
    """The buffers saved by the chunk."""
    return [i for i, b in enumerate(buffers) if b.nbytes >= CHUNK_FROM]


def split(buffer: memoryview) -> list[memoryview]:
    flat = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
    return [flat[i : i + CHUNK_SIZE] for i in range(0, flat.nbytes, CHUNK_SIZE)]


def write(store: Any, buffer: memoryview) -> tuple[list[str], int]:
    """Write the chunks of ``buffer`` the store does not have; their digests
    and the bytes written."""
    digests, written = [], 0
    for chunk in split(buffer):
        digest = blob_digest([chunk])
        if not store.has_blob(digest):
            store.write_blob(digest, [chunk])
            written += chunk.nbytes
        digests.append(digest)
    return digests, written


def read(store: Any, digests: list[str], nbytes: int) -> memoryview:
    """The buffer made of ``digests``' chunks, in aligned memory; each chunk
    is checked against its digest."""
    out = aligned(nbytes)
    pos = 0
    for digest in digests:
        size = min(CHUNK_SIZE, nbytes - pos)
        target = out[pos : pos + size]
        try:
            if store._fs is not None:
                data = store.read_blob(digest)
                got = min(len(data), size)
                target[:got] = data[:got]
                extra = bytes(data[size : size + 1])
            else:
                with open(os.path.join(store._path, "objects", digest), "rb") as f:
                    got = f.readinto(target)
                    extra = f.read(1)
        except (FileNotFoundError, CheckpointError):
            raise CheckpointError(f"chunk {digest} is missing from {store.root}") from None
        if got != size or extra or blob_digest([target]) != digest:
            raise CheckpointError(f"chunk {digest} is corrupt (it does not match its digest)")
        pos += size
    if pos != nbytes:
        raise CheckpointError("a chunked buffer is corrupt (its chunks do not add up)")
    return out


def entry_digest(
    inband: memoryview | bytes, buffers: list[memoryview], chunks: dict[int, list[str]]
) -> str:
    """The digest of an entry whose buffers ``chunks`` names are chunked: over
    the pickle, the other buffers and the chunks' digests, in order."""
    parts: list[bytes | memoryview] = [inband]
    for i, b in enumerate(buffers):
        if i in chunks:
            parts.append(",".join(chunks[i]).encode())
        else:
            parts.append(b)
    return blob_digest(parts)


def chunk_sizes(entry: dict[str, Any]) -> dict[str, int]:
    """Digest -> bytes of every chunk an entry names."""
    out: dict[str, int] = {}
    for index, digests in (entry.get("chunks") or {}).items():
        total = entry.get("buffer_sizes", {}).get(index, len(digests) * CHUNK_SIZE)
        size = entry.get("chunk_size", CHUNK_SIZE)
        for n, digest in enumerate(digests):
            out[digest] = max(0, min(size, total - n * size))
    return out
