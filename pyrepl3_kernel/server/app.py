"""The jupyter_server extension: ``/api/pyrepl3/...`` endpoints, kernel starts
that honour ``KERNEL_*``, and kernel WebSockets with TCP_NODELAY."""

from __future__ import annotations

from jupyter_server.extension.application import ExtensionApp

from .handlers import Registry, handlers


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
