"""What a save or restore did, name by name, and which cell the saved state
is from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Report:
    """What a save or restore did, name by name."""

    name: str
    saved: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    bytes_written: int = 0
    #: The execution counter when the state was saved: the number the next
    #: cell took (``cell_number + 1``).
    execution_count: int | None = None
    #: The number of the cell (``In [N]``) the state is from: the cell that
    #: saved it, or the last one run before it was saved (0: none).
    cell_number: int | None = None
    #: Who saved it: ``{"notebook": path or None, "kernel": id}``.
    saved_by: dict[str, Any] | None = None
    reused: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "saved": self.saved,
            "skipped": self.skipped,
            "failed": self.failed,
            "removed": self.removed,
            "bytes_written": self.bytes_written,
            "execution_count": self.execution_count,
            "cell_number": self.cell_number,
            "saved_by": self.saved_by,
            "reused": self.reused,
            "seconds": round(self.seconds, 6),
        }


def current_cell(shell: Any) -> int:
    """The number of the cell the user sees as the current one: the cell
    running now (a ``%checkpoint save`` in ``In [6]`` gives 6), else the last
    cell run (0 before the first). IPython 9 moves the counter on when a cell
    starts, IPython 8 when it ends: the running cell's own number is read
    from its result, which both set before the cell runs."""
    running = getattr(getattr(shell, "displayhook", None), "exec_result", None)
    info = getattr(running, "info", None)
    count = getattr(running, "execution_count", None)
    if (
        isinstance(count, int)
        and getattr(info, "store_history", False)
        and not getattr(info, "silent", False)
    ):
        return count
    return max(0, int(shell.execution_count) - 1)


def cell_number_of(manifest: dict[str, Any]) -> int | None:
    """The cell a manifest's state is from (older manifests only have the
    execution counter, one ahead of it)."""
    cell = manifest.get("cell_number")
    if isinstance(cell, int) and not isinstance(cell, bool):
        return cell
    count = manifest.get("execution_count")
    if isinstance(count, int) and not isinstance(count, bool) and count > 0:
        return count - 1
    return None


def saved_by_of(manifest: dict[str, Any]) -> dict[str, Any] | None:
    saved_by = manifest.get("saved_by")
    return saved_by if isinstance(saved_by, dict) else None
