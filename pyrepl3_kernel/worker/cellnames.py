"""The file names cells are compiled under, as the JupyterLab debugger
computes them.

A frontend sets a breakpoint in a cell by a file name it computes itself from
what ``debugInfo`` says: ``tmpFilePrefix + murmur2(code, hashSeed) +
tmpFileSuffix``. A cell's code must carry that name (its ``co_filename``) for
the breakpoint to hit, so the worker compiles every cell under it, as
ipykernel does (``ipykernel/compiler.py``). IPython still maps the name to the
cell's number (tracebacks say ``Cell In[3], line 2``) and keeps the source in
``linecache`` under it (``inspect.getsource`` of a cell's function).
"""

from __future__ import annotations

import os
import struct
import tempfile
from typing import Any

from IPython.core.compilerop import CachingCompiler

#: The seed JupyterLab hashes cells with (``debugInfo.hashSeed``), ipykernel's.
HASH_SEED = 0xC70F6907
#: ``debugInfo.hashMethod``.
HASH_METHOD = "Murmur2"
#: ``debugInfo.tmpFileSuffix``.
SUFFIX = ".py"

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(text: str, seed: int = HASH_SEED) -> int:
    """MurmurHash2 (x86, 32 bit) of ``text``'s UTF-8 bytes: the hash
    JupyterLab's debugger and ipykernel's ``murmur2_x86`` compute."""
    data = text.encode("utf-8")
    length = len(data)
    h = (seed ^ length) & _MASK
    rounded_end = length & ~3
    for (k,) in struct.iter_unpack("<I", data[:rounded_end]):
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = length & 3
    if tail:
        k = 0
        if tail == 3:
            k = data[rounded_end + 2] << 16
        if tail >= 2:
            k |= data[rounded_end + 1] << 8
        k |= data[rounded_end]
        h ^= k
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def cell_directory(pid: int | None = None) -> str:
    """The directory cell files live in (``debugInfo.tmpFilePrefix`` without
    its trailing separator): one per worker process."""
    return os.path.join(tempfile.gettempdir(), f"pyrepl3_{pid or os.getpid()}")


def reap_stale_directories() -> list[str]:
    """Remove the cell directories of worker processes that are gone (a
    worker that crashed, or was killed, leaves its directory behind); only
    this user's. Returns the directories removed."""
    import re
    import shutil

    base = tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        match = re.fullmatch(r"pyrepl3_(\d+)", name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        path = os.path.join(base, name)
        try:
            if os.lstat(path).st_uid != os.getuid():
                continue
            os.kill(int(match.group(1)), 0)
            continue  # its worker (or a process with its pid) still runs
        except ProcessLookupError:
            pass
        except OSError:
            continue  # not ours to judge (another user's pid, or it is gone)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def prefix() -> str:
    """``debugInfo.tmpFilePrefix``."""
    return cell_directory() + os.sep


def cell_file_name(code: str) -> str:
    """The file name of a cell whose code is ``code``; as ipykernel,
    ``IPYKERNEL_CELL_NAME`` in the environment names it instead (VS Code's
    Jupyter extension sets it before a cell it debugs)."""
    named = os.environ.get("IPYKERNEL_CELL_NAME")
    if named is not None:
        return named
    return f"{prefix()}{murmur2(code)}{SUFFIX}"


class CellCompiler(CachingCompiler):
    """IPython's compiler, naming each cell by :func:`cell_file_name` of the
    code as the frontend sent it."""

    def get_code_name(self, raw_code: str, transformed_code: str, number: int) -> str:
        return cell_file_name(raw_code)


def install(shell: Any) -> None:
    """Compile ``shell``'s cells under their debugger file names (before its
    first cell)."""
    compiler = CellCompiler()
    compiler.flags = shell.compile.flags  # e.g. from __future__ imports already seen
    shell.compiler_class = CellCompiler
    shell.compile = compiler
