"""Starting the per-user manager daemon, and having it ready before the
first kernel (docs/daemon.md, "The first launch").

- :func:`start_daemon`: a daemon started in the background, detached (the
  provisioner, the argv path and ``pyrepl3-kernel gateway`` all start it so);
- :func:`ensure_daemon`: one answers (started and waited for if none does);
- :func:`daemon_starting`: one serves or is on its way (a first launch that
  started one in the background wrote its pid next to the lock), so that
  the launches meanwhile do not start more;
- a daemon started by a first argv launch waits (``startwait.py``) until
  that launch's standalone kernel has started before it starts: on a small
  machine the two starts would slow each other down;
- :func:`prepare_daemon`: ``pyrepl3-kernel gateway`` has the daemon, its
  fork server and the kernelspec's pool ready, and its own process's share
  of a kernel start done once, before it listens: its first kernel is as
  fast as the next ones.

Light to import (the argv path imports it on every launch).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
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

#: How long a daemon started here may take to answer when it is waited for.
DAEMON_START_TIMEOUT = 30.0
#: How long ``pyrepl3-kernel gateway`` waits for its pool's first worker.
POOL_READY_TIMEOUT = 30.0


def _warn(message: str) -> None:
    print(f"[pyrepl3] WARNING {message}", file=sys.stderr, flush=True)


def daemon_paths() -> DaemonPaths:
    """The daemon of this process's Jupyter runtime directory."""
    from jupyter_core.paths import jupyter_runtime_dir

    # Absolute: the daemon runs elsewhere (in /).
    return DaemonPaths.default(os.path.abspath(jupyter_runtime_dir()))


