"""What a new worker gets back after a death, and the words for it.

The session loads the automatic checkpoint (saved after each successful
cell) into the worker that replaces a dead one; these functions do that and
say, in the words a user reads under the cell, what came back and what did
not.
"""

from __future__ import annotations

import os
from typing import Any

from ..protocol import WORKER_DIED, CheckpointMessage, ErrorMessage
from .worker import WorkerDeadError, WorkerProcess


def died_text(cause: str) -> str:
    return f"the worker process died ({cause}) while running this cell; the cell is not re-run"


def died_error(cause: str, parent_id: str | None) -> ErrorMessage:
    """The ERROR the running cell gets when its worker dies."""
    evalue = died_text(cause)
    return ErrorMessage(
        ename=WORKER_DIED,
        evalue=evalue,
        traceback=[f"\x1b[0;31m{WORKER_DIED}\x1b[0m: {evalue}"],
        parent_id=parent_id,
    )


async def restore_autosave(
    worker: WorkerProcess, autosave_dir: str | None, execution_count: int
) -> str:
    """Load the automatic checkpoint of ``autosave_dir`` into ``worker``;
    the note that says what happened (``execution_count``: the last cell's
    number, for a checkpoint that does not carry it)."""
    head = "pyrepl3: a new worker is running"
    if not autosave_dir:
        return f"{head}; the state is lost (automatic checkpoints are off: PYREPL3_AUTOSAVE=0)\n"
    nothing = f"{head}; no saved state to restore (no cell had completed)\n"
    # The directory comes with the first save; ``auto.json`` only once it
    # is written: a crash right after the first cell finds the save still
    # on its way, and the restore waits for it (in the worker).
    if not os.path.isdir(autosave_dir):
        return nothing
    try:
        reply: Any = await worker.request(
            CheckpointMessage(action="restore", name="auto", store=autosave_dir)
        )
    except WorkerDeadError as exc:
        return f"{head}, but restoring the state failed: {exc}\n"
    if not reply.ok:
        if not os.path.exists(os.path.join(autosave_dir, "auto.json")):
            return nothing
        return f"{head}; the saved state could not be restored: {reply.evalue}\n"
    result = reply.result
    saved_cell = result.get("cell_number")  # the prompt the user saw
    if not isinstance(saved_cell, int):  # a worker from before cell_number
        count = result.get("execution_count")
        saved_cell = count - 1 if isinstance(count, int) and count > 0 else execution_count
    names = sorted(result.get("saved", {}))
    lines = [
        f"{head}; restored {len(names)} variable{'' if len(names) == 1 else 's'} as of cell {saved_cell}"
        + (f": {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}" if names else "")
    ]
    for var, reason in {**result.get("skipped", {}), **result.get("failed", {})}.items():
        lines.append(f"  not restored: {var}: {reason}")
    return "\n".join(lines) + "\n"
