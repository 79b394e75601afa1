"""Client side of the native protocol: one worker (``WorkerProcess``), a
supervised session over it, or a pool of sessions."""

from .pool import PoolConfig, PoolExhausted, SessionPool, WarmupError
from .worker import WorkerDeadError, WorkerProcess, WorkerStartError

#: The native session (for now the bare worker process; see supervised.py).
Session = WorkerProcess

__all__ = [
    "PoolConfig",
    "PoolExhausted",
    "Session",
    "SessionPool",
    "WarmupError",
    "WorkerDeadError",
    "WorkerProcess",
    "WorkerStartError",
]
