"""The pyrepl3 REST endpoints (``/api/pyrepl3/...``); see docs/openapi.yaml.

All of them go through jupyter_server's authentication and authorization
(resource ``kernels``): a request without a valid token gets 403. Bad JSON
gets 400 with a message, an unknown kernel, execution or checkpoint 404.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.services.kernels.handlers import MainKernelHandler
from jupyter_server.services.kernels.websocket import KernelWebsocketHandler
from jupyter_server.utils import ensure_async
from tornado import web
from tornado.iostream import StreamClosedError

from .bridge import BridgeError, Execution, KernelBridge, KernelGone

KERNEL_ID = r"(?P<kernel_id>[\w-]+)"
NAME = r"(?P<name>[A-Za-z0-9_.\-]+)"
EXECUTION_ID = r"(?P<execution_id>[0-9a-f]{32})"
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


#: How long a request forwarded to the gateway may take (the gateway bounds
#: each request itself: ``timeout``, ``wait``).
FORWARD_TIMEOUT = 86400.0 + 60


def forwarded(method: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """On a server whose kernels run on a gateway (``--gateway-url``), send
    the request on to the gateway's own ``/api/pyrepl3`` endpoint (with the
    GatewayClient's credentials) and relay its answer, streamed; otherwise
    run ``method``. Goes under ``@authorized``: this server's auth comes first."""

    @functools.wraps(method)
    async def wrapper(self: Pyrepl3Handler, *args: Any, **kwargs: Any) -> None:
        gateway = getattr(self.serverapp, "gateway_config", None)
        if gateway is not None and gateway.gateway_enabled:
            await self.forward(gateway)
        else:
            await method(self, *args, **kwargs)

    return wrapper


class Pyrepl3Handler(APIHandler):
    auth_resource = "kernels"

    async def forward(self, gateway: Any) -> None:
        from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

        path = self.request.path[len(self.base_url.rstrip("/")) :]
        url = gateway.url.rstrip("/") + path
        if self.request.query:
            url += "?" + self.request.query
        options = dict(gateway.load_connection_args())
        headers = dict(options.pop("headers", None) or {})
        for name in ("Content-Type", "Accept"):
            if name in self.request.headers:
                headers[name] = self.request.headers[name]
        options.update(request_timeout=FORWARD_TIMEOUT, headers=headers)

        def on_header(line: str) -> None:
            if line.startswith("HTTP/"):
                self.set_status(int(line.split()[1]))
            elif ":" in line:
                name, value = (part.strip() for part in line.split(":", 1))
                if name.lower() in ("content-type", "cache-control", "x-accel-buffering"):
                    self.set_header(name, value)

        def on_chunk(chunk: bytes) -> None:
            self.write(chunk)
            # Relayed as it comes (server-sent events); a client gone away
            # shows here as a failed flush, which is of no consequence.
            self.flush().add_done_callback(lambda f: f.exception())

        request = HTTPRequest(
            url,
            method=self.request.method or "GET",
            body=self.request.body if self.request.method in ("POST", "PUT", "PATCH") else None,
            header_callback=on_header,
            streaming_callback=on_chunk,
            **options,
        )
        try:
            response = await AsyncHTTPClient().fetch(request, raise_error=False)
        except (HTTPClientError, OSError) as exc:
            raise web.HTTPError(502, f"the gateway {gateway.url} did not answer: {exc}") from None
        if response.code == 599:  # no HTTP answer (timeout, connection lost)
            raise web.HTTPError(502, f"the gateway {gateway.url} did not answer: {response.error}")
        self.finish()

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
        from ..gateway.daemon_client import DaemonClient, DaemonError, DaemonUnavailable

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


