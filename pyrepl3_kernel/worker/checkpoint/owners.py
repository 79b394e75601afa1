"""Who saved a checkpoint, and whether this worker may replace it.

Checkpoint names are shared by every kernel using a store; each checkpoint
records who saved it (``saved_by``: the notebook, ``JPY_SESSION_NAME``, and
the kernel). A save never replaces a checkpoint that another notebook saved
(or, when neither has a notebook, another kernel) unless forced.
"""

from __future__ import annotations

import os
import time
from typing import Any


def same_owner(saved_by: dict[str, Any] | None, owner: dict[str, Any]) -> bool:
    """Whether ``owner`` may replace a checkpoint ``saved_by`` saved without
    force: the same notebook, or, when neither has one, the same kernel. A
    checkpoint that does not say who saved it (written before this was
    recorded) may be replaced."""
    if not saved_by:
        return True
    if saved_by.get("notebook") or owner.get("notebook"):
        return bool(saved_by.get("notebook") == owner.get("notebook"))
    return bool(saved_by.get("kernel")) and saved_by.get("kernel") == owner.get("kernel")


def describe_owner(saved_by: dict[str, Any] | None) -> str:
    """``notebook analysis.ipynb``, ``kernel 1a2b3c4d`` or ``worker 4242``."""
    if not saved_by:
        return ""
    notebook = saved_by.get("notebook")
    if notebook:
        return f"notebook {_short_path(str(notebook))}"
    kernel = str(saved_by.get("kernel") or "")
    if kernel.startswith("worker-"):
        return f"worker {kernel.split('-')[1]}"
    return f"kernel {kernel[:8]}" if kernel else ""


def _short_path(path: str) -> str:
    """``path`` relative to the working directory when it is inside it,
    else with the home directory as ``~``."""
    try:
        here = os.getcwd()
        if os.path.isabs(path) and os.path.commonpath([here, path]) == here:
            return os.path.relpath(path, here)
    except (OSError, ValueError):
        pass
    home = os.path.expanduser("~")
    if home not in ("", "/") and path.startswith(home + os.sep):
        return "~" + path[len(home) :]
    return path


def origin(summary: dict[str, Any], with_time: bool = True) -> str:
    """Where a checkpoint's state comes from, in the numbers the user saw:
    ``cell 6 of notebook analysis.ipynb (this notebook), 2025-06-01 14:03``."""
    parts = []
    cell = summary.get("cell_number")
    owner = describe_owner(summary.get("saved_by"))
    if cell is not None:
        parts.append(f"cell {cell}" + (f" of {owner}" if owner else ""))
    elif owner:
        parts.append(owner)
    if summary.get("saved_here") and owner:
        parts[-1] += " (this notebook)" if owner.startswith("notebook") else " (this kernel)"
    created = summary.get("created")
    if with_time and isinstance(created, (int, float)):
        parts.append(time.strftime("%Y-%m-%d %H:%M", time.localtime(created)))
    return ", ".join(parts) or "an unknown cell"
