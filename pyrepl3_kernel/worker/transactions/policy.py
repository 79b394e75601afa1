"""Transaction policies, their settings, and the per-cell override.

A kernel's policy comes from ``$PYREPL3_TRANSACTION_POLICY`` or
``%transaction_policy``; a cell's own from a first line
``%%transaction [policy]``.
"""

from __future__ import annotations

import re

POLICIES = ("off", "bindings", "full")
ENV_POLICY = "PYREPL3_TRANSACTION_POLICY"
ENV_MAX_BYTES = "PYREPL3_TRANSACTION_MAX_BYTES"
ENV_MAX_OBJECTS = "PYREPL3_TRANSACTION_MAX_OBJECTS"
#: Snapshot copies of one cell, at most (objects beyond are not covered).
DEFAULT_MAX_BYTES = 1 << 30
#: Containers and instances one cell's snapshot records, at most.
DEFAULT_MAX_OBJECTS = 100_000


#: A cell whose first line is ``%%transaction [policy]``.
_CELL_OVERRIDE = re.compile(
    r"(?:[ \t]*\r?\n)*[ \t]*%%transaction(?:[ \t]+(off|bindings|full))?[ \t]*(?:\r?\n|\Z)"
)
_OVERRIDE_LINE = re.compile(r"%%transaction(?:[ \t]+(?:off|bindings|full))?[ \t]*\r?\n?\Z")


def cell_policy(code: str) -> str | None:
    """The policy a leading ``%%transaction`` line asks for (``full`` if it
    names none), or ``None``."""
    if not code.startswith("%%transaction") and not (code[:1].isspace() and "%%" in code):
        return None
    m = _CELL_OVERRIDE.match(code)
    if m is None:
        return None
    return m.group(1) or "full"


def strip_transaction_line(lines: list[str]) -> list[str]:
    """IPython line transform: blank out a first line ``%%transaction
    [policy]`` (the worker has applied it), so the body runs as the cell itself: with
    its own execution count, history entry (the raw cell keeps the line) and
    result display, and cell magics after it still work. It runs after the
    cleanup transforms and before cell magics are recognised;
    ``check_complete`` sees the line as a cell magic."""
    if lines and lines[0].startswith("%%transaction") and _OVERRIDE_LINE.match(lines[0]):
        if len(lines) > 1 and lines[1].startswith("%%"):
            return lines[1:]  # another cell magic follows: it must come first
        return ["\n", *lines[1:]]  # a blank line keeps tracebacks' line numbers right
    return lines
