"""The pyrepl3 REST endpoints (``/api/pyrepl3/...``); see docs/openapi.yaml.

All of them go through jupyter_server's authentication and authorization
(resource ``kernels``): a request without a valid token gets 403. Bad JSON
gets 400 with a message, an unknown kernel, execution or checkpoint 404.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from jupyter_server.auth.decorator import authorized
from tornado import web
from tornado.iostream import StreamClosedError

from .bridge import BridgeError, Execution, KernelBridge, KernelGone
from .proxy import ForwardingHandler, forwarded

MAX_EXECUTIONS = 1000


class Registry:
    """The bridges (per kernel) and executions of one server."""

    def __init__(self) -> None:
        self.bridges: dict[str, KernelBridge] = {}
        self.executions: dict[str, Execution] = {}

    def remember(self, execution: Execution) -> None:
        self.executions[execution.id] = execution
        while len(self.executions) > MAX_EXECUTIONS:
            oldest = next(iter(self.executions))
            self.executions.pop(oldest)


class Pyrepl3Handler(ForwardingHandler):
    auth_resource = "kernels"

    @property
    def registry(self) -> Registry:
        return self.settings["pyrepl3_registry"]  # type: ignore[no-any-return]

    def json_body(self) -> dict[str, Any]:
        if not self.request.body:
            return {}
        try:
            body = json.loads(self.request.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise web.HTTPError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise web.HTTPError(400, "the request body must be a JSON object")
        return body

    async def bridge(self, kernel_id: str) -> KernelBridge:
        km = self.kernel_manager
        registry = self.registry
        if kernel_id not in km:
            stale = registry.bridges.pop(kernel_id, None)
            if stale is not None:
                await stale.close()
            raise web.HTTPError(404, f"no kernel with id {kernel_id!r}")
        bridge = registry.bridges.get(kernel_id)
        if bridge is None:
            bridge = registry.bridges[kernel_id] = KernelBridge(kernel_id, km.get_kernel(kernel_id))
        try:
            await bridge.ready()
        except KernelGone as exc:
            registry.bridges.pop(kernel_id, None)
            await bridge.close()
            raise web.HTTPError(503, str(exc)) from None
        return bridge

    def write_json(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(obj, default=str))


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise web.HTTPError(400, f"{name!r} must be a number from {lo:g} to {hi:g}")
    return float(value)


class PoolHandler(Pyrepl3Handler):
    @web.authenticated
    @authorized
    @forwarded
    async def get(self) -> None:
        """The manager daemon: pools and leases (``daemon: null`` if none runs)."""
        from ..daemon.client import DaemonClient, DaemonError, DaemonUnavailable

        client = DaemonClient(timeout=10)
        try:
            status = await asyncio.to_thread(client.call, "status")
        except DaemonUnavailable:
            self.write_json({"daemon": None, "pools": [], "leases": []})
            return
        except DaemonError as exc:
            raise web.HTTPError(502, f"the daemon refused: {exc}") from None
        status.pop("ok", None)
        status.pop("v", None)
        self.write_json(status)


class HealthHandler(Pyrepl3Handler):
    @web.authenticated
    @authorized
    @forwarded
    async def get(self, kernel_id: str) -> None:
        """The kernel's usage_reply: memory, CPU, restarts, last crash, limits."""
        bridge = await self.bridge(kernel_id)
        try:
            usage = await bridge.usage()
        except BridgeError as exc:
            raise web.HTTPError(exc.status, str(exc)) from None
        self.write_json({"kernel_id": kernel_id, **usage})


class ExecuteHandler(Pyrepl3Handler):
    @web.authenticated
    @authorized
    @forwarded
    async def post(self, kernel_id: str) -> None:
        """Run code. JSON: the outputs when done, or ``input_requested``
        (answer at /api/pyrepl3/executions/{id}/input), or ``running`` after
        ``timeout``. With ``Accept: text/event-stream``: server-sent events."""
        body = self.json_body()
        code = body.get("code")
        if not isinstance(code, str):
            raise web.HTTPError(400, "'code' (a string) is required")
        timeout = _number(body, "timeout", 60.0, 0.0, 86400.0)
        allow_stdin = body.get("allow_stdin", True)
        if not isinstance(allow_stdin, bool):
            raise web.HTTPError(400, "'allow_stdin' must be a boolean")
        bridge = await self.bridge(kernel_id)
        execution = await bridge.execute(code, allow_stdin=allow_stdin)
        self.registry.remember(execution)
        if "text/event-stream" in self.request.headers.get("Accept", ""):
            await self._stream(execution)
            return
        await execution.wait(timeout)
        self.write_json(execution.state(), status=200 if execution.status != "running" else 202)

    async def _stream(self, execution: Execution) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        try:
            self.write(f"event: started\ndata: {json.dumps({'execution_id': execution.id})}\n\n")
            await self.flush()
            async for kind, data in execution.events():
                self.write(f"event: {kind}\ndata: {json.dumps(data, default=str)}\n\n")
                await self.flush()
        except StreamClosedError:
            # The client went away: the execution goes on, and its state
            # stays at GET /api/pyrepl3/executions/{id}.
            return
        self.finish()