def start_daemon(
    paths: DaemonPaths,
    *,
    starter_pid: int,
    python: str | None = None,
    server_info_file: str | None = None,
    warmup_code: str = "",
    idle_timeout: float | None = None,
    after_start_of: int | None = None,
    kernel_name: str | None = None,
) -> int:
    """Start a manager daemon for ``paths`` in the background, detached (its
    pid): what the argv path, ``pyrepl3-kernel gateway`` and the provisioner
    do when none answers. ``starter_pid``: the process it counts as its
    starter, with ``server_info_file`` if that is a Jupyter server
    (docs/daemon.md, "Lifecycle"); ``warmup_code``: the fork server's it
    prepares at start; ``after_start_of``: a process whose kernel start the
    daemon lets finish first (``startwait.py``); ``kernel_name``: a
    kernelspec whose pool (of the daemon's own environment) it prepares too. Raises OSError or
    CalledProcessError."""
    paths.log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    cmd = [
        python or sys.executable,
        "-m",
        "pyrepl3_kernel.cli",
        "serve",
        "--runtime-dir",
        os.fspath(paths.lock.parent),
    ]
    if idle_timeout is not None:
        cmd += ["--idle-timeout", str(idle_timeout)]
    env = {k: v for k, v in os.environ.items() if k not in ("JPY_PARENT_PID", "PYTHONEXECUTABLE")}
    env[STARTER_ENV] = json.dumps(
        {
            "pid": starter_pid,
            "started": _started_at(starter_pid),
            "server_info_file": server_info_file,
        }
    )
    prepare: dict[str, str] = {"warmup_code": warmup_code}
    if kernel_name is not None:
        prepare["kernel_name"] = kernel_name
    env[PREPARE_ENV] = json.dumps(prepare)
    env["PYREPL3_DAEMON_LOG"] = os.fspath(paths.log)
    # Through a shell that exits at once: the daemon is reparented to init
    # and never becomes a zombie of this (possibly long-lived) process.
    launcher = 'nohup "$@" >>"$PYREPL3_DAEMON_LOG" 2>&1 </dev/null & echo $!'
    if after_start_of is not None:
        # First the start-up wait, niced and without site-packages (a few
        # milliseconds of CPU), then the daemon, as the same process.
        from . import startwait

        env["PYREPL3_START_WAIT"] = startwait.__file__
        env["PYREPL3_START_OF"] = str(after_start_of)
        launcher = (
            '("$1" -S "$PYREPL3_START_WAIT" "$PYREPL3_START_OF"; exec nohup "$@") '
            '>>"$PYREPL3_DAEMON_LOG" 2>&1 </dev/null & echo $!'
        )
    done = subprocess.run(
        ["/bin/sh", "-c", launcher, "sh", *cmd],
        cwd="/",  # a daemon must not keep its first client's directory busy
        env=env,
        start_new_session=True,
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    return int(done.stdout.strip())


def _started_at(pid: int) -> float | None:
    """``processes.started_at`` from /proc, without importing psutil (tens
    of milliseconds a first launch would wait for)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        from .processes import started_at

        return started_at(pid)


def daemon_starting(paths: DaemonPaths) -> bool:
    """Whether a daemon of ``paths`` serves or is on its way: one holds its
    lock (it takes the lock before it listens), or a launch started one that
    is still waiting to boot (:func:`starting_file`). Read, not locked: a
    daemon taking the lock meanwhile must not find it held."""
    return any(_daemon_named_in(path) for path in (paths.lock, starting_file(paths)))


def _daemon_named_in(path: os.PathLike[str] | str) -> tuple[int, bytes] | None:
    """The pid written in ``path`` and its program, if it is a daemon's
    (``cli serve``: the daemon, or the shell that will exec it)."""
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except (OSError, ValueError):
        return None
    if b"pyrepl3_kernel.cli" in args and b"serve" in args:
        return pid, args[0]
    return None


def stop_starting(paths: DaemonPaths, timeout: float = 15.0) -> int | None:
    """For ``pyrepl3-kernel stop`` when no daemon answers: stop one that is
    on its way (:func:`daemon_starting`) so that none comes up after; its
    pid, or None if there is none. One still waiting to boot (its shell) is
    ended with its process group; one booting is asked to shut down as soon
    as it answers (within ``timeout``)."""
    import signal

    for path in (starting_file(paths), paths.lock):
        found = _daemon_named_in(path)
        if found is None:
            continue
        pid, program = found
        if os.path.basename(program) in (b"sh", b"dash", b"bash"):  # waiting to boot
            with contextlib.suppress(OSError):
                group = os.getpgid(pid)
                if group != os.getpgid(0):
                    os.killpg(group, signal.SIGTERM)
            return pid
        client = DaemonClient(paths, timeout=10)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            if client.ping() is not None:
                with contextlib.suppress(DaemonUnavailable, DaemonError):
                    client.call("shutdown")
                break
            time.sleep(0.05)
        return pid
    return None


def starting_file(paths: DaemonPaths) -> Path:
    """Where a launch that starts the daemon in the background writes its
    pid (its shell's while it waits): later launches start no other."""
    return paths.lock.with_name("pyrepl3-daemon.starting")


def mark_starting(paths: DaemonPaths, pid: int) -> None:
    with contextlib.suppress(OSError):
        path = starting_file(paths)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        tmp.write_text(f"{pid}\n")
        os.replace(tmp, path)


def ensure_daemon(client: DaemonClient, starter: int | None = None) -> None:
    """A daemon answers on ``client``'s socket (one is started if none
    does, counting ``starter`` as its starter: by default the client that
    runs this argv, since this process ends with its kernel and the next
    launch should find the daemon warm); raises DaemonUnavailable or
    DaemonError (another protocol)."""
    from .processes import alive

    hello = client.ping()
    if hello is None:
        pid = start_daemon(client.paths, starter_pid=starter or parent_pid() or os.getppid())
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
    check_protocol(hello)


def check_protocol(hello: dict[str, Any]) -> None:
    if hello.get("protocol") != DAEMON_PROTOCOL_VERSION:
        raise DaemonError(
            "unsupported_version",
            f"the running daemon speaks protocol {hello.get('protocol')}, "
            f"this kernel {DAEMON_PROTOCOL_VERSION}; stop it with `pyrepl3-kernel stop`",
        )


def prepare_daemon(kernel_name: str = "pyrepl3") -> dict[str, Any]:
    """Have the daemon running with the fork server of ``kernel_name``'s
    interpreter and warm-up code ready, and the kernelspec's pool holding a
    worker; and this process's own first-kernel work done (``pyrepl3-kernel
    gateway`` calls this before it listens, so its first kernel is as fast
    as the next ones). What it found: ``{"fork_server": {...}, "pool":
    {...}}``. Problems are warnings: kernels then start as they would have."""
    reply: dict[str, Any] = {}
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        spec = KernelSpecManager().get_kernel_spec(kernel_name)
        provisioner = spec.metadata.get("kernel_provisioner") or {}
        config = provisioner.get("config") or {}
        warmup_code = str(config.get("warmup_code") or "")
        python = spec.argv[0] if spec.argv and os.path.isabs(spec.argv[0]) else sys.executable
        client = DaemonClient(daemon_paths(), timeout=130.0)
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
        _warm_this_process()
        if provisioner and fields["pool"]["size"] > 0:
            reply["pool"] = _pool_ready(client, kernel_name)
    except Exception as exc:
        _warn(f"could not prepare the manager daemon's fork server: {exc}")
        return reply
    state = reply.get("fork_server", {})
    if state.get("state") != "ready":
        _warn(f"no fork server for {kernel_name}: {state.get('reason') or state.get('state')}")
    return reply


def _warm_this_process() -> None:
    """What a Jupyter server's first kernel start does once and the next
    ones find done: load our provisioner (its entry point), and the local
    addresses jupyter_client picks the kernel's IP from (which imports
    psutil and lists the interfaces: most of the difference measured)."""
    from jupyter_client import localinterfaces
    from jupyter_client.provisioning.factory import KernelProvisionerFactory

    from . import provisioner  # noqa: F401

    localinterfaces.localhost()
    KernelProvisionerFactory.instance()


def warm_server(app: Any, kernel_name: str = "pyrepl3") -> None:
    """A Jupyter server's share of its first kernel start, done before it
    listens (``pyrepl3-kernel gateway``): a kernel manager made as for a
    kernel (no kernel is started) with its event schemas registered (YAML
    and JSON schema, first used), its kernelspec and session loaded, its
    restarter made, and a first connection on the shared ZMQ context. Best
    effort: a server that differs is left as it is."""
    try:
        manager = app.kernel_manager
        km = manager.kernel_manager_factory(
            connection_file="", parent=manager, log=manager.log, kernel_name=kernel_name
        )
        km.event_logger  # noqa: B018  (registers the kernel action schemas)
        km.kernel_spec  # noqa: B018
        km.session  # noqa: B018
        km.restarter_class(kernel_manager=km, loop=km.loop, parent=km, log=km.log)
        # The shared ZMQ context's first connection (its I/O thread, the TCP
        # machinery): tens of milliseconds of the first kernel's channels.
        import zmq

        server, client = km.context.socket(zmq.ROUTER), km.context.socket(zmq.DEALER)
        try:
            port = server.bind_to_random_port("tcp://127.0.0.1")
            client.connect(f"tcp://127.0.0.1:{port}")
        finally:
            client.close(linger=0)
            server.close(linger=0)
    except Exception as exc:
        app.log.debug("pyrepl3: could not warm the kernel path up: %s", exc)


def _pool_ready(client: DaemonClient, kernel_name: str) -> dict[str, Any]:
    """The kernelspec's pool once it holds a worker (the first lease takes
    it), or as it is after :data:`POOL_READY_TIMEOUT`."""
    deadline = time.monotonic() + POOL_READY_TIMEOUT
    while True:
        pools = [p for p in client.call("status")["pools"] if p["kernel_name"] == kernel_name]
        if any(p["idle"] >= 1 for p in pools) or time.monotonic() > deadline:
            return pools[0] if pools else {}
        time.sleep(0.02)


def parent_pid() -> int:
    """The launching client's pid (``JPY_PARENT_PID``), 0 if unset or bogus."""
    try:
        parent = int(os.environ.get("JPY_PARENT_PID", "0"))
    except ValueError:
        return 0
    return parent if parent > 1 else 0
