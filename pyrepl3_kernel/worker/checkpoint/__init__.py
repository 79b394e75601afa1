"""Checkpoints of a session's state: save, restore, list, delete, info.

A checkpoint is a manifest (JSON) naming, for every user variable, what
happened to it (``saved``, ``alias`` of another name, ``reference`` for
modules, ``reconstructed`` for files and locks, ``skipped`` and why) and the
content-addressed blob holding it. Blobs are shared between checkpoints of a
store, so a checkpoint after a small change rewrites only what changed.

Writes are atomic (temp file, fsync, rename); the manifest is written last,
so a half-written checkpoint never replaces a good one. Every blob is
verified against its digest when read: a corrupt or truncated checkpoint is
refused before the session is touched.
"""

from .actions import Checkpoints
from .autosave import Autosave
from .engine import CheckpointEngine
from .errors import CheckpointError, CheckpointExistsError
from .format import FORMAT, FORMAT_VERSION, pack_blob, unpack_blob
from .report import Report
from .store import Store

__all__ = [
    "Autosave",
    "Checkpoints",
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointEngine",
    "CheckpointError",
    "CheckpointExistsError",
    "Report",
    "Store",
    "pack_blob",
    "unpack_blob",
]
