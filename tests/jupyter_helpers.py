"""What the Jupyter-client tests share: the kernelspec names and one
request's outcome (:class:`Run`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

KERNEL_NAME = "pyrepl3"
COLD_KERNEL_NAME = "pyrepl3-cold"
KERNEL_NAMES = [KERNEL_NAME, COLD_KERNEL_NAME]
TIMEOUT = 30.0

Msg = dict[str, Any]


def stop_daemon(runtime_dir: str | os.PathLike[str]) -> None:
    """Stop the manager daemon of ``runtime_dir``, if one runs (and its kernels)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pyrepl3_kernel.cli",
            "stop",
            "--runtime-dir",
            os.fspath(runtime_dir),
        ],
        capture_output=True,
        timeout=60,
    )


@dataclass
class Run:
    """One request: its shell reply and its iopub messages, in order (through idle)."""

    reply: Msg
    iopub: list[Msg] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def status(self) -> str:
        return str(self.reply["content"]["status"])

    @property
    def types(self) -> list[str]:
        return [m["msg_type"] for m in self.iopub]

    def text(self, name: str) -> str:
        return "".join(
            m["content"]["text"]
            for m in self.iopub
            if m["msg_type"] == "stream" and m["content"]["name"] == name
        )

    def stdout(self) -> str:
        return self.text("stdout")

    def stderr(self) -> str:
        return self.text("stderr")

    def errors(self) -> list[Msg]:
        return [m["content"] for m in self.iopub if m["msg_type"] == "error"]

    def error(self) -> Msg:
        errors = self.errors()
        assert len(errors) == 1, (self.types, errors)
        return errors[0]

    def index(self, msg_type: str, predicate: Callable[[Msg], bool] = lambda c: True) -> int:
        """Position of the first iopub message of ``msg_type`` matching ``predicate``."""
        for i, m in enumerate(self.iopub):
            if m["msg_type"] == msg_type and predicate(m["content"]):
                return i
        raise AssertionError(f"no {msg_type} in {self.types}")

    def merged(self) -> list[tuple[str, Any]]:
        """(msg_type, content) of the iopub messages, consecutive stream
        messages of one stream joined, as frontends show them (a print may
        arrive in more than one message)."""
        out: list[tuple[str, Any]] = []
        for m in self.iopub:
            content = m["content"]
            if (
                m["msg_type"] == "stream"
                and out
                and out[-1][0] == "stream"
                and out[-1][1]["name"] == content["name"]
            ):
                out[-1] = (
                    "stream",
                    {"name": content["name"], "text": out[-1][1]["text"] + content["text"]},
                )
            else:
                out.append((m["msg_type"], content))
        return out
