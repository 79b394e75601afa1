"""How many bytes the files under a directory take: the kept states of an
autosave store (blobs, manifests, states), as the session reports them
(``states_disk_bytes``) and as time travel's list of states does in the
worker. Standard library only, with no dependency of its own, so the session
and the worker (neither may import the other) share it across layers.
"""

from __future__ import annotations

import os


def disk_usage(root: str) -> int:
    """Bytes of the files under ``root`` (0 for a directory that is not
    there; a file that goes away meanwhile counts nothing)."""
    total = 0
    for base, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(base, name)).st_size
            except OSError:
                pass
    return total
