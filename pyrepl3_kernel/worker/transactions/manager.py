"""The kernel's side: the policy in force, and the worker's hooks that
begin a transaction before each cell and end it after."""

from __future__ import annotations

import itertools
import logging
import operator
import os
import sys
import time
from collections.abc import Iterable
from typing import Any

from ...units import size_from_env
from ..ipython_names import is_ipython_name
from .kinds import MISSING
from .magics import TransactionMagics
from .names import referenced_names
from .policy import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_OBJECTS,
    ENV_MAX_BYTES,
    ENV_MAX_OBJECTS,
    ENV_POLICY,
    POLICIES,
    cell_policy,
    strip_transaction_line,
)
from .report import Outcome
from .snapshot import Snapshot

log = logging.getLogger("pyrepl3.worker")


def _diff(ns: dict[str, Any], before: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Names added to ``ns`` since ``before``, and names of ``before`` now
    bound to another object or unbound (compared by identity, at C speed)."""
    n = len(before)
    names = list(ns)
    if names[:n] == list(before):
        # Nothing deleted: old names keep their places, new ones follow.
        current: Iterable[Any] = itertools.islice(ns.values(), n)
        changed = itertools.compress(before, map(operator.is_not, current, before.values()))
        return names[n:], list(changed)
    current = map(ns.get, before, itertools.repeat(MISSING))
    changed = itertools.compress(before, map(operator.is_not, current, before.values()))
    return list(ns.keys() - before.keys()), list(changed)


# -- one cell -----------------------------------------------------------------------------


class Transaction:
    """The state one cell may roll back to."""

    __slots__ = ("manager", "policy", "ns", "before", "snapshot")

    def __init__(self, manager: TransactionManager, policy: str, code: str) -> None:
        self.manager = manager
        self.policy = policy
        self.ns: dict[str, Any] = manager.shell.user_ns
        self.before = self.ns.copy()
        self.snapshot: Snapshot | None = None
        if policy == "full":
            self.snapshot = manager.take_snapshot(code, self.ns)

    def end(self, result: Any, *, silent: bool = False) -> Outcome | None:
        """After the cell: keep its effects, or (``result`` is a failure, or
        ``None`` for an interrupted run) roll them back and report."""
        if result is not None and result.success:
            return None
        started = time.perf_counter()
        outcome = self.rollback()
        outcome.seconds = time.perf_counter() - started
        executed = result is None or result.error_in_exec is not None
        if executed or outcome.changed:
            self.manager.report(outcome, silent=silent)
        return outcome

    def rollback(self) -> Outcome:
        outcome = Outcome(self.policy)
        ns, before = self.ns, self.before
        added, changed = _diff(ns, before)
        for name in added:
            if not is_ipython_name(name):
                del ns[name]
                outcome.removed.append(str(name))
        for name in changed:
            if not is_ipython_name(name):
                ns[name] = before[name]
                outcome.restored.append(str(name))
        outcome.removed.sort()
        outcome.restored.sort()
        if self.snapshot is not None:
            self._rollback_objects(self.snapshot, outcome)
        return outcome

    def _rollback_objects(self, snapshot: Snapshot, outcome: Outcome) -> None:
        changed, failed = snapshot.restore()
        for name, root in snapshot.roots.items():
            own = root.records[0] if root.records and root.records[0].obj is root.obj else None
            if own is not None and id(own.obj) in failed:
                if own.rebind is not MISSING and self.ns.get(name) is root.obj:
                    self.ns[name] = own.rebind
                    outcome.rebound.append(name)
                else:
                    outcome.failed[name] = failed[id(own.obj)]
            elif any(id(r.obj) in changed for r in root.records):
                nested = [failed[id(r.obj)] for r in root.records if id(r.obj) in failed]
                if nested:
                    outcome.failed[name] = "partly: " + nested[0]
                else:
                    outcome.in_place.append(name)
            if root.issues:
                outcome.not_covered[name] = "; ".join(root.issues)


# -- the kernel's side --------------------------------------------------------------------


class TransactionManager:
    """Per-kernel policy, the magics, and the worker's begin/end hooks."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.explicit: str | None = None  # set by %transaction_policy
        self._env_raw: Any = MISSING
        self._env_policy = "off"
        self._env_policy_source()  # warn about a bad value at start
        manager = shell.input_transformer_manager
        if strip_transaction_line not in manager.line_transforms:
            manager.line_transforms.insert(0, strip_transaction_line)
        shell.register_magics(TransactionMagics(shell, manager=self))

    # -- policy ----------------------------------------------------------------------

    def _env_policy_source(self) -> str:
        # Read on every cell (the pool configures the environment after the
        # worker started); os.environ.get costs ~0.7 us, the bytes dict 30 ns.
        data = getattr(os.environ, "_data", None)
        if isinstance(data, dict):
            raw = data.get(_ENV_POLICY_KEY)
        else:
            raw = os.environ.get(ENV_POLICY)
        if raw is self._env_raw:
            return self._env_policy
        self._env_raw = raw
        value = (os.fsdecode(raw) if isinstance(raw, bytes) else (raw or "")).strip().lower()
        if value in POLICIES:
            self._env_policy = value
        else:
            if value:
                log.warning(
                    "%s=%r is not one of %s; using 'off'", ENV_POLICY, value, ", ".join(POLICIES)
                )
                print(
                    f"pyrepl3: {ENV_POLICY}={value!r} is not one of {', '.join(POLICIES)}; "
                    "transactions are off",
                    file=sys.__stderr__ or sys.stderr,
                )
            self._env_policy = "off"
        return self._env_policy

    @property
    def policy(self) -> str:
        """The kernel's policy: ``%transaction_policy``'s, else the environment's."""
        return self.explicit or self._env_policy_source()

    def set_policy(self, policy: str | None) -> None:
        """``None`` goes back to the environment's policy."""
        if policy is not None and policy not in POLICIES:
            raise ValueError(f"unknown transaction policy {policy!r} (use {', '.join(POLICIES)})")
        self.explicit = policy

    @property
    def max_bytes(self) -> int:
        return size_from_env(os.environ, ENV_MAX_BYTES, DEFAULT_MAX_BYTES, log)

    @property
    def max_objects(self) -> int:
        return size_from_env(os.environ, ENV_MAX_OBJECTS, DEFAULT_MAX_OBJECTS, log)

    # -- hooks ---------------------------------------------------------------------

    def begin(self, code: str) -> Transaction | None:
        """Before the cell runs (outside user code: not interruptible)."""
        policy = self.explicit or self._env_policy_source()
        if code.startswith("%%transaction") or code[:1].isspace():
            policy = cell_policy(code) or policy
        if policy == "off":
            return None
        try:
            return Transaction(self, policy, code)
        except Exception:
            log.exception("could not start a transaction; the cell runs without one")
            return None

    def take_snapshot(self, code: str, ns: dict[str, Any]) -> Snapshot:
        snapshot = Snapshot(
            max_bytes=self.max_bytes,
            max_objects=self.max_objects,
            user_globals=ns,
            skip=(self.shell, ns, os.environ, sys.modules, self.shell.user_ns_hidden),
        )
        for name in referenced_names(code, ns):
            snapshot.add(name, ns[name])
        return snapshot

    def report(self, outcome: Outcome, *, silent: bool) -> None:
        try:
            self.shell.payload_manager.write_payload(outcome.as_payload())
        except Exception:
            log.exception("could not add the rollback payload")
        if silent:
            return
        stream = sys.__stderr__ or sys.stderr
        try:
            stream.write(outcome.describe() + "\n")
            stream.flush()
        except Exception:
            log.exception("could not write the rollback report")

    @staticmethod
    def end(transaction: Transaction | None, result: Any, *, silent: bool = False) -> None:
        """After the cell, whatever happened; never raises."""
        if transaction is None:
            return
        try:
            transaction.end(result, silent=silent)
        except Exception as exc:
            log.exception("rollback failed")
            print(
                f"pyrepl3: cell failed; rollback failed: {type(exc).__name__}: {exc}",
                file=sys.__stderr__ or sys.stderr,
            )


_ENV_POLICY_KEY = os.fsencode(ENV_POLICY)
