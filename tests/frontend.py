"""``Frontend``: a KernelManager and a blocking client, as the Jupyter-client
tests drive a kernel."""

from __future__ import annotations

import time
from queue import Empty
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager
from jupyter_helpers import KERNEL_NAME, TIMEOUT, Msg, Run

from pyrepl3_kernel.provisioner import PoolProvisioner


class Frontend:
    """A KernelManager and a blocking client, with helpers that pair every
    request with its reply and its iopub messages."""

    def __init__(self, kernel_name: str, **options: Any) -> None:
        """Starts the kernel (``options``: the KernelManager's) and waits
        until it is ready."""
        self.kernel_name = kernel_name
        self.pooled = kernel_name == KERNEL_NAME
        self.km = KernelManager(kernel_name=kernel_name, **options)
        self.km.start_kernel()
        self.kc: BlockingKernelClient = self.km.client()
        #: The pooled kernel's lease, or the standalone kernel's process.
        self.lease_id: str | None = None
        self.gateway_pid: int | None = None
        try:
            self.kc.start_channels()
            self.kc.wait_for_ready(timeout=60)
            provisioner: Any = self.km.provisioner
            if self.pooled:
                # Really leased from the daemon, not the provisioner's cold fallback.
                assert isinstance(provisioner, PoolProvisioner), provisioner
                assert provisioner.lease_id, "the pooled kernel was started cold"
                self.lease_id = provisioner.lease_id
            else:
                self.gateway_pid = provisioner.process.pid
        except BaseException:
            self.close()
            raise

    def same_kernel(self) -> bool:
        """Whether the kernel is still the one started (no restart, no new lease)."""
        provisioner: Any = self.km.provisioner
        if self.pooled:
            return bool(provisioner.lease_id == self.lease_id)
        return bool(provisioner.process.pid == self.gateway_pid)

    def close(self) -> None:
        try:
            self.kc.stop_channels()
        finally:
            self.km.shutdown_kernel(now=True)

    def flush(self) -> None:
        for get in (self.kc.get_shell_msg, self.kc.get_iopub_msg, self.kc.get_stdin_msg):
            while True:
                try:
                    get(timeout=0.05)
                except Empty:
                    break

    def reply_to(self, msg_id: str, timeout: float = TIMEOUT) -> Msg:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.kc.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg

    def iopub_of(self, msg_id: str, timeout: float = TIMEOUT) -> list[Msg]:
        """The iopub messages of ``msg_id`` up to and including its idle."""
        return self.iopub_of_all([msg_id], timeout)[msg_id]

    def iopub_of_all(self, msg_ids: list[str], timeout: float = TIMEOUT) -> dict[str, list[Msg]]:
        """The iopub messages of each of ``msg_ids``, each up to its idle."""
        deadline = time.monotonic() + timeout
        msgs: dict[str, list[Msg]] = {msg_id: [] for msg_id in msg_ids}
        pending = set(msg_ids)
        while pending:
            msg = self.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
            parent = msg["parent_header"].get("msg_id")
            if parent not in pending:
                continue
            msgs[parent].append(msg)
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                pending.discard(parent)
        return msgs

    def finish(self, msg_id: str, started: float, timeout: float = TIMEOUT) -> Run:
        reply = self.reply_to(msg_id, timeout)
        run = Run(reply, self.iopub_of(msg_id, timeout))
        run.elapsed = time.monotonic() - started
        return run

    def execute(self, code: str, timeout: float = TIMEOUT, **kwargs: Any) -> Run:
        started = time.monotonic()
        msg_id = self.kc.execute(code, **kwargs)
        return self.finish(msg_id, started, timeout)

    def value(self, expression: str) -> str:
        """repr() of ``expression`` evaluated in the kernel (via user_expressions)."""
        run = self.execute("", user_expressions={"v": expression}, silent=True)
        result = run.reply["content"]["user_expressions"]["v"]
        assert result["status"] == "ok", result
        return str(result["data"]["text/plain"])

    def send_shell(
        self, msg_type: str, content: dict[str, Any], buffers: list[bytes] | None = None
    ) -> str:
        msg = self.kc.session.msg(msg_type, content)
        self.kc.session.send(self.kc.shell_channel.socket, msg, buffers=buffers)
        return str(msg["header"]["msg_id"])

    def start_cell(self, code: str, **kwargs: Any) -> str:
        """Send an execute_request and wait for its busy, without waiting for the reply."""
        msg_id = self.kc.execute(code, **kwargs)
        msgs: list[Msg] = []
        deadline = time.monotonic() + TIMEOUT
        while not any(m["msg_type"] == "execute_input" for m in msgs):
            msg = self.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") == msg_id:
                msgs.append(msg)
        time.sleep(0.3)  # let the worker get into the cell's code
        return msg_id
