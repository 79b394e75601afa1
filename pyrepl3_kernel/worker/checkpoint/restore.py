"""Restoring a checkpoint into the namespace: everything is read and verified
first, then names are loaded (references between them resolved, functions
and classes that do not unpickle rebuilt from their source) and put in."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any

from ..pickling import load
from . import chunks
from .buffers import as_saved
from .errors import CheckpointError
from .format import blob_digest
from .namespace import user_names
from .report import Report, cell_number_of, saved_by_of
from .sources import rebuild_from_source, register_sources
from .store import Store, check_name


def restore_checkpoint(shell: Any, store: Store, name: str, clear: bool = True) -> Report:
    """Load checkpoint ``name`` into the namespace. Everything is read and
    verified before the namespace changes: a corrupt checkpoint raises
    :class:`CheckpointError` and leaves the session as it was."""
    check_name(name)
    started = time.perf_counter()
    return restore_manifest(shell, store, store.read_manifest(name), name, clear, started)


def restore_manifest(
    shell: Any,
    store: Store,
    manifest: dict[str, Any],
    name: str,
    clear: bool = True,
    started: float | None = None,
    keep: Mapping[str, Any] | None = None,
) -> Report:
    """Load the state ``manifest`` describes (``name`` says which, in
    errors and the report). ``keep``: names whose current object already is
    the saved one (left as they are, not read)."""
    started = time.perf_counter() if started is None else started
    report = Report(name)
    if list(manifest.get("python", [])) != list(sys.version_info[:2]):
        raise CheckpointError(
            f"checkpoint {name!r} was written by Python "
            f"{'.'.join(map(str, manifest.get('python', [])))}; "
            f"this kernel runs {sys.version_info[0]}.{sys.version_info[1]}"
        )
    entries: dict[str, dict[str, Any]] = manifest["names"]
    blobs: dict[str, tuple[memoryview, list[memoryview]]] = {}
    keep = keep or {}
    for var, entry in entries.items():
        digest = entry.get("blob")
        if digest and digest not in blobs and var not in keep:
            inband, buffers = store.read_blob_parts(digest)
            chunk_map = {int(k): v for k, v in (entry.get("chunks") or {}).items()}
            for i, digests in chunk_map.items():
                if i >= len(buffers):
                    raise CheckpointError(
                        f"checkpoint {name!r} is corrupt: {var!r} names a buffer it lacks"
                    )
                try:
                    buffers[i] = chunks.read(store, digests, int(entry["buffer_sizes"][str(i)]))
                except CheckpointError as exc:
                    raise CheckpointError(
                        f"checkpoint {name!r} is corrupt: the data of {var!r}: {exc}"
                    ) from None
            check = (
                chunks.entry_digest(inband, buffers, chunk_map)
                if chunk_map
                else blob_digest([inband, *buffers])
            )
            if check != digest:
                raise CheckpointError(
                    f"checkpoint {name!r} is corrupt: the data of {var!r} does not match its digest"
                )
            blobs[digest] = (inband, buffers)
    register_sources(manifest.get("sources", {}), entries)
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
        if var in keep:
            loaded[var] = keep[var]
            return loaded[var]
        loading.add(var)
        try:
            if entry.get("blob"):
                inband, buffers = blobs[entry["blob"]]
                buffers = as_saved(buffers, entry.get("readonly"))
                try:
                    loaded[var] = load(inband, buffers, resolve)
                except Exception as exc:
                    if not entry.get("source"):
                        raise
                    # A function or class that does not unpickle here
                    # (e.g. it holds an object of a module this worker
                    # cannot import) is rebuilt from its source.
                    why = f"{type(exc).__name__}: {exc}"
                    loaded[var] = rebuild_from_source(shell, var, entry, loaded, why)
                    rebuilt[var] = why
            else:
                why = entry.get("reason", "")
                loaded[var] = rebuild_from_source(shell, var, entry, loaded, why)
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
            if var in keep:
                report.saved[var]["unchanged"] = True
    for var, entry in entries.items():
        if entry.get("status") == "alias":
            if entry["of"] in loaded:
                loaded[var] = loaded[entry["of"]]
                report.saved[var] = {"status": "alias", "of": entry["of"]}
            else:
                report.failed[var] = f"alias of {entry['of']!r}, which could not be restored"
    ns = shell.user_ns
    if clear:
        for var in user_names(shell):
            if var not in loaded:
                del ns[var]
                report.removed.append(var)
    ns.update(loaded)
    # The execution counter is left alone: the prompts of this session go
    # on from where they are (the report says which cell the state is from).
    count = manifest.get("execution_count")
    report.execution_count = count if isinstance(count, int) else None
    report.cell_number = cell_number_of(manifest)
    report.saved_by = saved_by_of(manifest)
    report.seconds = time.perf_counter() - started
    return report
