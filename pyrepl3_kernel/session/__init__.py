"""Client side of the native protocol: one worker (``WorkerProcess``), a
supervised session over it, or a pool of sessions."""

from .limits import Limits
from .pool import PoolConfig, PoolExhausted, SessionPool, WarmupError
from .supervised import Session
from .worker import WorkerDeadError, WorkerProcess, WorkerStartError

__all__ = [
    "Limits",
    "PoolConfig",
    "PoolExhausted",
    "Session",
    "SessionPool",
    "WarmupError",
    "WorkerDeadError",
    "WorkerProcess",
    "WorkerStartError",
]
