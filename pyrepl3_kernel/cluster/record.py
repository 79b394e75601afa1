"""The record a kernel keeps next to its state in the store
(``<url>/<kernel id>/kernel.json``): which kernel holds the kernel id (host,
pid, start time), the cell it runs when that has lasted more than a second,
and whether it stopped on purpose. The next kernel of the id reads it to say
what happened to the previous one; every kernel checks before it writes that
the record is still its own (one writer per kernel id).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import Pyrepl3Error

log = logging.getLogger("pyrepl3.cluster")

RECORD_NAME = "kernel.json"
#: A cell still running after this many seconds is named in the record, so
#: that a kernel resumed after the loss of this one can say which cell died.
RUNNING_MARK_AFTER = 1.0


class Superseded(Pyrepl3Error):
    """Another kernel of this kernel id has started since (this one's host
    was taken for lost): this one must not overwrite that one's state."""


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


@dataclass
class Resumed:
    """What a kernel found in the store for its kernel id."""

    files: int
    bytes: int
    seconds: float
    #: The record the previous kernel of this id left: its host, and the cell
    #: it was running if it died in one.
    record: dict[str, Any] = field(default_factory=dict)

    def lost_note(self, here: str) -> str:
        """What the first cell after the resume says about the kernel before."""
        prev = self.record
        host = prev.get("host") or "another host"
        if prev.get("stopped"):
            how = (
                f"this kernel moved here from {host} (its state was saved there and restored here)"
            )
        else:
            how = (
                f"this kernel's previous host ({host}) or its kernel process was lost; "
                f"the kernel was started again on {here}"
            )
        running = prev.get("running")
        lines = [f"pyrepl3: {how}"]
        if running and not prev.get("stopped"):
            head = str(running.get("code", "")).strip().splitlines()[:1]
            lines.append(
                f"pyrepl3: the cell that was running there did not finish "
                f"(started {running.get('started', '?')}"
                + (f": {head[0][:80]!r}" if head else "")
                + "); it was not re-run"
            )
        return "\n".join(lines) + "\n"


class KernelRecord:
    """This kernel's record in the store at ``<prefix>/kernel.json``.

    ``fs`` is the store's fsspec filesystem; ``on_failure`` is told of a
    write the store refused (the mirror reports it under the next cell).
    """

    def __init__(
        self, fs: Any, prefix: str, host: str, on_failure: Callable[[BaseException], None]
    ) -> None:
        self.fs, self.path, self.on_failure = fs, f"{prefix}/{RECORD_NAME}", on_failure
        self.mine: dict[str, Any] = {"host": host, "pid": os.getpid(), "started": now()}
        self.written = False
        self.superseded: str | None = None
        self.running: dict[str, Any] | None = None
        self._running_since = 0.0

    def previous(self) -> dict[str, Any]:
        """The record in the store (the previous kernel's, before :meth:`write`)."""
        try:
            with self.fs.open(self.path, "rb") as f:
                record = json.loads(f.read())
            return record if isinstance(record, dict) else {}
        except (FileNotFoundError, ValueError):
            return {}

    def fence(self) -> None:
        """Raise Superseded if the record in the store is another kernel's
        (one started for this kernel id after this one, elsewhere): a host
        taken for lost that comes back must not overwrite the state of the
        kernel that replaced it. Checked before each write (the window
        between the check and the write remains)."""
        if self.superseded is not None:
            raise Superseded(self.superseded)
        if not self.written:
            return  # nothing of ours there yet: the first write puts it there
        record = self.previous()
        ours = {k: self.mine[k] for k in ("host", "pid", "started")}
        if record and {k: record.get(k) for k in ours} != ours:
            self.superseded = (
                f"this kernel was replaced by the one started on {record.get('host')} at "
                f"{record.get('started')}; it no longer saves its state"
            )
            log.error("%s", self.superseded)
            raise Superseded(self.superseded)

    def write(self, **changes: Any) -> bool:
        self.mine.update(changes)
        self.mine["updated"] = now()
        try:
            self.fence()
            with self.fs.open(self.path, "wb") as f:
                f.write(json.dumps(self.mine).encode())
        except Exception as exc:
            self.on_failure(exc)
            return False
        self.written = True
        return True

    def cell_started(self, cell_id: str, code: str) -> None:
        self.running = {"id": cell_id, "code": code[:2000], "started": now()}
        self._running_since = time.monotonic()

    def cell_finished(self) -> None:
        self.running = None

    def mark_running(self) -> None:
        """From the mirror's thread: name a cell running for more than
        RUNNING_MARK_AFTER seconds, or clear the name once it has ended."""
        running, marked = self.running, self.mine.get("running")
        if running is not None and marked is not running:
            if time.monotonic() - self._running_since >= RUNNING_MARK_AFTER:
                self.write(running=running)
        elif running is None and marked is not None:
            self.write(running=None)
