"""Automatic checkpoints after every successful cell, off the critical path.

After a cell succeeds, the worker forks. The child holds a copy-on-write
snapshot of the namespace as it was at the end of the cell; it writes an
incremental checkpoint named ``auto``, records it as a state of the
kernel's history (:mod:`.history`), applies the retention, and exits, while
the parent goes on at once (a fork costs about 1.5 ms for a 90 MB worker).
Children save in the order they were forked (each waits for its
predecessor's exit through a pidfd).

A cell never waits for a save. Up to ``QUICK_SAVES`` state-changing cells
in a row fork at once (human pace, and short sequences: every cell's state
is kept, and a crash right after them loses nothing). Beyond that, or while
``MAX_CHILDREN`` saves run, the state waits, and what the next cells change
is coalesced into the same save, which starts once the state is a window
old (50 ms, more when forks are slow) or the worker is idle (the worker's
loop wakes after :meth:`Autosave.wake_in`). The save records the cells it
covers (``covers``: ``[first, last]``), so that the history says which
cells have no state of their own (:mod:`.history`, :mod:`.travel`). Crash
recovery restores ``auto``, the newest state saved.
"""

from __future__ import annotations

import fcntl
import gc
import json
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from typing import Any

from ...savelock import PENDING_NAME, wait_for_saves  # held (shared) by every saving child
from . import dirty, parts
from .history import History, Retention
from .namespace import user_names
from .report import current_cell

log = logging.getLogger("pyrepl3.worker")

AUTO_NAME = "auto"
LOCK_NAME = ".autosave.lock"  # held by the child that is writing


