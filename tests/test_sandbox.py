"""Sandboxed sessions (issue 17): the escape battery, and that a sandboxed
session keeps working (input, interrupt, crash recovery, checkpoints, the
warm pool, the kernelspec and the daemon's pool).

SAFETY: these tests run as root. Every attempt that could do harm where it
succeeded first proves, inside the worker, that it runs in the sandbox (its
PID and mount namespaces differ from this test process's, read from
/proc/self/ns), and the battery stops (fails) if not; attempts target only
scratch files, directories and processes this module created, use
non-stopping forms (PTRACE_SEIZE then detach, signal 0), bound every loop,
and undo what succeeded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pyrepl3_kernel.protocol import MessageType
from pyrepl3_kernel.sandbox import Profile, SandboxError
from pyrepl3_kernel.sandbox.seccomp import X86_64, build_filter
from pyrepl3_kernel.session import PoolConfig, Session, SessionPool
from pyrepl3_kernel.session.worker import WorkerProcess, WorkerStartError

BWRAP = shutil.which("bwrap")
pytestmark = pytest.mark.skipif(
    BWRAP is None, reason="bubblewrap (bwrap) is not installed (scripts/setup.sh installs it)"
)

T = TypeVar("T")
HOST_NS = {name: os.readlink(f"/proc/self/ns/{name}") for name in ("pid", "mnt", "net")}

#: Prefixed to every attempt that could do harm: stop unless sandboxed.
GUARD = f"""
import os as _os
_host = {HOST_NS!r}
for _name in ("pid", "mnt"):
    if _os.readlink("/proc/self/ns/" + _name) == _host[_name]:
        raise RuntimeError("OUTSIDE-THE-SANDBOX: the battery stops here")
"""


class LoopThread:
    """An event loop in a thread, so the module's sessions live across tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Cell:
    """What a cell gave: its output text and its error, if any."""

    def __init__(self, msgs: list[Any]) -> None:
        self.msgs = msgs
        self.out = "".join(
            getattr(m, "data", "") or "" for m in msgs if m.type == MessageType.OUTPUT
        )
        errors = [m for m in msgs if m.type == MessageType.ERROR]
        self.ename = errors[0].ename if errors else None
        self.evalue = errors[0].evalue if errors else ""

    def __repr__(self) -> str:
        return f"<Cell out={self.out!r} error={self.ename}: {self.evalue}>"


async def _execute(session: Session, code: str, on_message: Any = None) -> Cell:
    from pyrepl3_kernel.protocol import ExecuteMessage

    msgs = []
    async for msg in session.execute(ExecuteMessage(code=code)):
        msgs.append(msg)
        if on_message is not None:
            await on_message(msg)
    return Cell(msgs)


