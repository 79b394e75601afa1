"""Fork a live worker: the worker's side of the ``fork`` request.

The request is handled on the main thread between requests (an idle point:
no cell runs). The worker forks twice, so the new worker is nobody's child
here: not counted in this worker's process tree (memory limits), not killed
with its process group, not a zombie this worker must reap. The new worker
starts a session of its own (its own process group), connects to the Unix
socket the request names, proves it is the fork asked for with the request's
token, and takes the stdout/stderr pipes its new supervisor passes back
(``SCM_RIGHTS``). Then it is a worker like any other: a new I/O thread on the
new socket, READY, and the request loop goes on where the old one was, with
the whole namespace: objects a checkpoint cannot pickle (open sockets and
files, generators, C extension state) included.

What does not carry over is reported, name by name (``fork_reply.report``):
threads other than the main thread (a fork has only the thread that forked)
and locks they held (locked in the fork, with no thread to release them).
Open files and sockets carry over as the same open descriptions: both
workers share one connection or one file offset; they are reported as
``shared``.

Each fork gets its own random numbers (``random`` reseeds itself after a
fork, numpy's global generator is reseeded here), its own IPython history
session (a new session row, a new saving thread and database connection),
and its automatic checkpoint turned off until its supervisor configures one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from ..protocol import SUPPORTED_VERSIONS, ForkMessage, ForkReplyMessage, ReadyMessage
from .eventloop import _imported

if TYPE_CHECKING:
    from .main import Worker

log = logging.getLogger("pyrepl3.worker")

#: Threads of the worker itself: the fork starts its own.
_OWN_THREADS = ("pyrepl3-io", "IPythonHistorySavingThread")
#: How long the new worker waits for its supervisor's listener.
CONNECT_TIMEOUT_S = 30.0

_THREAD_LOST = "a thread runs only in the kernel that started it: a fork has only the main thread"


def fork(worker: Worker, req: ForkMessage) -> None:
    """Handle a ``fork`` request. Returns twice: in this worker, after the
    reply went out; in the new worker, once it is connected and READY was
    sent (the request loop then serves the new supervisor)."""
    if not req.path or not req.token:
        raise ValueError("a fork request needs the path of a Unix socket and a token")
    report = carry_report(worker.shell)
    sys.stdout.flush()
    sys.stderr.flush()
    worker.channel.drain_streams()
    read_pid, write_pid = os.pipe()
    first = os.fork()
    if first == 0:
        # The intermediate: fork the new worker, tell its pid, vanish.
        try:
            os.close(read_pid)
            second = os.fork()
        except BaseException:
            os._exit(1)
        if second == 0:
            os.close(write_pid)
            _become_fork(worker, req)  # ends the process if it fails
            return  # the new worker: back to the request loop
        try:
            os.write(write_pid, second.to_bytes(4, "little"))
        finally:
            os._exit(0)
    os.close(write_pid)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(first, 0)
    data = os.read(read_pid, 4)
    os.close(read_pid)
    if len(data) != 4:
        raise OSError("the fork could not be made (the intermediate process failed)")
    pid = int.from_bytes(data, "little")
    worker.emit(ForkReplyMessage(parent_id=req.id, pid=pid, report=report))


def carry_report(shell: Any) -> dict[str, dict[str, str]]:
    """What a fork taken now would lose (``lost``) or share with this
    worker (``shared``), by name: running threads, and the user's variables
    that are threads, held locks, open sockets and open files."""
    lost: dict[str, str] = {}
    shared: dict[str, str] = {}
    main = threading.main_thread()
    for thread in threading.enumerate():
        if thread is main or thread.name in _OWN_THREADS:
            continue
        lost[f"thread {thread.name!r}"] = _THREAD_LOST
    hidden = shell.user_ns_hidden
    for name, value in list(shell.user_ns.items()):
        if name.startswith("_") or (name in hidden and hidden[name] is value):
            continue
        try:
            kind = _what_forks_badly(value)
        except Exception:  # an object whose attributes raise: nothing to say
            continue
        if kind is None:
            continue
        where, why = kind
        (lost if where == "lost" else shared)[name] = why
    return {"lost": lost, "shared": shared}


def _what_forks_badly(value: Any) -> tuple[str, str] | None:
    if isinstance(value, threading.Thread):
        if value.is_alive() and value is not threading.main_thread():
            return "lost", f"thread {value.name!r} is running: {_THREAD_LOST}"
        return None
    locked = _held(value)
    if locked is not None:
        return "lost", locked
    if isinstance(value, socket.socket):
        if value.fileno() < 0:
            return None
        return "shared", (
            "an open socket: the fork holds the same connection (one descriptor, two kernels); "
            "what one kernel reads the other does not see: close it in the kernel that "
            "should not use it"
        )
    fileno = getattr(value, "fileno", None)
    if callable(fileno) and hasattr(value, "closed") and not value.closed:
        try:
            fd = fileno()
        except (OSError, ValueError):  # io.UnsupportedOperation: an in-memory file
            return None
        if isinstance(fd, int) and fd > 2:
            return "shared", (
                "an open file: both kernels share its file offset; writes of both "
                "go to the same file"
            )
    return None


def _held(value: Any) -> str | None:
    """Why a lock does not carry over, if it is held; None otherwise."""
    lock_types = (type(threading.Lock()), type(threading.RLock()))
    inner = getattr(value, "_lock", None) if isinstance(value, threading.Condition) else value
    if isinstance(value, (threading.Semaphore, threading.BoundedSemaphore)):
        return None  # a counter, not owned by a thread: it carries over as it is
    if not isinstance(inner, lock_types):
        return None
    if isinstance(inner, type(threading.RLock())):
        # repr: <locked _thread.RLock object owner=140... count=1 at 0x...>
        text = repr(inner)
        if not text.startswith("<locked"):
            return None
        owner = text.split("owner=", 1)[1].split()[0] if "owner=" in text else ""
        if owner == str(threading.main_thread().ident):
            return None  # held by the main thread, which the fork has too
        return "held by another thread at the fork: in the fork no thread owns it, so it is never released"
    if not inner.locked():
        return None
    return (
        "locked at the fork: in the fork it stays locked; if a thread other than the main "
        "thread held it, nothing will ever release it"
    )


# -- in the new worker ----------------------------------------------------------


def _become_fork(worker: Worker, req: ForkMessage) -> None:
    """Make this process (the second fork) a worker of its own: a session,
    a protocol socket to the new supervisor, new pipes, a new I/O thread."""
    try:
        os.setsid()  # its own session and process group, as a started worker has
        sock = _connect(req)
        # Nothing of the old supervisor's plumbing stays open here.
        old = worker.channel
        for fd in old.private_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            old.sock.close()
        _take_pipes(sock)
        _renew(worker, sock)
    except BaseException:
        # Nobody hears this process: its supervisor sees the listener time out.
        os._exit(1)


def _connect(req: ForkMessage) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT_S)
    sock.connect(req.path)
    sock.sendall(req.token.encode() + b"\n")
    return sock


def _take_pipes(sock: socket.socket) -> None:
    """The new stdout and stderr (pipe write ends), passed by the supervisor."""
    _, fds, _, _ = socket.recv_fds(sock, 16, 2)
    if len(fds) != 2:
        raise OSError(f"expected 2 descriptors from the supervisor, got {len(fds)}")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in (devnull, *fds):
        os.close(fd)
    sock.settimeout(None)


def _renew(worker: Worker, sock: socket.socket) -> None:
    """The worker object, as the new worker's: its channel, queues, history
    session, random state and automatic checkpoint."""
    from . import output
    from .channel import Channel
    from .eventloop import IdleLoop

    worker.channel = Channel(sock, (1, 2))
    worker._requests = queue.SimpleQueue()
    worker._idle_loop = IdleLoop(worker._requests)
    worker._inputs.clear()
    # The queue's bookkeeping starts empty, its lock unheld (the parent's
    # I/O thread may have held it at the fork).
    worker._queued, worker._interrupted_queued = set(), set()
    worker._queue_lock = threading.Lock()
    worker.started = time.monotonic()
    autosave = worker.autosave
    autosave._children = []  # the old worker's saving children are not ours
    autosave.private_fds = [sock.fileno(), *worker.channel.private_fds]
    autosave.configure(None)  # off until the new supervisor names its store
    autosave.dirty = False
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, output.CellStream):
            stream._master_pid = os.getpid()
    reseed()
    new_history_session(worker.shell)
    renew_event_loops()
    signal.signal(signal.SIGINT, worker._on_sigint)
    reader = threading.Thread(
        target=worker.channel.serve, args=(worker._dispatch,), daemon=True, name="pyrepl3-io"
    )
    reader.start()
    worker.channel.send(ready_message(worker))


def ready_message(worker: Worker) -> ReadyMessage:
    """READY as a started worker sends it (its debugger does not carry over)."""
    from .._version import __version__
    from ..language import language_info
    from .main import CAPABILITIES

    return ReadyMessage(
        protocol_versions=list(SUPPORTED_VERSIONS),
        pid=os.getpid(),
        implementation="pyrepl3",
        implementation_version=__version__,
        language_info=language_info(),
        banner=worker.shell.banner,
        capabilities=list(CAPABILITIES),
    )


def reseed() -> None:
    """Random numbers of their own: ``random`` reseeds itself after a fork
    (it registers an at-fork hook); numpy's global generator does not."""
    import random

    random.seed()
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        with contextlib.suppress(Exception):
            numpy_random.seed()


