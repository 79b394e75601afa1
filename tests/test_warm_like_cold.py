"""A warm kernel is a cold one: what a pooled worker set up before its lease
(its environment, IPython's shell, matplotlib) comes out as in a kernel
started cold for the same launch.

Each test runs on both kernelspecs of conftest (``pyrepl3``, leased from the
daemon's warm pool, and ``pyrepl3-cold``, a standalone kernel process), or
compares the two. Pooled kernels are taken once the pool has a warm worker
waiting, so the lease really is a warm one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client import KernelManager
from jupyter_helpers import COLD_KERNEL_NAME, KERNEL_NAME, KERNEL_NAMES
from traitlets.config import Config

from pyrepl3_kernel.daemon.client import DaemonClient, DaemonPaths

pytestmark = pytest.mark.usefixtures("pyrepl3_kernelspec")

PLOT = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])"

#: Prints, as one JSON line, what a kernel's start-up decides: its
#: environment, sys.path, working directory, IPython's shell settings, time
#: zone, encodings and matplotlib backend.
DUMP = r"""
import json as _json, locale as _locale, os as _os, sys as _sys, time as _time
import matplotlib as _mpl
_shell = get_ipython()

def _plain(value):
    text = repr(value)
    return None if " object at " in text else text

print("DUMP " + _json.dumps({
    "environ": dict(_os.environ),
    "sys.path": _sys.path,
    "cwd": _os.getcwd(),
    "_dh": [str(p) for p in _dh],
    "starting_dir": _shell.starting_dir,
    "shell traits": {
        name: _plain(getattr(_shell, name))
        for name in sorted(_shell.trait_names())
        if name not in ("config", "parent")
    },
    "config": repr(_shell.config),
    "profile_dir": _shell.profile_dir.location,
    "history file": str(_shell.history_manager.hist_file),
    "tzname": list(_time.tzname),
    "encodings": [_sys.getfilesystemencoding(), _sys.flags.utf8_mode,
                  _locale.getpreferredencoding(False), _sys.stdout.encoding],
    "matplotlib backend": _mpl.get_backend(),
    "__session__": globals().get("__session__"),
}))
"""


def runtime_dir() -> Path:
    return Path(os.environ["JUPYTER_RUNTIME_DIR"])


def pool_config(warmup_code: str) -> Config:
    config = Config()
    config.PoolProvisioner.warmup_code = warmup_code
    return config


def wait_for_warm_worker(
    warmup_code: str = "", env: dict[str, str] | None = None, timeout: float = 90
) -> None:
    """Until the pooled kernelspec's pool (for ``warmup_code``) has a warm
    worker waiting; a first lease makes the pool if there is none yet."""
    client = DaemonClient(DaemonPaths.default(runtime_dir()), timeout=30)

    def idle() -> int | None:
        try:
            pools = client.call("status")["pools"]
        except ConnectionError:
            return None
        for pool in pools:
            if pool["kernel_name"] == KERNEL_NAME and pool["warmup_code"] == warmup_code:
                return int(pool["idle"])
        return None

    if idle() is None:
        km = KernelManager(kernel_name=KERNEL_NAME, config=pool_config(warmup_code))
        km.start_kernel(env=env if env is not None else dict(os.environ))
        km.shutdown_kernel(now=True)
    deadline = time.monotonic() + timeout
    while not idle():
        if time.monotonic() > deadline:
            raise AssertionError(f"no warm worker for warm-up {warmup_code!r} within {timeout} s")
        time.sleep(0.1)


@contextmanager
def running_kernel(
    kernel_name: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    warmup_code: str = "",
) -> Iterator[Any]:
    """A started kernel of ``kernel_name`` (pooled: a warm lease) and a
    blocking client; both stopped on exit."""
    if kernel_name == KERNEL_NAME:
        wait_for_warm_worker(warmup_code, env)
    km = KernelManager(kernel_name=kernel_name, config=pool_config(warmup_code))
    km.start_kernel(cwd=str(cwd), env=env if env is not None else dict(os.environ))
    try:
        if kernel_name == KERNEL_NAME:
            assert km.provisioner.warm is True, "the pooled kernel was not a warm one"
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            yield kc
        finally:
            kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)


def execute(kc: Any, code: str, **kwargs: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run ``code``: its reply and its iopub messages (through idle)."""
    msg_id = kc.execute(code, **kwargs)
    reply = kc.get_shell_msg(timeout=60)
    while reply["parent_header"].get("msg_id") != msg_id:  # a late kernel_info_reply
        reply = kc.get_shell_msg(timeout=60)
    outputs = []
    while True:
        msg = kc.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return reply, outputs
        if msg["msg_type"] != "status":
            outputs.append(msg)


def stdout_of(outputs: list[dict[str, Any]]) -> str:
    return "".join(
        m["content"]["text"]
        for m in outputs
        if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
    )


def dump(kc: Any) -> dict[str, Any]:
    reply, outputs = execute(kc, DUMP)
    assert reply["content"]["status"] == "ok", reply["content"]
    (line,) = [ln for ln in stdout_of(outputs).splitlines() if ln.startswith("DUMP ")]
    return json.loads(line[len("DUMP ") :])  # type: ignore[no-any-return]


