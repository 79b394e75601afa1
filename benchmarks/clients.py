"""What the benchmarks that talk to kernels message by message share
(bench_debugger.py, bench_subshells.py): a kernel started with
``jupyter_client.KernelManager`` whose one client polls shell, iopub and
control together (:class:`PollingKernel`), the two kernels of a run
(:func:`cold_kernels`) and the command line (:func:`options`)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import zmq
from bench_jupyter import KERNELS, NAMES, TIMEOUT, BenchError, install_cold_kernelspec
from jupyter_client import KernelManager

Msg = dict[str, Any]
K = TypeVar("K", bound="PollingKernel")


class PollingKernel:
    """One kernel and a client polling shell, iopub and control together."""

    def __init__(self, kernel_name: str) -> None:
        self.km = KernelManager(kernel_name=kernel_name)
        self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=TIMEOUT)
        self.session = self.kc.session
        self.sockets = {
            "shell": self.kc.shell_channel.socket,
            "iopub": self.kc.iopub_channel.socket,
            "control": self.kc.control_channel.socket,
        }
        self.poller = zmq.Poller()
        for sock in self.sockets.values():
            self.poller.register(sock, zmq.POLLIN)
        #: Messages read while waiting for something else, put back with
        #: :meth:`unread` for the next :meth:`recv` (also one it interrupted).
        self._backlog: list[tuple[str, Msg]] = []

    def close(self) -> None:
        try:
            self.kc.stop_channels()
        finally:
            self.km.shutdown_kernel(now=True)

    def recv(self, deadline: float) -> Iterator[tuple[str, Msg]]:
        """(channel, message) as they arrive, until ``deadline`` (a
        ``time.perf_counter()``), then :class:`BenchError`."""
        while True:
            while self._backlog:
                yield self._backlog.pop(0)
            left = deadline - time.perf_counter()
            if left <= 0:
                raise BenchError("timed out waiting for the kernel")
            events = dict(self.poller.poll(left * 1000))
            for channel, sock in self.sockets.items():
                while sock in events:
                    while self._backlog:  # what a recv() in between put back
                        yield self._backlog.pop(0)
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    _, frames = self.session.feed_identities(frames)
                    yield channel, self.session.deserialize(frames)

    def unread(self, messages: list[tuple[str, Msg]]) -> None:
        """Put ``messages`` back, first, for the next :meth:`recv`."""
        self._backlog[:0] = messages

    def send(self, channel: str, msg_type: str, content: Msg, subshell: str | None = None) -> str:
        """Send a request (on ``subshell``, if given); its msg_id."""
        msg = self.session.msg(msg_type, content)
        if subshell is not None:
            msg["header"]["subshell_id"] = subshell
        self.session.send(self.sockets[channel], msg)
        return str(msg["header"]["msg_id"])


@contextmanager
def cold_kernels(kernel: Callable[[str], K], prefix: str) -> Iterator[dict[str, K]]:
    """``pyrepl3-cold`` (installed into a temporary prefix named after
    ``prefix``) and ipykernel's ``python3``, each started as ``kernel(name)``,
    by their names in ``NAMES``; all shut down at the end, on error too."""
    kernels: dict[str, K] = {}
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        install_cold_kernelspec(Path(tmp))
        try:
            for name in NAMES:
                kernels[name] = kernel(KERNELS[name])
            yield kernels
        finally:
            for started in kernels.values():
                try:
                    started.close()
                except Exception as exc:  # the others are still shut down
                    print(f"could not shut a kernel down: {exc}", file=sys.stderr)


def options(doc: str | None, argv: list[str] | None) -> argparse.Namespace:
    """The command line of such a benchmark: ``--quick`` (fewer repetitions)
    and ``--out DIR`` (default: ``results/`` next to this file)."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return parser.parse_args(argv)