def renew_event_loops() -> None:
    """The cells' asyncio loop gets a selector and a wake-up socket pair of
    its own: after a fork both processes would share one epoll instance and
    one self-pipe, and each would take the other's events. Its tasks go on
    in both kernels, each on its own copy."""
    asyncio = _imported("asyncio")  # not one a subshell is importing right now
    if asyncio is None:
        return
    helpers = sys.modules.get("IPython.core.async_helpers")
    policy_local = getattr(asyncio.get_event_loop_policy(), "_local", None)
    loops = {
        id(loop): loop
        for loop in (
            getattr(helpers, "_asyncio_event_loop", None),
            getattr(policy_local, "_loop", None),
        )
        if loop is not None
    }
    for loop in loops.values():
        if loop.is_closed() or not isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
            continue
        try:
            old = loop._selector  # type: ignore[attr-defined]
            new = type(old)()
            for key in list(old.get_map().values()):
                new.register(key.fileobj, key.events, key.data)
            loop._selector = new  # type: ignore[attr-defined]
            old.close()  # this process's descriptor only: the parent keeps its epoll
            loop._close_self_pipe()  # type: ignore[attr-defined]
            loop._make_self_pipe()  # type: ignore[attr-defined]
        except Exception:
            log.exception("the fork could not renew an event loop's selector")