def _lock(store: str, name: str, how: int) -> int | None:
    """An fd holding ``flock(how)`` on ``store/name`` (local stores only)."""
    if "://" in store:
        return None
    path = os.path.join(store, name)
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:  # the first save: no store yet
            os.makedirs(store, mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        log.warning("autosave lock %s: %s", name, exc)
        return None
    try:
        fcntl.flock(fd, how)
    except OSError:
        os.close(fd)
        return None
    return fd


def _saved_seq(store: str, history: History | None = None) -> int:
    """``autosave_seq`` of the newest automatic save in ``store`` (0: none).

    The newest state of the store's ``history``, from its directory's listing
    alone (a save records its state just before it writes ``auto.json``,
    under the same lock, with the same seq); else ``auto.json``'s (a store
    written by a version without a history), which holds the whole input
    history: parsing it all cost a saving child more than its manifest."""
    if "://" in store:
        return 0
    if history is not None:
        newest = history.newest()
        if newest is not None:
            return newest
    try:
        with open(os.path.join(store, f"{AUTO_NAME}.json"), "rb") as f:
            seq = json.load(f).get("autosave_seq", 0)
        return seq if isinstance(seq, int) else 0
    except (OSError, ValueError, AttributeError):
        return 0


def max_object_bytes() -> int | None:
    """``PYREPL3_AUTOSAVE_MAX_OBJECT`` (e.g. ``512M``), if set: objects
    larger than this are left out of automatic checkpoints. Unset (the
    default), only the kernel's disk budget (``PYREPL3_STATES_BUDGET``)
    bounds them; large buffers are saved by the chunk."""
    from ...units import size_from_env

    return size_from_env(os.environ, "PYREPL3_AUTOSAVE_MAX_OBJECT", None, log)


#: Characters without which a cell can neither bind, call, import, run a
#: magic or shell command, nor define anything.
_ACTIVE = frozenset("(=%!@:;\n")


def _inert(cell: str | None) -> bool:
    """A one-line cell that only reads names and operators (``x``, ``1 + 1``,
    ``a[0]``): it cannot change the state (short of a user-defined operator
    with side effects, which autosave then misses until the next change)."""
    if cell is None:
        return False
    text = cell.strip()
    return (
        bool(text)
        and not (_ACTIVE & set(text))
        and not text.startswith(("del ", "import ", "from "))
    )


def wait_for_autosave(store: str, timeout: float = 15.0) -> bool:
    """Wait until no automatic checkpoint is being saved to ``store`` (by
    any worker, dead or alive); False if one still was at the timeout."""
    if "://" in store:
        return True
    return wait_for_saves(store, timeout)


def _fork_beside_history(shell: Any) -> int:
    """``os.fork()``, without IPython's before-fork hook stopping (and
    joining) its history-saving thread: the saving child never touches the
    history database, and the join waited for the thread's SQLite commit or
    connect, up to hundreds of ms on a loaded machine (most of what a fork
    cost the worker), and the thread then had to be started again."""
    manager: Any = getattr(shell, "history_manager", None)
    thread = getattr(manager, "save_thread", None)
    if thread is None:
        return os.fork()
    manager.save_thread = None  # what the hook stops
    try:
        return os.fork()
    finally:
        if manager.save_thread is None:
            manager.save_thread = thread


class Autosave:
    """Forks a saving child after each cell that may have changed the state.

    At most ``MAX_CHILDREN`` children run at once. Children write one at a
    time (an exclusive lock on the store) and a child never replaces a
    newer save than its own (``autosave_seq`` in the manifest), so the
    checkpoint always ends up with the newest state. Every child holds a
    shared "pending" lock until it exits: a restore waits for all of them
    (:func:`wait_for_autosave`), also after the worker that forked them died.
    """

    MAX_CHILDREN = 3
    #: How long a save waits for its predecessor, and the worker for a free slot.
    PREDECESSOR_TIMEOUT = 600.0
    SLOT_TIMEOUT = 120.0
    #: Cells that change the state back to back each get a save of their own
    #: (a fork at once: a crash right after them loses nothing) up to this
    #: many; one more is allowed per ``COALESCE_WINDOW`` that passes. Beyond,
    #: the state waits, coalesced with the next cells', until it is that old
    #: (then it is saved, also while cells keep coming) or the worker is idle.
    #: The window grows (up to 1 s) so that forks take at most ``FORK_SHARE``
    #: of the worker's time (a fork costs ~1.5 ms on an idle machine, 10-30
    #: ms on a loaded one).
    QUICK_SAVES = 3
    COALESCE_WINDOW = 0.05
    FORK_SHARE = 0.1

    def __init__(self, state: Any, private_fds: list[int]) -> None:
        self.state = state  # Checkpoints
        self.private_fds = private_fds  # fds the child must not keep (protocol socket, ...)
        self.store: str | None = None
        self.dirty = False
        self._children: list[int] = []
        self.failures = 0
        self._saved_bindings: frozenset[tuple[str, int]] | None = None
        #: A pidfd of the newest child: the next child waits for its exit.
        self._last_pidfd: int | None = None
        #: What changed since the last save (see :mod:`.dirty`): names the
        #: cells since reached, or everything; the bindings at the last save,
        #: its seq (the base of the next, incremental save), saves since a full one.
        self._touched: set[str] = set()
        self._everything = True
        self._fork_bindings: dict[str, int] = {}
        self._base_seq: int | None = None
        self._since_full = 0
        #: The cells whose state waits for the next save (the first and the
        #: last that changed it; more than one: coalesced), and the last cell run.
        self._first_cell: int | None = None
        self._last_changed: int | None = None
        self._last_cell: int | None = None
        self._quick = float(self.QUICK_SAVES)
        self._quick_at = time.monotonic()
        #: When the pending state was first found waiting (None: none waits).
        self._pending_since: float | None = None
        self._fork_seconds = 0.0  # a moving average of what a fork costs the worker
        state.changed = self.mark_dirty
        state.autosave = self

    def mark_dirty(self) -> None:
        """The state changed outside a cell (a checkout or restore request):
        save it, in full."""
        self._everything = True
        if self.store is not None:
            self._saved_bindings = None
            self.dirty = True

    def unchanged(self, base_names: dict[str, dict[str, Any]]) -> tuple[int | None, set[str]]:
        """The seq of the last save, and the names nothing has changed since
        (``base_names``: that save's name table); (None, empty) if unknown."""
        if self._everything or self._base_seq is None:
            return None, set()
        ns = self.state.shell.user_ns
        moved = dirty.rebound(self._fork_bindings, dirty.bindings(ns))
        names = user_names(self.state.shell)
        changed = dirty.close_over(self._touched | moved, moved, ns, names, base_names)
        return self._base_seq, set(names) - changed

    def checked_out(self, seq: int) -> None:
        """The namespace now is state ``seq``: the next save is incremental
        against it (and records that it went back to it)."""
        self._fork_bindings = dirty.bindings(self.state.shell.user_ns)
        self._touched, self._everything, self._base_seq = set(), False, seq
        self.state.position = seq
        if self.store is not None:
            self._saved_bindings = None
            self.dirty = True

    def restored(self, seq: int) -> None:
        """Crash recovery loaded state ``seq``: the next save is incremental
        against it (a 2 GB array is not hashed again)."""
        self._fork_bindings = dirty.bindings(self.state.shell.user_ns)
        self._touched, self._everything, self._base_seq = set(), False, seq

    def note_cell(self, result: Any) -> None:
        """Remember what a cell (successful or not) may have changed."""
        code = getattr(getattr(result, "info", None), "raw_cell", None)
        touched = None
        if isinstance(code, str):
            try:
                touched = dirty.touched_by(code, self.state.shell.user_ns)
            except Exception:  # an odd namespace: save everything
                touched = None
        if touched is None:
            self._everything = True
        else:
            self._touched |= touched

    def configure(self, store: str | None) -> None:
        # Not marked dirty: a worker just configured may be about to receive
        # the very state this store holds (crash recovery); the next cell that
        # succeeds saves.
        self.store = store or None
        self.state.autosave_store = self.store
        self._everything, self._base_seq = True, None
        self._first_cell = self._last_changed = self._last_cell = None

    def after_cell(self, result: Any) -> None:
        """IPython ``post_run_cell`` hook: mark the state for saving once the
        reply has gone out (the worker's request loop calls :meth:`poll`)."""
        if self.store is None:
            return
        self.note_cell(result)
        count = getattr(result, "execution_count", None)
        self._last_cell = count if isinstance(count, int) else current_cell(self.state.shell)
        if not getattr(result, "success", False):
            if self._first_cell is not None:  # what it changed goes with the pending state
                self._last_changed = self._last_cell
            return
        bindings = self._bindings()
        if bindings == self._saved_bindings and _inert(getattr(result.info, "raw_cell", None)):
            return  # it rebound nothing and called nothing: nothing can have changed
        self._saved_bindings = bindings
        if self._first_cell is None:
            self._first_cell = self._last_cell
        self._last_changed = self._last_cell
        self.dirty = True

    def _bindings(self) -> frozenset[tuple[str, int]]:
        ns = self.state.shell.user_ns
        return frozenset((k, id(v)) for k, v in ns.items() if not k.startswith("_"))

    @property
    def pending(self) -> bool:
        return self.store is not None and (self.dirty or bool(self._children))

    def wake_in(self) -> float | None:
        """Seconds after which the worker's loop, idle, calls :meth:`poll`
        again (None: only when the next request came)."""
        if self.store is None:
            return None
        if self.dirty:
            if len(self._children) >= self.MAX_CHILDREN or self._pending_since is None:
                return 0.005
            waited = time.monotonic() - self._pending_since
            return max(0.001, self._window() - waited)
        return 0.25 if self._children else None

    def poll(self, until: Callable[[], object] | None = None) -> None:
        """Reap finished children; start a save if the state is dirty.

        A save starts at once for up to ``QUICK_SAVES`` cells in a row (one
        more per ``COALESCE_WINDOW``); beyond, the state waits until it is
        ``COALESCE_WINDOW`` old, coalesced with what the next cells change,
        and at most ``MAX_CHILDREN`` saves run. Given ``until`` (the worker's
        loop: requests may come), this never blocks: the loop calls again
        after :meth:`wake_in` if no request came, and a cell never waits for
        a save. Without it (:meth:`flush`), it waits for a slot."""
        self._reap()
        if not self.dirty or self.store is None:
            self._pending_since = None
            return
        now = time.monotonic()
        window = self._window()
        self._quick = min(float(self.QUICK_SAVES), self._quick + (now - self._quick_at) / window)
        self._quick_at = now
        if self._pending_since is None:
            self._pending_since = now
        due = self._quick >= 1 or now - self._pending_since >= window
        if until is not None and (not due or len(self._children) >= self.MAX_CHILDREN):
            return
        deadline = now + self.SLOT_TIMEOUT
        while len(self._children) >= self.MAX_CHILDREN and time.monotonic() < deadline:
            time.sleep(0.001)
            self._reap()
        if len(self._children) < self.MAX_CHILDREN:
            self.dirty = False
            self._pending_since = None
            self._quick = max(0.0, self._quick - 1)
            started = time.monotonic()
            self._fork()
            spent = time.monotonic() - started
            self._fork_seconds = (
                spent if not self._fork_seconds else (0.7 * self._fork_seconds + 0.3 * spent)
            )

    def _window(self) -> float:
        """How old a waiting state gets before it is saved while cells keep
        coming (and how often one more cell may fork at once)."""
        return max(self.COALESCE_WINDOW, min(1.0, self._fork_seconds / self.FORK_SHARE))

    def flush(self, timeout: float = 15.0) -> None:
        """Start the save of a pending state now, waiting up to ``timeout``
        for a slot: what reads the history (a listing, a checkout) must see
        the newest state. The caller then waits for the saves to land
        (:func:`wait_for_autosave`)."""
        deadline = time.monotonic() + timeout
        while self.dirty and self.store is not None:
            self._reap()
            if len(self._children) < self.MAX_CHILDREN:
                self.poll()  # a slot is free: the save starts now
                return
            if time.monotonic() > deadline:
                log.warning("a save slot stayed busy for %.0f s: the newest state waits", timeout)
                return
            time.sleep(0.001)

    def landed(self, timeout: float = 2.0) -> None:
        """Every save has landed (:func:`wait_for_autosave` said so): reap
        the children, which are exiting, so that the next cells find every
        slot free and each gets a state of its own."""
        deadline = time.monotonic() + timeout
        self._reap()
        while self._children and time.monotonic() < deadline:
            time.sleep(0.001)
            self._reap()
        self._quick = float(self.QUICK_SAVES)

    def _reap(self) -> None:
        for pid in list(self._children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                self._children.remove(pid)
                if os.waitstatus_to_exitcode(status) != 0:
                    self.failures += 1
                    log.warning("autosave failed (status %s)", status)

    def _fork(self) -> None:
        store = self.store
        assert store is not None
        seq = time.monotonic_ns()  # system-wide: comparable across workers
        pending = _lock(store, PENDING_NAME, fcntl.LOCK_SH | fcntl.LOCK_NB)
        at, self.state.position = self.state.position, None
        first = self._first_cell
        last = self._last_changed if first is not None else self._last_cell
        self._first_cell = None
        label: dict[str, Any] = {}
        if last is not None:
            # The cell the state is after (also when a flush forks during a cell).
            label = {"cell_number": last, "execution_count": last + 1}
            if first is not None:
                label["covers"] = [min(first, last), last]
        predecessor = self._last_pidfd
        now = dirty.bindings(self.state.shell.user_ns)
        moved = dirty.rebound(self._fork_bindings, now)
        # Every ``full_every()``-th save is a full one: after a full save,
        # ``_since_full`` counts the incremental ones (1: every save full).
        full = (
            self._everything or self._base_seq is None or self._since_full + 1 >= dirty.full_every()
        )
        changed = None if full else self._touched | moved
        plan = parts.before_fork(self.state.shell.user_ns, changed, seq)  # big dicts' parts
        base_seq = self._base_seq
        before = (self._touched, self._everything, self._fork_bindings, self._since_full)
        self._touched, self._everything, self._fork_bindings = set(), False, now
        self._base_seq, self._since_full = seq, 0 if full else self._since_full + 1
        # Made once in the worker (the children inherit it): a local store's
        # engine (if it cannot be made, the child says why). And no
        # collection while the child starts: it would touch (copy) every
        # object's memory; the child keeps it off to the end.
        if "://" not in store:
            try:
                self.state.engine(store)
            except Exception:
                pass
        collecting = gc.isenabled()
        gc.disable()
        try:
            pid = _fork_beside_history(self.state.shell)
        except OSError as exc:
            if collecting:
                gc.enable()
            # No process to save with (a process limit is full): the state
            # stays dirty, as it was, and the next poll tries again.
            if pending is not None:
                os.close(pending)
            self.state.position = at
            self._first_cell = first
            self._touched, self._everything, self._fork_bindings, self._since_full = before
            self._base_seq = base_seq
            self.dirty = True
            self.failures += 1
            if self.failures == 1 or self.failures % 100 == 0:
                log.warning("automatic checkpoint postponed: cannot fork (%s)", exc)
            return
        if pid:
            if collecting:
                gc.enable()
            if pending is not None:
                os.close(pending)  # the child holds it until it exits
            self._children.append(pid)
            if predecessor is not None:
                os.close(predecessor)
            try:
                self._last_pidfd = os.pidfd_open(pid)
            except (AttributeError, OSError):  # no pidfds: saves may land out of order
                self._last_pidfd = None
            return
        code = 1
        try:  # the child: save, then vanish without running any cleanup
            # Out of the worker's process group: a crash of the worker (whose
            # group is killed) must not kill the save that recovery needs.
            os.setsid()
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            for fd in self.private_fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            if predecessor is not None:  # the previous state lands first
                select.select([predecessor], [], [], self.PREDECESSOR_TIMEOUT)
            writing = _lock(store, LOCK_NAME, fcntl.LOCK_EX)
            started, cpu = time.perf_counter(), time.process_time()
            engine = self.state.engine(store)
            # Listed once: this child holds the store's exclusive lock.
            history = History(engine.store, locked=True) if "://" not in store else None
            if _saved_seq(store, history) < seq:
                engine.store.fsync = False  # one flush at the end instead
                retention = Retention.of(store)  # read once per save
                base = None
                if changed is not None and base_seq is not None:
                    try:  # the state saved (or checked out) last
                        if history is not None:
                            base = history.read(base_seq)
                        else:
                            previous = engine.store.read_manifest(AUTO_NAME)
                            if previous.get("autosave_seq") == base_seq:
                                base = previous
                    except Exception:  # gone, or unreadable: a full save
                        base = None

                def record(manifest: dict[str, Any], report: Any) -> None:
                    if history is not None:
                        manifest["save_seconds"] = round(time.perf_counter() - started, 6)
                        manifest["save_cpu_seconds"] = round(time.process_time() - cpu, 6)
                        manifest["incremental"] = base is not None
                        history.record(
                            seq,
                            manifest,
                            report.bytes_written,
                            at=at,
                            known=(base_seq, base)
                            if base is not None and base_seq is not None
                            else None,
                        )

                report = engine.save(
                    AUTO_NAME,
                    max_object_bytes=max_object_bytes(),
                    extra={
                        "autosave_seq": seq,
                        **label,
                        **({"at": at} if at is not None else {}),
                    },
                    saved_by=self.state.owner(),
                    before_manifest=record,
                    changed=changed if base is not None else None,
                    moved=moved,
                    base=base,
                    budget=retention.budget,
                    plan=plan,
                )
                if history is not None:
                    history.enforce(retention, added=report.bytes_written)
                engine.store.sync()
            if writing is not None:
                os.close(writing)
            code = 0
        finally:
            os._exit(code)

    def wait(self, timeout: float = 10.0) -> None:
        """Let a running save finish (used before a planned shutdown)."""
        deadline = time.monotonic() + timeout
        while self._children and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.005)
