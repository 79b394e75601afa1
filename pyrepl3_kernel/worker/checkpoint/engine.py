"""Checkpoints of a session's state: save, restore, list, delete, info.

A checkpoint is a manifest (JSON) naming, for every user variable, what
happened to it (``saved``, ``alias`` of another name, ``reference`` for
modules, ``reconstructed`` for files and locks, ``skipped`` and why) and the
content-addressed blob holding it. Blobs are shared between checkpoints of a
store, so a checkpoint after a small change rewrites only what changed.

Writes are atomic (temp file, fsync, rename); the manifest is written last,
so a half-written checkpoint never replaces a good one. Every blob is
verified against its digest when read: a corrupt or truncated checkpoint is
refused before the session is touched.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import os
import re
import struct
import sys
import tempfile
import time
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

from ...units import format_size
from ..pickling import (
    CONTAINERS,
    ContainerAwarePickler,
    NamespacePickler,
    NotRestorable,
    holds_named_container,
    is_user_class,
    is_user_function,
    load,
)

FORMAT = "pyrepl3-checkpoint"
FORMAT_VERSION = 1
_BLOB_MAGIC = b"P3CK"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
#: IPython's own names in the user namespace.
_IPYTHON_NAMES = re.compile(
    r"^(_|__|___|_i|_ii|_iii|_i\d+|_\d+|_ih|_oh|_dh|_exit_code|In|Out|exit|quit|get_ipython)$"
)


class CheckpointError(Exception):
    """A checkpoint could not be written or read; the message says why."""


class CheckpointExistsError(CheckpointError):
    """A save would replace a checkpoint that another notebook (or, for
    kernels without a notebook, another kernel) saved; nothing was written."""


try:
    import xxhash

    def _hasher() -> Any:
        return xxhash.xxh3_128()

except ImportError:  # pragma: no cover - xxhash is a dependency

    def _hasher() -> Any:
        return hashlib.blake2b(digest_size=16)


def _digest(parts: list[bytes | memoryview]) -> str:
    """Content digest of a blob (xxh3-128: change detection and integrity)."""
    h = _hasher()
    for part in parts:
        h.update(part)
    return str(h.hexdigest())


# -- storage ------------------------------------------------------------------------


class Store:
    """A directory of checkpoints: ``<root>/<name>.json`` manifests and
    ``<root>/objects/<digest>`` blobs. ``root`` is a local path or any fsspec
    URL (``memory://x``, ``s3://bucket/prefix``)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self._fs: Any = None
        if "://" in root and not root.startswith("file://"):
            try:
                import fsspec
            except ImportError:
                raise CheckpointError(f"{root!r} needs fsspec (pip install fsspec)") from None
            self._fs, self._path = fsspec.core.url_to_fs(root)
        else:
            self._path = root[len("file://") :] if root.startswith("file://") else root
            os.makedirs(os.path.join(self._path, "objects"), exist_ok=True)

    def _join(self, *parts: str) -> str:
        return "/".join([self._path.rstrip("/"), *parts])

    def has_blob(self, digest: str) -> bool:
        path = self._join("objects", digest)
        return bool(self._fs.exists(path)) if self._fs else os.path.exists(path)

    def write_blob(self, digest: str, parts: list[bytes | memoryview]) -> None:
        if not self.has_blob(digest):
            self._write(self._join("objects", digest), parts, sync_dir=False)

    def sync_blobs(self) -> None:
        """Make the directory entries of blobs written so far durable."""
        if not self._fs:
            _fsync_dir(self._join("objects"))

    def read_blob(self, digest: str) -> bytearray:
        """The blob's bytes, in writable memory: arrays restored from its
        out-of-band buffers use it in place and must stay writable."""
        path = self._join("objects", digest)
        try:
            if self._fs:
                with self._fs.open(path, "rb") as f:
                    return bytearray(f.read())
            with open(path, "rb") as f:
                data = bytearray(os.fstat(f.fileno()).st_size)
                read = f.readinto(data)
                if read != len(data):
                    del data[read:]
                return data
        except FileNotFoundError:
            raise CheckpointError(f"blob {digest} is missing from {self.root}") from None

    def write_manifest(self, name: str, manifest: dict[str, Any]) -> None:
        self._write(self._join(f"{name}.json"), [json.dumps(manifest, indent=1).encode()])

    def read_manifest(self, name: str) -> dict[str, Any]:
        path = self._join(f"{name}.json")
        try:
            if self._fs:
                with self._fs.open(path, "rb") as f:
                    raw = f.read()
            else:
                with open(path, "rb") as f:
                    raw = f.read()
        except FileNotFoundError:
            raise CheckpointError(f"no checkpoint named {name!r} in {self.root}") from None
        try:
            manifest = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint {name!r} is corrupt (manifest: {exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {name!r} is corrupt (not a {FORMAT} manifest)")
        if manifest.get("version") != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {name!r} has format version {manifest.get('version')}; "
                f"this kernel reads version {FORMAT_VERSION}"
            )
        names = manifest.get("names")
        if not isinstance(names, dict) or not all(isinstance(e, dict) for e in names.values()):
            raise CheckpointError(f"checkpoint {name!r} is corrupt (manifest has no name table)")
        return manifest

    def names(self) -> list[str]:
        if self._fs:
            try:
                listing = self._fs.ls(self._path, detail=False)
            except FileNotFoundError:  # nothing was ever saved there
                listing = []
            entries = [p.rsplit("/", 1)[-1] for p in listing]
        else:
            entries = os.listdir(self._path) if os.path.isdir(self._path) else []
        return sorted(e[: -len(".json")] for e in entries if e.endswith(".json"))

    def delete(self, name: str) -> None:
        path = self._join(f"{name}.json")
        try:
            if self._fs:
                self._fs.rm(path)
            else:
                os.remove(path)
        except FileNotFoundError:
            raise CheckpointError(f"no checkpoint named {name!r} in {self.root}") from None
        self.collect_garbage()

    def collect_garbage(self) -> int:
        """Remove blobs no manifest refers to; returns how many."""
        used: set[str] = set()
        for name in self.names():
            try:
                manifest = self.read_manifest(name)
            except CheckpointError:
                return 0  # never drop blobs while a manifest is unreadable
            used.update(e["blob"] for e in manifest["names"].values() if e.get("blob"))
        objects = self._join("objects")
        if self._fs:
            blobs = (
                [p.rsplit("/", 1)[-1] for p in self._fs.ls(objects, detail=False)]
                if self._fs.exists(objects)
                else []
            )
        else:
            blobs = os.listdir(objects)
        removed = 0
        for blob in blobs:
            if blob not in used and not blob.startswith("."):
                if self._fs:
                    self._fs.rm(self._join("objects", blob))
                else:
                    os.remove(os.path.join(objects, blob))
                removed += 1
        return removed

    def _write(self, path: str, parts: list[bytes | memoryview], sync_dir: bool = True) -> None:
        if self._fs:
            tmp = f"{path}.tmp-{os.getpid()}"
            with self._fs.open(tmp, "wb") as f:
                for part in parts:
                    f.write(part)
            self._fs.mv(tmp, path)
            return
        directory = os.path.dirname(path)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                for part in parts:
                    f.write(part)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise
        if sync_dir:
            _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -- blobs ---------------------------------------------------------------------------


def pack_blob(inband: bytes, buffers: list[memoryview]) -> list[bytes | memoryview]:
    """A blob as the parts to write one after the other (no copies of the
    out-of-band buffers): header, in-band pickle, buffers."""
    header = _BLOB_MAGIC + struct.pack(">IQ", len(buffers), len(inband))
    header += b"".join(struct.pack(">Q", b.nbytes) for b in buffers)
    return [header, inband, *(b.cast("B") for b in buffers)]


def unpack_blob(data: bytes | bytearray) -> tuple[memoryview, list[memoryview]]:
    view = memoryview(data)
    if len(view) < 16 or view[:4] != _BLOB_MAGIC:
        raise CheckpointError("blob is corrupt (bad header)")
    count, inband_len = struct.unpack(">IQ", view[4:16])
    pos = 16
    if pos + 8 * count > len(view):
        raise CheckpointError("blob is corrupt (truncated)")
    lengths = []
    for _ in range(count):
        lengths.append(struct.unpack(">Q", view[pos : pos + 8])[0])
        pos += 8
    inband = view[pos : pos + inband_len]
    pos += inband_len
    buffers = []
    for n in lengths:
        buffers.append(view[pos : pos + n])
        pos += n
    if pos != len(view):
        raise CheckpointError("blob is corrupt (truncated)")
    return inband, buffers


# -- the engine ------------------------------------------------------------------------


@dataclass
class Report:
    """What a save or restore did, name by name."""

    name: str
    saved: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    bytes_written: int = 0
    #: The execution counter when the state was saved: the number the next
    #: cell took (``cell_number + 1``).
    execution_count: int | None = None
    #: The number of the cell (``In [N]``) the state is from: the cell that
    #: saved it, or the last one run before it was saved (0: none).
    cell_number: int | None = None
    #: Who saved it: ``{"notebook": path or None, "kernel": id}``.
    saved_by: dict[str, Any] | None = None
    reused: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "saved": self.saved,
            "skipped": self.skipped,
            "failed": self.failed,
            "removed": self.removed,
            "bytes_written": self.bytes_written,
            "execution_count": self.execution_count,
            "cell_number": self.cell_number,
            "saved_by": self.saved_by,
            "reused": self.reused,
            "seconds": round(self.seconds, 6),
        }


def current_cell(shell: Any) -> int:
    """The number of the cell the user sees as the current one: the cell
    running now (a ``%checkpoint save`` in ``In [6]`` gives 6), else the last
    cell run (0 before the first). IPython 9 moves the counter on when a cell
    starts, IPython 8 when it ends: the running cell's own number is read
    from its result, which both set before the cell runs."""
    running = getattr(getattr(shell, "displayhook", None), "exec_result", None)
    info = getattr(running, "info", None)
    count = getattr(running, "execution_count", None)
    if (
        isinstance(count, int)
        and getattr(info, "store_history", False)
        and not getattr(info, "silent", False)
    ):
        return count
    return max(0, int(shell.execution_count) - 1)


def cell_number_of(manifest: dict[str, Any]) -> int | None:
    """The cell a manifest's state is from (older manifests only have the
    execution counter, one ahead of it)."""
    cell = manifest.get("cell_number")
    if isinstance(cell, int) and not isinstance(cell, bool):
        return cell
    count = manifest.get("execution_count")
    if isinstance(count, int) and not isinstance(count, bool) and count > 0:
        return count - 1
    return None


def user_names(shell: Any) -> list[str]:
    """The user's variables, in the order a restore needs: modules, classes,
    functions, then everything else (each group in namespace order)."""
    hidden = shell.user_ns_hidden
    names = [
        n
        for n in shell.user_ns
        if not n.startswith("__")
        and not _IPYTHON_NAMES.match(n)
        and (n not in hidden or shell.user_ns[n] is not hidden[n])
    ]

    def rank(name: str) -> int:
        obj = shell.user_ns[name]
        if isinstance(obj, types.ModuleType):
            return 0
        if isinstance(obj, type):
            return 1
        if callable(obj) and isinstance(obj, types.FunctionType):
            return 2
        return 3

    return sorted(names, key=rank)


class CheckpointEngine:
    """Save and restore ``shell.user_ns`` to and from a :class:`Store`."""

    def __init__(self, shell: Any, store: Store) -> None:
        self.shell = shell
        self.store = store

    def save(
        self,
        name: str,
        max_object_bytes: int | None = None,
        extra: dict[str, Any] | None = None,
        saved_by: dict[str, Any] | None = None,
    ) -> Report:
        """Save the namespace as checkpoint ``name``, replacing any checkpoint
        of that name (whose owner the caller checked). Objects whose pickled
        size exceeds ``max_object_bytes`` are skipped (and reported);
        ``saved_by`` is recorded in the manifest."""
        _check_name(name)
        started = time.perf_counter()
        cell = current_cell(self.shell)
        report = Report(name, execution_count=cell + 1, cell_number=cell, saved_by=saved_by)
        ns = self.shell.user_ns
        entries: dict[str, dict[str, Any]] = {}
        canonical: dict[int, str] = {}
        order: list[str] = []
        for var in user_names(self.shell):
            obj = ns[var]
            if id(obj) in canonical:
                entries[var] = {
                    "status": "alias",
                    "of": canonical[id(obj)],
                    "type": _type_name(obj),
                }
            else:
                canonical[id(obj)] = var
                order.append(var)
        by_source: dict[str, str] = {}
        pickled = self._pickle_all(order, ns, canonical, report, by_source)
        sources: dict[str, str] = {}
        modules: set[str] = set()
        for var in order:
            obj = ns[var]
            if var in by_source:
                entries[var] = {
                    "status": "source",
                    "type": _type_name(obj),
                    "reason": by_source[var],
                }
                _add_source(entries[var], obj, ns, sources)
                continue
            if var in report.skipped:
                entries[var] = {
                    "status": "skipped",
                    "type": _type_name(obj),
                    "reason": report.skipped[var],
                }
                continue
            inband, buffers, refs = pickled[var]
            size = len(inband) + sum(b.nbytes for b in buffers)
            if max_object_bytes is not None and size > max_object_bytes:
                reason = (
                    f"too large for automatic checkpoints ({format_size(size)} > {format_size(max_object_bytes)}); "
                    "save it with %checkpoint save NAME"
                )
                entries[var] = {"status": "skipped", "type": _type_name(obj), "reason": reason}
                report.skipped[var] = reason
                continue
            digest = _digest([inband, *buffers])
            if self.store.has_blob(digest):
                report.reused += 1
            else:
                blob = pack_blob(inband, buffers)
                self.store.write_blob(digest, blob)
                report.bytes_written += sum(len(part) for part in blob)
            size = len(inband) + sum(b.nbytes for b in buffers)
            entry: dict[str, Any] = {
                "status": _status_of(obj),
                "type": _type_name(obj),
                "size": size,
                "blob": digest,
            }
            if refs:
                entry["refs"] = sorted(refs)
            _add_source(entry, obj, ns, sources)
            modules.update(_modules_of(obj))
            entries[var] = entry
        for var, entry in entries.items():
            report.saved[var] = {k: v for k, v in entry.items() if k not in ("source", "reason")}
            if entry["status"] == "skipped":
                del report.saved[var]
        history = self.shell.history_manager
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "created": time.time(),
            "python": list(sys.version_info[:2]),
            "execution_count": report.execution_count,
            "cell_number": report.cell_number,
            "saved_by": saved_by,
            "names": entries,
            "modules": sorted(modules),
            "sources": {k: v for k, v in sources.items() if v},
            "history": list(history.input_hist_raw[1:]) if history is not None else [],
        }
        if report.bytes_written:
            self.store.sync_blobs()
        if extra:
            manifest.update(extra)
        self.store.write_manifest(name, manifest)
        report.seconds = time.perf_counter() - started
        return report

    def _pickle_all(
        self,
        order: list[str],
        ns: dict[str, Any],
        canonical: dict[int, str],
        report: Report,
        by_source: dict[str, str],
    ) -> dict[str, tuple[bytes, list[memoryview], set[str]]]:
        """Pickle every name; names may refer to each other, except that a
        name that cannot be saved is never referred to (whoever contains it
        is re-pickled and fails or inlines it), and within a reference cycle
        only earlier names are referred to (so loading terminates).

        A function or class of the cells that cannot be pickled, and every
        dataclass and enum (whose generated parts do not survive pickling by
        value), goes to ``by_source`` instead: it is saved as its source and
        stays referable (a restore runs the source before loading others)."""
        pickled: dict[str, tuple[bytes, list[memoryview], set[str]]] = {}
        referable = dict(canonical)
        containers = {i: v for i, v in canonical.items() if type(ns[v]) in CONTAINERS}

        def one(var: str, allowed: dict[int, str]) -> None:
            obj = ns[var]
            if _prefers_source(obj) and _rebuildable(var, obj, ns):
                by_source[var] = "saved as its source (a dataclass or enum)"
                return
            buffers: list[memoryview] = []
            out = io.BytesIO()
            kind = (
                ContainerAwarePickler
                if holds_named_container(obj, containers)
                else NamespacePickler
            )
            pickler = kind(out, ns, allowed, obj, lambda b: buffers.append(b.raw()))
            try:
                pickler.dump(obj)
            except Exception as exc:
                reason = (
                    str(exc)
                    if isinstance(exc, NotRestorable)
                    else f"cannot be pickled: {type(exc).__name__}: {exc}"
                )
                pickled.pop(var, None)
                if _rebuildable(var, obj, ns):
                    by_source[var] = reason
                    return
                report.skipped[var] = reason
                referable.pop(id(obj), None)
                return
            pickled[var] = (out.getvalue(), buffers, pickler.refs)

        for var in order:
            one(var, referable)
        while True:
            stale = [v for v, (_, _, refs) in pickled.items() if refs & set(report.skipped)]
            if not stale:
                break
            for var in stale:
                one(var, referable)
        position = {var: i for i, var in enumerate(order)}
        for component in _cycles({v: refs for v, (_, _, refs) in pickled.items()}):
            for var in sorted(component, key=position.__getitem__):
                later = {v for v in component if position[v] > position[var]}
                allowed = {k: v for k, v in referable.items() if v not in later}
                one(var, allowed)
        return pickled

    def restore(self, name: str, clear: bool = True) -> Report:
        """Load checkpoint ``name`` into the namespace. Everything is read and
        verified before the namespace changes: a corrupt checkpoint raises
        :class:`CheckpointError` and leaves the session as it was."""
        _check_name(name)
        started = time.perf_counter()
        manifest = self.store.read_manifest(name)
        report = Report(name)
        if list(manifest.get("python", [])) != list(sys.version_info[:2]):
            raise CheckpointError(
                f"checkpoint {name!r} was written by Python "
                f"{'.'.join(map(str, manifest.get('python', [])))}; "
                f"this kernel runs {sys.version_info[0]}.{sys.version_info[1]}"
            )
        entries: dict[str, dict[str, Any]] = manifest["names"]
        blobs: dict[str, tuple[memoryview, list[memoryview]]] = {}
        for var, entry in entries.items():
            digest = entry.get("blob")
            if digest and digest not in blobs:
                inband, buffers = unpack_blob(self.store.read_blob(digest))
                if _digest([inband, *buffers]) != digest:
                    raise CheckpointError(
                        f"checkpoint {name!r} is corrupt: the data of {var!r} does not match its digest"
                    )
                blobs[digest] = (inband, buffers)
        _register_sources(manifest.get("sources", {}), entries)
        loaded: dict[str, Any] = {}
        loading: set[str] = set()
        rebuilt: dict[str, str] = {}  # name -> why it was rebuilt from its source

        def resolve(var: str) -> Any:
            if var in loaded:
                return loaded[var]
            if var in report.failed:
                raise CheckpointError(f"it refers to {var!r}, which could not be restored")
            if var in loading:
                raise CheckpointError(f"reference cycle through {var!r}")
            entry = entries.get(var)
            if entry is None or not (entry.get("blob") or entry.get("status") == "source"):
                raise CheckpointError(f"it refers to {var!r}, which is not in the checkpoint")
            loading.add(var)
            try:
                if entry.get("blob"):
                    inband, buffers = blobs[entry["blob"]]
                    try:
                        loaded[var] = load(inband, buffers, resolve)
                    except Exception as exc:
                        if not entry.get("source"):
                            raise
                        # A function or class that does not unpickle here
                        # (e.g. it holds an object of a module this worker
                        # cannot import) is rebuilt from its source.
                        why = f"{type(exc).__name__}: {exc}"
                        loaded[var] = self._from_source(var, entry, loaded, why)
                        rebuilt[var] = why
                else:
                    why = entry.get("reason", "")
                    loaded[var] = self._from_source(var, entry, loaded, why)
                    rebuilt[var] = why
            finally:
                loading.discard(var)
            return loaded[var]

        for var, entry in entries.items():
            status = entry.get("status")
            if status == "skipped":
                report.skipped[var] = entry.get("reason", "")
            elif status != "alias" and var not in loaded:
                try:
                    resolve(var)
                except Exception as exc:
                    report.failed[var] = f"{type(exc).__name__}: {exc}"
                    continue
        for var, entry in entries.items():
            if var in rebuilt:
                report.saved[var] = {
                    "status": "rebuilt",
                    "from": "source",
                    "type": entry.get("type", ""),
                    "error": rebuilt[var],
                }
            elif var in loaded:
                report.saved[var] = {
                    k: v for k, v in entry.items() if k not in ("source", "blob", "reason")
                }
        for var, entry in entries.items():
            if entry.get("status") == "alias":
                if entry["of"] in loaded:
                    loaded[var] = loaded[entry["of"]]
                    report.saved[var] = {"status": "alias", "of": entry["of"]}
                else:
                    report.failed[var] = f"alias of {entry['of']!r}, which could not be restored"
        ns = self.shell.user_ns
        if clear:
            for var in user_names(self.shell):
                if var not in loaded:
                    del ns[var]
                    report.removed.append(var)
        ns.update(loaded)
        # The execution counter is left alone: the prompts of this session go
        # on from where they are (the report says which cell the state is from).
        count = manifest.get("execution_count")
        report.execution_count = count if isinstance(count, int) else None
        report.cell_number = cell_number_of(manifest)
        report.saved_by = _saved_by(manifest)
        report.seconds = time.perf_counter() - started
        return report

    def _from_source(
        self, var: str, entry: dict[str, Any], loaded: dict[str, Any], why: str
    ) -> Any:
        """Run the saved source of function or class ``var``; raises
        :class:`CheckpointError` (saying ``why`` it was needed) if that fails."""
        source = entry.get("source")
        if not source:
            raise CheckpointError(f"{why}; no source to rebuild it from")
        scratch = dict(self.shell.user_ns)
        scratch.update(loaded)
        try:
            exec(compile(source, entry.get("cell") or f"<restored {var}>", "exec"), scratch)
            obj = scratch[var]
        except Exception as exc:
            raise CheckpointError(
                f"{why}; rebuilding it from its source failed: {type(exc).__name__}: {exc}"
            ) from None
        # exec gave it (or its methods) the scratch dict as globals; give them
        # the live namespace, so rebinding a global changes what they see.
        return _rehome(obj, scratch, self.shell.user_ns)

    def list(self) -> list[dict[str, Any]]:
        out = []
        for name in self.store.names():
            try:
                out.append(self.info(name))
            except CheckpointError as exc:
                out.append({"name": name, "error": str(exc)})
        return out

    def info(self, name: str) -> dict[str, Any]:
        _check_name(name)
        manifest = self.store.read_manifest(name)
        entries = manifest["names"]
        return {
            "name": name,
            "created": manifest["created"],
            "execution_count": manifest.get("execution_count"),
            "cell_number": cell_number_of(manifest),
            "saved_by": _saved_by(manifest),
            "python": ".".join(map(str, manifest.get("python", []))),
            "size": sum(e.get("size", 0) for e in entries.values()),
            "names": {
                k: {kk: vv for kk, vv in v.items() if kk != "source"} for k, v in entries.items()
            },
        }

    def delete(self, name: str) -> None:
        _check_name(name)
        self.store.delete(name)


