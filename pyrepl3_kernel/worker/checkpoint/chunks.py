"""Large out-of-band buffers saved by the chunk.

An out-of-band buffer (a numpy array's memory, a pandas block, a large
``bytearray``) of at least ``CHUNK_FROM`` bytes is not written into its
object's blob: it is cut into ``CHUNK_SIZE`` chunks, each a content-addressed
file of its own in ``objects/`` (its name is the xxh3-128 of its bytes), and
the entry lists their digests (``chunks``: buffer index -> digests). A save
after a change to part of a big array writes only the chunks that changed;
chunks shared with other states cost nothing. The hashing runs in the saving
child, and only for buffers of names that may have changed (:mod:`.dirty`).

A restore reads each chunk straight into the buffer's aligned memory (one
``readinto`` of an unbuffered file, no intermediate ``bytes``) and checks it
against its digest right after, while it is in the CPU's cache. Reading,
faulting the memory in and hashing all release the GIL, so the chunks are
spread over a few threads (one per core, up to ``READERS``): the restore of a
large array takes about what reading it into new memory takes.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .buffers import aligned
from .errors import CheckpointError
from .format import blob_digest

CHUNK_FROM = 16 << 20
CHUNK_SIZE = 4 << 20
#: At most this many threads read (and check) the chunks of one buffer.
READERS = 4


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
    is checked against its digest (:class:`CheckpointError` names a chunk
    that is missing or corrupt; nothing of the buffer is returned then)."""
    sizes = [min(CHUNK_SIZE, nbytes - n * CHUNK_SIZE) for n in range(len(digests))]
    if not digests or min(sizes) <= 0 or sum(sizes) != nbytes:
        raise CheckpointError("a chunked buffer is corrupt (its chunks do not add up)")
    out = aligned(nbytes, populate=False)
    jobs = [
        (digest, out[n * CHUNK_SIZE : n * CHUNK_SIZE + sizes[n]])
        for n, digest in enumerate(digests)
    ]
    threads = min(READERS, _cores(), len(jobs))
    if store._fs is not None or threads <= 1:
        for digest, target in jobs:
            _read_chunk(store, digest, target)
        return out
    # Each thread takes the next chunk; the first error (or an interrupt of
    # the waiting thread) stops them all.
    lock = threading.Lock()
    queue = iter(jobs)
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            with lock:
                job = next(queue, None)
            if job is None:
                return
            try:
                _read_chunk(store, *job)
            except BaseException:
                stop.set()
                raise

    pool = ThreadPoolExecutor(threads, thread_name_prefix="pyrepl3-restore")
    try:
        futures = [pool.submit(reader) for _ in range(threads)]
        errors = [f.exception() for f in futures]
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True)
    for error in errors:
        if error is not None:
            raise error
    return out


def _cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _read_chunk(store: Any, digest: str, target: memoryview) -> None:
    """Read chunk ``digest`` into ``target`` (exactly its size) and check it."""
    size = target.nbytes
    try:
        if store._fs is not None:
            data = store.read_blob(digest)
            got = min(len(data), size)
            target[:got] = memoryview(data)[:got]
            whole = len(data)
        else:
            with open(os.path.join(store._path, "objects", digest), "rb", buffering=0) as f:
                whole = os.fstat(f.fileno()).st_size
                got = 0
                while whole == size and got < size:
                    n = f.readinto(target[got:])
                    if not n:
                        break
                    got += n
    except (FileNotFoundError, CheckpointError):
        raise CheckpointError(f"chunk {digest} is missing from {store.root}") from None
    if whole != size or got != size or blob_digest([target]) != digest:
        raise CheckpointError(f"chunk {digest} is corrupt (it does not match its digest)")


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
