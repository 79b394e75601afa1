"""Pickling of a user namespace, object by object, on the C pickler.

What the standard pickler cannot do for a notebook namespace is done here by
``reducer_override`` rather than by dill's pure-Python pickler:

- functions and classes defined in cells (also behind ``functools.lru_cache``,
  whose cache is not kept) are saved by value (code via
  ``marshal``, so a checkpoint restores on the same Python minor version), and
  restored functions get the *live* namespace as their globals: rebinding a
  global after a restore changes their result;
- modules are saved by reference (``import_module(name)``);
- open files are saved as (path, mode, position, encoding) and reopened;
- locks are saved as new, unlocked locks of the same kind;
- any object that is bound to another top-level name saved earlier is saved
  as a reference to that name, so identity between names survives
  (``type(points[0]) is Point``, ``a is b``).

numpy arrays and pandas frames travel as protocol-5 out-of-band buffers.

This module's path and the names of the functions its reducers return
(``_make_function``, ``_set_function_state``, ``_named_ref``, ``_make_class``,
...) are part of the checkpoint format: pickles name them, so moving or
renaming them makes saved checkpoints unreadable.
"""

from __future__ import annotations

import builtins
import contextvars
import functools
import importlib
import io
import itertools
import marshal
import pickle
import sys
import threading
import types
import weakref
from collections.abc import Callable
from typing import Any

from ..errors import Pyrepl3Error

PROTOCOL = 5

LOCK_TYPES = {type(threading.Lock()): "Lock", type(threading.RLock()): "RLock"}
FILE_TYPES = (io.TextIOWrapper, io.BufferedReader, io.BufferedWriter, io.BufferedRandom, io.FileIO)


class NotRestorable(Pyrepl3Error):
    """The object cannot be saved; ``str(exc)`` says why."""


def is_user_function(obj: Any, user_ns: dict[str, Any]) -> bool:
    return isinstance(obj, types.FunctionType) and (
        obj.__globals__ is user_ns or obj.__module__ == "__main__"
    )


def is_user_class(obj: Any) -> bool:
    return isinstance(obj, type) and obj.__module__ == "__main__"


class NamespacePickler(pickle.Pickler):
    """Pickles one top-level object. Other top-level objects it contains are
    written as references to their names (``refs`` collects which), so
    identity between names survives. The check runs in ``reducer_override``,
    which the C pickler consults only for objects that are not built-in
    scalars or containers: no Python call per string or tuple."""

    def __init__(
        self,
        file: Any,
        user_ns: dict[str, Any],
        named: dict[int, str],
        own: Any,
        buffer_callback: Callable[[pickle.PickleBuffer], Any] | None,
    ) -> None:
        super().__init__(file, protocol=PROTOCOL, buffer_callback=buffer_callback)
        self.user_ns = user_ns
        self.named = named  # id(obj) -> name it may be referenced by
        self.own = own
        self.refs: set[str] = set()

    def reducer_override(self, obj: Any) -> Any:
        if obj is not self.own:
            name = self.named.get(id(obj))
            if name is not None:
                self.refs.add(name)
                return _named_ref, (name,)
        if isinstance(obj, types.ModuleType):
            return importlib.import_module, (obj.__name__,)
        if is_user_function(obj, self.user_ns):
            return _reduce_function(obj)
        if is_user_class(obj):
            return _reduce_class(obj)
        if isinstance(obj, functools._lru_cache_wrapper) and is_user_function(
            getattr(obj, "__wrapped__", None), self.user_ns
        ):
            # By default pickled as a reference to ``__main__.<name>``, which a
            # fresh worker does not have: save the function, wrap it again.
            params = obj.cache_parameters()
            return _make_lru_cache, (obj.__wrapped__, params["maxsize"], params["typed"])
        if isinstance(obj, types.GeneratorType):
            raise NotRestorable(
                "a generator's running state cannot be saved; re-create it after a restore"
            )
        if isinstance(obj, (types.CoroutineType, types.AsyncGeneratorType)):
            raise NotRestorable("a coroutine's running state cannot be saved")
        if type(obj) is property:  # class attributes the C pickler refuses
            return property, (obj.fget, obj.fset, obj.fdel, obj.__doc__)
        if type(obj) in (staticmethod, classmethod):
            return type(obj), (obj.__func__,)
        kind = LOCK_TYPES.get(type(obj))
        if kind is not None:
            return _new_lock, (kind,)
        if isinstance(obj, FILE_TYPES):
            return _reduce_file(obj)
        if isinstance(obj, types.FrameType):
            raise NotRestorable("frames cannot be saved")
        return NotImplemented


