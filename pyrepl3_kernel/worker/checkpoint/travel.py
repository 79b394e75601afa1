"""Time travel: list the kernel's states, check one out in place, undo.

``checkout`` puts the namespace back to the state right after a cell, in
place: names bound later are removed, changed ones restored, with the usual
per-name report. Everything the state needs is read and verified before the
namespace changes: a state with a missing or corrupt blob is refused and the
namespace is left as it was. The execution counter goes on (the history of
what ran is not rewritten); the cell that checked out saves a state of its
own, which remembers which state it went back to (``at``), so ``undo`` twice
goes back two states.
"""

from __future__ import annotations

import time
from typing import Any

from ...diskusage import disk_usage
from ...units import format_size
from .autosave import wait_for_autosave
from .errors import CheckpointError
from .history import History, Retention, coalesced_cells
from .report import current_cell
from .restore import restore_manifest
from .store import Store

#: The actions of time travel (beside the checkpoint actions).
TRAVEL_ACTIONS = ("states", "checkout", "undo")


class TimeTravel:
    """The history of the kernel whose autosave store ``checkpoints`` knows."""

    def __init__(self, checkpoints: Any) -> None:
        self.checkpoints = checkpoints

    def _store(self) -> Store:
        root = self.checkpoints.autosave_store
        if not root:
            raise CheckpointError(
                "this kernel keeps no state history: automatic checkpoints are off "
                "(PYREPL3_AUTOSAVE=0, or a session started with autosave=False)"
            )
        autosave = getattr(self.checkpoints, "autosave", None)
        if autosave is not None:
            autosave.flush()  # a state left for later (cells ran back to back) is saved now
        if wait_for_autosave(root) and autosave is not None:  # the newest state lands first
            autosave.landed()
        store: Store = self.checkpoints.engine(root).store
        return store

    def run(self, action: str, name: str = "") -> dict[str, Any]:
        if action == "states":
            return self.states()
        if action == "undo":
            return self.undo()
        try:
            cell = int(str(name).strip().removeprefix("In[").removesuffix("]"))
        except ValueError:
            raise CheckpointError(
                f"checkout needs a cell number (the N of In [N]), not {name!r}"
            ) from None
        return self.checkout(cell)

    def states(self) -> dict[str, Any]:
        store = self._store()
        history = History(store)
        states = history.states()
        latest = states[-1]["seq"] if states else None
        return {
            "states": states,
            "current": latest,
            "retention": Retention.of(store.root).as_dict(),
            "disk_bytes": disk_usage(store.root),
        }

    def checkout(self, cell: int) -> dict[str, Any]:
        store = self._store()
        history = History(store)
        latest = history.latest()
        newest = latest[1].get("cell_number") if latest else None
        # (A worker that replaced a crashed one learns the count with its first cell.)
        now = max(current_cell(self.checkpoints.shell), newest if isinstance(newest, int) else 0)
        if cell > now:
            raise CheckpointError(
                f"the state after cell {cell} is not kept: cell {cell} has not run yet "
                f"(the last cell is {now})"
            )
        seq, manifest = history.find(cell)
        return self._go(store, seq, manifest, f"state after cell {cell}", cell)

    def undo(self) -> dict[str, Any]:
        """Back to the newest earlier state that differs from the current
        one (states of cells that changed nothing are passed over; after a
        checkout, "current" is the state it went back to, so ``undo`` twice
        goes back two changes)."""
        store = self._store()
        history = History(store)
        seqs = history.seqs()
        if not seqs:
            raise CheckpointError("nothing to undo: no state is kept yet")
        manifests: dict[int, dict[str, Any]] = {}
        for seq in seqs:
            try:
                manifests[seq] = history.read(seq)
            except CheckpointError:
                continue
        # Where each state stands: a checkout's state stands where it went
        # back to, a state that changed nothing where its predecessor stands.
        origin: dict[int, int] = {}
        previous: int | None = None
        for seq, manifest in manifests.items():
            at = manifest.get("at")
            if isinstance(at, int):
                origin[seq] = origin.get(at, at)
            elif previous is not None and _content(manifest) == _content(manifests[previous]):
                origin[seq] = origin[previous]
            else:
                origin[seq] = seq
            previous = seq
        if previous is None:
            raise CheckpointError("nothing to undo: no kept state is readable")
        position = origin[previous]
        current = _content(manifests.get(position, manifests[previous]))
        for seq in reversed([s for s in manifests if s < position]):
            manifest = manifests[seq]
            if _content(manifest) != current:
                cell = manifest.get("cell_number")
                return self._go(store, seq, manifest, f"state after cell {cell}", cell)
        raise CheckpointError("nothing to undo: no earlier kept state differs from this one")

    def _go(
        self, store: Store, seq: int, manifest: dict[str, Any], label: str, asked: Any
    ) -> dict[str, Any]:
        started = time.perf_counter()
        keep = self._unchanged(store, manifest)
        try:
            report = restore_manifest(
                self.checkpoints.shell, store, manifest, label, True, started, keep=keep
            )
        except CheckpointError as exc:
            raise CheckpointError(
                f"cannot check out the {label}: {exc}; the namespace was not changed"
            ) from None
        autosave = getattr(self.checkpoints, "autosave", None)
        if autosave is not None:
            autosave.checked_out(seq)
        else:
            self.checkpoints.position = seq
        result = report.as_dict()
        result.update(seq=seq, asked=asked, created=manifest.get("created"))
        return result

    def _unchanged(self, store: Store, manifest: dict[str, Any]) -> dict[str, Any]:
        """Names whose object now is the one ``manifest`` saved (same blob in
        the newest state, and nothing changed it since): left in place."""
        autosave = getattr(self.checkpoints, "autosave", None)
        latest = History(store).latest()
        if autosave is None or latest is None:
            return {}
        seq, newest = latest
        base_seq, clean = autosave.unchanged(newest["names"])
        if base_seq != seq:
            return {}
        ns = self.checkpoints.shell.user_ns
        keep = {}
        for var, entry in manifest["names"].items():
            now = newest["names"].get(var, {})
            if (
                var in clean
                and entry.get("blob")
                and entry.get("status") != "alias"
                and now.get("blob") == entry["blob"]
                and now.get("status") == entry.get("status")
            ):
                keep[var] = ns[var]
        return keep


