"""What kind of object each type is, as the snapshot sees it: atoms (left
alone), containers (copied), instances (``__dict__`` and slots recorded),
classes and functions of the cells, random generators, numpy and pandas
objects, and opaque or external objects (reported as not covered)."""

from __future__ import annotations

import array
import collections
import re
import sys
import threading
import types
import weakref
from typing import Any

#: A value that is not there (an unbound name, an empty closure cell, an unset slot).
MISSING: Any = object()


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
CONTAINERS = frozenset({K_LIST, K_DICT, K_ODICT, K_SET, K_BYTEARRAY, K_DEQUE, K_ARRAY})

ATOMIC_TYPES: set[type] = {
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
EXACT_CONTAINERS = frozenset({list, dict, set, bytearray, collections.deque, array.array})
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


def classify(tp: type) -> int:
    kind = _KINDS.get(tp)
    if kind is None:
        kind = _KINDS[tp] = _classify_new(tp)
        if kind == K_ATOM:
            ATOMIC_TYPES.add(tp)
    return kind


def _classify_new(tp: type) -> int:
    if tp in ATOMIC_TYPES or issubclass(tp, _LEFT_ALONE):
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
        return K_INSTANCE if slot_names(tp) or "__dict__" in dir(tp) else K_ATOM
    if getattr(tp, "__module__", "") == "builtins" and issubclass(tp, BaseException):
        return K_INSTANCE
    return K_INSTANCE if _python_level(tp) else K_OPAQUE


_slots_cache: dict[type, tuple[str, ...]] = {}


def slot_names(tp: type) -> tuple[str, ...]:
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


def cell_contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return MISSING


def instance_dict(obj: Any) -> dict[str, Any] | None:
    try:
        d = object.__getattribute__(obj, "__dict__")
    except Exception:
        return None
    return d if type(d) is dict else None


def type_name(tp: type) -> str:
    module = getattr(tp, "__module__", "") or ""
    if module in ("builtins", "__main__"):
        return tp.__qualname__
    return f"{module}.{tp.__qualname__}"


def all_atomic(values: Any) -> bool:
    return set(map(type, values)) <= ATOMIC_TYPES
