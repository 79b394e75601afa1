"""The checkpoint engine: saves a shell's namespace to a :class:`~.store.Store`
object by object, and restores, lists, describes and deletes checkpoints."""

from __future__ import annotations

import io
import resource
import sys
import time
import types
from collections.abc import Callable
from typing import Any

from ...units import format_size
from ..pickling import (
    CONTAINERS,
    ContainerAwarePickler,
    NamespacePickler,
    NotRestorable,
    holds_named_container,
)
from . import chunks, parts
from .dirty import close_over
from .errors import CheckpointError
from .format import FORMAT, blob_digest, pack_blob, version_of
from .namespace import user_names
from .report import Report, cell_number_of, current_cell, saved_by_of
from .restore import restore_checkpoint
from .sources import add_source, prefers_source, rebuildable
from .store import Store, check_name

#: The actions of a checkpoint request (and of ``%checkpoint``).
ACTIONS = ("save", "restore", "list", "delete", "info")


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
        before_manifest: Callable[[dict[str, Any], Report], None] | None = None,
        changed: set[str] | None = None,
        moved: set[str] | None = None,
        base: dict[str, Any] | None = None,
        budget: int | None = None,
        plan: parts.Plan | None = None,
    ) -> Report:
        """Save the namespace as checkpoint ``name``, replacing any checkpoint
        of that name (whose owner the caller checked). Objects whose pickled
        size exceeds ``max_object_bytes`` are skipped (and reported);
        ``saved_by`` is recorded in the manifest. Objects that would make
        the state larger than ``budget`` bytes are skipped (and reported).
        Out-of-band buffers of 16 MiB and more are saved by the chunk
        (:mod:`.chunks`). ``before_manifest`` is
        called with the manifest and the report once the blobs are durable,
        before the manifest is written (the state history records it).

        Incremental: given ``base`` (the manifest of the previous save of
        this namespace) and ``changed`` (the names that may have changed
        since, ``moved`` those among them bound to another object or
        deleted), only those and what they reach are pickled
        (:func:`.dirty.close_over`); every other name keeps its entry in
        ``base``. Given ``plan`` (what the worker found out about its big
        dicts before it forked the saving child), big dicts of immutable
        values are saved in parts (:mod:`.parts`).

        The manifest records how long each phase took (``save_phases``,
        seconds) and the memory pages it faulted in (``save_faults``: in a
        forked child mostly copy-on-write copies)."""
        check_name(name)
        started = time.perf_counter()
        clock = _Phases()
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
        clock.mark("names")
        reuse: dict[str, dict[str, Any]] = {}
        base_sources: dict[str, str] = {}
        base_names: dict[str, dict[str, Any]] = {}
        if base is not None and changed is not None:
            base_names = base.get("names", {})
            names = [*order, *(v for v in entries)]
            dirty = close_over(changed, moved or set(), ns, names, base_names)
            for var in order:
                previous = base_names.get(var)
                if (
                    var not in dirty
                    and previous is not None
                    and previous.get("status") not in ("skipped", "alias")
                    and (previous.get("blob") or previous.get("status") == "source")
                ):
                    reuse[var] = previous
                elif (
                    var not in dirty
                    and previous is not None
                    and previous.get("unpicklable")
                    and isinstance(previous.get("reason"), str)
                ):
                    # The same object failed to pickle last time: it still does.
                    report.skipped[var] = previous["reason"]
            base_sources = base.get("sources", {})
        clock.mark("close_over")
        by_source: dict[str, str] = {}
        state_bytes = 0
        parted = self._save_parts(name, [v for v in order if v not in reuse], ns, base_names, plan)
        clock.mark("parts")
        todo = [v for v in order if v not in reuse and v not in parted and v not in report.skipped]
        pickled = self._pickle_all(todo, ns, canonical, report, by_source) if todo else {}
        clock.mark("pickle")
        if any(set(e.get("refs", ())) & report.skipped.keys() for e in reuse.values()):
            # A name kept as it was refers to one that cannot be saved now.
            return self.save(
                name, max_object_bytes, extra, saved_by, before_manifest, budget=budget, plan=plan
            )
        sources: dict[str, str] = {}
        modules: set[str] = set()
        for var in order:
            obj = ns[var]
            if var in reuse:
                entries[var] = dict(reuse[var])
                state_bytes += int(reuse[var].get("size", 0))
                report.reused += 1
                cell_file = reuse[var].get("cell")
                if cell_file and cell_file in base_sources:
                    sources.setdefault(cell_file, base_sources[cell_file])
                modules.update(_modules_of(obj))
                continue
            if var in by_source:
                entries[var] = {
                    "status": "source",
                    "type": _type_name(obj),
                    "reason": by_source[var],
                }
                add_source(entries[var], obj, ns, sources)
                continue
            if var in report.skipped:
                entries[var] = {
                    "status": "skipped",
                    "type": _type_name(obj),
                    "reason": report.skipped[var],
                    "unpicklable": True,  # not for its size: the next save need not try again
                }
                continue
            split = parted.get(var)
            buffers: list[memoryview]
            refs: set[str]
            if split is not None:
                inband, buffers, refs = split.inband, [], set()
                size = split.size
            else:
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
            if budget is not None and state_bytes + size > budget:
                reason = (
                    f"left out: the state would not fit in the kernel's disk budget "
                    f"({format_size(state_bytes + size)} > {format_size(budget)}; "
                    "raise PYREPL3_STATES_BUDGET, or save it with %checkpoint save NAME)"
                )
                entries[var] = {"status": "skipped", "type": _type_name(obj), "reason": reason}
                report.skipped[var] = reason
                continue
            state_bytes += size
            if split is not None:
                report.bytes_written += split.written
                digest = parts.digest_of(split)
                if self.store.has_blob(digest):
                    report.reused += 1
                else:
                    blob = pack_blob(inband, [memoryview(b"")] * len(split.entry["chunks"]))
                    self.store.write_blob(digest, blob)
                    report.bytes_written += sum(len(part) for part in blob)
                entries[var] = {
                    "status": "saved",
                    "type": _type_name(obj),
                    "size": size,
                    "blob": digest,
                    **split.entry,
                }
                continue
            big = chunks.chunked_indexes(buffers)
            chunk_map: dict[int, list[str]] = {}
            for i in big:
                digests, written = chunks.write(self.store, buffers[i])
                chunk_map[i] = digests
                report.bytes_written += written
            if chunk_map:
                digest = chunks.entry_digest(inband, buffers, chunk_map)
                stored = [memoryview(b"") if i in chunk_map else b for i, b in enumerate(buffers)]
            else:
                digest = blob_digest([inband, *buffers])
                stored = buffers
            if self.store.has_blob(digest):
                report.reused += 1
            else:
                blob = pack_blob(inband, stored)
                self.store.write_blob(digest, blob)
                report.bytes_written += sum(len(part) for part in blob)
            entry: dict[str, Any] = {
                "status": _status_of(obj),
                "type": _type_name(obj),
                "size": size,
                "blob": digest,
            }
            if chunk_map:
                entry["chunks"] = {str(i): d for i, d in chunk_map.items()}
                entry["chunk_size"] = chunks.CHUNK_SIZE
                entry["buffer_sizes"] = {str(i): buffers[i].nbytes for i in chunk_map}
            if refs:
                entry["refs"] = sorted(refs)
            readonly = [i for i, b in enumerate(buffers) if b.readonly]
            if readonly:
                entry["readonly"] = readonly
            add_source(entry, obj, ns, sources)
            modules.update(_modules_of(obj))
            entries[var] = entry
        clock.mark("write")
        for var, entry in entries.items():
            hidden = _PARTS_DETAIL if "parts" in entry else ("source", "reason")
            report.saved[var] = {k: v for k, v in entry.items() if k not in hidden}
            if entry["status"] == "skipped":
                del report.saved[var]
        history = self.shell.history_manager
        manifest = {
            "format": FORMAT,
            "version": version_of(entries),
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
        if parted:
            manifest["save_parts"] = {
                v: [s.pickled_parts, s.reused_parts] for v, s in parted.items() if v in entries
            }
        if plan is not None and plan.dicts:
            manifest["scan_seconds"] = round(plan.seconds, 6)  # in the worker, before the fork
        clock.mark("manifest")
        if report.bytes_written:
            self.store.sync_blobs()
        clock.mark("sync_blobs")
        manifest["save_phases"], manifest["save_faults"] = clock.phases, clock.faults
        if extra:
            manifest.update(extra)
        if before_manifest is not None:
            before_manifest(manifest, report)
        self.store.write_manifest(name, manifest)
        report.seconds = time.perf_counter() - started
        return report

    def _save_parts(
        self,
        name: str,
        candidates: list[str],
        ns: dict[str, Any],
        base_names: dict[str, dict[str, Any]],
        plan: parts.Plan | None,
    ) -> dict[str, parts.Saved]:
        """Save the big dicts among ``candidates`` in parts (:mod:`.parts`);
        those that cannot be (a value is not immutable) are left out of the
        result, to be pickled whole. Only the automatic saves do this (they
        have a ``plan``): a checkpoint saved by request pickles every name
        whole."""
        out: dict[str, parts.Saved] = {}
        if plan is None:
            return out
        last: dict[str, dict[str, Any]] | None = None
        for var in candidates:
            obj = ns[var]
            if not parts.eligible(obj) or var in plan.whole:
                continue
            planned = plan.dicts.get(var)
            previous = base_names.get(var)
            if previous is None and planned is not None and planned.base is not None:
                if last is None:  # a full save: the parts of the last one
                    try:
                        last = self.store.read_manifest(name).get("names", {})
                    except CheckpointError:
                        last = {}
                previous = last.get(var)
            saved = parts.save(self.store, obj, planned, previous)
            if saved is not None:
                out[var] = saved
        return out

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
        # Names known to fail (skipped again unchanged) are never referred to.
        referable = {i: v for i, v in canonical.items() if v not in report.skipped}
        containers = {i: v for i, v in canonical.items() if type(ns[v]) in CONTAINERS}

        def one(var: str, allowed: dict[int, str]) -> None:
            obj = ns[var]
            if prefers_source(obj) and rebuildable(var, obj, ns):
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
                if rebuildable(var, obj, ns):
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
        return restore_checkpoint(self.shell, self.store, name, clear)

    def list(self) -> list[dict[str, Any]]:
        out = []
        for name in self.store.names():
            try:
                out.append(self.info(name))
            except CheckpointError as exc:
                out.append({"name": name, "error": str(exc)})
        return out

    def info(self, name: str) -> dict[str, Any]:
        check_name(name)
        manifest = self.store.read_manifest(name)
        entries = manifest["names"]
        return {
            "name": name,
            "created": manifest["created"],
            "execution_count": manifest.get("execution_count"),
            "cell_number": cell_number_of(manifest),
            "saved_by": saved_by_of(manifest),
            "python": ".".join(map(str, manifest.get("python", []))),
            "size": sum(e.get("size", 0) for e in entries.values()),
            "names": {
                k: {kk: vv for kk, vv in v.items() if kk != "source"} for k, v in entries.items()
            },
        }

    def delete(self, name: str) -> None:
        check_name(name)
        self.store.delete(name)


#: What a report leaves out of the entry of a dict saved in parts.
_PARTS_DETAIL = ("source", "reason", "chunks", "buffer_sizes", "chunk_size")


class _Phases:
    """Seconds and minor page faults per phase of a save."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.faults: dict[str, int] = {}
        self._time = time.perf_counter()
        self._faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def mark(self, phase: str) -> None:
        now, faults = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        self.phases[phase] = round(now - self._time, 6)
        self.faults[phase] = faults - self._faults
        self._time, self._faults = now, faults


def _type_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


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
