"""The command line of a pytest process with the peer_report plugin on: the
peer runner's (harness.Job) and test_peer_report's. Loaded by path where
this directory is not importable."""

from __future__ import annotations

import sys
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parent

# The child's interpreter finds peer_report on a path appended to sys.path
# (never PYTHONPATH: kernels would inherit it).
_BOOT = (
    "import sys; sys.path.append(sys.argv.pop(1)); import pytest; "
    "sys.argv[0] = 'pytest'; sys.exit(pytest.main())"
)


def pytest_command(report: Path, *options: str) -> list[str]:
    """pytest (without its cache) with peer_report writing ``report``, then ``options``."""
    return [
        sys.executable,
        "-c",
        _BOOT,
        str(PLUGIN_DIR),
        "-p",
        "peer_report",
        f"--peers-report={report}",
        "-p",
        "no:cacheprovider",
        *options,
    ]
