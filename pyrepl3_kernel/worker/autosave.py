"""Automatic checkpoints after every successful cell, off the critical path.

After a cell succeeds, the worker forks. The child holds a copy-on-write
snapshot of the namespace as it was at the end of the cell; it writes an
incremental checkpoint named ``auto`` and exits, while the parent goes on at
once (a fork costs about 1.5 ms for a 90 MB worker). One child runs at a time:
a cell that ends while the previous save is still running marks the state
dirty, and the worker saves again as soon as that child is done (the request
loop polls while idle). Crash recovery restores ``auto``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import time
from typing import Any

log = logging.getLogger("pyrepl3.worker")

AUTO_NAME = "auto"
LOCK_NAME = ".autosave.lock"


DEFAULT_MAX_OBJECT = 1 << 30


def max_object_bytes() -> int:
    """Objects larger than this are left out of automatic checkpoints
    (``PYREPL3_AUTOSAVE_MAX_OBJECT``, e.g. ``512M``; default 1 GiB): writing
    them after every cell would cost more than it saves."""
    raw = os.environ.get("PYREPL3_AUTOSAVE_MAX_OBJECT", "")
    if raw:
        from ..units import parse_size

        try:
            return parse_size(raw)
        except ValueError:
            log.warning("ignoring PYREPL3_AUTOSAVE_MAX_OBJECT=%r", raw)
    return DEFAULT_MAX_OBJECT


def wait_for_autosave(store: str, timeout: float = 15.0) -> bool:
    """Wait until no automatic checkpoint is being written to ``store``
    (local stores only); False if one was still running at the timeout."""
    if "://" in store:
        return True
    path = os.path.join(store, LOCK_NAME)
    if not os.path.exists(path):
        return True
    fd = os.open(path, os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.005)
    finally:
        os.close(fd)


class Autosave:
    def __init__(self, state: Any, private_fds: list[int]) -> None:
        self.state = state  # StateManager
        self.private_fds = private_fds  # fds the child must not keep (protocol socket, ...)
        self.store: str | None = None
        self.dirty = False
        self._child: int | None = None
        self._child_count = 0
        #: Execution count of the last autosave known to have completed.
        self.saved_count: int | None = None
        self.failures = 0

    def configure(self, store: str | None) -> None:
        self.store = store or None
        self.dirty = self.store is not None

    def after_cell(self, result: Any) -> None:
        """IPython ``post_run_cell`` hook."""
        if self.store is None or not getattr(result, "success", False):
            return
        self.dirty = True
        self.poll()

    @property
    def pending(self) -> bool:
        return self.store is not None and (self.dirty or self._child is not None)

    def poll(self) -> None:
        """Reap a finished child; start a new save if the state is dirty."""
        if self._child is not None:
            try:
                pid, status = os.waitpid(self._child, os.WNOHANG)
            except ChildProcessError:
                pid, status = self._child, 0
            if pid == 0:
                return
            self._child = None
            if os.waitstatus_to_exitcode(status) == 0:
                self.saved_count = self._child_count
            else:
                self.failures += 1
                log.warning("autosave failed (status %s)", status)
        if self.dirty and self.store is not None:
            self.dirty = False
            self._fork()

    def _fork(self) -> None:
        count = self.state.shell.execution_count - 1
        lock = self._lock_fd()
        pid = os.fork()
        if pid:
            if lock is not None:
                os.close(lock)  # the child holds the lock until it is done
            self._child = pid
            self._child_count = count
            return
        code = 1
        try:  # the child: save, then vanish without running any cleanup
            # Out of the worker's process group: a crash of the worker (whose
            # group is killed) must not kill the save that recovery needs.
            os.setsid()
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            for fd in self.private_fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            started = time.perf_counter()
            self.state.engine(self.store).save(AUTO_NAME, max_object_bytes=max_object_bytes())
            log.debug("autosave took %.1f ms", (time.perf_counter() - started) * 1000)
            code = 0
        finally:
            os._exit(code)

    def _lock_fd(self) -> int | None:
        """An exclusive lock on the store, taken before the fork and handed to
        the child: a restore waits for it (see :func:`wait_for_autosave`)."""
        if self.store is None or "://" in self.store:
            return None
        try:
            os.makedirs(self.store, exist_ok=True)
            fd = os.open(os.path.join(self.store, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            log.warning("autosave lock: %s", exc)
            return None
        return fd

    def wait(self, timeout: float = 10.0) -> None:
        """Let a running save finish (used before a planned shutdown)."""
        deadline = time.monotonic() + timeout
        while self._child is not None and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.005)
