"""Session state in the worker: checkpoint stores, ``%checkpoint``, source
tracking. The protocol's ``checkpoint`` request and the magic both go
through :meth:`StateManager.run`."""

from __future__ import annotations

import os
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class

from ..units import format_size
from . import sources
from .autosave import wait_for_autosave
from .checkpoint import CheckpointEngine, CheckpointError, Store

ACTIONS = ("save", "restore", "list", "delete", "info")


def default_store_root() -> str:
    """``$PYREPL3_CHECKPOINT_DIR``, else ``<jupyter data dir>/pyrepl3/checkpoints``."""
    configured = os.environ.get("PYREPL3_CHECKPOINT_DIR")
    if configured:
        return configured
    from jupyter_core.paths import jupyter_data_dir

    return os.path.join(jupyter_data_dir(), "pyrepl3", "checkpoints")


class StateManager:
    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self._engines: dict[str, CheckpointEngine] = {}
        sources.install(shell)
        shell.register_magics(CheckpointMagics(shell, manager=self))

    def engine(self, store: str | None = None) -> CheckpointEngine:
        root = store or default_store_root()
        engine = self._engines.get(root)
        if engine is None:
            engine = self._engines[root] = CheckpointEngine(self.shell, Store(root))
        return engine

    def run(
        self, action: str, name: str = "", *, store: str | None = None, clear: bool = True
    ) -> dict[str, Any]:
        """Do ``action``; the result is what ``checkpoint_reply.result`` carries."""
        if action not in ACTIONS:
            raise CheckpointError(
                f"unknown checkpoint action {action!r} (use one of {', '.join(ACTIONS)})"
            )
        engine = self.engine(store)
        if action == "save":
            return engine.save(name).as_dict()
        if action == "restore":
            # An automatic checkpoint may still be on its way (the worker that
            # wrote it may even have crashed meanwhile): let it land first.
            wait_for_autosave(engine.store.root)
            return engine.restore(name, clear=clear).as_dict()
        if action == "list":
            return {"checkpoints": engine.list()}
        if action == "info":
            return engine.info(name)
        engine.delete(name)
        return {"deleted": name}


def describe(action: str, name: str, result: dict[str, Any]) -> str:
    """A report for people (what ``%checkpoint`` prints)."""
    if action in ("save", "restore"):
        verb = "saved" if action == "save" else "restored"
        lines = [
            f"checkpoint {name!r}: {len(result['saved'])} names {verb} in {result['seconds'] * 1000:.0f} ms"
            + (f", {format_size(result['bytes_written'])} written" if action == "save" else "")
        ]
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
                count = len(c["names"])
                lines.append(
                    f"{c['name']}: {count} names, {format_size(c['size'])}, cell {c.get('execution_count')}"
                )
        return "\n".join(lines)
    if action == "info":
        lines = [f"checkpoint {name!r}: {format_size(result['size'])}, Python {result['python']}"]
        for var, entry in result["names"].items():
            detail = entry.get("reason") or entry.get("of") or format_size(entry.get("size", 0))
            lines.append(f"  {var}: {entry['status']} ({entry.get('type', '')}; {detail})")
        return "\n".join(lines)
    return f"checkpoint {name!r} deleted"


@magics_class
class CheckpointMagics(Magics):
    def __init__(self, shell: Any, manager: StateManager) -> None:
        super().__init__(shell)
        self.manager = manager

    @line_magic
    def checkpoint(self, line: str) -> None:
        """Save, restore, list, describe or delete checkpoints of this session.

        %checkpoint save NAME       save every variable (reports what was skipped and why)
        %checkpoint restore NAME    restore them (variables not in NAME are removed)
        %checkpoint list            the checkpoints in the store
        %checkpoint info NAME       what NAME holds, name by name
        %checkpoint delete NAME     delete NAME
        Add --store DIR_OR_URL to use another store than the default.
        """
        words = line.split()
        store = None
        if "--store" in words:
            i = words.index("--store")
            if i + 1 >= len(words):
                raise UsageError("--store needs a directory or URL")
            store = words[i + 1]
            del words[i : i + 2]
        if not words or words[0] not in ACTIONS or len(words) != (1 if words[0] == "list" else 2):
            raise UsageError(
                f"usage: %checkpoint {'|'.join(ACTIONS)} NAME [--store DIR_OR_URL] "
                "(list takes no NAME)"
            )
        action, name = words[0], words[1] if len(words) > 1 else ""
        try:
            result = self.manager.run(action, name, store=store)
        except CheckpointError as exc:
            raise UsageError(str(exc)) from None
        print(describe(action, name, result))
