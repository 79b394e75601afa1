"""Comms (ipywidgets and friends) over the native protocol.

The ``comm`` package's default ``create_comm`` returns a comm that sends
nothing; :func:`install` replaces it with :class:`WorkerComm`, whose messages
go to the client as COMM_OPEN / COMM_MSG / COMM_CLOSE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import comm
from comm.base_comm import BaseComm, CommManager

from .shell import jsonable

if TYPE_CHECKING:
    from .shell import Outlet

_outlet: Outlet | None = None
_manager = CommManager()


class WorkerComm(BaseComm):
    def publish_msg(
        self,
        msg_type: str,
        data: Any = None,
        metadata: Any = None,
        buffers: Any = None,
        **keys: Any,
    ) -> None:
        from ..protocol import CommCloseMessage, CommMsgMessage, CommOpenMessage

        if _outlet is None:
            return
        fields: dict[str, Any] = {
            "comm_id": self.comm_id,
            "data": jsonable(data or {}),
            "metadata": jsonable(metadata or {}),
            "buffers": [bytes(b) for b in buffers or ()],
            "parent_id": _outlet.parent_id,
        }
        if msg_type == "comm_open":
            msg: Any = CommOpenMessage(
                target_name=keys.get("target_name") or "",
                target_module=keys.get("target_module"),
                **fields,
            )
        elif msg_type == "comm_msg":
            msg = CommMsgMessage(**fields)
        elif msg_type == "comm_close":
            msg = CommCloseMessage(**fields)
        else:
            raise ValueError(f"unknown comm message type {msg_type!r}")
        from .subshells import note_sender

        note_sender(self, data)  # its answer goes to this thread's shell
        _outlet.emit(msg)


def _create_comm(*args: Any, **kwargs: Any) -> BaseComm:
    return WorkerComm(*args, **kwargs)


def _get_comm_manager() -> CommManager:
    return _manager


def install(outlet: Outlet) -> CommManager:
    """Route the ``comm`` package through ``outlet``; returns the manager."""
    global _outlet
    _outlet = outlet
    comm.create_comm = _create_comm
    comm.get_comm_manager = _get_comm_manager
    return _manager


def as_jupyter_msg(msg: Any) -> dict[str, Any]:
    """A native comm message in the dict shape comm handlers expect."""
    content: dict[str, Any] = {"comm_id": msg.comm_id, "data": msg.data}
    if hasattr(msg, "target_name"):
        content["target_name"] = msg.target_name
        content["target_module"] = msg.target_module
    return {
        "header": {"msg_id": msg.id, "msg_type": msg.type.value},
        "parent_header": {},
        "metadata": msg.metadata,
        "content": content,
        "buffers": [memoryview(b) for b in msg.buffers],
    }
