"""A sandbox's own control groups: its memory, process count and CPU share.

cgroup v2 where this process's cgroup delegates the ``memory`` and ``pids``
controllers to a child; else cgroup v1 (the ``memory``, ``pids`` and ``cpu``
hierarchies, as hybrid hosts and many containers still mount them). A
sandbox's processes enter its groups before bubblewrap runs (the start-up
shell writes its own pid into each ``cgroup.procs``), so every process the
sandbox ever has is counted. :meth:`Cgroups.create` says why it cannot make
them (no cgroup file system, no permission); the launch then falls back to
rlimits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from dataclasses import dataclass, field

CFS_PERIOD_US = 100_000


def _own_cgroups() -> dict[str, str]:
    """Controller (``memory``, ..., ``""`` for v2) -> this process's path."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for controller in controllers.split(",") if controllers else [""]:
                    out[controller] = path
    return out


def _mounts() -> dict[str, str]:
    """Controller (``""`` for cgroup2) -> where its hierarchy is mounted."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fstype, _, options = right.split(" ", 2) if right.count(" ") >= 2 else ("", "", "")
                mount_point = left.split(" ")[4]
                if fstype == "cgroup2":
                    out.setdefault("", mount_point)
                elif fstype == "cgroup":
                    for option in options.strip().split(","):
                        out.setdefault(option, mount_point)
    return out


#: A sandbox's group left empty for this long is stale (its gateway was
#: killed before it could remove it); younger empty groups may be a launch
#: whose first process has not entered yet.
STALE_AFTER_S = 60.0


def sweep(parent: str) -> None:
    """Remove stale sandbox groups under ``parent``: empty (rmdir refuses a
    group with processes) and older than :data:`STALE_AFTER_S`."""
    import time

    try:
        entries = os.listdir(parent)
    except OSError:
        return
    now = time.time()
    for entry in entries:
        if not entry.startswith("pyrepl3-sandbox-"):
            continue
        path = os.path.join(parent, entry)
        with contextlib.suppress(OSError):
            if now - os.stat(path).st_mtime > STALE_AFTER_S:
                os.rmdir(path)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read_counter(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


@dataclass
class Cgroups:
    """The groups of one sandbox (``version`` 1 or 2)."""

    version: int
    #: Directories made for this sandbox (removed by :meth:`remove`).
    dirs: list[str] = field(default_factory=list)
    #: The ``cgroup.procs`` files its first process writes its pid into.
    procs_files: list[str] = field(default_factory=list)
    memory_dir: str | None = None
    pids_dir: str | None = None

    @classmethod
    def create(cls, memory: int, processes: int, cpus: float) -> tuple[Cgroups | None, str]:
        """New groups with these limits, or None and the reason there are none."""
        name = f"pyrepl3-sandbox-{uuid.uuid4().hex[:12]}"
        own, mounts = _own_cgroups(), _mounts()
        v2_root = mounts.get("")
        reasons: list[str] = []
        if v2_root is not None and "" in own:
            parent = os.path.join(v2_root, own[""].lstrip("/"))
            try:
                with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                    delegated = f.read().split()
            except OSError as exc:
                delegated = []
                reasons.append(f"cgroup v2: {exc.strerror}")
            if {"memory", "pids"} <= set(delegated):
                groups = cls(version=2)
                try:
                    groups._make_v2(os.path.join(parent, name), memory, processes, cpus, delegated)
                    return groups, ""
                except OSError as exc:
                    groups.remove_now()
                    reasons.append(f"cgroup v2: {exc.strerror or exc}")
            elif delegated or not reasons:
                reasons.append("cgroup v2: memory and pids are not delegated to this process")
        if "memory" in mounts and "pids" in mounts:
            groups = cls(version=1)
            try:
                groups._make_v1(mounts, own, name, memory, processes, cpus)
                return groups, ""
            except OSError as exc:
                groups.remove_now()
                reasons.append(f"cgroup v1: {exc.strerror or exc} ({exc.filename})")
        else:
            reasons.append("cgroup v1: no memory and pids hierarchies mounted")
        return None, "; ".join(reasons)

    def _make_v2(
        self, path: str, memory: int, processes: int, cpus: float, delegated: list[str]
    ) -> None:
        sweep(os.path.dirname(path))
        os.mkdir(path, 0o755)
        self.dirs.append(path)
        _write(os.path.join(path, "memory.max"), str(memory))
        with contextlib.suppress(OSError):
            _write(os.path.join(path, "memory.swap.max"), "0")
        _write(os.path.join(path, "pids.max"), str(processes))
        if "cpu" in delegated:
            _write(os.path.join(path, "cpu.max"), f"{int(cpus * CFS_PERIOD_US)} {CFS_PERIOD_US}")
        self.procs_files.append(os.path.join(path, "cgroup.procs"))
        self.memory_dir = self.pids_dir = path

    def _make_v1(
        self,
        mounts: dict[str, str],
        own: dict[str, str],
        name: str,
        memory: int,
        processes: int,
        cpus: float,
    ) -> None:
        def make(controller: str) -> str:
            path = os.path.join(mounts[controller], own.get(controller, "/").lstrip("/"), name)
            sweep(os.path.dirname(path))
            os.mkdir(path, 0o755)
            self.dirs.append(path)
            self.procs_files.append(os.path.join(path, "cgroup.procs"))
            return path

        mem = self.memory_dir = make("memory")
        _write(os.path.join(mem, "memory.limit_in_bytes"), str(memory))
        memsw = os.path.join(mem, "memory.memsw.limit_in_bytes")
        if os.path.exists(memsw):  # no escape into swap
            with contextlib.suppress(OSError):
                _write(memsw, str(memory))
        pids = self.pids_dir = make("pids")
        _write(os.path.join(pids, "pids.max"), str(processes))
        if "cpu" in mounts:
            cpu = make("cpu")
            _write(os.path.join(cpu, "cpu.cfs_period_us"), str(CFS_PERIOD_US))
            _write(os.path.join(cpu, "cpu.cfs_quota_us"), str(int(cpus * CFS_PERIOD_US)))

    # -- what happened ----------------------------------------------------------

    def oom_kills(self) -> int:
        """Processes the kernel killed for the sandbox's memory limit."""
        if self.memory_dir is None:
            return 0
        if self.version == 2:
            return _read_counter(os.path.join(self.memory_dir, "memory.events"), "oom_kill")
        return _read_counter(os.path.join(self.memory_dir, "memory.oom_control"), "oom_kill")

    def forks_refused(self) -> int:
        """Forks refused for the process limit."""
        if self.pids_dir is None:
            return 0
        return _read_counter(os.path.join(self.pids_dir, "pids.events"), "max")

    def processes(self) -> int:
        if self.pids_dir is None:
            return 0
        try:
            with open(os.path.join(self.pids_dir, "pids.current")) as f:
                return int(f.read())
        except (OSError, ValueError):
            return 0

    # -- removal ----------------------------------------------------------------

    async def remove(self, timeout: float = 2.0) -> None:
        """Remove the groups once their processes are gone (a killed
        sandbox's last processes take a moment to be reaped)."""
        for _ in range(max(1, int(timeout / 0.02))):
            self.remove_now()
            if not self.dirs:
                return
            await asyncio.sleep(0.02)

    def remove_now(self) -> None:
        left = []
        for path in reversed(self.dirs):
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError:
                left.append(path)
        self.dirs = list(reversed(left))
