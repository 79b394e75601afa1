"""Client side of the native protocol: one worker (``Session``) or a pool."""

from .manager import Session, WorkerDeadError, WorkerStartError
from .pool import PoolConfig, PoolExhausted, SessionPool, WarmupError

__all__ = [
    "PoolConfig",
    "PoolExhausted",
    "Session",
    "SessionPool",
    "WarmupError",
    "WorkerDeadError",
    "WorkerStartError",
]
