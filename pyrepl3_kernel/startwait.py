"""Wait until a standalone kernel has started (run as a script, before
the daemon a first argv launch starts: see daemonstart.start_daemon).

``python -S startwait.py PID`` returns once the kernel of process ``PID``
has started (it has a worker, and the two used under :data:`BUSY` of a CPU
over the last :data:`WINDOW_S`), or ``PID`` is gone; at most :data:`MAX_S`.
It lowers its own priority first and imports nothing beyond the standard
library, so it costs that kernel's start next to nothing; the daemon then
boots on a machine that is free again.
"""

from __future__ import annotations

import os
import sys
import time

WINDOW_S = 0.1
BUSY = 0.2
MAX_S = 5.0


def wait_started_up(pid: int) -> None:
    """Until the standalone kernel of process ``pid`` has started or is
    gone (see the module docstring)."""
    deadline = time.monotonic() + MAX_S
    worker: int | None = None
    before = _cpu_s(pid)
    while time.monotonic() < deadline and _running(pid):
        time.sleep(WINDOW_S)
        if worker is None:
            worker = _child_of(pid)
            before = _cpu_s(pid) + (_cpu_s(worker) if worker else 0.0)
            continue
        now = _cpu_s(pid) + _cpu_s(worker)
        if now - before < BUSY * WINDOW_S:
            return
        before = now


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _cpu_s(pid: int) -> float:
    """CPU seconds process ``pid`` has run (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _child_of(pid: int) -> int | None:
    """A child process of ``pid`` (the standalone kernel's worker), if any."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    return int(name)
        except (OSError, ValueError, IndexError):
            continue
    return None


def main(argv: list[str]) -> int:
    try:
        pid = int(argv[1])
    except (IndexError, ValueError):
        print("usage: python -S startwait.py PID", file=sys.stderr)
        return 2
    try:
        os.nice(19)
    except OSError:
        pass
    wait_started_up(pid)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
