"""The user's variables, as a checkpoint sees the namespace."""

from __future__ import annotations

import types
from typing import Any

from ..ipython_names import SHELL_NAMES, is_ipython_name


def user_names(shell: Any) -> list[str]:
    """The user's variables, in the order a restore needs: modules, classes,
    functions, then everything else (each group in namespace order)."""
    hidden = shell.user_ns_hidden
    names = [
        n
        for n in shell.user_ns
        if not n.startswith("__")
        and not is_ipython_name(n)
        and n not in SHELL_NAMES
        and (n not in hidden or shell.user_ns[n] is not hidden[n])
    ]

    def rank(name: str) -> int:
        obj = shell.user_ns[name]
        if isinstance(obj, types.ModuleType):
            return 0
        if isinstance(obj, type):
            return 1
        if callable(obj) and isinstance(obj, types.FunctionType):
            return 2
        return 3

    return sorted(names, key=rank)
