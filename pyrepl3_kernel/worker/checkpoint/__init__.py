"""Checkpoints of a session's state: save, restore, list, delete, info."""

from .engine import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointEngine,
    CheckpointError,
    CheckpointExistsError,
    Report,
    Store,
    pack_blob,
    unpack_blob,
)

__all__ = [
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
