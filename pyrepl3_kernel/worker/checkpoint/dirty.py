"""Which names an automatic save must pickle again: what the cells since the
last save could have changed.

The worker notes after every cell (failed ones too) the names the cell could
reach (:func:`..transactions.names.referenced_names`: every identifier in
its text, strings and magics' arguments included, and the globals read by
the user functions, methods and classes among them, transitively) and the
names bound, rebound or deleted since the last save (identity, at C speed).
A cell that reaches the namespace in ways no name says (``globals()``,
``vars()``, ``exec``/``eval``, ``__main__``, ``get_ipython()``, ``%run`` and
other magics that run code, or a user function that uses any of these)
makes the next save a full one, as does a checkout or restore by request,
the first save of a worker, and every ``PYREPL3_STATES_FULL_EVERY``-th save
(default 20: code run between cells, by comm callbacks or threads, is seen
at the latest then).

In the forked child the set grows to what those names reach
(:func:`close_over`): other names bound to the same object, names the
previous save found inside them (its ``refs``), and named numpy arrays and
pandas objects sharing memory with a changed one. Every other name keeps the
entry (and blob) of the previous save, so an untouched 1 GB array is not read.
"""

from __future__ import annotations

import os
import re
import types
from collections.abc import Iterable
from typing import Any

from ..transactions.names import _code_names, _functions_of, referenced_names

#: Names whose use means "any global may change".
_DYNAMIC = frozenset({"globals", "vars", "locals", "exec", "eval", "__main__", "get_ipython"})
_DYNAMIC_TEXT = re.compile(r"\b(globals|vars|locals|exec|eval|__main__|get_ipython|user_ns)\b")
#: Magics that only time or list: the code they run is the cell's own text.
#: ``%checkout`` and ``%undo`` tell the autosave what they did themselves.
_SAFE_MAGICS = frozenset(
    {"time", "timeit", "capture", "states", "who", "whos", "pwd", "checkout", "undo"}
)
_MAGIC = re.compile(r"^\s*(%{1,2}|!)(\w*)", re.M)
ENV_FULL_EVERY = "PYREPL3_STATES_FULL_EVERY"
DEFAULT_FULL_EVERY = 20


def full_every() -> int:
    raw = os.environ.get(ENV_FULL_EVERY, "")
    try:
        return max(1, int(raw)) if raw else DEFAULT_FULL_EVERY
    except ValueError:
        return DEFAULT_FULL_EVERY


def touched_by(code: str, ns: dict[str, Any]) -> set[str] | None:
    """The names cell ``code`` may have changed, or None when it may have
    changed any (see the module's docstring)."""
    if _DYNAMIC_TEXT.search(code):
        return None
    for sigil, magic in _MAGIC.findall(code):
        if sigil == "!" or magic not in _SAFE_MAGICS:
            return None
    names = set(referenced_names(code, ns))
    for name in names:
        value = ns.get(name)
        if value is None or isinstance(value, types.ModuleType):
            continue
        try:
            for func in _functions_of(value, ns):
                if _code_names(func.__code__) & _DYNAMIC:
                    return None
        except Exception:
            return None
    return names


def bindings(ns: dict[str, Any]) -> dict[str, int]:
    """``name -> id(object)`` of the namespace's non-private names."""
    # A copy of the items first: a subshell thread may bind names meanwhile.
    return {k: id(v) for k, v in list(ns.items()) if not k.startswith("_")}


def rebound(before: dict[str, int], after: dict[str, int]) -> set[str]:
    """Names added, rebound or deleted between two :func:`bindings`."""
    if before == after:
        return set()
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


# -- in the child ----------------------------------------------------------------------


def _memory_roots(obj: Any) -> list[int]:
    """Ids of the objects owning the memory of a numpy array or of a pandas
    object's columns (empty for anything else)."""
    np = _module("numpy")
    if np is None:
        return []
    arrays: Iterable[Any] = ()
    if isinstance(obj, np.ndarray):
        arrays = (obj,)
    elif type(obj).__module__.startswith("pandas."):
        try:
            arrays = [a for a in obj._mgr.arrays if isinstance(a, np.ndarray)]
        except Exception:
            return []
    roots = []
    for array in arrays:
        root = array
        for _ in range(64):
            base = getattr(root, "base", None)
            if base is None:
                break
            root = base
        roots.append(id(root))
    return roots


