"""``%transaction_policy`` and ``%%transaction``."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from .policy import ENV_POLICY, POLICIES

if TYPE_CHECKING:
    from .manager import TransactionManager

#: What each policy does to a cell that fails, as %transaction_policy says it.
_POLICY_EFFECTS = {
    "off": "a failing cell's changes stay (as in ipykernel)",
    "bindings": "a failing cell's new, rebound and deleted names are rolled back",
    "full": "a failing cell's names and in-place changes to the objects "
    "it reaches by name are rolled back",
}


@magics_class
class TransactionMagics(Magics):
    def __init__(self, shell: Any, manager: TransactionManager) -> None:
        super().__init__(shell)
        self.manager = manager

    @line_magic
    def transaction_policy(self, line: str) -> None:
        """Show or set what a failing cell rolls back.

        %transaction_policy            show the current policy
        %transaction_policy off        roll back nothing (as ipykernel)
        %transaction_policy bindings   undo the names a failing cell added, rebound or deleted
        %transaction_policy full       also undo in-place changes to the objects the cell
                                       reaches by name (see docs/transactions.md)
        %transaction_policy default    go back to $PYREPL3_TRANSACTION_POLICY (else off)

        A single cell can ask for another policy with a first line
        ``%%transaction [bindings|full|off]``.
        """
        words = line.split()
        if words and (len(words) != 1 or words[0] not in (*POLICIES, "default")):
            raise UsageError(f"usage: %transaction_policy [{'|'.join(POLICIES)}|default]")
        if words:
            self.manager.set_policy(None if words[0] == "default" else words[0])
        # Setting it says what is now in force, as showing it does.
        source = "set by %transaction_policy" if self.manager.explicit else f"${ENV_POLICY}"
        if not self.manager.explicit and not os.environ.get(ENV_POLICY):
            source = "default"
        policy = self.manager.policy
        print(f"transaction policy: {policy} ({source}): {_POLICY_EFFECTS[policy]}")

    @cell_magic
    def transaction(self, line: str, cell: str) -> None:
        """Run this cell under a transaction policy of its own.

        %%transaction [full|bindings|off]    (default: full)

        Must be the first line of the cell. If the cell fails, what it did is
        rolled back as the policy says and the output reports what was undone
        and what was not; a cell that succeeds keeps its effects. The kernel's
        policy (%transaction_policy) applies to the other cells.
        """
        if line.strip() not in ("", *POLICIES):
            raise UsageError(f"usage: %%transaction [{'|'.join(POLICIES)}]")
        # The worker strips a valid first line before the cell runs; getting
        # here means the magic was called some other way.
        raise UsageError("%%transaction must be the first line of a cell")
