"""pyrepl3-kernel: a Jupyter kernel whose user code runs in an isolated worker.

The public surface is small: :class:`Session`, :class:`SessionPool`,
:class:`PoolConfig`, the protocol's message types, and :class:`Pyrepl3Error`,
the base of every error the project raises. Names are loaded on first use, so
the worker process (which imports this package) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .errors import Pyrepl3Error
    from .protocol import *  # noqa: F403
    from .session import (
        PoolConfig,
        PoolExhausted,
        Session,
        SessionPool,
        WorkerDeadError,
        WorkerStartError,
    )

_SESSION_NAMES = {
    "Session",
    "SessionPool",
    "PoolConfig",
    "PoolExhausted",
    "WorkerDeadError",
    "WorkerStartError",
}


def __getattr__(name: str) -> Any:
    import importlib

    if name in _SESSION_NAMES:
        return getattr(importlib.import_module(".session", __name__), name)
    if name == "Pyrepl3Error":
        return importlib.import_module(".errors", __name__).Pyrepl3Error
    protocol = importlib.import_module(".protocol", __name__)
    if name in protocol.__all__:
        return getattr(protocol, name)
    raise AttributeError(f"module 'pyrepl3_kernel' has no attribute {name!r}")


def __dir__() -> list[str]:
    import importlib

    protocol = importlib.import_module(".protocol", __name__)
    return sorted(set(globals()) | _SESSION_NAMES | {"Pyrepl3Error"} | set(protocol.__all__))


__all__ = [
    "PoolConfig",
    "PoolExhausted",
    "Pyrepl3Error",
    "Session",
    "SessionPool",
    "WorkerDeadError",
    "WorkerStartError",
    "__version__",
]
