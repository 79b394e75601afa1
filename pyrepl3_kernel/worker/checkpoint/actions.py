"""Session state in the worker: checkpoint stores, ``%checkpoint``, source
tracking. The protocol's ``checkpoint`` request and the magic both go
through :meth:`Checkpoints.run`.

Checkpoint names are shared by every kernel using a store; each checkpoint
records who saved it (``saved_by``: the notebook, ``JPY_SESSION_NAME``, and
the kernel). A save never replaces a checkpoint that another notebook saved
(or, when neither has a notebook, another kernel) unless forced.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class

from ...units import format_size
from . import sources
from .autosave import wait_for_autosave
from .engine import CheckpointEngine
from .errors import CheckpointError, CheckpointExistsError
from .store import Store

ACTIONS = ("save", "restore", "list", "delete", "info")


def default_store_root() -> str:
    """``$PYREPL3_CHECKPOINT_DIR``, else ``<jupyter data dir>/pyrepl3/checkpoints``."""
    configured = os.environ.get("PYREPL3_CHECKPOINT_DIR")
    if configured:
        return configured
    from jupyter_core.paths import jupyter_data_dir

    return os.path.join(jupyter_data_dir(), "pyrepl3", "checkpoints")


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


class Checkpoints:
    """A worker's checkpoints (``worker.checkpoints``): the stores it uses, who
    it saves as, the ``%checkpoint`` magic, and the actions both run."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self._engines: dict[str, CheckpointEngine] = {}
        #: The kernel's own store of automatic checkpoints (set by
        #: :class:`~.autosave.Autosave`). The gateway gives each kernel one,
        #: named after the kernel id and kept across its workers: it is what
        #: identifies the kernel to this worker.
        self.autosave_store: str | None = None
        #: The identity of a worker that has no kernel store (autosave off,
        #: or a :class:`~pyrepl3_kernel.session.Session` without a gateway).
        self._worker_id = f"worker-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        sources.install(shell)
        shell.register_magics(CheckpointMagics(shell, manager=self))

    def owner(self) -> dict[str, Any]:
        """Who saves from this worker: ``{"notebook": JPY_SESSION_NAME or
        None, "kernel": the kernel's id}`` (``worker-<pid>-<random>`` when the
        worker does not know its kernel)."""
        kernel = self._worker_id
        if self.autosave_store and "://" not in self.autosave_store:
            kernel = os.path.basename(os.path.normpath(self.autosave_store)) or kernel
        return {"notebook": os.environ.get("JPY_SESSION_NAME") or None, "kernel": kernel}

    def engine(self, store: str | None = None) -> CheckpointEngine:
        root = store or default_store_root()
        engine = self._engines.get(root)
        if engine is None:
            engine = self._engines[root] = CheckpointEngine(self.shell, Store(root))
        return engine

    def run(
        self,
        action: str,
        name: str = "",
        *,
        store: str | None = None,
        clear: bool = True,
        force: bool = False,
    ) -> dict[str, Any]:
        """Do ``action``; the result is what ``checkpoint_reply.result`` carries.
        A ``save`` over another owner's checkpoint raises
        :class:`CheckpointExistsError` unless ``force``."""
        if action not in ACTIONS:
            raise CheckpointError(
                f"unknown checkpoint action {action!r} (use one of {', '.join(ACTIONS)})"
            )
        engine = self.engine(store)
        owner = self.owner()
        if action == "save":
            return self._save(engine, name, owner, force)
        if action == "restore":
            # An automatic checkpoint may still be on its way (the worker that
            # wrote it may even have crashed meanwhile): let it land first.
            wait_for_autosave(engine.store.root)
            return engine.restore(name, clear=clear).as_dict()
        if action == "list":
            listed = engine.list()
            for summary in listed:
                if "error" not in summary:
                    summary["saved_here"] = same_owner(summary.get("saved_by"), owner)
            return {"checkpoints": listed}
        if action == "info":
            summary = engine.info(name)
            summary["saved_here"] = same_owner(summary.get("saved_by"), owner)
            return summary
        engine.delete(name)
        return {"deleted": name}

    def _save(
        self, engine: CheckpointEngine, name: str, owner: dict[str, Any], force: bool
    ) -> dict[str, Any]:
        try:
            previous: dict[str, Any] | None = engine.info(name)
        except CheckpointError:  # none yet, a bad name (save says so) or unreadable
            previous = None
        if previous is not None and not force and not same_owner(previous["saved_by"], owner):
            when = origin({**previous, "saved_by": None})
            raise CheckpointExistsError(
                f"checkpoint {name!r} was saved by {describe_owner(previous['saved_by'])} "
                f"({when}) and was not replaced: use another name, or save with force to "
                f'replace it (%checkpoint save {name} --force; "force": true in a request)'
            )
        result = engine.save(name, saved_by=owner).as_dict()
        result["replaced"] = (
            None
            if previous is None
            else {k: previous.get(k) for k in ("cell_number", "saved_by", "created")}
        )
        return result


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


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
