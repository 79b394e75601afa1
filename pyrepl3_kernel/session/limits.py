"""Supervision of a kernel's worker: resource limits, a restart budget, and
the words that name why a worker died.

Limits are read from the kernel's environment (so a kernelspec's ``env``, a
provisioner's launch env or a shell can set them):

=============================== ==========================================
``PYREPL3_MEMORY_LIMIT``        hard limit on the worker's memory (its RSS
                                plus its descendants' own memory, USS), e.g.
                                ``2G``, ``512M``; the worker is stopped
                                before the OOM killer acts
``PYREPL3_MEMORY_SOFT_LIMIT``   a warning in the cell's output, once a cell
``PYREPL3_CELL_TIMEOUT``        wall-time limit of one cell, in seconds
                                (waiting for input() does not count)
``PYREPL3_CELL_CPU_LIMIT``      CPU-time limit of one cell, in seconds
``PYREPL3_INTERRUPT_GRACE``     seconds an interrupt may take to land before
                                the worker is restarted (default 5)
``PYREPL3_MAX_RESTARTS``        crashes allowed within ``PYREPL3_RESTART_WINDOW``
                                seconds (defaults 5 and 60) before the kernel
                                stops starting workers
=============================== ==========================================
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..units import format_size, parse_size, size_from_env

log = logging.getLogger("pyrepl3.gateway")


@dataclass
class Limits:
    memory_limit: int | None = None
    memory_soft_limit: int | None = None
    cell_timeout: float | None = None
    cell_cpu_limit: float | None = None
    interrupt_grace: float = 5.0
    max_restarts: int = 5
    restart_window: float = 60.0
    poll_interval: float = 0.25

    def describe(self) -> dict[str, Any]:
        """The limits as health reports show them."""
        return {
            "memory_limit": self.memory_limit,
            "memory_soft_limit": self.memory_soft_limit,
            "cell_timeout": self.cell_timeout,
            "cell_cpu_limit": self.cell_cpu_limit,
            "interrupt_grace": self.interrupt_grace,
            "max_restarts": self.max_restarts,
            "restart_window": self.restart_window,
        }

    def replace(self, **given: Any) -> Limits:
        """A copy with the fields given (and not None) changed; sizes may be
        strings such as ``"2G"``."""
        changes = {k: v for k, v in given.items() if v is not None}
        for name in ("memory_limit", "memory_soft_limit"):
            if isinstance(changes.get(name), str):
                changes[name] = parse_size(changes[name])
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Limits:
        env = os.environ if env is None else env
        limits = cls()

        def number(name: str, kind: Callable[[str], Any]) -> Any:
            raw = env.get(name)
            if not raw:
                return None
            try:
                return kind(raw)
            except ValueError as exc:
                log.warning("ignoring %s=%r: %s", name, raw, exc)
                return None

        limits.memory_limit = size_from_env(env, "PYREPL3_MEMORY_LIMIT", None, log)
        limits.memory_soft_limit = size_from_env(env, "PYREPL3_MEMORY_SOFT_LIMIT", None, log)
        limits.cell_timeout = number("PYREPL3_CELL_TIMEOUT", float)
        limits.cell_cpu_limit = number("PYREPL3_CELL_CPU_LIMIT", float)
        for name, attr, kind in (
            ("PYREPL3_INTERRUPT_GRACE", "interrupt_grace", float),
            ("PYREPL3_MAX_RESTARTS", "max_restarts", int),
            ("PYREPL3_RESTART_WINDOW", "restart_window", float),
        ):
            value = number(name, kind)
            if value is not None:
                setattr(limits, attr, value)
        return limits


class RestartBudget:
    """At most ``max_restarts`` worker crashes within ``window`` seconds."""

    def __init__(self, max_restarts: int, window: float) -> None:
        self.max_restarts = max_restarts
        self.window = window
        self._crashes: collections.deque[float] = collections.deque()

    def record_crash(self) -> bool:
        """Count a crash; False once the budget is spent."""
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > self.window:
            self._crashes.popleft()
        return len(self._crashes) <= self.max_restarts

    def reset(self) -> None:
        self._crashes.clear()

    def describe(self) -> str:
        return (
            f"{len(self._crashes)} worker crashes within {self.window:.0f} s: the kernel stopped "
            "starting new workers to end a crash loop; restart the kernel to go on"
        )


def _oom_kills() -> int | None:
    """The OOM-kill counter of this process's memory cgroup, if readable:
    ``oom_kill`` in ``memory.events`` (cgroup v2) or in ``memory.oom_control``
    (cgroup v1, which hybrid hosts still use for the memory controller)."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    candidates: list[str] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        rel = path.strip().lstrip("/")
        if "memory" in controllers.split(","):
            candidates.insert(0, os.path.join("/sys/fs/cgroup/memory", rel, "memory.oom_control"))
        elif hierarchy == "0" and not controllers:
            for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                candidates.append(os.path.join(root, rel, "memory.events"))
    for candidate in candidates:
        try:
            with open(candidate) as f:
                for entry in f:
                    key, _, value = entry.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


