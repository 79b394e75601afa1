"""One jupyter_client connection per kernel, shared by the REST endpoints.

A :class:`KernelBridge` holds an :class:`AsyncKernelClient` for a kernel of
the server's kernel manager, reads its channels in the background and routes
every message to the request that caused it (by parent msg_id). Executions,
checkpoint requests and health queries of any number of HTTP requests share
it. Before the first request it waits until the kernel's iopub reaches it
(a kernel_info reply plus an iopub message), so no output is lost to the
subscription race.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from .. import zmqsend
from ..errors import Pyrepl3Error

CHECKPOINT_TARGET = "pyrepl3.checkpoint"


class KernelGone(Pyrepl3Error):
    """The kernel was shut down or does not answer."""


class BridgeError(Pyrepl3Error):
    """A request to the kernel failed; ``status`` is the HTTP status to use."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def output_of(msg: dict[str, Any]) -> dict[str, Any] | None:
    """An iopub message as an nbformat output, or None if it is not one."""
    kind, content = msg["msg_type"], msg["content"]
    if kind == "stream":
        return {"output_type": "stream", "name": content["name"], "text": content["text"]}
    if kind in ("display_data", "update_display_data"):
        out = {
            "output_type": kind,
            "data": content["data"],
            "metadata": content.get("metadata", {}),
        }
        transient = content.get("transient") or {}
        if transient:
            out["transient"] = transient
        return out
    if kind == "execute_result":
        return {
            "output_type": "execute_result",
            "execution_count": content.get("execution_count"),
            "data": content["data"],
            "metadata": content.get("metadata", {}),
        }
    if kind == "error":
        return {
            "output_type": "error",
            "ename": content["ename"],
            "evalue": content["evalue"],
            "traceback": content["traceback"],
        }
    if kind == "clear_output":
        return {"output_type": "clear_output", "wait": content.get("wait", False)}
    return None


