"""The JupyterLab debugger in the worker: debugpy and the kernel's part of
the Debug Adapter Protocol, as ipykernel 7 does it (``ipykernel/debugger.py``).

debugpy runs in the worker (``debugpy.listen`` starts its adapter process);
the worker is the adapter's DAP client (:mod:`.dap`). Requests arrive as
DEBUG_REQUEST messages and are served on a thread of their own, never queued
behind the running cell: while the main thread is stopped at a breakpoint,
stackTrace, variables, evaluate, continue are answered. The kernel answers
some requests itself (``debugInfo``, ``dumpCell``, ``source``,
``configurationDone``, ``inspectVariables``, ``richInspectVariables``,
``copyToGlobals``, ``modules``) and forwards the rest; adapter events become
DEBUG_EVENT messages.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import os
import queue
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..protocol import DebugEventMessage, DebugReplyMessage, DebugRequestMessage, Message
from . import cellnames
from .dap import DapClient, DapError, hide_from_debugger
from .variables import VariableExplorer, import_debugpy_server

log = logging.getLogger("pyrepl3.worker")

#: Commands the kernel answers without the adapter, started or not.
STATIC_COMMANDS = frozenset(
    {"debugInfo", "inspectVariables", "richInspectVariables", "modules", "copyToGlobals"}
)
#: Commands that need a started debugger; everything else is forwarded.
STARTED_COMMANDS = frozenset(
    {"dumpCell", "setBreakpoints", "source", "stackTrace", "variables", "attach",
     "configurationDone"}
)  # fmt: skip
#: Names the variables panel leaves out (ipykernel's list).
HIDDEN_VARIABLES = frozenset(
    {"__name__", "__doc__", "__package__", "__loader__", "__spec__", "__annotations__",
     "__builtins__", "__builtin__", "__display__", "get_ipython", "debugpy", "exit", "quit",
     "In", "Out", "_oh", "_dh", "_", "__", "___"}
)  # fmt: skip
#: Threads that are never reported as stopped.
IGNORED_THREADS = frozenset({"IPythonHistorySavingThread"})


def available() -> bool:
    """Whether debugpy can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec("debugpy") is not None
    except (ImportError, ValueError):
        return False


def accept_variable(name: str) -> bool:
    return not (name in HIDDEN_VARIABLES or re.match(r"^_\d", name) is not None or name[:2] == "_i")


def response(request: dict[str, Any], success: bool = True, **fields: Any) -> dict[str, Any]:
    return {
        "seq": request.get("seq", 0),
        "type": "response",
        "request_seq": request.get("seq", 0),
        "success": success,
        "command": request.get("command", ""),
        **fields,
    }