class ContainerAwarePickler(NamespacePickler):
    """Also refers to named plain containers (list, dict, set, tuple) found
    inside the object, which ``reducer_override`` never sees. This costs a
    Python call per pickled object, so it is used only for objects that hold
    a named container (see :func:`holds_named_container`)."""

    def persistent_id(self, obj: Any) -> Any:
        if obj is not self.own and type(obj) in CONTAINERS:
            name = self.named.get(id(obj))
            if name is not None:
                self.refs.add(name)
                return name
        return None


CONTAINERS = (list, dict, set, tuple, frozenset)
_SCAN_LIMIT = 10_000


def holds_named_container(obj: Any, named_containers: dict[int, str]) -> bool:
    """Whether a plain container directly holds another named plain container
    (``y = {"a": x}``); a bounded, one-level scan."""
    if not named_containers or type(obj) not in CONTAINERS:
        return False
    items = obj.values() if type(obj) is dict else obj
    others = named_containers.keys() - {id(obj)}
    # At C speed: no Python call per item (d = 10k tuples costs ~0.2 ms).
    return not others.isdisjoint(map(id, itertools.islice(items, _SCAN_LIMIT)))


class _Unpickler(pickle.Unpickler):
    def persistent_load(self, pid: Any) -> Any:
        return _resolver.get()(pid)


_resolver: contextvars.ContextVar[Callable[[str], Any]] = contextvars.ContextVar("pyrepl3_resolver")


def _named_ref(name: str) -> Any:
    return _resolver.get()(name)


def load(inband: Any, buffers: Any, resolve: Callable[[str], Any]) -> Any:
    """Unpickle one object; references to other names go to ``resolve``."""
    token = _resolver.set(resolve)
    try:
        return _Unpickler(io.BytesIO(inband), buffers=buffers).load()
    finally:
        _resolver.reset(token)


# -- functions ------------------------------------------------------------------


def _reduce_function(func: types.FunctionType) -> Any:
    closure = func.__closure__ or ()
    # A tuple, not a dict: keys of ours would share (by pickle's memo) with
    # equal interned strings of the function's, and a save after a restore
    # would differ in bytes.
    state = (
        func.__defaults__,
        func.__kwdefaults__,
        dict(func.__dict__),
        dict(getattr(func, "__annotations__", {}) or {}),
        [_cell_contents(c) for c in closure],
        func.__doc__,
    )
    args = (
        _code_bytes(func.__code__),
        func.__name__,
        func.__qualname__,
        len(closure),
        func.__module__,
    )
    return _make_function, args, state, None, None, _set_function_state


#: marshal's output for a code object depends on reference counts and
#: interning, so it changes across a save/restore. The first bytes seen for a
#: code object are kept (by identity: equal code objects may marshal
#: differently): an unchanged function keeps its digest, and its blob.
_CODE_BYTES: dict[int, tuple[weakref.ref[types.CodeType], bytes]] = {}


def _remember_code(code: types.CodeType, data: bytes) -> None:
    key = id(code)

    def forget(ref: weakref.ref[types.CodeType]) -> None:
        entry = _CODE_BYTES.get(key)
        if entry is not None and entry[0] is ref:
            del _CODE_BYTES[key]

    _CODE_BYTES[key] = (weakref.ref(code, forget), data)


def _code_bytes(code: types.CodeType) -> bytes:
    entry = _CODE_BYTES.get(id(code))
    if entry is not None and entry[0]() is code:
        return entry[1]
    data = marshal.dumps(code)
    _remember_code(code, data)
    return data


_EMPTY = ("pyrepl3-empty-cell",)


def _cell_contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:
        return _EMPTY


def _live_namespace() -> dict[str, Any]:
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None:
            return shell.user_ns  # type: ignore[no-any-return]
    except ImportError:
        pass
    return sys.modules["__main__"].__dict__


