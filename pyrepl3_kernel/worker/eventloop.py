"""The cells' asyncio event loop, kept running while the worker is idle.

ipykernel runs its cells inside an event loop that never stops, so a task a
cell starts (``asyncio.get_event_loop().create_task(...)``: websockets,
periodic updates, ``asyncio.sleep`` loops) goes on between cells. The worker
runs user code synchronously on its main thread; this module gives it the
same behaviour: while the worker waits for its next request, it runs the
event loop that the cells use (as long as that loop has anything to do), and
a request arriving on the I/O thread wakes it.

There is one loop for the cells: the one ``asyncio.get_event_loop()`` returns
in a cell and the one IPython runs top-level ``await`` on. asyncio is never
imported here: a worker whose user code does not use it pays nothing.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("pyrepl3.worker")


def _imported(name: str) -> Any:
    """The module ``name`` if it is imported, and not half-imported by
    another thread right now (a subshell's cell, worker/subshells.py)."""
    module = sys.modules.get(name)
    if getattr(getattr(module, "__spec__", None), "_initializing", False):
        return None
    return module


def _ipython_async_helpers() -> Any:
    return _imported("IPython.core.async_helpers")


def cells_loop() -> Any:
    """The event loop of the cells, or None while asyncio is not imported.

    If a cell made the current loop (``asyncio.get_event_loop()``), IPython
    runs top-level ``await`` on that one too; otherwise IPython's loop becomes
    the current one."""
    asyncio = _imported("asyncio")
    helpers = _ipython_async_helpers()
    if asyncio is None or helpers is None:
        return None
    policy = asyncio.get_event_loop_policy()
    current = getattr(getattr(policy, "_local", None), "_loop", None)
    if current is not None and not current.is_closed():
        if helpers._asyncio_event_loop is not current:
            helpers._asyncio_event_loop = current
        return current
    loop = helpers.get_asyncio_loop()
    asyncio.set_event_loop(loop)
    return loop


def running_cells_loop() -> Any:
    """The cells' loop if it is running right now (a cell is in a top-level
    ``await``); safe to call from any thread."""
    helpers = _ipython_async_helpers()
    loop = getattr(helpers, "_asyncio_event_loop", None) if helpers is not None else None
    return loop if loop is not None and loop.is_running() else None


def has_work(loop: Any) -> bool:
    """Whether ``loop`` has callbacks, timers or unfinished tasks."""
    if getattr(loop, "_ready", None) or getattr(loop, "_scheduled", None):
        return True
    import asyncio

    return any(not task.done() for task in asyncio.all_tasks(loop))


class IdleLoop:
    """Runs the cells' loop on the main thread until a request is queued."""

    def __init__(self, requests: queue.SimpleQueue[Any]) -> None:
        self._requests = requests
        self._lock = threading.Lock()
        self._waiting: Any = None  # the loop the main thread runs while idle
        self._wake: Callable[[], None] | None = None

    def wait(self, timeout: float | None) -> bool:
        """Run the loop until a request is queued or ``timeout`` seconds
        passed, and say whether it ran: without work for the loop, this
        returns False at once (the caller blocks on the queue itself)."""
        loop = cells_loop()
        if loop is None or loop.is_running() or not has_work(loop):
            return False
        with self._lock:
            self._waiting = loop
        try:
            if self._requests.empty():
                loop.run_until_complete(self._until_request(timeout))
        except BaseException:  # a task's SystemExit or KeyboardInterrupt
            log.exception("a background task of a cell stopped the event loop")
        finally:
            with self._lock:
                self._waiting = None
                self._wake = None
        return True

    async def _until_request(self, timeout: float | None) -> None:
        import asyncio

        event = asyncio.Event()
        self._wake = event.set
        if not self._requests.empty():
            return
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def notify(self) -> None:
        """A request was queued (called on the I/O thread)."""
        with self._lock:
            loop = self._waiting
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._set_wake)
            except RuntimeError:  # closed meanwhile
                pass

    def _set_wake(self) -> None:
        wake = self._wake
        if wake is not None:
            wake()