def _saved_by(manifest: dict[str, Any]) -> dict[str, Any] | None:
    saved_by = manifest.get("saved_by")
    return saved_by if isinstance(saved_by, dict) else None


def _rehome(obj: Any, old: dict[str, Any], new: dict[str, Any]) -> Any:
    """``obj`` (a function, or a class and its methods) with ``new`` as the
    globals of every function whose globals are ``old``."""
    if isinstance(obj, types.FunctionType):
        if obj.__globals__ is not old:
            return obj
        func = types.FunctionType(
            obj.__code__, new, obj.__name__, obj.__defaults__, obj.__closure__
        )
        func.__kwdefaults__ = obj.__kwdefaults__
        func.__qualname__ = obj.__qualname__
        func.__module__ = obj.__module__
        func.__doc__ = obj.__doc__
        func.__annotations__ = obj.__annotations__
        func.__dict__.update(obj.__dict__)
        return func
    if isinstance(obj, type):
        for key, value in list(vars(obj).items()):
            replacement: Any = value
            if isinstance(value, types.FunctionType):
                replacement = _rehome(value, old, new)
            elif isinstance(value, (staticmethod, classmethod)):
                inner = _rehome(value.__func__, old, new)
                if inner is not value.__func__:
                    replacement = type(value)(inner)
            elif isinstance(value, property):
                accessors = [
                    None if f is None else _rehome(f, old, new)
                    for f in (value.fget, value.fset, value.fdel)
                ]
                if accessors != [value.fget, value.fset, value.fdel]:
                    fget, fset, fdel = accessors
                    replacement = property(fget, fset, fdel, value.__doc__)
            if replacement is not value:
                setattr(obj, key, replacement)
    return obj


