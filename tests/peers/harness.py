"""Run another project's own tests against a kernel bound to the name ``python3``.

A *suite* is a part of a peer project's test suite (ipykernel's kernel tests,
jupyter_server's kernel service tests, papermill's execution tests), taken from
the sdist of the version installed here. A *kernel* is what the name
``python3`` means during the run: ipykernel, or PyREPL3's kernelspec (pooled or
``--no-pool``), installed under that name into a temporary prefix that is the
only ``JUPYTER_PATH`` entry. Data, config, runtime and IPython directories are
temporary too: a run never reads or writes the user's Jupyter directories.

Every process a run causes carries ``PYREPL3_PEERS_JOB`` in its environment
(kernels and daemons inherit it), so :func:`Job.cleanup` can end what a run
left behind, daemons in the run's runtime directories included, even after a
run was killed for taking too long.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.peers.peer_report import TestResult, read_report
from tests.peers.plugin_command import pytest_command

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = ROOT / ".peers-cache"
MARKER = "PYREPL3_PEERS_JOB"
KERNEL_NAME = "python3"

# pytest plugins the peer suites need beyond pytest itself (import names).
REQUIRED_PLUGINS = {
    "pytest_timeout": "pytest-timeout",
    "pytest_asyncio": "pytest-asyncio",
    "flaky": "flaky",
    "pytest_jupyter": "pytest-jupyter[server]",
}


class PeerSetupError(RuntimeError):
    """The peer run could not be set up (download, install, kernelspec binding)."""


@dataclass(frozen=True)
class Suite:
    """The part of a peer project's tests that talks to a kernel."""

    name: str
    dist: str
    targets: tuple[str, ...]
    # Top-level entries of the sdist removed from the copy, so that the tests
    # import the installed package and not its source next to them.
    drop: tuple[str, ...] = ()
    test_timeout: int = 60
    bound: int = 420
    pytest_args: tuple[str, ...] = ()


SUITES: dict[str, Suite] = {
    "ipykernel": Suite(
        "ipykernel",
        "ipykernel",
        (
            "tests/test_kernel.py",
            "tests/test_message_spec.py",
            "tests/test_subshells.py",
            "tests/test_debugger.py",
        ),
        drop=("ipykernel", "ipykernel_launcher.py"),
        test_timeout=30,  # ipykernel's own setting
        bound=420,  # test_subshells.py starts a kernel per test (about 80 s)
    ),
    "jupyter_server": Suite(
        "jupyter_server",
        "jupyter_server",
        ("tests/services/kernels",),
        drop=("jupyter_server",),
        test_timeout=60,
        bound=420,
        # tornado 6.6 warns about jupyter_server's own test code, and the suite
        # turns warnings into errors: that fails on every kernel alike.
        # (-W takes a literal message prefix.)
        pytest_args=(
            "-W",
            "ignore:The method, uri, and version arguments to HTTPServerRequest:DeprecationWarning",
            "-W",
            "ignore:The start_line argument to HTTPServerRequest:DeprecationWarning",
        ),
    ),
    "papermill": Suite(
        "papermill",
        "papermill",
        (
            "papermill/tests/test_execute.py",
            "papermill/tests/test_cli.py",
            "papermill/tests/test_engines.py",
            "papermill/tests/test_autosave.py",
        ),
        test_timeout=60,
        bound=300,
    ),
}

# What binds the name python3: `python -m <args> <prefix>`.
KERNELS: dict[str, tuple[str, ...]] = {
    "ipykernel": ("ipykernel", "install", "--name", KERNEL_NAME, "--prefix"),
    "pyrepl3": ("pyrepl3_kernel.cli", "install", "--name", KERNEL_NAME, "--prefix"),
    "pyrepl3-cold": (
        "pyrepl3_kernel.cli",
        "install",
        "--name",
        KERNEL_NAME,
        "--no-pool",
        "--prefix",
    ),
}
BASELINE = "ipykernel"


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def missing_plugins() -> list[str]:
    """pip names of the pytest plugins the peer suites need and that are not installed."""
    import importlib.util

    return [pip for mod, pip in REQUIRED_PLUGINS.items() if importlib.util.find_spec(mod) is None]


