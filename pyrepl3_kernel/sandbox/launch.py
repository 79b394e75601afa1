"""One sandboxed worker's launch: the bubblewrap command around the worker's
command, its store, its control groups and its seccomp filter.

What the worker sees (each host path at the same path inside):

- the system (``/usr``, ``/etc`` without its password and key files, the
  interpreter's prefixes, this package) read-only; ``/proc`` of its own PID
  namespace; a minimal ``/dev``;
- its working directory and the profile's ``writable`` paths, writable; a
  private ``/tmp`` and an empty private home (tmpfs); the profile's
  ``read_only`` paths;
- its **store**, a fresh directory of its own under the profile's
  ``store_root``: automatic and named checkpoints are written there and
  nowhere else. The session outside hands a dead worker's saved state on to
  its successor's store (stores.py);
- nothing else: not the home, not the runtime directory with the daemon's
  socket and the kernels' connection files, not another store.

Its own PID, mount, IPC, UTS, cgroup and network namespaces (so no other
kernel's port, no abstract socket, no other process), no capabilities,
``PR_SET_NO_NEW_PRIVS`` (bubblewrap sets it), the seccomp filter, and its
own control groups for memory, processes and CPU.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import uuid
from collections.abc import Mapping

from ..processes import started_at
from .cgroups import Cgroups
from .profile import Profile, SandboxError
from .seccomp import build_filter, filter_fd
from .stores import STORE_MARK, default_store_root, holds_state, sweep_stores

log = logging.getLogger("pyrepl3.sandbox")

#: System directories shown read-only when they exist (a symlink such as
#: ``/bin -> usr/bin`` is recreated as the same symlink).
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
#: Files and directories under /etc hidden even though /etc is shown.
HIDDEN_SYSTEM_PATHS = (
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ssh",
    "/etc/ssl/private",
)
#: Parts of /proc shown read-only (where the sandbox runs as root).
PROC_READ_ONLY = ("/proc/sys", "/proc/sysrq-trigger", "/proc/fs", "/proc/bus", "/proc/irq")
#: Files of /proc that show kernel internals; replaced by an empty file.
PROC_MASKED = ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug")
#: Exit status the start-up shell gives when it cannot enter the cgroups.
_CGROUP_FAILED = 125

# The start-up shell: enter the sandbox's cgroups (its pid is the sandbox's
# first), apply rlimits if asked, ignore SIGINT (a process-group interrupt
# is for the worker: bubblewrap would die of it), then become bubblewrap.
_SHELL = r"""
n=$1; shift
while [ "$n" -gt 0 ]; do
  echo $$ > "$1" || { echo "pyrepl3: cannot enter the sandbox's cgroup $1" >&2; exit 125; }
  shift; n=$((n - 1))
