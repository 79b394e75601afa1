"""Which parts of a big dict changed since the last look, at memory speed.

A CPython dict keeps its items in an *entry table*, in insertion order: a
key's and its value's addresses side by side (a deleted item leaves a hole,
until the table is rebuilt). Comparing a part of that table, as bytes, with
the same part at the last look says whether that part's items are the same
objects, without touching any of them: no reference count changes, no cache
misses per item (a ``list(d.values())`` of a million items costs 20 ms in
cache misses alone; reading the table, 2).

Addresses are only meaningful while the objects they name are alive:
:class:`Scan` holds a reference to every key and value it saw (taking new
references only for the parts that changed), so an address at the last look
still names the same object now. And the table is read only while no other
thread that could change the dict runs (:func:`alone`: the worker's own
threads only), with garbage collection off, so that what the table names is
alive when the references are taken.

The table is read through ``ctypes`` at the offsets of CPython 3.11's dict
layout (the same in 3.12), checked against the dict's own iteration when
this module is imported: where they disagree (another Python), or for a
dict that is not laid out that way (an instance's split dict),
:func:`scan` returns None and the caller falls back to lists.
"""

from __future__ import annotations

import _ctypes
import ctypes
import gc
import hashlib
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

_P = struct.calcsize("P")
#: PyDictObject: PyObject_HEAD, ma_used, ma_version_tag, ma_keys, ma_values.
_MA_KEYS = 32
_MA_VALUES = 40
#: PyDictKeysObject: dk_refcnt, dk_log2_size, dk_log2_index_bytes, dk_kind,
#: dk_version, dk_usable, dk_nentries, dk_indices[].
_DK_LOG2_INDEX_BYTES = 9
_DK_KIND = 10
_DK_NENTRIES = 24
_DK_INDICES = 32
#: dk_kind -> (entry size, offset of me_key, offset of me_value).
_KINDS = {0: (24, 8, 16), 1: (16, 0, 8)}


def _word(address: int) -> int:
    return int(ctypes.c_ssize_t.from_address(address).value)


def _blake2(data: Any) -> Any:
    return hashlib.blake2b(data, digest_size=16).digest()


_digest: Callable[[Any], Any] = _blake2
try:
    import xxhash

    _digest = xxhash.xxh3_128_intdigest
except ImportError:  # pragma: no cover - xxhash is a dependency
    pass


def _cast(address: int) -> Any:
    return ctypes.cast(address, ctypes.py_object).value


#: The object at an address (a new reference).
_object_at: Callable[[int], Any] = getattr(_ctypes, "PyObj_FromPtr", _cast)


@dataclass
class _Table:
    entries: int  # address of the first entry
    count: int  # dk_nentries
    size: int  # bytes per entry
    key: int  # offset of the key's address in an entry
    value: int


def _table(d: dict[Any, Any]) -> _Table | None:
    base = id(d)
    if _word(base + _MA_VALUES):
        return None  # a split table (an instance's __dict__)
    keys = _word(base + _MA_KEYS)
    kind = ctypes.c_uint8.from_address(keys + _DK_KIND).value
    layout = _KINDS.get(kind)
    if layout is None:
        return None
    index_bytes = 1 << ctypes.c_uint8.from_address(keys + _DK_LOG2_INDEX_BYTES).value
    count = _word(keys + _DK_NENTRIES)
    size, key, value = layout
    return _Table(keys + _DK_INDICES + index_bytes, count, size, key, value)


#: Threads of the worker that never change the user's objects (the
#: protocol's reader hands requests to the main thread; IPython's history
#: writer only writes its database).
KERNEL_THREADS = frozenset({"pyrepl3-io", "IPythonHistorySavingThread"})


def alone() -> bool:
    """Whether the calling (main) thread is the only one that may change the
    user's objects. Another thread (a subshell, the debugger, a thread the
    user started) could change a dict between the reading of its table and
    the taking of references to what it names, which would then be freed
    objects: the caller reads lists instead, which is safe."""
    main = threading.main_thread()
    return threading.current_thread() is main and all(
        t is main or t.name in KERNEL_THREADS for t in threading.enumerate()
    )


