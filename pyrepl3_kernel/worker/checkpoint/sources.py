"""Source tracking: ``inspect.getsource`` for functions and classes defined
in cells, also after a restore into a fresh worker.

IPython keeps each cell's source in ``linecache`` under a name such as
``<ipython-input-3-1a2b3c>``, which is enough for functions (their code knows
the name) but not for classes: ``inspect`` looks for a class's file through
its module, and ``__main__`` has none. This module remembers which cell
defined each class and teaches ``inspect.getfile`` to answer with it; a
restore puts the saved cell sources back into ``linecache``.

A checkpoint saves the source of each function and class of the cells with
it; one that does not unpickle (or a dataclass or enum, whose generated
parts do not survive pickling by value) is rebuilt by running its source
(:func:`rebuild_from_source`).
"""

from __future__ import annotations

import enum
import inspect
import linecache
import re
import types
import weakref
from typing import Any

from ..pickling import is_user_class, is_user_function
from .errors import CheckpointError

_class_cells: dict[str, str] = {}  # class qualname -> cell filename
_original_getfile = inspect.getfile


def register_source(filename: str, text: str) -> None:
    """Make ``text`` the source of ``filename`` for ``linecache``; an entry
    with no mtime is never evicted by ``linecache.checkcache``."""
    lines = text.splitlines(keepends=True)
    linecache.cache[filename] = (len(text), None, lines, filename)


def register_class_cell(qualname: str, filename: str) -> None:
    """Remember that the class ``qualname`` was defined in cell ``filename``."""
    _class_cells[qualname] = filename


def class_file(cls: type) -> str | None:
    """The cell filename that defined ``cls``, if known."""
    for value in vars(cls).values():
        func = getattr(value, "__func__", None) or getattr(value, "fget", None) or value
        code = getattr(func, "__code__", None)
        if code is not None and code.co_filename in linecache.cache:
            return str(code.co_filename)
    filename = _class_cells.get(cls.__qualname__)
    return filename if filename in linecache.cache else None


def _getfile(obj: Any) -> str:
    if isinstance(obj, type) and obj.__module__ == "__main__":
        filename = class_file(obj)
        if filename is not None:
            return filename
    return _original_getfile(obj)


def note_cell(execution_count: int, user_ns: dict[str, Any], compiler: Any = None) -> None:
    """After a cell ran: remember the cell of each class it defined. The
    cell's file name is IPython's ``<ipython-input-N-...>``, or whatever
    name ``compiler`` (the shell's, which maps names to cell numbers) gave
    it (the debugger's ``/tmp/pyrepl3_PID/HASH.py``)."""
    prefix = f"<ipython-input-{execution_count}-"
    filenames = [k for k in linecache.cache if isinstance(k, str) and k.startswith(prefix)]
    mapped = getattr(compiler, "_filename_map", None)
    if isinstance(mapped, dict):
        filenames += [k for k, n in mapped.items() if n == execution_count and k in linecache.cache]
    if not filenames:
        return
    filename = filenames[-1]
    source = "".join(linecache.getlines(filename))
    for obj in list(user_ns.values()):
        if isinstance(obj, type) and obj.__module__ == "__main__":
            name = obj.__qualname__
            if re.search(rf"^\s*class\s+{re.escape(name.rsplit('.', 1)[-1])}\b", source, re.M):
                _class_cells[name] = filename


def install(shell: Any) -> None:
    """Hook source tracking into ``shell`` and ``inspect``."""
    inspect.getfile = _getfile  # type: ignore[assignment]

    def post_run_cell(result: Any) -> None:
        count = getattr(result, "execution_count", None)
        raw = getattr(getattr(result, "info", None), "raw_cell", None)
        # A cell whose text never says "class" defined no class of its own.
        if count is not None and (raw is None or "class" in raw):
            note_cell(count, shell.user_ns, getattr(shell, "compile", None))

    shell.events.register("post_run_cell", post_run_cell)


# -- saving and rebuilding functions and classes by their source -----------------


def rebuild_from_source(
    shell: Any, var: str, entry: dict[str, Any], loaded: dict[str, Any], why: str
) -> Any:
    """Run the saved source of function or class ``var``; raises
    :class:`CheckpointError` (saying ``why`` it was needed) if that fails."""
    source = entry.get("source")
    if not source:
        raise CheckpointError(f"{why}; no source to rebuild it from")
    scratch = dict(shell.user_ns)
    scratch.update(loaded)
    try:
        exec(compile(source, entry.get("cell") or f"<restored {var}>", "exec"), scratch)
        obj = scratch[var]
    except Exception as exc:
        raise CheckpointError(
            f"{why}; rebuilding it from its source failed: {type(exc).__name__}: {exc}"
        ) from None
    # exec gave it (or its methods) the scratch dict as globals; give them
    # the live namespace, so rebinding a global changes what they see.
    return _rehome(obj, scratch, shell.user_ns)


