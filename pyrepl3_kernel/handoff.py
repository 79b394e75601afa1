"""The argv path, warm: ``python -m pyrepl3_kernel -f CONN`` hands its kernel
to the per-user manager daemon.

A client that runs the kernelspec's argv itself (VS Code ignores
provisioners) gets this process. Instead of booting a gateway and a worker
from scratch, it asks the daemon to serve the kernel on the connection
file's ports and key with a worker forked from the daemon's warm fork
server, and then stays the process the client sees until the kernel ends:

- SIGINT interrupts the kernel; SIGTERM ends it (exit status 0, as the
  standalone kernel);
- a shutdown request ends the kernel and this process (exit status 0);
- the process named in ``JPY_PARENT_PID`` (the client) ending ends it;
- the daemon dying ends it with exit status 1 (the kernel died with it);
- this process dying (even by SIGKILL) ends the kernel: the daemon watches it.

The first launch (no daemon answers) is never slower than a standalone
start: it starts the daemon in the background, detached, and runs its own
kernel standalone at once; the daemon prepares its fork server meanwhile,
and the launches after it are handed over. A daemon whose fork server is
still starting is not waited for longer than :data:`FORK_SERVER_WAIT_S`
(the kernel starts standalone, quietly). When the daemon cannot be used the
kernel starts standalone with a warning on stderr. ``PYREPL3_HANDOFF=0``
skips the daemon. This module imports only the daemon's client: the launch
stays as light as possible.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

from .daemon.client import DaemonClient, DaemonError, DaemonPaths, DaemonUnavailable
from .daemonstart import (
    check_protocol,
    daemon_paths,
    daemon_starting,
    ensure_daemon,
    mark_starting,
    parent_pid,
    start_daemon,
)
from .errors import Pyrepl3Error

__all__ = ["confinement_difference", "ensure_daemon", "hand_off", "main"]
#: The daemon of this process's Jupyter runtime directory (kept here for
#: the modules that looked it up in this one).
_daemon_paths = daemon_paths

#: Set to ``0`` to always start standalone.
HANDOFF_ENV = "PYREPL3_HANDOFF"
#: How long the argv path lets the daemon wait for a fork server that is
#: starting before it starts the kernel standalone instead (less than a
#: standalone start takes: the first launch is never slower than that).
FORK_SERVER_WAIT_S = 0.25
#: Seconds between checks of the client process while the kernel runs.
PARENT_CHECK_S = 1.0


class _Terminate(Pyrepl3Error):
    """SIGTERM arrived: end the kernel and exit 0 (raised by the signal handler)."""


def _warn(message: str) -> None:
    print(f"[pyrepl3] WARNING {message}", file=sys.stderr, flush=True)


def confinement_difference(pid: int) -> str | None:
    """How this process is confined unlike process ``pid`` (the daemon), or
    None. A launcher that wraps the argv in a cgroup, namespace, resource
    limit, nice level or CPU set means it for the kernel: a worker forked
    in the daemon would escape it."""
    import resource

    for name in ("cgroup",):
        try:
            with open("/proc/self/" + name) as a, open(f"/proc/{pid}/{name}") as b:
                if a.read() != b.read():
                    return name
        except OSError:
            pass
    for ns in ("mnt", "net", "pid", "user", "ipc", "uts"):
        try:
            if os.readlink(f"/proc/self/ns/{ns}") != os.readlink(f"/proc/{pid}/ns/{ns}"):
                return f"{ns} namespace"
        except OSError:
            pass
    for limit in ("RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_CPU", "RLIMIT_NOFILE", "RLIMIT_NPROC"):
        res = getattr(resource, limit, None)
        if res is None:
            continue
        try:
            if resource.getrlimit(res) != resource.prlimit(pid, res):
                return limit
        except (OSError, ValueError):
            pass
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) != os.getpriority(os.PRIO_PROCESS, pid):
            return "nice level"
        if os.sched_getaffinity(0) != os.sched_getaffinity(pid):
            return "CPU affinity"
    except OSError:
        pass
    return None


def hand_off(connection_file: str, ipython_options: list[str]) -> int | None:
    """Serve the kernel of ``connection_file`` from the daemon; the exit
    status once it ended, or None if the daemon cannot be used (the caller
    starts the kernel standalone)."""
    try:
        with open(connection_file) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None  # the standalone kernel reports it
    if not isinstance(info, dict) or info.get("transport", "tcp") != "tcp":
        return None
    # A launcher that confined this process (a cgroup, a namespace, limits)
    # means it for the kernel: a worker of the daemon would escape it, and a
    # daemon started from here would serve every later kernel confined so.
    different = confinement_difference(parent_pid() or os.getppid())
    if different is not None:
        _warn(f"the kernel is confined by its launcher ({different}); starting it standalone")
        return None
    try:
        client = DaemonClient(daemon_paths(), timeout=130.0)
        hello = client.ping()
        if hello is None:
            # The first launch: this kernel starts standalone at once (as
            # fast as without a daemon), the daemon and its fork server in
            # the background, for the launches after it.
            _start_in_background(client.paths, str(info.get("kernel_name") or "pyrepl3"))
            return None
        check_protocol(hello)
        daemon_pid = int(hello["pid"])
        different = confinement_difference(daemon_pid)
        if different is not None:
            _warn(
                f"the kernel runs confined unlike the manager daemon ({different}); "
                "starting it standalone"
            )
            return None
        reply = client.call(
            "handoff",
            connection_info=info,
            kernel_name=str(info.get("kernel_name") or "pyrepl3"),
            python=sys.executable,
            env=dict(os.environ),
            cwd=os.getcwd(),
            owner_pid=os.getpid(),
            ipython_options=ipython_options,
            fork_server_wait_s=FORK_SERVER_WAIT_S,
        )
    except DaemonError as exc:
        if exc.code != "warming":  # its fork server is starting: standalone is faster
            _warn(f"the manager daemon cannot be used ({exc}); starting the kernel standalone")
        return None
    except (DaemonUnavailable, OSError, ValueError) as exc:
        _warn(f"the manager daemon cannot be used ({exc}); starting the kernel standalone")
        return None
    return _stay(client, str(reply["lease_id"]))


def _start_in_background(paths: DaemonPaths, kernel_name: str) -> None:
    """Start the daemon (unless one is starting) without waiting for it. It
    waits (``startwait.py``, niced) until this kernel has started before it
    starts: its start and its fork server's would take CPU time from this
    one's on a small machine. A failure is a warning (the kernel
    runs standalone either way)."""
    try:
        paths.log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if daemon_starting(paths):
            return
        # It prepares this kernelspec's pool too: the next launch is leased warm.
        pid = start_daemon(
            paths,
            starter_pid=parent_pid() or os.getppid(),
            after_start_of=os.getpid(),
            kernel_name=kernel_name,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        _warn(f"the manager daemon cannot be used ({exc}); starting the kernel standalone")
        return
    mark_starting(paths, pid)


def _stay(client: DaemonClient, lease_id: str) -> int:
    """Be the kernel's process until its lease ends."""

    def interrupt(signum: int, frame: Any) -> None:
        try:
            client.call("signal", timeout=10.0, lease_id=lease_id, signum=int(signal.SIGINT))
        except (DaemonUnavailable, DaemonError) as exc:
            _warn(f"could not interrupt the kernel: {exc}")

    def terminate(signum: int, frame: Any) -> None:
        raise _Terminate

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, terminate)
    parent = parent_pid()
    launched_by = os.getppid()
    from .processes import alive

    try:
        while True:
            try:
                ended = client.call(
                    "watch", timeout=PARENT_CHECK_S + 10, lease_id=lease_id, wait_s=PARENT_CHECK_S
                )
            except DaemonUnavailable as exc:
                _warn(f"the manager daemon is gone ({exc}); the kernel ended with it")
                return 1
            except DaemonError as exc:
                _warn(f"the manager daemon refused to watch the kernel: {exc}")
                return 1
            if ended.get("ended"):
                return 0
            if parent and (not alive(parent) or os.getppid() != launched_by):
                _warn(f"parent process {parent} is gone; shutting down")
                break
    except (_Terminate, KeyboardInterrupt):
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        client.call("release", timeout=30.0, lease_id=lease_id)
    except (DaemonUnavailable, DaemonError):
        pass
    return 0