class WorkerMonitor:
    """Samples a worker's process tree and enforces :class:`Limits`.

    ``kill(reason)`` is called when a hard limit is crossed; ``warn(text)``
    for a soft one (once per cell). Sampling runs only while a cell runs, so
    an idle kernel costs nothing.

    A cell's wall and CPU time count from when the worker starts running
    it, not from when it was sent: ``running()`` names the request the
    worker's main thread is on (the oldest without its reply, which the
    worker runs in order). A cell sent while others are ahead of it waits,
    uncounted, until they have ended.
    """

    def __init__(
        self,
        limits: Limits,
        kill: Callable[[str], None],
        warn: Callable[[str], None],
        running: Callable[[], str | None] | None = None,
    ) -> None:
        self.limits = limits
        self._kill = kill
        self._warn = warn
        self._running = running
        #: The cells sent and not ended, and the one whose time is counted.
        self._cells: set[str] = set()
        self._clock: str | None = None
        self.pid: int | None = None
        self.last_rss: int = 0
        self.peak_rss: int = 0
        self._task: asyncio.Task[None] | None = None
        self._cell_started = 0.0
        self._input_since: float | None = None
        self._cell_cpu = 0.0
        self._warned = False
        self._oom_baseline: int | None = None
        self._processes: dict[int, Any] = {}

    @property
    def active(self) -> bool:
        lim = self.limits
        return any(
            x is not None
            for x in (lim.memory_limit, lim.memory_soft_limit, lim.cell_timeout, lim.cell_cpu_limit)
        )

    def attach(self, pid: int | None) -> None:
        self.pid = pid
        self.last_rss = 0
        self._processes = {}
        self._oom_baseline = _oom_kills()

    def cell_started(self, cell_id: str | None = None) -> None:
        """A cell was sent to the worker. Its time counts from now if the
        worker is on it (nothing was ahead of it), else from when the
        watch sees the worker start it."""
        if cell_id is None or self._running is None or self._running() == cell_id:
            self._start_clock(cell_id)
        if cell_id is not None:
            self._cells.add(cell_id)
        if self.active and (self._task is None or self._task.done()):
            self._task = asyncio.ensure_future(self._watch())

    def _start_clock(self, cell_id: str | None) -> None:
        self._clock = cell_id
        self._cell_started = time.monotonic()
        self._cell_cpu = -1.0  # taken at the next sample
        self._input_since = None
        self._warned = False

    def _follow(self) -> bool:
        """Whether a cell's time is counted now: the clock follows the
        request the worker is on (a cell of ours, or another request)."""
        if self._running is None or self._clock is None and not self._cells:
            return True  # no way to tell (or a cell without an id): as sent
        on = self._running()
        if on != self._clock:
            if on in self._cells:
                self._start_clock(on)
            else:
                self._clock = None
        return self._clock is not None

    def input_started(self) -> None:
        """The cell waits for input(): the wait does not count as its wall time."""
        if self._input_since is None:
            self._input_since = time.monotonic()

    def input_finished(self) -> None:
        if self._input_since is not None:
            self._cell_started += time.monotonic() - self._input_since
            self._input_since = None

    def cell_finished(self, cell_id: str | None = None) -> None:
        """A cell ended (``None``: all of them: the worker died, the session
        closes). The watch stops when no cell is left."""
        if cell_id is None:
            self._cells.clear()
        else:
            self._cells.discard(cell_id)
        if self._clock == cell_id or cell_id is None:
            self._clock = None
        if self._cells:
            return
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def sample(self) -> dict[str, Any]:
        """Memory (bytes) and CPU seconds of the worker's process tree.

        Memory is the worker's RSS plus what each descendant holds on its own
        (USS): a child forked from the worker (the automatic checkpoint's, a
        fork-based multiprocessing pool) maps the worker's pages copy-on-write,
        and counting them again as its RSS would double the worker's memory.
        CPU leaves out descendants in a session of their own (the automatic
        checkpoint's child): saving a cell's state is not the next cell's work.
        """
        import psutil

        if self.pid is None:
            return {"rss": 0, "cpu": 0.0, "processes": 0}
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
            session = os.getsid(self.pid)
        except (psutil.Error, OSError):
            return {"rss": 0, "cpu": 0.0, "processes": 0}
        rss = 0
        cpu = 0.0
        for proc in procs:
            with contextlib.suppress(psutil.Error, OSError):
                if proc is root or os.getsid(proc.pid) == session:
                    times = proc.cpu_times()
                    cpu += times.user + times.system
                if proc is root:
                    rss += proc.memory_info().rss
                else:
                    rss += proc.memory_full_info().uss
        self.last_rss = rss
        self.peak_rss = max(self.peak_rss, rss)
        return {"rss": rss, "cpu": cpu, "processes": len(procs)}

    async def _watch(self) -> None:
        lim = self.limits
        while True:
            await asyncio.sleep(lim.poll_interval)
            sample = self.sample()
            counted = self._follow()
            if self._cell_cpu < 0:
                # CPU time counts from the first sample, not from the cell's
                # start: a short cell then costs no scan of the process tree
                # (a few ms), and a long one may use one interval more.
                self._cell_cpu = sample["cpu"]
            rss = sample["rss"]
            if lim.memory_limit is not None and rss > lim.memory_limit:
                self._kill(
                    f"memory limit {format_size(lim.memory_limit)} exceeded ({format_size(rss)})"
                )
                return
            if (
                lim.memory_soft_limit is not None
                and rss > lim.memory_soft_limit
                and not self._warned
            ):
                self._warned = True
                self._warn(
                    f"pyrepl3: warning: the worker uses {format_size(rss)}, over the soft memory limit "
                    f"of {format_size(lim.memory_soft_limit)}"
                    + (f" (hard limit {format_size(lim.memory_limit)})" if lim.memory_limit else "")
                    + "\n"
                )
            elapsed = time.monotonic() - self._cell_started
            if (
                lim.cell_timeout is not None
                and counted
                and self._input_since is None
                and elapsed > lim.cell_timeout
            ):
                self._kill(
                    f"the cell ran longer than its wall-time limit of {lim.cell_timeout:g} s"
                )
                return
            if (
                lim.cell_cpu_limit is not None
                and counted
                and sample["cpu"] - self._cell_cpu > lim.cell_cpu_limit
            ):
                self._kill(
                    f"the cell used more than its CPU-time limit of {lim.cell_cpu_limit:g} s"
                )
                return

    def explain_death(self, cause: str, returncode: int | None) -> str:
        """Name the cause of a death the gateway did not order itself."""
        if returncode == -9:
            baseline, now = self._oom_baseline, _oom_kills()
            rss = f"; RSS at the last sample: {format_size(self.last_rss)}" if self.last_rss else ""
            if baseline is not None and now is not None and now > baseline:
                self._oom_baseline = now
                return f"killed by the out-of-memory killer{rss}"
            return f"{cause}{rss}"
        return cause
