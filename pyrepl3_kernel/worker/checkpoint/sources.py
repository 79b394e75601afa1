"""Source tracking: ``inspect.getsource`` for functions and classes defined
in cells, also after a restore into a fresh worker.

IPython keeps each cell's source in ``linecache`` under a name such as
``<ipython-input-3-1a2b3c>``, which is enough for functions (their code knows
the name) but not for classes: ``inspect`` looks for a class's file through
its module, and ``__main__`` has none. This module remembers which cell
defined each class and teaches ``inspect.getfile`` to answer with it; a
restore puts the saved cell sources back into ``linecache``.
"""

from __future__ import annotations

import inspect
import linecache
import re
from typing import Any

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


def note_cell(execution_count: int, user_ns: dict[str, Any]) -> None:
    """After a cell ran: remember the cell of each class it defined."""
    prefix = f"<ipython-input-{execution_count}-"
    filenames = [k for k in linecache.cache if isinstance(k, str) and k.startswith(prefix)]
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
        if count is not None:
            note_cell(count, shell.user_ns)

    shell.events.register("post_run_cell", post_run_cell)
