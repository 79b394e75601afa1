"""Native protocol messages -> Jupyter message (type, content) pairs.

Pure functions; the gateway sends what they return.
"""

from __future__ import annotations

from typing import Any

from .._version import __version__
from ..language import language_info
from ..protocol import Message, MessageType

JUPYTER_PROTOCOL_VERSION = "5.4"


HELP_LINKS = [
    {"text": "Python Reference", "url": "https://docs.python.org/3/"},
    {"text": "IPython Reference", "url": "https://ipython.readthedocs.io/en/stable/"},
    {"text": "PyREPL3 Kernel", "url": "https://pypi.org/project/pyrepl3-kernel/"},
]


def kernel_info_content(ready: Any | None) -> dict[str, Any]:
    """kernel_info_reply content; advertises only what this kernel does."""
    return {
        "status": "ok",
        "protocol_version": JUPYTER_PROTOCOL_VERSION,
        "implementation": "pyrepl3",
        "implementation_version": __version__,
        "language_info": dict(ready.language_info) if ready is not None else language_info(),
        "banner": ready.banner if ready is not None else "",
        "help_links": HELP_LINKS,
        "debugger": False,
        "supported_features": [],
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