class Scratch:
    """What the battery aims at: files, directories, processes and servers
    this module made, and sessions (sandboxed and not)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.workdir = self.home / "project"
        self.outside = root / "outside"
        (self.home / ".ssh").mkdir(parents=True)
        self.workdir.mkdir()
        self.outside.mkdir()
        self.ssh_key = self.home / ".ssh" / "id_ed25519"
        self.ssh_key.write_text("SCRATCH-PRIVATE-KEY\n")
        self.secret = self.home / "notes.txt"
        self.secret.write_text("SCRATCH-SECRET\n")
        self.store_root = root / "stores"
        self.store_root.mkdir()
        # A TCP server on 127.0.0.1 (the host's loopback), answering "hello".
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        for _ in range(100_000):  # bounded; stopped by close()
            if self._stop.is_set():
                return
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            self.accepted += 1
            with conn:
                conn.sendall(b"hello")

    def env(self) -> dict[str, str]:
        return {**os.environ, "HOME": str(self.home), "PYREPL3_SANDBOX": ""}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.server.close()


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    try:
        yield lt
    finally:
        lt.close()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scratch]:
    s = Scratch(tmp_path_factory.mktemp("sandbox-battery"))
    try:
        yield s
    finally:
        s.close()


def _profile(scratch: Scratch, **options: Any) -> dict[str, Any]:
    return {
        "memory": "256M",
        "processes": 48,
        "store_root": str(scratch.store_root),
        **options,
    }


@pytest.fixture(scope="module")
def sessions(loop: LoopThread, scratch: Scratch) -> Iterator[dict[str, Session]]:
    """``boxed``: sandboxed, network off; ``loopback``: sandboxed with a
    private loopback; ``plain``: not sandboxed (the other kernel)."""
    made: dict[str, Session] = {}

    async def start() -> None:
        plain_home = scratch.root / "plain-home"
        plain_home.mkdir(exist_ok=True)
        made["plain"] = Session(
            cwd=str(scratch.outside), env={**scratch.env(), "HOME": str(plain_home)}
        )
        made["boxed"] = Session(
            cwd=str(scratch.workdir), env=scratch.env(), sandbox=_profile(scratch)
        )
        made["loopback"] = Session(
            cwd=str(scratch.workdir),
            env=scratch.env(),
            sandbox=_profile(scratch, network="loopback"),
        )
        await asyncio.gather(*(s.start() for s in made.values()))

    async def stop() -> None:
        await asyncio.gather(*(s.shutdown() for s in made.values()), return_exceptions=True)

    try:
        loop.run(start())
        yield made
    finally:
        loop.run(stop())


@pytest.fixture(scope="module")
def inside(loop: LoopThread, sessions: dict[str, Session]) -> Any:
    """Run a cell in a session; a harmful one only after the guard passed."""
    boxed = sessions["boxed"]
    # The battery's precondition: the sandboxed worker is in namespaces of its own.
    ns = loop.run(
        _execute(
            boxed,
            "import os\nprint({n: os.readlink('/proc/self/ns/' + n) for n in ('pid', 'mnt', 'net')})",
        )
    )
    seen = eval(ns.out)  # a dict printed by the cell
    for name in ("pid", "mnt", "net"):
        if seen[name] == HOST_NS[name]:
            pytest.fail(f"the sandboxed worker shares the {name} namespace: battery stopped")

    def run(code: str, *, session: str = "boxed", harmful: bool = True) -> Cell:
        cell = loop.run(_execute(sessions[session], (GUARD if harmful else "") + code))
        assert "OUTSIDE-THE-SANDBOX" not in (cell.evalue or ""), "the worker is not sandboxed"
        return cell

    return run


def _alive(loop: LoopThread, sessions: dict[str, Session], name: str = "boxed") -> None:
    cell = loop.run(_execute(sessions[name], "print(6 * 7)"))
    assert cell.ename is None and cell.out.strip() == "42", cell


# -- profiles: bad input ---------------------------------------------------------------


def test_profile_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="unknown sandbox option 'netwrk'"):
        Profile.from_mapping({"netwrk": "none"})
    with pytest.raises(SandboxError, match="does not exist"):
        Profile.from_mapping({"read_only": [str(tmp_path / "missing")]})
    with pytest.raises(SandboxError, match="network 'wifi'"):
        Profile.from_mapping({"network": "wifi"})
    with pytest.raises(SandboxError, match="memory"):
        Profile.from_mapping({"memory": "lots"})
    with pytest.raises(SandboxError, match="PYREPL3_SANDBOX: the sandbox profile is not JSON"):
        Profile.from_env({"PYREPL3_SANDBOX": "{nope"})
    with pytest.raises(SandboxError, match="unknown sandbox option"):
        Session(sandbox={"bogus": 1})
    with pytest.raises(SandboxError, match="does not exist"):
        PoolConfig(sandbox={"writable": ["/nonexistent/pyrepl3"]})
    profile = Profile.from_mapping({"network": "loopback", "memory": "1G"})
    assert Profile.coerce(profile.to_json()) == profile
    assert Profile.from_env({"KERNEL_PYREPL3_SANDBOX": "1"}) == Profile()


def test_install_sandbox_writes_the_profile_and_refuses_bad_ones(tmp_path: Path) -> None:
    def install(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pyrepl3_kernel.cli", "install", "--prefix", str(tmp_path)]
            + ["--name", "sbx", "--no-pool", *extra],
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = install("--sandbox", '{"network": "loopback"}', "--sandbox-option", "memory=1G")
    assert done.returncode == 0, done.stderr
    spec = json.loads((tmp_path / "share/jupyter/kernels/sbx/kernel.json").read_text())
    assert json.loads(spec["env"]["PYREPL3_SANDBOX"]) == {"network": "loopback", "memory": 2**30}
    bad = install("--sandbox-option", "writable=/nonexistent/pyrepl3")
    assert bad.returncode != 0 and "'/nonexistent/pyrepl3' does not exist" in bad.stderr
    bad = install("--sandbox", '{"nettwork": "none"}')
    assert bad.returncode != 0 and "unknown sandbox option 'nettwork'" in bad.stderr


def test_missing_bubblewrap_is_an_error_not_an_unsandboxed_start(
    loop: LoopThread, tmp_path: Path
) -> None:
    worker = WorkerProcess(cwd=str(tmp_path), sandbox={"bwrap": "/nonexistent/bwrap"})
    with pytest.raises(WorkerStartError, match="needs bubblewrap"):
        loop.run(worker.start())
    assert worker.pid is None


def test_a_sandbox_that_cannot_start_says_why_and_leaves_nothing(
    loop: LoopThread, tmp_path: Path
) -> None:
    stores = tmp_path / "stores"
    worker = WorkerProcess(
        cwd=str(tmp_path / "missing"), sandbox={"store_root": str(stores)}, startup_timeout=20
    )
    with pytest.raises(WorkerStartError, match="working directory .* does not exist"):
        loop.run(worker.start())
    worker = WorkerProcess(
        python=str(tmp_path / "no-python"),
        cwd=str(tmp_path),
        sandbox={"store_root": str(stores)},
        startup_timeout=20,
    )
    with pytest.raises(WorkerStartError, match="no-python"):
        loop.run(worker.start())
    assert not stores.exists() or os.listdir(stores) == []


def test_what_a_killed_gateway_left_is_swept_at_the_next_start(
    loop: LoopThread, tmp_path: Path
) -> None:
    """A gateway killed outright (``shutdown_kernel(now=True)`` kills a
    standalone kernel) leaves its sandbox's store and empty cgroups: the next
    sandboxed start removes those whose owner is gone (stores) or that have
    been empty for a minute (cgroups)."""
    import time

    from pyrepl3_kernel.sandbox.cgroups import _mounts, _own_cgroups
    from pyrepl3_kernel.sandbox.stores import STORE_MARK

    stores = tmp_path / "stores"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = stores / "left-by-a-killed-gateway"
    left.mkdir(parents=True)
    (left / STORE_MARK).write_text(f"{dead.pid} 1.0\n")
    mine = stores / "of-a-live-gateway"
    mine.mkdir()
    (mine / STORE_MARK).write_text(f"{os.getpid()} None\n")
    stale = None
    pids = _mounts().get("pids")
    if pids is not None:
        stale = Path(
            pids, _own_cgroups().get("pids", "/").lstrip("/"), "pyrepl3-sandbox-stale0test"
        )
        with contextlib.suppress(OSError):
            stale.mkdir()
            os.utime(stale, (time.time() - 3600, time.time() - 3600))
    worker = WorkerProcess(cwd=str(tmp_path), sandbox={"store_root": str(stores)})
    try:
        loop.run(worker.start())
    finally:
        loop.run(worker.shutdown())
    assert not left.exists() and mine.exists()
    if stale is not None:
        assert not stale.exists()


def test_seccomp_numbers_match_libseccomp() -> None:
    import ctypes.util

    if os.uname().machine != "x86_64" or not ctypes.util.find_library("seccomp"):
        pytest.skip("the x86_64 table is checked against libseccomp on x86_64")
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp"))
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    for name, nr in X86_64.items():
        assert lib.seccomp_syscall_resolve_name(name.encode()) == nr, name
    assert len(build_filter(network="none")) % 8 == 0


# -- what a sandboxed worker is ------------------------------------------------------------


def test_worker_is_confined(inside: Any) -> None:
    cell = inside(
        "status = open('/proc/self/status').read()\n"
        "print(dict(l.split(':\\t') for l in status.splitlines() if ':\\t' in l))",
        harmful=False,
    )
    assert cell.ename is None, cell
    status = eval(cell.out)
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, status
    # /proc/sys and /proc/sysrq-trigger are read-only (uid 0 without
    # capabilities could write them); the hostname is the sandbox's own (UTS
    # namespace), so the write tried is harmless even where it succeeded.
    shown = [p for p in ("/proc/sys/kernel", "/proc/sysrq-trigger") if os.path.exists(p)]
    cell = inside(
        f"print(all(os.statvfs(p).f_flag & os.ST_RDONLY for p in {shown!r}))\n"
        "try:\n    open('/proc/sys/kernel/hostname', 'w').write('pyrepl3-probe')\n"
        "except OSError as e:\n    print(e.errno)"
    )
    assert cell.ename is None, cell
    assert cell.out.split("\n")[:2] == ["True", "30"], cell  # EROFS
    # A program it runs (as uid 0, where the test runs as root) gains none.
    cell = inside(
        "import subprocess\nprint(subprocess.run(['grep', 'CapEff', '/proc/self/status'],"
        " capture_output=True, text=True).stdout.split()[1])",
        harmful=False,
    )
    assert int(cell.out.strip(), 16) == 0, cell


# -- the escape battery ------------------------------------------------------------------


def test_home_and_ssh_keys_are_invisible(inside: Any, scratch: Scratch) -> None:
    for path in (scratch.ssh_key, scratch.secret, Path("~/.ssh/id_ed25519")):
        cell = inside(f"print(open(os.path.expanduser({str(path)!r})).read())", harmful=False)
        assert cell.ename == "FileNotFoundError", cell
    # Of what the home holds on the host, only the working directory shows;
    # of the real home of this user, only what the interpreter needs (its
    # installation may live there). What the worker writes to its home (its
    # IPython directory) goes to a private tmpfs.
    for home, allowed in (
        (str(scratch.home), {"project"}),
        (
            os.path.expanduser("~"),
            {
                Path(p).relative_to(os.path.expanduser("~")).parts[0]
                for p in (sys.prefix, sys.base_prefix)
                if p.startswith(os.path.expanduser("~") + "/")
            },
        ),
    ):
        cell = inside(
            f"print(sorted(os.listdir({home!r})) if os.path.isdir({home!r}) else [])",
            harmful=False,
        )
        assert cell.ename is None, cell
        assert set(eval(cell.out)) & set(os.listdir(home)) <= allowed, cell


def test_a_kernel_working_in_the_home_does_not_see_its_secrets(
    loop: LoopThread, scratch: Scratch
) -> None:
    """The working directory is the home itself (a notebook at the top of
    the home): refused unless the profile lists it; where listed, keys,
    Jupyter's runtime directory (connection files, the daemon's socket) and
    other sessions' stores in it stay hidden, and the worker's own store
    works."""
    home = scratch.root / "home-as-cwd"
    runtime = home / ".local" / "share" / "jupyter" / "runtime"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("SCRATCH-PRIVATE-KEY\n")
    (runtime / "other-session-store").mkdir(parents=True)
    (runtime / "other-session-store" / "auto.json").write_text("{}")
    (runtime / "kernel-1.json").write_text('{"key": "SCRATCH"}')
    (home / "analysis.csv").write_text("a,b\n")
    env = {**scratch.env(), "HOME": str(home), "JUPYTER_RUNTIME_DIR": str(runtime)}
    stores = str(runtime / "pyrepl3-sandbox")
    # Refused unless the profile lists the home as writable: the code could
    # rewrite the home's start-up files.
    refused = WorkerProcess(cwd=str(home), env=env, sandbox=_profile(scratch, store_root=stores))
    with pytest.raises(WorkerStartError, match="may not work in .* home directory"):
        loop.run(refused.start())

    async def scenario() -> tuple[Cell, Cell]:
        async with Session(
            cwd=str(home),
            env=env,
            sandbox=_profile(scratch, store_root=stores, writable=[str(home)]),
        ) as session:
            probe = await _execute(
                session,
                f"""
