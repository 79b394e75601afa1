"""The IPython shell of the worker and its hooks into the native protocol.

Rich output (display, update_display, clear_output, execute results, errors)
and payloads (pager, set_next_input, exit) become protocol messages, sent
through ``shell.outlet``, the :class:`Outlet` the worker installs.
"""

from __future__ import annotations

import base64
import math
import os
import threading
from types import CodeType
from typing import TYPE_CHECKING, Any, Protocol

from IPython.core import page
from IPython.core.displayhook import DisplayHook
from IPython.core.displaypub import DisplayPublisher
from IPython.core.interactiveshell import InteractiveShell, InteractiveShellABC
from traitlets import Any as AnyTrait
from traitlets import Type

if TYPE_CHECKING:
    from ..protocol import Message


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _kernel_code(code: CodeType) -> bool:
    """Code the kernel runs on a cell's behalf: the worker's (print, its
    streams) and IPython's capture of stream output for its history."""
    if code.co_filename.startswith(_PACKAGE_DIR):
        return True
    from IPython.core import interactiveshell

    return code.co_name == "write" and code.co_filename == interactiveshell.__file__


class Outlet(Protocol):
    """Where the shell's messages go; implemented by the worker."""

    def emit(self, msg: Message) -> None: ...

    @property
    def parent_id(self) -> str | None: ...


def jsonable(obj: Any, depth: int = 0) -> Any:
    """``obj`` made of the types every codec carries (as ipykernel's
    ``json_clean`` does for Jupyter): tuples become lists, keys strings,
    numpy scalars numbers, non-finite floats ``None``, anything else its repr."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if depth > 64:
        return repr(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v, depth + 1) for v in obj]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    item = getattr(obj, "item", None)  # numpy scalars
    if callable(item):
        try:
            return jsonable(item(), depth + 1)
        except Exception:
            pass
    return repr(obj)


def mime_bundle(data: dict[str, Any]) -> dict[str, Any]:
    """A display's data with binary values base64-encoded, as Jupyter wants."""
    return {str(k): jsonable(v) for k, v in data.items()}


class WorkerDisplayPublisher(DisplayPublisher):
    """``display()``, ``update_display()`` and ``clear_output()``."""

    def publish(  # type: ignore[override]
        self,
        data: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        source: Any = None,
        *,
        transient: dict[str, Any] | None = None,
        update: bool = False,
        **kwargs: Any,
    ) -> None:
        from ..protocol import DisplayMessage
        from .output import owner

        self._validate_data(data, metadata)
        outlet: Outlet = self.shell.outlet  # type: ignore[union-attr]
        outlet.emit(
            DisplayMessage(
                data=mime_bundle(data),
                metadata=jsonable(metadata or {}),
                transient=jsonable(transient or {}),
                update=update,
                parent_id=owner(outlet),
            )
        )

    def clear_output(self, wait: bool = False) -> None:
        from ..protocol import ClearOutputMessage
        from .output import owner

        outlet: Outlet = self.shell.outlet  # type: ignore[union-attr]
        outlet.emit(ClearOutputMessage(wait=wait, parent_id=owner(outlet)))


#: What a cell's shell thread (the main one, or a subshell's) knows of its
#: own cell: the shell is shared, the cells run at the same time.
_cell_state = threading.local()


class WorkerDisplayHook(DisplayHook):
    """The value of a cell's last expression becomes a RESULT message."""

    _bundle: tuple[dict[str, Any], dict[str, Any]] | None = None

    @property
    def in_progress(self) -> bool:
        """Between start_displayhook and finish_displayhook on this thread: a
        traceback shown meanwhile is a formatter's error (see
        ZMQInteractiveShell.displayhook_error)."""
        return bool(getattr(_cell_state, "displayhook_in_progress", False))

    @in_progress.setter
    def in_progress(self, value: bool) -> None:
        _cell_state.displayhook_in_progress = value

    def start_displayhook(self) -> None:
        self._bundle = None
        self.in_progress = True

    def write_output_prompt(self) -> None:
        pass

    def write_format_data(self, format_dict: dict[str, Any], md_dict: Any = None) -> None:
        self._bundle = (format_dict, md_dict or {})

    def finish_displayhook(self) -> None:
        from ..protocol import ResultMessage

        self.in_progress = False
        bundle, self._bundle = self._bundle, None
        if not bundle or not bundle[0]:
            return
        outlet: Outlet = self.shell.outlet  # type: ignore[union-attr]
        outlet.emit(
            ResultMessage(
                execution_count=self.prompt_count,
                data=mime_bundle(bundle[0]),
                metadata=jsonable(bundle[1]),
                parent_id=outlet.parent_id,
            )
        )


class KernelShim:
    """What libraries look up as ``get_ipython().kernel`` (ipywidgets'
    Output widget reads the parent message id from it)."""

    def __init__(self, outlet: Outlet) -> None:
        self._outlet = outlet

    @property
    def comm_manager(self) -> Any:
        """The worker's comm manager: the Jupyter docs (and libraries written
        for ipykernel) register comm targets with
        ``get_ipython().kernel.comm_manager.register_target(...)``."""
        import comm

        return comm.get_comm_manager()

    def get_parent(self, channel: str = "shell") -> dict[str, Any]:
        return self._parent_header

    @property
    def _parent_header(self) -> dict[str, Any]:
        from .output import owner

        return parent_header(owner(self._outlet))


def parent_header(msg_id: str | None) -> dict[str, Any]:
    """What ipykernel's ``get_parent()`` returns, as far as the worker knows
    it: the request's id (the Jupyter msg_id) and type."""
    return {"header": {"msg_id": msg_id, "msg_type": "execute_request"}} if msg_id else {}