def _add_source(
    entry: dict[str, Any], obj: Any, ns: dict[str, Any], sources: dict[str, str]
) -> None:
    """Record the source of a function or class of the cells in its entry
    (and its cell's text in ``sources``), for ``inspect`` and rebuilds."""
    source = _source_of(obj, ns)
    if source is None:
        return
    entry["source"] = source
    if isinstance(obj, type):
        entry["qualname"] = obj.__qualname__
    filename = _defining_file(obj)
    if filename:
        entry["cell"] = filename
        sources.setdefault(filename, _cell_source(filename))


def _prefers_source(obj: Any) -> bool:
    """Classes whose generated parts (a dataclass's ``__init__`` compares
    with sentinels of ``dataclasses``; an enum's members) do not survive
    pickling by value."""
    return is_user_class(obj) and (
        "__dataclass_fields__" in vars(obj) or isinstance(obj, enum.EnumMeta)
    )


def _rebuildable(var: str, obj: Any, ns: dict[str, Any]) -> bool:
    """Whether running the source of ``obj`` defines it as ``var``."""
    return (
        (is_user_function(obj, ns) or is_user_class(obj))
        and obj.__name__ == var
        and "<locals>" not in obj.__qualname__
        and _source_of(obj, ns) is not None
    )


def _type_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _defining_file(obj: Any) -> str | None:
    if isinstance(obj, types.FunctionType):
        return str(obj.__code__.co_filename)
    if isinstance(obj, type):
        from .sources import class_file

        return class_file(obj)
    return None


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.startswith("."):
        raise CheckpointError(
            f"bad checkpoint name {name!r}: use letters, digits, '_', '-' and '.' (at most 128)"
        )


