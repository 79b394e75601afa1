"""The jupyter_server extension: ``/api/pyrepl3/...`` endpoints, kernel starts
that honour ``KERNEL_*``, and kernel WebSockets with TCP_NODELAY."""

from __future__ import annotations

from typing import Any

from jupyter_server.extension.application import ExtensionApp

from ..cluster import move
from .fork import ForkHandler
from .overrides import NoDelayKernelWebsocketHandler, StartKernelHandler
from .rest import (
    CheckoutHandler,
    CheckpointHandler,
    CheckpointsHandler,
    ExecuteHandler,
    ExecutionHandler,
    HealthHandler,
    InputHandler,
    PoolHandler,
    Registry,
    RestoreHandler,
    StatesHandler,
)

KERNEL_ID = r"(?P<kernel_id>[\w-]+)"
NAME = r"(?P<name>[A-Za-z0-9_.\-]+)"
EXECUTION_ID = r"(?P<execution_id>[0-9a-f]{32})"


def handlers() -> list[tuple[str, Any]]:
    return [
        (r"/api/pyrepl3/pool", PoolHandler),
        (rf"/api/pyrepl3/kernels/{KERNEL_ID}/health", HealthHandler),
        (rf"/api/pyrepl3/kernels/{KERNEL_ID}/execute", ExecuteHandler),
        (rf"/api/pyrepl3/kernels/{KERNEL_ID}/fork", ForkHandler),
        (rf"/api/pyrepl3/kernels/{KERNEL_ID}/move", move.handler_class()),
        (rf"/api/pyrepl3/kernels/{KERNEL_ID}/checkpoints", CheckpointsHandler),
        (rf"/api/pyrepl3/kernels/{KERNEL_ID}/checkpoints/{NAME}", CheckpointHandler),
        (rf"/api/pyrepl3/kernels/{KERNEL_ID}/checkpoints/{NAME}/restore", RestoreHandler),
        (rf"/api/pyrepl3/kernels/{KERNEL_ID}/states", StatesHandler),
        (rf"/api/pyrepl3/kernels/{KERNEL_ID}/states/(?P<cell>[0-9]+)/checkout", CheckoutHandler),
        (rf"/api/pyrepl3/executions/{EXECUTION_ID}", ExecutionHandler),
        (rf"/api/pyrepl3/executions/{EXECUTION_ID}/input", InputHandler),
        (r"/api/kernels", StartKernelHandler),
        (
            r"/api/kernels/(?P<kernel_id>\w+-\w+-\w+-\w+-\w+)/channels",
            NoDelayKernelWebsocketHandler,
        ),
    ]


class Pyrepl3App(ExtensionApp):
    name = "pyrepl3_kernel.server"
    description = "pyrepl3 endpoints: pool, health, checkpoints, REST execute"
    load_other_extensions = True

    def initialize_settings(self) -> None:
        self.settings["pyrepl3_registry"] = Registry()

    def initialize_handlers(self) -> None:
        self.handlers.extend(handlers())

    async def stop_extension(self) -> None:
        registry: Registry = self.settings["pyrepl3_registry"]
        for bridge in list(registry.bridges.values()):
            await bridge.close()
        registry.bridges.clear()