import os
out = {{}}
for path in ('.ssh/id_ed25519', {str(runtime / "kernel-1.json")!r},
             {str(runtime / "other-session-store" / "auto.json")!r}, 'analysis.csv'):
    try:
        out[path] = open(path).read()
    except OSError as e:
        out[path] = type(e).__name__
print(out)
""",
            )
            await _execute(session, "kept_in_home = 1")
            saved = await _execute(session, "%checkpoint save home")
            return probe, saved

    probe, saved = loop.run(scenario())
    out = eval(probe.out)
    assert out.pop("analysis.csv") == "a,b\n"  # the working directory itself shows
    assert set(out.values()) == {"FileNotFoundError"}, out
    assert saved.ename is None, saved
    assert (runtime / "kernel-1.json").read_text() == '{"key": "SCRATCH"}'


def test_writes_outside_the_working_dir_do_not_reach_the_host(
    inside: Any, scratch: Scratch
) -> None:
    marker = f"pyrepl3-sandbox-{uuid.uuid4().hex}"
    targets = [
        scratch.outside / marker,  # another directory of the user
        scratch.home / marker,  # the home, outside the working dir
        Path("/usr") / marker,  # the system
        Path("/tmp") / marker,  # the host's /tmp: the sandbox has its own
    ]
    code = "results = {}\n"
    for target in targets:
        code += (
            f"try:\n    open({str(target)!r}, 'w').write('x')\n    results[{str(target)!r}] = 'written'\n"
            f"except OSError as e:\n    results[{str(target)!r}] = type(e).__name__\n"
        )
    code += "print(results)"
    try:
        cell = inside(code)
        assert cell.ename is None, cell
        results = eval(cell.out)
        assert results[str(Path("/usr") / marker)] == "OSError"  # read-only file system
        assert results[str(scratch.outside / marker)] == "FileNotFoundError"
        for target in targets:
            assert not target.exists(), f"the sandbox wrote {target} on the host"
        # The working directory is writable, and the host sees it.
        cell = inside(f"open({marker!r}, 'w').write('ok')")
        assert cell.ename is None and (scratch.workdir / marker).read_text() == "ok"
    finally:
        for target in [*targets, scratch.workdir / marker]:
            if target.exists():
                target.unlink()


def test_other_processes_are_invisible(
    inside: Any, sessions: dict[str, Session], scratch: Scratch
) -> None:
    victim = sessions["plain"].pid
    assert victim is not None
    cell = inside(
        "pids = [int(p) for p in os.listdir('/proc') if p.isdigit()]\n"
        "def cwd(p):\n"
        "    try:\n"
        "        return os.readlink(f'/proc/{p}/cwd')\n"
        "    except OSError:\n"
        "        return None\n"
        "print([(p, cwd(p)) for p in pids])",
        harmful=False,
    )
    procs = eval(cell.out)
    # Only the sandbox's own few (bubblewrap's init, the worker, a child the
    # autosave forked, a zombie being reaped); the host has hundreds, and the
    # plain session's worker (in its own directory) is not among them.
    assert len(procs) <= 8, procs
    assert str(scratch.outside) not in [c for _, c in procs], procs
    assert len([p for p in os.listdir("/proc") if p.isdigit()]) > len(procs)


def test_signal_and_ptrace_of_another_sessions_worker_fail(
    inside: Any, loop: LoopThread, sessions: dict[str, Session]
) -> None:
    victim = sessions["plain"].pid
    assert victim is not None
    cell = inside(
        f"""
