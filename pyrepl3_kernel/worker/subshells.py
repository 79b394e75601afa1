"""Kernel subshells (JEP 91) in the worker: one thread per subshell.

A subshell runs the requests sent for it (``subshell_id`` set) one after the
other on its own thread, in the same namespace as the main thread and
concurrently with it, as ipykernel 7 does. The main thread stays the main
shell: SIGINT, signal handlers and the cells' event loop stay there, and
every signal is blocked on subshell threads.

What a request on a subshell sees, compared with one on the main thread:

- its output: ``sys.stdout``/``sys.stderr`` writes go over the socket as
  OUTPUT messages naming the request (the pipes belong to the main thread's
  request), and :attr:`Worker.parent_id` names the subshell's request on its
  thread, so displays, results, errors and comm messages are its own;
- an interrupt: the message naming its request raises KeyboardInterrupt on
  its thread at the next Python bytecode (a blocking call finishes first;
  ``input()`` ends at once);
- ``input()``: asked with the subshell's request as parent;
- top-level ``await``: on an event loop of the subshell's own;
- no transaction (the transaction policy applies to main-shell cells).

Deleting a subshell interrupts its running request, aborts the queued ones,
and ends the thread; the reply to the delete comes last.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import signal
import sys
import threading
import uuid
from typing import TYPE_CHECKING, Any

from ..protocol import (
    DURING_AWAIT_REQUESTS,
    ORDERED_REQUESTS,
    UNKNOWN_SUBSHELL,
    AckMessage,
    ExecuteMessage,
    ExecuteReplyMessage,
    InterruptMessage,
    Message,
    MessageType,
    PingMessage,
    SubshellMessage,
    SubshellReplyMessage,
    failure_reply,
)
from . import introspection, output, stdin

if TYPE_CHECKING:
    from .main import Worker

log = logging.getLogger("pyrepl3.worker")

#: ``ename`` of a request a deleted subshell never ran.
SUBSHELL_DELETED = "SubshellDeleted"
#: Longest wait for a deleted subshell's thread to end before the delete is
#: answered anyway (code stuck in a blocking call ends when the call returns).
DELETE_GRACE_S = 2.0


def unknown_subshell_text(subshell_id: str) -> str:
    """ipykernel's words for an unknown id."""
    return f"Unknown subshell_id {subshell_id!r}"


