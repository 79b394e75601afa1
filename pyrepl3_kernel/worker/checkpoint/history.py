"""A kernel's state history: the state after every successful cell, kept.

The automatic checkpoint's store (one directory per kernel) holds, beside
``auto.json`` (the newest state, what crash recovery loads) and ``objects/``
(content-addressed blobs shared by everything in the store), a directory
``states/`` with one manifest per kept state, ``<seq>.json``: ``seq`` orders
the states (the save's system-wide monotonic clock). A manifest is an
ordinary checkpoint manifest plus what the state changed against the one
before it (``added``, ``changed``, ``removed`` names, ``bytes_added``) and,
for a state made by a checkout, which state it went back to (``at``).
A state saved for several cells at once (they ran back to back, faster than
their states could be saved: :mod:`.autosave` coalesces them rather than
make a cell wait) says which in ``covers``, ``[first, last]``: the cells
``In[first]`` to ``In[last - 1]`` have no state of their own, and a checkout
of one of them is refused, naming the nearest kept states.

An unchanged object keeps its blob, so a state costs its manifest and the
objects that changed. Retention (:mod:`.retention`) keeps the newest
``keep`` states and as many as fit in ``budget`` bytes of blobs; blobs no
kept manifest names are then removed. Writers (the autosave children) hold
the store's exclusive lock for the whole save, retention and garbage
collection, so a collection never sees a save's blobs before its manifest;
they note the bytes of the store's blobs in ``.blob-bytes`` (an estimate,
counted again now and then) so that retention does not stat every blob.
Everything is plain files: the directory can be copied or mirrored as is.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from .chunks import chunk_sizes
from .errors import CheckpointError
from .format import FORMAT, FORMAT_VERSION, READABLE_VERSIONS, objects_of
from .report import cell_number_of
from .retention import (  # noqa: F401 (Retention and its settings were defined here)
    BLOB_BYTES_NAME,
    DEFAULT_BUDGET,
    DEFAULT_KEEP,
    ENV_BUDGET,
    ENV_KEEP,
    RECOUNT_EVERY,
    SETTINGS_NAME,
    Retention,
    blob_total,
    note_blob_bytes,
)
from .store import Store

log = logging.getLogger("pyrepl3.worker")

STATES_DIR = "states"


def summary_of(seq: int, manifest: dict[str, Any]) -> dict[str, Any]:
    """What ``%states`` and the ``states`` action say about one state."""
    entries = manifest.get("names", {})
    blobs = {e["blob"]: e.get("size", 0) for e in entries.values() if e.get("blob")}
    return {
        "seq": seq,
        "cell_number": cell_number_of(manifest),
        "created": manifest.get("created"),
        "added": manifest.get("added", []),
        "changed": manifest.get("changed", []),
        "removed": manifest.get("removed", []),
        "skipped": sorted(v for v, e in entries.items() if e.get("status") == "skipped"),
        "bytes_added": manifest.get("bytes_added", 0),
        "size": sum(blobs.values()),
        "names": len(entries),
        "at": manifest.get("at"),
        "covers": covers_of(manifest),
    }


def covers_of(manifest: dict[str, Any]) -> list[int] | None:
    """``[first, last]``: the cells whose changes this state is the first to
    hold (more than one: their states were coalesced into this one), or
    None if not recorded."""
    covers = manifest.get("covers")
    if (
        isinstance(covers, list)
        and len(covers) == 2
        and all(isinstance(c, int) and not isinstance(c, bool) for c in covers)
        and covers[0] <= covers[1]
    ):
        return [covers[0], covers[1]]
    return None


def coalesced_cells(summary: dict[str, Any]) -> tuple[int, int] | None:
    """The cells ``(first, last)`` without a state of their own because
    their states were coalesced into this one (``last`` is the cell before
    the state's own); None if there are none."""
    covers = summary.get("covers")
    cell = summary.get("cell_number")
    if not covers or not isinstance(cell, int) or covers[0] >= cell:
        return None
    return covers[0], cell - 1


def changes(previous: dict[str, Any] | None, manifest: dict[str, Any]) -> dict[str, list[str]]:
    """Names added, changed (another blob, status or alias) and removed
    from ``previous``'s state to ``manifest``'s."""
    now = manifest.get("names", {})
    before = (previous or {}).get("names", {})

    def key(entry: dict[str, Any]) -> tuple[Any, ...]:
        return (entry.get("status"), entry.get("blob"), entry.get("of"), entry.get("source"))

    return {
        "added": [v for v in now if v not in before],
        "changed": [v for v in now if v in before and key(now[v]) != key(before[v])],
        "removed": [v for v in before if v not in now],
    }


def coalesced_error(
    cell: int, span: tuple[int, int], state: dict[str, Any], cells: list[int]
) -> str:
    """Why the state after ``cell`` (within ``span``, coalesced into
    ``state``) cannot be checked out, and which states can."""
    first, _ = span
    after = state["cell_number"]
    before = [c for c in cells if c < first]
    cells_run = f"In [{first}]" if first == span[1] else f"In [{first}]..In [{span[1]}]"
    nearest = (
        f"the nearest kept states are after cell {max(before)} and after cell {after}"
        if before
        else f"the nearest kept state is after cell {after}"
    )
    return (
        f"the state after cell {cell} is not kept: {cells_run} ran back to back, faster than "
        f"their states could be saved, and their changes were coalesced into the state after "
        f"cell {after}; {nearest} (%states lists them); the namespace was not changed"
    )


class History:
    """The ``states/`` directory of a local store."""

    def __init__(self, store: Store, locked: bool = False) -> None:
        """``locked``: the caller holds the store's exclusive lock (an
        autosave child) for as long as it uses this object: no one else
        adds or drops states meanwhile, so the directory is listed once."""
        if store._fs is not None:
            raise CheckpointError(
                f"the state history needs a local directory; {store.root!r} is not one"
            )
        self.store = store
        self.dir = os.path.join(store._path, STATES_DIR)
        self._locked = locked
        self._listing: list[int] | None = None

    # -- reading --------------------------------------------------------------------------

    def seqs(self) -> list[int]:
        """The kept states' numbers, oldest first."""
        if self._listing is not None:
            return list(self._listing)
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            names = []
        out = []
        for name in names:
            stem, dot, ext = name.partition(".")
            if ext == "json" and dot and stem.isdigit():
                out.append(int(stem))
        out.sort()
        if self._locked:
            self._listing = out
            return list(out)
        return out

    def newest(self) -> int | None:
        """The newest kept state's number (None: none is kept), read from
        the directory's listing alone."""
        seqs = self.seqs()
        return seqs[-1] if seqs else None

    def _remove_states(self, seqs: list[int]) -> None:
        """Delete the records of states ``seqs`` (their blobs stay)."""
        for seq in seqs:
            try:
                os.remove(self.path(seq))
            except FileNotFoundError:
                pass
            if self._listing is not None and seq in self._listing:
                self._listing.remove(seq)

    def path(self, seq: int) -> str:
        return os.path.join(self.dir, f"{seq:020d}.json")

    def read(self, seq: int) -> dict[str, Any]:
        try:
            with open(self.path(seq), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise CheckpointError(f"state {seq} is no longer kept") from None
        try:
            manifest = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"the saved state {seq} is corrupt (manifest: {exc})") from None
        if (
            not isinstance(manifest, dict)
            or manifest.get("format") != FORMAT
            or not isinstance(manifest.get("names"), dict)
        ):
            raise CheckpointError(f"the saved state {seq} is corrupt (not a state manifest)")
        if manifest.get("version") not in READABLE_VERSIONS:
            raise CheckpointError(
                f"the saved state {seq} has format version {manifest.get('version')}; "
                f"this kernel reads version {FORMAT_VERSION}"
            )
        return manifest

    def states(self) -> list[dict[str, Any]]:
        """Every kept state's summary, oldest first (an unreadable one says
        so in ``error``)."""
        out = []
        for seq in self.seqs():
            try:
                out.append(summary_of(seq, self.read(seq)))
            except CheckpointError as exc:
                out.append({"seq": seq, "error": str(exc)})
        return out

    def find(self, cell: int) -> tuple[int, dict[str, Any]]:
        """The state right after cell ``In[cell]``: among the states of the
        newest cell at or before ``cell`` (a cell that failed or changed
        nothing saved none), the first saved (later ones of the same cell
        were made by requests between cells)."""
        states = [s for s in self.states() if "error" not in s]
        if not states:
            raise CheckpointError(
                f"the state after cell {cell} is not kept: no state is kept yet "
                "(one is saved after each successful cell)"
            )
        cells = [s["cell_number"] for s in states if isinstance(s["cell_number"], int)]
        oldest = min(cells) if cells else None
        if oldest is None or cell < oldest:
            kept = f"the oldest kept is the state after cell {oldest}" if oldest else "none"
            raise CheckpointError(f"the state after cell {cell} is not kept ({kept})")
        if cell not in cells:
            for s in states:
                span = coalesced_cells(s)
                if span is not None and span[0] <= cell <= span[1]:
                    raise CheckpointError(coalesced_error(cell, span, s, cells))
        best = max(c for c in cells if c <= cell)
        seq = min(s["seq"] for s in states if s["cell_number"] == best)
        return seq, self.read(seq)

    def latest(self) -> tuple[int, dict[str, Any]] | None:
        seqs = self.seqs()
        return (seqs[-1], self.read(seqs[-1])) if seqs else None

    # -- writing (autosave children, under the store's exclusive lock) ---------------

    def record(
        self,
        seq: int,
        manifest: dict[str, Any],
        bytes_added: int,
        at: int | None = None,
        known: tuple[int, dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Write ``manifest`` as state ``seq``, with what it changed against
        the newest earlier state; returns the manifest written. ``known``:
        ``(seq, manifest)`` of a state the caller has read already (the
        base of an incremental save): not read again if it is that state."""
        previous = None
        for older in reversed(self.seqs()):
            if older < seq:
                if known is not None and known[0] == older:
                    previous = known[1]
                    break
                try:
                    previous = self.read(older)
                except CheckpointError:
                    continue
                break
        state = {k: v for k, v in manifest.items() if k != "history"}
        state.update(changes(previous, manifest))
        state["bytes_added"] = bytes_added
        state["seq"] = seq
        if at is not None:
            state["at"] = at
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.store._write(self.path(seq), [json.dumps(state, separators=(",", ":")).encode()])
        if self._listing is not None and seq not in self._listing:
            self._listing.append(seq)
            self._listing.sort()
        return state

    def enforce(self, retention: Retention, added: int | None = None) -> list[int]:
        """Drop the oldest states beyond ``retention.keep`` and those whose
        blobs do not fit in ``retention.budget`` (never the newest); then
        remove the blobs no manifest of the store names. Returns the dropped
        states. While the states are within the count and all the store's
        blobs within the budget, nothing is read (a save's child runs this
        after every cell: it must not grow with the history). ``added``: the
        bytes the save just wrote (its child holds the store's lock): the
        total is the one kept in :data:`BLOB_BYTES_NAME` plus these, and the
        blobs are counted only every ``RECOUNT_EVERY`` saves."""
        seqs = self.seqs()
        within = len(seqs) <= retention.keep
        if added is None:
            if within and self.blob_bytes() <= retention.budget:
                return []
            return self._enforce(seqs, retention)
        total, saves = blob_total(self.store._path, added, self.blob_bytes)
        if total <= retention.budget:
            if within:
                return []
            # Only the count is exceeded (the states fit in the budget).
            dropped = self._drop_oldest(seqs, retention.keep, total, saves)
            if dropped is not None:
                return dropped
        dropped = self._enforce(seqs, retention)
        note_blob_bytes(self.store._path, self.blob_bytes(), 0)  # blobs may have gone: counted
        return dropped

    def _drop_oldest(self, seqs: list[int], keep: int, total: int, saves: int) -> list[int] | None:
        """Drop the oldest states beyond ``keep``, and remove the blobs they
        named that no other manifest of the store names, without parsing
        every kept manifest (once the history is full, every save drops one:
        parsing 100 manifests cost the saving child 11 ms): a blob is named
        by a manifest if its digest is in the manifest's text. None if a
        manifest is unreadable (the full pass then says so and waits)."""
        dropped = seqs[: len(seqs) - keep]
        candidates: set[str] = set()
        try:
            for seq in dropped:
                candidates |= objects_of(self.read(seq))
        except CheckpointError:
            return None
        others = [self.path(seq) for seq in reversed(seqs[len(dropped) :])]
        others += [os.path.join(self.store._path, f"{n}.json") for n in self.store.names()]
        for path in others:
            if not candidates:
                break
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except OSError:
                return None
            if not (raw.startswith(b"{") and raw.rstrip().endswith(b"}")):
                return None  # cut short or not a manifest: the full pass
            candidates = {c for c in candidates if c.encode() not in raw}
        self._remove_states(dropped)
        objects = os.path.join(self.store._path, "objects")
        for blob in candidates:
            path = os.path.join(objects, blob)
            try:
                size = os.stat(path).st_size
                os.remove(path)
            except FileNotFoundError:
                continue
            total -= size
        note_blob_bytes(self.store._path, max(0, total), saves)
        return dropped

    def _enforce(self, seqs: list[int], retention: Retention) -> list[int]:
        manifests: dict[int, dict[str, Any]] = {}
        for seq in seqs:
            try:
                manifests[seq] = self.read(seq)
            except CheckpointError:
                # Never drop blobs while a manifest is unreadable: it may
                # name them. Retention waits until it is fixed or removed.
                log.warning("state %s is unreadable: retention and garbage collection wait", seq)
                return []
        dropped = seqs[: max(0, len(seqs) - retention.keep)]
        kept = seqs[len(dropped) :]
        sizes: dict[str, int] = {}
        total = 0
        fitting: list[int] = []
        for seq in reversed(kept):  # newest first: the newest is always kept
            new: dict[str, int] = {}
            for e in manifests[seq]["names"].values():
                if not e.get("blob"):
                    continue
                pieces = chunk_sizes(e)
                inline = int(e.get("size", 0)) - sum(pieces.values())
                for digest, size in [(e["blob"], max(0, inline)), *pieces.items()]:
                    if digest not in sizes:
                        new[digest] = size
            if fitting and total + sum(new.values()) > retention.budget:
                break
            sizes.update(new)
            total += sum(new.values())
            fitting.append(seq)
        dropped += [s for s in kept if s not in fitting]
        self._remove_states(dropped)
        if dropped:  # only a dropped state frees blobs
            self.collect_garbage(manifests)
        return dropped

    def blob_bytes(self) -> int:
        """Bytes of the store's blobs (and chunks) on disk."""
        total = 0
        try:
            with os.scandir(os.path.join(self.store._path, "objects")) as entries:
                for entry in entries:
                    if not entry.name.startswith("."):
                        try:
                            total += entry.stat().st_size
                        except OSError:
                            pass
        except FileNotFoundError:
            return 0
        return total

    def collect_garbage(self, known: dict[int, dict[str, Any]] | None = None) -> int:
        """Remove blobs that neither a kept state nor a checkpoint of the
        store's root names (the caller holds the store's exclusive lock).
        ``known``: manifests of states already read."""
        used: set[str] = set()
        known = known or {}
        try:
            manifests = [known[seq] if seq in known else self.read(seq) for seq in self.seqs()]
            for name in self.store.names():
                manifests.append(self.store.read_manifest(name))
        except CheckpointError as exc:
            log.warning("no garbage collection while a manifest is unreadable: %s", exc)
            return 0
        for manifest in manifests:
            used.update(objects_of(manifest))
        objects = os.path.join(self.store._path, "objects")
        removed = 0
        for blob in os.listdir(objects):
            if blob not in used and not blob.startswith("."):
                os.remove(os.path.join(objects, blob))
                removed += 1
        return removed
