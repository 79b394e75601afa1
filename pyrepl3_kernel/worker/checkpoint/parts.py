"""Big dicts saved in parts by the automatic saves, so that the save after
``d['k1'] = ...`` pickles and writes one part instead of the whole dict (a
checkpoint saved by request pickles it whole).

A plain ``dict`` of at least ``PART_FROM`` items whose keys and values are
all immutable built-in values (``str``, ``int``, ``float``, ``bool``,
``None``, ``bytes``, ``complex``, and tuples and frozensets of these) is
saved as ``PART_ITEMS``-item parts in insertion order: each part is the
pickle of a tuple of its keys and a tuple of its values, stored as a
content-addressed chunk of its own (the entry's out-of-band buffers, see :mod:`.chunks`), and the entry's
blob is a small pickle that joins them back (:func:`_dict_from_parts`, whose
path is part of the checkpoint format). Values inside a part are pickled by
value: a tuple in the dict that is also bound to another name comes back
equal, not identical.

Which parts changed is known without reading them in the saving child:
pickling the whole dict there increments the reference count of every key
and value, which copies (copy-on-write) every memory page holding them; that
was most of the save's cost. Instead, right before the fork the worker takes
a *snapshot* of each big dict the cells since the last save may have
changed (:func:`before_fork`): it hashes each part of the dict's entry table
(the addresses of its keys and values, read in place, see
:mod:`.dictscan`), and for the parts whose hash changed takes their keys
and values as two tuples, which hold them alive (so an address seen at one
save cannot name another object at the next), and checks that they are
immutable. A part whose keys and values are the same objects, in the same
places, as in the previous snapshot, and whose previous entry was pickled
from that snapshot (the entry records the snapshot's save ``seq``), holds
the same immutable values: the child takes its chunk from the previous
entry, and pickles (without the pickler's memo, so without touching a
reference count: :func:`_dumps`), hashes and writes only the other parts.

A dict holding anything else (a list, an instance of a class) is pickled
whole, as before: a mutation inside a value would not change its address.
"""

from __future__ import annotations

import io
import itertools
import operator
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import chunks, dictscan

#: Dicts with fewer items are pickled whole.
PART_FROM = 4096
#: Items per part.
PART_ITEMS = 1024
#: Types whose objects never change (tuples and frozensets of them neither).
_ATOMS = frozenset({str, int, float, bool, type(None), bytes, complex})
_NESTED = frozenset({tuple, frozenset})
_IMMUTABLE = _ATOMS | _NESTED
#: How deep tuples may nest in a value that counts as immutable.
_DEPTH = 8
#: How many values the worker looks at before it snapshots a dict.
_SAMPLE = 64


def eligible(obj: Any) -> bool:
    """Whether ``obj`` is a dict big enough to be saved in parts (its
    content is checked while the parts are pickled)."""
    return type(obj) is dict and len(obj) >= PART_FROM


def immutable(objects: Sequence[Any]) -> bool:
    """Whether every object is an immutable built-in value (nested tuples
    and frozensets of them included), at C speed per level."""
    level: Sequence[Any] = objects
    for _ in range(_DEPTH):
        kinds = set(map(type, level))
        if not kinds <= _IMMUTABLE:
            return False
        if not kinds & _NESTED:
            return True
        nested = itertools.compress(level, map(_NESTED.__contains__, map(type, level)))
        level = list(itertools.chain.from_iterable(nested))
    return False


# -- in the worker, right before the saving child is forked --------------------------


@dataclass
class Snapshot:
    """A big dict's items at the fork of save ``seq``, part by part, held
    alive (not the dict itself: a reference to it would make the saving
    child look for what holds it, see :func:`.dirty.close_over`): each
    part's keys and values as two tuples, and whether they are all
    immutable built-in values (checked here, in the worker: the child would
    copy every page it reads them from, see :func:`_dumps`). A part is
    ``PART_ITEMS`` entries of the dict's entry table (:mod:`.dictscan`; a
    deleted item's hole counts), or, where the table cannot be read,
    ``PART_ITEMS`` items."""

    seq: int
    of: int  # id() of the dict
    keys: list[tuple[Any, ...]]
    values: list[tuple[Any, ...]]
    immutable: list[bool | None]  # None: not checked yet
    scan: dictscan.Scan | None = None


@dataclass
class Planned:
    """What the saving child knows about one big dict: the snapshot taken
    at its fork, the previous one's ``seq``, and the parts whose items are
    the same objects as in that previous snapshot."""

    snapshot: Snapshot
    base: int | None = None
    unchanged: frozenset[int] = frozenset()