def _rehome(obj: Any, old: dict[str, Any], new: dict[str, Any]) -> Any:
    """``obj`` (a function, or a class and its methods) with ``new`` as the
    globals of every function whose globals are ``old``."""
    if isinstance(obj, types.FunctionType):
        if obj.__globals__ is not old:
            return obj
        func = types.FunctionType(
            obj.__code__, new, obj.__name__, obj.__defaults__, obj.__closure__
        )
        func.__kwdefaults__ = obj.__kwdefaults__
        func.__qualname__ = obj.__qualname__
        func.__module__ = obj.__module__
        func.__doc__ = obj.__doc__
        func.__annotations__ = obj.__annotations__
        func.__dict__.update(obj.__dict__)
        return func
    if isinstance(obj, type):
        for key, value in list(vars(obj).items()):
            replacement: Any = value
            if isinstance(value, types.FunctionType):
                replacement = _rehome(value, old, new)
            elif isinstance(value, (staticmethod, classmethod)):
                inner = _rehome(value.__func__, old, new)
                if inner is not value.__func__:
                    replacement = type(value)(inner)
            elif isinstance(value, property):
                accessors = [
                    None if f is None else _rehome(f, old, new)
                    for f in (value.fget, value.fset, value.fdel)
                ]
                if accessors != [value.fget, value.fset, value.fdel]:
                    fget, fset, fdel = accessors
                    replacement = property(fget, fset, fdel, value.__doc__)
            if replacement is not value:
                setattr(obj, key, replacement)
    return obj


def add_source(
    entry: dict[str, Any], obj: Any, ns: dict[str, Any], sources: dict[str, str]
) -> None:
    """Record the source of a function or class of the cells in its entry
    (and its cell's text in ``sources``), for ``inspect`` and rebuilds."""
    source = _source_of(obj, ns)
    if source is None:
        return
    entry["source"] = source
    if isinstance(obj, type):
        entry["qualname"] = obj.__qualname__
    filename = _defining_file(obj)
    if filename:
        entry["cell"] = filename
        sources.setdefault(filename, _cell_source(filename))


def prefers_source(obj: Any) -> bool:
    """Classes whose generated parts (a dataclass's ``__init__`` compares
    with sentinels of ``dataclasses``; an enum's members) do not survive
    pickling by value."""
    return is_user_class(obj) and (
        "__dataclass_fields__" in vars(obj) or isinstance(obj, enum.EnumMeta)
    )


def rebuildable(var: str, obj: Any, ns: dict[str, Any]) -> bool:
    """Whether running the source of ``obj`` defines it as ``var``."""
    return (
        (is_user_function(obj, ns) or is_user_class(obj))
        and obj.__name__ == var
        and "<locals>" not in obj.__qualname__
        and _source_of(obj, ns) is not None
    )


def _defining_file(obj: Any) -> str | None:
    if isinstance(obj, types.FunctionType):
        return str(obj.__code__.co_filename)
    if isinstance(obj, type):
        return class_file(obj)
    return None


#: Sources found so far (``inspect.getsource`` parses the whole cell: a few
#: ms per save otherwise). Keyed by the function or class itself; a function
#: whose ``__code__`` was replaced is looked up again.
_SOURCES: weakref.WeakKeyDictionary[Any, tuple[Any, str]] = weakref.WeakKeyDictionary()


def _source_of(obj: Any, ns: dict[str, Any]) -> str | None:
    if not (is_user_function(obj, ns) or is_user_class(obj)):
        return None
    code = getattr(obj, "__code__", None)
    cached = _SOURCES.get(obj)
    if cached is not None and cached[0] is code:
        return cached[1]
    import inspect

    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError):
        return None
    try:
        _SOURCES[obj] = (code, source)
    except TypeError:  # not weakly referable
        pass
    return source


def _cell_source(filename: str) -> str:
    import linecache

    return "".join(linecache.getlines(filename))


def register_sources(sources: dict[str, str], entries: dict[str, dict[str, Any]]) -> None:
    for filename, text in sources.items():
        register_source(filename, text)
    for entry in entries.values():
        if entry.get("cell") and entry.get("qualname"):
            register_class_cell(entry["qualname"], entry["cell"])
