"""The per-test report of a peer run: written by this module as a pytest
plugin loaded into the peer suite's pytest process (``-p peer_report``), read
back by the runner with :func:`read_report`.

The plugin appends one JSON line per test phase to the file given by
``--peers-report`` as the run goes, and the collected node ids first, so a
run that the runner has to kill still tells which tests passed, which one
hung and which never ran.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_EXCERPT_LINES = 40
_EXCERPT_CHARS = 4000


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--peers-report", default=None, help="JSON-lines file for the peer runner")


class _Writer:
    def __init__(self, path: str) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


_writer: _Writer | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _writer
    path = config.getoption("--peers-report")
    if path:
        _writer = _Writer(path)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _writer
    if _writer is not None:
        _writer.close()
        _writer = None


def pytest_collection_finish(session: pytest.Session) -> None:
    if _writer is not None:
        _writer.write({"collected": [item.nodeid for item in session.items]})


def _excerpt(report: pytest.TestReport) -> str:
    text = _ANSI.sub("", report.longreprtext or "")
    lines = [line for line in text.splitlines() if line.strip()]
    # The assertion (E lines) and where it happened are at the end.
    excerpt = "\n".join(lines[-_EXCERPT_LINES:])[-_EXCERPT_CHARS:]
    # A kernel that died at start says why on the output the test captured
    # (its stderr, or stdout where the test merged them).
    for name, captured in (("stdout", report.capstdout), ("stderr", report.capstderr)):
        tail = [line for line in _ANSI.sub("", captured or "").splitlines() if line.strip()]
        if tail:
            excerpt += f"\n--- captured {name} (end) ---\n" + "\n".join(tail[-8:])[-1000:]
    return excerpt


def _message(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return _ANSI.sub("", str(crash.message))[:500]
    if isinstance(report.longrepr, tuple):  # a skip: (file, line, reason)
        return str(report.longrepr[-1])[:500]
    lines = _ANSI.sub("", report.longreprtext or "").strip().splitlines()
    return lines[-1][:500] if lines else ""


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _writer is None:
        return
    record: dict[str, Any] = {
        "nodeid": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "duration": round(report.duration, 3),
    }
    if hasattr(report, "wasxfail"):
        record["xfail"] = True
    if report.failed or report.skipped:
        record["message"] = _message(report)
    if report.failed:
        record["excerpt"] = _excerpt(report)
    _writer.write(record)


# --- the runner's side ---------------------------------------------------------


@dataclass
class TestResult:
    nodeid: str
    outcome: str  # passed, failed, error, skipped, xfailed, xpassed, timeout, not-run
    message: str = ""
    excerpt: str = ""
    duration: float = 0.0


def read_report(path: Path) -> dict[str, TestResult]:
    """Per-test outcome from the JSON lines of :mod:`peer_report`."""
    results: dict[str, TestResult] = {}
    if not path.exists():
        return results
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if "collected" in rec:
            for nodeid in rec["collected"]:
                results.setdefault(nodeid, TestResult(nodeid, "not-run"))
            continue
        nodeid, when, outcome = rec["nodeid"], rec["when"], rec["outcome"]
        res = results.setdefault(nodeid, TestResult(nodeid, "not-run"))
        res.duration += rec.get("duration", 0.0)
        xfail = bool(rec.get("xfail"))
        if when == "setup":
            res.outcome = {"passed": "running", "failed": "error", "skipped": "skipped"}[outcome]
        elif when == "call":
            res.outcome = {
                "passed": "xpassed" if xfail else "passed",
                "failed": "failed",
                "skipped": "xfailed" if xfail else "skipped",
            }[outcome]
            if outcome == "passed":  # a rerun (flaky) that passed
                res.message = res.excerpt = ""
        elif outcome == "failed" and res.outcome != "failed":
            res.outcome = "error"  # a failing teardown, as pytest counts it
        if outcome != "passed" and not res.message:
            res.message = rec.get("message", "")
            res.excerpt = rec.get("excerpt", "")
    for res in results.values():
        if res.outcome == "running":  # set up, never finished: the one the bound killed
            res.outcome = "timeout"
            res.message = res.message or "still running when the run was killed"
    return results