@dataclass
class Plan:
    seq: int
    dicts: dict[str, Planned] = field(default_factory=dict)
    #: Big dicts to pickle whole (they hold a value that is not immutable).
    whole: set[str] = field(default_factory=set)
    #: How long :func:`before_fork` took (in the worker, before the fork).
    seconds: float = 0.0


#: The newest snapshot of each big dict, by name (kept by the worker).
_snapshots: dict[str, Snapshot] = {}
#: Big dicts found to hold a value that is not immutable (name -> id() of
#: the dict): pickled whole, not looked at again until the name is rebound.
_mutable: dict[str, int] = {}


def _looks_immutable(obj: dict[Any, Any]) -> bool:
    """A cheap guess from the first values (every part is checked)."""
    sample = list(itertools.islice(obj.values(), _SAMPLE))
    return set(map(type, sample)) <= _IMMUTABLE


def before_fork(ns: dict[str, Any], names: set[str] | None, seq: int) -> Plan:
    """Snapshot the big dicts among ``names`` (None: every name) and compare
    each with its previous snapshot; called in the worker before the fork of
    save ``seq``. Reading the entry table costs about 1 ms per million items,
    plus 0.2 ms per changed part; the first look at a dict about 100 ns per
    item (a reference to each key and value, and the check that they are
    immutable)."""
    started = time.perf_counter()
    plan = Plan(seq)
    for name in list(_snapshots):
        if name not in ns:
            del _snapshots[name]
    for name in list(_mutable):
        if id(ns.get(name)) != _mutable[name]:
            del _mutable[name]
    candidates = [n for n in ns if not n.startswith("_")] if names is None else names
    for name in candidates:
        obj = ns.get(name)
        if not isinstance(obj, dict) or not eligible(obj) or not _looks_immutable(obj):
            _snapshots.pop(name, None)
            continue
        if _mutable.get(name) == id(obj):
            plan.whole.add(name)
            continue
        old = _snapshots.get(name)
        scanned = dictscan.scan(obj, old.scan if old is not None else None, PART_ITEMS)
        if scanned is not None:
            table, changed = scanned
            keys, values = table.keys, table.values
        else:
            keys, values = _split(list(obj)), _split(list(obj.values()))
            table, changed = None, _changed(old, keys, values)
        comparable = old is not None and (old.scan is None) == (table is None)
        # Checked here for the parts that changed since a comparable snapshot
        # (a few, usually); at a first look, by the child, which pickles
        # every part then anyway.
        flags: list[bool | None] = [
            (old.immutable[i] if i < len(old.immutable) else None)
            if comparable and old is not None and i not in changed
            else (immutable(keys[i]) and immutable(values[i]) if comparable else None)
            for i in range(len(keys))
        ]
        if False in flags:
            _snapshots.pop(name, None)
            _mutable[name] = id(obj)
            plan.whole.add(name)
            continue
        new = Snapshot(seq, id(obj), keys, values, flags, table)
        planned = Planned(new)
        if comparable and old is not None:
            planned.base = old.seq
            planned.unchanged = frozenset(range(len(keys))) - changed
        _snapshots[name] = new
        plan.dicts[name] = planned
        _inband(len(keys))  # made here, not in each child
    plan.seconds = time.perf_counter() - started
    return plan


def _split(items: list[Any]) -> list[tuple[Any, ...]]:
    return [tuple(items[a : a + PART_ITEMS]) for a in range(0, len(items), PART_ITEMS)]


def _changed(
    old: Snapshot | None, keys: list[tuple[Any, ...]], values: list[tuple[Any, ...]]
) -> set[int]:
    """The parts whose keys or values are not the same objects as in
    ``old``, where the table cannot be read (one comparison per item)."""
    if old is None or old.scan is not None:
        return set(range(len(keys)))
    out = set()
    for i in range(len(keys)):
        if not (
            i < len(old.keys)
            and len(old.keys[i]) == len(keys[i])
            and all(map(operator.is_, old.keys[i], keys[i]))
            and all(map(operator.is_, old.values[i], values[i]))
        ):
            out.add(i)
    return out


def forget() -> None:
    """Drop every snapshot (tests; a worker whose namespace was replaced)."""
    _snapshots.clear()
    _mutable.clear()


# -- in the saving child -----------------------------------------------------------


@dataclass
class Saved:
    """A dict saved in parts: the entry's fields and what it wrote."""

    inband: bytes
    entry: dict[str, Any]
    size: int
    written: int
    pickled_parts: int
    reused_parts: int