@pytest.mark.parametrize("kernel_name", KERNEL_NAMES)
def test_a_plot_shows_as_a_png(kernel_name: str, tmp_path: Path) -> None:
    with running_kernel(kernel_name, tmp_path) as kc:
        reply, outputs = execute(kc, PLOT)
        assert reply["content"]["status"] == "ok", reply["content"]
        pngs = [
            m
            for m in outputs
            if m["msg_type"] == "display_data" and "image/png" in m["content"]["data"]
        ]
        assert len(pngs) == 1, [
            (m["msg_type"], list(m["content"].get("data", {}))) for m in outputs
        ]
        backend = execute(kc, "import matplotlib; print(matplotlib.get_backend())")[1]
        assert stdout_of(backend).strip() == "module://matplotlib_inline.backend_inline"


@pytest.mark.parametrize("kernel_name", KERNEL_NAMES)
def test_a_notebook_run_by_nbclient_saves_the_figure(kernel_name: str, tmp_path: Path) -> None:
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(PLOT)]
    if kernel_name == KERNEL_NAME:
        wait_for_warm_worker()
    NotebookClient(
        nb, kernel_name=kernel_name, timeout=60, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    nbformat.write(nb, tmp_path / "plot.ipynb")
    saved = nbformat.read(tmp_path / "plot.ipynb", as_version=4)
    outputs = saved.cells[0].outputs
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 1, outputs
    assert images[0].data["image/png"]  # base64 of the PNG


def launch_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment a client could launch with: the test's, plus
    variables a warm worker did not start with."""
    startup = tmp_path / "startup.py"
    startup.write_text("STARTUP_RAN = True\n")
    env = dict(os.environ)
    env.update(
        {
            "KERNEL_FOO": "from the launch",
            "JPY_SESSION_NAME": str(tmp_path / "nb.ipynb"),
            "PYTHONSTARTUP": str(startup),  # a worker never has it (nor runs it)
            "PAGER": "less",  # the kernel's shell sets its own
            "TZ": "WRM-3",  # a time zone only this launch has
        }
    )
    env.update(extra)
    return env


def differences(warm: dict[str, Any], cold: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in sorted(set(warm) | set(cold)):
        a, b = warm.get(key), cold.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff = {
                k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            }
            if diff:
                out[key] = diff
        elif a != b:
            out[key] = (a, b)
    return out


WARMUP = (
    "import os, matplotlib.pyplot\n"
    "os.environ.setdefault('SET_BY_WARMUP', 'yes')\n"
    "os.environ.setdefault('KERNEL_FOO', 'from the warm-up')"
)


@pytest.mark.parametrize(
    ("warmup_code", "extra_env"),
    [
        pytest.param("", {}, id="no-warmup"),
        # the warm-up imported matplotlib before the launch said "agg"
        pytest.param(WARMUP, {"MPLBACKEND": "agg"}, id="warmup-imports-matplotlib"),
    ],
)
def test_a_warm_kernel_starts_as_a_cold_one(
    tmp_path: Path, warmup_code: str, extra_env: dict[str, str]
) -> None:
    """Same launch (cwd and environment) for both kernelspecs; the cold
    kernel runs the warm-up code first, silently, as the pool does: the two
    kernels then agree on everything their start-up decides."""
    work = tmp_path / "work dir"
    work.mkdir()
    env = launch_env(tmp_path, **extra_env)
    with running_kernel(KERNEL_NAME, work, env, warmup_code) as kc:
        warm = dump(kc)
    with running_kernel(COLD_KERNEL_NAME, work, env) as kc:
        if warmup_code:
            reply, _ = execute(kc, warmup_code, silent=True, store_history=False)
            assert reply["content"]["status"] == "ok", reply["content"]
        cold = dump(kc)
    assert differences(warm, cold) == {}
    # and what they agree on is what a kernel launched so should have
    environ = cold["environ"]
    assert environ["KERNEL_FOO"] == "from the launch"
    assert environ["JPY_PARENT_PID"] == str(os.getpid())
    assert "PYTHONSTARTUP" not in environ
    assert environ["PAGER"] == "cat"
    assert cold["tzname"][0] == "WRM"
    assert cold["cwd"] == str(work)
    assert cold["_dh"] == [str(work)]
    assert cold["profile_dir"].startswith(os.environ["IPYTHONDIR"])
    assert cold["__session__"] == str(tmp_path / "nb.ipynb")
    if warmup_code:
        assert environ["SET_BY_WARMUP"] == "yes"
        assert cold["matplotlib backend"] == "agg"
    else:
        assert cold["matplotlib backend"] == "module://matplotlib_inline.backend_inline"


def test_a_launch_with_another_ipython_dir_gets_a_worker_started_with_it(
    tmp_path: Path,
) -> None:
    """IPython fixes its profile directory (history, startup files) when the
    shell starts: a warm worker started for another one is not handed out."""
    other = tmp_path / "other-ipython"
    other.mkdir()
    env = {**os.environ, "IPYTHONDIR": str(other)}
    wait_for_warm_worker()  # one for the usual IPython directory
    km = KernelManager(kernel_name=KERNEL_NAME)
    km.start_kernel(cwd=str(tmp_path), env=env)
    try:
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            seen = dump(kc)
        finally:
            kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)
    assert seen["profile_dir"] == str(other / "profile_default")
    assert seen["history file"] == str(other / "profile_default" / "history.sqlite")
