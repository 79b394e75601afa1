"""The comm target ``pyrepl3.checkpoint``, hosted by the gateway.

A frontend opens a comm with target ``pyrepl3.checkpoint`` and sends
messages ``{"action": "save" | "restore" | "list" | "delete" | "info",
"name": ..., "store": ... (optional), "clear": ... (optional, restore),
"force": ... (optional, save), "request_id": ... (optional, echoed)}``,
or, for the kernel's state history, ``{"action": "states"}``,
``{"action": "checkout", "cell": N}`` and ``{"action": "undo"}``. Each gets
one comm message back:
``{"status": "ok", "action", "name", "request_id", "result": {...}}`` or
``{"status": "error", "action", "name", "request_id", "ename", "evalue"}``.
See docs/checkpoints.md.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..protocol import CheckpointMessage, Message

TARGET = "pyrepl3.checkpoint"
ACTIONS = ("save", "restore", "list", "delete", "info")
#: The state history's actions (no checkpoint name; ``checkout`` takes ``cell``).
TRAVEL_ACTIONS = ("states", "checkout", "undo")

Publish = Callable[[str, dict[str, Any], dict[str, Any]], None]
Request = Callable[[Message], Awaitable[Any]]


class CheckpointComms:
    """The open ``pyrepl3.checkpoint`` comms of one kernel."""

    def __init__(self, request: Request, publish: Publish) -> None:
        self._request = request
        self._publish = publish
        self.comm_ids: set[str] = set()

    def handles(self, msg: dict[str, Any]) -> bool:
        content = msg.get("content") or {}
        if msg["header"].get("msg_type") == "comm_open":
            return content.get("target_name") == TARGET
        return content.get("comm_id") in self.comm_ids

    async def handle(self, msg: dict[str, Any]) -> None:
        msg_type = msg["header"]["msg_type"]
        content = msg.get("content") or {}
        comm_id = str(content.get("comm_id", ""))
        if msg_type == "comm_open":
            self.comm_ids.add(comm_id)
            data = content.get("data") or {}
            if data.get("action"):  # a request may ride on the open itself
                await self._answer(comm_id, data, msg)
        elif msg_type == "comm_close":
            self.comm_ids.discard(comm_id)
        else:
            await self._answer(comm_id, content.get("data") or {}, msg)

    async def _answer(self, comm_id: str, data: dict[str, Any], parent: dict[str, Any]) -> None:
        action = data.get("action")
        name = data.get("name", "")
        reply: dict[str, Any] = {"action": action, "name": name}
        if "request_id" in data:
            reply["request_id"] = data["request_id"]
        store = data.get("store")
        clear = data.get("clear", True)
        force = data.get("force", False)
        cell = data.get("cell")
        if action == "checkout":
            reply["cell"] = cell
        if action not in ACTIONS + TRAVEL_ACTIONS:
            reply.update(
                status="error",
                ename="ValueError",
                evalue=f"action must be one of {', '.join(ACTIONS + TRAVEL_ACTIONS)}",
            )
        elif action == "checkout" and (not isinstance(cell, int) or isinstance(cell, bool)):
            reply.update(
                status="error",
                ename="ValueError",
                evalue="checkout needs 'cell' (an integer: the N of In [N])",
            )
        elif action in TRAVEL_ACTIONS:
            name = str(cell) if action == "checkout" else ""
            await self._forward(reply, CheckpointMessage(action=action, name=name))
        elif not isinstance(name, str) or (action != "list" and not name):
            reply.update(
                status="error",
                ename="ValueError",
                evalue="a checkpoint 'name' (string) is required",
            )
        elif store is not None and not isinstance(store, str):
            reply.update(status="error", ename="ValueError", evalue="'store' must be a string")
        elif not isinstance(force, bool):
            reply.update(status="error", ename="ValueError", evalue="'force' must be a boolean")
        else:
            await self._forward(
                reply,
                CheckpointMessage(
                    action=action, name=name, store=store, clear=bool(clear), force=force
                ),
            )
        self._publish("comm_msg", {"comm_id": comm_id, "data": reply}, parent)

    async def _forward(self, reply: dict[str, Any], request: CheckpointMessage) -> None:
        """Send ``request`` to the worker; its outcome goes into ``reply``."""
        try:
            native = await self._request(request)
        except Exception as exc:
            reply.update(status="error", ename=type(exc).__name__, evalue=str(exc))
            return
        if getattr(native, "status", "error") == "ok":
            reply.update(status="ok", result=native.result)
        else:
            reply.update(
                status="error",
                ename=getattr(native, "ename", "") or "KernelError",
                evalue=getattr(native, "evalue", "") or getattr(native, "detail", ""),
            )
