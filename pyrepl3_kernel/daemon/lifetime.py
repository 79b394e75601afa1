"""When the manager daemon exits (docs/daemon.md, "Lifecycle").

The daemon stops when its runtime directory, lock or socket is removed or
replaced (no client can reach it any more: see the server's
``_unreachable``); or when nothing is leased and the process that started it
is gone, if that was a Jupyter server or the runtime directory is not the
user's usual one; or when nothing was leased for ``idle_timeout`` seconds.
This module holds the last two: :class:`ExitPolicy` and the
:class:`Starter` it watches.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from ..processes import alive
from .client import STARTER_ENV

log = logging.getLogger("pyrepl3.daemon")


def is_usual_runtime_dir(path: os.PathLike[str]) -> bool:
    """Whether ``path`` is the runtime directory Jupyter uses when
    ``JUPYTER_RUNTIME_DIR`` does not choose another (``<data dir>/runtime``)."""
    from jupyter_core.paths import jupyter_data_dir

    usual = os.path.join(jupyter_data_dir(), "runtime")
    try:
        return os.path.samefile(usual, path)
    except OSError:
        return False


@dataclass
class Starter:
    """The process that started the daemon (a provisioner's), as the exit
    policy sees it: gone when its process ended, or, for a Jupyter server,
    when its info file (``jpserver-PID.json``, kept in its runtime
    directory while it runs) was removed: an in-process server (a test
    suite's) stops while its process lives on."""

    pid: int
    started: float | None
    server_info_file: str | None = None
    is_server: bool = False
    gone: bool = False

    @classmethod
    def from_env(cls, value: str | None) -> Starter | None:
        """From :data:`STARTER_ENV` (``{"pid", "started", "server_info_file"}``)."""
        if not value:
            return None
        try:
            fields = json.loads(value)
            pid = int(fields["pid"])
            started = float(fields["started"]) if fields.get("started") else None
            info_file = fields.get("server_info_file")
        except (ValueError, TypeError, KeyError):
            log.warning("ignoring %s=%r (not the JSON a provisioner sets)", STARTER_ENV, value)
            return None
        if pid <= 0:
            return None
        return cls(pid, started, str(info_file) if info_file else None, bool(info_file))

    def check(self, runtime_dir: os.PathLike[str]) -> bool:
        """Whether it is gone now."""
        if self.server_info_file:
            info_files = [self.server_info_file]
        else:  # a server that had not written its file yet when it started us
            info_files = [
                os.path.join(runtime_dir, f"{prefix}-{self.pid}.json")
                for prefix in ("jpserver", "nbserver")
            ]
        serving = any(os.path.exists(f) for f in info_files)
        self.is_server = self.is_server or serving
        self.gone = not alive(self.pid, self.started) or (self.is_server and not serving)
        return self.gone

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid, "server": self.is_server, "gone": self.gone}


class ExitPolicy:
    """Whether a daemon that is still reachable should stop: its starter is
    gone (see the module docstring), or it was idle for ``idle_timeout``
    seconds. The daemon calls :meth:`touch` on every request and every lease
    that ends."""

    def __init__(
        self, runtime_dir: os.PathLike[str], idle_timeout: float, starter: Starter | None
    ) -> None:
        self.runtime_dir = runtime_dir
        self.idle_timeout = idle_timeout
        #: The process that started this daemon (a provisioner's), if any.
        self.starter = starter
        #: Whether ``runtime_dir`` is the user's usual one: set when the daemon starts.
        self.usual_runtime_dir = False
        self.last_activity = time.monotonic()

    def prime(self) -> None:
        """Check the starter once now: the daemon calls this as it starts
        serving, while its fork server starts, so that the import the
        checks need (psutil: tens of milliseconds) is not left to its first
        lease (which checks its owner)."""
        if self.starter is not None:
            self.starter.check(self.runtime_dir)
        else:
            alive(os.getpid())

    def touch(self) -> None:
        """Something happened: the idle time starts again."""
        self.last_activity = time.monotonic()

    def why_exit(self, busy: bool) -> str | None:
        """Why the daemon should stop now, or None to keep serving. ``busy``:
        something is leased or a request is being served."""
        starter = self.starter
        starter_gone = starter is not None and starter.check(self.runtime_dir)
        if busy:
            return None
        if starter is not None and starter_gone:
            if starter.is_server:
                return (
                    f"the Jupyter server {starter.pid} that started it is gone, "
                    "and nothing is leased"
                )
            if not self.usual_runtime_dir:
                return (
                    f"the process {starter.pid} that started it is gone, nothing is leased, "
                    f"and {self.runtime_dir} is not the usual runtime directory"
                )
        idle = time.monotonic() - self.last_activity
        if idle > self.idle_timeout:
            return f"no leases for {idle:.0f} s"
        return None

    def describe(self) -> dict[str, Any]:
        """What the policy sees, for ``status`` (docs/daemon.md, "Lifecycle")."""
        return {
            "idle_timeout_s": self.idle_timeout,
            "usual_runtime_dir": self.usual_runtime_dir,
            "starter": None if self.starter is None else self.starter.describe(),
        }
