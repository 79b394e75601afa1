"""Session state in the worker: checkpoint stores, ``%checkpoint``, source
tracking. The protocol's ``checkpoint`` request and the magic both go
through :meth:`Checkpoints.run`.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from . import sources
from .autosave import wait_for_autosave
from .engine import ACTIONS, CheckpointEngine
from .errors import CheckpointError, CheckpointExistsError
from .magics import CheckpointMagics, TravelMagics
from .owners import describe_owner, origin, same_owner
from .store import Store, default_store_root
from .travel import TRAVEL_ACTIONS, TimeTravel


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
        #: The state a checkout went back to (its ``seq``), for the next
        #: automatic save to record; and the autosave's "save now" hook.
        self.position: int | None = None
        self.changed: Any = None
        self.autosave: Any = None  # set by Autosave
        self.travel = TimeTravel(self)
        sources.install(shell)
        shell.register_magics(CheckpointMagics(shell, manager=self))
        shell.register_magics(TravelMagics(shell, travel=self.travel))

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
        :class:`CheckpointExistsError` unless ``force``. ``states``,
        ``checkout`` (``name``: the cell number) and ``undo`` are about the
        kernel's state history (:mod:`.travel`)."""
        if action in TRAVEL_ACTIONS:
            return self.travel.run(action, name)
        if action not in ACTIONS:
            raise CheckpointError(
                f"unknown checkpoint action {action!r} "
                f"(use one of {', '.join(ACTIONS + TRAVEL_ACTIONS)})"
            )
        engine = self.engine(store)
        owner = self.owner()
        if action == "save":
            return self._save(engine, name, owner, force)
        if action == "restore":
            # An automatic checkpoint may still be on its way (the worker that
            # wrote it may even have crashed meanwhile): let it land first.
            wait_for_autosave(engine.store.root)
            restored = engine.restore(name, clear=clear)
            autosave = getattr(self, "autosave", None)
            if (
                autosave is not None
                and name == "auto"
                and clear
                and engine.store.root == (self.autosave_store or "").rstrip("/")
            ):
                # Crash recovery: the namespace is the newest state, and the
                # next automatic save is incremental against it.
                seq = engine.store.read_manifest(name).get("autosave_seq")
                if isinstance(seq, int):
                    autosave.restored(seq)
            return restored.as_dict()
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