class Debugger:
    """The worker's debugger; ``send`` puts a message on the protocol
    socket (from any thread)."""

    def __init__(self, shell: Any, send: Callable[[Message], None]) -> None:
        self.shell = shell
        self._send = send
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        #: The worker's own modules: stepping never enters them.
        self.kernel_modules = [
            m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)
        ]
        self.is_started = False
        self.breakpoints: dict[str, list[dict[str, Any]]] = {}
        self.stopped_threads: set[int] = set()
        self._address: tuple[str, int] | None = None
        self._client: DapClient | None = None
        self._initialized = threading.Event()
        self._removed_cleanup: dict[int, Any] = {}
        self._explorer: Any = None
        #: debugpy is importable: the worker offers the debugger and compiles
        #: cells under the names the frontend computes for breakpoints.
        self.available = available()
        if self.available:
            cellnames.install(shell)
        #: Why the debugger cannot start in this process (see _after_fork).
        self._unavailable: str | None = None
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        """In a process forked from the worker (a forked kernel, the automatic
        checkpoint): the debugger's threads did not come along and its
        connection is the parent's; start from nothing. debugpy runs once per
        process, so where the parent had started it, this process cannot."""
        self._queue = queue.SimpleQueue()
        self._thread = None
        self._initialized = threading.Event()
        client, self._client = self._client, None
        if client is not None:
            client.abandon()
        self.is_started = False
        self.breakpoints = {}
        self.stopped_threads = set()
        self._explorer = None
        self._restore_transforms()
        if self._address is not None:
            self._unavailable = (
                "the debugger cannot start in a kernel forked from one where it ran "
                "(debugpy runs once per process); restart the kernel to debug"
            )

    @property
    def capabilities(self) -> list[str]:
        """What the worker's READY adds to its capabilities."""
        return ["debugger"] if self.available else []

    # -- requests (called on the I/O thread; served on the debugger's) ---------------

    def submit(self, msg: Message) -> None:
        """Serve the DEBUG_REQUEST ``msg`` (its reply is sent when done)."""
        assert isinstance(msg, DebugRequestMessage)
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._serve, name="pyrepl3-debugger", daemon=True
            )
            hide_from_debugger(self._thread)
            self._thread.start()
        self._queue.put(("request", msg))

    def _serve(self) -> None:
        while True:
            kind, item = self._queue.get()
            if kind == "stopped":
                self._announce_stopped(item)
                continue
            request = item.content
            try:
                reply = self.handle(request)
            except Exception as exc:
                log.exception("debug request %s failed", request.get("command"))
                reply = response(request, False, message=f"{type(exc).__name__}: {exc}")
            self._send(DebugReplyMessage(parent_id=item.id, content=reply))

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """The DAP response to ``request`` (a dict as the frontend sent it)."""
        command = request.get("command")
        if not isinstance(command, str):
            return response(request, False, message="a debug request needs a 'command'")
        if not self.available:
            return response(
                request, False, message="debugpy is not installed in the kernel's environment"
            )
        if command == "initialize" and self._unavailable is not None:
            return response(request, False, message=self._unavailable)
        if command == "initialize" and not self.is_started:
            try:
                self.start()
            except Exception as exc:
                log.exception("could not start debugpy")
                return response(request, False, message=f"could not start debugpy: {exc}")
        if command in STATIC_COMMANDS:
            reply = getattr(self, command)(request)
        elif command == "disconnect" and not self.is_started:
            return response(request)  # nothing to end: as good as done
        elif not self.is_started:
            return response(request, False, message="the debugger is not started")
        elif command == "disconnect":
            # Never terminate the debuggee (the worker: the kernel itself);
            # debugpy's adapter would end with it and no later attach works.
            request.setdefault("arguments", {})["terminateDebuggee"] = False
            reply = self._forward(request)
        elif command in STARTED_COMMANDS:
            reply = getattr(self, command)(request)
        else:
            reply = self._forward(request)
        if command == "continue" and reply.get("success"):
            # debugpy sends no 'continued' event for the frontend's own
            # continue: the threads it resumed are no longer stopped.
            body = reply.get("body") or {}
            if body.get("allThreadsContinued", True):
                self.stopped_threads = set()
            else:
                self.stopped_threads.discard((request.get("arguments") or {}).get("threadId"))
        if command == "disconnect":
            self.stop()
        return reply  # type: ignore[no-any-return]

    def _forward(self, request: dict[str, Any]) -> dict[str, Any]:
        client = self._client
        if client is None or client.closed:
            return response(request, False, message="the debug adapter is not connected")
        try:
            return client.request(request)
        except DapError as exc:
            return response(request, False, message=str(exc))

    # -- start and stop --------------------------------------------------------------------

    def start(self) -> None:
        """Start debugpy (once per process) and connect to its adapter."""
        if self._address is None:
            cellnames.reap_stale_directories()
            Path(cellnames.cell_directory()).mkdir(mode=0o700, parents=True, exist_ok=True)
            import_debugpy_server()
            import debugpy

            # The automatic checkpoint forks the worker: that child must not
            # join the debug session.
            debugpy.configure(subProcess=False)
            for thread in threading.enumerate():
                if thread.name.startswith("pyrepl3-"):
                    hide_from_debugger(thread)
            host, port = debugpy.listen(("127.0.0.1", 0))
            self._address = (str(host), int(port))
            os.register_at_fork(after_in_child=_untrace)
        # Leading empty lines stay, so a breakpoint's line is the cell's line.
        from IPython.core.inputtransformer2 import leading_empty_lines

        transforms = self.shell.input_transformer_manager.cleanup_transforms
        if leading_empty_lines in transforms:
            index = transforms.index(leading_empty_lines)
            self._removed_cleanup[index] = transforms.pop(index)
        self._initialized.clear()
        self._client = DapClient(self._address, self._on_event)
        self.is_started = True

    def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
        self._restore_transforms()
        self.breakpoints = {}
        self.stopped_threads = set()
        self.is_started = False

    def _restore_transforms(self) -> None:
        transforms = self.shell.input_transformer_manager.cleanup_transforms
        for index in sorted(self._removed_cleanup):
            transforms.insert(index, self._removed_cleanup.pop(index))

    # -- events (on the DAP reader thread) ---------------------------------------------------

    def _on_event(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        body = event.get("body") or {}
        if name == "initialized":
            self._initialized.set()
        elif name == "stopped":
            if body.get("allThreadsStopped"):
                # Which threads stopped needs a request: the debugger's
                # thread asks, then tells (the reader must keep reading).
                self._queue.put(("stopped", event))
                return
            self.stopped_threads.add(int(body.get("threadId", 0)))
        elif name == "continued":
            if body.get("allThreadsContinued"):
                self.stopped_threads = set()
            else:
                self.stopped_threads.discard(body.get("threadId"))
        self._emit(event)

    def _announce_stopped(self, event: dict[str, Any]) -> None:
        client = self._client
        if client is not None:
            try:
                reply = client.request({"type": "request", "command": "threads"})
            except DapError:
                reply = {}
            for thread in (reply.get("body") or {}).get("threads", []):
                if thread.get("name") not in IGNORED_THREADS:
                    self.stopped_threads.add(thread["id"])
        self._emit(event)

    def _emit(self, event: dict[str, Any]) -> None:
        self._send(DebugEventMessage(content=event))

    # -- commands the kernel answers or shapes ------------------------------------------------

    def attach(self, request: dict[str, Any]) -> dict[str, Any]:
        client = self._client
        if client is None:
            return response(request, False, message="the debug adapter is not connected")
        assert self._address is not None
        args = request.setdefault("arguments", {})
        args["connect"] = {"host": self._address[0], "port": self._address[1]}
        args.setdefault("subProcess", False)
        if not args.get("justMyCode", True):
            args["debugOptions"] = ["DebugStdLib"]
        args["rules"] = [{"path": path, "include": False} for path in self.kernel_modules]
        # The adapter answers attach only after configurationDone, which it
        # waits for after its 'initialized' event: the kernel sends it (the
        # frontend's own configurationDone is answered by the kernel).
        try:
            sent = client.send(request)
            if self._initialized.wait(30):
                client.request({"type": "request", "command": "configurationDone"})
            return client.wait(request, sent)
        except DapError as exc:
            return response(request, False, message=str(exc))

    def configurationDone(self, request: dict[str, Any]) -> dict[str, Any]:
        return response(request)

    def debugInfo(self, request: dict[str, Any]) -> dict[str, Any]:
        return response(
            request,
            body={
                "isStarted": self.is_started,
                "hashMethod": cellnames.HASH_METHOD,
                "hashSeed": cellnames.HASH_SEED,
                "tmpFilePrefix": cellnames.prefix(),
                "tmpFileSuffix": cellnames.SUFFIX,
                "breakpoints": [
                    {"source": source, "breakpoints": lines}
                    for source, lines in self.breakpoints.items()
                ],
                "stoppedThreads": sorted(self.stopped_threads),
                "richRendering": True,
                "exceptionPaths": ["Python Exceptions"],
                "copyToGlobals": True,
            },
        )

    def dumpCell(self, request: dict[str, Any]) -> dict[str, Any]:
        code = str((request.get("arguments") or {}).get("code", ""))
        file_name = cellnames.cell_file_name(code)
        Path(file_name).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(file_name, "w", encoding="utf-8") as f:
            f.write(code)
        return response(request, body={"sourcePath": file_name})

    def setBreakpoints(self, request: dict[str, Any]) -> dict[str, Any]:
        args = request.get("arguments") or {}
        source = str((args.get("source") or {}).get("path", ""))
        self.breakpoints[source] = list(args.get("breakpoints") or [])
        reply = self._forward(request)
        # debugpy may move a breakpoint to another line: keep where it is.
        if reply.get("success"):
            self.breakpoints[source] = [
                {"line": bp["line"]} for bp in (reply.get("body") or {}).get("breakpoints", [])
            ]
        return reply

    def source(self, request: dict[str, Any]) -> dict[str, Any]:
        path = Path(str(((request.get("arguments") or {}).get("source") or {}).get("path", "")))
        if path.is_file():
            return response(request, body={"content": path.read_text(encoding="utf-8")})
        return response(request, False, message="source unavailable", body={})

    def stackTrace(self, request: dict[str, Any]) -> dict[str, Any]:
        reply = self._forward(request)
        body = reply.get("body") or {}
        frames = body.get("stackFrames")
        if isinstance(frames, list):
            # The worker's own frames under the cell (its request loop) are
            # not the user's: the call stack ends at the cell, as with an
            # installed ipykernel, whose frames debugpy counts as library code.
            shown = [f for f in frames if not _kernel_frame(f)]
            body["totalFrames"] = max(
                0, int(body.get("totalFrames", len(frames))) - (len(frames) - len(shown))
            )
            body["stackFrames"] = shown
        return reply

    def variables(self, request: dict[str, Any]) -> dict[str, Any]:
        if not self.stopped_threads:
            ref = (request.get("arguments") or {}).get("variablesReference")
            return self._variables_response(request, self._explorer_for().children(ref))
        reply = self._forward(request)
        body = reply.get("body") or {}
        if "variables" in body:
            body["variables"] = [v for v in body["variables"] if accept_variable(v["name"])]
        return reply

    def inspectVariables(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._explorer is not None:
            self._explorer.untrack_all()
        # untrack_all spoils the tracker: a new one each time, as ipykernel.
        self._explorer = VariableExplorer(self.shell)
        return self._variables_response(request, self._explorer.children(None))

    def _explorer_for(self) -> VariableExplorer:
        if self._explorer is None:
            self._explorer = VariableExplorer(self.shell)
        return self._explorer  # type: ignore[no-any-return]

    @staticmethod
    def _variables_response(request: dict[str, Any], variables: list[Any]) -> dict[str, Any]:
        shown = [v for v in variables if accept_variable(v["name"])]
        return response(request, body={"variables": shown})

    def richInspectVariables(self, request: dict[str, Any]) -> dict[str, Any]:
        args = request.get("arguments") or {}
        name = str(args.get("variableName", ""))
        if not name.isidentifier():
            success = name in ("special variables", "function variables")
            return response(request, success, body={"data": {}, "metadata": {}})
        data: dict[str, Any] = {}
        metadata: dict[str, Any] = {}
        if not self.stopped_threads:
            result = self.shell.user_expressions({name: name})[name]
            if result.get("status", "error") == "ok":
                data, metadata = result.get("data", {}), result.get("metadata", {})
        else:
            # Stopped: the variable lives in a frame; only the adapter sees it.
            reply = self._forward(
                {
                    "type": "request",
                    "command": "evaluate",
                    "seq": request.get("seq", 0),
                    "arguments": {
                        "expression": f"get_ipython().display_formatter.format({name})",
                        "frameId": args.get("frameId"),
                        "context": "clipboard",
                    },
                }
            )
            if reply.get("success"):
                try:
                    data, metadata = ast.literal_eval(reply["body"]["result"])
                except (ValueError, SyntaxError, KeyError, TypeError):
                    pass
        body = {"data": data, "metadata": {k: v for k, v in metadata.items() if k in data}}
        return response(request, body=body)

    def copyToGlobals(self, request: dict[str, Any]) -> dict[str, Any]:
        args = request.get("arguments") or {}
        dst = str(args.get("dstVariableName", ""))
        src = str(args.get("srcVariableName", ""))
        if not (dst.isidentifier() and src.isidentifier()):
            return response(
                request,
                False,
                message="dstVariableName and srcVariableName must be valid identifiers",
            )
        if not self.is_started:
            return response(request, False, message="the debugger is not started")
        return self._forward(
            {
                "type": "request",
                "command": "setExpression",
                "seq": request.get("seq", 0),
                "arguments": {
                    "expression": f"globals()['{dst}']",
                    "value": src,
                    "frameId": args.get("srcFrameId"),
                },
            }
        )

    def modules(self, request: dict[str, Any]) -> dict[str, Any]:
        args = request.get("arguments") or {}
        modules = list(sys.modules.copy().values())
        start = int(args.get("startModule", 0) or 0)
        count = int(args.get("moduleCount", 0) or len(modules))
        found = []
        for i, module in enumerate(modules[start : start + count], start):
            origin = getattr(getattr(module, "__spec__", None), "origin", None)
            if origin and origin.endswith(".py"):
                found.append({"id": i, "name": module.__name__, "path": origin})
        return response(request, body={"modules": found, "totalModules": len(modules)})


_PACKAGE_DIR = str(Path(__file__).resolve().parent.parent) + os.sep


def _kernel_frame(frame: Any) -> bool:
    path = str(((frame or {}).get("source") or {}).get("path") or "")
    return path.startswith(_PACKAGE_DIR)


#: The interpreter's own (pydevd replaces sys.settrace with one that warns).
_settrace = sys.settrace


def _untrace() -> None:
    """In a process forked from the worker (the automatic checkpoint): no
    tracing, so it never stops at a breakpoint or talks to the adapter."""
    _settrace(None)
    threading.settrace(None)  # type: ignore[arg-type]
