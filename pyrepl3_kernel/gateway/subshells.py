"""Kernel subshells (JEP 91) on the Jupyter side of the gateway.

The control channel's ``create_subshell_request``, ``list_subshell_request``
and ``delete_subshell_request`` (and an ``interrupt_request`` whose header
names a subshell) are answered here, from the session's subshells
(session/subshells.py). A shell message whose header carries a
``subshell_id`` goes to that subshell's own queue: one queue and one task per
subshell, so its requests are answered in order, each with its own busy and
idle, while the main shell's queue and the other subshells' go on. The
replies and contents are ipykernel 7's: an unknown id gets an error reply
(ename ``UnknownSubshellError``, evalue ``Unknown subshell_id '<id>'``), a
list reply gives the ids under ``subshell_id``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ..session.subshells import SessionSubshells, UnknownSubshellError, unknown_subshell_text
from ..session.worker import WorkerDeadError
from ..tasks import BackgroundTasks

if TYPE_CHECKING:
    from .kernel import JupyterGateway

log = logging.getLogger("pyrepl3.gateway")

JupyterMsg = dict[str, Any]

#: Answered by the gateway at once whatever the header says.
AT_ONCE = frozenset({"is_complete_request"})
#: Delivered at once to a subshell that runs a cell (it may await one).
COMM_MESSAGES = frozenset({"comm_open", "comm_msg", "comm_close"})
#: The feature kernel_info_reply announces (as ipykernel 7).
FEATURE = "kernel subshells"


def subshell_of(msg: JupyterMsg) -> str | None:
    """The subshell a message's header names, or None (the main shell)."""
    value = msg.get("header", {}).get("subshell_id")
    return value if isinstance(value, str) and value else None