class _Join:
    """Pickles as ``_dict_from_parts(buffer, ...)`` with ``count``
    out-of-band buffers (the parts, stored as chunks)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __reduce__(self) -> Any:
        return _dict_from_parts, tuple(pickle.PickleBuffer(bytearray()) for _ in range(self.count))


_INBAND: dict[int, bytes] = {}


def _dumps(part: tuple[tuple[Any, ...], tuple[Any, ...]]) -> bytes:
    """A part's pickle, without the pickler's memo: the memo keeps a
    reference to every tuple and string, a reference count change on each,
    which in the saving child copies every page they are on. Immutable
    values cannot refer to themselves, so the memo is not needed (a value
    the part holds twice is written twice)."""
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=5)
    pickler.fast = True
    pickler.dump(part)
    return out.getvalue()


def _inband(count: int) -> bytes:
    cached = _INBAND.get(count)
    if cached is None:
        cached = _INBAND[count] = pickle.dumps(
            _Join(count), protocol=5, buffer_callback=lambda _b: False
        )
    return cached


def save(
    store: Any,
    obj: dict[Any, Any],
    planned: Planned | None,
    previous: dict[str, Any] | None,
) -> Saved | None:
    """Save ``obj`` in parts to ``store``: reuse the parts ``planned`` says
    are unchanged since the snapshot ``previous`` (the name's entry in the
    last save) was pickled from, pickle and write the others. None if a part
    holds anything but immutable built-in values (pickle it whole)."""
    # Taken right before the fork, of the dict the name was bound to then.
    flags: list[bool | None] | None
    if planned is not None and planned.snapshot.of == id(obj):
        snapshot = planned.snapshot
        keys, values, flags, made_from = (
            snapshot.keys,
            snapshot.values,
            snapshot.immutable,
            snapshot.seq,
        )
    else:  # no snapshot at this fork: read the dict itself
        keys, values, flags, made_from = _split(list(obj)), _split(list(obj.values())), None, None
    reusable: dict[int, tuple[list[str], int]] = {}
    info = (previous or {}).get("parts")
    if (
        planned is not None
        and made_from is not None
        and planned.base is not None
        and isinstance(info, dict)
        and info.get("items") == PART_ITEMS
        and info.get("snapshot") == planned.base
    ):
        old_chunks = previous.get("chunks") or {}  # type: ignore[union-attr]
        old_sizes = previous.get("buffer_sizes") or {}  # type: ignore[union-attr]
        for i in planned.unchanged:
            digests, size = old_chunks.get(str(i)), old_sizes.get(str(i))
            if isinstance(digests, list) and digests and isinstance(size, int):
                reusable[i] = (digests, size)
    count = len(keys)
    todo = [i for i in range(count) if i not in reusable]
    for i in todo:  # all of them before anything is written
        ok = flags[i] if flags is not None else None
        if ok is None:
            ok = immutable(keys[i]) and immutable(values[i])
        if not ok:
            return None
    chunk_map: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    written = pickled = 0
    for i in range(count):
        if i in reusable:
            chunk_map[str(i)], sizes[str(i)] = reusable[i]
            continue
        data = _dumps((keys[i], values[i]))
        digests, n = chunks.write(store, memoryview(data))
        chunk_map[str(i)], sizes[str(i)] = digests, len(data)
        written += n
        pickled += 1
    inband = _inband(count)
    entry = {
        "parts": {"items": PART_ITEMS, "snapshot": made_from},
        "chunks": chunk_map,
        "chunk_size": chunks.CHUNK_SIZE,
        "buffer_sizes": sizes,
    }
    size = len(inband) + sum(sizes.values())
    return Saved(inband, entry, size, written, pickled, count - pickled)


def digest_of(saved: Saved) -> str:
    """The entry's blob digest (over the in-band pickle and the parts'
    digests, as :func:`.chunks.entry_digest` computes it for a restore)."""
    count = len(saved.entry["chunks"])
    return chunks.entry_digest(
        saved.inband,
        [memoryview(b"")] * count,
        {int(k): v for k, v in saved.entry["chunks"].items()},
    )


# -- restoring -----------------------------------------------------------------------


def _dict_from_parts(*parts: Any) -> dict[Any, Any]:
    """The dict whose parts are the pickles ``parts``, in order, each of a
    tuple of keys and a tuple of values (named in saved checkpoints: part of
    the format)."""
    out: dict[Any, Any] = {}
    for part in parts:
        items = pickle.loads(part)
        if type(items) is dict:  # written by the first kernels of format 3
            out.update(items)
            continue
        if not (
            type(items) is tuple
            and len(items) == 2
            and type(items[0]) is tuple
            and type(items[1]) is tuple
            and len(items[0]) == len(items[1])
        ):
            raise pickle.UnpicklingError("a part of a saved dict is not its keys and values")
        out.update(zip(items[0], items[1], strict=True))
    return out
