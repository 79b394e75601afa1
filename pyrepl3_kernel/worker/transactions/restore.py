"""Putting a recorded object back as it was before the cell, in place."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .kinds import (
    K_ARRAY,
    K_BYTEARRAY,
    K_CLASS,
    K_DEQUE,
    K_DICT,
    K_FUNCTION,
    K_LIST,
    K_NDARRAY,
    K_NDFRAME,
    K_NPRNG,
    K_ODICT,
    K_RANDOM,
    K_SET,
    MISSING,
    cell_contents,
    instance_dict,
)

if TYPE_CHECKING:
    from .snapshot import Record

_is = operator.is_


def _same_items(a: Iterable[Any], b: Iterable[Any]) -> bool:
    return all(map(_is, a, b))


def _same_dict(current: dict[Any, Any], saved: dict[Any, Any]) -> bool:
    return (
        dict.__len__(current) == len(saved)
        and _same_items(dict.keys(current), saved.keys())
        and _same_items(dict.values(current), saved.values())
    )


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        import pickle

        try:
            return pickle.dumps(a) == pickle.dumps(b)
        except Exception:
            return False


def restore_record(r: Record, lazy_frames: bool) -> bool:
    """Restore one object in place; whether it had changed."""
    o, kind, s = r.obj, r.kind, r.state
    changed = False
    if kind == K_LIST:
        if not (list.__len__(o) == len(s) and _same_items(list.__iter__(o), s)):
            list.__setitem__(o, slice(None), s)
            changed = True
    elif kind == K_DICT:
        if not _same_dict(o, s):
            dict.clear(o)
            dict.update(o, s)
            changed = True
    elif kind == K_ODICT:
        if not (
            len(o) == len(s)
            and _same_items(o.keys(), (k for k, _ in s))
            and _same_items(o.values(), (v for _, v in s))
        ):
            o.clear()
            o.update(s)
            changed = True
    elif kind == K_SET:
        if not (set.__len__(o) == len(s) and set.issubset(o, s)):
            set.clear(o)
            set.update(o, s)
            changed = True
    elif kind == K_BYTEARRAY:
        if o != s:
            o[:] = s
            changed = True
    elif kind == K_DEQUE:
        if not (len(o) == len(s) and _same_items(o, s)):
            o.clear()
            o.extend(s)
            changed = True
    elif kind == K_ARRAY:
        if o != s:
            o[:] = s
            changed = True
    elif kind == K_NDARRAY:
        changed = _restore_ndarray(o, s)
    elif kind == K_NDFRAME:
        changed = _restore_ndframe(o, s, lazy_frames)
    elif kind == K_CLASS:
        current = dict(vars(o))
        for k in current.keys() - s.keys() - {"__dict__", "__weakref__", "__doc__"}:
            delattr(o, k)
            changed = True
        for k, v in s.items():
            if current.get(k, MISSING) is not v:
                setattr(o, k, v)
                changed = True
    elif kind == K_FUNCTION:
        d, defaults, kwdefaults, cells = s
        for cell, saved in zip(o.__closure__ or (), cells, strict=False):
            if cell_contents(cell) is not saved:
                if saved is MISSING:
                    del cell.cell_contents
                else:
                    cell.cell_contents = saved
                changed = True
        if not _same_dict(o.__dict__, d):
            o.__dict__.clear()
            o.__dict__.update(d)
            changed = True
        if o.__defaults__ is not defaults:
            o.__defaults__ = defaults
            changed = True
        current = o.__kwdefaults__
        if (current is None) != (kwdefaults is None) or (
            current is not None and not _same_dict(current, kwdefaults)
        ):
            o.__kwdefaults__ = None if kwdefaults is None else dict(kwdefaults)
            changed = True
    elif kind == K_NPRNG:
        if hasattr(o, "bit_generator"):
            if not _equal(o.bit_generator.state, s):
                o.bit_generator.state = s
                changed = True
        elif not _equal(o.get_state(legacy=False), s):
            o.set_state(s)
            changed = True
    elif kind == K_RANDOM:
        if o.getstate() != s:
            o.setstate(s)
            changed = True
    if r.extra is not None:
        changed = _restore_instance(o, r.extra) or changed
    return changed


def _restore_instance(o: Any, extra: tuple[dict[str, Any] | None, tuple[Any, ...]]) -> bool:
    d_saved, slots = extra
    changed = False
    if d_saved is not None:
        d = instance_dict(o)
        if d is None:
            raise TypeError("its __dict__ is gone")
        if not _same_dict(d, d_saved):
            d.clear()
            d.update(d_saved)
            changed = True
    for name, value in slots:
        try:
            current = object.__getattribute__(o, name)
        except AttributeError:
            current = MISSING
        if current is value:
            continue
        changed = True
        if value is MISSING:
            object.__delattr__(o, name)
        else:
            object.__setattr__(o, name, value)
    return changed


def _restore_ndarray(o: Any, s: Any) -> bool:
    import numpy as np

    if o.shape == s.shape and o.dtype == s.dtype:
        if o.dtype.hasobject:
            if _same_items(o.flat, s.flat):
                return False
        elif o.flags.c_contiguous and s.flags.c_contiguous:
            # Compare the bits (NaN-safe), as the widest unsigned ints that fit.
            unit = next(n for n in (8, 4, 2, 1) if o.nbytes % n == 0)
            as_int = np.dtype(f"u{unit}")
            if np.array_equal(o.reshape(-1).view(as_int), s.reshape(-1).view(as_int)):
                return False
        elif np.array_equal(o, s, equal_nan=o.dtype.kind in "fc"):
            return False
    if not o.flags.writeable:
        o.setflags(write=True)
    if o.dtype != s.dtype and o.dtype.itemsize == s.dtype.itemsize:
        o.dtype = s.dtype  # the cell reinterpreted the buffer (arr.dtype = ...)
    if o.shape != s.shape:
        o.shape = s.shape  # raises if the size changed (arr.resize): rebind instead
    np.copyto(o, s, casting="no")
    return True


def _restore_ndframe(o: Any, s: Any, lazy: bool) -> bool:
    copy, attrs, (blocks, axes, names, duplicates) = s
    mgr = o._mgr
    if lazy:
        unchanged = (
            len(mgr.blocks) == len(blocks)
            and _same_items((b.values for b in mgr.blocks), blocks)
            and _same_items(o.axes, axes)
        )
    else:
        unchanged = (
            o.shape == copy.shape
            and all(a.equals(b) for a, b in zip(o.axes, copy.axes, strict=False))
            and o.equals(copy)
        )
    unchanged = (
        unchanged
        and [tuple(ax.names) for ax in o.axes] == names
        and o.flags.allows_duplicate_labels == duplicates
        and all(o.__dict__.get(k, MISSING) is v for k, v in attrs.items())
    )
    # Swapping the block manager back restores data, columns, index and
    # dtypes with the frame's identity intact; it is cheap, so always done.
    object.__setattr__(o, "_mgr", copy._mgr)
    d = o.__dict__
    for k in [k for k in d if k not in attrs and k not in ("_mgr", "_flags")]:
        del d[k]
    d.update(attrs)
    clear_cache = getattr(o, "_clear_item_cache", None)
    if clear_cache is not None:
        clear_cache()
    for ax, saved in zip(o.axes, names, strict=False):
        if tuple(ax.names) != saved:
            ax.names = list(saved)
    if o.flags.allows_duplicate_labels != duplicates:
        o.flags.allows_duplicate_labels = duplicates
    return not unchanged