def _status_of(obj: Any) -> str:
    if isinstance(obj, types.ModuleType):
        return "reference"
    from ..pickling import FILE_TYPES, LOCK_TYPES

    if isinstance(obj, FILE_TYPES) or type(obj) in LOCK_TYPES:
        return "reconstructed"
    return "saved"


def _modules_of(obj: Any) -> list[str]:
    if isinstance(obj, types.ModuleType):
        return [obj.__name__.split(".")[0]]
    module = type(obj).__module__ or ""
    root = module.split(".")[0]
    return [] if root in ("builtins", "__main__", "") else [root]


#: Sources found so far (``inspect.getsource`` parses the whole cell: a few
#: ms per save otherwise). Keyed by the function or class itself; a function
#: whose ``__code__`` was replaced is looked up again.
_SOURCES: weakref.WeakKeyDictionary[Any, tuple[Any, str]] = weakref.WeakKeyDictionary()


def _source_of(obj: Any, ns: dict[str, Any]) -> str | None:
    if not (is_user_function(obj, ns) or is_user_class(obj)):
        return None
    code = getattr(obj, "__code__", None)
    cached = _SOURCES.get(obj)
    if cached is not None and cached[0] is code:
        return cached[1]
    import inspect

    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError):
        return None
    try:
        _SOURCES[obj] = (code, source)
    except TypeError:  # not weakly referable
        pass
    return source


def _cell_source(filename: str) -> str:
    import linecache

    return "".join(linecache.getlines(filename))


def _register_sources(sources: dict[str, str], entries: dict[str, dict[str, Any]]) -> None:
    from .sources import register_class_cell, register_source

    for filename, text in sources.items():
        register_source(filename, text)
    for entry in entries.values():
        if entry.get("cell") and entry.get("qualname"):
            register_class_cell(entry["qualname"], entry["cell"])
