"""The launch context of a worker: what a process started by a launch (its
environment, working directory) has, made true of a worker that started
earlier (a warm one), as ipykernel's kernel app would have it."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger("pyrepl3.worker")


def put_cwd_on_path() -> None:
    """sys.path as ipykernel (IPython's ``init_path``) has it: ``''`` (the
    working directory, whatever it is at import time) before the first
    site-packages, after the standard library; not the directory the worker
    happened to start in, which ``python -m`` put first."""
    start_dir = os.getcwd()
    if sys.path and sys.path[0] in (start_dir, ""):
        del sys.path[0]
    if "" in sys.path:
        return
    index = 0
    for i, path in enumerate(sys.path):
        if os.path.basename(path) in ("site-packages", "dist-packages"):
            index = i
            break
    sys.path.insert(index, "")


def set_default_mpl_backend() -> None:
    """Plots show inline, as with ipykernel, unless MPLBACKEND says otherwise."""
    if "MPLBACKEND" not in os.environ:
        import importlib.util

        if importlib.util.find_spec("matplotlib_inline") is not None:
            os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"


def take_environment(shell: Any, env: dict[str, str], baseline: dict[str, str]) -> dict[str, str]:
    """Make os.environ what a worker started with ``env`` would have:
    ``env``, plus what the worker adds at start-up (derived again from
    ``env``), plus what happened since (warm-up code's imports) where
    ``env`` does not say otherwise. ``baseline``: the environment as the
    worker last set it up; returns the new one."""
    added = {k: v for k, v in os.environ.items() if k not in baseline}
    backend = os.environ.get("MPLBACKEND")
    os.environ.clear()
    os.environ.update(env)
    set_default_mpl_backend()
    shell.init_environment()
    for key, value in added.items():
        os.environ.setdefault(key, value)
    baseline = dict(os.environ)
    time.tzset()  # TZ is read when the C library first needs it: read it again
    mpl = sys.modules.get("matplotlib")
    wanted = os.environ.get("MPLBACKEND")
    if mpl is not None and wanted and wanted != backend:
        # The warm-up imported matplotlib under the old value; a cold
        # worker would have imported it under the new one.
        try:
            mpl.use(wanted)
            inline = sys.modules.get("matplotlib_inline.backend_inline")
            if inline is not None:  # its hooks are set: set them for the new backend
                inline.configure_inline_support(shell, wanted)
        except Exception as exc:
            log.warning("could not switch matplotlib to %s: %s", wanted, exc)
    return baseline


def move_to(shell: Any, cwd: str) -> None:
    """chdir, and move what a process started in ``cwd`` would have
    there: sys.path[0] (``python -m`` puts the start-up directory first)
    and IPython's record of the starting directory (``_dh``)."""
    before = os.getcwd()
    os.chdir(cwd)
    after = os.getcwd()
    if before == after:
        return
    if sys.path and sys.path[0] == before:
        sys.path[0] = after
    if getattr(shell, "starting_dir", None) == before:
        shell.starting_dir = after
    history = getattr(shell, "history_manager", None)
    dir_hist = getattr(history, "dir_hist", None)
    if dir_hist is not None and [os.fspath(p) for p in dir_hist] == [before]:
        dir_hist[:] = [type(dir_hist[0])(after)]
