"""Transactions: what a failing cell did to the session is rolled back.

Policies (per kernel: ``$PYREPL3_TRANSACTION_POLICY`` or
``%transaction_policy``; per cell: a first line ``%%transaction [policy]``):

``off``
    Nothing is undone (what ipykernel does).
``bindings``
    Names the failing cell added are removed, names it rebound or deleted get
    their old objects back. Objects changed in place stay changed.
``full``
    ``bindings``, and the objects reachable from the names the cell mentions
    (and the globals of the user functions it mentions, transitively) are put
    back as they were before the cell: lists, dicts, sets, bytearrays, deques,
    arrays, numpy arrays, pandas objects, instances (``__dict__`` and
    ``__slots__``), user classes and functions, random generators. They are
    restored *in place* so every reference sees the old state; where that is
    impossible (an array resized in place) the name is rebound to the saved
    copy. Before each cell the snapshot keeps a shallow copy of each reachable
    container, a copy of each numpy buffer, and a copy-on-write copy of each
    pandas object (a deep copy before pandas' copy-on-write mode).

A cell fails when its reply has status ``error`` (an exception, a
KeyboardInterrupt from an interrupt, ``SystemExit``). After a rollback the
cell's stderr says what was undone and what was not; the execute reply
carries the same as a payload with source ``pyrepl3.rollback``.

See docs/transactions.md for what is and is not covered.
"""

from __future__ import annotations

import array
import collections
import itertools
import logging
import operator
import os
import re
import sys
import threading
import time
import types
import weakref
from collections.abc import Iterable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from ...units import format_size, parse_size

log = logging.getLogger("pyrepl3.worker")

POLICIES = ("off", "bindings", "full")
ENV_POLICY = "PYREPL3_TRANSACTION_POLICY"
ENV_MAX_BYTES = "PYREPL3_TRANSACTION_MAX_BYTES"
ENV_MAX_OBJECTS = "PYREPL3_TRANSACTION_MAX_OBJECTS"
#: Snapshot copies of one cell, at most (objects beyond are not covered).
DEFAULT_MAX_BYTES = 1 << 30
#: Containers and instances one cell's snapshot records, at most.
DEFAULT_MAX_OBJECTS = 100_000
PAYLOAD_SOURCE = "pyrepl3.rollback"

#: What no policy undoes, as the report words it.
EXTERNAL_EFFECTS = "files written, network and subprocess effects"

_MISSING: Any = object()
_is = operator.is_

# -- policy and the per-cell override ------------------------------------------

#: A cell whose first line is ``%%transaction [policy]``.
_CELL_OVERRIDE = re.compile(
    r"(?:[ \t]*\r?\n)*[ \t]*%%transaction(?:[ \t]+(off|bindings|full))?[ \t]*(?:\r?\n|\Z)"
)
_OVERRIDE_LINE = re.compile(r"%%transaction(?:[ \t]+(?:off|bindings|full))?[ \t]*\r?\n?\Z")


def cell_policy(code: str) -> str | None:
    """The policy a leading ``%%transaction`` line asks for (``full`` if it
    names none), or ``None``."""
    if not code.startswith("%%transaction") and not (code[:1].isspace() and "%%" in code):
        return None
    m = _CELL_OVERRIDE.match(code)
    if m is None:
        return None
    return m.group(1) or "full"


def strip_transaction_line(lines: list[str]) -> list[str]:
    """IPython line transform: blank out a first line ``%%transaction
    [policy]`` (the worker has applied it), so the body runs as the cell itself: with
    its own execution count, history entry (the raw cell keeps the line) and
    result display, and cell magics after it still work. It runs after the
    cleanup transforms and before cell magics are recognised;
    ``check_complete`` sees the line as a cell magic."""
    if lines and lines[0].startswith("%%transaction") and _OVERRIDE_LINE.match(lines[0]):
        if len(lines) > 1 and lines[1].startswith("%%"):
            return lines[1:]  # another cell magic follows: it must come first
        return ["\n", *lines[1:]]  # a blank line keeps tracebacks' line numbers right
    return lines


# -- names IPython manages ---------------------------------------------------------

