"""The fork server: one process, already warm, that forks new workers.

``python -m pyrepl3_kernel.worker.forkserver --fd N`` imports IPython and the
worker's modules, builds the worker (its IPython shell) once and runs the
warm-up code in it silently, as a pool does, and then forks a worker for
every request that arrives on its control socket (``SOCK_SEQPACKET``, one
JSON message per packet, descriptors passed with ``SCM_RIGHTS``). A fork
takes on its launch (environment and working directory through the
configure path, a new history session, its own socket, queues and event
loop: see :meth:`ForkServer._become_prebuilt`) and behaves like a pooled
worker started by ``python -m pyrepl3_kernel.worker``. With
``PYREPL3_FORK_PREBUILT=0`` each fork builds its shell after the fork.

Wire (the supervisor's side is ``pyrepl3_kernel/session/forkserver.py``):

- supervisor -> server, first: ``{"op": "prepare", "warmup_code": str}``
- server -> supervisor: ``{"op": "ready", "pid", "python_threads", "native_threads"}``
  or ``{"op": "unsafe", "reason"}`` (then the server exits: it cannot fork safely)
- supervisor -> server: ``{"op": "fork", "id", "cwd", "env", "log_level",
  "ipython_options"}`` with three descriptors: the worker's protocol socket,
  its stdout and its stderr (pipe write ends)
- server -> supervisor: ``{"op": "forked", "id", "pid"}`` or
  ``{"op": "fork_failed", "id", "error"}``
- server -> supervisor: ``{"op": "exited", "pid", "returncode"}`` when a worker
  it forked ends (``returncode`` as ``Popen.returncode``: ``-N`` for signal N)

Fork safety: the server runs no thread of its own and refuses to fork if the
warm-up code left a Python thread running (only the forking thread survives a
fork: a lock one of them held would stay locked forever in the child). Native
threads of libraries that handle fork themselves (OpenBLAS registers
``pthread_atfork`` handlers) are counted and reported, not refused. The server
dies with its supervisor (PR_SET_PDEATHSIG, and its control socket's EOF);
the workers it forked do not die with it: each dies with its own supervisor,
whose end of the worker's protocol socket closing ends it (see
``channel.Channel.serve``).
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Any

from . import forkhistory

log = logging.getLogger("pyrepl3.forkserver")

#: Largest control message (a launch's environment travels in one).
MAX_MESSAGE = 1 << 20
#: Set to ``0`` to build each worker's shell after the fork instead of once
#: in the server (slower, more memory per worker).
PREBUILT_ENV = "PYREPL3_FORK_PREBUILT"
#: Descriptors a fork request carries: protocol socket, stdout, stderr.
FORK_FDS = 3
#: Most requests read (and forked) in one go.
MAX_BATCH = 64

#: What building a worker's shell imports beyond the worker's own modules:
#: imported in the server, they are shared by every fork.
_PRELOAD = (
    "IPython",
    "IPython.core.interactiveshell",
    "IPython.core.application",
    "IPython.core.completer",
    "IPython.core.completerlib",
    "IPython.core.crashhandler",
    "IPython.core.debugger",
    "IPython.core.magics",
    "IPython.core.oinspect",
    "IPython.utils.generics",
    "sqlite3",
    "pdb",
    "code",
    "glob",
    "unicodedata",
    "traitlets.config.loader",
    "pyrepl3_kernel.worker.main",
    "pyrepl3_kernel.worker.shell",
    "pyrepl3_kernel.worker.comms",
    "pyrepl3_kernel.worker.checkpoint",
    "pyrepl3_kernel.worker.transactions",
)


def send_message(sock: socket.socket, obj: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"fork server message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    if fds:
        sock.sendmsg(
            [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        )
    else:
        sock.send(data)


def receive_message(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the descriptors it carried; ``(None, [])`` at EOF."""
    fds = array.array("i")
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(FORK_FDS * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        return {"op": "invalid", "error": "message truncated"}, []
    try:
        obj = json.loads(data)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        for fd in fds:
            os.close(fd)
        return {"op": "invalid", "error": "not a JSON object"}, []
    return obj, list(fds)


def native_threads() -> int:
    """Threads of this process, as the kernel counts them."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def unsafe_reason() -> str | None:
    """Why this process cannot fork a worker safely now, or None."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if others:
        names = ", ".join(sorted(t.name for t in others))
        return (
            f"the warm-up code left {len(others)} thread(s) running ({names}); "
            "a forked worker would not have them, and a lock they hold would stay locked"
        )
    return None


class ForkServer:
    """The server's loop: fork a worker per request, report their exits."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.children: set[int] = set()
        #: The worker built here once (see _prebuild), or None.
        self.worker: Any = None
        self._dummy: socket.socket | None = None
        self._start_dir = os.getcwd()
        #: History sessions made for the forks of the current batch (forkhistory.py).
        self._sessions: list[int] = []
        #: In a fork: the history session the server made for it (None: none).
        self._session: int | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)

    def prepare(self, warmup_code: str) -> dict[str, Any]:
        """Import what a worker needs, run the warm-up code; the ready (or
        unsafe) message to send."""
        import importlib

        for name in _PRELOAD:
            try:
                importlib.import_module(name)
            except Exception as exc:  # an optional dependency: the worker imports it later
                log.debug("fork server: could not preload %s: %s", name, exc)
        from . import launch

        # As a worker sets it before its warm-up runs: matplotlib, if the
        # warm-up imports it, picks its backend from it.
        launch.set_default_mpl_backend()
        warmup_error = None
        if os.environ.get(PREBUILT_ENV, "1") != "0":
            warmup_error = self._prebuild(warmup_code)
        elif warmup_code.strip():
            warmup_error = _run_warmup(warmup_code)
        reason = unsafe_reason()
        if reason is not None:
            return {"op": "unsafe", "reason": reason}
        # What is here now is shared by every fork: kept out of the garbage
        # collector's way, whose bookkeeping would write to (so copy) the
        # pages of every object it visits in each worker.
        import gc

        gc.collect()
        gc.freeze()
        return {
            "op": "ready",
            "pid": os.getpid(),
            "python_threads": threading.active_count(),
            "native_threads": native_threads(),
            "warmup_error": warmup_error,
        }

    def _prebuild(self, warmup_code: str) -> str | None:
        """Build the worker (its IPython shell) here, once, and run the
        warm-up code in it as a pool does: every fork then shares the shell's
        objects and only takes on its launch (see _become_prebuilt). The
        error of the warm-up, if it failed."""
        from IPython.core.history import HistoryManager

        from . import main as worker_main

        self._dummy, theirs = socket.socketpair()
        # Nothing reads what the shell would send: dropped, never blocking.
        theirs.setblocking(False)
        self.worker = worker_main.Worker(theirs)
        error = None
        if warmup_code.strip():
            result = self.worker.shell.run_cell(warmup_code, silent=True, store_history=False)
            exc = result.error_before_exec or result.error_in_exec
            if exc is not None:
                error = f"{type(exc).__name__}: {exc}"
        _prime(self.worker.shell)
        # Its history saving thread: each fork starts its own session.
        HistoryManager._stop_thread()
        return error

    def serve(self) -> None:
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        while True:
            ready, _, _ = select.select([self.control.fileno(), self._wake_r], [], [])
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 512):
                        pass
                self._reap()
            if self.control.fileno() in ready:
                batch, gone = self._receive_batch()
                forks = sum(1 for msg, _ in batch if msg.get("op") == "fork")
                self._sessions = forkhistory.new_sessions(self.worker, forks)
                for msg, fds in batch:
                    self._handle(msg, fds)
                if gone:
                    return  # the supervisor is gone

    def _receive_batch(self) -> tuple[list[tuple[dict[str, Any], list[int]]], bool]:
        """The requests waiting on the control socket (a burst sends many at
        once), at least one; and whether the supervisor is gone."""
        batch: list[tuple[dict[str, Any], list[int]]] = []
        while len(batch) < MAX_BATCH:
            if batch and not select.select([self.control.fileno()], [], [], 0)[0]:
                break
            msg, fds = receive_message(self.control)
            if msg is None:
                return batch, True
            batch.append((msg, fds))
        return batch, False

    def _handle(self, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg.get("op")
        if op != "fork":
            for fd in fds:
                os.close(fd)
            send_message(self.control, {"op": "error", "error": f"unknown op {op!r}"})
            return
        request_id = msg.get("id")
        if len(fds) != FORK_FDS:
            for fd in fds:
                os.close(fd)
            send_message(
                self.control,
                {
                    "op": "fork_failed",
                    "id": request_id,
                    "error": f"a fork request carries {FORK_FDS} descriptors, got {len(fds)}",
                },
            )
            return
        reason = unsafe_reason()
        if reason is None and self.worker is not None and msg.get("ipython_options"):
            reason = "IPython options shape a shell as it is built; this one was built before"
        if reason is not None:
            for fd in fds:
                os.close(fd)
            send_message(self.control, {"op": "fork_failed", "id": request_id, "error": reason})
            return
        session = self._sessions.pop(0) if self._sessions else None
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            send_message(self.control, {"op": "fork_failed", "id": request_id, "error": str(exc)})
            return
        if pid == 0:
            try:
                self._session = session
                self._become_worker(msg, fds)
            except BaseException:
                import traceback

                traceback.print_exc()
            os._exit(1)
        for fd in fds:
            os.close(fd)
        self.children.add(pid)
        send_message(self.control, {"op": "forked", "id": request_id, "pid": pid})

    def _reap(self) -> None:
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                self.children.discard(pid)
                continue
            if done:
                self.children.discard(pid)
                with contextlib.suppress(OSError):
                    send_message(
                        self.control,
                        {
                            "op": "exited",
                            "pid": pid,
                            "returncode": os.waitstatus_to_exitcode(status),
                        },
                    )

    # -- in the child ----------------------------------------------------------

    def _become_worker(self, msg: dict[str, Any], fds: list[int]) -> None:
        sock_fd, out_fd, err_fd = fds
        # Nothing of the server's stays: its signal handling, its control
        # socket, its wake-up pipe.
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        self.control.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        os.setsid()  # its own process group, as a started worker has
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        for fd in (devnull, out_fd, err_fd):
            os.close(fd)
        logging.getLogger().handlers.clear()  # the server's log is not the worker's
        options = [str(o) for o in msg.get("ipython_options") or []]
        prebuilt = self.worker is not None
        if not prebuilt:
            self._take_launch(msg)
        from . import main as worker_main
        from .fork import reseed

        reseed()

        handler = logging.StreamHandler(os.fdopen(os.dup(2), "w", buffering=1))
        handler.setFormatter(
            logging.Formatter("[pyrepl3 worker %(process)d] %(levelname)s %(message)s")
        )
        worker_log = worker_main.log
        worker_log.handlers[:] = [handler]
        worker_log.setLevel(str(msg.get("log_level") or "WARNING"))
        worker_log.propagate = False
        import faulthandler

        faulthandler.enable(file=2, all_threads=False)
        sock = socket.socket(fileno=sock_fd)
        sys.argv = [worker_main.__file__, "--fd", str(sock_fd)]
        if prebuilt:
            worker = self._become_prebuilt(sock, msg)
        else:
            worker = worker_main.Worker(sock, ipython_options=options)
            _as_if_imported_under(worker.shell)
        worker.run()
        os._exit(0)

    def _become_prebuilt(self, sock: socket.socket, msg: dict[str, Any]) -> Any:
        """The server's worker, as this launch's: its own protocol socket,
        queues, history session and event loop; the launch's environment
        and working directory through the configure path (as a pooled
        worker takes them)."""
        import queue

        from . import launch, output
        from .channel import Channel
        from .eventloop import IdleLoop
        from .fork import renew_event_loops

        worker = self.worker
        assert worker is not None
        if self._dummy is not None:
            self._dummy.close()
        worker.channel.sock.close()
        worker.channel = Channel(sock, (1, 2))
        worker._requests = queue.SimpleQueue()
        worker._idle_loop = IdleLoop(worker._requests)
        worker._inputs.clear()
        # The queue's bookkeeping starts empty, as the queue does.
        worker._queued, worker._interrupted_queued = set(), set()
        worker._queue_lock = threading.Lock()
        worker.started = time.monotonic()
        worker.autosave.private_fds = [sock.fileno(), *worker.channel.private_fds]
        worker.autosave.dirty = False
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, output.CellStream):
                stream._master_pid = os.getpid()
        env = msg.get("env")
        if isinstance(env, dict):
            env = {str(k): str(v) for k, v in env.items()}
            by_warmup = {k for k in os.environ if k not in worker._env_baseline}
            baseline = launch.take_environment(worker.shell, env, worker._env_baseline)
            # What the warm-up added stays "added since" for a later
            # configure, as in a worker that ran it after it started.
            for key in by_warmup - set(env):
                baseline.pop(key, None)
            worker._env_baseline = baseline
        cwd = msg.get("cwd")
        if cwd:
            launch.move_to(worker.shell, cwd)
        worker._set_session_name()
        forkhistory.take_session(worker.shell, self._session)
        renew_event_loops()
        return worker

    def _take_launch(self, msg: dict[str, Any]) -> None:
        """The launch's environment and working directory, as if the worker
        had been started with them."""
        env = msg.get("env")
        if isinstance(env, dict):
            os.environ.clear()
            # Not what the warm-up added in the server: a pool runs the
            # warm-up again in the worker's shell (cheap: its imports are
            # done), where it adds it as in any pooled worker.
            os.environ.update({str(k): str(v) for k, v in env.items()})
            time.tzset()
        cwd = msg.get("cwd")
        if cwd:
            os.chdir(cwd)
        # ``python -m`` put the server's start-up directory first on sys.path;
        # a worker started in ``cwd`` would have ``cwd`` there (the worker
        # then moves it behind the standard library, see launch.put_cwd_on_path).
        if sys.path and sys.path[0] == self._start_dir:
            sys.path[0] = os.getcwd()


def _prime(shell: Any) -> None:
    """Do here, once, what each worker's first cell would do for the first
    time: compile the tokenizer's and the input transformers' regular
    expressions, fill the formatters' lazy state. In the server it is shared
    by every fork; in each fork it cost milliseconds of CPU (and pages
    copied) in a burst. Silent: no history, no execution count, no ``_``."""
    before = (shell.last_execution_result, shell.last_execution_succeeded)
    try:
        shell.run_cell("1+1", silent=True, store_history=False)
        shell.display_formatter.format(2)
    except Exception as exc:  # only an optimisation
        log.debug("fork server: priming the shell failed: %s", exc)
    finally:  # a fork's shell is as a cold one's: no previous result
        shell.last_execution_result, shell.last_execution_succeeded = before


def _run_warmup(code: str) -> str | None:
    """Run the warm-up code once, for its imports; the error, if it failed
    (each forked worker runs it again in its own shell, where the error is
    reported as the pool reports it)."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        source = TransformerManager().transform_cell(code)
        namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
        exec(compile(source, "<pyrepl3 warm-up>", "exec"), namespace)
    except BaseException as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _as_if_imported_under(shell: Any) -> None:
    """What modules the warm-up imported in the server (which has no shell)
    do when imported under a shell: matplotlib takes the launch's backend,
    and its inline backend hooks into the shell (figures show after a cell)."""
    mpl = sys.modules.get("matplotlib")
    if mpl is None:
        return
    wanted = os.environ.get("MPLBACKEND")
    try:
        if wanted and mpl.rcParams._get("backend") != wanted:
            mpl.use(wanted)
        inline = sys.modules.get("matplotlib_inline.backend_inline")
        if inline is not None:
            inline._enable_matplotlib_integration()
    except Exception as exc:
        logging.getLogger("pyrepl3.worker").warning(
            "could not set up matplotlib for %s: %s", wanted, exc
        )


def _die_with_parent(parent_pid: int) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass
    if parent_pid and os.getppid() != parent_pid:
        os._exit(0)  # the supervisor died before prctl took effect


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pyrepl3_kernel.worker.forkserver")
    parser.add_argument("--fd", type=int, required=True, help="the control socket (SEQPACKET)")
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="[pyrepl3 fork server %(process)d] %(levelname)s %(message)s",
    )
    control = socket.socket(fileno=args.fd)
    os.set_inheritable(args.fd, False)
    first, fds = receive_message(control)
    for fd in fds:
        os.close(fd)
    if first is None or first.get("op") != "prepare":
        return
    server = ForkServer(control)
    answer = server.prepare(str(first.get("warmup_code") or ""))
    send_message(control, answer)
    if answer["op"] != "ready":
        log.warning("cannot fork workers: %s", answer.get("reason"))
        return
    server.serve()


if __name__ == "__main__":
    main()
