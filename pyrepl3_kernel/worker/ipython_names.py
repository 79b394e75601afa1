"""The names IPython keeps in the user namespace by itself: a failing cell's
rollback leaves them alone, and a checkpoint does not save them."""

from __future__ import annotations

import re

#: Names IPython (and Python's warnings) rebind by themselves: ``_``, ``In``,
#: ``Out`` and the like; also every ``_N`` and ``_iN`` (:func:`is_ipython_name`).
IPYTHON_NAMES = frozenset(
    {
        *("_", "__", "___", "_i", "_ii", "_iii", "_ih", "_oh", "_dh", "In", "Out"),
        *("_exit_code", "__warningregistry__"),
    }
)
#: The shell's own functions in the namespace: not the user's variables.
SHELL_NAMES = frozenset({"get_ipython", "exit", "quit"})
_NUMBERED = re.compile(r"_i?\d+\Z")


def is_ipython_name(name: object) -> bool:
    return isinstance(name, str) and (name in IPYTHON_NAMES or _NUMBERED.match(name) is not None)