class ExecutionHandler(Pyrepl3Handler):
    def execution(self, execution_id: str) -> Execution:
        execution = self.registry.executions.get(execution_id)
        if execution is None:
            raise web.HTTPError(404, f"no execution {execution_id!r}")
        return execution

    @web.authenticated
    @authorized
    @forwarded
    async def get(self, execution_id: str) -> None:
        """The execution's state; ``?wait=S`` waits up to S seconds for a change."""
        execution = self.execution(execution_id)
        try:
            wait = float(self.get_argument("wait", "0"))
        except ValueError:
            wait = -1.0
        if not 0 <= wait <= 3600:  # also NaN
            raise web.HTTPError(400, "'wait' must be a number of seconds from 0 to 3600")
        if execution.status == "running" and wait > 0:
            await execution.wait(wait)
        self.write_json(execution.state())


class InputHandler(ExecutionHandler):
    @web.authenticated
    @authorized
    @forwarded
    async def post(self, execution_id: str) -> None:
        """Answer the execution's pending input(); returns its next state."""
        execution = self.execution(execution_id)
        body = self.json_body()
        value = body.get("value")
        if not isinstance(value, str):
            raise web.HTTPError(400, "'value' (a string) is required")
        timeout = _number(body, "timeout", 60.0, 0.0, 86400.0)
        try:
            await execution.answer(value)
        except BridgeError as exc:
            raise web.HTTPError(exc.status, str(exc)) from None
        await execution.wait(timeout)
        self.write_json(execution.state(), status=200 if execution.status != "running" else 202)


_CHECKPOINT_STATUS = {
    "CheckpointError": 404,
    "CheckpointExistsError": 409,
    "ValueError": 400,
    "WorkerDied": 503,
}


class CheckpointBase(Pyrepl3Handler):
    async def call(
        self, kernel_id: str, action: str, name: str = "", **options: Any
    ) -> dict[str, Any]:
        bridge = await self.bridge(kernel_id)
        try:
            reply = await bridge.checkpoint(action, name, **options)
        except BridgeError as exc:
            raise web.HTTPError(exc.status, str(exc)) from None
        if reply.get("status") != "ok":
            ename, evalue = reply.get("ename", ""), reply.get("evalue", "")
            status = _CHECKPOINT_STATUS.get(ename, 500)
            if ename == "CheckpointError" and "no checkpoint named" not in evalue:
                status = 400 if "bad checkpoint name" in evalue else 422
            elif ename == "CheckpointError":
                # The kernel's message names its store, a directory on the
                # server: not for REST clients.
                evalue = f"no checkpoint named {name!r}"
            raise web.HTTPError(status, f"{ename}: {evalue}")
        return reply.get("result") or {}


class CheckpointsHandler(CheckpointBase):
    @web.authenticated
    @authorized
    @forwarded
    async def get(self, kernel_id: str) -> None:
        """The checkpoints in the kernel's store."""
        result = await self.call(kernel_id, "list")
        self.write_json(result)

    @web.authenticated
    @authorized
    @forwarded
    async def post(self, kernel_id: str) -> None:
        """Save the kernel's state as checkpoint ``name``; the per-name report.
        409 if another notebook or kernel saved ``name`` (``"force": true``
        replaces it)."""
        body = self.json_body()
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise web.HTTPError(400, "'name' (a string) is required")
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise web.HTTPError(400, "'force' must be a boolean")
        result = await self.call(kernel_id, "save", name, force=force)
        self.write_json(result, status=201)


class CheckpointHandler(CheckpointBase):
    @web.authenticated
    @authorized
    @forwarded
    async def get(self, kernel_id: str, name: str) -> None:
        """What checkpoint ``name`` holds, name by name."""
        self.write_json(await self.call(kernel_id, "info", name))

    @web.authenticated
    @authorized
    @forwarded
    async def delete(self, kernel_id: str, name: str) -> None:
        await self.call(kernel_id, "delete", name)
        self.set_status(204)
        self.finish()


class RestoreHandler(CheckpointBase):
    @web.authenticated
    @authorized
    @forwarded
    async def post(self, kernel_id: str, name: str) -> None:
        """Restore checkpoint ``name`` into the kernel; the per-name report."""
        body = self.json_body()
        clear = body.get("clear", True)
        if not isinstance(clear, bool):
            raise web.HTTPError(400, "'clear' must be a boolean")
        self.write_json(await self.call(kernel_id, "restore", name, clear=clear))


class StatesHandler(Pyrepl3Handler):
    """The kernel's state history (docs/checkpoints.md, "Time travel")."""

    async def travel(self, kernel_id: str, action: str, **options: Any) -> dict[str, Any]:
        bridge = await self.bridge(kernel_id)
        try:
            reply = await bridge.checkpoint(action, "", **options)
        except BridgeError as exc:
            raise web.HTTPError(exc.status, str(exc)) from None
        if reply.get("status") != "ok":
            ename, evalue = reply.get("ename", ""), reply.get("evalue", "")
            status = _CHECKPOINT_STATUS.get(ename, 500)
            if ename == "CheckpointError":
                # not kept: 404; no history (autosave off): 409; unreadable: 422
                status = 404 if "is not kept" in evalue else 409 if "no state" in evalue else 422
            raise web.HTTPError(status, f"{ename}: {evalue}")
        return reply.get("result") or {}

    @web.authenticated
    @authorized
    @forwarded
    async def get(self, kernel_id: str) -> None:
        """The states kept: one after each successful cell."""
        self.write_json(await self.travel(kernel_id, "states"))


class CheckoutHandler(StatesHandler):
    @web.authenticated
    @authorized
    @forwarded
    async def post(self, kernel_id: str, cell: str) -> None:
        """Put the kernel's namespace back to the state after cell ``cell``."""
        self.write_json(await self.travel(kernel_id, "checkout", cell=int(cell)))