import ctypes, errno
victim = {victim}
try:
    os.kill(victim, 0)  # signal 0: checks, delivers nothing
    signal_result = 'delivered'
except OSError as e:
    signal_result = type(e).__name__
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PTRACE_SEIZE, PTRACE_DETACH = 0x4206, 17
if libc.ptrace(PTRACE_SEIZE, victim, None, None) == 0:
    libc.ptrace(PTRACE_DETACH, victim, None, None)  # undo at once
    ptrace_result = 'attached'
else:
    ptrace_result = errno.errorcode[ctypes.get_errno()]
# ptrace of its own child fails too (the filter refuses every ptrace)
if libc.ptrace(PTRACE_SEIZE, os.getpid(), None, None) == 0:
    libc.ptrace(PTRACE_DETACH, os.getpid(), None, None)
    self_result = 'attached'
else:
    self_result = errno.errorcode[ctypes.get_errno()]
print([signal_result, ptrace_result, self_result])
"""
    )
    assert cell.ename is None, cell
    assert eval(cell.out) == ["ProcessLookupError", "EPERM", "EPERM"], cell
    _alive(loop, sessions, "plain")


def test_loopback_and_the_host_network_are_unreachable(inside: Any, scratch: Scratch) -> None:
    code = f"""
import socket
out = []
try:
    socket.create_connection(('127.0.0.1', {scratch.port}), timeout=2).recv(5)
    out.append('connected')
