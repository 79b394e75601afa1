"""Where checkpoints are kept: a directory (local, or any fsspec URL) of
manifests and content-addressed blobs, written atomically."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from .buffers import aligned, copy_aligned
from .errors import CheckpointError
from .format import (
    FORMAT,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    blob_header,
    blob_lengths,
    objects_of,
    unpack_blob,
)

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")


class Store:
    """A directory of checkpoints: ``<root>/<name>.json`` manifests and
    ``<root>/objects/<digest>`` blobs. ``root`` is a local path or any fsspec
    URL (``memory://x``, ``s3://bucket/prefix``)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        #: fsync every file and directory as it is written (the automatic
        #: saves turn this off and flush the file system once, see
        #: :meth:`sync`).
        self.fsync = True
        self._fs: Any = None
        if "://" in root and not root.startswith("file://"):
            try:
                import fsspec
            except ImportError:
                raise CheckpointError(f"{root!r} needs fsspec (pip install fsspec)") from None
            self._fs, self._path = fsspec.core.url_to_fs(root)
        else:
            self._path = root[len("file://") :] if root.startswith("file://") else root
            os.makedirs(os.path.join(self._path, "objects"), mode=0o700, exist_ok=True)

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
        if not self._fs and self.fsync:
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

    def read_blob_parts(self, digest: str) -> tuple[memoryview, list[memoryview]]:
        """A blob's in-band pickle and its out-of-band buffers, each buffer
        read straight into memory of its own, 64-byte aligned and writable
        (see :mod:`.buffers`). Not verified against the digest here."""
        path = self._join("objects", digest)
        if self._fs:
            inband, buffers = unpack_blob(self.read_blob(digest))
            return inband, [copy_aligned(b) for b in buffers]
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"blob {digest} is missing from {self.root}") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(16)
            count, inband_len = blob_header(head, size)
            lengths = blob_lengths(f.read(8 * count), count, inband_len, size)
            pickled = bytearray(inband_len)
            if f.readinto(pickled) != inband_len:
                raise CheckpointError("blob is corrupt (truncated)")
            buffers = []
            for n in lengths:
                buffer = aligned(n)
                if n and f.readinto(buffer) != n:
                    raise CheckpointError("blob is corrupt (truncated)")
                buffers.append(buffer)
            if f.read(1):
                raise CheckpointError("blob is corrupt (truncated)")
        return memoryview(pickled), buffers

    def write_manifest(self, name: str, manifest: dict[str, Any]) -> None:
        self._write(
            self._join(f"{name}.json"), [json.dumps(manifest, separators=(",", ":")).encode()]
        )

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
        if manifest.get("version") not in READABLE_VERSIONS:
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
            used.update(objects_of(manifest))
        if not self._fs:  # the states of a kernel's history (see .history)
            states = os.path.join(self._path, "states")
            for entry in os.listdir(states) if os.path.isdir(states) else []:
                try:
                    with open(os.path.join(states, entry), "rb") as f:
                        used.update(objects_of(json.load(f)))
                except (OSError, ValueError, AttributeError):
                    return 0
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
        # Plain system calls: a saving child pays for every memory page the
        # Python code it runs touches (copy-on-write), and tempfile and
        # buffered files touch many.
        directory = os.path.dirname(path)
        tmp = os.path.join(directory, f".tmp-{os.urandom(8).hex()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                for part in parts:
                    _write_all(fd, part)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise
        if sync_dir and self.fsync:
            _fsync_dir(directory)

    def sync(self) -> None:
        """Flush the file system holding the store to disk, in one call
        (``syncfs``; ``sync`` where that is missing)."""
        if self._fs:
            return
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(self._path, os.O_RDONLY)
            try:
                if libc.syncfs(fd) == 0:
                    return
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            pass
        os.sync()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    while view.nbytes:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: str) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.startswith("."):
        raise CheckpointError(
            f"bad checkpoint name {name!r}: use letters, digits, '_', '-' and '.' (at most 128)"
        )


def default_store_root() -> str:
    """``$PYREPL3_CHECKPOINT_DIR``, else ``<jupyter data dir>/pyrepl3/checkpoints``."""
    configured = os.environ.get("PYREPL3_CHECKPOINT_DIR")
    if configured:
        return configured
    from jupyter_core.paths import jupyter_data_dir

    return os.path.join(jupyter_data_dir(), "pyrepl3", "checkpoints")
