"""jupyter_kernel_test's conformance suite against the ``pyrepl3`` kernel.

Every sample attribute ``KernelTests`` knows is filled in, so no subtest is
skipped; ``test_no_conformance_test_is_skipped`` guards that. The suite runs
on both kernelspecs of the conftest (pooled ``pyrepl3`` and ``pyrepl3-cold``).
Stock ipykernel 7.4 fails the history ``range`` subtest; pyrepl3 must pass
all of them.
"""

from __future__ import annotations

import unittest

import jupyter_kernel_test
import pytest

pytestmark = pytest.mark.usefixtures("pyrepl3_kernelspec")

KERNEL_NAME = "pyrepl3"  # the default install: leased from the manager daemon
COLD_KERNEL_NAME = "pyrepl3-cold"


class Pyrepl3ConformanceTests(jupyter_kernel_test.KernelTests):
    kernel_name = KERNEL_NAME

    # kernel_info
    language_name = "python"
    file_extension = ".py"

    # execute: streams
    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('some error', file=sys.stderr)"

    # complete_request: both a module attribute and a name from the namespace
    completion_samples = [
        {"text": "zi", "matches": {"zip"}},
        {"text": "import os; os.pat", "matches": {"path", "pathconf", "pathconf_names", "pathsep"}},
    ]

    # is_complete_request (answered by the gateway itself)
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2", "for i in range(3):"]
    invalid_code_samples = ["import = 7q"]

    # payloads
    code_page_something = "print?"

    # errors
    code_generate_error = "raise ValueError('expected')"

    # execute_result (also the input of test_history)
    code_execute_result = [
        {"code": "1+2+3", "result": "6"},
        {"code": "[n*n for n in range(1, 4)]", "result": "[1, 4, 9]"},
        {"code": "{'a': 1}", "result": "{'a': 1}"},
    ]

    # display_data
    code_display_data = [
        {
            "code": "from IPython.display import HTML, display; display(HTML('<b>test</b>'))",
            "mime": "text/html",
        },
        {
            "code": "from IPython.display import Math, display; display(Math('\\\\frac{1}{2}'))",
            "mime": "text/latex",
        },
        {
            "code": "from IPython.display import JSON, display; display(JSON({'a': [1, 2]}))",
            "mime": "application/json",
        },
    ]

    # history_request: pattern matches one of code_execute_result
    code_history_pattern = "1?2*"
    supported_history_operations = ("tail", "range", "search")

    # inspect_request
    code_inspect_sample = "zip"

    # clear_output
    code_clear_output = "from IPython.display import clear_output; print('x'); clear_output()"


class Pyrepl3IopubWelcomeTests(jupyter_kernel_test.IopubWelcomeTests):
    """JEP 65: a new iopub subscriber gets an ``iopub_welcome`` first."""

    kernel_name = KERNEL_NAME
    support_iopub_welcome = True


# The same suite on the standalone kernel process (``--no-pool``), which is
# what clients that ignore provisioners (VS Code) start.
class Pyrepl3ColdConformanceTests(Pyrepl3ConformanceTests):
    kernel_name = COLD_KERNEL_NAME


class Pyrepl3ColdIopubWelcomeTests(Pyrepl3IopubWelcomeTests):
    kernel_name = COLD_KERNEL_NAME


def _sample_attributes(cls: type, base: type) -> dict[str, object]:
    """The data attributes ``base`` declares (the samples), as set on ``cls``."""
    return {
        name: getattr(cls, name)
        for name, value in vars(base).items()
        if not name.startswith("_") and not callable(value) and not isinstance(value, classmethod)
    }


def test_no_conformance_test_is_skipped() -> None:
    """Every sample the suite knows is filled in (an empty one means a skipped test)."""
    samples = _sample_attributes(Pyrepl3ConformanceTests, jupyter_kernel_test.KernelTests)
    samples |= _sample_attributes(Pyrepl3IopubWelcomeTests, jupyter_kernel_test.IopubWelcomeTests)
    assert len(samples) >= 18, sorted(samples)
    empty = [name for name, value in samples.items() if not value]
    assert empty == []
    assert set(Pyrepl3ConformanceTests.supported_history_operations) == {"tail", "range", "search"}


if __name__ == "__main__":
    unittest.main()
