"""The lock that says saves of an autosave store are still being written.

Every child that saves a worker's state (worker/checkpoint/autosave.py) holds
a shared flock on ``<store>/.autosave.pending`` until it exits, dead worker or
not. A reader of the store (crash recovery, a checkout, the object-store
mirror of pyrepl3_kernel/cluster) takes the lock exclusively to know that
every save begun so far has landed. This module is that contract, with no
dependency of its own, so the worker and its readers share it across layers.
"""

from __future__ import annotations

import fcntl
import os
import time

PENDING_NAME = ".autosave.pending"


def wait_for_saves(store: str, timeout: float = 15.0) -> bool:
    """Wait until no save into ``store`` is being written (by any worker,
    dead or alive); False if one still was at the timeout. A store that was
    never saved to has none."""
    try:
        fd = os.open(os.path.join(store, PENDING_NAME), os.O_RDONLY)
    except OSError:
        return True
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.005)
    finally:
        os.close(fd)