def main(argv: list[str] | None = None) -> None:
    """``python -m pyrepl3_kernel``: hand the kernel to the daemon, or run it
    standalone (``gateway/standalone.py``) when that cannot be done."""
    args = sys.argv[1:] if argv is None else argv
    # Read and dropped: a worker's environment is the launch's, as without it.
    use_daemon = os.environ.pop(HANDOFF_ENV, "1") != "0"
    connection_file, extra = _connection_file(args)
    if connection_file is not None and use_daemon:
        options: list[str] = []
        unknown: list[str] = []
        if extra:  # rare (VS Code passes none): not worth the import otherwise
            from .gateway.standalone import ipython_options

            options, unknown = ipython_options(extra)
        if not unknown:
            status = hand_off(connection_file, options)
            if status is not None:
                sys.exit(status)
    from .gateway.standalone import main as standalone_main

    standalone_main(args)


def _connection_file(args: list[str]) -> tuple[str | None, list[str]]:
    """``-f FILE`` / ``--connection-file[=]FILE`` and the other arguments
    (``--log-level L`` is the standalone kernel's own)."""
    found: str | None = None
    rest: list[str] = []
    it = iter(args)
    for arg in it:
        if arg in ("-f", "--connection-file"):
            found = next(it, None)
        elif arg.startswith("--connection-file="):
            found = arg.split("=", 1)[1]
        elif arg == "--log-level":
            next(it, None)
        elif arg.startswith("--log-level="):
            pass
        else:
            rest.append(arg)
    return found, rest
