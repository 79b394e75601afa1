"""Command line interface: ``pyrepl3-kernel <command> ...``.

Each subcommand is a single function registered with :func:`subcommand`; its
docstring is the help text and its arguments are declared in the decorator::

    @subcommand("status", arg("--json", action="store_true", help="..."))
    def cmd_status(args: argparse.Namespace) -> int:
        \"\"\"Show the state of running kernels.\"\"\"
        ...
        return 0

Handlers return the process exit code. Keep heavy imports inside handlers so
that ``pyrepl3-kernel --version`` and ``--help`` stay fast.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyrepl3_kernel._version import __version__
from pyrepl3_kernel.kernelspec import (
    DEFAULT_DISPLAY_NAME,
    RESOURCES_DIR,
    write_kernel_spec,
)

PROG = "pyrepl3-kernel"
DEFAULT_KERNEL_NAME = "pyrepl3"

Handler = Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------
# Subcommand registry
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Arg:
    """Positional and keyword arguments for ``ArgumentParser.add_argument``."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Exclusive:
    """A mutually exclusive group of :class:`Arg`."""

    args: tuple[Arg, ...]
    required: bool = False


def arg(*flags: str, **kwargs: Any) -> Arg:
    return Arg(flags, kwargs)


def exclusive(*args: Arg, required: bool = False) -> Exclusive:
    return Exclusive(args, required)


@dataclass(frozen=True)
class Subcommand:
    handler: Handler
    arguments: tuple[Arg | Exclusive, ...]

    @property
    def description(self) -> str:
        return inspect.cleandoc(self.handler.__doc__ or "")

    @property
    def help(self) -> str:
        return self.description.split("\n", 1)[0]


