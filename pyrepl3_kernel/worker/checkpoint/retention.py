"""Retention of a kernel's state history: how many states are kept and how
many bytes of blobs they may hold (:class:`Retention`, from the store's
``retention.settings``, else the environment), and the note of the bytes of
the store's blobs that the saving children keep (:func:`blob_total`), so
that retention after every cell need not stat every blob and chunk. What
is dropped and collected is :meth:`.history.History.enforce`'s."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ...units import parse_size, size_from_env

log = logging.getLogger("pyrepl3.worker")

#: Written by the session that owns the store (not a ``.json``: not a checkpoint) (its ``keep_states`` and
#: ``states_budget``); wins over the environment.
SETTINGS_NAME = "retention.settings"
ENV_KEEP = "PYREPL3_STATES_KEEP"
ENV_BUDGET = "PYREPL3_STATES_BUDGET"
DEFAULT_KEEP = 100
DEFAULT_BUDGET = 8 << 30
#: The bytes of the store's blobs as of the last save (a hidden file beside
#: ``auto.json``, ``"<bytes> <saves since counted>"``), kept by the saving children
#: so that retention need not stat every blob and chunk after every cell; the
#: files are counted again every ``RECOUNT_EVERY`` saves, and whenever
#: retention has to read the states. A store without it (older versions) is
#: counted. Blobs written or removed by others than the saves (a checkpoint
#: saved into the store by hand) count at the next recount.
BLOB_BYTES_NAME = ".blob-bytes"
RECOUNT_EVERY = 16


@dataclass(frozen=True)
class Retention:
    """How many states are kept, and how many bytes of blobs they may hold
    (the kernel's disk budget)."""

    keep: int = DEFAULT_KEEP
    budget: int = DEFAULT_BUDGET

    @classmethod
    def of(cls, store_root: str | None, env: Mapping[str, str] | None = None) -> Retention:
        """From the store's ``retention.settings`` (JSON), else ``PYREPL3_STATES_KEEP``
        and ``PYREPL3_STATES_BUDGET`` (e.g. ``20G``), else the defaults."""
        env = os.environ if env is None else env
        keep = _count_from_env(env, ENV_KEEP, DEFAULT_KEEP)
        budget = size_from_env(env, ENV_BUDGET, DEFAULT_BUDGET, log)
        settings = _read_settings(store_root)
        if isinstance(settings.get("keep_states"), int) and settings["keep_states"] >= 1:
            keep = settings["keep_states"]
        raw = settings.get("states_budget")
        if isinstance(raw, int) and raw > 0:
            budget = raw
        elif isinstance(raw, str):
            try:
                budget = parse_size(raw)
            except ValueError:
                log.warning("ignoring states_budget %r in %s", raw, SETTINGS_NAME)
        return cls(keep=max(1, keep), budget=max(1, budget))

    def as_dict(self) -> dict[str, int]:
        return {"keep": self.keep, "budget": self.budget}


def _count_from_env(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
        if value >= 1:
            return value
    except ValueError:
        pass
    log.warning("ignoring %s=%r: not a whole number >= 1; %d is used", name, raw, default)
    return default


def _read_settings(store_root: str | None) -> dict[str, Any]:
    if not store_root or "://" in store_root:
        return {}
    try:
        with open(os.path.join(store_root, SETTINGS_NAME), "rb") as f:
            settings = json.load(f)
    except (OSError, ValueError):
        return {}
    return settings if isinstance(settings, dict) else {}


def blob_total(root: str, added: int, count: Callable[[], int]) -> tuple[int, int]:
    """The store's blob bytes after a save that wrote ``added``, noted
    for the next save (counted if not known or due). One file, read and
    overwritten in place: ``"<bytes> <saves since counted>"``, padded."""
    path = os.path.join(root, BLOB_BYTES_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        log.debug("cannot note the store's blob bytes: %s", exc)
        return count(), 0
    try:
        try:
            known, saves = (int(v) for v in os.pread(fd, 64, 0).split())
        except ValueError:  # new, or not ours
            known = saves = -1
        if known >= 0 and 0 <= saves < RECOUNT_EVERY - 1:
            total, saves = known + max(0, added), saves + 1
        else:
            total, saves = count(), 0
        _note(fd, total, saves)
    except OSError as exc:  # only an estimate: the next save counts again
        log.debug("cannot note the store's blob bytes: %s", exc)
        total, saves = count(), 0
    finally:
        os.close(fd)
    return total, saves


def note_blob_bytes(root: str, total: int, saves: int) -> None:
    path = os.path.join(root, BLOB_BYTES_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            _note(fd, total, saves)
        finally:
            os.close(fd)
    except OSError as exc:
        log.debug("cannot note the store's blob bytes: %s", exc)


def _note(fd: int, total: int, saves: int) -> None:
    """Overwrite the blob-bytes record (always the same length: no truncation)."""
    record = f"{total} {saves}".ljust(62).encode() + b"\n"
    os.pwrite(fd, record, 0)