@contextmanager
def _no_collection() -> Iterator[None]:
    """No garbage collection meanwhile (a finalizer could run any code)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class Scan:
    """What a dict's entry table held at the last look, part by part: a
    digest of each part's bytes, and the part's keys and values, as two
    tuples (holes left out) holding references to them."""

    part: int  # entries per part
    digests: list[Any] = field(default_factory=list)
    keys: list[tuple[Any, ...]] = field(default_factory=list)
    values: list[tuple[Any, ...]] = field(default_factory=list)


def scan(d: dict[Any, Any], previous: Scan | None, part: int) -> tuple[Scan, set[int]] | None:
    """Look at ``d``'s entry table again: the scan (``previous``, updated in
    place, or a new one) and the parts that are not the same objects as at
    the previous look (all of them without one). None where the table cannot
    be read (see the module's docstring)."""
    if not FAST or not alone():
        return None
    return _scan(d, previous, part)


def _scan(d: dict[Any, Any], previous: Scan | None, part: int) -> tuple[Scan, set[int]] | None:
    out = previous if previous is not None and previous.part == part else Scan(part)
    changed: set[int] = set()
    old_refs: list[Any] = []  # dropped at the end: a finalizer runs outside
    with _no_collection(), _invalid_on_error(out):
        table = _table(d)
        if table is None:
            return None
        parts = -(-table.count // part)
        span = part * table.size
        # The table's memory, read in place (no copy) and let go before
        # anything else may run.
        view = memoryview((ctypes.c_char * (table.count * table.size)).from_address(table.entries))
        try:
            view = view.cast("B")
            if not out.digests and table.count == len(d):
                # A first look at a table without holes (entry i is the i-th
                # item): the items in order, at C speed.
                keys, values = list(d), list(d.values())
                bounds = range(0, table.count, part)
                out.keys = [tuple(keys[a : a + part]) for a in bounds]
                out.values = [tuple(values[a : a + part]) for a in bounds]
                out.digests = [_digest(view[i * span : (i + 1) * span]) for i in range(parts)]
                return out, set(range(parts))
            for i in range(parts):
                piece = view[i * span : (i + 1) * span]
                digest = _digest(piece)
                if i < len(out.digests) and out.digests[i] == digest:
                    continue
                changed.add(i)
                part_keys, part_values = _objects(piece.tobytes(), table)
                if i < len(out.digests):
                    out.digests[i] = digest
                    old_refs.append((out.keys[i], out.values[i]))
                    out.keys[i], out.values[i] = part_keys, part_values
                else:
                    out.digests.append(digest)
                    out.keys.append(part_keys)
                    out.values.append(part_values)
        finally:
            view.release()
        # A table that shrank (rebuilt without its holes).
        del out.digests[parts:]
        old_refs.append((out.keys[parts:], out.values[parts:]))
        del out.keys[parts:], out.values[parts:]
    del old_refs
    return out, changed


@contextmanager
def _invalid_on_error(s: Scan) -> Iterator[None]:
    """A scan cut short (an interrupt between two of its steps) may hold a
    part's new digest with its old items: forget every digest, so the next
    look starts afresh and finds every part changed."""
    try:
        yield
    except BaseException:
        s.digests.clear()
        raise


def _objects(raw: bytes, table: _Table) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The keys and values whose addresses a part of the table holds (holes
    left out)."""
    words = memoryview(raw).cast("Q").tolist()
    stride = table.size // 8
    key_at = words[table.key // 8 :: stride]
    value_at = words[table.value // 8 :: stride]
    if 0 in key_at:
        value_at = [v for k, v in zip(key_at, value_at, strict=True) if k]
        key_at = [k for k in key_at if k]
    return tuple(map(_object_at, key_at)), tuple(map(_object_at, value_at))


def items(s: Scan, index: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The keys and values of part ``index``."""
    return s.keys[index], s.values[index]


def _check() -> bool:
    """Whether reading tables here gives what iterating the dicts gives."""
    if (
        sys.implementation.name != "cpython"
        or _P != 8
        or sys.version_info[:2] not in ((3, 11), (3, 12))
    ):
        return False
    try:
        probes: list[dict[Any, Any]] = [
            {f"k{i}": (i, f"v{i}") for i in range(300)},  # str keys
            {i: float(i) for i in range(300)},  # other keys
        ]
        for d in probes:
            for k in list(d)[::7]:
                del d[k]  # holes
            got = _scan(d, None, 64)
            if got is None:
                return False
            s, changed = got
            keys: list[Any] = []
            values: list[Any] = []
            for i in range(len(s.digests)):
                k, v = items(s, i)
                keys += k
                values += v
            if changed != set(range(len(s.digests))):
                return False
            if len(keys) != len(d) or any(a is not b for a, b in zip(keys, d, strict=False)):
                return False
            if any(a is not b for a, b in zip(values, d.values(), strict=False)):
                return False
            key = next(iter(d))
            d[key] = "changed"
            again = _scan(d, s, 64)
            if again is None or again[1] != {0} or items(s, 0)[1][0] != "changed":
                return False
        return True
    except Exception:  # pragma: no cover - another layout
        return False


FAST = _check()