class StartKernelHandler(MainKernelHandler):  # type: ignore[misc]
    """``POST /api/kernels`` that also honours ``env`` (``KERNEL_*`` variables,
    ``KERNEL_WORKING_DIR``), as jupyter_server's GatewayClient sends them."""

    @web.authenticated
    @authorized
    async def post(self) -> None:
        km = self.kernel_manager
        model = self.get_json_body() or {}
        if not isinstance(model, dict):
            raise web.HTTPError(400, "the request body must be a JSON object")
        name = model.get("name") or km.default_kernel_name
        env = model.get("env") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise web.HTTPError(400, "'env' must map strings to strings")
        kernel_env = {
            k: v for k, v in env.items() if k.startswith("KERNEL_") or k == "JPY_SESSION_NAME"
        }
        kwargs: dict[str, Any] = {
            "kernel_name": name,
            "path": model.get("path"),
            "kernel_id": model.get("kernel_id"),
        }
        if kernel_env:
            kwargs["env"] = {**os.environ, **kernel_env}
            workdir = kernel_env.get("KERNEL_WORKING_DIR")
            if workdir and model.get("path") is None:
                if not os.path.isdir(workdir):
                    raise web.HTTPError(400, f"KERNEL_WORKING_DIR {workdir!r} is not a directory")
                kwargs["cwd"] = workdir
        from jupyter_client.kernelspec import NoSuchKernel

        # Look the spec up first: a start that fails inside jupyter_client
        # leaves its kernel id pending for ever, and the server's shutdown
        # (POST /api/shutdown, Ctrl-C) then fails on it.
        try:
            await ensure_async(self.kernel_spec_manager.get_kernel_spec(name))
        except KeyError:  # NoSuchKernel; a KeyError from a gateway's spec manager
            raise web.HTTPError(404, f"no kernel named {name!r}") from None
        try:
            kernel_id: str = await km.start_kernel(**kwargs)
        except NoSuchKernel:
            _forget_failed_starts(km)
            raise web.HTTPError(404, f"no kernel named {name!r}") from None
        except Exception:
            _forget_failed_starts(km)
            raise
        model = await ensure_async(km.kernel_model(kernel_id))
        self.set_header("Location", f"{self.base_url.rstrip('/')}/api/kernels/{kernel_id}")
        self.set_status(201)
        self.finish(json.dumps(model, default=str))


def _forget_failed_starts(km: Any) -> None:
    """Drop the pending entries of kernel starts that failed (jupyter_client
    keeps them, and ``shutdown_all`` then raises on their ids)."""
    pending = getattr(km, "_pending_kernels", None)
    kernels = getattr(km, "_kernels", {})
    if not isinstance(pending, dict):
        return
    for kernel_id, task in list(pending.items()):
        if task.done() and kernel_id not in kernels:
            pending.pop(kernel_id, None)


class NoDelayKernelWebsocketHandler(KernelWebsocketHandler):  # type: ignore[misc]
    """The kernel WebSocket with TCP_NODELAY back on: tornado turns it off
    after the upgrade, and Nagle's algorithm meeting delayed ACKs then adds
    about 40 ms to every small message's round trip."""

    async def open(self, kernel_id: str) -> None:  # type: ignore[override]
        self.set_nodelay(True)
        await super().open(kernel_id)


def handlers() -> list[tuple[str, Any]]:
    return [
        (r"/api/pyrepl3/pool", PoolHandler),
        (rf"/api/pyrepl3/kernels/{KERNEL_ID}/health", HealthHandler),
        (rf"/api/pyrepl3/kernels/{KERNEL_ID}/execute", ExecuteHandler),
        (rf"/api/pyrepl3/kernels/{KERNEL_ID}/checkpoints", CheckpointsHandler),
        (rf"/api/pyrepl3/kernels/{KERNEL_ID}/checkpoints/{NAME}", CheckpointHandler),
        (rf"/api/pyrepl3/kernels/{KERNEL_ID}/checkpoints/{NAME}/restore", RestoreHandler),
        (rf"/api/pyrepl3/executions/{EXECUTION_ID}", ExecutionHandler),
        (rf"/api/pyrepl3/executions/{EXECUTION_ID}/input", InputHandler),
        (r"/api/kernels", StartKernelHandler),
        (
            r"/api/kernels/(?P<kernel_id>\w+-\w+-\w+-\w+-\w+)/channels",
            NoDelayKernelWebsocketHandler,
        ),
    ]
