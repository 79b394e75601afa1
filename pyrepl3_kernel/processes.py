"""Whether a process is still running, and when it started.

One answer for every place that watches another process: the provisioner
(did the daemon it started exit?), the daemon (are the owners of its leases
and the process that started it still there?), ``pyrepl3-kernel stop`` (has
the daemon exited?) and the standalone kernel (is its launcher still there?).
"""

from __future__ import annotations

#: Start times of one process read twice differ by less than this (seconds);
#: a process that reuses the pid starts later.
SAME_START = 1.0


def alive(pid: int, started: float | None = None) -> bool:
    """Whether process ``pid`` is running. A zombie is not (it has exited; its
    parent has not reaped it yet); another user's process is. With
    ``started`` (from :func:`started_at`), only if it is that same process
    and not a later one that reuses the pid."""
    if pid <= 0:
        return False
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - started) < SAME_START
    except psutil.NoSuchProcess:  # ZombieProcess too
        return False
    except psutil.AccessDenied:
        return True
    except (ValueError, OverflowError):  # not a pid this system can have
        return False


def started_at(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if
    there is no such process."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, ValueError, OverflowError):
        return None
