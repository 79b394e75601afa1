"""Jupyter messaging <-> the native protocol, both ways.

Pure functions, no sockets: Jupyter requests (their content, as a client
sent it) become native requests, and native messages become Jupyter
(msg_type, content) pairs the gateway sends.
"""

from __future__ import annotations

from typing import Any

from .._version import __version__
from ..language import language_info
from ..protocol import (
    CommCloseMessage,
    CommMsgMessage,
    CommOpenMessage,
    CompleteMessage,
    ExecuteMessage,
    HistoryMessage,
    InspectMessage,
    Message,
    MessageType,
)

JupyterMsg = dict[str, Any]

JUPYTER_PROTOCOL_VERSION = "5.4"


HELP_LINKS = [
    {"text": "Python Reference", "url": "https://docs.python.org/3/"},
    {"text": "IPython Reference", "url": "https://ipython.readthedocs.io/en/stable/"},
    {"text": "PyREPL3 Kernel", "url": "https://pypi.org/project/pyrepl3-kernel/"},
]


# -- Jupyter requests -> native requests ---------------------------------------------


def execute_request(msg: JupyterMsg, native_id: str) -> ExecuteMessage:
    """The native cell of an execute_request (defaults as the messaging
    specification gives them: ``store_history`` follows ``silent``)."""
    content = msg["content"]
    silent = bool(content.get("silent", False))
    return ExecuteMessage(
        id=native_id,
        code=content.get("code", ""),
        silent=silent,
        store_history=bool(content.get("store_history", not silent)),
        user_expressions=content.get("user_expressions") or {},
        allow_stdin=bool(content.get("allow_stdin", True)),
        cell_id=(msg.get("metadata") or {}).get("cellId"),
    )


def complete_request(content: dict[str, Any]) -> CompleteMessage:
    return CompleteMessage(code=content.get("code", ""), cursor_pos=content.get("cursor_pos"))


def inspect_request(content: dict[str, Any]) -> InspectMessage:
    return InspectMessage(
        code=content.get("code", ""),
        cursor_pos=content.get("cursor_pos"),
        detail_level=int(content.get("detail_level") or 0),
    )


def history_request(content: dict[str, Any]) -> HistoryMessage:
    c = content
    return HistoryMessage(
        hist_access_type=str(c.get("hist_access_type", "tail")),
        output=bool(c.get("output", False)),
        raw=bool(c.get("raw", True)),
        session=int(c.get("session") or 0),
        start=int(c.get("start") or 0),
        stop=c.get("stop") if isinstance(c.get("stop"), int) else None,
        n=c.get("n") if isinstance(c.get("n"), int) else None,
        pattern=str(c.get("pattern") or "*"),
        unique=bool(c.get("unique", False)),
    )


def comm_message(msg: JupyterMsg) -> Message:
    """comm_open / comm_msg / comm_close from the client, with its buffers."""
    c = msg["content"]
    fields: dict[str, Any] = {
        "comm_id": str(c.get("comm_id", "")),
        "data": c.get("data") or {},
        "metadata": msg.get("metadata") or {},
        "buffers": [bytes(b) for b in msg.get("buffers") or []],
    }
    msg_type = msg["header"]["msg_type"]
    if msg_type == "comm_open":
        return CommOpenMessage(
            target_name=str(c.get("target_name", "")),
            target_module=c.get("target_module"),
            **fields,
        )
    if msg_type == "comm_msg":
        return CommMsgMessage(**fields)
    return CommCloseMessage(**fields)


# -- native -> Jupyter ---------------------------------------------------------------


def kernel_info_content(ready: Any | None) -> dict[str, Any]:
    """kernel_info_reply content; advertises only what this kernel does."""
    # The debugger where the worker has debugpy (it says so in its READY).
    debugger = "debugger" in (getattr(ready, "capabilities", None) or [])
    return {
        "status": "ok",
        "protocol_version": JUPYTER_PROTOCOL_VERSION,
        "implementation": "pyrepl3",
        "implementation_version": __version__,
        "language_info": dict(ready.language_info) if ready is not None else language_info(),
        "banner": ready.banner if ready is not None else "",
        "help_links": HELP_LINKS,
        "debugger": debugger,
        "supported_features": ["debugger"] if debugger else [],
    }


def iopub_for(msg: Message) -> tuple[str, dict[str, Any], dict[str, Any], list[bytes]] | None:
    """The iopub (msg_type, content, metadata, buffers) for a native message
    the worker sent, or ``None`` if it has no iopub form."""
    t = msg.type
    m: Any = msg
    if t == MessageType.OUTPUT:
        return "stream", {"name": m.stream, "text": m.data}, {}, []
    if t == MessageType.DISPLAY:
        content = {"data": m.data, "metadata": m.metadata, "transient": m.transient}
        return ("update_display_data" if m.update else "display_data"), content, {}, []
    if t == MessageType.RESULT:
        content = {"execution_count": m.execution_count, "data": m.data, "metadata": m.metadata}
        return "execute_result", content, {}, []
    if t == MessageType.ERROR:
        return "error", {"ename": m.ename, "evalue": m.evalue, "traceback": m.traceback}, {}, []
    if t == MessageType.CLEAR_OUTPUT:
        return "clear_output", {"wait": m.wait}, {}, []
    if t == MessageType.COMM_OPEN:
        content = {"comm_id": m.comm_id, "target_name": m.target_name, "data": m.data}
        if m.target_module:
            content["target_module"] = m.target_module
        return "comm_open", content, m.metadata, m.buffers
    if t in (MessageType.COMM_MSG, MessageType.COMM_CLOSE):
        return t.value, {"comm_id": m.comm_id, "data": m.data}, m.metadata, m.buffers
    return None


def reply_content(reply: Message) -> dict[str, Any]:
    """A native reply's fields as the Jupyter reply's content (complete,
    inspect, history and comm_info replies carry the same fields)."""
    return {k: v for k, v in reply.__dict__.items() if k not in ("id", "timestamp", "parent_id")}


def is_complete_content(status: str, indent: str | int | None = None) -> dict[str, Any]:
    content: dict[str, Any] = {"status": status}
    if status == "incomplete":
        content["indent"] = indent if isinstance(indent, str) else " " * (indent or 0)
    return content


def execute_reply_content(reply: Any) -> dict[str, Any]:
    content: dict[str, Any] = {"status": reply.status, "execution_count": reply.execution_count}
    if reply.status == "ok":
        content["user_expressions"] = reply.user_expressions
        content["payload"] = reply.payload
    elif reply.status == "error":
        content.update(
            ename=reply.ename,
            evalue=reply.evalue,
            traceback=reply.traceback,
            user_expressions={},
            payload=reply.payload,
        )
    return content


def error_reply_content(ename: str, evalue: str) -> dict[str, Any]:
    return {
        "status": "error",
        "ename": ename,
        "evalue": evalue,
        "traceback": [f"{ename}: {evalue}"],
    }