except OSError as e:
    out.append(type(e).__name__)
print(out)
"""
    before = scratch.accepted
    # network "none": no IP socket at all
    assert eval(inside(code).out) == ["PermissionError"]
    # network "loopback": a loopback of its own, where nothing listens
    assert eval(inside(code, session="loopback").out) == ["ConnectionRefusedError"]
    cell = inside(
        "s = socket.create_server(('127.0.0.1', 0)); c = socket.create_connection(s.getsockname());"
        "print(s.accept()[0].send(b'x'))",
        session="loopback",
    )
    assert cell.out.strip() == "1", cell
    assert scratch.accepted == before


def test_daemon_socket_and_other_stores_are_unreachable(
    inside: Any, loop: LoopThread, sessions: dict[str, Session], scratch: Scratch
) -> None:
    from pyrepl3_kernel.daemon.client import DaemonPaths

    plain = sessions["plain"]
    # The plain session's autosave store: written after a successful cell.
    loop.run(_execute(plain, "secret_value = 'PLAIN-SESSION-STATE'"))
    other_store = sessions["loopback"].worker.sandbox_store
    assert other_store and os.path.isdir(other_store)
    daemon_socket = str(DaemonPaths.default().socket)
    code = f"""
import socket
out = {{}}
for path in ({plain.autosave_dir!r}, {other_store!r}, os.path.dirname({other_store!r})):
    try:
        out[path] = sorted(os.listdir(path))
    except OSError as e:
        out[path] = type(e).__name__
s = socket.socket(socket.AF_UNIX)
try:
    s.connect({daemon_socket!r})
    out['daemon'] = 'connected'
except OSError as e:
    out['daemon'] = type(e).__name__
print(out)
"""
    out = eval(inside(code).out)
    assert out[plain.autosave_dir] == "FileNotFoundError"
    assert out[other_store] == "FileNotFoundError"
    own = os.path.basename(sessions["boxed"].worker.sandbox_store or "")
    # The stores' directory shows this worker's own store, nothing else.
    assert out[os.path.dirname(other_store)] == [own]
    assert out["daemon"] == "FileNotFoundError"


def test_mount_modules_and_kernel_calls_are_refused(inside: Any) -> None:
    cell = inside(
        """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
results = {}
os.makedirs('/tmp/pyrepl3-mnt', exist_ok=True)
if libc.mount(b'none', b'/tmp/pyrepl3-mnt', b'tmpfs', 0, None) == 0:
    libc.umount2(b'/tmp/pyrepl3-mnt', 2)  # undo at once (MNT_DETACH)
    results['mount'] = 'mounted'
else:
    results['mount'] = errno.errorcode[ctypes.get_errno()]
# init_module(NULL, 0, ""), finit_module(-1, "", 0), delete_module("none", 0),
# keyctl(KEYCTL_GET_KEYRING_ID, ...), bpf(BPF_PROG_LOAD, NULL, 0),
# unshare(CLONE_NEWUSER), reboot with an invalid magic (harmless anyway)
for name, nr, args in (
    ('init_module', 175, (None, 0, b'')),
    ('finit_module', 313, (-1, b'', 0)),
    ('delete_module', 176, (b'pyrepl3_none', 0)),
    ('keyctl', 250, (0, -3, 0)),
    ('bpf', 321, (5, None, 0)),
    ('unshare', 272, (0x10000000,)),
    ('reboot', 169, (0, 0, 0, None)),
):
    r = libc.syscall(nr, *args)
    results[name] = 'ok' if r >= 0 else errno.errorcode[ctypes.get_errno()]
