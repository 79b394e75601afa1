"""The errors a checkpoint action raises; the message says what to do."""

from __future__ import annotations

from ...errors import Pyrepl3Error


class CheckpointError(Pyrepl3Error):
    """A checkpoint could not be written or read; the message says why."""


class CheckpointExistsError(CheckpointError):
    """A save would replace a checkpoint that another notebook (or, for
    kernels without a notebook, another kernel) saved; nothing was written."""