def _content(manifest: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    """What a state holds, name by name (to tell states apart)."""
    return {
        var: (e.get("status"), e.get("blob"), e.get("of"), e.get("source"))
        for var, e in manifest.get("names", {}).items()
    }


# -- reports for people ------------------------------------------------------------------


def _names(prefix: str, names: list[str], limit: int = 6) -> str:
    shown = ", ".join(prefix + n for n in names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def describe_states(result: dict[str, Any]) -> str:
    states = result["states"]
    retention = result["retention"]
    head = (
        f"{len(states)} state{'' if len(states) == 1 else 's'} kept, "
        f"{format_size(result['disk_bytes'])} on disk "
        f"(budget {format_size(retention['budget'])}, up to {retention['keep']} states)"
    )
    if not states:
        return head + "\nno states yet: one is saved after each successful cell"
    cells = {s["seq"]: s.get("cell_number") for s in states if "error" not in s}
    lines = [head]
    for s in states:
        if "error" in s:
            lines.append(f"  (unreadable state {s['seq']}: {s['error']})")
            continue
        when = time.strftime("%H:%M:%S", time.localtime(s["created"] or 0))
        what = [
            part
            for part in (
                _names("+", s["added"]),
                _names("~", s["changed"]),
                _names("-", s["removed"]),
            )
            if part
        ]
        if s.get("at") is not None:
            back = cells.get(s["at"])
            what.insert(0, f"back to In [{back}]" if back is not None else "back to an older state")
        line = (
            f"  In [{s['cell_number']}]  {when}  {'; '.join(what) or 'no change'}"
            f"  ({format_size(s['bytes_added'])} added, {s['names']} names)"
        )
        if s["skipped"]:
            line += f"; not saved: {', '.join(s['skipped'])}"
        span = coalesced_cells(s)
        if span is not None:
            cells_run = (
                f"In [{span[0]}]" if span[0] == span[1] else f"In [{span[0]}]..In [{span[1]}]"
            )
            line += f"; also holds {cells_run} (ran back to back: coalesced, no state of their own)"
        if s["seq"] == result["current"]:
            line += "  <- now"
        lines.append(line)
    return "\n".join(lines)


def describe_checkout(result: dict[str, Any]) -> str:
    head = (
        f"checked out the state after cell {result['cell_number']}"
        f" in {result['seconds'] * 1000:.0f} ms: "
        f"{len(result['saved'])} name{'' if len(result['saved']) == 1 else 's'} restored"
    )
    unchanged = sum(1 for e in result["saved"].values() if e.get("unchanged"))
    if unchanged:
        head += f" ({unchanged} of them unchanged, left in place)"
    asked = result.get("asked")
    if isinstance(asked, int) and asked != result["cell_number"]:
        head += f" (cell {asked} saved no state of its own: it failed or changed nothing)"
    lines = [head]
    if result["removed"]:
        lines.append(f"  removed (bound later): {', '.join(result['removed'])}")
    for var, entry in result["saved"].items():
        if entry.get("status") == "rebuilt":
            lines.append(f"  rebuilt from its source: {var} ({entry.get('error', '')})")
    for var, reason in result["skipped"].items():
        lines.append(f"  not in that state: {var}: {reason}")
    for var, reason in result["failed"].items():
        lines.append(f"  failed {var}: {reason}")
    return "\n".join(lines)