def _module(name: str) -> Any:
    import sys

    return sys.modules.get(name)


def close_over(
    dirty: set[str],
    moved: set[str],
    ns: dict[str, Any],
    names: list[str],
    base: dict[str, dict[str, Any]],
) -> set[str]:
    """``dirty`` grown to everything it may have changed, among ``names``
    (the user's names now): names bound to a dirty object, what the previous
    save found inside a dirty name (its ``refs``), named arrays and frames
    sharing memory with a dirty one, and the names whose previous entry
    refers to a name in ``moved`` (bound to another object, or deleted,
    since) or to a name that is gone. ``base``: the previous save's name
    table."""
    present = set(names)
    out = {n for n in dirty if n in present}
    for name in names:
        refs = base.get(name, {}).get("refs", ())
        if any(r in moved or r not in present for r in refs):
            out.add(name)
    by_id: dict[int, list[str]] = {}
    for name in names:
        by_id.setdefault(id(ns[name]), []).append(name)
    roots: dict[str, list[int]] = {}
    for name in names:
        found = _memory_roots(ns[name])
        if found:
            roots[name] = found
    # IPython's own values (Out, _, _N, ...) hold results: not the user's
    # (found only if a referrer scan runs: every value read is a page copied).
    holders = _Holders(ns, by_id, present)
    pending = list(out)
    while pending:
        name = pending.pop()
        grown = set(by_id.get(id(ns[name]), ()))
        grown.update(r for r in base.get(name, {}).get("refs", ()) if r in present)
        mine = set(roots.get(name, ()))
        if mine:
            grown.update(n for n, r in roots.items() if mine.intersection(r))
        holding = holders.of(ns[name])
        if holding is None:  # too entangled to tell: every name
            return present
        grown.update(holding)
        for other in grown - out:
            out.add(other)
            pending.append(other)
    return out


#: Plain containers the pickler copies into whatever holds them (it never
#: asks ``reducer_override`` about them, so no reference by name is made).
_INLINED = (list, dict, set, bytearray)


class _Holders:
    """The names whose objects hold a given plain container, found through
    ``gc.get_referrers`` (a scan of the heap: only for a container that
    something besides the namespace refers to, and at most ``BUDGET``
    times per save)."""

    BUDGET = 16
    DEPTH = 4

    def __init__(self, ns: dict[str, Any], by_id: dict[int, list[str]], present: set[str]) -> None:
        self.ns = ns
        self.by_id = by_id
        self.present = present
        self._stop: set[int] | None = None
        self.calls = 0

    @property
    def stop(self) -> set[int]:
        """Ids of the namespace's values that are not the user's names."""
        if self._stop is None:
            self._stop = {id(v) for k, v in list(self.ns.items()) if k not in self.present}
        return self._stop

    def of(self, obj: Any) -> set[str] | None:
        if type(obj) not in _INLINED:
            return set()
        import gc
        import sys

        # References: the namespace, the argument, getrefcount's argument.
        if sys.getrefcount(obj) <= 3:
            return set()
        found: set[str] = set()
        seen = {id(obj), id(self.ns)}
        level = [obj]
        for _ in range(self.DEPTH):
            if not level:
                return found
            self.calls += 1
            if self.calls > self.BUDGET:
                return None
            parents = gc.get_referrers(*level)
            current, level = level, []
            for parent in parents:
                if parent is current or id(parent) in seen or isinstance(parent, types.FrameType):
                    continue
                seen.add(id(parent))
                if isinstance(parent, types.ModuleType) or id(parent) in self.stop:
                    continue
                names = self.by_id.get(id(parent))
                if names:
                    found.update(names)
                level.append(parent)
            level = level[:256]
        return found if not level else None