def parent_id_of(parent: Any) -> str | None:
    """The msg_id of a parent given as ipykernel takes it (a message, a
    header dict, or a :func:`parent_header`)."""
    if not isinstance(parent, dict) or not parent:
        return None
    header = parent.get("header", parent)
    msg_id = header.get("msg_id") if isinstance(header, dict) else None
    return str(msg_id) if msg_id else None


# Libraries (tqdm.auto, plotly, rich, ...) decide "this is a Jupyter kernel" by
# the shell's class name, so the worker's shell carries ipykernel's name.
class ZMQInteractiveShell(InteractiveShell):
    """IPython's InteractiveShell wired to the native protocol."""

    displayhook_class = Type(WorkerDisplayHook)
    display_pub_class = Type(WorkerDisplayPublisher)
    outlet = AnyTrait()
    kernel = AnyTrait()

    @property
    def _last_traceback(self) -> list[str] | None:
        """The traceback this thread's cell showed last (its reply's)."""
        return getattr(_cell_state, "last_traceback", None)  # type: ignore[no-any-return]

    @_last_traceback.setter
    def _last_traceback(self, value: list[str] | None) -> None:
        _cell_state.last_traceback = value

    @property
    def displayhook_error(self) -> tuple[str, str] | None:
        """(ename, evalue) of an error raised while this thread's cell's
        result was being formatted (a ``__repr__`` that raises): the cell's
        reply is an error."""
        return getattr(_cell_state, "displayhook_error", None)  # type: ignore[no-any-return]

    @displayhook_error.setter
    def displayhook_error(self, value: tuple[str, str] | None) -> None:
        _cell_state.displayhook_error = value

    #: Code of the worker's own functions that can be the innermost frames of
    #: a user's traceback (the SIGINT handler that raises KeyboardInterrupt).
    #: They are cut off: a user sees the cell's frames, as with ipykernel,
    #: whose handler is C, and ``%debug`` starts in the cell.
    hidden_codes: frozenset[CodeType] = frozenset()

    # ipykernel's parent API: which cell a thread's output belongs to. A
    # thread (or task) that sets a parent sends its output to that cell.

    def get_parent(self) -> dict[str, Any]:
        from .output import owner

        return parent_header(owner(self.outlet))

    def set_parent(self, parent: Any) -> None:
        from .output import cell_parent

        cell_parent.set(parent_id_of(parent))

    def set_thread_parent(self, parent: Any) -> Any:
        """Set the parent for the calling thread; returns a token for
        :meth:`reset_thread_parent`."""
        from .output import cell_parent

        return cell_parent.set(parent_id_of(parent))

    def reset_thread_parent(self, token: Any) -> None:
        from .output import cell_parent

        cell_parent.reset(token)

    def init_hooks(self) -> None:
        super().init_hooks()
        self.set_hook("show_in_pager", page.as_hook(self._page_payload), 99)

    def init_environment(self) -> None:
        import os

        os.environ.update({"PAGER": "cat", "GIT_PAGER": "cat"})

    def enable_gui(self, gui: Any = None) -> None:
        # Only the inline backend is meaningful in a kernel; it needs no loop.
        if gui not in (None, "inline"):
            print(f"Warning: GUI event loop {gui!r} is not supported in this kernel.")

    def _page_payload(
        self, strg: Any, start: int = 0, screen_lines: int = 0, pager_cmd: Any = None
    ) -> None:
        data = strg if isinstance(strg, dict) else {"text/plain": strg}
        self.payload_manager.write_payload({"source": "page", "data": data, "start": max(0, start)})  # type: ignore[union-attr]

    def set_next_input(self, text: str, replace: bool = False) -> None:
        self.payload_manager.write_payload(  # type: ignore[union-attr]
            {"source": "set_next_input", "text": text, "replace": replace}
        )

    def ask_exit(self) -> None:
        self.payload_manager.write_payload({"source": "ask_exit", "keepkernel": False})  # type: ignore[union-attr]

    def _get_exc_info(self, exc_tuple: Any = None) -> tuple[Any, Any, Any]:
        etype, value, tb = super()._get_exc_info(exc_tuple)
        # An interrupt lands wherever the main thread is: inside the worker's
        # own code that runs on behalf of the cell (print, the streams), the
        # innermost frames are the worker's, never the user's concern, and so
        # is what that code calls (threading, contextvars, ...): the chain
        # ends above the first frame of the kernel's code under the cell.
        interrupt = isinstance(etype, type) and issubclass(etype, KeyboardInterrupt)
        # In place: the same chain is the exception's __traceback__ (which
        # IPython formats again for its history) and sys.last_traceback.
        last_shown = None
        node = tb
        while node is not None:
            code = node.tb_frame.f_code
            if interrupt and _kernel_code(code):
                if last_shown is not None:
                    break
            elif code not in self.hidden_codes:
                last_shown = node
            node = node.tb_next
        if last_shown is not None:
            last_shown.tb_next = None
        return etype, value, tb

    def _showtraceback(self, etype: Any, evalue: Any, stb: list[str]) -> None:
        from ..protocol import ErrorMessage

        self._last_traceback = stb
        ename = getattr(etype, "__name__", str(etype))
        if getattr(self.displayhook, "in_progress", False):
            self.displayhook_error = (ename, str(evalue))
        outlet: Outlet = self.outlet
        outlet.emit(
            ErrorMessage(
                ename=ename,
                evalue=str(evalue),
                traceback=[str(line) for line in stb],
                parent_id=outlet.parent_id,
            )
        )


InteractiveShellABC.register(ZMQInteractiveShell)