#: subcommand name -> handler and its argument declarations, in CLI order.
SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, *arguments: Arg | Exclusive) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of ``pyrepl3-kernel NAME``."""

    def register(handler: Handler) -> Handler:
        if name in SUBCOMMANDS:
            raise ValueError(f"subcommand {name!r} registered twice")
        SUBCOMMANDS[name] = Subcommand(handler, arguments)
        return handler

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="PyREPL3: a Jupyter kernel that runs user code in an isolated worker process.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for name, spec in SUBCOMMANDS.items():
        p = sub.add_parser(
            name,
            help=spec.help,
            description=spec.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for item in spec.arguments:
            if isinstance(item, Exclusive):
                group = p.add_mutually_exclusive_group(required=item.required)
                for a in item.args:
                    group.add_argument(*a.flags, **a.kwargs)
            else:
                p.add_argument(*item.flags, **item.kwargs)
        p.set_defaults(handler=spec.handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _run(argv)
        finally:
            # Output to a pipe is buffered: a reader that has gone shows up
            # here rather than as a traceback at interpreter exit.
            sys.stdout.flush()
    except BrokenPipeError:
        # `pyrepl3-kernel status | head`: the reader has what it wanted.
        # Point stdout at /dev/null so the exit does not try to flush again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13  # as a program killed by SIGPIPE


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    # `gateway` hands everything after it to jupyter_server, options included.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "handler", None) is not cmd_gateway:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.server_args = [*extra, *args.server_args]
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    return handler(args)


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


#: Warm workers one kernelspec may ask for: the manager daemon refuses a
#: lease whose pool size is outside this range (daemon/server.py).
POOL_SIZE_RANGE = (0, 64)


def _pool_size(text: str) -> int:
    lo, hi = POOL_SIZE_RANGE
    try:
        value: int | None = int(text)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise argparse.ArgumentTypeError(
            f"expected a number of warm workers from {lo} to {hi}, got {text!r}"
        )
    return value


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


# --------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------


@subcommand(
    "install",
    exclusive(
        arg("--user", action="store_true", help="install for the current user"),
        arg(
            "--sys-prefix",
            action="store_true",
            help=f"install into this Python environment ({sys.prefix})",
        ),
        arg("--prefix", metavar="PATH", help="install into PATH/share/jupyter/kernels"),
    ),
    arg(
        "--name",
        default=DEFAULT_KERNEL_NAME,
        help=f"kernel spec name (default: {DEFAULT_KERNEL_NAME})",
    ),
    arg(
        "--display-name",
        default=DEFAULT_DISPLAY_NAME,
        help=f"name shown in Jupyter front ends (default: {DEFAULT_DISPLAY_NAME})",
    ),
    arg(
        "--env",
        metavar="KEY=VALUE",
        type=_env_pair,
        nargs="+",
        action="extend",
        default=[],
        help="environment variable to set for the kernel (repeatable)",
    ),
    arg(
        "--no-pool",
        action="store_true",
        help="start every kernel cold (no pyrepl3-pool provisioner in the spec)",
    ),
    arg(
        "--pool-size",
        type=_pool_size,
        default=None,
        metavar="N",
        help=f"warm workers the daemon keeps for this kernel, {POOL_SIZE_RANGE[0]} to "
        f"{POOL_SIZE_RANGE[1]} (default: 1)",
    ),
    arg(
        "--warmup-code",
        default=None,
        metavar="CODE",
        help="code warm workers run before they are leased, e.g. 'import pandas'",
    ),
    # Remote hosts through gateway_provisioners (docs/cluster.md; cluster/kernelspecs.py).
    arg(
        "--provisioner",
        choices=("ssh", "kubernetes", "docker"),
        default=None,
        help="a spec for gateway_provisioners: ssh (DistributedProvisioner over "
        "--remote-hosts), kubernetes or docker (--image); name default: pyrepl3_<provisioner>",
    ),
    arg(
        "--remote-hosts", metavar="HOST", nargs="+", default=[], help="hosts for --provisioner ssh"
    ),
    arg("--image", default=None, help="kernel image for --provisioner kubernetes/docker"),
    arg("--state-url", default=None, help="fsspec URL of the state store (PYREPL3_STATE_URL)"),
    arg("--python", default=None, help="the Python on the remote hosts (default: this one)"),
    arg(
        "--sandbox",
        nargs="?",
        const="1",
        default=None,
        metavar="PROFILE",
        help="run every kernel of this spec sandboxed (bubblewrap), with the defaults or "
        "PROFILE (a JSON object or a JSON file; docs/security.md)",
    ),
    arg(
        "--sandbox-option",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="one sandbox option, e.g. network=loopback, memory=1G, "
        'writable=["/data"] (repeatable; implies --sandbox)',
    ),
)
def cmd_install(args: argparse.Namespace) -> int:
    """Install the PyREPL3 kernel spec for Jupyter.

    Without --user, --sys-prefix or --prefix the spec goes to the system-wide
    Jupyter directory, like `jupyter kernelspec install`. The kernel is started
    with the Python running this command.
    """
    if args.provisioner:
        from .cluster.kernelspecs import install_from_cli

        return install_from_cli(args, DEFAULT_KERNEL_NAME, DEFAULT_DISPLAY_NAME)
    import logging
    import tempfile

    from jupyter_client.kernelspec import KernelSpecManager

    ksm = KernelSpecManager()
    # We report a missing search path ourselves, more readably.
    ksm.log = logging.getLogger("pyrepl3_kernel.cli.kernelspec")
    ksm.log.disabled = True
    ksm.ensure_native_kernel = False

    name = args.name.lower()  # as Jupyter stores it
    prefix = sys.prefix if args.sys_prefix else args.prefix
    # Where install_kernel_spec will put it (replacing what is there).
    destination = ksm._get_destination_dir(name, user=args.user, prefix=prefix)
    replacing = os.path.isdir(destination)
    old_python = _spec_python(destination) if replacing else None
    with tempfile.TemporaryDirectory(prefix="pyrepl3-kernelspec-") as tmp:
        # The temp dir is 0700 and copytree keeps that mode: make it readable
        # by everyone, or a system-wide spec is invisible to other users.
        os.chmod(tmp, 0o755)
        pool: dict[str, Any] | None = None
        if not args.no_pool:
            pool = {}
            if args.pool_size is not None:
                pool["pool_size"] = args.pool_size
            if args.warmup_code is not None:
                pool["warmup_code"] = args.warmup_code
        elif args.pool_size is not None or args.warmup_code is not None:
            return _error("--pool-size and --warmup-code need the pool (drop --no-pool)")
        if args.sandbox is not None or args.sandbox_option:
            from .sandbox import cli_profile_env

            try:
                args.env.append(cli_profile_env(args.sandbox, args.sandbox_option))
            except ValueError as exc:
                return _error(str(exc))
        missing = write_kernel_spec(
            Path(tmp), sys.executable, args.display_name, dict(args.env), pool
        )
        try:
            dest = ksm.install_kernel_spec(
                tmp, kernel_name=args.name, user=args.user, prefix=prefix
            )
        except ValueError as exc:  # invalid kernel name
            return _error(str(exc))
        except PermissionError as exc:
            return _error(f"{exc}\n(try --user or --sys-prefix)")
        except OSError as exc:
            return _error(str(exc))

    for logo in missing:
        print(f"{PROG}: warning: logo {logo} not found in {RESOURCES_DIR}", file=sys.stderr)
    if not replacing:
        print(f"Installed kernel spec {name!r} ({args.display_name}) in {dest}")
    else:
        print(
            f"Replaced kernel spec {name!r} ({args.display_name}) in {dest}"
            + (
                f"; the old one started {old_python}"
                if old_python not in (None, sys.executable)
                else ""
            )
        )
    kernels_dir = os.path.dirname(dest)
    if os.path.abspath(kernels_dir) not in map(os.path.abspath, ksm.kernel_dirs):
        print(
            f"{PROG}: warning: {kernels_dir} is not on Jupyter's kernel search path; "
            f"add {os.path.dirname(kernels_dir)} to JUPYTER_PATH so Jupyter can find it",
            file=sys.stderr,
        )
        return 0
    winner = ksm.find_kernel_specs().get(name)
    if winner and os.path.realpath(winner) != os.path.realpath(dest):
        print(
            f"{PROG}: warning: Jupyter will not use this spec: the {name!r} kernel spec in "
            f"{winner} comes first on its search path (`jupyter --paths`) and wins. "
            f"Remove that one (`{PROG} uninstall --name {name}`) or install under another --name.",
            file=sys.stderr,
        )
    return 0


def _spec_python(spec_dir: str) -> str | None:
    """The program the kernel spec in ``spec_dir`` starts (None if unknown)."""
    try:
        spec = json.loads(Path(spec_dir, "kernel.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    argv = spec.get("argv") if isinstance(spec, dict) else None
    return str(argv[0]) if isinstance(argv, list) and argv else None


@subcommand(
    "uninstall",
    arg(
        "--name",
        default=DEFAULT_KERNEL_NAME,
        help=f"kernel spec name (default: {DEFAULT_KERNEL_NAME})",
    ),
    arg("-y", "--yes", action="store_true", help="do not ask for confirmation"),
)
def cmd_uninstall(args: argparse.Namespace) -> int:
    """Remove an installed PyREPL3 kernel spec.

    Removes the spec Jupyter would use (the first one on its search path).
    """
    from jupyter_client.kernelspec import KernelSpecManager

    name = args.name.lower()
    ksm = KernelSpecManager()
    ksm.ensure_native_kernel = False
    specs = ksm.find_kernel_specs()
    if name not in specs:
        return _error(f"kernel spec {name!r} is not installed")
    if not args.yes:
        try:
            answer = input(f"Remove kernel spec {name!r} in {specs[name]}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            return _error("aborted; nothing removed (use -y to skip this question)")
    try:
        removed = ksm.remove_kernel_spec(name)
    except OSError as exc:
        return _error(f"could not remove {specs[name]}: {exc}")
    print(f"Removed kernel spec {name!r} from {removed}")
    other = ksm.find_kernel_specs().get(name)
    if other:
        print(f"Note: another {name!r} kernel spec is still installed in {other}")
    return 0


# -- the manager daemon ------------------------------------------------------


def _daemon_paths(args: argparse.Namespace) -> Any:
    from .daemon.client import DaemonPaths

    return DaemonPaths.default(getattr(args, "runtime_dir", None))


_RUNTIME_DIR = arg(
    "--runtime-dir",
    metavar="DIR",
    default=None,
    help="Jupyter runtime directory of the daemon (default: jupyter --runtime-dir)",
)


@subcommand(
    "serve",
    _RUNTIME_DIR,
    arg(
        "--idle-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="exit after this long without leases (default: 600)",
    ),
    arg("--log-level", default="INFO", help="log level (default: INFO)"),
)
def cmd_serve(args: argparse.Namespace) -> int:
    """Run the manager daemon in the foreground.

    It hosts many kernels in one process and keeps warm workers for the
    pyrepl3-pool provisioner. Kernel launches start it on demand; running it
    by hand is for debugging.
    """
    import logging

    from .daemon.server import run

    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s [pyrepl3 %(name)s] %(levelname)s %(message)s",
    )
    return run(_daemon_paths(args), idle_timeout=args.idle_timeout)


@subcommand(
    "status",
    _RUNTIME_DIR,
    arg("--json", action="store_true", help="print the raw status as JSON"),
)
def cmd_status(args: argparse.Namespace) -> int:
    """Show the manager daemon, its pools and its leases."""
    from .daemon.client import DaemonClient, DaemonError, DaemonUnavailable
    from .units import format_size

    client = DaemonClient(_daemon_paths(args), timeout=10)
    try:
        status = client.call("status")
    except DaemonUnavailable:
        print(f"no pyrepl3 daemon is running (socket {client.paths.socket})")
        return 3
    except DaemonError as exc:
        return _error(f"the daemon refused: {exc}")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    d = status["daemon"]
    print(
        f"daemon pid {d['pid']} (pyrepl3-kernel {d['version']}), up {d['uptime_s']:.0f} s, "
        f"socket {d['socket']}\n"
        f"  leases served: {d['leases_served']} ({d['warm_leases']} warm); "
        f"exits after {d['idle_timeout_s']:.0f} s without leases"
    )
    print(f"pools: {len(status['pools'])}")
    for p in status["pools"]:
        warmup = (p["warmup_code"][:40] + "...") if len(p["warmup_code"]) > 40 else p["warmup_code"]
        print(
            f"  {p['kernel_name']}: {p['idle']} idle, {p['starting']} starting, "
            f"{p['leased']} leased (min_idle {p['min_idle']}, max {p['max_sessions']})"
            + (f", warmup {warmup!r}" if warmup else "")
        )
    for f in status.get("fork_servers", []):
        print(
            f"  fork server {f['state']}"
            + (f" (pid {f['pid']})" if f["state"] == "ready" else "")
            + f": {f['forked']} forked, {f['fallbacks']} started cold, {f['restarts']} restarts"
            + (f"; {f['reason']}" if f.get("reason") else "")
        )
    print(f"leases: {len(status['leases'])}")
    for lease in status["leases"]:
        print(
            f"  {lease['kernel_id']} {lease['kernel_name']} {lease['state']}: "
            f"worker {lease['worker_pid']}, owner {lease['owner_pid']}, "
            f"{'warm' if lease['warm'] else 'cold'}, age {lease['age_s']:.0f} s, "
            f"restarts {lease['restarts']}"
            + (
                f", RSS {format_size(lease['health']['rss'])}, CPU {lease['health']['cpu']:.1f} s"
                if lease.get("health")
                else ""
            )
            + (f", last crash: {lease['last_crash']}" if lease["last_crash"] else "")
        )
    return 0


@subcommand("stop", _RUNTIME_DIR)
def cmd_stop(args: argparse.Namespace) -> int:
    """Stop the manager daemon and every kernel it hosts."""
    import time

    from .daemon.client import DaemonClient, DaemonError, DaemonUnavailable

    client = DaemonClient(_daemon_paths(args), timeout=10)
    try:
        pid = client.call("hello")["pid"]
        client.call("shutdown")
    except DaemonUnavailable:
        from .daemonstart import stop_starting

        starting = stop_starting(client.paths)  # one on its way comes up no more
        if starting is None:
            print("no pyrepl3 daemon is running")
            return 0
        pid = starting
    except DaemonError as exc:
        return _error(f"the daemon refused: {exc}")
    from .processes import alive

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        # A zombie has exited (its parent, possibly not init, reaps it).
        if not alive(pid):
            print(f"stopped the pyrepl3 daemon (pid {pid})")
            return 0
        time.sleep(0.05)
    return _error(f"the daemon (pid {pid}) did not exit within 15 s")


@subcommand(
    "move",
    arg("kernel_id", help="the kernel's id (as jupyter_server lists it)"),
    arg("--to", metavar="HOST", default=None, help="target host (default: the provisioner's next)"),
    arg("--server", default="http://127.0.0.1:8888", help="the jupyter_server's URL"),
    arg("--token", default=None, help="its token (default: $JUPYTER_TOKEN)"),
)
def cmd_move(args: argparse.Namespace) -> int:
    """Move a remote kernel to another host, with its state.

    For kernels started by gateway_provisioners with a state store
    (PYREPL3_STATE_URL): the kernel saves its state, stops, and starts again
    on the other host from the saved state (docs/cluster.md).
    """
    from .cluster.move import cli_move

    return cli_move(args)


# -- REST and WebSocket gateway ------------------------------------------------


@subcommand(
    "gateway",
    arg(
        "server_args",
        nargs=argparse.REMAINDER,
        help="jupyter_server options, e.g. --port 8888 --IdentityProvider.token=SECRET",
    ),
)
def cmd_gateway(args: argparse.Namespace) -> int:
    """Serve pyrepl3 kernels over Jupyter's REST and WebSocket APIs.

    A headless jupyter_server on 127.0.0.1 (unless --ip says otherwise) with
    token authentication, `pyrepl3` as the default kernel, the warm pool
    behind it, the pyrepl3 endpoints under /api/pyrepl3/, and kernel listing
    allowed, so `jupyter lab --gateway-url=...` and plain HTTP/WebSocket
    clients can use it. Needs jupyter_server: pip install 'pyrepl3-kernel[server]'.
    """
    try:
        from jupyter_server.serverapp import ServerApp
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "jupyter_server":
            raise  # something jupyter_server needs: its traceback says what
        return _error(
            "the gateway needs jupyter_server, which is not installed: "
            "pip install 'pyrepl3-kernel[server]'"
        )
    from traitlets.config import Config

    config = Config()
    config.ServerApp.ip = "127.0.0.1"
    config.ServerApp.open_browser = False
    config.ServerApp.jpserver_extensions = {"pyrepl3_kernel.server": True}
    config.MappingKernelManager.default_kernel_name = "pyrepl3"
    server_args = [a for a in args.server_args if a != "--"]
    # The daemon, its fork server and the pool get ready while the server
    # initializes, and the server listens once they are: the first kernel
    # is as fast as the hundredth (docs/daemon.md, "The first launch").
    import threading

    from jupyter_core.application import NoStart
    from jupyter_core.utils import ensure_event_loop

    from .daemonstart import prepare_daemon, warm_server

    prepared: dict[str, Any] = {}
    preparing = threading.Thread(
        target=lambda: prepared.update(prepare_daemon()), daemon=True, name="pyrepl3-prepare"
    )
    preparing.start()
    # As ServerApp.launch_instance, with the wait before the server listens.
    # Command-line options given by the user win over these defaults.
    loop = ensure_event_loop()
    app = ServerApp.instance(config=config)
    try:
        app.initialize(argv=server_args)
        warm_server(app)
        preparing.join()
        fork_server = prepared.get("fork_server") or {}
        if fork_server.get("state") == "ready":
            app.log.info(
                "pyrepl3: the manager daemon's fork server is ready (pid %s); pool: %s idle",
                fork_server.get("pid"),
                (prepared.get("pool") or {}).get("idle", 0),
            )
        app.start()
    except NoStart:
        return 0
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
