"""The snapshot ``full`` takes before a cell: the state of every mutable
object the cell can reach by name, copied so that :meth:`Snapshot.restore`
can put each back in place."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from ...units import format_size
from .kinds import (
    ATOMIC_TYPES,
    CONTAINERS,
    EXACT_CONTAINERS,
    K_ARRAY,
    K_ATOM,
    K_BYTEARRAY,
    K_CLASS,
    K_DEQUE,
    K_DICT,
    K_EXTERNAL,
    K_FUNCTION,
    K_INSTANCE,
    K_LIST,
    K_METHOD,
    K_NDARRAY,
    K_NDFRAME,
    K_NPRNG,
    K_ODICT,
    K_OPAQUE,
    K_RANDOM,
    K_SET,
    K_TUPLE,
    MISSING,
    all_atomic,
    cell_contents,
    classify,
    instance_dict,
    slot_names,
    type_name,
)
from .policy import DEFAULT_MAX_BYTES, DEFAULT_MAX_OBJECTS
from .restore import restore_record


def _pandas_cow() -> bool:
    """pandas copies on write, so a shallow copy is a lazy snapshot."""
    pd = sys.modules.get("pandas")
    if pd is None:
        return False
    if int(pd.__version__.split(".")[0]) >= 3:
        return True
    try:
        return bool(pd.options.mode.copy_on_write is True)
    except Exception:
        return False


class Record:
    """One mutable object and its state before the cell."""

    __slots__ = ("obj", "kind", "state", "extra", "rebind")

    def __init__(self, obj: Any, kind: int, state: Any, extra: Any = None) -> None:
        self.obj = obj
        self.kind = kind
        self.state = state
        self.extra = extra  # __dict__/slots state of a container subclass instance
        self.rebind: Any = MISSING  # what a root name gets if it cannot be restored in place


class _Root:
    __slots__ = ("name", "obj", "records", "issues")

    def __init__(self, name: str, obj: Any) -> None:
        self.name = name
        self.obj = obj
        self.records: list[Record] = []
        self.issues: list[str] = []

    def note(self, issue: str) -> None:
        if issue not in self.issues and len(self.issues) < 4:
            self.issues.append(issue)


class Snapshot:
    """The state, before a cell, of the objects it can reach by name."""

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_objects: int = DEFAULT_MAX_OBJECTS,
        user_globals: dict[str, Any] | None = None,
        skip: Iterable[Any] = (),
    ) -> None:
        self.max_bytes = max_bytes
        self.max_objects = max_objects
        self.user_globals = user_globals
        self.bytes = 0
        self.records: dict[int, Record] = {}
        self.roots: dict[str, _Root] = {}
        self.lazy_frames = _pandas_cow()
        self._skip = {id(obj) for obj in skip}
        self._walked: set[int] = set()  # objects visited that have no record

    # -- taking it -----------------------------------------------------------------

    def add(self, name: str, obj: Any) -> None:
        """Record ``obj`` (bound to ``name``) and what it reaches."""
        root = self.roots[name] = _Root(name, obj)
        kind = classify(type(obj))
        if kind == K_EXTERNAL:
            root.note(f"{type_name(type(obj))}: external resource")
        if kind in (K_ATOM, K_EXTERNAL):
            return
        stack = [obj]
        records = self.records
        while stack:
            o = stack.pop()
            oid = id(o)
            if oid in records:
                if o is obj:
                    root.records.append(records[oid])
                continue
            if oid in self._walked or oid in self._skip:
                continue
            if len(records) >= self.max_objects:
                root.note(f"more than {self.max_objects} objects")
                return
            try:
                self._visit(o, root, stack)
            except Exception as exc:
                root.note(f"{type_name(type(o))}: {type(exc).__name__}: {exc}"[:160])

    def _visit(self, o: Any, root: _Root, stack: list[Any]) -> None:
        kind = classify(type(o))
        if kind == K_ATOM or kind == K_EXTERNAL:
            return
        oid = id(o)
        children: Any = ()
        state: Any
        record: Record | None = None
        if kind == K_TUPLE:
            self._walked.add(oid)
            children = o
        elif kind == K_LIST:
            state = list.copy(o)
            record = Record(o, kind, state)
            children = state
        elif kind == K_DICT:
            state = dict.copy(o)
            record = Record(o, kind, state)
            children = state.values()
        elif kind == K_ODICT:
            state = list(o.items())
            record = Record(o, kind, state)
            children = [v for _, v in state]
        elif kind == K_SET:
            state = set(o)
            record = Record(o, kind, state)
            children = state
        elif kind == K_BYTEARRAY:
            if not self._budget(len(o), root, o):
                return
            record = Record(o, kind, bytes(o))
        elif kind == K_DEQUE:
            state = list(o)
            record = Record(o, kind, state)
            children = state
        elif kind == K_ARRAY:
            if not self._budget(len(o) * o.itemsize, root, o):
                return
            record = Record(o, kind, o[:])
        elif kind == K_NDARRAY:
            record = self._ndarray(o, root)
            if record is not None and o.dtype.hasobject:
                children = list(record.state.flat)
        elif kind == K_NDFRAME:
            record = self._ndframe(o, root)
            if record is not None:
                children = record.state[1].values()
        elif kind == K_CLASS:
            if getattr(o, "__module__", None) != "__main__":
                self._walked.add(oid)
                return
            state = {
                k: v for k, v in vars(o).items() if k not in ("__dict__", "__weakref__", "__doc__")
            }
            record = Record(o, kind, state)
            children = state.values()
        elif kind == K_FUNCTION:
            if o.__globals__ is not self.user_globals:
                self._walked.add(oid)
                return
            kwdefaults = o.__kwdefaults__
            cells = tuple(cell_contents(cell) for cell in o.__closure__ or ())
            state = (
                dict(o.__dict__),
                o.__defaults__,
                None if kwdefaults is None else dict(kwdefaults),
                cells,
            )
            record = Record(o, kind, state)
            children = [
                *state[0].values(),
                *(state[1] or ()),
                *(state[2] or {}).values(),
                *(c for c in cells if c is not MISSING),
            ]
        elif kind == K_METHOD:
            self._walked.add(oid)
            children = (o.__self__, o.__func__)
        elif kind == K_NPRNG:
            if hasattr(o, "bit_generator"):
                record = Record(o, kind, o.bit_generator.state)
            else:
                record = Record(o, kind, o.get_state(legacy=False))
        elif kind == K_RANDOM:
            record = Record(o, kind, o.getstate())
        if kind in (K_INSTANCE, K_OPAQUE) or (
            record is not None and type(o) not in EXACT_CONTAINERS and kind in CONTAINERS
        ):
            extra = self._instance_state(o)
            if extra is not None:
                if record is None:
                    record = Record(o, K_INSTANCE, None, extra)
                else:
                    record.extra = extra
                d, slots = extra
                if d:
                    children = [*children, *d.values()]
                if slots:
                    children = [*children, *(v for _, v in slots if v is not MISSING)]
            if kind == K_OPAQUE:
                name = type_name(type(o))
                root.note(f"{name}: internal state" if o is root.obj else f"holds {name}")
        if record is None:
            self._walked.add(oid)
        else:
            self.records[oid] = record
            root.records.append(record)
        if children and not all_atomic(children):
            atomic = ATOMIC_TYPES
            stack.extend(c for c in children if type(c) not in atomic)

    @staticmethod
    def _instance_state(o: Any) -> tuple[dict[str, Any] | None, tuple[Any, ...]] | None:
        d = instance_dict(o)
        slots = []
        for name in slot_names(type(o)):
            try:
                slots.append((name, object.__getattribute__(o, name)))
            except AttributeError:
                slots.append((name, MISSING))
        if d is None and not slots:
            return None
        return (None if d is None else dict(d), tuple(slots))

    def _budget(self, nbytes: int, root: _Root, o: Any) -> bool:
        if self.bytes + nbytes > self.max_bytes:
            root.note(
                f"{type_name(type(o))} of {format_size(nbytes)}: over the "
                f"{format_size(self.max_bytes)} snapshot limit"
            )
            self._walked.add(id(o))
            return False
        self.bytes += nbytes
        return True

    def _ndarray(self, o: Any, root: _Root) -> Record | None:
        if not o.flags.writeable:  # cannot change in place (pandas' copy-on-write views)
            self._walked.add(id(o))
            return None
        if not self._budget(int(o.nbytes), root, o):
            return None
        record = Record(o, K_NDARRAY, o.copy(order="K"))
        record.rebind = record.state
        return record

    def _ndframe(self, o: Any, root: _Root) -> Record | None:
        mgr = o._mgr
        try:
            nbytes = int(sum(block.values.nbytes for block in mgr.blocks))
        except Exception:
            nbytes = int(o.memory_usage(deep=False).sum())
        if not self._budget(nbytes, root, o):
            return None
        copy = o.copy(deep=not self.lazy_frames)
        attrs = {
            k: v
            for k, v in o.__dict__.items()
            if k not in ("_mgr", "_flags", "_item_cache", "_cacher")
        }
        axes = list(o.axes)
        fingerprint = (
            [block.values for block in mgr.blocks],
            axes,
            [tuple(ax.names) for ax in axes],
            o.flags.allows_duplicate_labels,
        )
        record = Record(o, K_NDFRAME, (copy, attrs, fingerprint))
        record.rebind = copy
        return record

    # -- putting it back -------------------------------------------------------------

    def restore(self) -> tuple[set[int], dict[int, str]]:
        """Put every recorded object back; ids of those that had changed, and
        of those that could not be restored in place (with why)."""
        changed: set[int] = set()
        failed: dict[int, str] = {}
        for oid, record in self.records.items():
            try:
                if restore_record(record, self.lazy_frames):
                    changed.add(oid)
            except Exception as exc:
                failed[oid] = f"{type(exc).__name__}: {exc}"[:160]
                changed.add(oid)
        return changed, failed
