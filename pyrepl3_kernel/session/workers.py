"""Where a gateway gets its workers from.

A standalone kernel starts them cold; a kernel hosted by the manager daemon
takes warm ones from a pool (for the first worker, after a restart and after
a crash alike) and gives each the launch's working directory and environment.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from .worker import WorkerProcess

if TYPE_CHECKING:
    from .pool import SessionPool


class WorkerSource(Protocol):
    async def acquire(self) -> WorkerProcess:
        """A started worker for this kernel's exclusive use."""
        ...

    async def release(self, session: WorkerProcess) -> None:
        """Dispose of a worker (dead or alive); it is never reused."""
        ...


class ColdWorkers:
    """A fresh worker process for every acquire, started with ``launch``
    (:class:`WorkerProcess`'s keyword arguments: python, cwd, env, ...).

    ``first``, if given, is a worker already starting (a standalone kernel
    starts it before its own imports, so both interpreters boot at once); the
    first acquire returns it.
    """

    def __init__(self, *, first: asyncio.Task[WorkerProcess] | None = None, **launch: Any) -> None:
        self.launch = launch
        self._first = first

    async def acquire(self) -> WorkerProcess:
        if self._first is not None:
            first, self._first = self._first, None
            return await first
        session = WorkerProcess(**self.launch)
        await session.start()
        return session

    async def release(self, session: WorkerProcess) -> None:
        await session.shutdown()


class PooledWorkers:
    """Warm workers from a :class:`SessionPool`, configured for one launch."""

    def __init__(
        self,
        pool: SessionPool,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        defer_refill: bool = False,
    ) -> None:
        self.pool = pool
        #: With ``defer_refill``, the caller tops the pool up itself (after
        #: handing the worker over).
        self.defer_refill = defer_refill
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.timeout = timeout
        #: Whether the last acquire found a warm worker waiting.
        self.last_was_warm = False

    async def acquire(self) -> WorkerProcess:
        self.last_was_warm = self.pool.stats["idle"] > 0
        session = await self.pool.acquire_worker(timeout=self.timeout, refill=not self.defer_refill)
        try:
            if self.cwd is not None or self.env is not None:
                await session.configure(cwd=self.cwd, env=self.env)
        except BaseException:
            await self.pool.release_worker(session)
            raise
        return session

    async def release(self, session: WorkerProcess) -> None:
        await self.pool.release_worker(session)
