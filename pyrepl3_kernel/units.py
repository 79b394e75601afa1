"""Sizes as people write them (stdlib only; any layer may import this)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import TypeVar

_D = TypeVar("_D", int, None)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.I)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """``"2G"`` -> 2147483648; plain numbers are bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M or 2G)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: float) -> str:
    """``2469606195`` -> ``"2.3 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


#: (logger, variable, value) already warned about: a bad value read on every
#: cell is reported once.
_warned: set[tuple[str, str, str]] = set()


def size_from_env(
    env: Mapping[str, str], name: str, default: _D, log: logging.Logger | None = None
) -> int | _D:
    """The size in ``env[name]`` (``512M``, ``2G``, plain bytes), or
    ``default`` when the variable is unset or empty. A value that is not a
    size gives ``default`` too, with one warning on ``log`` (once per value)
    naming the variable, the value and what is used instead."""
    raw = env.get(name)
    if not raw:
        return default
    try:
        return parse_size(raw)
    except ValueError:
        log = log or logging.getLogger("pyrepl3")
        if (log.name, name, raw) not in _warned:
            _warned.add((log.name, name, raw))
            instead = "no limit is set" if default is None else f"the default, {default}, is used"
            log.warning("ignoring %s=%r: not a size (use e.g. 512M or 2G); %s", name, raw, instead)
        return default