def _raise_in_thread(ident: int, exc: type[BaseException] | None) -> None:
    """Raise ``exc`` in the thread ``ident`` at its next bytecode; None takes
    back one not raised yet."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), exc and ctypes.py_object(exc))


# -- which shell a comm's answer goes to -------------------------------------------

_replies_lock = threading.Lock()


def _request_id(data: Any) -> str | None:
    content = data.get("content") if isinstance(data, dict) else None
    value = content.get("id") if isinstance(content, dict) else None
    return value if isinstance(value, str) else None


def note_sender(comm: Any, data: Any) -> None:
    """A comm sends ``data`` from this thread: the frontend's answer goes
    back to this thread's shell (as ipykernel's ``_reply_subshell_for``), so
    that a cell awaiting it on the main shell gets it there, whatever
    subshell the frontend sends it on."""
    thread = threading.current_thread()
    subshell_id = thread.subshell_id if isinstance(thread, SubshellThread) else None
    request_id = _request_id(data)
    with _replies_lock:
        comm._pyrepl3_reply_shell = subshell_id
        if request_id is not None:
            comm.__dict__.setdefault("_pyrepl3_replies", {})[request_id] = subshell_id


def reply_shell(comm: Any, data: Any, default: str | None) -> str | None:
    """The shell (a subshell id, None: the main shell) that takes a message
    for ``comm``: the one that sent the request it answers, else the last
    one that sent on it, else ``default``."""
    request_id = _request_id(data)
    with _replies_lock:
        replies = comm.__dict__.get("_pyrepl3_replies", {})
        if request_id is not None and request_id in replies:
            return replies.pop(request_id)  # type: ignore[no-any-return]
        return getattr(comm, "_pyrepl3_reply_shell", default)


class SubshellThread(threading.Thread):
    """One subshell: a queue of requests and the thread that runs them."""

    def __init__(self, worker: Worker, subshells: Subshells, subshell_id: str) -> None:
        super().__init__(name=f"subshell-{subshell_id}", daemon=True)
        self.worker = worker
        self.subshells = subshells
        self.subshell_id = subshell_id
        self.requests: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        #: The request being handled (parent of what it emits).
        self.parent: str | None = None
        #: The request running user code now (what an interrupt ends).
        self.running: str | None = None
        self.allow_stdin = False
        self._lock = threading.Lock()
        self._input: stdin.InputSlot | None = None
        self._deleting: SubshellMessage | None = None
        self._deleted_told = False
        self._loop: Any = None

    # -- called on the I/O thread ------------------------------------------------

    def interrupt(self, target: str | None) -> bool:
        """Interrupt the running request (``target``: only if it is that one);
        says whether one was interrupted."""
        with self._lock:
            running = self.running
            if running is None or target not in (None, running):
                return False
            slot = self._input
            if slot is not None:
                slot.interrupted = True
                slot.event.set()
            elif self.ident is not None:
                _raise_in_thread(self.ident, KeyboardInterrupt)
            return True

    def delete(self, request: SubshellMessage) -> None:
        """End the subshell: interrupt what runs, abort what waits, then
        answer ``request`` and end the thread."""
        self._deleting = request
        self.requests.put(None)
        self.interrupt(None)
        self.join(0.05)  # an idle subshell ends at once
        if self.is_alive():
            timer = threading.Timer(DELETE_GRACE_S, self._tell_deleted)
            timer.daemon = True
            timer.start()

    def deliver_during_await(self, msg: Message) -> bool:
        """Hand a comm message to the running cell's event loop if the cell
        is in a top-level ``await`` (it may wait for exactly this message, a
        widget's answer), as on the main shell; False if it is not."""
        loop = self._loop
        if self.running is None or loop is None or not loop.is_running():
            return False
        try:
            loop.call_soon_threadsafe(self._comm_during_cell, msg)
        except RuntimeError:  # the loop closed meanwhile
            return False
        return True

    def _tell_deleted(self) -> None:
        """Answer the delete, once: when the thread ends, or after the grace."""
        with self._lock:
            if self._deleted_told or self._deleting is None:
                return
            self._deleted_told = True
        self.worker.channel.send(
            SubshellReplyMessage(
                parent_id=self._deleting.id,
                action="delete",
                subshell_id=self.subshell_id,
                subshell_ids=self.subshells.ids(),
            )
        )

    # -- the thread ----------------------------------------------------------------

    def run(self) -> None:
        # Signals are the main thread's (SIGINT interrupts the main shell).
        signal.pthread_sigmask(
            signal.SIG_BLOCK, set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}
        )
        output.write_through_socket()
        try:
            while True:
                req = self.requests.get()
                if req is None:
                    break
                if self._deleting is not None:
                    self._abort(req)
                    continue
                self._handle(req)
        finally:
            if self._loop is not None:
                self._loop.close()
            self._tell_deleted()

    def _handle(self, req: Message) -> None:
        token = output.cell_parent.set(req.id)
        self.parent = req.id
        try:
            if req.type == MessageType.EXECUTE:
                assert isinstance(req, ExecuteMessage)
                self._execute(req)
            elif req.type in _INTROSPECTION:
                self.worker.emit(_INTROSPECTION[req.type](self.worker.shell, req))
            elif req.type == MessageType.COMM_INFO:
                self.worker._comm_info(req)
            elif req.type in (MessageType.COMM_OPEN, MessageType.COMM_MSG, MessageType.COMM_CLOSE):
                self._comm(req)
            else:
                self.worker.emit(
                    failure_reply(req, "ValueError", f"a subshell does not run {req.type.value!r}")
                )
        except KeyboardInterrupt:
            self.worker.emit(failure_reply(req, "KeyboardInterrupt", "interrupted"))
        except Exception as exc:
            log.exception("error handling %s on subshell %s", req.type, self.subshell_id)
            self.worker.emit(failure_reply(req, type(exc).__name__, str(exc)))
        finally:
            self.parent = None
            output.cell_parent.reset(token)

    def _abort(self, req: Message) -> None:
        if req.type == MessageType.EXECUTE:
            count = self.worker.shell.execution_count - 1
            self.worker.emit(
                ExecuteReplyMessage(status="aborted", parent_id=req.id, execution_count=count)
            )
        else:
            text = f"subshell {self.subshell_id!r} was deleted"
            self.worker.emit(failure_reply(req, SUBSHELL_DELETED, text))

    def _user_code(self, request_id: str | None) -> None:
        """Mark the start (an id) or the end (None) of user code."""
        with self._lock:
            self.running = request_id
            if request_id is None and self.ident is not None:
                # An interrupt that came too late must not land in bookkeeping.
                _raise_in_thread(self.ident, None)

    def _execute(self, req: ExecuteMessage) -> None:
        shell = self.worker.shell
        self.allow_stdin = req.allow_stdin
        result = None
        self._user_code(req.id)
        try:
            result = self._run_cell(req)
        except KeyboardInterrupt:
            pass
        finally:
            self._user_code(None)
        count = shell.execution_count - 1
        if result is not None and result.execution_count is not None:
            count = result.execution_count
        reply = self.worker.execute_reply(req, result, count)
        if self.worker.autosave.dirty:
            # Before the reply: ahead of any request sent after it.
            self.worker._requests.put(self.subshells.wake)
            self.worker._idle_loop.notify()
        self.worker.emit(reply)

    def _run_cell(self, req: ExecuteMessage) -> Any:
        """IPython's ``run_cell``, with top-level ``await`` on this thread's
        own event loop (the cells' loop belongs to the main thread)."""
        from IPython.core.async_helpers import _pseudo_sync_runner

        shell = self.worker.shell
        shell._last_traceback = None
        shell.displayhook_error = None
        shell.displayhook.in_progress = False
        result = None
        try:
            error = None
            try:
                transformed = shell.transform_cell(req.code)
            except Exception:
                transformed, error = req.code, sys.exc_info()
            coro = shell.run_cell_async(
                req.code,
                store_history=req.store_history,
                silent=req.silent,
                transformed_cell=transformed,
                preprocessing_exc_tuple=error,
                cell_id=req.cell_id,
            )
            if shell.should_run_async(
                req.code, transformed_cell=transformed, preprocessing_exc_tuple=error
            ):
                result = self._event_loop().run_until_complete(coro)
            else:
                result = _pseudo_sync_runner(coro)
        finally:
            shell.events.trigger("post_execute")
            if not req.silent:
                shell.events.trigger("post_run_cell", result)
        return result

    def _event_loop(self) -> Any:
        if self._loop is None:
            import asyncio

            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
        return self._loop

    def _comm(self, req: Any) -> None:
        from .comms import as_jupyter_msg

        handler = getattr(self.worker.comm_manager, req.type.value)
        self.allow_stdin = False
        self._user_code(req.id)
        try:
            handler(None, None, as_jupyter_msg(req))
        finally:
            self._user_code(None)
        self.worker.emit(AckMessage(parent_id=req.id))

    def _comm_during_cell(self, req: Any) -> None:
        from .comms import as_jupyter_msg

        reply = AckMessage(parent_id=req.id)
        try:
            getattr(self.worker.comm_manager, req.type.value)(None, None, as_jupyter_msg(req))
        except Exception as exc:
            log.exception("error handling %s on subshell %s", req.type, self.subshell_id)
            reply.status, reply.ename, reply.evalue = "error", type(exc).__name__, str(exc)
        self.worker.emit(reply)

    def request_input(self, prompt: str, password: bool) -> str:
        """``input()`` on this subshell: asked with its request as parent."""
        return stdin.request_input(
            self.worker, prompt, password, self.parent, self.allow_stdin, self._track_input
        )

    def _track_input(self, slot: stdin.InputSlot | None) -> None:
        with self._lock:  # what interrupt() ends
            self._input = slot


