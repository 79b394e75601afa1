"""Python-level stdout and stderr of the worker.

The worker's file descriptors 1 and 2 are pipes read by the supervisor, which
gives their output to the request running on the worker's main thread. Two
things that the file descriptors cannot tell are done here, in Python:

- Whose output is it? An asyncio task (or other code run in a copied
  ``contextvars`` context) carries the id of the cell that started it in
  :data:`cell_parent`. When such a task writes while another request is the
  running one, its text is sent as an OUTPUT message naming its own cell, so
  the frontend shows it under the cell that started the task (as ipykernel
  does), not under whatever ran last.
- One line, one write: ``print`` writes its text and its ``end`` in separate
  calls, and a supervisor that reads the pipe between the two would split the
  line across two stream messages. :func:`print` joins what it writes to the
  worker's own streams into one write.
"""

from __future__ import annotations

import builtins
import contextvars
import io
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .shell import Outlet

#: Id of the request whose code is running in this context: set by the worker
#: at the start of each cell; asyncio tasks inherit it from the cell that made
#: them.
cell_parent: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "pyrepl3_cell_parent", default=None
)

#: The request the worker's main thread ran last (set with each request):
#: where a thread with no cell of its own writes while no request runs, as
#: ipykernel's global parent does (a thread started by a cell and printing
#: just after that cell ended is still that cell's).
last_request: str | None = None

_builtin_print = builtins.print

#: Set on threads whose writes never go through the pipes (the worker's
#: subshells, see subshells.py): the pipes' output is the main thread's.
_through_socket = threading.local()


def write_through_socket() -> None:
    """What this thread writes for a cell goes over the socket."""
    _through_socket.on = True


def _user_thread() -> bool:
    """A thread of the user's (not the worker's main thread, nor a subshell)."""
    return threading.current_thread() is not threading.main_thread() and not getattr(
        _through_socket, "on", False
    )


def owner(outlet: Outlet) -> str | None:
    """The request whose output this code produces: the cell of its context
    (a task, or a thread given a parent with ``set_thread_parent``), else
    the request the worker is running; for a user's thread while none runs,
    the last one."""
    found = cell_parent.get() or outlet.parent_id
    if found is None and _user_thread():
        found = last_request
    return found


class CellStream(io.TextIOBase):
    """``sys.stdout`` / ``sys.stderr`` of the worker: writes go to the pipe,
    except those of code that belongs to another cell than the running one."""

    def __init__(self, raw: Any, name: str, outlet: Outlet) -> None:
        super().__init__()
        self._raw = raw
        self._name = name
        self._outlet = outlet
        self._master_pid = os.getpid()

    def _is_master_process(self) -> bool:
        """False in a process forked from the worker (ipykernel's OutStream
        has this too; libraries and tests ask it)."""
        return os.getpid() == self._master_pid

    def write(self, text: str) -> int:
        owner = cell_parent.get()
        if owner is None and _user_thread():
            # A thread with no parent of its own: the running request's, or
            # the last one's if none runs (over the socket, named, so a cell
            # that ends meanwhile cannot lose it).
            owner = self._outlet.parent_id or last_request
        # A write for another cell, from a subshell, or from a thread given a
        # parent (``set_thread_parent``) goes over the socket, named: on the
        # pipe it would be the running request's, and a cell ending meanwhile
        # would take a line its thread wrote just before the reply.
        elsewhere = (
            owner != self._outlet.parent_id
            or getattr(_through_socket, "on", False)
            or threading.current_thread() is not threading.main_thread()
        )
        if owner is not None and elsewhere and text:
            if not isinstance(text, str):
                raise TypeError(f"write() argument must be str, not {type(text).__name__}")
            from ..protocol import OutputMessage

            self._raw.flush()
            self._outlet.emit(OutputMessage(stream=self._name, data=text, parent_id=owner))
            return len(text)
        return self._raw.write(text)  # type: ignore[no-any-return]

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()  # type: ignore[no-any-return]

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._raw.encoding  # type: ignore[no-any-return]

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self._raw.errors  # type: ignore[no-any-return]

    @property
    def buffer(self) -> Any:
        return self._raw.buffer

    @property
    def name(self) -> str:
        return f"<{self._name}>"

    @property
    def closed(self) -> bool:
        return bool(self._raw.closed)

    def close(self) -> None:
        # Closing sys.stdout would cut the kernel's output for good; a library
        # that closes what it was given gets a no-op, as with ipykernel.
        pass


def print(  # noqa: A001 - replaces the builtin on purpose
    *args: object,
    sep: str | None = " ",
    end: str | None = "\n",
    file: Any = None,
    flush: bool = False,
) -> None:
    """``builtins.print``, with one write per call on the worker's streams."""
    if file is None:
        file = sys.stdout
    if not isinstance(file, CellStream):
        _builtin_print(*args, sep=sep, end=end, file=file, flush=flush)
        return
    if sep is None:
        sep = " "
    elif not isinstance(sep, str):
        raise TypeError(f"sep must be None or a string, not {type(sep).__name__}")
    if end is None:
        end = "\n"
    elif not isinstance(end, str):
        raise TypeError(f"end must be None or a string, not {type(end).__name__}")
    file.write(sep.join(map(str, args)) + end)
    if flush:
        file.flush()


def install(outlet: Outlet) -> None:
    """Put :class:`CellStream` in front of ``sys.stdout``/``sys.stderr`` and
    the one-write ``print`` in ``builtins``."""
    if not isinstance(sys.stdout, CellStream):
        sys.stdout = CellStream(sys.stdout, "stdout", outlet)
    if not isinstance(sys.stderr, CellStream):
        sys.stderr = CellStream(sys.stderr, "stderr", outlet)
    builtins.print = print
