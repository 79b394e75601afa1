"""The peer runner's per-test report (peer_report.py) says what pytest says,
also for a run killed in the middle of a test: a judge that misreads outcomes
would pass or fail PyREPL3 for nothing. Each test runs a real pytest process
with the plugin on a small generated test file."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType

PLUGIN_DIR = Path(__file__).resolve().parent


def _load(module_name: str) -> ModuleType:
    name = f"peers_{module_name}"  # by path: this directory need not be importable
    spec = importlib.util.spec_from_file_location(name, PLUGIN_DIR / f"{module_name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


peer_report = _load("peer_report")
plugin_command = _load("plugin_command")


def _pytest(tmp_path: Path, source: str, report: Path) -> subprocess.Popen[bytes]:
    (tmp_path / "test_sample.py").write_text(textwrap.dedent(source))
    return subprocess.Popen(
        plugin_command.pytest_command(report, "-q", "test_sample.py"),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")},
    )


def test_report_gives_each_outcome_as_pytest_counts_it(tmp_path: Path) -> None:
    report = tmp_path / "report.jsonl"
    proc = _pytest(
        tmp_path,
        """
        import sys
        import pytest

        @pytest.fixture
        def broken_setup():
            raise RuntimeError("setup broke")

        @pytest.fixture
        def broken_teardown():
            yield
            raise RuntimeError("teardown broke")

        def test_passes():
            pass

        def test_fails():
            print("the kernel said why", file=sys.stderr)
            assert 1 == 2, "one is not two"

        def test_setup_error(broken_setup):
            pass

        def test_teardown_error(broken_teardown):
            pass

        @pytest.mark.skip(reason="not here")
        def test_skipped():
            pass

        @pytest.mark.xfail(reason="known")
        def test_xfails():
            assert False
        """,
        report,
    )
    assert proc.wait(timeout=60) == 1
    results = peer_report.read_report(report)
    outcomes = {nodeid.split("::")[1]: r.outcome for nodeid, r in results.items()}
    assert outcomes == {
        "test_passes": "passed",
        "test_fails": "failed",
        "test_setup_error": "error",
        "test_teardown_error": "error",
        "test_skipped": "skipped",
        "test_xfails": "xfailed",
    }
    failed = results["test_sample.py::test_fails"]
    assert "one is not two" in failed.message
    assert "the kernel said why" in failed.excerpt  # captured output comes along
    assert "setup broke" in results["test_sample.py::test_setup_error"].message


def test_a_killed_run_names_the_test_it_was_in_and_the_ones_never_run(tmp_path: Path) -> None:
    report = tmp_path / "report.jsonl"
    proc = _pytest(
        tmp_path,
        """
        import time

        def test_first():
            pass

        def test_hangs():
            time.sleep(600)

        def test_after():
            pass
        """,
        report,
    )
    try:
        deadline = time.monotonic() + 60
        while '"test_sample.py::test_hangs", "when": "setup"' not in (
            report.read_text() if report.exists() else ""
        ):
            assert time.monotonic() < deadline, "the plugin never reported test_hangs' setup"
            assert proc.poll() is None, "pytest ended before test_hangs"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    results = peer_report.read_report(report)
    assert {n.split("::")[1]: r.outcome for n, r in results.items()} == {
        "test_first": "passed",
        "test_hangs": "timeout",
        "test_after": "not-run",
    }