# --- one run of a suite against a kernel ---------------------------------------


@dataclass
class RunResult:
    results: dict[str, TestResult] = field(default_factory=dict)
    exit_code: int | None = None
    cut: bool = False  # killed by the bound
    elapsed: float = 0.0
    log: Path | None = None

    def count(self, *outcomes: str) -> int:
        return sum(1 for r in self.results.values() if r.outcome in outcomes)


_active_lock = threading.Lock()
_active: set[subprocess.Popen[bytes]] = set()
_stopping = threading.Event()


def kill_active() -> None:
    """Kill every peer pytest process still running (their process groups);
    no run starts after this."""
    _stopping.set()
    with _active_lock:
        procs = list(_active)
    for proc in procs:
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class Job:
    """One suite against one kernel: its directory, environment and runs."""

    suite: Suite
    kernel: str
    source: Path
    root: Path
    run_id: str
    artifacts: Path | None = None  # where each run's log and daemon logs are kept
    env: dict[str, str] = field(default_factory=dict)
    workdir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.workdir = self.root / "src"

    @property
    def marker(self) -> str:
        return f"{self.run_id}/{self.suite.name}/{self.kernel}"

    def setup(self) -> None:
        """Copy the tests, bind ``python3`` to the kernel, check that jupyter_client agrees."""
        drop = set(self.suite.drop)
        shutil.copytree(
            self.source,
            self.workdir,
            ignore=lambda d, names: [n for n in names if Path(d) == self.source and n in drop],
        )
        prefix = self.root / "prefix"
        # ipykernel's test_sys_path_profile_dir looks for the default profile,
        # which only an earlier kernel start would otherwise have made.
        _mk(self.root / "ipython" / "profile_default")
        dirs = {
            name: _mk(self.root / sub)
            for name, sub in (
                ("JUPYTER_DATA_DIR", "data"),
                ("JUPYTER_CONFIG_DIR", "config"),
                ("JUPYTER_RUNTIME_DIR", "runtime"),
                ("IPYTHONDIR", "ipython"),
            )
        }
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("JUPYTER_", "PYTEST_", "JPY_", "PYREPL3_"))
            and k not in ("IPYTHONDIR", "PYTHONPATH", "MPLBACKEND")
        }
        env.update({k: str(v) for k, v in dirs.items()})
        env["JUPYTER_PATH"] = str(prefix / "share" / "jupyter")
        env[MARKER] = self.marker
        self.env = env
        proc = subprocess.run(
            [sys.executable, "-m", *KERNELS[self.kernel], str(prefix)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        if proc.returncode != 0:
            raise PeerSetupError(
                f"installing {self.kernel} as {KERNEL_NAME} failed:\n{proc.stderr}"
            )
        spec_dir = prefix / "share" / "jupyter" / "kernels" / KERNEL_NAME
        check = subprocess.run(
            [
                sys.executable,
                "-c",
                "from jupyter_client.kernelspec import KernelSpecManager as M; "
                f"print(M().get_kernel_spec({KERNEL_NAME!r}).resource_dir)",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=self.workdir,
        )
        found = check.stdout.strip()
        if check.returncode != 0 or Path(found).resolve() != spec_dir.resolve():
            raise PeerSetupError(
                f"jupyter_client resolves {KERNEL_NAME!r} to {found or check.stderr[-500:]!r}, "
                f"not to the {self.kernel} kernelspec in {spec_dir}"
            )

    def pytest_command(self, targets: list[str], report: Path) -> list[str]:
        return pytest_command(
            report,
            f"--basetemp={self.root / 'basetemp'}",
            # A hanging test fails and the run goes on (the thread method of
            # some suites ends the whole process).
            "-o",
            f"timeout={self.suite.test_timeout}",
            "-o",
            "timeout_method=signal",
            "-o",
            "asyncio_default_fixture_loop_scope=function",
            "--color=no",
            "-q",
            *self.suite.pytest_args,
            *targets,
        )

    def run(self, targets: list[str], bound: float, label: str) -> RunResult:
        """Run pytest on ``targets`` in this job's environment, killed after ``bound`` s."""
        report = self.root / f"{label}.jsonl"
        log = self.root / f"{label}.log"
        report.unlink(missing_ok=True)
        shutil.rmtree(self.root / "basetemp", ignore_errors=True)
        result = RunResult(log=log)
        start = time.monotonic()
        with open(log, "wb") as out, _active_lock:
            if _stopping.is_set():
                raise PeerSetupError("stopping: no new run")
            proc = subprocess.Popen(
                ["nice", "-n", "10", *self.pytest_command(targets, report)],
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            _active.add(proc)
        try:
            result.exit_code = proc.wait(timeout=max(bound, 1.0))
        except subprocess.TimeoutExpired:
            result.cut = True
            _kill_group(proc)
            result.exit_code = proc.poll()
        finally:
            with _active_lock:
                _active.discard(proc)
            if proc.poll() is None:
                _kill_group(proc)
        result.elapsed = time.monotonic() - start
        result.results = read_report(report)
        self.cleanup()
        self._keep_logs(label, log)
        return result

    def _keep_logs(self, label: str, log: Path) -> None:
        if self.artifacts is None:
            return
        dest = _mk(self.artifacts / f"{self.suite.name}-{self.kernel}")
        shutil.copy(log, dest / f"{label}.log")
        for i, daemon_log in enumerate(sorted(self.root.rglob("pyrepl3-daemon.log"))):
            shutil.copy(daemon_log, dest / f"{label}-daemon-{i}.log")

    def cleanup(self) -> None:
        """End the daemons and kernels this job caused (stop each daemon, then kill what is left)."""
        for lock in self.root.rglob("pyrepl3-daemon.lock"):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pyrepl3_kernel.cli",
                    "stop",
                    "--runtime-dir",
                    str(lock.parent),
                ],
                capture_output=True,
                timeout=60,
                env=self.env,
            )
        kill_marked(self.marker)

    def reproduce(self, targets: list[str]) -> str:
        """Shell lines that re-run ``targets`` by hand in this job's environment."""
        keys = [
            "JUPYTER_PATH",
            "JUPYTER_DATA_DIR",
            "JUPYTER_CONFIG_DIR",
            "JUPYTER_RUNTIME_DIR",
            "IPYTHONDIR",
        ]
        exports = " ".join(f"{k}={self.env[k]}" for k in keys)
        opts = (
            f"-p no:cacheprovider -o timeout={self.suite.test_timeout} -o timeout_method=signal "
            "-o asyncio_default_fixture_loop_scope=function "
            + " ".join(f"'{a}'" if " " in a else a for a in self.suite.pytest_args)
        )
        quoted = " ".join(f"'{t}'" for t in targets)
        return (
            f"cd {self.workdir} && env {exports} {sys.executable} -m pytest {opts} {quoted}\n"
            f"{sys.executable} -m pyrepl3_kernel.cli stop --runtime-dir {self.env['JUPYTER_RUNTIME_DIR']}"
        )


def kill_marked(prefix: str) -> list[int]:
    """Terminate (then kill) every process whose ``MARKER`` is ``prefix`` or below it
    (``run`` covers ``run/suite/kernel``)."""
    own = os.getpid()
    found: list[psutil.Process] = []
    for proc in psutil.process_iter():
        if proc.pid == own:
            continue
        try:
            value = proc.environ().get(MARKER)
        except (psutil.Error, OSError):
            continue
        # "run/suite/pyrepl3" must not match "run/suite/pyrepl3-cold".
        if value is not None and (value == prefix or value.startswith(prefix + "/")):
            found.append(proc)
    for proc in found:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _gone, alive = psutil.wait_procs(found, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in found]


def become_subreaper() -> None:
    """Orphans of our runs (daemons that detach) become our children, not init's (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_child_subreaper = 36
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def kill_descendants() -> None:
    """Kill every process below this one (with :func:`become_subreaper`, detached ones too)."""
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(children, timeout=5)
