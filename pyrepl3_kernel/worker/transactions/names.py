"""The names of the user namespace a cell can reach: what ``full`` snapshots
(IPython's own names are in :mod:`..ipython_names`)."""

from __future__ import annotations

import re
import types
import weakref
from collections.abc import Iterable
from typing import Any

from ..ipython_names import IPYTHON_NAMES, SHELL_NAMES
from .kinds import MISSING

#: Names ``full`` never snapshots through (the shell and its history).
_NOT_SNAPSHOTTED = IPYTHON_NAMES | SHELL_NAMES | {"__builtins__", "__builtin__"}
_IDENTIFIER = re.compile(r"[^\W\d]\w*")


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
        value = ns.get(pending.pop(), MISSING)
        if value is MISSING or isinstance(value, types.ModuleType):
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
