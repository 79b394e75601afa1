"""IPython's history database, written when the worker is idle.

IPython wakes its history-saving thread at the start of every cell (and again
for its result), and the thread's SQLite commit (about 0.4 ms of CPU and a
disk sync) then competes with the cell and its reply. The worker holds those
wake-ups back and passes them on once it has been idle for
:data:`IDLE_WRITE_S`, or at the latest :data:`MAX_HOLD_S` after the first
held one: the same rows reach the same database, in one commit per burst of
cells instead of one per cell. A worker that dies loses the rows of at most
its last :data:`MAX_HOLD_S` (IPython's ``db_cache_size`` makes the same
trade); the cells themselves are in the notebook and in autosave.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("pyrepl3.worker")

#: Idle time after which held history is written.
IDLE_WRITE_S = 0.02
#: Longest a held write waits while cells keep coming.
MAX_HOLD_S = 1.0


class DeferredSaveFlag(threading.Event):
    """The history thread's ``save_flag``: a ``set()`` is remembered instead
    of waking the thread; :meth:`flush` passes it on. The wake-up that stops
    the thread (at exit, or before a fork) always goes through."""

    def __init__(self, manager: Any) -> None:
        super().__init__()
        self._manager = manager
        #: The thread that waits on this flag now.
        self.thread: threading.Thread | None = None
        #: When the first held wake-up came (monotonic), or None.
        self.held_since: float | None = None

    def set(self) -> None:
        if getattr(self.thread, "_stop_now", False):
            super().set()
        elif self.held_since is None:
            self.held_since = time.monotonic()

    def flush(self) -> None:
        if self.held_since is not None:
            self.held_since = None
            # IPython stops the thread before a fork (the autosave forks
            # after a cell) and starts it again only with the next cell.
            self._manager._restart_thread_if_stopped()
            super().set()

    def overdue(self) -> bool:
        return self.held_since is not None and time.monotonic() - self.held_since >= MAX_HOLD_S


def defer_writes(shell: Any) -> DeferredSaveFlag | None:
    """Give ``shell``'s history thread a :class:`DeferredSaveFlag`, also each
    thread IPython starts anew after a fork (it stops the thread before every
    fork, an autosave's included); None when history has no thread (off, or
    ``hist_file=:memory:``)."""
    manager = shell.history_manager
    if not getattr(manager, "using_thread", False):
        return None
    flag = DeferredSaveFlag(manager)

    def attach() -> None:
        thread = manager.save_thread
        if thread is not None and thread.save_flag is not flag:
            old, thread.save_flag = thread.save_flag, flag
            flag.thread = thread
            # The thread reads its attribute anew before every wait: wake it
            # from the old flag (it writes what is cached, then waits on ours).
            old.set()

    restart = manager._restart_thread_if_stopped

    def restart_and_attach() -> None:
        try:
            restart()
        except RuntimeError as exc:  # "can't start new thread": a process limit is full
            # The rows stay in IPython's cache; the next flush tries again.
            manager.save_thread = None
            log.warning("history not written yet: %s", exc)
            return
        attach()

    manager._restart_thread_if_stopped = restart_and_attach
    attach()
    return flag