class GatewaySubshells:
    """The per-subshell shell queues and the subshell control requests of
    one :class:`~.kernel.JupyterGateway`."""

    def __init__(self, gateway: JupyterGateway) -> None:
        self._gateway = gateway
        #: Per subshell: what waits for it (None: the subshell was deleted).
        self._queues: dict[str, asyncio.Queue[tuple[list[bytes], JupyterMsg] | None]] = {}
        self._tasks = BackgroundTasks(log)

    @property
    def _subshells(self) -> SessionSubshells:
        return self._gateway.session.subshells

    async def stop(self) -> None:
        await self._tasks.cancel()
        self._queues.clear()

    # -- shell ------------------------------------------------------------------------

    def submit(self, idents: list[bytes], msg: JupyterMsg) -> bool:
        """Queue a shell message for its subshell; False for the main shell's."""
        subshell_id = subshell_of(msg)
        if subshell_id is None or msg["header"].get("msg_type") in AT_ONCE:
            return False
        if subshell_id not in self._subshells:
            self._close(subshell_id)  # one a restart of the kernel forgot
            self._unknown(idents, msg, subshell_id)
            return True
        msg_type = msg["header"].get("msg_type")
        if msg_type in COMM_MESSAGES and self._subshells.running_in(subshell_id) is not None:
            # As on the main shell: no busy/idle, the running cell's status stands.
            self._tasks.spawn(self._gateway._comm(idents, msg, concurrent=True))
            return True
        queue = self._queues.get(subshell_id)
        if queue is None:
            queue = self._queues[subshell_id] = asyncio.Queue()
            self._tasks.spawn(self._serve(subshell_id, queue))
        queue.put_nowait((idents, msg))
        return True

    async def _serve(self, subshell_id: str, queue: asyncio.Queue[Any]) -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            idents, msg = item
            if subshell_id not in self._subshells:  # deleted meanwhile
                self._unknown(idents, msg, subshell_id)
                continue
            try:
                await self._handle(idents, msg)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("error handling %s", msg["header"].get("msg_type"))

    async def _handle(self, idents: list[bytes], msg: JupyterMsg) -> None:
        gateway = self._gateway
        gateway._publish_status("busy", msg)
        try:
            handler = gateway._shell_handlers.get(msg["header"].get("msg_type", ""))
            if handler is None:
                gateway._reply_unknown("shell", idents, msg)
            else:
                await handler(gateway, idents, msg)
        finally:
            gateway._publish_status("idle", msg)

    def abort_queued(self, msg: JupyterMsg) -> bool:
        """After a failed cell on a subshell: answer the cells queued on the
        same subshell ``aborted`` (the others' queues go on). False for a
        main-shell cell."""
        subshell_id = subshell_of(msg)
        if subshell_id is None:
            return False
        queue = self._queues.get(subshell_id)
        if queue is None:
            return True
        keep: list[Any] = []
        while not queue.empty():
            item = queue.get_nowait()
            if item is None or item[1]["header"].get("msg_type") != "execute_request":
                keep.append(item)
            else:
                self._abort(*item)
        for item in keep:
            queue.put_nowait(item)
        return True

    def _abort(self, idents: list[bytes], msg: JupyterMsg) -> None:
        gateway = self._gateway
        gateway._publish_status("busy", msg)
        gateway._reply(
            "shell",
            idents,
            msg,
            "execute_reply",
            {"status": "aborted", "execution_count": gateway.session.execution_count},
            metadata={"status": "aborted", "engine": gateway.kernel_id},
        )
        gateway._publish_status("idle", msg)

    def _unknown(self, idents: list[bytes], msg: JupyterMsg, subshell_id: str) -> None:
        """ipykernel's answer to a message for a subshell that is not there:
        busy, an error reply (for a request), idle."""
        gateway = self._gateway
        msg_type = msg["header"].get("msg_type", "")
        gateway._publish_status("busy", msg)
        if msg_type.endswith("_request"):
            content = {
                "status": "error",
                "ename": UnknownSubshellError.__name__,
                "evalue": unknown_subshell_text(subshell_id),
                "traceback": [],
            }
            reply_type = msg_type[: -len("_request")] + "_reply"
            gateway._reply("shell", idents, msg, reply_type, content, metadata={"status": "error"})
        gateway._publish_status("idle", msg)

    # -- control ----------------------------------------------------------------------------

    async def control(self, idents: list[bytes], msg: JupyterMsg) -> bool:
        """Answer a subshell control request; False for any other."""
        msg_type = msg["header"].get("msg_type", "")
        target = subshell_of(msg)
        if msg_type == "interrupt_request" and target is not None:
            await self._subshells.interrupt(target)
            self._gateway._reply("control", idents, msg, "interrupt_reply", {"status": "ok"})
            return True
        if msg_type == "create_subshell_request":
            content = await self._create()
        elif msg_type == "list_subshell_request":
            content = {"status": "ok", "subshell_id": self._subshells.ids()}
        elif msg_type == "delete_subshell_request":
            content = await self._delete(msg.get("content") or {})
        else:
            return False
        reply_type = msg_type[: -len("_request")] + "_reply"
        self._gateway._reply("control", idents, msg, reply_type, content)
        return True

    async def _create(self) -> dict[str, Any]:
        try:
            subshell_id = await self._subshells.create()
        except (WorkerDeadError, RuntimeError) as exc:
            return _error(type(exc).__name__, str(exc))
        return {"status": "ok", "subshell_id": subshell_id}

    async def _delete(self, content: dict[str, Any]) -> dict[str, Any]:
        subshell_id = content.get("subshell_id")
        if not isinstance(subshell_id, str):
            return _error("ValueError", "delete_subshell_request needs a subshell_id (a string)")
        try:
            await self._subshells.delete(subshell_id)
        except UnknownSubshellError as exc:
            return _error(type(exc).__name__, str(exc))
        self._close(subshell_id)
        return {"status": "ok"}

    def _close(self, subshell_id: str) -> None:
        """The queue of a subshell that is gone: what still waits in it is
        answered as for an unknown subshell; its task ends after what it
        handles now."""
        queue = self._queues.pop(subshell_id, None)
        if queue is not None:
            while not queue.empty():
                item = queue.get_nowait()
                if item is not None:
                    self._unknown(*item, subshell_id)
            queue.put_nowait(None)


def _error(ename: str, evalue: str) -> dict[str, Any]:
    return {"status": "error", "ename": ename, "evalue": evalue, "traceback": []}
