"""The argv path, warm: ``python -m pyrepl3_kernel -f CONN`` hands its kernel
to the per-user manager daemon.

A client that runs the kernelspec's argv itself (VS Code ignores
provisioners) gets this process. Instead of booting a gateway and a worker
from scratch, it asks the daemon (starting one when none answers, as the
provisioner does) to serve the kernel on the connection file's ports and key
with a worker forked from the daemon's warm fork server, and then stays the
process the client sees until the kernel ends:

- SIGINT interrupts the kernel; SIGTERM ends it (exit status 0, as the
  standalone kernel);
- a shutdown request ends the kernel and this process (exit status 0);
- the process named in ``JPY_PARENT_PID`` (the client) ending ends it;
- the daemon dying ends it with exit status 1 (the kernel died with it);
- this process dying (even by SIGKILL) ends the kernel: the daemon watches it.

When the daemon cannot be used the kernel starts standalone, as before, with
a warning on stderr. ``PYREPL3_HANDOFF=0`` skips the daemon. This module
imports only the daemon's client: the launch stays as light as possible.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from .daemon.client import (
    DAEMON_PROTOCOL_VERSION,
    PREPARE_ENV,
    STARTER_ENV,
    DaemonClient,
    DaemonError,
    DaemonPaths,
    DaemonUnavailable,
)
from .errors import Pyrepl3Error

#: Set to ``0`` to always start standalone.
HANDOFF_ENV = "PYREPL3_HANDOFF"
#: How long a daemon started here may take to answer.
DAEMON_START_TIMEOUT = 30.0
#: Seconds between checks of the client process while the kernel runs.
PARENT_CHECK_S = 1.0


class _Terminate(Pyrepl3Error):
    """SIGTERM arrived: end the kernel and exit 0 (raised by the signal handler)."""


def _warn(message: str) -> None:
    print(f"[pyrepl3] WARNING {message}", file=sys.stderr, flush=True)


def _daemon_paths() -> DaemonPaths:
    from jupyter_core.paths import jupyter_runtime_dir

    # Absolute: the daemon runs elsewhere (in /).
    return DaemonPaths.default(os.path.abspath(jupyter_runtime_dir()))


def _start_daemon(paths: DaemonPaths, starter: int) -> int:
    """Start a daemon in the background, as the provisioner does; its pid.
    ``starter``: the process it counts as its starter (docs/daemon.md)."""
    from .processes import started_at

    paths.log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    cmd = [
        sys.executable,
        "-m",
        "pyrepl3_kernel.cli",
        "serve",
        "--runtime-dir",
        os.fspath(paths.lock.parent),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("JPY_PARENT_PID", "PYTHONEXECUTABLE")}
    env[STARTER_ENV] = json.dumps(
        {"pid": starter, "started": started_at(starter), "server_info_file": None}
    )
    env[PREPARE_ENV] = json.dumps({"warmup_code": ""})
    env["PYREPL3_DAEMON_LOG"] = os.fspath(paths.log)
    # Through a shell that exits at once: the daemon is reparented to init.
    launcher = 'nohup "$@" >>"$PYREPL3_DAEMON_LOG" 2>&1 </dev/null & echo $!'
    done = subprocess.run(
        ["/bin/sh", "-c", launcher, "sh", *cmd],
        cwd="/",
        env=env,
        start_new_session=True,
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    return int(done.stdout.strip())


def ensure_daemon(client: DaemonClient, starter: int | None = None) -> None:
    """A daemon answers on ``client``'s socket (one is started if none
    does, counting ``starter`` as its starter: by default the client that
    runs this argv, since this process ends with its kernel and the next
    launch should find the daemon warm); raises DaemonUnavailable or
    DaemonError (another protocol)."""
    from .processes import alive

    hello = client.ping()
    if hello is None:
        pid = _start_daemon(client.paths, starter or _parent_pid() or os.getppid())
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while hello is None and time.monotonic() < deadline:
            time.sleep(0.02)
            hello = client.ping()
            if hello is None and not alive(pid):
                hello = client.ping()  # it lost the race to another daemon?
                if hello is None:
                    raise DaemonUnavailable(f"the daemon exited at start (see {client.paths.log})")
        if hello is None:
            raise DaemonUnavailable(
                f"the daemon did not come up within {DAEMON_START_TIMEOUT:.0f} s "
                f"(see {client.paths.log})"
            )
    if hello.get("protocol") != DAEMON_PROTOCOL_VERSION:
        raise DaemonError(
            "unsupported_version",
            f"the running daemon speaks protocol {hello.get('protocol')}, "
            f"this kernel {DAEMON_PROTOCOL_VERSION}; stop it with `pyrepl3-kernel stop`",
        )


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
    different = confinement_difference(_parent_pid() or os.getppid())
    if different is not None:
        _warn(f"the kernel is confined by its launcher ({different}); starting it standalone")
        return None
    try:
        client = DaemonClient(_daemon_paths(), timeout=130.0)
        ensure_daemon(client)
        daemon_pid = int(client.call("hello", timeout=10.0)["pid"])
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
        )
    except (DaemonUnavailable, DaemonError, OSError, ValueError) as exc:
        _warn(f"the manager daemon cannot be used ({exc}); starting the kernel standalone")
        return None
    return _stay(client, str(reply["lease_id"]))


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
    parent = _parent_pid()
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


def prepare_daemon(kernel_name: str = "pyrepl3") -> None:
    """Have the daemon running with the fork server of ``kernel_name``'s
    interpreter and warm-up code ready (``pyrepl3-kernel gateway`` calls
    this at start, so its first kernel is forked). Problems are warnings:
    kernels then start as they would have."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        spec = KernelSpecManager().get_kernel_spec(kernel_name)
        provisioner = spec.metadata.get("kernel_provisioner") or {}
        config = provisioner.get("config") or {}
        warmup_code = str(config.get("warmup_code") or "")
        python = spec.argv[0] if spec.argv and os.path.isabs(spec.argv[0]) else sys.executable
        client = DaemonClient(_daemon_paths(), timeout=130.0)
        ensure_daemon(client, starter=os.getpid())
        fields: dict[str, Any] = {
            "python": python,
            "env": dict(os.environ),
            "warmup_code": warmup_code,
        }
        if provisioner:  # the kernelspec's pool too: its first kernel takes a waiting worker
            fields["kernel_name"] = kernel_name
            fields["pool"] = {
                "size": int(config.get("pool_size", 1)),
                "max_kernels": int(config.get("max_kernels", 256)),
            }
        reply = client.call("prepare", **fields)
        from . import provisioner as _loaded  # noqa: F401  (the server's first launch loads it)
    except Exception as exc:
        _warn(f"could not prepare the manager daemon's fork server: {exc}")
        return
    state = reply.get("fork_server", {})
    if state.get("state") != "ready":
        _warn(f"no fork server for {kernel_name}: {state.get('reason') or state.get('state')}")


def _parent_pid() -> int:
    try:
        parent = int(os.environ.get("JPY_PARENT_PID", "0"))
    except ValueError:
        return 0
    return parent if parent > 1 else 0


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
