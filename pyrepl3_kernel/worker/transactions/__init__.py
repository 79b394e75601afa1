"""Transactions: what a failing cell did to the session is rolled back.

Policies (per kernel: ``$PYREPL3_TRANSACTION_POLICY`` or
``%transaction_policy``; per cell: a first line ``%%transaction [policy]``):

``off``
    Nothing is undone (what ipykernel does).
``bindings``
    Names the failing cell added are removed, names it rebound or deleted get
    their old objects back. Objects changed in place stay changed.
``full``
    ``bindings``, and the objects reachable from the names the cell mentions
    (and the globals of the user functions it mentions, transitively) are put
    back as they were before the cell: lists, dicts, sets, bytearrays, deques,
    arrays, numpy arrays, pandas objects, instances (``__dict__`` and
    ``__slots__``), user classes and functions, random generators. They are
    restored *in place* so every reference sees the old state; where that is
    impossible (an array resized in place) the name is rebound to the saved
    copy. Before each cell the snapshot keeps a shallow copy of each reachable
    container, a copy of each numpy buffer, and a copy-on-write copy of each
    pandas object (a deep copy before pandas' copy-on-write mode).

A cell fails when its reply has status ``error`` (an exception, a
KeyboardInterrupt from an interrupt, ``SystemExit``). After a rollback the
cell's stderr says what was undone and what was not; the execute reply
carries the same as a payload with source ``pyrepl3.rollback``.

See docs/transactions.md for what is and is not covered.
"""

from .manager import Transaction, TransactionManager
from .names import referenced_names
from .policy import ENV_POLICY, POLICIES, cell_policy, strip_transaction_line
from .report import PAYLOAD_SOURCE, Outcome
from .snapshot import Snapshot

__all__ = [
    "ENV_POLICY",
    "PAYLOAD_SOURCE",
    "POLICIES",
    "Outcome",
    "Snapshot",
    "Transaction",
    "TransactionManager",
    "cell_policy",
    "referenced_names",
    "strip_transaction_line",
]
