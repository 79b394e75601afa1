"""Registers the ``peers`` marker: tests that run other projects' test suites
against PyREPL3 (minutes; deselect with ``-m "not peers"``)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "peers: runs ipykernel's, jupyter_server's and papermill's own tests against "
        "PyREPL3 and ipykernel (minutes; deselect with -m 'not peers')",
    )