print(results)
"""
    )
    assert cell.ename is None, cell
    results = eval(cell.out)
    assert set(results.values()) == {"EPERM"}, results


def test_fork_bomb_is_bounded(inside: Any, loop: LoopThread, sessions: dict[str, Session]) -> None:
    cell = inside(
        """
import time
children, refused = [], None
for _ in range(300):  # bounded: 300 forks at most
    try:
        pid = os.fork()
    except OSError as e:
        refused = type(e).__name__
        break
    if pid == 0:
        time.sleep(5)
        os._exit(0)
    children.append(pid)
for pid in children:  # undo: the children go at once
    os.kill(pid, 9)
    os.waitpid(pid, 0)
print([len(children), refused])
"""
    )
    assert cell.ename is None, cell
    forked, refused = eval(cell.out)
    assert refused == "BlockingIOError" and forked < 48, cell
    report = sessions["boxed"].usage()["pyrepl3"]["sandbox"]
    assert report is not None and report["forks_refused"] >= 1, report
    assert report["processes"] == 48 and report["processes_now"] < 48, report
    assert report["enforcement"].startswith("cgroup"), report
    _alive(loop, sessions, "plain")
    _alive(loop, sessions)


def test_a_cell_that_leaves_the_process_limit_full_does_not_kill_the_worker(
    loop: LoopThread, scratch: Scratch
) -> None:
    async def scenario() -> list[Cell]:
        async with Session(
            cwd=str(scratch.workdir),
            env=scratch.env(),
            sandbox=_profile(scratch, processes=16),
        ) as session:
            cells = [
                await _execute(
                    session,
                    GUARD + "import os, time\nkids = []\n"
                    "for _ in range(40):  # bounded\n"
                    "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
                    "    if pid == 0:\n        time.sleep(3)\n        os._exit(0)\n"
                    "    kids.append(pid)\n",
                )
            ]
            cells.append(await _execute(session, "x = len(kids)"))
            # undo: the children go
            cells.append(
                await _execute(session, "for p in kids:\n    os.kill(p, 9)\n    os.waitpid(p, 0)")
            )
            cells.append(await _execute(session, "print(x)"))
            return cells

    cells = loop.run(scenario())
    assert [c.ename for c in cells] == [None] * 4, cells


def test_memory_bomb_is_bounded_and_named(
    inside: Any, loop: LoopThread, sessions: dict[str, Session]
) -> None:
    boxed = sessions["boxed"]
    loop.run(_execute(boxed, "kept = 'state before the bomb'"))
    first_pid = boxed.pid
    cell = inside(
        """
chunks = []
for _ in range(64):  # bounded: 1 GiB at most, 4 times the sandbox's limit
    chunks.append(b'x' * (16 * 1024 * 1024))