def _make_function(code_bytes: bytes, name: str, qualname: str, ncells: int, module: str) -> Any:
    code = marshal.loads(code_bytes)
    _remember_code(code, code_bytes)
    closure = tuple(types.CellType() for _ in range(ncells)) or None
    # Interned like the originals, so a save after a restore pickles the same
    # bytes (pickle shares equal strings only when they are one object).
    func = types.FunctionType(code, _live_namespace(), sys.intern(name), None, closure)
    func.__qualname__ = sys.intern(qualname)
    func.__module__ = sys.intern(module)
    return func


_STATE_KEYS = ("defaults", "kwdefaults", "dict", "annotations", "cells", "doc")


def _set_function_state(func: Any, state: Any) -> None:
    if isinstance(state, dict):  # as written by earlier versions
        state = tuple(state[key] for key in _STATE_KEYS)
    defaults, kwdefaults, attrs, annotations, cells, doc = state
    func.__defaults__ = defaults
    func.__kwdefaults__ = kwdefaults
    func.__dict__.update(attrs)
    func.__annotations__ = annotations
    func.__doc__ = doc
    for cell, value in zip(func.__closure__ or (), cells, strict=False):
        if value != _EMPTY:
            cell.cell_contents = value


def _make_lru_cache(func: Any, maxsize: int | None, typed: bool) -> Any:
    return functools.lru_cache(maxsize=maxsize, typed=typed)(func)


# -- classes --------------------------------------------------------------------

#: ``__slotnames__`` is copyreg's cache, set when an instance is first pickled.
_SKIP_CLASS_ATTRS = {"__dict__", "__weakref__", "__slotnames__"}


#: Attributes ``type()`` creates first in a restored class but a class
#: statement last: saved first, so a save after a restore is byte-identical.
_FIRST_CLASS_ATTRS = ("__module__", "__slots__", "__doc__")


def _reduce_class(cls: type) -> Any:
    namespace = vars(cls)
    attrs = {k: namespace[k] for k in _FIRST_CLASS_ATTRS if k in namespace}
    attrs.update((k, v) for k, v in namespace.items() if k not in _SKIP_CLASS_ATTRS)
    slots = attrs.get("__slots__")
    if slots is not None:
        for slot in [slots] if isinstance(slots, str) else slots:
            attrs.pop(slot, None)  # member descriptors are made by type()
    return (
        _make_class,
        (cls.__name__, cls.__qualname__, cls.__bases__, type(cls), slots),
        attrs,
        None,
        None,
        _set_class_state,
    )


def _make_class(name: str, qualname: str, bases: tuple[type, ...], meta: type, slots: Any) -> type:
    ns: dict[str, Any] = {"__module__": "__main__", "__qualname__": qualname}
    if slots is not None:
        ns["__slots__"] = slots
    return meta(name, bases, ns)


def _set_class_state(cls: type, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        if key in ("__slots__", "__qualname__", "__module__"):
            continue
        if key == "__annotations__" and type(value) is dict:
            # Interned, as in a class statement (setattr interns the
            # attribute names they share): a later save pickles the same bytes.
            items = list(value.items())
            value.clear()
            value.update((sys.intern(k) if type(k) is str else k, v) for k, v in items)
        try:
            setattr(cls, key, value)
        except (AttributeError, TypeError):
            pass  # read-only attributes (e.g. __doc__ of some metaclasses)


# -- locks and files ----------------------------------------------------------------


def _new_lock(kind: str) -> Any:
    return threading.Lock() if kind == "Lock" else threading.RLock()


def _reduce_file(f: Any) -> Any:
    name = getattr(f, "name", None)
    if not isinstance(name, str) or f.closed:
        raise NotRestorable("only open files with a path can be saved (reopened at restore)")
    mode = getattr(f, "mode", "r")
    if not isinstance(mode, str):
        mode = "rb"
    try:
        position = f.tell()
    except (OSError, ValueError):
        position = None
    encoding = getattr(f, "encoding", None)
    # Reopening must never truncate or clobber: 'w' becomes 'r+', 'x' too.
    reopen_mode = mode.replace("w", "r+").replace("x", "r+").replace("++", "+")
    return _reopen_file, (name, reopen_mode, position, encoding)


def _reopen_file(path: str, mode: str, position: int | None, encoding: str | None) -> Any:
    f: Any = builtins.open(path, mode, encoding=None if "b" in mode else encoding)
    if position is not None:
        f.seek(position)
    return f
