"""The session's side of time travel: the kernel's kept states, a checkout
of one, undo, and the retention the session asks for.

The states live in the session's autosave directory (the worker writes
them after each successful cell, see docs/checkpoints.md); the worker lists
them and checks one out through the ``checkpoint`` request. Retention set
on the session (``keep_states``, ``states_budget``) is written to the
directory's ``retention.settings`` (JSON), where every worker of the session reads it.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING, Any

from .. import diskusage
from ..errors import Pyrepl3Error
from ..protocol import CheckpointMessage
from ..units import parse_size

if TYPE_CHECKING:
    from .supervised import Session

SETTINGS_NAME = "retention.settings"


class TimeTravelError(Pyrepl3Error):
    """A state could not be listed or checked out; the message says why
    (the namespace is unchanged)."""


def budget_bytes(budget: int | str | None) -> int | None:
    if budget is None:
        return None
    value = parse_size(budget) if isinstance(budget, str) else int(budget)
    if value <= 0:
        raise ValueError(f"states_budget must be positive, not {budget!r}")
    return value


def write_settings(autosave_dir: str | None, keep: int | None, budget: int | None) -> None:
    """Record the session's retention in its autosave directory (atomically)."""
    if not autosave_dir or (keep is None and budget is None) or "://" in autosave_dir:
        return
    os.makedirs(autosave_dir, mode=0o700, exist_ok=True)
    settings: dict[str, int] = {}
    if keep is not None:
        settings["keep_states"] = keep
    if budget is not None:
        settings["states_budget"] = budget
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=autosave_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(settings, f)
    os.replace(tmp, os.path.join(autosave_dir, SETTINGS_NAME))


def disk_usage(autosave_dir: str | None) -> int | None:
    """Bytes the session's saved states take on disk (None: autosave off)."""
    if not autosave_dir or not os.path.isdir(autosave_dir):
        return None if not autosave_dir else 0
    return diskusage.disk_usage(autosave_dir)


async def run(session: Session, action: str, name: str = "") -> dict[str, Any]:
    reply: Any = await session.request(CheckpointMessage(action=action, name=name))
    if getattr(reply, "status", "error") != "ok":
        raise TimeTravelError(getattr(reply, "evalue", "") or f"{action} failed")
    result: dict[str, Any] = reply.result
    return result