print('not stopped')
"""
    )
    assert "not stopped" not in cell.out, cell
    assert cell.ename == "WorkerDied" and "memory limit of 256.0 MiB" in cell.evalue, cell
    _alive(loop, sessions, "plain")
    _alive(loop, sessions)
    assert boxed.pid != first_pid
    assert loop.run(_execute(boxed, "print(kept)")).out.strip() == "state before the bomb"


# -- a sandboxed session keeps working ---------------------------------------------------


def test_input_interrupt_and_checkpoints_work_sandboxed(
    loop: LoopThread, sessions: dict[str, Session]
) -> None:
    boxed = sessions["boxed"]

    async def answer(msg: Any) -> None:
        if msg.type == MessageType.INPUT:
            await boxed.input_response(msg.id, "from the front end")

    cell = loop.run(_execute(boxed, "print(input('? '))", answer))
    assert cell.out.strip().endswith("from the front end"), cell

    async def interrupt(msg: Any) -> None:
        if msg.type == MessageType.OUTPUT and "sleeping" in msg.data:
            await boxed.interrupt()

    cell = loop.run(_execute(boxed, "import time\nprint('sleeping')\ntime.sleep(30)", interrupt))
    assert cell.ename == "KeyboardInterrupt", cell
    cell = loop.run(
        _execute(boxed, "v = 1\n%checkpoint save sbx\nv = 2\n%checkpoint restore sbx\nprint(v)")
    )
    assert cell.ename is None and cell.out.strip().endswith("1"), cell
    store = boxed.worker.sandbox_store
    assert store and os.listdir(os.path.join(store, "checkpoints"))
    # A fork would share the sandbox: refused at once, with the reason.
    from pyrepl3_kernel.session.fork import ForkError

    with pytest.raises(ForkError, match="sandboxed kernel cannot be forked"):
        loop.run(boxed.fork())


def test_crash_recovery_restores_into_a_new_sandbox(
    loop: LoopThread, sessions: dict[str, Session]
) -> None:
    boxed = sessions["boxed"]
    loop.run(_execute(boxed, "survivor = 'restored across sandboxes'"))
    old_store = boxed.worker.sandbox_store
    loop.run(_execute(boxed, "import time; time.sleep(0.5)"))  # the save lands
    cell = loop.run(_execute(boxed, "import os; os._exit(7)"))
    assert cell.ename == "WorkerDied" and "exit code 7" in cell.evalue, cell
    assert loop.run(_execute(boxed, "print(survivor)")).out.strip() == "restored across sandboxes"
    assert boxed.worker.sandbox_store != old_store and not os.path.exists(old_store or "")
    # the named checkpoints went with it
    assert loop.run(_execute(boxed, "%checkpoint restore sbx\nprint(v)")).out.strip().endswith("1")


def test_a_warm_pool_of_sandboxed_workers(
    loop: LoopThread, scratch: Scratch, sessions: dict[str, Session]
) -> None:
    async def scenario() -> list[str]:
        pool = SessionPool(
            PoolConfig(
                min_idle=1,
                max_sessions=2,
                cwd=str(scratch.workdir),
                env=scratch.env(),
                sandbox=_profile(scratch),
                warmup_code="import json",
            )
        )
        await pool.start()
        try:
            session = await pool.acquire()
            try:
                cell = await _execute(
                    session, "import os\nprint(os.readlink('/proc/self/ns/mnt'), os.getcwd())"
                )
                return cell.out.split()
            finally:
                await session.shutdown()
        finally:
            await pool.stop()

    mnt, cwd = loop.run(scenario())
    assert mnt != HOST_NS["mnt"] and cwd == str(scratch.workdir)
    # The pool's workers' stores went with them; the module's sessions' remain.
    live = {os.path.basename(s.worker.sandbox_store or "") for s in sessions.values()}
    assert set(os.listdir(scratch.store_root)) == live - {""}


# -- through Jupyter: the kernelspec (argv and pooled) and a launch's environment -------


@pytest.fixture(scope="module")
def sandbox_specs(
    pyrepl3_kernelspec: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """``sbx`` (pooled) and ``sbx-cold`` (argv) kernelspecs installed with
    --sandbox, found before the conftest's."""
    prefix = tmp_path_factory.mktemp("sandbox-specs")
    for extra in ([], ["--no-pool"]):
        name = "sbx-cold" if extra else "sbx"
        subprocess.run(
            [sys.executable, "-m", "pyrepl3_kernel.cli", "install", "--prefix", str(prefix)]
            + ["--name", name, "--sandbox", '{"memory": "512M"}', *extra],
            check=True,
            capture_output=True,
            timeout=60,
        )
    saved = os.environ["JUPYTER_PATH"]
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(prefix / "share" / "jupyter"), saved])
    try:
        yield prefix
    finally:
        os.environ["JUPYTER_PATH"] = saved


class JupyterKernel:
    """A kernel started by jupyter_client's KernelManager in ``cwd``."""

    def __init__(self, name: str, cwd: Path, env: dict[str, str] | None = None) -> None:
        from jupyter_client.manager import KernelManager

        self.km = KernelManager(kernel_name=name)
        self.km.start_kernel(cwd=str(cwd), **({"env": env} if env is not None else {}))
        self.kc = self.km.client()
        try:
            self.kc.start_channels()
            self.kc.wait_for_ready(timeout=60)
        except BaseException:
            self.close()
            raise

    def run(self, code: str, on_busy: Any = None) -> tuple[str, str | None]:
        """stdout and the error name (None if the cell succeeded)."""
        out: list[str] = []
        error: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream" and content["name"] == "stdout":
                out.append(content["text"])
                if on_busy is not None and "sleeping" in content["text"]:
                    on_busy()
            elif kind == "error":
                error.append(content["ename"])

        self.kc.execute_interactive(code, output_hook=hook, timeout=60)
        return "".join(out), (error[0] if error else None)

    def close(self) -> None:
        try:
            self.kc.stop_channels()
        finally:
            self.km.shutdown_kernel(now=False)  # the kernel removes its sandbox itself


