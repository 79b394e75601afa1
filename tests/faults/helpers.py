"""A Jupyter client for the fault-injection tests.

:class:`Kernel` starts one kernel with ``jupyter_client.KernelManager`` (with
limits given as the launch environment, as a user would set them) and keeps
one ``BlockingKernelClient`` for the kernel's whole life: the tests check that
this same client keeps working through every crash. Nothing it receives is
dropped: shell replies and iopub messages are kept by parent until a test asks
for them, and every ``status`` seen on iopub is recorded in
:attr:`Kernel.states`.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from typing import Any

import psutil
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from jupyter_helpers import KERNEL_NAME, TIMEOUT, Msg, Run

#: States a kernel that survives a crash never reports.
BAD_STATES = frozenset({"restarting", "dead", "starting"})


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def autosave_root() -> Path:
    return Path(os.environ["JUPYTER_RUNTIME_DIR"]) / "pyrepl3-autosave"


class Kernel:
    """One kernel, one client, for the kernel's whole life."""

    def __init__(
        self,
        kernel_name: str,
        env: dict[str, str] | None = None,
        kernel_spec_manager: KernelSpecManager | None = None,
    ) -> None:
        self.kernel_name = kernel_name
        self.pooled = kernel_name == KERNEL_NAME
        extra: dict[str, Any] = {}
        if kernel_spec_manager is not None:
            extra["kernel_spec_manager"] = kernel_spec_manager
        self.km = KernelManager(kernel_name=kernel_name, **extra)
        self.km.start_kernel(env={**os.environ, **(env or {})})
        self.kc: BlockingKernelClient = self.km.client()
        self.states: list[str] = []
        self._iopub: dict[str, list[Msg]] = collections.defaultdict(list)
        self._shell: dict[str, Msg] = {}
        self._autosave_dir: Path | None = None
        try:
            self.kc.start_channels()
            self.kc.wait_for_ready(timeout=60)
            provisioner: Any = self.km.provisioner
            self.identity = provisioner.lease_id if self.pooled else provisioner.process.pid
            if self.pooled:
                assert self.identity, "the pooled kernel was started cold"
        except BaseException:
            self.close()
            raise
        self.drain()
        self.states.clear()

    def __repr__(self) -> str:
        return f"<Kernel {self.kernel_name}>"

    # -- lifecycle ----------------------------------------------------------------

    @property
    def gateway_pid(self) -> int | None:
        """The standalone kernel's process (None for a pooled one: its
        gateway lives in the manager daemon)."""
        return None if self.pooled else int(self.identity)

    def same_kernel(self) -> bool:
        provisioner: Any = self.km.provisioner
        now = provisioner.lease_id if self.pooled else provisioner.process.pid
        return bool(now == self.identity)

    def close(self) -> None:
        try:
            self.kc.stop_channels()
        finally:
            self.km.shutdown_kernel(now=True)

    # -- receiving ------------------------------------------------------------------

    def _next_iopub(self, deadline: float) -> Msg:
        msg = self.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
        if msg["msg_type"] == "status":
            self.states.append(msg["content"]["execution_state"])
        self._iopub[msg["parent_header"].get("msg_id", "")].append(msg)
        return msg

    def drain(self, quiet: float = 0.2) -> None:
        """Take in whatever iopub still holds (recording its statuses)."""
        while True:
            try:
                self._next_iopub(time.monotonic() + quiet)
            except Empty:
                return

    def reply_to(self, msg_id: str, timeout: float = TIMEOUT) -> Msg:
        deadline = time.monotonic() + timeout
        while msg_id not in self._shell:
            msg = self.kc.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))
            self._shell[msg["parent_header"].get("msg_id", "")] = msg
        return self._shell.pop(msg_id)

    def _idle(self, msg_id: str) -> bool:
        return any(
            m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"
            for m in self._iopub.get(msg_id, ())
        )

    def iopub_of(self, msg_id: str, timeout: float = TIMEOUT) -> list[Msg]:
        deadline = time.monotonic() + timeout
        while not self._idle(msg_id):
            self._next_iopub(deadline)
        return self._iopub.pop(msg_id)

    def wait_iopub(self, msg_id: str, msg_type: str, timeout: float = TIMEOUT) -> Msg:
        """The first iopub message of ``msg_type`` for ``msg_id`` (kept for
        :meth:`iopub_of`)."""
        deadline = time.monotonic() + timeout
        while True:
            for m in self._iopub.get(msg_id, ()):
                if m["msg_type"] == msg_type:
                    return m
            self._next_iopub(deadline)

    # -- requests -------------------------------------------------------------------

    def send(self, code: str, **kwargs: Any) -> str:
        return str(self.kc.execute(code, **kwargs))

    def finish(self, msg_id: str, started: float, timeout: float = TIMEOUT) -> Run:
        reply = self.reply_to(msg_id, timeout)
        run = Run(reply, self.iopub_of(msg_id, timeout))
        run.elapsed = time.monotonic() - started
        return run

    def execute(self, code: str, timeout: float = TIMEOUT, **kwargs: Any) -> Run:
        started = time.monotonic()
        return self.finish(self.send(code, **kwargs), started, timeout)

    def ok(self, code: str, timeout: float = TIMEOUT) -> Run:
        run = self.execute(code, timeout)
        assert run.status == "ok", (code, run.reply["content"], run.errors())
        return run

    def start_cell(self, code: str, settle: float = 0.3, **kwargs: Any) -> str:
        """Send a cell and return once it runs (its execute_input arrived,
        then ``settle`` seconds for the worker to get into its code)."""
        msg_id = self.send(code, **kwargs)
        self.wait_iopub(msg_id, "execute_input")
        time.sleep(settle)
        return msg_id

    def value(self, expression: str) -> str:
        """repr() of ``expression`` in the kernel (via user_expressions)."""
        run = self.execute("", user_expressions={"v": expression}, silent=True)
        result = run.reply["content"]["user_expressions"]["v"]
        assert result["status"] == "ok", result
        return str(result["data"]["text/plain"])

    def worker_pid(self) -> int:
        return int(self.value("__import__('os').getpid()"))

    def control(self, msg_type: str, content: dict[str, Any], timeout: float = TIMEOUT) -> Msg:
        msg = self.kc.session.msg(msg_type, content)
        self.kc.control_channel.send(msg)
        deadline = time.monotonic() + timeout
        while True:
            reply = self.kc.get_control_msg(timeout=max(0.01, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                return reply

    def usage(self) -> dict[str, Any]:
        reply = self.control("usage_request", {})
        assert reply["msg_type"] == "usage_reply", reply
        return dict(reply["content"])

    def interrupt(self) -> None:
        self.km.interrupt_kernel()

    # -- checks ---------------------------------------------------------------------

    def assert_never_restarted(self) -> None:
        """The same client still talks to the same kernel, which never said
        it was restarting or dead."""
        self.drain()
        assert not BAD_STATES & set(self.states), self.states
        assert self.km.is_alive()
        assert self.same_kernel()

    # -- automatic checkpoints ----------------------------------------------------------

    def autosave_dir(self) -> Path:
        """The kernel's autosave directory (found through a marker name)."""
        if self._autosave_dir is None:
            marker = f"_fault_marker_{uuid.uuid4().hex[:12]}"
            self.ok(f"{marker} = 1")

            def find() -> Path | None:
                for manifest in autosave_root().glob("*/auto.json"):
                    try:
                        if marker in json.loads(manifest.read_text()).get("names", {}):
                            return manifest.parent
                    except (OSError, ValueError):
                        continue
                return None

            self._autosave_dir = wait_until(find, TIMEOUT, "the kernel's autosave directory")
        return self._autosave_dir

    def wait_autosaved(self, run: Run, timeout: float = TIMEOUT) -> None:
        """Wait until the automatic checkpoint holds the state after ``run``
        (saves run in the background; one may lag a cell behind)."""
        count = int(run.reply["content"]["execution_count"])
        path = self.autosave_dir() / "auto.json"

        def saved() -> bool:
            try:
                return int(json.loads(path.read_text()).get("execution_count", 0)) > count
            except (OSError, ValueError):
                return False

        wait_until(saved, timeout, f"the autosave of cell {count}")


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``pyrepl3-kernel ARGS`` (the installed console script)."""
    script = shutil.which("pyrepl3-kernel", path=os.path.dirname(sys.executable))
    cmd = [script] if script else [sys.executable, "-m", "pyrepl3_kernel.cli"]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=timeout, check=True
    )


def daemon_status() -> dict[str, Any]:
    return dict(json.loads(cli("status", "--json").stdout))
