"""A session's subshells (JEP 91): what the supervisor keeps of them.

The worker runs each subshell on a thread of its own (worker/subshells.py);
the session owns the list of subshell ids, so that they outlive a worker:
a worker that replaces a dead one gets the same subshells (by id) before it
serves anything, and a client's subshell ids stay valid across a crash. A
restart the user asked for starts without subshells, as a new ipykernel
process would.

A cell on a subshell runs concurrently with the main shell's cell and with
other subshells' cells (the worker process keeps their order per subshell);
when the worker dies, each of them ends as the main shell's cell does: an
ERROR ``WorkerDied`` naming the cause, what the new worker got back, and an
error reply.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from ..errors import Pyrepl3Error
from ..protocol import (
    UNKNOWN_SUBSHELL,
    WORKER_DIED,
    ErrorMessage,
    ExecuteMessage,
    ExecuteReplyMessage,
    Message,
    MessageType,
    OutputMessage,
    SubshellMessage,
    SubshellReplyMessage,
)
from . import recovery
from .worker import WorkerDeadError, WorkerProcess

if TYPE_CHECKING:
    from .supervised import Session


def unknown_subshell_text(subshell_id: str) -> str:
    return f"Unknown subshell_id {subshell_id!r}"


class UnknownSubshellError(Pyrepl3Error, KeyError):
    """No subshell of the session has this id."""

    def __init__(self, subshell_id: str) -> None:
        super().__init__(subshell_id)
        self.subshell_id = subshell_id

    def __str__(self) -> str:
        return unknown_subshell_text(self.subshell_id)


class SessionSubshells:
    """The subshells of one :class:`~.supervised.Session`.

    >>> subshell_id = await session.subshells.create()
    >>> async for msg in session.execute(ExecuteMessage(code="1+1", subshell_id=subshell_id)):
    ...     ...
    >>> await session.subshells.delete(subshell_id)
    """

    def __init__(self, session: Session) -> None:
        self._session = session
        self._ids: list[str] = []
        #: Subshell id -> the id of the cell it runs now.
        self._running: dict[str, str] = {}

    # -- what there is ---------------------------------------------------------------

    def ids(self) -> list[str]:
        """Every subshell, in creation order."""
        return list(self._ids)

    def __contains__(self, subshell_id: object) -> bool:
        return subshell_id in self._ids

    def running_in(self, subshell_id: str) -> str | None:
        """Id of the cell the subshell runs now, if any."""
        return self._running.get(subshell_id)

    @property
    def running(self) -> bool:
        """Whether a subshell runs a cell now."""
        return bool(self._running)

    # -- create and delete ----------------------------------------------------------------

    async def create(self) -> str:
        """A new subshell; its id."""
        reply = await self._request(SubshellMessage(action="create"))
        assert reply.subshell_id is not None
        self._ids.append(reply.subshell_id)
        return reply.subshell_id

    async def delete(self, subshell_id: str) -> None:
        """Delete a subshell: the cell it runs is interrupted, its queued
        requests aborted (returns once its thread has ended). Raises
        :class:`UnknownSubshellError` for an id that is not a subshell."""
        if subshell_id not in self._ids:
            raise UnknownSubshellError(subshell_id)
        self._ids.remove(subshell_id)
        with contextlib.suppress(WorkerDeadError):
            await self._request(SubshellMessage(action="delete", subshell_id=subshell_id))

    async def _request(self, request: SubshellMessage) -> SubshellReplyMessage:
        reply = await self._session.request(request)
        if not isinstance(reply, SubshellReplyMessage):
            raise WorkerDeadError(getattr(reply, "evalue", "") or "no reply from the worker")
        if not reply.ok:
            if reply.ename == UNKNOWN_SUBSHELL:
                raise UnknownSubshellError(request.subshell_id or "")
            raise RuntimeError(f"{reply.ename}: {reply.evalue}")
        return reply

    async def restore(self, worker: WorkerProcess) -> None:
        """Give a new worker the subshells of the one it replaces."""
        for subshell_id in self._ids:
            await worker.request(SubshellMessage(action="create", subshell_id=subshell_id))

    def forget(self) -> None:
        """No subshells any more (a restart the user asked for)."""
        self._ids.clear()

    # -- cells ------------------------------------------------------------------------------

    async def interrupt(self, subshell_id: str) -> bool:
        """Interrupt the cell the subshell runs, if any; says whether one ran.
        The cell sees it at its next Python bytecode (a blocking call
        finishes first); there is no escalation to a worker restart."""
        target = self._running.get(subshell_id)
        worker = self._session.worker
        if target is None or not worker.is_alive:
            return False
        with contextlib.suppress(WorkerDeadError):
            await worker.interrupt(target=target)
        return True

    async def execute(
        self, message: ExecuteMessage, on_start: Callable[[int], None] | None = None
    ) -> AsyncIterator[Message]:
        """:meth:`Session.execute` of a cell on a subshell (``subshell_id``)."""
        session = self._session
        subshell_id = message.subshell_id or ""
        reply: ExecuteReplyMessage | None = None
        crashed: ErrorMessage | None = None
        try:
            await session.ensure_worker()
            if subshell_id not in self._ids:
                raise UnknownSubshellError(subshell_id)
            outputs = session.worker.execute(message)
            if on_start is not None:
                on_start(session.next_execution_count(message))
            self._running[subshell_id] = message.id
            async for out in outputs:
                if out.type == MessageType.EXECUTE_REPLY:
                    assert isinstance(out, ExecuteReplyMessage)
                    reply = out
                    continue
                if out.type == MessageType.ERROR and getattr(out, "ename", "") == WORKER_DIED:
                    out = crashed = recovery.died_error(session.death_text(), message.id)
                yield out
            if crashed is not None and reply is not None:
                reply.evalue, reply.traceback = crashed.evalue, list(crashed.traceback)
        except UnknownSubshellError as exc:
            reply = ExecuteReplyMessage(
                status="error", ename=UNKNOWN_SUBSHELL, evalue=str(exc), parent_id=message.id
            )
        except WorkerDeadError as exc:
            crashed = recovery.died_error(exc.cause, message.id)
            yield crashed
        finally:
            self._running.pop(subshell_id, None)
        if crashed is not None:
            note = await session.recovery_note(keep=True)
            if note:
                yield OutputMessage(stream="stderr", data=note, parent_id=message.id)
            if reply is None:
                reply = ExecuteReplyMessage(
                    status="error",
                    ename=WORKER_DIED,
                    evalue=crashed.evalue,
                    traceback=list(crashed.traceback),
                    parent_id=message.id,
                )
        if reply is None:
            reply = ExecuteReplyMessage(
                status="error", ename=WORKER_DIED, evalue="no reply from the worker"
            )
            reply.parent_id = message.id
        if not reply.execution_count:
            reply.execution_count = session.execution_count
        session.execution_count = max(session.execution_count, reply.execution_count)
        yield reply
