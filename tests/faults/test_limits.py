"""Faults the gateway causes itself: resource limits, interrupt escalation,
and the restart budget; plus interrupts that must not misfire.

Limits come from the launch environment (``km.start_kernel(env=...)``), as a
user would set them; every test runs against both kernelspecs.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_helpers import KERNEL_NAMES, TIMEOUT

from .helpers import Kernel, daemon_status, gone, wait_until
from .test_crashes import (
    assert_crash_reported,
    assert_state_restored,
    crash_cell,
    define_state,
)

pytestmark = pytest.mark.usefixtures("pyrepl3_kernelspec")

LIMITS = {
    "PYREPL3_MEMORY_LIMIT": "400M",
    "PYREPL3_MEMORY_SOFT_LIMIT": "200M",
    "PYREPL3_CELL_TIMEOUT": "4",
    "PYREPL3_CELL_CPU_LIMIT": "1",
    "PYREPL3_INTERRUPT_GRACE": "1",
    "PYREPL3_MAX_RESTARTS": "100",
}


@pytest.fixture(scope="module", params=KERNEL_NAMES)
def limited_kernel(request: pytest.FixtureRequest) -> Iterator[Kernel]:
    kernel = Kernel(request.param, env=LIMITS)
    try:
        yield kernel
    finally:
        kernel.close()


@pytest.fixture
def kernel(limited_kernel: Kernel) -> Kernel:
    limited_kernel.drain()
    return limited_kernel


def test_limits_come_from_the_launch_env(kernel: Kernel) -> None:
    limits = kernel.usage()["pyrepl3"]["limits"]
    assert limits["memory_limit"] == 400 << 20
    assert limits["memory_soft_limit"] == 200 << 20
    assert limits["cell_timeout"] == 4
    assert limits["cell_cpu_limit"] == 1
    assert limits["interrupt_grace"] == 1
    assert limits["max_restarts"] == 100


def test_memory_hard_limit(kernel: Kernel, tmp_path: Path) -> None:
    token = define_state(kernel)
    counter = tmp_path / "runs"
    # Fast growth: on a loaded machine a slow loop would meet the fixture's
    # 4 s wall-time limit before the 400 MiB memory limit.
    grow = "chunks = []\nwhile True:\n    chunks.append(b'x' * (64 << 20))"
    run = kernel.execute(crash_cell(grow, counter))
    evalue = assert_crash_reported(run, [])
    assert re.search(r"memory limit 400\.0 MiB exceeded \(\d+\.\d MiB\)", evalue), evalue
    assert_state_restored(kernel, token)
    assert counter.read_text() == "run\n"
    kernel.assert_never_restarted()


def test_memory_of_the_autosave_child_is_not_counted_twice(kernel: Kernel) -> None:
    """The automatic checkpoint's child is a fork of the worker: its pages
    are the worker's (copy-on-write), not more memory. 240 MiB of data (the
    worker: about 330 MiB, under the 400 MiB limit) must not read as 660 MiB
    while the next cell runs beside the save."""
    worker = kernel.worker_pid()
    first = kernel.send("import numpy as np\nbig = np.full(30_000_000, 1.0)")
    second = kernel.send(
        "import psutil, time\n"
        "forks = 0\n"
        "for _ in range(12):\n"
        "    forks = max(forks, len(psutil.Process().children()))\n"
        "    time.sleep(0.1)\n"
        "forks"
    )
    assert kernel.finish(first, time.monotonic()).status == "ok"
    run = kernel.finish(second, time.monotonic())
    assert run.status == "ok", run.errors()
    result = [m for m in run.iopub if m["msg_type"] == "execute_result"]
    assert int(result[0]["content"]["data"]["text/plain"]) >= 1, "no save ran beside the cell"
    assert kernel.worker_pid() == worker
    kernel.ok("del big")


def test_memory_soft_limit_warns_once(kernel: Kernel) -> None:
    worker = kernel.worker_pid()
    run = kernel.execute(
        "import time\n"
        "big = bytearray(b'\\x01') * (260 << 20)\n"
        "time.sleep(1.2)  # several samples over the soft limit\n"
        "print('still running')\n"
        "del big"
    )
    assert run.status == "ok", run.errors()
    warnings = [
        m["content"]["text"]
        for m in run.iopub
        if m["msg_type"] == "stream" and "over the soft memory limit" in m["content"]["text"]
    ]
    assert len(warnings) == 1, warnings
    assert "200.0 MiB" in warnings[0] and "hard limit 400.0 MiB" in warnings[0]
    # The warning arrived while the cell ran, and the cell went on.
    assert run.index("stream", lambda c: "soft memory limit" in c["text"]) < run.index(
        "stream", lambda c: "still running" in c["text"]
    )
    assert kernel.worker_pid() == worker


def test_wall_time_limit(kernel: Kernel) -> None:
    # Waiting for the user's input() does not count toward the limit.
    worker = kernel.worker_pid()
    msg_id = kernel.send("import time\ntime.sleep(0.5)\nname = input('name: ')", allow_stdin=True)
    kernel.kc.get_stdin_msg(timeout=TIMEOUT)
    time.sleep(4.5)
    kernel.kc.input("Ada")
    run = kernel.finish(msg_id, time.monotonic())
    assert run.status == "ok", run.errors()
    assert kernel.worker_pid() == worker

    token = define_state(kernel)
    run = kernel.execute(crash_cell("import time\ntime.sleep(60)", Path(os.devnull)))
    assert_crash_reported(run, ["the cell ran longer than its wall-time limit of 4 s"])
    assert run.elapsed < 4 + 5
    assert_state_restored(kernel, token)
    kernel.assert_never_restarted()


def test_cpu_time_limit(kernel: Kernel) -> None:
    token = define_state(kernel)
    # Waiting uses no CPU: 2 s of sleep is within a 1 s CPU-time limit.
    assert kernel.ok("import time\ntime.sleep(2)\nslept = True").status == "ok"
    run = kernel.execute(crash_cell("while True:\n    pass", Path(os.devnull)))
    assert_crash_reported(run, ["the cell used more than its CPU-time limit of 1 s"])
    assert_state_restored(kernel, token)
    kernel.assert_never_restarted()


# -- interrupts ----------------------------------------------------------------------


def test_interrupt_escalation(kernel: Kernel) -> None:
    """Code that blocks SIGINT ignores the interrupt: after the grace period
    (1 s here) the worker is stopped and the state restored."""
    token = define_state(kernel)
    worker = kernel.worker_pid()
    msg_id = kernel.start_cell(
        crash_cell(
            "import signal, time\n"
            "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})\n"
            "time.sleep(60)",
            Path(os.devnull),
        )
    )
    interrupted = time.monotonic()
    kernel.interrupt()
    run = kernel.finish(msg_id, interrupted)
    assert_crash_reported(run, ["the interrupt did not land within 1 s", "the worker was stopped"])
    assert run.elapsed < 1 + 4, run.elapsed
    assert gone(worker)
    assert_state_restored(kernel, token)
    kernel.assert_never_restarted()


def test_late_interrupt_never_hits_the_next_cell(kernel: Kernel) -> None:
    """An interrupt that reaches a cell as it ends is spent on that cell (or
    on nothing): the next cell, sent once the interrupt was answered, runs
    to the end, and no escalation stops the worker."""
    worker = kernel.worker_pid()
    for i in range(24):
        # Cells that end within a few ms of the interrupt: the race window.
        first = kernel.send(f"import time\ntime.sleep({(i % 12) * 0.002})")
        reply = kernel.control("interrupt_request", {})
        assert reply["content"]["status"] == "ok"
        second = kernel.send("import time\ntime.sleep(0.05)\nprint('second')")
        first_run = kernel.finish(first, time.monotonic())
        run = kernel.finish(second, time.monotonic())
        if first_run.status == "error":
            assert first_run.reply["content"]["ename"] == "KeyboardInterrupt"
            # stop_on_error aborts the cell if it was queued behind the
            # interrupted one (that is not the interrupt hitting it); if it
            # arrived after that cell's reply, it runs, to the end.
            if run.status == "aborted":
                continue
        assert run.status == "ok", (i, run.reply["content"], run.errors())
        assert run.stdout() == "second\n"
    time.sleep(1.5)  # past the escalation grace
    assert kernel.worker_pid() == worker
    assert kernel.ok("print('after')").stdout() == "after\n"
    kernel.assert_never_restarted()


def test_input_asked_again_after_an_interrupt_is_not_escalated(kernel: Kernel) -> None:
    """Code that catches the KeyboardInterrupt and asks again is alive: the
    interrupt landed, so no escalation stops the worker after the grace,
    and the answer goes to the input() that asked last."""
    worker = kernel.worker_pid()
    msg_id = kernel.send(
        "answers = []\n"
        "while not answers:\n"
        "    try:\n"
        "        answers.append(input('name? '))\n"
        "    except KeyboardInterrupt:\n"
        "        print('interrupted, asking again')\n",
        allow_stdin=True,
    )
    assert kernel.kc.get_stdin_msg(timeout=TIMEOUT)["content"]["prompt"] == "name? "
    kernel.interrupt()
    assert kernel.kc.get_stdin_msg(timeout=TIMEOUT)["content"]["prompt"] == "name? "
    time.sleep(1.5)  # past the escalation grace
    kernel.kc.input("ada")
    run = kernel.finish(msg_id, time.monotonic())
    assert run.status == "ok", run.reply["content"]
    assert "interrupted, asking again" in run.stdout()
    assert kernel.worker_pid() == worker
    assert kernel.ok("print(answers)").stdout() == "['ada']\n"
    kernel.assert_never_restarted()


def test_interrupted_input_is_cancelled(kernel: Kernel) -> None:
    """Interrupting a pending input() ends it; the next input() is answered
    by the next input_reply (also one without a parent header, as
    ``BlockingKernelClient.input`` sends)."""
    msg_id = kernel.send("first = input('first: ')", allow_stdin=True)
    request = kernel.kc.get_stdin_msg(timeout=TIMEOUT)
    assert request["content"]["prompt"] == "first: "
    interrupted = time.monotonic()
    kernel.interrupt()
    run = kernel.finish(msg_id, interrupted)
    assert run.status == "error" and run.reply["content"]["ename"] == "KeyboardInterrupt"
    assert run.elapsed < 5
    msg_id = kernel.send("second = input('second: ')", allow_stdin=True)
    request = kernel.kc.get_stdin_msg(timeout=TIMEOUT)
    assert request["content"]["prompt"] == "second: "
    kernel.kc.input("hello")
    run = kernel.finish(msg_id, time.monotonic(), timeout=10)
    assert run.status == "ok", run.errors()
    assert kernel.value("('first' in globals(), second)") == "(False, 'hello')"


# -- the restart budget ---------------------------------------------------------------


@pytest.mark.parametrize("kernel_name", KERNEL_NAMES)
def test_restart_budget(kernel_name: str) -> None:
    """With PYREPL3_MAX_RESTARTS=2, the third crash within the window leaves
    the kernel up with no worker and says why; a kernel restart (what the
    message asks for) brings a worker back."""
    kernel = Kernel(kernel_name, env={"PYREPL3_MAX_RESTARTS": "2"})
    try:
        kernel.ok("x = 1")
        for crash in (1, 2):
            run = kernel.execute("import os\nos._exit(1)")
            assert run.status == "error"
            assert "a new worker is running" in run.stderr(), (crash, run.stderr())
        run = kernel.execute("import os\nos._exit(1)")
        assert run.status == "error"
        assert "exit code 1" in run.error()["evalue"]
        note = run.stderr()
        assert "3 worker crashes within 60 s" in note, note
        assert "restart the kernel" in note
        # The kernel itself is up, and says so at once ...
        started = time.monotonic()
        info = kernel.kc.kernel_info(reply=True, timeout=10)
        assert info["content"]["status"] == "ok"
        assert time.monotonic() - started < 3
        assert kernel.km.is_alive()
        # ... but runs nothing until restarted.
        run = kernel.execute("print('hello')", timeout=10)
        assert run.status == "error" and "restart the kernel" in run.error()["evalue"]
        assert run.elapsed < 3
        usage = kernel.usage()
        assert usage["pyrepl3"]["halted"] and usage["kernel_memory"] == 0
        if kernel.pooled:
            lease = {ls["kernel_id"]: ls for ls in daemon_status()["leases"]}[kernel.km.kernel_id]
            assert lease["worker_pid"] is None
        kernel.assert_never_restarted()

        kernel.km.restart_kernel()
        kernel.kc.wait_for_ready(timeout=60)
        kernel.drain()
        assert kernel.ok("print('back')").stdout() == "back\n"
        assert kernel.value("'x' in globals()") == "False"  # a restart starts afresh
        assert kernel.usage()["pyrepl3"]["halted"] is None
        # The budget starts over: a crash is survived again.
        run = kernel.execute("import os\nos._exit(1)")
        assert "a new worker is running" in run.stderr()
        wait_until(lambda: kernel.value("1 + 1") == "2", 10, "the kernel to answer")
    finally:
        kernel.close()
