"""jupyter_server extension of pyrepl3 (enabled by jupyter-config on install)."""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import Pyrepl3App

    return [{"module": "pyrepl3_kernel.server", "app": Pyrepl3App}]