_INTROSPECTION: dict[MessageType, Any] = {
    MessageType.COMPLETE: introspection.complete,
    MessageType.INSPECT: introspection.inspect,
    MessageType.HISTORY: introspection.history,
    MessageType.IS_COMPLETE: introspection.is_complete,
}


class Subshells:
    """The worker's subshells, by id (created and deleted on the I/O thread)."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._threads: dict[str, SubshellThread] = {}
        self._lock = threading.Lock()
        #: Queued to the main thread after a subshell's cell that leaves an
        #: automatic checkpoint due: the main thread starts it (as after its
        #: own cells), also while it has nothing else to do.
        self.wake = PingMessage()

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._threads)

    @staticmethod
    def current() -> SubshellThread | None:
        """The subshell whose thread this is, or None."""
        thread = threading.current_thread()
        return thread if isinstance(thread, SubshellThread) else None

    def parent_id(self, main_parent: str | None) -> str | None:
        """The request whose effects this thread emits: its subshell's
        request on a subshell thread, else ``main_parent``."""
        subshell = self.current()
        return main_parent if subshell is None else subshell.parent

    # -- on the I/O thread -------------------------------------------------------------

    def dispatch(self, msg: Message) -> bool:
        """Take ``msg`` if it is for the subshells (a subshell request, an
        interrupt of a subshell's request, a request naming a subshell);
        False leaves it to the main thread."""
        if msg.type == MessageType.SUBSHELL:
            assert isinstance(msg, SubshellMessage)
            self._control(msg)
            return True
        if msg.type == MessageType.INTERRUPT:
            assert isinstance(msg, InterruptMessage)
            if msg.target is None:
                return False
            with self._lock:
                threads = list(self._threads.values())
            return any(thread.interrupt(msg.target) for thread in threads)
        subshell_id = getattr(msg, "subshell_id", None)
        if msg.type in (MessageType.COMM_MSG, MessageType.COMM_CLOSE):
            comm = self._worker.comm_manager.comms.get(getattr(msg, "comm_id", ""))
            if comm is not None:
                subshell_id = reply_shell(comm, getattr(msg, "data", None), subshell_id)
        if msg.type not in ORDERED_REQUESTS or not subshell_id:
            return False
        with self._lock:
            thread = self._threads.get(subshell_id)
        if thread is None:
            evalue = unknown_subshell_text(subshell_id)
            self._worker.channel.send(failure_reply(msg, UNKNOWN_SUBSHELL, evalue))
        elif msg.type not in DURING_AWAIT_REQUESTS or not thread.deliver_during_await(msg):
            thread.requests.put(msg)
        return True

    def _control(self, msg: SubshellMessage) -> None:
        reply = SubshellReplyMessage(parent_id=msg.id, action=msg.action)
        if msg.action == "create":
            subshell_id = msg.subshell_id or str(uuid.uuid4())
            with self._lock:
                taken = subshell_id in self._threads
                if not taken:
                    thread = SubshellThread(self._worker, self, subshell_id)
                    self._threads[subshell_id] = thread
            if taken:
                reply.status, reply.ename = "error", "ValueError"
                reply.evalue = f"subshell_id {subshell_id!r} is in use"
            else:
                thread.start()
                reply.subshell_id = subshell_id
        elif msg.action == "delete":
            with self._lock:
                thread_or_none = self._threads.pop(msg.subshell_id or "", None)
            if thread_or_none is not None:
                thread_or_none.delete(msg)  # the thread answers when it has ended
                return
            reply.status, reply.ename = "error", UNKNOWN_SUBSHELL
            reply.evalue = unknown_subshell_text(msg.subshell_id or "")
        elif msg.action != "list":
            reply.status, reply.ename = "error", "ValueError"
            reply.evalue = f"unknown subshell action {msg.action!r} (create, delete, list)"
        reply.subshell_ids = self.ids()
        self._worker.channel.send(reply)