def new_history_session(shell: Any) -> None:
    """A history session of the fork's own: the parent's saving thread and
    database connection stay the parent's (a SQLite connection must not be
    used across a fork); inputs the parent had not written yet are the
    parent's to write."""
    hm = getattr(shell, "history_manager", None)
    if hm is None:
        return
    hm.db_input_cache_lock = threading.Lock()
    hm.db_output_cache_lock = threading.Lock()
    hm.db_input_cache = []
    hm.db_output_cache = []
    hm.save_thread = None
    if hm.enabled:
        try:
            hm.init_db()
            hm.new_session()
        except Exception:
            log.exception("the fork could not open its history database; history is in memory")
            with contextlib.suppress(Exception):
                hm._switch_to_memory_history()
    with contextlib.suppress(Exception):
        hm._restart_thread_if_stopped()


NOT_A_CELL_OF_ITS_OWN = (
    "%fork forks the kernel between cells, never inside one: run it as a cell of its own "
    "(just `%fork`) in Jupyter; from Python, use `await session.fork()`"
)


def install_magic(shell: Any) -> None:
    """``%fork`` where the worker sees it (among other code, or from the
    native API): a clear error. A cell that is only ``%fork`` never reaches
    the worker: the Jupyter gateway answers it (gateway/fork_magic.py)."""

    def fork_magic(line: str) -> None:
        from IPython.core.error import UsageError

        raise UsageError(NOT_A_CELL_OF_ITS_OWN)

    shell.register_magic_function(fork_magic, "line", "fork")
