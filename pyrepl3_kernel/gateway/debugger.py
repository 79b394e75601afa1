"""The gateway's part of the JupyterLab debugger: a relay.

A ``debug_request`` on the control channel becomes a native DEBUG_REQUEST,
its DEBUG_REPLY the ``debug_reply``; the worker's DEBUG_EVENTs become iopub
``debug_event``s. The worker serves debug requests on a thread of its own, so
a request is answered while a cell runs or is stopped at a breakpoint, and the
gateway never waits on one in a way that holds up its other channels (each
control request is a task of its own).

When the worker dies while the debugger is on (stopped at a breakpoint or
not), the frontend is told the debug session ended (``continued`` for a
thread that was stopped, then ``terminated`` and ``exited``), so its
debugger panel resets; the next ``initialize`` and
``attach`` start a session in the new worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from ..protocol import DebugEventMessage, DebugRequestMessage, MessageType
from ..session.worker import WorkerDeadError

log = logging.getLogger("pyrepl3.gateway")

JupyterMsg = dict[str, Any]
#: ``publish(msg_type, content, parent)``: an iopub message.
Publish = Callable[[str, dict[str, Any], JupyterMsg], None]


def error_response(request: dict[str, Any], message: str) -> dict[str, Any]:
    """A DAP response saying ``request`` failed."""
    return {
        "seq": request.get("seq", 0),
        "type": "response",
        "request_seq": request.get("seq", 0),
        "success": False,
        "command": request.get("command", ""),
        "message": message,
    }


def event(name: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"seq": 0, "type": "event", "event": name, "body": body or {}}


class DebugRelay:
    """Relays one kernel's debug requests and events; ``request`` sends a
    native request to the session's worker and returns its reply."""

    def __init__(self, request: Callable[[Any], Any], publish: Publish) -> None:
        self._request = request
        self._publish = publish
        #: A debug session is on in the worker (from a successful initialize
        #: to disconnect): a death then ends it for the frontend.
        self.active = False
        self._last_parent: JupyterMsg = {}
        self._lock = asyncio.Lock()
        #: The thread the last 'stopped' event named, until 'continued'.
        self._stopped_thread: Any = None

    def turn(self, msg: JupyterMsg) -> contextlib.AbstractAsyncContextManager[Any]:
        """What a control request holds while it is handled: debug requests
        are handled one at a time, in arrival order (the adapter's answers
        depend on the order: setBreakpoints before configurationDone), each
        with its busy and idle before the next one's."""
        if msg["header"].get("msg_type") == "debug_request":
            return self._lock
        return contextlib.nullcontext()

    async def handle(self, msg: JupyterMsg) -> dict[str, Any]:
        """The ``debug_reply`` content for the ``debug_request`` ``msg``."""
        content = msg.get("content")
        if not isinstance(content, dict) or not isinstance(content.get("command"), str):
            return error_response(
                content if isinstance(content, dict) else {},
                "a debug_request's content must be a DAP request with a 'command'",
            )
        command = content["command"]
        self._last_parent = msg
        try:
            reply: Any = await self._request(DebugRequestMessage(content=content))
        except WorkerDeadError as exc:
            self.worker_died(exc.cause)
            return error_response(content, f"the kernel's worker is not running ({exc.cause})")
        if reply.type != MessageType.DEBUG_REPLY:
            detail = getattr(reply, "detail", "") or "no reply from the worker"
            if getattr(reply, "code", "") == "worker_died":
                self.worker_died(detail)
            return error_response(content, detail)
        result: dict[str, Any] = dict(reply.content)
        if command in ("initialize", "attach") and result.get("success"):
            self.active = True
        elif command == "disconnect":
            self.active = False
            self._stopped_thread = None
        elif command == "continue" and result.get("success"):
            self._stopped_thread = None  # debugpy sends no 'continued' for it
        return result

    def on_event(self, msg: DebugEventMessage, parent: JupyterMsg) -> None:
        """A DEBUG_EVENT from the worker, published with ``parent`` (the
        request it happened in, as ipykernel stamps its debug events)."""
        content = dict(msg.content)
        name = content.get("event")
        if name == "stopped":
            self._stopped_thread = (content.get("body") or {}).get("threadId", 1)
        elif name == "continued":
            self._stopped_thread = None
        self._publish("debug_event", content, parent or self._last_parent)

    def worker_died(self, cause: str) -> None:
        """The worker is gone: end the frontend's debug session, if one is on."""
        if not self.active:
            return
        self.active = False
        log.warning("the worker died while the debugger was on (%s)", cause)
        parent = self._last_parent
        if self._stopped_thread is not None:
            # The stopped thread is gone: the frontend clears its call stack
            # and the stopped line (a 'terminated' alone leaves them shown).
            body = {"threadId": self._stopped_thread, "allThreadsContinued": True}
            self._publish("debug_event", event("continued", body), parent)
            self._stopped_thread = None
        self._publish("debug_event", event("terminated", {"restart": False}), parent)
        self._publish("debug_event", event("exited", {"exitCode": 1}), parent)


def debugpy_importable(python: str | None = None) -> bool:
    """Whether debugpy can be imported by ``python`` (default: this
    interpreter; a bare name such as ``python`` in a reference kernelspec
    means this environment's), where the kernel's workers run: the
    kernelspec's ``metadata.debugger`` says so."""
    import importlib.util
    import os
    import subprocess
    import sys

    if (
        python is None
        or os.sep not in python
        or os.path.realpath(python) == os.path.realpath(sys.executable)
    ):
        return importlib.util.find_spec("debugpy") is not None
    check = "import importlib.util, sys; sys.exit(importlib.util.find_spec('debugpy') is None)"
    try:
        return subprocess.run([python, "-c", check], timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