#: Names IPython (and Python's warnings) rebind by themselves: never rolled back.
IPYTHON_NAMES = frozenset(
    {
        *("_", "__", "___", "_i", "_ii", "_iii", "_ih", "_oh", "_dh", "In", "Out"),
        *("_exit_code", "__warningregistry__"),
    }
)
_NUMBERED = re.compile(r"_i?\d+\Z")


def is_ipython_name(name: object) -> bool:
    return isinstance(name, str) and (name in IPYTHON_NAMES or _NUMBERED.match(name) is not None)


#: Names ``full`` never snapshots through (the shell and its history).
_NOT_SNAPSHOTTED = IPYTHON_NAMES | {"get_ipython", "exit", "quit", "__builtins__", "__builtin__"}
_IDENTIFIER = re.compile(r"[^\W\d]\w*")


# -- what a cell can reach ------------------------------------------------------------

_code_names_cache: weakref.WeakKeyDictionary[types.CodeType, frozenset[str]] = (
    weakref.WeakKeyDictionary()
)


def _code_names(code: types.CodeType) -> frozenset[str]:
    """Global (and attribute) names used by ``code`` and the code nested in it."""
    names = _code_names_cache.get(code)
    if names is None:
        found = set(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                found |= _code_names(const)
        names = _code_names_cache[code] = frozenset(found)
    return names


def _functions_of(value: Any, ns: dict[str, Any]) -> Iterable[types.FunctionType]:
    """User functions whose globals running ``value`` may touch."""
    if isinstance(value, types.MethodType):
        value = value.__func__
    elif isinstance(value, (classmethod, staticmethod)):
        value = value.__func__
    if isinstance(value, types.FunctionType):
        seen = 0
        while isinstance(value, types.FunctionType) and seen < 8:
            if value.__globals__ is ns:
                yield value
            value = getattr(value, "__wrapped__", None)
            seen += 1
        return
    cls = value if isinstance(value, type) else type(value)
    if getattr(cls, "__module__", None) != "__main__":
        return
    for klass in cls.__mro__:
        if klass.__module__ != "__main__":
            continue
        for attr in vars(klass).values():
            if isinstance(attr, property):
                candidates: tuple[Any, ...] = (attr.fget, attr.fset, attr.fdel)
            else:
                candidates = (getattr(attr, "__func__", attr),)
            for func in candidates:
                if isinstance(func, types.FunctionType) and func.__globals__ is ns:
                    yield func


def referenced_names(code: str, ns: dict[str, Any], limit: int = 10_000) -> list[str]:
    """Names of ``ns`` the cell ``code`` may reach: every identifier the text
    mentions (in code, strings and comments alike, so magics' arguments and
    ``exec`` strings count), and, transitively, the globals used by the user
    functions, classes and instances among them."""
    found = set(_IDENTIFIER.findall(code)) & ns.keys()
    found -= _NOT_SNAPSHOTTED
    pending = list(found)
    while pending and len(found) < limit:
        value = ns.get(pending.pop(), _MISSING)
        if value is _MISSING or isinstance(value, types.ModuleType):
            continue
        try:
            for func in _functions_of(value, ns):
                for name in _code_names(func.__code__) & ns.keys():
                    if name not in found and name not in _NOT_SNAPSHOTTED:
                        found.add(name)
                        pending.append(name)
        except Exception:  # an odd object: its globals are not followed
            continue
    return sorted(found)


# -- classifying objects ----------------------------------------------------------------

(
    K_ATOM,  # immutable, or state we leave alone: nothing to record
    K_OPAQUE,  # mutable state we cannot see: not covered
    K_TUPLE,  # immutable container: walk the elements
    K_LIST,
    K_DICT,
    K_ODICT,
    K_SET,
    K_BYTEARRAY,
    K_DEQUE,
    K_ARRAY,
    K_NDARRAY,
    K_NDFRAME,
    K_INSTANCE,
    K_CLASS,
    K_FUNCTION,
    K_METHOD,
    K_NPRNG,
    K_RANDOM,
    K_EXTERNAL,  # mirrors something outside the process (thread, file, process): left alone
) = range(19)
_CONTAINERS = frozenset({K_LIST, K_DICT, K_ODICT, K_SET, K_BYTEARRAY, K_DEQUE, K_ARRAY})

_ATOMIC_TYPES: set[type] = {
    int,
    float,
    complex,
    str,
    bytes,
    bool,
    type(None),
    range,
    slice,
    type(Ellipsis),
    type(NotImplemented),
    object,
}
_KINDS: dict[type, int] = {}
_EXACT_CONTAINERS = frozenset({list, dict, set, bytearray, collections.deque, array.array})
_HEAPTYPE = 1 << 9
_IMMUTABLETYPE = 1 << 8
#: Types with no state a cell would change, or whose changes are external
#: effects the report names anyway (locks, files, sockets).
_LEFT_ALONE = (
    types.ModuleType,
    types.BuiltinFunctionType,
    types.WrapperDescriptorType,
    types.MethodWrapperType,
    types.MethodDescriptorType,
    types.ClassMethodDescriptorType,
    types.GetSetDescriptorType,
    types.MemberDescriptorType,
    types.CodeType,
    types.FrameType,
    types.TracebackType,
    types.MappingProxyType,
    property,
    weakref.ref,
    type(threading.Lock()),
    type(threading.RLock()),
    type(re.compile("")),
)


#: Classes whose instances stand for something outside the interpreter's
#: objects (threads, processes, files, sockets, event loops) or are shared
#: with other threads (locks, conditions): restoring their attributes would
#: desynchronise them from what they stand for.
_EXTERNAL_CLASSES = (
    "io.IOBase",
    "socket.socket",
    "threading.Thread",
    "threading.Condition",
    "threading.Event",
    "threading.Semaphore",
    "threading.Barrier",
    "subprocess.Popen",
    "multiprocessing.process.BaseProcess",
    "concurrent.futures._base.Executor",
    "concurrent.futures._base.Future",
    "asyncio.events.AbstractEventLoop",
    "asyncio.futures.Future",
    "selectors.BaseSelector",
    "queue.Queue",
    "logging.Handler",
    "sqlite3.Connection",
)


def _external(tp: type) -> bool:
    for dotted in _EXTERNAL_CLASSES:
        module, _, name = dotted.rpartition(".")
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(tp, cls):
            return True
    return False


def _python_level(cls: type) -> bool:
    """Instances of ``cls`` keep all their state in ``__dict__``/slots."""
    for klass in cls.__mro__:
        if klass is object:
            continue
        flags = klass.__flags__
        if flags & _HEAPTYPE and not flags & _IMMUTABLETYPE:
            continue
        if klass.__module__ == "builtins" and issubclass(klass, BaseException):
            continue
        if klass is types.SimpleNamespace:
            continue
        return False
    return True


def _classify(tp: type) -> int:
    kind = _KINDS.get(tp)
    if kind is None:
        kind = _KINDS[tp] = _classify_new(tp)
        if kind == K_ATOM:
            _ATOMIC_TYPES.add(tp)
    return kind


def _classify_new(tp: type) -> int:
    if tp in _ATOMIC_TYPES or issubclass(tp, _LEFT_ALONE):
        return K_ATOM
    if issubclass(tp, type):
        return K_CLASS
    if _external(tp):
        return K_EXTERNAL
    if tp is types.FunctionType:
        return K_FUNCTION
    if tp is types.MethodType:
        return K_METHOD
    np = sys.modules.get("numpy")
    if np is not None:
        if issubclass(tp, np.ndarray):
            return K_NDARRAY
        if issubclass(tp, (np.generic, np.dtype)):
            return K_ATOM
        nprandom = sys.modules.get("numpy.random")
        if nprandom is not None and issubclass(tp, (nprandom.Generator, nprandom.RandomState)):
            return K_NPRNG
    pd = sys.modules.get("pandas")
    if pd is not None:
        generic = sys.modules.get("pandas.core.generic")
        if generic is not None and issubclass(tp, generic.NDFrame):
            return K_NDFRAME
        if issubclass(tp, pd.Index):  # immutable values (names are not covered)
            return K_ATOM
    enum = sys.modules.get("enum")
    if enum is not None and issubclass(tp, enum.Enum):
        return K_ATOM
    stdrandom = sys.modules.get("random")
    if stdrandom is not None and issubclass(tp, stdrandom.Random):
        return K_RANDOM
    if issubclass(tp, (tuple, frozenset)):
        return K_TUPLE
    if issubclass(tp, list):
        return K_LIST
    if issubclass(tp, collections.OrderedDict):
        return K_ODICT
    if issubclass(tp, dict):
        return K_DICT
    if issubclass(tp, set):
        return K_SET
    if issubclass(tp, bytearray):
        return K_BYTEARRAY
    if issubclass(tp, collections.deque):
        return K_DEQUE
    if issubclass(tp, array.array):
        return K_ARRAY
    if issubclass(tp, (int, float, complex, str, bytes)):
        return K_INSTANCE if _slot_names(tp) or "__dict__" in dir(tp) else K_ATOM
    if getattr(tp, "__module__", "") == "builtins" and issubclass(tp, BaseException):
        return K_INSTANCE
    return K_INSTANCE if _python_level(tp) else K_OPAQUE


_slots_cache: dict[type, tuple[str, ...]] = {}


def _slot_names(tp: type) -> tuple[str, ...]:
    names = _slots_cache.get(tp)
    if names is None:
        found: list[str] = []
        for klass in tp.__mro__:
            slots = klass.__dict__.get("__slots__", ())
            if isinstance(slots, str):
                slots = (slots,)
            for slot in slots:
                if slot in ("__dict__", "__weakref__"):
                    continue
                if slot.startswith("__") and not slot.endswith("__"):
                    slot = f"_{klass.__name__.lstrip('_')}{slot}"
                if slot not in found:
                    found.append(slot)
        names = _slots_cache[tp] = tuple(found)
    return names


def _cell_contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return _MISSING


def _instance_dict(obj: Any) -> dict[str, Any] | None:
    try:
        d = object.__getattribute__(obj, "__dict__")
    except Exception:
        return None
    return d if type(d) is dict else None


def _type_name(tp: type) -> str:
    module = getattr(tp, "__module__", "") or ""
    if module in ("builtins", "__main__"):
        return tp.__qualname__
    return f"{module}.{tp.__qualname__}"


def _all_atomic(values: Any) -> bool:
    return set(map(type, values)) <= _ATOMIC_TYPES


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


# -- the snapshot -------------------------------------------------------------------------


class _Record:
    """One mutable object and its state before the cell."""

    __slots__ = ("obj", "kind", "state", "extra", "rebind")

    def __init__(self, obj: Any, kind: int, state: Any, extra: Any = None) -> None:
        self.obj = obj
        self.kind = kind
        self.state = state
        self.extra = extra  # __dict__/slots state of a container subclass instance
        self.rebind: Any = _MISSING  # what a root name gets if it cannot be restored in place


class _Root:
    __slots__ = ("name", "obj", "records", "issues")

    def __init__(self, name: str, obj: Any) -> None:
        self.name = name
        self.obj = obj
        self.records: list[_Record] = []
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
        self.records: dict[int, _Record] = {}
        self.roots: dict[str, _Root] = {}
        self.lazy_frames = _pandas_cow()
        self._skip = {id(obj) for obj in skip}
        self._walked: set[int] = set()  # objects visited that have no record

    # -- taking it -----------------------------------------------------------------

    def add(self, name: str, obj: Any) -> None:
        """Record ``obj`` (bound to ``name``) and what it reaches."""
        root = self.roots[name] = _Root(name, obj)
        kind = _classify(type(obj))
        if kind == K_EXTERNAL:
            root.note(f"{_type_name(type(obj))}: external resource")
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
                root.note(f"{_type_name(type(o))}: {type(exc).__name__}: {exc}"[:160])

    def _visit(self, o: Any, root: _Root, stack: list[Any]) -> None:
        kind = _classify(type(o))
        if kind == K_ATOM or kind == K_EXTERNAL:
            return
        oid = id(o)
        children: Any = ()
        state: Any
        record: _Record | None = None
        if kind == K_TUPLE:
            self._walked.add(oid)
            children = o
        elif kind == K_LIST:
            state = list.copy(o)
            record = _Record(o, kind, state)
            children = state
        elif kind == K_DICT:
            state = dict.copy(o)
            record = _Record(o, kind, state)
            children = state.values()
        elif kind == K_ODICT:
            state = list(o.items())
            record = _Record(o, kind, state)
            children = [v for _, v in state]
        elif kind == K_SET:
            state = set(o)
            record = _Record(o, kind, state)
            children = state
        elif kind == K_BYTEARRAY:
            if not self._budget(len(o), root, o):
                return
            record = _Record(o, kind, bytes(o))
        elif kind == K_DEQUE:
            state = list(o)
            record = _Record(o, kind, state)
            children = state
        elif kind == K_ARRAY:
            if not self._budget(len(o) * o.itemsize, root, o):
                return
            record = _Record(o, kind, o[:])
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
            record = _Record(o, kind, state)
            children = state.values()
        elif kind == K_FUNCTION:
            if o.__globals__ is not self.user_globals:
                self._walked.add(oid)
                return
            kwdefaults = o.__kwdefaults__
            cells = tuple(_cell_contents(cell) for cell in o.__closure__ or ())
            state = (
                dict(o.__dict__),
                o.__defaults__,
                None if kwdefaults is None else dict(kwdefaults),
                cells,
            )
            record = _Record(o, kind, state)
            children = [
                *state[0].values(),
                *(state[1] or ()),
                *(state[2] or {}).values(),
                *(c for c in cells if c is not _MISSING),
            ]
        elif kind == K_METHOD:
            self._walked.add(oid)
            children = (o.__self__, o.__func__)
        elif kind == K_NPRNG:
            if hasattr(o, "bit_generator"):
                record = _Record(o, kind, o.bit_generator.state)
            else:
                record = _Record(o, kind, o.get_state(legacy=False))
        elif kind == K_RANDOM:
            record = _Record(o, kind, o.getstate())
        if kind in (K_INSTANCE, K_OPAQUE) or (
            record is not None and type(o) not in _EXACT_CONTAINERS and kind in _CONTAINERS
        ):
            extra = self._instance_state(o)
            if extra is not None:
                if record is None:
                    record = _Record(o, K_INSTANCE, None, extra)
                else:
                    record.extra = extra
                d, slots = extra
                if d:
                    children = [*children, *d.values()]
                if slots:
                    children = [*children, *(v for _, v in slots if v is not _MISSING)]
            if kind == K_OPAQUE:
                name = _type_name(type(o))
                root.note(f"{name}: internal state" if o is root.obj else f"holds {name}")
        if record is None:
            self._walked.add(oid)
        else:
            self.records[oid] = record
            root.records.append(record)
        if children and not _all_atomic(children):
            atomic = _ATOMIC_TYPES
            stack.extend(c for c in children if type(c) not in atomic)

    @staticmethod
    def _instance_state(o: Any) -> tuple[dict[str, Any] | None, tuple[Any, ...]] | None:
        d = _instance_dict(o)
        slots = []
        for name in _slot_names(type(o)):
            try:
                slots.append((name, object.__getattribute__(o, name)))
            except AttributeError:
                slots.append((name, _MISSING))
        if d is None and not slots:
            return None
        return (None if d is None else dict(d), tuple(slots))

    def _budget(self, nbytes: int, root: _Root, o: Any) -> bool:
        if self.bytes + nbytes > self.max_bytes:
            root.note(
                f"{_type_name(type(o))} of {format_size(nbytes)}: over the "
                f"{format_size(self.max_bytes)} snapshot limit"
            )
            self._walked.add(id(o))
            return False
        self.bytes += nbytes
        return True

    def _ndarray(self, o: Any, root: _Root) -> _Record | None:
        if not o.flags.writeable:  # cannot change in place (pandas' copy-on-write views)
            self._walked.add(id(o))
            return None
        if not self._budget(int(o.nbytes), root, o):
            return None
        record = _Record(o, K_NDARRAY, o.copy(order="K"))
        record.rebind = record.state
        return record

    def _ndframe(self, o: Any, root: _Root) -> _Record | None:
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
        record = _Record(o, K_NDFRAME, (copy, attrs, fingerprint))
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
                if _restore(record, self.lazy_frames):
                    changed.add(oid)
            except Exception as exc:
                failed[oid] = f"{type(exc).__name__}: {exc}"[:160]
                changed.add(oid)
        return changed, failed


def _restore(r: _Record, lazy_frames: bool) -> bool:
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
            if current.get(k, _MISSING) is not v:
                setattr(o, k, v)
                changed = True
    elif kind == K_FUNCTION:
        d, defaults, kwdefaults, cells = s
        for cell, saved in zip(o.__closure__ or (), cells, strict=False):
            if _cell_contents(cell) is not saved:
                if saved is _MISSING:
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
        d = _instance_dict(o)
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
            current = _MISSING
        if current is value:
            continue
        changed = True
        if value is _MISSING:
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
        and all(o.__dict__.get(k, _MISSING) is v for k, v in attrs.items())
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


# -- outcome ------------------------------------------------------------------------------


def _names(names: list[str], limit: int = 20) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f" and {len(names) - limit} more"


class Outcome:
    """What a rollback did."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.removed: list[str] = []
        self.restored: list[str] = []
        self.in_place: list[str] = []
        self.rebound: list[str] = []
        self.not_covered: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self.seconds = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.removed or self.restored or self.in_place or self.rebound or self.failed)

    def not_undone(self) -> list[str]:
        items = [EXTERNAL_EFFECTS]
        if self.policy == "bindings":
            items.insert(0, "changes to objects in place")
        else:
            items.append("module state and objects not reachable from the cell's names")
        return items

    def as_payload(self) -> dict[str, Any]:
        return {
            "source": PAYLOAD_SOURCE,
            "policy": self.policy,
            "removed": self.removed,
            "restored": self.restored,
            "restored_in_place": self.in_place,
            "rebound": self.rebound,
            "not_covered": self.not_covered,
            "failed": self.failed,
            "not_undone": self.not_undone(),
            "seconds": round(self.seconds, 6),
        }

    def describe(self) -> str:
        parts = []
        if self.removed:
            parts.append(f"removed: {_names(self.removed)}")
        if self.restored:
            parts.append(f"restored: {_names(self.restored)}")
        if self.in_place:
            parts.append(f"restored in place: {_names(self.in_place)}")
        if self.rebound:
            parts.append(f"rebound: {_names(self.rebound)}")
        head = (
            f"pyrepl3: cell failed; rolled back ({self.policy}): {'; '.join(parts)}"
            if parts
            else f"pyrepl3: cell failed; nothing to roll back ({self.policy})"
        )
        lines = [head]
        if self.rebound:
            lines.append(
                "  rebound names hold the old value; other references still see the change"
            )
        if self.failed:
            lines.append(
                "  could not restore: "
                + "; ".join(f"{k} ({v})" for k, v in list(self.failed.items())[:6])
            )
        if self.not_covered:
            lines.append(
                "  not covered: "
                + "; ".join(f"{k} ({v})" for k, v in list(self.not_covered.items())[:6])
                + (f" and {len(self.not_covered) - 6} more" if len(self.not_covered) > 6 else "")
            )
        lines.append(f"  not undone: {', '.join(self.not_undone())}")
        return "\n".join(lines)


def _diff(ns: dict[str, Any], before: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Names added to ``ns`` since ``before``, and names of ``before`` now
    bound to another object or unbound (compared by identity, at C speed)."""
    n = len(before)
    names = list(ns)
    if names[:n] == list(before):
        # Nothing deleted: old names keep their places, new ones follow.
        current: Iterable[Any] = itertools.islice(ns.values(), n)
        changed = itertools.compress(before, map(operator.is_not, current, before.values()))
        return names[n:], list(changed)
    current = map(ns.get, before, itertools.repeat(_MISSING))
    changed = itertools.compress(before, map(operator.is_not, current, before.values()))
    return list(ns.keys() - before.keys()), list(changed)


# -- one cell -----------------------------------------------------------------------------


class Transaction:
    """The state one cell may roll back to."""

    __slots__ = ("manager", "policy", "ns", "before", "snapshot")

    def __init__(self, manager: TransactionManager, policy: str, code: str) -> None:
        self.manager = manager
        self.policy = policy
        self.ns: dict[str, Any] = manager.shell.user_ns
        self.before = self.ns.copy()
        self.snapshot: Snapshot | None = None
        if policy == "full":
            self.snapshot = manager.take_snapshot(code, self.ns)

    def end(self, result: Any, *, silent: bool = False) -> Outcome | None:
        """After the cell: keep its effects, or (``result`` is a failure, or
        ``None`` for an interrupted run) roll them back and report."""
        if result is not None and result.success:
            return None
        started = time.perf_counter()
        outcome = self.rollback()
        outcome.seconds = time.perf_counter() - started
        executed = result is None or result.error_in_exec is not None
        if executed or outcome.changed:
            self.manager.report(outcome, silent=silent)
        return outcome

    def rollback(self) -> Outcome:
        outcome = Outcome(self.policy)
        ns, before = self.ns, self.before
        added, changed = _diff(ns, before)
        for name in added:
            if not is_ipython_name(name):
                del ns[name]
                outcome.removed.append(str(name))
        for name in changed:
            if not is_ipython_name(name):
                ns[name] = before[name]
                outcome.restored.append(str(name))
        outcome.removed.sort()
        outcome.restored.sort()
        if self.snapshot is not None:
            self._rollback_objects(self.snapshot, outcome)
        return outcome

    def _rollback_objects(self, snapshot: Snapshot, outcome: Outcome) -> None:
        changed, failed = snapshot.restore()
        for name, root in snapshot.roots.items():
            own = root.records[0] if root.records and root.records[0].obj is root.obj else None
            if own is not None and id(own.obj) in failed:
                if own.rebind is not _MISSING and self.ns.get(name) is root.obj:
                    self.ns[name] = own.rebind
                    outcome.rebound.append(name)
                else:
                    outcome.failed[name] = failed[id(own.obj)]
            elif any(id(r.obj) in changed for r in root.records):
                nested = [failed[id(r.obj)] for r in root.records if id(r.obj) in failed]
                if nested:
                    outcome.failed[name] = "partly: " + nested[0]
                else:
                    outcome.in_place.append(name)
            if root.issues:
                outcome.not_covered[name] = "; ".join(root.issues)


# -- the kernel's side --------------------------------------------------------------------


class TransactionManager:
    """Per-kernel policy, the magics, and the worker's begin/end hooks."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.explicit: str | None = None  # set by %transaction_policy
        self._env_raw: Any = _MISSING
        self._env_policy = "off"
        self._env_policy_source()  # warn about a bad value at start
        manager = shell.input_transformer_manager
        if strip_transaction_line not in manager.line_transforms:
            manager.line_transforms.insert(0, strip_transaction_line)
        shell.register_magics(TransactionMagics(shell, manager=self))

    # -- policy ----------------------------------------------------------------------

    def _env_policy_source(self) -> str:
        # Read on every cell (the pool configures the environment after the
        # worker started); os.environ.get costs ~0.7 us, the bytes dict 30 ns.
        data = getattr(os.environ, "_data", None)
        if isinstance(data, dict):
            raw = data.get(_ENV_POLICY_KEY)
        else:
            raw = os.environ.get(ENV_POLICY)
        if raw is self._env_raw:
            return self._env_policy
        self._env_raw = raw
        value = (os.fsdecode(raw) if isinstance(raw, bytes) else (raw or "")).strip().lower()
        if value in POLICIES:
            self._env_policy = value
        else:
            if value:
                log.warning(
                    "%s=%r is not one of %s; using 'off'", ENV_POLICY, value, ", ".join(POLICIES)
                )
                print(
                    f"pyrepl3: {ENV_POLICY}={value!r} is not one of {', '.join(POLICIES)}; "
                    "transactions are off",
                    file=sys.__stderr__ or sys.stderr,
                )
            self._env_policy = "off"
        return self._env_policy

    @property
    def policy(self) -> str:
        """The kernel's policy: ``%transaction_policy``'s, else the environment's."""
        return self.explicit or self._env_policy_source()

    def set_policy(self, policy: str | None) -> None:
        """``None`` goes back to the environment's policy."""
        if policy is not None and policy not in POLICIES:
            raise ValueError(f"unknown transaction policy {policy!r} (use {', '.join(POLICIES)})")
        self.explicit = policy

    @staticmethod
    def _limit(env: str, default: int) -> int:
        value = os.environ.get(env)
        if not value:
            return default
        try:
            return parse_size(value)
        except ValueError:
            log.warning("%s=%r is not a size; using %d", env, value, default)
            return default

    @property
    def max_bytes(self) -> int:
        return self._limit(ENV_MAX_BYTES, DEFAULT_MAX_BYTES)

    @property
    def max_objects(self) -> int:
        return self._limit(ENV_MAX_OBJECTS, DEFAULT_MAX_OBJECTS)

    # -- hooks ---------------------------------------------------------------------

    def begin(self, code: str) -> Transaction | None:
        """Before the cell runs (outside user code: not interruptible)."""
        policy = self.explicit or self._env_policy_source()
        if code.startswith("%%transaction") or code[:1].isspace():
            policy = cell_policy(code) or policy
        if policy == "off":
            return None
        try:
            return Transaction(self, policy, code)
        except Exception:
            log.exception("could not start a transaction; the cell runs without one")
            return None

    def take_snapshot(self, code: str, ns: dict[str, Any]) -> Snapshot:
        snapshot = Snapshot(
            max_bytes=self.max_bytes,
            max_objects=self.max_objects,
            user_globals=ns,
            skip=(self.shell, ns, os.environ, sys.modules, self.shell.user_ns_hidden),
        )
        for name in referenced_names(code, ns):
            snapshot.add(name, ns[name])
        return snapshot

    def report(self, outcome: Outcome, *, silent: bool) -> None:
        try:
            self.shell.payload_manager.write_payload(outcome.as_payload())
        except Exception:
            log.exception("could not add the rollback payload")
        if silent:
            return
        stream = sys.__stderr__ or sys.stderr
        try:
            stream.write(outcome.describe() + "\n")
            stream.flush()
        except Exception:
            log.exception("could not write the rollback report")

    @staticmethod
    def end(transaction: Transaction | None, result: Any, *, silent: bool = False) -> None:
        """After the cell, whatever happened; never raises."""
        if transaction is None:
            return
        try:
            transaction.end(result, silent=silent)
        except Exception as exc:
            log.exception("rollback failed")
            print(
                f"pyrepl3: cell failed; rollback failed: {type(exc).__name__}: {exc}",
                file=sys.__stderr__ or sys.stderr,
            )


_ENV_POLICY_KEY = os.fsencode(ENV_POLICY)


#: What each policy does to a cell that fails, as %transaction_policy says it.
_POLICY_EFFECTS = {
    "off": "a failing cell's changes stay (as in ipykernel)",
    "bindings": "a failing cell's new, rebound and deleted names are rolled back",
    "full": "a failing cell's names and in-place changes to the objects "
    "it reaches by name are rolled back",
}


@magics_class
class TransactionMagics(Magics):
    def __init__(self, shell: Any, manager: TransactionManager) -> None:
        super().__init__(shell)
        self.manager = manager

    @line_magic
    def transaction_policy(self, line: str) -> None:
        """Show or set what a failing cell rolls back.

        %transaction_policy            show the current policy
        %transaction_policy off        roll back nothing (as ipykernel)
        %transaction_policy bindings   undo the names a failing cell added, rebound or deleted
        %transaction_policy full       also undo in-place changes to the objects the cell
                                       reaches by name (see docs/transactions.md)
        %transaction_policy default    go back to $PYREPL3_TRANSACTION_POLICY (else off)

        A single cell can ask for another policy with a first line
        ``%%transaction [bindings|full|off]``.
        """
        words = line.split()
        if words and (len(words) != 1 or words[0] not in (*POLICIES, "default")):
            raise UsageError(f"usage: %transaction_policy [{'|'.join(POLICIES)}|default]")
        if words:
            self.manager.set_policy(None if words[0] == "default" else words[0])
        # Setting it says what is now in force, as showing it does.
        source = "set by %transaction_policy" if self.manager.explicit else f"${ENV_POLICY}"
        if not self.manager.explicit and not os.environ.get(ENV_POLICY):
            source = "default"
        policy = self.manager.policy
        print(f"transaction policy: {policy} ({source}): {_POLICY_EFFECTS[policy]}")

    @cell_magic
    def transaction(self, line: str, cell: str) -> None:
        """Run this cell under a transaction policy of its own.

        %%transaction [full|bindings|off]    (default: full)

        Must be the first line of the cell. If the cell fails, what it did is
        rolled back as the policy says and the output reports what was undone
        and what was not; a cell that succeeds keeps its effects. The kernel's
        policy (%transaction_policy) applies to the other cells.
        """
        if line.strip() not in ("", *POLICIES):
            raise UsageError(f"usage: %%transaction [{'|'.join(POLICIES)}]")
        # The worker strips a valid first line before the cell runs; getting
        # here means the magic was called some other way.
        raise UsageError("%%transaction must be the first line of a cell")
