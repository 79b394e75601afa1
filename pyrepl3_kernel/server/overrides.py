"""jupyter_server's own handlers, overridden: a kernel start that honours
``env`` as the GatewayClient sends it, and the kernel WebSocket with
TCP_NODELAY."""

from __future__ import annotations

import json
import os
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.services.kernels.handlers import MainKernelHandler
from jupyter_server.services.kernels.websocket import KernelWebsocketHandler
from jupyter_server.utils import ensure_async
from tornado import web


class StartKernelHandler(MainKernelHandler):  # type: ignore[misc]
    """``POST /api/kernels`` that also honours ``env`` (``KERNEL_*`` variables,
    ``KERNEL_WORKING_DIR``), as jupyter_server's GatewayClient sends them;
    ``GET /api/kernels`` that lists the kernels ``%fork`` made from this
    server's kernels too (server/fork.py)."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        from .fork import adopt_forks

        await adopt_forks(self.kernel_manager)
        await ensure_async(super().get())

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
