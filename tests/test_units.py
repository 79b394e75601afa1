"""Sizes from environment variables: one helper for every reader (the
transactions' limits, autosave's largest object, a kernel's memory limits)."""

from __future__ import annotations

import logging

import pytest

from pyrepl3_kernel.session.limits import Limits
from pyrepl3_kernel.units import size_from_env

log = logging.getLogger("pyrepl3.test-units")


def test_a_size_is_read_and_unset_or_empty_gives_the_default() -> None:
    assert size_from_env({"A_SIZE": "512M"}, "A_SIZE", 7, log) == 512 * 1024**2
    assert size_from_env({"A_SIZE": "2g"}, "A_SIZE", 7, log) == 2 * 1024**3
    assert size_from_env({"A_SIZE": "1000"}, "A_SIZE", 7, log) == 1000
    assert size_from_env({}, "A_SIZE", 7, log) == 7
    assert size_from_env({"A_SIZE": ""}, "A_SIZE", None, log) is None


def test_a_bad_value_gives_the_default_with_one_clear_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = {"PYREPL3_TEST_BAD_SIZE": "lots"}
    with caplog.at_level(logging.WARNING, logger=log.name):
        for _ in range(3):  # read on every cell: told once
            assert size_from_env(env, "PYREPL3_TEST_BAD_SIZE", 1024, log) == 1024
    assert [r.getMessage() for r in caplog.records] == [
        "ignoring PYREPL3_TEST_BAD_SIZE='lots': not a size (use e.g. 512M or 2G); "
        "the default, 1024, is used"
    ]
    assert caplog.records[0].name == log.name


def test_a_bad_memory_limit_sets_no_limit_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        limits = Limits.from_env(
            {"PYREPL3_MEMORY_LIMIT": "two gigs", "PYREPL3_MEMORY_SOFT_LIMIT": "1G"}
        )
    assert limits.memory_limit is None
    assert limits.memory_soft_limit == 1024**3
    assert any(
        "ignoring PYREPL3_MEMORY_LIMIT='two gigs'" in r.getMessage()
        and "no limit is set" in r.getMessage()
        for r in caplog.records
    )
