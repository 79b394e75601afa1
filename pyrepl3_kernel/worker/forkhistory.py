"""IPython history sessions for the fork server's forks.

Each fork needs a history session of its own (a row in the history
database). A fork that inserted its own before it was ready made the forks
of a burst queue for the database's write lock and disk sync one by one
(12 to 200 ms each in a burst of 20); so the server inserts the sessions of
a batch of forks in one transaction (:func:`new_sessions`) and each fork
takes its number (:func:`take_session`). A fork given none inserts its own,
as before. Used by ``worker/forkserver.py`` only.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

log = logging.getLogger("pyrepl3.forkserver")

#: How long the server waits for the history database's write lock before
#: it lets each fork of a batch make its own history session.
BUSY_MS = 100


def new_sessions(worker: Any, n: int) -> list[int]:
    """``n`` new history sessions in the database of ``worker``'s shell
    (the server's prebuilt worker), inserted in one transaction; empty if
    there is no worker, the history is not in a database file, or the
    database stays busy for :data:`BUSY_MS` (then each fork makes its own)."""
    hm = getattr(getattr(worker, "shell", None), "history_manager", None)
    if n <= 0 or hm is None or not hm.enabled or str(hm.hist_file) == ":memory:":
        return []
    try:
        # Busy (a worker writing its history): skip rather than hold every fork.
        hm.db.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
        started = datetime.datetime.now().isoformat(" ")
        with hm.db:
            return [
                int(
                    hm.db.execute(
                        "INSERT INTO sessions VALUES (NULL, ?, NULL, NULL, '')", (started,)
                    ).lastrowid
                )
                for _ in range(n)
            ]
    except Exception as exc:
        log.debug("fork server: no history sessions for %d forks: %s", n, exc)
        return []


def take_session(shell: Any, number: int | None) -> None:
    """In a fork: its own history session (``worker/fork.new_history_session``),
    session ``number``, which the server inserted for it, or (None) a new
    one inserted now."""
    from .fork import new_history_session

    hm = getattr(shell, "history_manager", None)
    if number is None or hm is None:
        new_history_session(shell)
        return

    def taken(conn: Any = None) -> None:
        hm.session_number = number

    hm.new_session = taken  # the row exists: new_history_session inserts none
    try:
        new_history_session(shell)
    finally:
        del hm.new_session
