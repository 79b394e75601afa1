"""A kernel's saved state on object storage (any fsspec URL), keyed by the
kernel id the server gave it.

The kernel keeps saving its state where it always does (the autosave
directory on the local disk, written by the worker's forked child after each
cell); a :class:`StateMirror` copies that directory to
``<PYREPL3_STATE_URL>/<KERNEL_ID>/autosave/`` from a background thread of the
kernel process, and a kernel started for a kernel id whose state is in the
store copies it back before its first worker starts. Nothing here runs on a
cell's path: a slow or failing store delays only the copy, and the next cell
says when the state could not be saved.

The copy knows nothing of the checkpoint format beyond three facts that
the checkpoint package keeps: files are replaced atomically (temp file,
rename), a file whose name starts with a dot is private to the writer
(locks, temp files), and every saving child holds a shared flock on
``.autosave.pending`` until it exits. Files other than the ``*.json``
manifests are copied first, then the manifests, so a manifest in the store
never names a file the store does not have yet. Next to the state, the
kernel keeps its record (:mod:`.record`).

Credentials come from where fsspec's driver finds them (for ``s3://``: the
AWS environment variables, ``~/.aws``, the instance role);
``PYREPL3_STATE_OPTIONS`` may add driver options as JSON (an endpoint, a
region). Neither the options nor any credential is ever logged: messages
name the URL only, without any user:password part.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

from ..errors import Pyrepl3Error
from ..savelock import wait_for_saves
from .record import KernelRecord, Resumed, Superseded

log = logging.getLogger("pyrepl3.cluster")

STATE_URL_ENV = "PYREPL3_STATE_URL"
STATE_OPTIONS_ENV = "PYREPL3_STATE_OPTIONS"
#: Held (shared) by every child that is saving into the autosave directory.


class StateStoreError(Pyrepl3Error):
    """The store cannot be used (bad URL, driver missing, refused)."""


class _Replaced(Pyrepl3Error):
    """A file listed in the store was gone when it was fetched."""


def public_url(url: str) -> str:
    """``url`` without a ``user:password@`` part, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = netloc.rsplit("@", 1)[1]
    return f"{scheme}://{netloc}{slash}{path}"


