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

Where each part lives:

- ``actions``: :class:`Checkpoints`, what ``worker.checkpoints`` is: the
  stores a worker uses, who it saves as, and the actions the protocol's
  ``checkpoint`` request and ``%checkpoint`` run;
- ``engine``: :class:`CheckpointEngine`, saving a namespace object by object
  (``restore``: loading one back; ``sources``: functions and classes saved and
  rebuilt as source, and ``inspect.getsource`` for cells);
- ``store`` (directories of manifests and blobs), ``format`` (the manifest's
  version, a blob's framing and digest), ``report``, ``namespace`` (which
  names are the user's), ``owners`` (who saved a checkpoint), ``errors``;
- ``autosave``: the automatic checkpoint after each cell, in a forked child;
  ``dirty``: which names it must pickle again (saves proportional to the
  change); ``history``: the kernel's kept states, retention and garbage
  collection; ``travel``: ``states``, ``checkout`` and ``undo``;
- ``buffers`` (restored out-of-band buffers in aligned memory), ``chunks``
  (large buffers saved by the chunk);
- ``magics``: ``%checkpoint``, ``%states``, ``%checkout``, ``%undo``.

How objects are pickled is in :mod:`pyrepl3_kernel.worker.pickling` (its
path is part of the format).
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