done
if [ "$1" != - ]; then ulimit -v "$1" || exit 125; fi; shift
if [ "$1" != - ]; then ulimit -u "$1" 2>/dev/null || ulimit -p "$1" 2>/dev/null; fi; shift
trap '' INT
exec "$@"
"""


#: What of a home is hidden even when a shown directory holds it (a kernel
#: working in the home): keys, credentials, and Jupyter's and IPython's own
#: directories (connection files, the daemon's socket, other sessions'
#: stores and histories).
HOME_SECRETS = (
    ".ssh",
    ".gnupg",
    ".aws",
    ".azure",
    ".kube",
    ".docker",
    ".config",
    ".local/share/jupyter",
    ".jupyter",
    ".ipython",
    ".netrc",
    ".git-credentials",
    ".pypirc",
    ".bash_history",
    ".python_history",
)
#: Environment variables naming directories of the user's Jupyter, IPython
#: and session runtime, hidden likewise.
PRIVATE_DIR_VARS = (
    "JUPYTER_RUNTIME_DIR",
    "JUPYTER_DATA_DIR",
    "JUPYTER_CONFIG_DIR",
    "IPYTHONDIR",
    "PYREPL3_CHECKPOINT_DIR",
    "XDG_RUNTIME_DIR",
)


def hidden_within(shown: list[str], env: Mapping[str, str], own_store: str) -> list[str]:
    """The private paths (:data:`HOME_SECRETS` of the home, the directories of
    :data:`PRIVATE_DIR_VARS`, Jupyter's runtime and data directories, the
    stores' root) that exist inside one of the ``shown`` paths without being
    one of them: what a sandbox must cover."""
    from jupyter_core.paths import jupyter_data_dir, jupyter_runtime_dir

    candidates = [os.path.dirname(own_store), jupyter_runtime_dir(), jupyter_data_dir()]
    candidates += [os.environ.get(v, "") for v in PRIVATE_DIR_VARS]
    candidates += [env.get(v, "") for v in PRIVATE_DIR_VARS]
    for home in {env.get("HOME", ""), os.path.expanduser("~")}:
        if home and os.path.isabs(home):
            candidates += [os.path.join(home, entry) for entry in HOME_SECRETS]
    roots = [os.path.realpath(p) for p in shown]
    out: list[str] = []
    for path in candidates:
        if not path or not os.path.isabs(path) or not os.path.lexists(path):
            continue
        real = os.path.realpath(path)
        if real in roots or any(real == o or real.startswith(o + "/") for o in out):
            continue  # shown on purpose, or hidden already with what holds it
        if any(real.startswith(root.rstrip("/") + "/") for root in roots):
            out = [o for o in out if not o.startswith(real + "/")]
            out.append(real)
    return sorted(out)


def bwrap_path(profile: Profile) -> str:
    """The bubblewrap program; SandboxError if it is not installed."""
    found = shutil.which(profile.bwrap)
    if found is None:
        raise SandboxError(
            f"the sandbox needs bubblewrap ({profile.bwrap!r} is not on PATH): install it "
            "(Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap); "
            "the kernel does not start unsandboxed"
        )
    return found


def interpreter_paths(python: str) -> list[str]:
    """What the worker's interpreter needs to be shown: its prefixes and
    this package (an editable install's may lie outside them)."""
    import pyrepl3_kernel

    paths = {os.path.dirname(os.path.abspath(pyrepl3_kernel.__file__))}
    if os.path.realpath(python) == os.path.realpath(sys.executable) or python == sys.executable:
        paths.update({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix})
    else:
        # Another interpreter: its installation (``<prefix>/bin/python``).
        for exe in {os.path.abspath(python), os.path.realpath(python)}:
            paths.add(os.path.dirname(os.path.dirname(exe)))
    return sorted(p for p in paths if p and p != "/" and os.path.exists(p))


class SandboxLaunch:
    """Wraps one worker start in a sandbox made from ``profile``."""

    def __init__(self, profile: Profile, *, cwd: str | None, python: str) -> None:
        profile.check()
        self.profile = profile
        self.cwd = os.path.abspath(cwd or os.getcwd())
        if self.cwd == "/":
            raise SandboxError("a sandboxed kernel cannot work in / : give it a working directory")
        if not os.path.isdir(self.cwd):
            raise SandboxError(f"the working directory {self.cwd!r} does not exist")
        self.python = python
        self.bwrap = bwrap_path(profile)
        root = profile.store_root or default_store_root()
        #: This worker's own store (autosave, named checkpoints).
        self.store = os.path.join(root, uuid.uuid4().hex)
        self.cgroups: Cgroups | None = None
        #: How the limits are kept: ``cgroup v1``, ``cgroup v2`` or ``rlimit``.
        self.enforcement = ""
        self._fds: list[int] = []

    # -- the command ------------------------------------------------------------

    def wrap(
        self, cmd: list[str], env: Mapping[str, str]
    ) -> tuple[list[str], dict[str, str], tuple[int, ...]]:
        """The command, environment and extra fds that start ``cmd`` sandboxed."""
        try:
            return self._wrap(cmd, env)
        except BaseException:
            self.abandon()
            raise

    def _wrap(
        self, cmd: list[str], env: Mapping[str, str]
    ) -> tuple[list[str], dict[str, str], tuple[int, ...]]:
        profile = self.profile
        self._check_not_home(env)
        os.makedirs(os.path.dirname(self.store), mode=0o700, exist_ok=True)
        sweep_stores(os.path.dirname(self.store))
        os.mkdir(self.store, 0o700)
        with open(os.path.join(self.store, STORE_MARK), "w") as f:
            f.write(f"{os.getpid()} {started_at(os.getpid())}\n")  # whose store it is
        launch_env, env = env, dict(env)
        checkpoints = profile.checkpoints or os.path.join(self.store, "checkpoints")
        env["PYREPL3_CHECKPOINT_DIR"] = checkpoints
        env["TMPDIR"] = "/tmp"
        cmd = list(cmd)
        if "--parent-pid" in cmd:  # the supervisor is outside the PID namespace
            cmd[cmd.index("--parent-pid") + 1] = "0"
        argv = [
            self.bwrap,
            "--die-with-parent",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-net",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            "pyrepl3-sandbox",
            "--cap-drop",
            "ALL",
        ]
        for path in SYSTEM_PATHS:
            if os.path.islink(path):
                argv += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                argv += ["--ro-bind", path, path]
        for path in HIDDEN_SYSTEM_PATHS:
            if os.path.isdir(path) and not os.path.islink(path):
                argv += ["--tmpfs", path, "--remount-ro", path]
            elif os.path.exists(path):
                argv += ["--ro-bind", "/dev/null", path]
        argv += ["--proc", "/proc", "--dev", "/dev"]
        # uid 0 without capabilities may still write /proc/sys (a DAC check
        # only: core_pattern runs a program as root on the host) and
        # /proc/sysrq-trigger: read-only, as container runtimes make them.
        for path in PROC_READ_ONLY:
            if os.path.exists(path):
                argv += ["--ro-bind", path, path]
        for path in PROC_MASKED:
            if os.path.exists(path):
                argv += ["--ro-bind", "/dev/null", path]
        argv += ["--perms", "1777", "--size", str(profile.tmp_size), "--tmpfs", "/tmp"]
        home = env.get("HOME")
        if home and os.path.isabs(home) and os.path.normpath(home) not in ("/", "/tmp"):
            argv += ["--perms", "0700", "--size", str(64 * 1024**2), "--tmpfs", home]
        binds: list[tuple[str, str]] = [
            *(("--ro-bind", p) for p in interpreter_paths(self.python)),
            *(("--ro-bind", p) for p in profile.read_only),
            ("--bind", self.cwd),
            *(("--bind", p) for p in profile.writable),
            ("--bind", self.store),
        ]
        if profile.checkpoints:
            binds.append(("--bind", profile.checkpoints))
        # A parent before what lies inside it, so a nested bind stays visible.
        for option, path in sorted(binds, key=lambda b: b[1].rstrip("/").count("/")):
            argv += [option, path, path]
        # Secrets and other sessions' files inside a shown directory (a kernel
        # working in the home) are hidden; the worker's own store shows again.
        masked = hidden_within([p for _, p in binds], launch_env, self.store)
        for path in masked:
            if os.path.isdir(path):  # an empty private tmpfs (nothing reaches the host)
                argv += ["--size", str(16 * 1024**2), "--tmpfs", path]
            else:
                argv += ["--ro-bind", "/dev/null", path]
        for option, path in sorted(binds, key=lambda b: b[1].rstrip("/").count("/")):
            if any(os.path.realpath(path).startswith(m + "/") for m in masked):
                argv += [option, path, path]  # listed, or its own store: shown again
        argv += ["--chdir", self.cwd]
        if profile.seccomp:
            fd = filter_fd(build_filter(network=profile.network))
            self._fds.append(fd)
            argv += ["--seccomp", str(fd)]
        argv += ["--", *cmd]
        return self._shell(argv), env, tuple(self._fds)

    def _check_not_home(self, env: Mapping[str, str]) -> None:
        """A working directory that is a home (or holds one) would let the
        code rewrite the home's start-up files (``.bashrc``, ``.profile``,
        ``.local/bin``, the user site-packages): refused unless the profile
        lists it as writable."""
        cwd = os.path.realpath(self.cwd)
        listed = {os.path.realpath(p) for p in self.profile.writable}
        for home in {env.get("HOME", ""), os.path.expanduser("~")}:
            if not home or not os.path.isabs(home):
                continue
            home = os.path.realpath(home)
            if (home == cwd or home.startswith(cwd.rstrip("/") + "/")) and cwd not in listed:
                raise SandboxError(
                    f"a sandboxed kernel may not work in {self.cwd!r}, which is or holds the "
                    f"home directory {home!r} (its code could change the home's start-up files: "
                    ".bashrc, .profile, .local/bin): start it in a directory inside the home, or "
                    f"list {self.cwd!r} in the profile's writable paths to allow it"
                )

    def _shell(self, argv: list[str]) -> list[str]:
        profile = self.profile
        groups: Cgroups | None = None
        reason = "limits = rlimit in the profile"
        if profile.limits != "rlimit":
            groups, reason = Cgroups.create(profile.memory, profile.processes, profile.cpus)
        if groups is None and profile.limits == "cgroup":
            raise SandboxError(
                f"the sandbox's profile asks for cgroups and there are none: {reason}"
            )
        self.cgroups = groups
        if groups is not None:
            self.enforcement = f"cgroup v{groups.version}"
            procs = groups.procs_files
            rlimits = ["-", "-"]
        else:
            self.enforcement = "rlimit"
            log.warning(
                "sandbox without cgroups (%s): memory and process count are per-process "
                "rlimits, CPU is not bounded beyond the session's limits",
                reason,
            )
            procs = []
            rlimits = [str(self.profile.memory // 1024), str(self.profile.processes)]
        return ["/bin/sh", "-c", _SHELL, "sh", str(len(procs)), *procs, *rlimits, *argv]

    def abandon(self) -> None:
        """The worker did not start: nothing of the launch is left."""
        self.spawned()
        if self.cgroups is not None:
            self.cgroups.remove_now()
        shutil.rmtree(self.store, ignore_errors=True)

    def spawned(self) -> None:
        """The sandbox started: the fds it inherited are not ours to keep."""
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    # -- what happened ----------------------------------------------------------

    def explain(self, cause: str, returncode: int | None) -> str:
        """``cause`` in the sandbox's words: bubblewrap reports a worker killed
        by signal N as exit status 128+N; the memory limit's kills and the
        process limit's refusals are named."""
        groups = self.cgroups
        if groups is not None and groups.oom_kills():
            from ..units import format_size

            return f"killed for the sandbox's memory limit of {format_size(self.profile.memory)}"
        if returncode is not None and 128 < returncode < 128 + 65:
            import signal

            try:
                name = signal.Signals(returncode - 128).name
            except ValueError:
                name = str(returncode - 128)
            return f"killed by signal {name} (in the sandbox)"
        if returncode == _CGROUP_FAILED:
            return f"{cause}: the sandbox could not be set up"
        return cause

    def describe(self) -> dict[str, object]:
        groups = self.cgroups
        return {
            **self.profile.describe(),
            "enforcement": self.enforcement,
            "store": self.store,
            "processes_now": groups.processes() if groups else None,
            "forks_refused": groups.forks_refused() if groups else None,
        }

    # -- the end ------------------------------------------------------------------

    async def cleanup(self) -> None:
        """After the worker is gone: its cgroups, its fds, and its store unless
        the store holds a saved state a successor is to adopt."""
        self.spawned()
        if self.cgroups is not None:
            await self.cgroups.remove()
        if not holds_state(self.store):
            shutil.rmtree(self.store, ignore_errors=True)
