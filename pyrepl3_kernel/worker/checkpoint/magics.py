"""``%checkpoint``, and the report it prints."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class

from ...units import format_size
from .engine import ACTIONS
from .errors import CheckpointError
from .owners import origin

if TYPE_CHECKING:
    from .actions import Checkpoints
    from .travel import TimeTravel


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def describe(action: str, name: str, result: dict[str, Any]) -> str:
    """A report for people (what ``%checkpoint`` prints)."""
    if action in ("save", "restore"):
        verb = "saved" if action == "save" else "restored"
        head = f"checkpoint {name!r}: {_count(len(result['saved']), 'name')} {verb} in {result['seconds'] * 1000:.0f} ms"
        if action == "save":
            head += f", {format_size(result['bytes_written'])} written"
            if result.get("reused"):
                head += f" ({_count(result['reused'], 'unchanged object')} already in the store)"
        else:
            head += f", as of {origin(result, with_time=False)}"
        lines = [head]
        replaced = result.get("replaced")
        if replaced:
            lines.append(f"  replaced the checkpoint {name!r} of {origin(replaced)}")
        by_source = [v for v, e in result["saved"].items() if e.get("status") == "source"]
        if by_source:
            lines.append(f"  saved as their source: {', '.join(by_source)}")
        for var, entry in result["saved"].items():
            if entry.get("status") == "rebuilt":
                lines.append(f"  rebuilt from its source: {var} ({entry.get('error', '')})")
        for var, reason in result["skipped"].items():
            lines.append(f"  skipped {var}: {reason}")
        for var, reason in result["failed"].items():
            lines.append(f"  failed {var}: {reason}")
        if result.get("removed"):
            lines.append(
                f"  removed (not in the checkpoint, or not restorable): {', '.join(result['removed'])}"
            )
        return "\n".join(lines)
    if action == "list":
        items = result["checkpoints"]
        if not items:
            return "no checkpoints"
        lines = []
        for c in items:
            if "error" in c:
                lines.append(f"{c['name']}: {c['error']}")
            else:
                count = _count(len(c["names"]), "name")
                lines.append(f"{c['name']}: {count}, {format_size(c['size'])}, {origin(c)}")
        return "\n".join(lines)
    if action == "info":
        lines = [
            f"checkpoint {name!r}: {format_size(result['size'])}, Python {result['python']}, "
            + origin(result)
        ]
        for var, entry in result["names"].items():
            detail = entry.get("reason") or entry.get("of") or format_size(entry.get("size", 0))
            lines.append(f"  {var}: {entry['status']} ({entry.get('type', '')}; {detail})")
        return "\n".join(lines)
    return f"checkpoint {name!r} deleted"


@magics_class
class CheckpointMagics(Magics):
    def __init__(self, shell: Any, manager: Checkpoints) -> None:
        super().__init__(shell)
        self.manager = manager

    @line_magic
    def checkpoint(self, line: str) -> None:
        """Save, restore, list, describe or delete checkpoints of this session.

        %checkpoint save NAME       save every variable (reports what was skipped and why);
                                    --force replaces another notebook's NAME
        %checkpoint restore NAME    restore them (variables not in NAME are removed)
        %checkpoint list            the checkpoints in the store
        %checkpoint info NAME       what NAME holds, name by name
        %checkpoint delete NAME     delete NAME
        Add --store DIR_OR_URL to use another store than the default.

        Names are shared by every kernel using the store: a save does not
        replace a checkpoint another notebook (or, without notebooks, another
        kernel) saved, unless given --force. A restore leaves the prompt
        numbers of this session as they are.
        """
        words = line.split()
        store = None
        if "--store" in words:
            i = words.index("--store")
            if i + 1 >= len(words):
                raise UsageError("--store needs a directory or URL")
            store = words[i + 1]
            del words[i : i + 2]
        force = "--force" in words
        if force:
            words.remove("--force")
        if not words or words[0] not in ACTIONS or len(words) != (1 if words[0] == "list" else 2):
            raise UsageError(
                f"usage: %checkpoint {'|'.join(ACTIONS)} NAME [--store DIR_OR_URL] "
                "(list takes no NAME; save takes --force to replace another notebook's checkpoint)"
            )
        action, name = words[0], words[1] if len(words) > 1 else ""
        if force and action != "save":
            raise UsageError("--force is for save only")
        try:
            result = self.manager.run(action, name, store=store, force=force)
        except CheckpointError as exc:
            raise UsageError(str(exc)) from None
        print(describe(action, name, result))


@magics_class
class TravelMagics(Magics):
    """``%states``, ``%checkout N``, ``%undo``: the kernel's state history."""

    def __init__(self, shell: Any, travel: TimeTravel) -> None:
        super().__init__(shell)
        self.travel = travel

    def _run(self, action: str, name: str = "") -> dict[str, Any]:
        try:
            return self.travel.run(action, name)
        except CheckpointError as exc:
            raise UsageError(str(exc)) from None

    @line_magic
    def states(self, line: str) -> None:
        """The states this kernel keeps: one after each successful cell,
        with the names it added (+), changed (~) and removed (-), the bytes
        it added, and the disk used against the kernel's budget."""
        from .travel import describe_states

        if line.strip():
            raise UsageError("usage: %states (no arguments)")
        print(describe_states(self._run("states")))

    @line_magic
    def checkout(self, line: str) -> None:
        """%checkout N: put the namespace back to the state right after
        cell In [N], in place (names bound later are removed). The prompt
        numbers go on; %undo goes back again."""
        from .travel import describe_checkout

        words = line.split()
        if len(words) != 1:
            raise UsageError("usage: %checkout N (the number of a cell, In [N])")
        print(describe_checkout(self._run("checkout", words[0])))

    @line_magic
    def undo(self, line: str) -> None:
        """%undo: back to the state before the last change (the state kept
        before the newest one); twice goes back twice."""
        from .travel import describe_checkout

        if line.strip():
            raise UsageError("usage: %undo (no arguments)")
        print(describe_checkout(self._run("undo")))
