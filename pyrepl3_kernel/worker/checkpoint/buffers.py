"""Memory for restored out-of-band buffers, aligned as an allocator gives it.

A numpy array (or a pandas block) restored from a pickle's out-of-band
buffer uses that buffer in place. A buffer sliced out of a blob read in one
piece starts wherever the blob's framing puts it: an odd address, so
``arr.flags.aligned`` is False, vectorised math is slower and a float sum
can differ in the last bit. Every buffer is therefore read into memory of
its own, 64-byte aligned (a cache line, what numpy's and Arrow's allocators
give large arrays), writable unless the saved buffer was read-only.

Large buffers get anonymous ``mmap`` memory (page aligned, and untouched
until read into, unlike a zero-filled ``bytearray``); small ones a
``bytearray`` with the aligned start picked inside it.

No transparent huge pages (``MADV_HUGEPAGE``, which numpy asks for): on a
VM that hands freed memory back to its host (virtio-balloon free page
reporting, as on the 2-core CI machine), a fresh huge page is mostly one the
host must fault in again. Restoring 2 GB into them took 0.3 to 2.6 s of
system time against a steady 1.0 to 1.1 s with 4 KiB pages, which come from
recently freed memory.
"""

from __future__ import annotations

import ctypes
import mmap
from typing import Any

ALIGNMENT = 64
#: From this size on a buffer gets its own pages.
MMAP_FROM = 1 << 20


def aligned(nbytes: int, populate: bool = True) -> memoryview:
    """Writable, zeroed memory of ``nbytes`` starting at a 64-byte boundary
    (kept alive by the views numpy makes of it). ``populate``: fault the
    pages in now, in bulk (faster than one fault per page while one thread
    reads the data in); a caller that fills the memory from several threads
    passes False and each thread faults its own part as it reads."""
    if nbytes >= MMAP_FROM:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if populate:
            flags |= getattr(mmap, "MAP_POPULATE", 0)
        return memoryview(mmap.mmap(-1, nbytes, flags=flags))
    raw = bytearray(nbytes + ALIGNMENT)
    start = (-address(raw)) % ALIGNMENT
    return memoryview(raw)[start : start + nbytes]


def address(buffer: Any) -> int:
    """The address of ``buffer``'s first byte (a writable buffer)."""
    view = memoryview(buffer)
    if view.nbytes == 0:
        return 0
    holder = (ctypes.c_char * view.nbytes).from_buffer(view.cast("B"))
    try:
        return ctypes.addressof(holder)
    finally:
        del holder


def copy_aligned(data: memoryview) -> memoryview:
    """``data`` copied into aligned memory."""
    out = aligned(data.nbytes)
    if data.nbytes:
        out[:] = data.cast("B")
    return out


def as_saved(buffers: list[memoryview], readonly: list[int] | None) -> list[memoryview]:
    """The buffers as the pickle saw them: those whose index is in
    ``readonly`` (buffers of read-only arrays) become read-only views."""
    if not readonly:
        return buffers
    marked = set(readonly)
    return [b.toreadonly() if i in marked else b for i, b in enumerate(buffers)]