def _jupyter_battery(kernel: JupyterKernel, workdir: Path) -> None:
    """In a Jupyter kernel: sandboxed, in its working directory, and neither
    the kernel's own ports nor the connection file nor the daemon's socket
    can be reached."""
    from pyrepl3_kernel.daemon.client import DaemonPaths

    out, error = kernel.run(
        "import os\nprint([os.readlink('/proc/self/ns/' + n) for n in ('pid', 'mnt')], os.getcwd())"
    )
    assert error is None, out
    ns, cwd = out.rsplit(" ", 1)
    assert eval(ns) != [HOST_NS["pid"], HOST_NS["mnt"]] and cwd.strip() == str(workdir)
    info = kernel.km.get_connection_info()
    ports = [info[k] for k in ("shell_port", "iopub_port", "control_port", "stdin_port", "hb_port")]
    out, error = kernel.run(
        GUARD
        + f"""
import socket
out = []
for port in {ports!r}:
    try:
        socket.create_connection(('127.0.0.1', port), timeout=2)
        out.append('connected')
    except OSError as e:
        out.append(type(e).__name__)
for path in ({kernel.km.connection_file!r}, {str(DaemonPaths.default().socket)!r}):
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        out.append('connected')
    except OSError as e:
        out.append(type(e).__name__)
print(out)
"""
    )
    assert error is None, out
    assert eval(out) == ["PermissionError"] * 5 + ["FileNotFoundError"] * 2, out


@pytest.mark.parametrize("spec", ["sbx-cold", "sbx"])
def test_sandboxed_kernelspec(spec: str, sandbox_specs: Path, scratch: Scratch) -> None:
    kernel = JupyterKernel(spec, scratch.workdir)
    try:
        if spec == "sbx":  # leased from the daemon's pool, not the cold fallback
            assert getattr(kernel.km.provisioner, "lease_id", None)
        _jupyter_battery(kernel, scratch.workdir)
        # An interrupt reaches the sandboxed worker (not bubblewrap).
        out, error = kernel.run(
            "import time\nprint('sleeping', flush=True)\ntime.sleep(30)",
            on_busy=kernel.km.interrupt_kernel,
        )
        assert error == "KeyboardInterrupt", out
        out, error = kernel.run("print(1 + 1)")
        assert (out.strip(), error) == ("2", None)
        # A restart gives a new worker in a new sandbox.
        kernel.km.restart_kernel()
        kernel.kc.wait_for_ready(timeout=60)
        out, error = kernel.run("import os\nprint(os.readlink('/proc/self/ns/mnt'), os.getcwd())")
        mnt, cwd = out.split()
        assert (mnt != HOST_NS["mnt"], cwd, error) == (True, str(scratch.workdir), None)
    finally:
        kernel.close()


def test_a_launch_env_sandboxes_a_plain_kernelspec(
    pyrepl3_kernelspec: Path, scratch: Scratch
) -> None:
    """What ``POST /api/kernels`` with ``env: {KERNEL_PYREPL3_SANDBOX: ...}``
    does (jupyter_server passes KERNEL_* variables on): the plain pooled
    kernelspec's kernel is sandboxed, from a pool of its own."""
    env = {**os.environ, "KERNEL_PYREPL3_SANDBOX": '{"network": "loopback"}'}
    kernel = JupyterKernel("pyrepl3", scratch.workdir, env=env)
    try:
        assert getattr(kernel.km.provisioner, "lease_id", None)
        out, error = kernel.run(
            GUARD
            + f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {scratch.port}), timeout=2)\n"
            "    print('connected')\nexcept OSError as e:\n    print(type(e).__name__)"
        )
        assert (out.strip(), error) == ("ConnectionRefusedError", None)
    finally:
        kernel.close()


def test_a_rest_created_kernel_is_sandboxed(
    pyrepl3_kernelspec: Path, scratch: Scratch, tmp_path: Path
) -> None:
    """``POST /api/kernels`` with ``env: {KERNEL_PYREPL3_SANDBOX: ...}``
    through a real jupyter_server (``pyrepl3-kernel gateway``)."""
    pytest.importorskip("jupyter_server")
    from test_rest_api import execute, running_server

    with running_server("gateway", tmp_path / "server") as server:
        r = server.api(
            "POST",
            "/api/kernels",
            {
                "name": "pyrepl3",
                "env": {
                    "KERNEL_PYREPL3_SANDBOX": '{"memory": "512M"}',
                    "KERNEL_WORKING_DIR": str(scratch.workdir),
                },
            },
        )
        assert r.status_code == 201, r.text
        kernel = r.json()["id"]
        r = execute(
            server,
            kernel,
            GUARD
            + "import os\n"
            + f"print(os.readlink('/proc/self/ns/mnt'), os.getcwd(), os.path.exists({str(scratch.secret)!r}))",
        )
        state = r.json()
        assert state["status"] == "ok", (state["error"], state["outputs"])
        mnt, cwd, sees_secret = state["outputs"][0]["text"].split()
        assert (mnt != HOST_NS["mnt"], cwd, sees_secret) == (True, str(scratch.workdir), "False")
        # A kernel started without it is not sandboxed.
        plain = server.start_kernel("pyrepl3")
        state = execute(server, plain, "import os\nprint(os.readlink('/proc/self/ns/mnt'))").json()
        assert state["outputs"][0]["text"].strip() == HOST_NS["mnt"], state