def describe_error(exc: BaseException) -> str:
    """A short reason for a failed store operation (no credentials: botocore
    messages name the operation and the error code only)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, Superseded):
        return text
    name = type(exc).__name__
    return f"{name}: {text}"[:300] if text else name


class StateMirror:
    """Copies one kernel's autosave directory to ``<url>/<kernel id>/`` and back.

    :meth:`restore_into` (before the kernel's first worker starts) fetches
    the store's copy; :meth:`start` runs the background thread that uploads
    what the worker saves; :meth:`flush` waits for the upload of everything
    saved so far (a planned stop, a move); :meth:`clear` removes the kernel
    id's state from the store (a shutdown or restart the user asked for).
    :attr:`failure` is why the last upload failed, None while it works.
    """

    POLL = 0.05  # seconds between looks at the local directory
    RETRY = 2.0  # seconds between attempts while the store fails
    BUSY_FOR = 10.0  # seconds after a cell during which POLL applies
    IDLE_POLL = 1.0

    def __init__(
        self,
        url: str,
        kernel_id: str,
        local_dir: str,
        *,
        options: Mapping[str, Any] | None = None,
        host: str | None = None,
    ) -> None:
        if "://" not in url:
            url = os.path.abspath(url)
        self.url = url.rstrip("/")
        self.kernel_id = kernel_id
        self.local_dir = local_dir
        self.host = host or socket.gethostname()
        self.public = f"{public_url(self.url)}/{kernel_id}"
        try:
            import fsspec

            opts = dict(options or {})
            if "://" not in url or url.startswith(("file://", "local://")):
                opts.setdefault("auto_mkdir", True)  # object stores have no directories
            self.fs, root = fsspec.core.url_to_fs(self.url, **opts)
        except ImportError as exc:
            raise StateStoreError(
                f"{public_url(url)} needs fsspec and the driver for its scheme ({exc})"
            ) from None
        except Exception as exc:
            raise StateStoreError(f"{public_url(url)}: {describe_error(exc)}") from None
        self.prefix = f"{root.rstrip('/')}/{kernel_id}"
        self.failure: str | None = None
        self.failed_since: float | None = None
        self.uploads = 0
        self._uploaded: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns)
        self._lock = threading.Lock()  # one upload at a time
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported: str | None = None
        #: Said once, in the first cell's output (a resume that failed).
        self.first_note: str | None = None
        self._last_report = 0.0
        self._abandoned = False
        self.record = KernelRecord(self.fs, self.prefix, self.host, self._failed)

    @classmethod
    def from_env(
        cls, kernel_id: str, local_dir: str, env: Mapping[str, str] | None = None, **kw: Any
    ) -> StateMirror | None:
        """The mirror ``PYREPL3_STATE_URL`` asks for (None when it is unset)."""
        env = os.environ if env is None else env
        url = env.get(STATE_URL_ENV, "").strip()
        if not url:
            return None
        options: dict[str, Any] = {}
        raw = env.get(STATE_OPTIONS_ENV, "").strip()
        if raw:
            try:
                options = json.loads(raw)
            except ValueError as exc:
                raise StateStoreError(f"{STATE_OPTIONS_ENV} is not JSON: {exc}") from None
            if not isinstance(options, dict):
                raise StateStoreError(f"{STATE_OPTIONS_ENV} must be a JSON object")
        return cls(url, kernel_id, local_dir, options=options, **kw)

    # -- paths -----------------------------------------------------------------------------

    def _remote(self, rel: str) -> str:
        return f"{self.prefix}/autosave/{rel}"

    def _local_files(self) -> dict[str, tuple[int, int]]:
        files: dict[str, tuple[int, int]] = {}
        top = self.local_dir
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                files[os.path.relpath(path, top).replace(os.sep, "/")] = (
                    st.st_size,
                    st.st_mtime_ns,
                )
        return files

    # -- back from the store ---------------------------------------------------------------------

    def abandon_restore(self) -> None:
        """A restore still under way must leave the local directory alone."""
        self._abandoned = True

    def hold(self, reason: str) -> None:
        """Never write to the store again (it holds a state this kernel did
        not get back); cells say ``reason``."""
        self.record.superseded = reason

    def restore_into(self) -> Resumed | None:
        """Replace the local autosave directory with the store's copy for this
        kernel id; None when the store has none. Raises StateStoreError when
        the store cannot be read."""
        for _attempt in range(3):
            try:
                return self._restore_into()
            except _Replaced:
                # A file went between the listing and its download (another
                # kernel of this id still wrote): list again.
                self.fs.invalidate_cache()
        raise StateStoreError(f"the state at {self.public} kept changing while it was read")

    def _restore_into(self) -> Resumed | None:
        start = time.monotonic()
        remote = f"{self.prefix}/autosave"
        self.fs.invalidate_cache()
        try:
            listing = self.fs.find(remote)
            manifests = [p for p in listing if p.endswith(".json")]
            if not manifests:
                return None
            record = self.record.previous()
            tmp = f"{self.local_dir}.resume-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            total = 0
            # Manifests first: a file a manifest names is already in the store
            # (it was uploaded before the manifest).
            ordered = manifests + [p for p in listing if not p.endswith(".json")]
            for path in ordered:
                rel = path[len(remote) :].lstrip("/")
                dest = os.path.join(tmp, *rel.split("/"))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                try:
                    self.fs.get_file(path, dest)
                except FileNotFoundError:
                    raise _Replaced from None
                total += os.path.getsize(dest)
        except _Replaced:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise StateStoreError(
                f"could not read the saved state from {self.public}: {describe_error(exc)}"
            ) from None
        if self._abandoned:  # the kernel gave up waiting and started without it
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        shutil.rmtree(self.local_dir, ignore_errors=True)
        os.makedirs(os.path.dirname(self.local_dir) or ".", exist_ok=True)
        os.replace(tmp, self.local_dir)
        # What came back is in the store already: not uploaded again.
        self._uploaded = self._local_files()
        return Resumed(len(ordered), total, time.monotonic() - start, record)

    # -- to the store --------------------------------------------------------------------------

    def check(self) -> bool:
        """Write this kernel's record to the store (and so find out early
        whether it takes writes); sets :attr:`failure` if not."""
        return self.record.write()

    def start(self) -> None:
        """Start the background upload thread."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="pyrepl3-state-mirror", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def wake(self) -> None:
        """Look at the local directory now (a cell just ended)."""
        self._wake.set()

    def _signature(self) -> tuple[tuple[str, int], ...]:
        """The mtimes of the directory and its subdirectories (one level):
        a new manifest or file renamed into place changes one of them, and
        looking costs a few stat calls, whatever the number of files."""
        try:
            entries = [(".", os.stat(self.local_dir).st_mtime_ns)]
            with os.scandir(self.local_dir) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                        entries.append((entry.name, entry.stat().st_mtime_ns))
        except FileNotFoundError:
            return ()
        return tuple(sorted(entries))

    def _run(self) -> None:
        seen: tuple[tuple[str, int], ...] = ()
        retry_at = 0.0
        last_cell = time.monotonic()
        while not self._stop.is_set():
            # Saves follow cells: look often for a while after one, seldom
            # when the kernel is idle (the thread then costs next to nothing).
            busy = time.monotonic() - last_cell < self.BUSY_FOR or self.record.running is not None
            woken = self._wake.wait(self.POLL if busy else self.IDLE_POLL)
            self._wake.clear()
            if woken:
                last_cell = time.monotonic()
            if self._stop.is_set():
                return
            now = time.monotonic()
            if self.failure is not None and now < retry_at:
                continue  # a failing store is asked again every RETRY seconds
            self.record.mark_running()
            sig = self._signature()
            if sig == seen and not woken and self.failure is None:
                continue
            if self.sync():
                seen = sig
            else:
                retry_at = now + self.RETRY

    def sync(self) -> bool:
        """Upload what changed in the local directory; False if that failed."""
        with self._lock:
            try:
                wrote = self._sync()
            except Exception as exc:
                self._failed(exc)
                return False
            if wrote and self.failure is not None:
                log.warning("saving the state to %s works again", self.public)
                self.failure = None
                self.failed_since = None
            return self.failure is None

    def _sync(self) -> bool:
        """Upload what changed; whether anything was written."""
        if not os.path.isdir(self.local_dir):
            return False
        first = self._local_files()
        changed = [rel for rel, sig in first.items() if self._uploaded.get(rel) != sig]
        if not changed:
            return False
        self.record.fence()
        # Manifests are read into memory first: the files they name exist
        # now (the writer renames a manifest into place after its files).
        manifests: dict[str, bytes] = {}
        for rel in [r for r in changed if r.endswith(".json")]:
            try:
                with open(os.path.join(self.local_dir, rel), "rb") as f:
                    manifests[rel] = f.read()
            except FileNotFoundError:
                continue
        local = self._local_files()
        for rel, sig in local.items():
            if rel.endswith(".json") or self._uploaded.get(rel) == sig:
                continue
            self.fs.put_file(os.path.join(self.local_dir, rel), self._remote(rel))
            self._uploaded[rel] = sig
        for rel, data in manifests.items():
            with self.fs.open(self._remote(rel), "wb") as f:
                f.write(data)
            # As it was when read: a manifest replaced since then differs
            # from this and goes up on the next look.
            self._uploaded[rel] = first[rel]
        # Files the writer removed (unreferenced blobs) go from the store
        # too, once the manifests that replaced them are up.
        for rel in [r for r in self._uploaded if r not in local]:
            if not local:
                break  # the directory was removed as a whole: keep the store's copy
            try:
                self.fs.rm_file(self._remote(rel))
            except FileNotFoundError:
                pass
            del self._uploaded[rel]
        self.uploads += 1
        return True

    def _failed(self, exc: BaseException) -> None:
        reason = describe_error(exc)
        if self.failure != reason:
            log.warning("could not save the state to %s: %s", self.public, reason)
        self.failure = reason
        if self.failed_since is None:
            self.failed_since = time.time()

    def wait_for_writers(self, timeout: float = 120.0) -> bool:
        """Wait until no save into the local directory is under way (a large
        state takes a while to write); False if one still was at the timeout.

        The checkpoint package's contract (worker/checkpoint/autosave.py):
        every saving child holds a shared flock on the pending lock until it
        exits, dead worker or not (pyrepl3_kernel/savelock.py)."""
        return wait_for_saves(self.local_dir, timeout)

    def flush(self, timeout: float = 120.0) -> bool:
        """Upload everything saved so far, now; False if it could not be."""
        deadline = time.monotonic() + timeout
        for _ in range(5):  # a store that refuses writes refuses them again
            if self.sync():
                return True
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        return False

    def clear(self) -> None:
        """Remove this kernel id's state from the store."""
        self.stop()
        try:
            if self.fs.exists(self.prefix):
                self.fs.rm(self.prefix, recursive=True)
        except Exception as exc:
            log.warning("could not remove the state at %s: %s", self.public, describe_error(exc))

    # -- the record: where this kernel id runs, and its running cell ---------------------------------

    def mark_stopped(self) -> None:
        """Say in the record that this kernel stopped on purpose (a move):
        the next kernel of this id does not report a lost host."""
        self.record.write(stopped=True, running=None)

    def cell_started(self, cell_id: str, code: str) -> None:
        """A cell starts: if it still runs after a second, the mirror's
        thread names it in the record (never on the cell's path)."""
        self.record.cell_started(cell_id, code)

    def cell_finished(self) -> str | None:
        """A cell ended: the note for its output about the store, if any."""
        self.record.cell_finished()
        self.wake()
        return self.note()

    def note(self) -> str | None:
        """``pyrepl3: the state is not being saved ...`` when uploads fail:
        when the failure starts or changes, and once a minute while it lasts;
        a line when saving works again (and, once, :attr:`first_note`)."""
        first, self.first_note = self.first_note, None
        text = self._store_note()
        return (first or "") + (text or "") or None

    def _store_note(self) -> str | None:
        now = time.monotonic()
        if self.failure is None:
            if self._reported is not None:
                self._reported = None
                return f"pyrepl3: the state is saved to {self.public} again\n"
            return None
        if self.failure == self._reported and now - self._last_report < 60:
            return None
        self._reported, self._last_report = self.failure, now
        return (
            f"pyrepl3: the state is NOT being saved to {self.public} ({self.failure}); "
            "cells still run, but if this kernel's host is lost its state is lost too\n"
        )