class Execution:
    """One REST execution: its outputs so far, its state, and its events."""

    def __init__(self, bridge: KernelBridge, code: str, allow_stdin: bool) -> None:
        self.id = uuid.uuid4().hex
        self.bridge = bridge
        self.kernel_id = bridge.kernel_id
        self.code = code
        self.allow_stdin = allow_stdin
        self.outputs: list[dict[str, Any]] = []
        self.status = "running"  # running | input_requested | ok | error | aborted
        self.execution_count: int | None = None
        self.error: dict[str, Any] | None = None
        self.input_request: dict[str, Any] | None = None
        self.created = time.time()
        self.finished = asyncio.Event()
        #: iopub said ``idle`` for this execution: all its output is in.
        self.idle = asyncio.Event()
        self._changed = asyncio.Condition()
        self._events: list[tuple[str, dict[str, Any]]] = []
        self.msg_id = ""

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "execution_id": self.id,
            "kernel_id": self.kernel_id,
            "status": self.status,
            "execution_count": self.execution_count,
            "outputs": self.outputs,
        }
        if self.error:
            state["error"] = self.error
        if self.input_request:
            state["input_request"] = self.input_request
        return state

    async def _event(self, kind: str, data: dict[str, Any]) -> None:
        async with self._changed:
            self._events.append((kind, data))
            self._changed.notify_all()

    async def events(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Every event from the start: ``output``, ``input_request``, ``done``."""
        seen = 0
        while True:
            async with self._changed:
                while len(self._events) <= seen:
                    await self._changed.wait()
                batch = self._events[seen:]
                seen = len(self._events)
            for kind, data in batch:
                yield kind, data
                if kind == "done":
                    return

    async def wait(self, timeout: float) -> None:
        """Until done, waiting for input, or ``timeout`` seconds."""
        async with self._changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.status != "running"), timeout
                )

    async def answer(self, value: str) -> None:
        if self.status != "input_requested":
            raise BridgeError(
                409, f"execution {self.id} is not waiting for input (status {self.status})"
            )
        self.status = "running"
        self.input_request = None
        self.bridge.send("stdin", self.bridge.client.session.msg("input_reply", {"value": value}))

    async def on_iopub(self, msg: dict[str, Any]) -> None:
        out = output_of(msg)
        if out is None:
            return
        last = self.outputs[-1] if self.outputs else None
        if (
            out["output_type"] == "stream"
            and last is not None
            and last["output_type"] == "stream"
            and last["name"] == out["name"]
        ):
            # As in a notebook: consecutive writes to one stream are one
            # output (print() alone writes twice). Events stay per message.
            last["text"] += out["text"]
        else:
            self.outputs.append(dict(out))
        if out["output_type"] == "error":
            self.error = {k: out[k] for k in ("ename", "evalue", "traceback")}
        await self._event("output", out)

    async def on_input_request(self, msg: dict[str, Any]) -> None:
        content = msg["content"]
        self.input_request = {
            "prompt": content.get("prompt", ""),
            "password": bool(content.get("password")),
        }
        async with self._changed:
            self.status = "input_requested"
            self._events.append(("input_request", {"execution_id": self.id, **self.input_request}))
            self._changed.notify_all()

    async def on_reply(self, msg: dict[str, Any]) -> None:
        content = msg["content"]
        self.execution_count = content.get("execution_count")
        if content.get("status") == "error" and self.error is None:
            self.error = {k: content.get(k) for k in ("ename", "evalue", "traceback")}
        async with self._changed:
            self.status = content.get("status", "error")
            self.input_request = None
            self._events.append(("done", {k: v for k, v in self.state().items() if k != "outputs"}))
            self._changed.notify_all()
        self.finished.set()


class KernelBridge:
    """A shared client of one kernel."""

    def __init__(self, kernel_id: str, km: Any) -> None:
        self.kernel_id = kernel_id
        self.km = km
        self.client: Any = km.client()
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._executions: dict[str, Execution] = {}  # by msg_id
        self._iopub_waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._comm_replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._checkpoint_comm: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ready: asyncio.Task[None] | None = None
        self.kernel_info: dict[str, Any] = {}

    async def ready(self) -> None:
        if self._ready is None:
            self._ready = asyncio.ensure_future(self._connect())
        await asyncio.shield(self._ready)

    async def _connect(self) -> None:
        self.client.start_channels()
        for name, channel in (
            ("iopub", self.client.iopub_channel),
            ("shell", self.client.shell_channel),
            ("stdin", self.client.stdin_channel),
            ("control", self.client.control_channel),
        ):
            self._tasks.append(asyncio.ensure_future(self._read(name, channel)))
        deadline = time.monotonic() + 30
        while True:
            info = self.client.session.msg("kernel_info_request", {})
            msg_id = info["header"]["msg_id"]
            self.send("shell", info)
            seen = self._watch_iopub(msg_id)
            try:
                reply = await asyncio.wait_for(self._expect(msg_id), 5)
                await asyncio.wait_for(asyncio.shield(seen), 0.5)
            except asyncio.TimeoutError:
                if time.monotonic() > deadline:
                    raise KernelGone(f"kernel {self.kernel_id} does not answer") from None
                continue
            finally:
                self._iopub_waiters.pop(msg_id, None)
            self.kernel_info = reply["content"]
            return

    def send(self, channel: str, msg: dict[str, Any]) -> None:
        """Send on one of the client's channels (not with the channel's own
        ``send``: see :mod:`pyrepl3_kernel.zmqsend`)."""
        socket = getattr(self.client, f"{channel}_channel").socket
        zmqsend.send(self.client.session, socket, msg)

    def _watch_iopub(self, msg_id: str) -> asyncio.Future[dict[str, Any]]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._iopub_waiters[msg_id] = future
        return future

    def _expect(self, msg_id: str) -> asyncio.Future[dict[str, Any]]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        return future

    async def _read(self, name: str, channel: Any) -> None:
        while True:
            try:
                msg = await channel.get_msg()
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.05)
                continue
            parent = (msg.get("parent_header") or {}).get("msg_id", "")
            if name == "iopub":
                waiter = self._iopub_waiters.pop(parent, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(msg)
                execution = self._executions.get(parent)
                if execution is not None:
                    if (
                        msg["msg_type"] == "status"
                        and msg["content"].get("execution_state") == "idle"
                    ):
                        execution.idle.set()
                    await execution.on_iopub(msg)
                if msg["msg_type"] == "comm_msg":
                    data = msg["content"].get("data") or {}
                    future = self._comm_replies.pop(str(data.get("request_id", "")), None)
                    if future is not None and not future.done():
                        future.set_result(data)
            elif name == "stdin":
                execution = self._executions.get(parent)
                if execution is not None and msg["msg_type"] == "input_request":
                    await execution.on_input_request(msg)
            else:
                execution = self._executions.get(parent)
                if execution is not None and msg["msg_type"] == "execute_reply":
                    self._spawn_finish(execution, msg, parent)
                future = self._pending.pop(parent, None)
                if future is not None and not future.done():
                    future.set_result(msg)

    def _spawn_finish(self, execution: Execution, msg: dict[str, Any], parent: str) -> None:
        # The reply travels on shell and can overtake the last iopub
        # messages: the execution ends when iopub says idle too.
        async def finish() -> None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(execution.idle.wait(), 5)
            self._executions.pop(parent, None)
            await execution.on_reply(msg)

        task = asyncio.ensure_future(finish())
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def execute(self, code: str, allow_stdin: bool = True) -> Execution:
        await self.ready()
        execution = Execution(self, code, allow_stdin)
        msg = self.client.session.msg(
            "execute_request",
            {
                "code": code,
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": allow_stdin,
                "stop_on_error": True,
            },
        )
        execution.msg_id = msg["header"]["msg_id"]
        self._executions[execution.msg_id] = execution
        self.send("shell", msg)
        return execution

    async def usage(self) -> dict[str, Any]:
        await self.ready()
        msg = self.client.session.msg("usage_request", {})
        future = self._expect(msg["header"]["msg_id"])
        self.send("control", msg)
        try:
            reply = await asyncio.wait_for(future, 10)
        except asyncio.TimeoutError:
            raise BridgeError(504, "the kernel did not answer usage_request within 10 s") from None
        return dict(reply["content"])

    async def checkpoint(self, action: str, name: str = "", **options: Any) -> dict[str, Any]:
        await self.ready()
        if self.kernel_info.get("implementation") != "pyrepl3":
            raise BridgeError(409, "this kernel is not a pyrepl3 kernel: it has no checkpoints")
        if self._checkpoint_comm is None:
            self._checkpoint_comm = uuid.uuid4().hex
            open_msg = self.client.session.msg(
                "comm_open",
                {"comm_id": self._checkpoint_comm, "target_name": CHECKPOINT_TARGET, "data": {}},
            )
            self.send("shell", open_msg)
        request_id = uuid.uuid4().hex
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._comm_replies[request_id] = future
        data = {"action": action, "name": name, "request_id": request_id, **options}
        msg = self.client.session.msg("comm_msg", {"comm_id": self._checkpoint_comm, "data": data})
        self.send("shell", msg)
        try:
            return await asyncio.wait_for(future, 120)
        except asyncio.TimeoutError:
            self._comm_replies.pop(request_id, None)
            raise BridgeError(504, f"checkpoint {action} did not finish within 120 s") from None

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for future in [*self._pending.values(), *self._comm_replies.values()]:
            if not future.done():
                future.set_exception(KernelGone(f"kernel {self.kernel_id} is gone"))
        with contextlib.suppress(Exception):
            self.client.stop_channels()
