"""``BackgroundTasks``: the asyncio tasks an object starts and ends together."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any


class BackgroundTasks:
    """Tasks started with :meth:`spawn` are kept (asyncio holds only weak
    references to running tasks) until they end; one that fails is logged
    on ``log`` (it has nobody to raise to); :meth:`cancel` ends them all."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("background task failed", exc_info=task.exception())

    async def cancel(self) -> None:
        """Cancel every task and wait until they have ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
