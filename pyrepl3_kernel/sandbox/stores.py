"""A sandboxed worker's store: the one directory outside its working
directory and /tmp it may write (automatic and named checkpoints), made for
it under the profile's ``store_root`` and bound at the same path inside.

The session, outside, hands a dead worker's saved state on to its
successor's store (:func:`adopt_store`) and removes the store with the
session (:func:`discard_store`); a store whose owner process was killed is
swept at the next start (:func:`sweep_stores`).
"""

from __future__ import annotations

import os
import shutil

from ..processes import alive

#: Marks a directory as a sandbox's store (only such directories are moved
#: or removed here) and names the process that owns it.
STORE_MARK = ".pyrepl3-sandbox-store"


def default_store_root() -> str:
    from jupyter_core.paths import jupyter_runtime_dir

    return os.path.join(jupyter_runtime_dir(), "pyrepl3-sandbox")


def sweep_stores(root: str) -> None:
    """Remove the stores under ``root`` whose owner (the gateway or daemon
    process that made them, named in the store's mark) is gone: it was killed
    before it could remove them."""
    try:
        entries = os.listdir(root)
    except OSError:
        return
    for entry in entries:
        store = os.path.join(root, entry)
        try:
            with open(os.path.join(store, STORE_MARK)) as f:
                pid_text, _, started_text = f.read().strip().partition(" ")
            pid = int(pid_text)
            started = None if started_text in ("", "None") else float(started_text)
        except (OSError, ValueError):
            continue  # not a store, or one being made
        if not alive(pid, started):
            shutil.rmtree(store, ignore_errors=True)


def holds_state(store: str) -> bool:
    for sub in ("autosave", "checkpoints"):
        path = os.path.join(store, sub)
        if os.path.isdir(path) and os.listdir(path):
            return True
    return False


def _store_of(path: str) -> str | None:
    """The sandbox store ``path`` lies in, if it lies in one."""
    current = os.path.abspath(path)
    for _ in range(4):
        if os.path.exists(os.path.join(current, STORE_MARK)):
            return current
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return None


def adopt_store(store: str, autosave_dir: str | None) -> str | None:
    """The autosave directory a worker whose store is ``store`` writes:
    ``<store>/autosave/<name>``, where the state of ``autosave_dir`` (the
    dead predecessor's, in its store, or a directory outside any store) is
    moved first; a predecessor's store is removed after its contents
    (autosave and named checkpoints) moved."""
    if autosave_dir is None:
        return None
    name = os.path.basename(os.path.normpath(autosave_dir))
    target = os.path.join(store, "autosave", name)
    if os.path.abspath(autosave_dir) == os.path.abspath(target):
        return target
    os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
    previous = _store_of(autosave_dir)
    if os.path.isdir(autosave_dir) and not os.path.exists(target):
        shutil.move(autosave_dir, target)
    if previous is not None and previous != store:
        old_checkpoints = os.path.join(previous, "checkpoints")
        new_checkpoints = os.path.join(store, "checkpoints")
        if os.path.isdir(old_checkpoints) and not os.path.exists(new_checkpoints):
            shutil.move(old_checkpoints, new_checkpoints)
        shutil.rmtree(previous, ignore_errors=True)
    return target


def discard_store(autosave_dir: str | None) -> None:
    """Remove the sandbox store ``autosave_dir`` lies in (the session ends or
    starts afresh); nothing if it lies in none."""
    if autosave_dir is None:
        return
    store = _store_of(autosave_dir)
    if store is not None:
        shutil.rmtree(store, ignore_errors=True)
