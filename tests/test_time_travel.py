"""Time travel: the state after every successful cell is kept; ``%states``,
``%checkout N`` and ``%undo`` (and the native ``Session.states()``,
``checkout()``, ``undo()``, the ``pyrepl3.checkpoint`` comm's ``states`` and
``checkout``, REST ``/states``) go back to any of them, in place.

Most tests drive one supervised :class:`Session` per test group on a loop
shared by the module (a worker starts in about 0.2 s); each session saves
into its own temporary autosave directory. The REST test starts one
``pyrepl3-kernel gateway`` (which goes through the comm).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from session_helpers import collect, of_type, reply_of, stream_text

from pyrepl3_kernel.protocol import MessageType
from pyrepl3_kernel.session import Session
from pyrepl3_kernel.session.timetravel import TimeTravelError

TIMEOUT = 60.0


class Driver:
    """A supervised Session driven from sync tests on the module's loop.

    A cell run through :meth:`cell` or :meth:`ex` waits for its state to be
    saved (:meth:`settle`) unless told not to: cells that follow each other
    faster than saves complete are coalesced into one state (see
    ``test_a_burst_of_cells_is_coalesced_not_slowed``), and the tests that
    check out a given cell need each cell's own state, whatever the load."""

    def __init__(self, loop: asyncio.AbstractEventLoop, autosave: Path, **kw: Any) -> None:
        self.loop = loop
        self.autosave = autosave
        self.session = Session(autosave=str(autosave), **kw)
        self.run(self.session.start())

    def run(self, coro: Any, timeout: float = TIMEOUT) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def close(self) -> None:
        self.run(self.session.shutdown())

    def settle(self) -> None:
        """Wait until the state of the last cell is saved (listing the
        states saves a pending state and waits for every save to land)."""
        self.run(self.session.states())

    def cell(self, code: str, settle: bool = True) -> tuple[str, str, Any]:
        msgs = self.run(collect(self.session, code))
        if settle and self.session.is_ready:
            self.settle()
        return stream_text(msgs), stream_text(msgs, "stderr"), reply_of(msgs)

    def ex(self, code: str, settle: bool = True) -> str:
        """Run ``code``, which must succeed; its stdout."""
        msgs = self.run(collect(self.session, code))
        if settle:
            self.settle()
        errors = of_type(msgs, MessageType.ERROR)
        assert not errors and reply_of(msgs).status == "ok", [
            (e.ename, e.evalue) for e in errors
        ] or stream_text(msgs, "stderr")
        return stream_text(msgs)

    def usage_error(self, code: str) -> str:
        reply = reply_of(self.run(collect(self.session, code)))
        assert reply.status == "error" and reply.ename == "UsageError", reply
        return str(reply.evalue)

    def value(self, expression: str) -> Any:
        return json.loads(self.ex(f"import json as _j; print(_j.dumps({expression})); del _j"))

    def names(self) -> list[str]:
        return self.value(  # type: ignore[no-any-return]
            "sorted(k for k in globals() if not k.startswith('_') and k not in "
            "('In', 'Out', 'exit', 'quit', 'get_ipython', 'open'))"
        )

    def states(self) -> list[dict[str, Any]]:
        return self.run(self.session.states())["states"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


@pytest.fixture
def driver(loop: asyncio.AbstractEventLoop, tmp_path: Path) -> Iterator[Driver]:
    d = Driver(loop, tmp_path / "autosave")
    try:
        yield d
    finally:
        d.close()


def blobs_of(manifest: dict[str, Any]) -> set[str]:
    return {e["blob"] for e in manifest["names"].values() if e.get("blob")}


def state_files(autosave: Path) -> list[Path]:
    return sorted((autosave / "states").glob("*.json"))


# -- the magics ----------------------------------------------------------------------------


def test_the_store_is_its_owners_alone(driver: Driver, tmp_path: Path) -> None:
    """Saved state is the user's data: no other user may list or read it."""
    driver.ex("secret = [1]")
    driver.ex("secret.append(2)")
    driver.run(driver.session.states())
    dirs = [tmp_path / "autosave", *(p for p in (tmp_path / "autosave").rglob("*") if p.is_dir())]
    assert len(dirs) >= 3, dirs  # the store, its objects and its states
    assert {oct(d.stat().st_mode & 0o777) for d in dirs} == {"0o700"}, dirs


def test_states_checkout_forwards_and_backwards(driver: Driver) -> None:
    driver.ex("x = 1")  # In [1]
    driver.ex("y = [1, 2]")  # In [2]
    driver.ex("y.append(3); z = 'zz'")  # In [3]
    driver.ex("def f(a):\n    return a + x\nclass P:\n    def m(self):\n        return x * 10")
    listing = driver.ex("%states")
    for line in ("In [1]", "+x", "In [2]", "+y", "In [3]", "+z; ~y", "In [4]", "+P, +f", "<- now"):
        assert line in listing, listing
    assert "budget 8.0 GiB, up to 100 states" in listing

    # Backwards: names bound later are removed, changed ones restored.
    out, _, reply = driver.cell("%checkout 2")  # In [6]
    assert "checked out the state after cell 2" in out and "removed (bound later): P, f, z" in out
    # The counter goes on: the next cell is In [7], not In [3].
    assert reply.execution_count == 6 and driver.cell("x")[2].execution_count == 7
    assert driver.names() == ["x", "y"] and driver.value("y") == [1, 2]
    # Forwards again: functions and classes work, inspect still finds them.
    driver.ex("%checkout 4")
    assert driver.names() == ["P", "f", "x", "y", "z"]
    assert driver.value("[f(1), P().m(), y]") == [2, 10, [1, 2, 3]]
    source = driver.value(
        "[__import__('inspect').getsource(f), __import__('inspect').getsource(P)]"
    )
    assert source[0].startswith("def f(a):") and source[1].startswith("class P:")
    # Functions see the live namespace after a checkout.
    driver.ex("x = 5")
    assert driver.value("[f(1), P().m()]") == [6, 50]
    # Every state is listed, with the checkouts saying where they went.
    listing = driver.ex("%states")
    assert "back to In [2]" in listing and "back to In [4]" in listing, listing


def test_undo_twice_and_the_native_api(driver: Driver) -> None:
    driver.ex("a = 1")
    driver.ex("b = {'k': 1}")
    driver.ex("b['k'] = 2; c = 3")
    driver.ex("print(a)")  # changes nothing: undo passes over it
    out = driver.ex("%undo")
    assert "state after cell 2" in out and "removed (bound later): c" in out
    assert driver.value("b") == {"k": 1} and driver.names() == ["a", "b"]
    driver.ex("%undo")
    assert driver.names() == ["a"]
    assert "nothing to undo" in driver.usage_error("%undo")
    # Native: states(), checkout(), undo() on the Session.
    states = driver.states()
    assert [s["cell_number"] for s in states][:3] == [1, 2, 3]
    assert states[2]["added"] == ["c"] and states[2]["changed"] == ["b"]
    assert states[0]["bytes_added"] > 0 and isinstance(states[0]["created"], float)
    report = driver.run(driver.session.checkout(3))
    assert report["cell_number"] == 3 and sorted(report["saved"]) == ["a", "b", "c"]
    assert driver.value("[a, b, c]") == [1, {"k": 2}, 3]
    report = driver.run(driver.session.undo())
    assert report["cell_number"] == 2 and report["removed"] == ["c"]
    with pytest.raises(TimeTravelError, match="not kept"):
        driver.run(driver.session.checkout(0))
    assert driver.names() == ["a", "b"]


def test_checkout_leaves_unchanged_objects_in_place(driver: Driver) -> None:
    driver.ex("import numpy as np\nbig = np.arange(100_000.0)\nsmall = [1]")  # In [1]
    driver.ex("small.append(2)\nbig2 = big[:10].copy()")  # In [2]
    ids = driver.value("[id(big), id(small)]")
    out = driver.ex("%checkout 1")
    assert "unchanged, left in place" in out
    after = driver.value("[id(big), id(small), small, 'big2' in globals()]")
    assert after[0] == ids[0] and after[1] != ids[1] and after[2:] == [[1], False]
    # Changed in place since its state: read back, not kept.
    driver.ex("big[0] = -1.0")
    driver.ex("%checkout 1")
    assert driver.value("float(big[0])") == 0.0


def test_checkout_of_a_cell_that_saved_no_state_takes_the_one_before(driver: Driver) -> None:
    driver.ex("v = 1")  # In [1]
    assert driver.cell("v = 2\n1 / 0")[2].status == "error"  # In [2] failed: no state
    driver.ex("w = 3")  # In [3]
    out = driver.ex("%checkout 2")
    assert "state after cell 1" in out and "cell 2 saved no state of its own" in out
    assert driver.names() == ["v"] and driver.value("v") == 1
    assert "has not run yet" in driver.usage_error("%checkout 99")
    assert "usage: %checkout N" in driver.usage_error("%checkout")
    assert "cell number" in driver.usage_error("%checkout soon")


def _damage_missing(blob: Path) -> None:
    blob.unlink()


def _damage_flip(blob: Path) -> None:
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_damage_missing, _damage_flip], ids=["missing", "corrupt"])
def test_checkout_of_a_damaged_state_is_refused_and_changes_nothing(
    driver: Driver, damage: Any
) -> None:
    driver.ex("import numpy as np\nold = np.arange(1000.0)\nkeep = 'k'")  # In [1]
    driver.ex("old = 'replaced'\nnew = [1, 2]")  # In [2]
    driver.states()  # lets the saves land
    first = json.loads(state_files(driver.autosave)[0].read_text())
    digest = first["names"]["old"]["blob"]
    damage(driver.autosave / "objects" / digest)
    message = driver.usage_error("%checkout 1")
    assert "cannot check out the state after cell 1" in message
    assert "the namespace was not changed" in message
    assert ("missing" in message) if damage is _damage_missing else ("corrupt" in message)
    assert driver.value("[old, new, keep]") == ["replaced", [1, 2], "k"]
    with pytest.raises(TimeTravelError, match="namespace was not changed"):
        driver.run(driver.session.checkout(1))


# -- coalescing: cells faster than saves ------------------------------------------------

#: Its saves (``__reduce__`` runs in the saving child) last while ``flag`` exists.
BLOCKED_SAVE = (
    "class Blocked:\n"
    "    def __reduce__(self):\n"
    "        import os, time\n"
    "        deadline = time.monotonic() + 30\n"
    "        while os.path.exists({flag!r}) and time.monotonic() < deadline:\n"
    "            time.sleep(0.01)\n"
    "        return (Blocked, ())\n"
)


def test_a_burst_of_cells_is_coalesced_not_slowed(driver: Driver, tmp_path: Path) -> None:
    """With every save slot busy (three saves blocked), the next cells run
    without waiting; their states are coalesced into one save, which
    ``%states`` shows; a checkout of one of them is refused naming the
    nearest kept states, the namespace untouched; the coalesced state checks
    out and is what a crash brings back."""
    flag = tmp_path / "saves-blocked"
    flag.touch()
    try:
        driver.ex(BLOCKED_SAVE.format(flag=str(flag)) + "b = Blocked()\nn = 1", settle=False)
        driver.ex("b = Blocked()\nn = 2", settle=False)
        driver.ex("b = Blocked()\nn = 3", settle=False)  # In [3]: three saves blocked
        for _ in range(6):  # In [4] .. In [9]: no slot, no wait
            driver.ex("n = n + 1\nm = n * 10", settle=False)
    finally:
        flag.unlink()
    states = driver.states()  # saves the waiting state, lets every save land
    assert [s["cell_number"] for s in states] == [1, 2, 3, 9]
    assert states[3]["covers"] == [4, 9] and states[3]["changed"] == ["n"]
    assert states[3]["added"] == ["m"] and states[2]["covers"] == [3, 3]
    listing = driver.ex("%states")
    assert "In [9]" in listing and "also holds In [4]..In [8] (ran back to back: coalesced" in (
        listing
    ), listing
    message = driver.usage_error("%checkout 6")
    assert message.startswith("the state after cell 6 is not kept: In [4]..In [8] ran back to back")
    assert "nearest kept states are after cell 3 and after cell 9" in message
    assert "the namespace was not changed" in message
    with pytest.raises(TimeTravelError, match="coalesced into the state after cell 9"):
        driver.run(driver.session.checkout(4))
    assert driver.value("[n, m]") == [9, 90]
    out = driver.ex("%checkout 3")
    assert "removed (bound later): m" in out and driver.value("n") == 3
    driver.ex("%checkout 9")
    assert driver.value("[n, m]") == [9, 90]
    out, err, reply = driver.cell("import os\nos._exit(3)")
    assert reply.status == "error" and "restored" in err, err
    assert driver.value("[n, m]") == [9, 90]


# -- retention and garbage collection --------------------------------------------------


def _referenced(autosave: Path) -> set[str]:
    used: set[str] = set()
    for path in [*state_files(autosave), autosave / "auto.json"]:
        used |= blobs_of(json.loads(path.read_text()))
    return used


def test_retention_by_count_and_garbage_collection(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    d = Driver(loop, tmp_path / "auto", keep_states=3)
    try:
        for i in range(6):
            d.ex(f"x{i} = bytes([{i}]) * 100_000")
        states = d.states()
        assert [s["cell_number"] for s in states] == [4, 5, 6]
        assert d.run(d.session.states())["retention"]["keep"] == 3
        # Exactly the blobs the kept states name are on disk.
        on_disk = {p.name for p in (d.autosave / "objects").iterdir()}
        assert on_disk == _referenced(d.autosave)
        assert "not kept" in d.usage_error("%checkout 2")
        d.ex("%checkout 4")
        assert d.names() == ["x0", "x1", "x2", "x3"]
    finally:
        d.close()


def test_retention_by_bytes_keeps_the_newest_state(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    d = Driver(loop, tmp_path / "auto", states_budget="2500K")
    try:
        for _i in range(4):  # each state holds 1 MB, a new one
            d.ex("import os\nb = os.urandom(1_000_000)")
        cells = [s["cell_number"] for s in d.states()]
        assert cells == [3, 4], cells  # 2 MB fit, a third would not
        # An object the budget cannot hold is left out of the state, and said so.
        d.ex("big = os.urandom(3_000_000)")
        states = d.states()
        assert [s["cell_number"] for s in states] == [3, 4, 5]
        assert states[-1]["skipped"] == ["big"]
        assert "not saved: big" in d.ex("%states")
        report = d.run(d.session.checkout(5))
        assert "disk budget" in report["skipped"]["big"] and "big" in report["removed"]
        assert {p.name for p in (d.autosave / "objects").iterdir()} == _referenced(d.autosave)
        used = d.run(d.session.states())["disk_bytes"]
        assert 2_000_000 < used < 2_200_000  # two 1 MB values, nothing else
        assert d.session.usage()["pyrepl3"]["states_disk_bytes"] == used
    finally:
        d.close()


def test_saves_running_together_never_lose_a_needed_blob(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    """Cells that end while earlier saves still write: every state lands
    (in order), retention and GC run between them, and every kept state
    checks out. Three saves run at once (the worker's slots), so three
    cells in a row each keep their state; then the test lets them land."""
    d = Driver(loop, tmp_path / "auto", keep_states=4)
    try:
        d.ex("import numpy as np\nbase = np.random.default_rng(0).random(2_000_000)")
        for i in range(8):
            d.ex(f"base[{i}] = -1.0\nv{i} = base.sum()", settle=i % 3 == 2)
        states = d.states()
        assert [s["cell_number"] for s in states] == [6, 7, 8, 9]
        assert all("error" not in s for s in states)
        for path in state_files(d.autosave):
            for digest in blobs_of(json.loads(path.read_text())):
                assert (d.autosave / "objects" / digest).exists(), (path.name, digest)
        d.ex("%checkout 7")
        assert d.value("[float(base[5]), float(base[6]), 'v6' in globals()]") == [
            -1.0,
            d.value("float(base[6])"),
            False,
        ]
        assert d.value("float(base[5])") == -1.0 and d.value("float(base[6])") != -1.0
    finally:
        d.close()


# -- crash recovery ----------------------------------------------------------------------


ALIGNED = (
    "[bool(arr.flags.aligned), arr.ctypes.data % 64, bool(arr.flags.writeable), "
    "arr.sum().hex(), bool(ro.flags.writeable)]"
)


def test_history_and_aligned_arrays_survive_a_worker_crash(driver: Driver) -> None:
    driver.ex(
        "import numpy as np\narr = np.random.default_rng(1).random(100_001)\n"
        "ro = np.arange(7); ro.flags.writeable = False"
    )  # In [1]
    expected = driver.value(ALIGNED)
    expected[1] = 0  # restored data starts at a 64-byte boundary (numpy's own: 16)
    driver.ex("s = 'second'")  # In [2]
    pid = driver.session.pid
    out, err, reply = driver.cell("import os\nos._exit(3)")
    assert reply.status == "error" and "restored" in err, err
    assert driver.session.pid != pid
    # Crash recovery is a checkout of the newest state; the arrays come back aligned.
    assert driver.value(ALIGNED) == expected
    assert expected[0] and expected[2]
    assert driver.value("s") == "second"
    # The earlier states are still there, and still check out.
    listing = driver.ex("%states")
    assert "In [1]" in listing and "In [2]" in listing
    driver.ex("%checkout 1")
    assert driver.names() == ["arr", "np", "ro"] and driver.value(ALIGNED) == expected


# -- REST (through the pyrepl3.checkpoint comm) -------------------------------------------


def test_rest_states_and_checkout(
    pyrepl3_kernelspec: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from test_rest_api import execute, running_server

    with running_server("gateway", tmp_path_factory.mktemp("tt-gateway")) as server:
        kernel = server.start_kernel()
        base = f"/api/pyrepl3/kernels/{kernel}/states"
        counts = []
        for code in ("a = 1", "b = [a, 2]", "b.append(3)\nc = 'x'"):
            state = execute(server, kernel, code).json()
            assert state["status"] == "ok", state
            counts.append(state["execution_count"])
        r = server.api("GET", base)
        assert r.status_code == 200, r.text
        listing = r.json()
        assert [s["cell_number"] for s in listing["states"]] == counts
        assert listing["states"][2]["added"] == ["c"] and listing["states"][2]["changed"] == ["b"]
        assert listing["current"] == listing["states"][-1]["seq"] and listing["disk_bytes"] > 0
        r = server.api("POST", f"{base}/{counts[1]}/checkout")
        assert r.status_code == 200, r.text
        assert r.json()["cell_number"] == counts[1] and r.json()["removed"] == ["c"]
        state = execute(server, kernel, "print(a, b, 'c' in globals())").json()
        assert state["outputs"][0]["text"] == "1 [1, 2] False\n", state
        # A checkout by request (not a cell) is saved as a state of its own.
        states = server.api("GET", base).json()["states"]
        assert states[-2]["at"] == listing["states"][1]["seq"], states
        r = server.api("POST", f"{base}/0/checkout")
        assert r.status_code == 404 and "not kept" in r.json()["message"], r.text
        # Crash, then the history is still there and checks out.
        assert execute(server, kernel, "import os\nos._exit(1)").json()["status"] == "error"
        assert [s["cell_number"] for s in server.api("GET", base).json()["states"]][:3] == counts
        assert server.api("POST", f"{base}/{counts[2]}/checkout").status_code == 200
        state = execute(server, kernel, "print(b, c)").json()
        assert state["outputs"][0]["text"] == "[1, 2, 3] x\n", state
        # Cells run while every save slot is busy are coalesced: a checkout of
        # one of them is refused (404), naming the kept states.
        flag = tmp_path_factory.mktemp("tt-blocked") / "saves-blocked"
        flag.touch()
        server.api("GET", base)  # every save landed: the next three fork at once
        try:
            code = BLOCKED_SAVE.format(flag=str(flag)) + "blocked = Blocked()"
            assert execute(server, kernel, code).json()["status"] == "ok"
            for code in ("blocked = Blocked()", "blocked = Blocked()", "n = 1", "n = 2"):
                counts.append(execute(server, kernel, code).json()["execution_count"])
        finally:
            flag.unlink()
        states = server.api("GET", base).json()["states"]
        assert states[-1]["cell_number"] == counts[-1] and states[-1]["covers"][0] < counts[-1]
        r = server.api("POST", f"{base}/{counts[-2]}/checkout")
        assert r.status_code == 404 and "coalesced" in r.json()["message"], r.text


# -- saves proportional to the change: nothing is missed -------------------------------------

#: (setup, the cell that changes something, what must hold in its state)
DIRTY_CASES = {
    "alias": ("a = [1]\nb = a", "b.append(2)", "a == [1, 2] and a is b"),
    "container": ("x = [1]\nc = [x]", "c[0].append(2)", "x == [1, 2] and c[0] is x"),
    "deep container": (
        "inner = [1]\nholder = {'deep': ([inner],)}",
        "inner.append(2)",
        "holder['deep'][0][0] == [1, 2]",
    ),
    "instance attribute": (
        "class Box:\n    pass\nbox = Box()\nitems = [1]\nbox.items = items",
        "items.append(2)",
        "box.items == [1, 2] and items == [1, 2]",
    ),
    "function mutating a global": (
        "counter = {'n': 0}\ndef bump():\n    counter['n'] += 1",
        "bump()",
        "counter == {'n': 1}",
    ),
    "method mutating a global": (
        "total = []\nclass K:\n    def inc(self):\n        total.append(1)\nk = K()",
        "k.inc()",
        "total == [1]",
    ),
    "exec of a code string": ("q = []\ncode = 'q.append(9)'", "exec(code)", "q == [9]"),
    "globals()": (
        "g = [0]",
        "globals()['made'] = [5]\nglobals()['g'].append(1)",
        "made == [5] and g == [0, 1]",
    ),
    "numpy view": (
        "import numpy as np\nbase = np.zeros(10)\nview = base[2:5]",
        "view[0] = 7",
        "base[2] == 7 and view[0] == 7",
    ),
}


def test_incremental_saves_never_miss_a_change(driver: Driver) -> None:
    driver.ex("import numpy as np\nbig = np.arange(2_000_000.0)")  # never touched again
    cells = {}
    for case, (setup, change, _) in DIRTY_CASES.items():
        driver.ex(setup)
        out, err, reply = driver.cell(change)
        assert reply.status == "ok", (case, err)
        cells[case] = reply.execution_count
    # A cell that fails still counts: its change is in the next state.
    driver.ex("failing = {'a': 1}")
    assert driver.cell("failing['a'] = 2\n1 / 0")[2].status == "error"
    cells["failed cell"] = driver.cell("unrelated = 1")[2].execution_count
    states = {s["cell_number"]: s for s in driver.states()}
    manifests = {}
    for path in state_files(driver.autosave):
        manifest = json.loads(path.read_text())
        manifests[manifest["cell_number"]] = manifest
    # The saves were incremental (but for the cells using globals()/exec), and
    # the untouched array kept its blob all along.
    first = min(manifests)
    for case, cell in cells.items():
        incremental = manifests[cell]["incremental"]
        assert incremental is (case not in ("globals()", "exec of a code string")), case
        assert manifests[cell]["names"]["big"]["blob"] == manifests[first]["names"]["big"]["blob"]
        assert "big" not in states[cell]["changed"]
    # Every change is in its state: check each out (in place) and look.
    checks = {**{c: v[2] for c, v in DIRTY_CASES.items()}, "failed cell": "failing == {'a': 2}"}
    for case, cell in cells.items():
        driver.ex("a = b = x = c = inner = holder = items = box = counter = total = q = g = 0")
        driver.ex(f"%checkout {cell}")
        assert driver.value(f"bool({checks[case]})") is True, case


# -- large buffers by the chunk -------------------------------------------------------------


def test_large_arrays_are_saved_by_the_chunk(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    d = Driver(loop, tmp_path / "auto", keep_states=5)
    try:
        d.ex("import numpy as np\nbig = np.random.default_rng(7).random(5_000_000)")  # 40 MB
        first = d.states()[-1]
        assert first["bytes_added"] > 40_000_000
        manifest = json.loads(state_files(d.autosave)[-1].read_text())
        chunks = manifest["names"]["big"]["chunks"]["0"]
        assert len(chunks) == 10  # 4 MiB chunks
        original = d.value("big.sum().hex()")
        # 1% changed, in one place: one chunk written, not the array.
        d.ex("big[:50_000] += 1.0")
        changed = d.states()[-1]
        assert 4_000_000 < changed["bytes_added"] < 5_000_000, changed
        # Untouched: nothing of it written.
        d.ex("other = 1")
        assert d.states()[-1]["bytes_added"] < 10_000
        # Back before the change: bit for bit, aligned.
        d.ex(f"%checkout {first['cell_number']}")
        assert d.value("[big.sum().hex(), bool(big.flags.aligned), big.ctypes.data % 64]") == [
            original,
            True,
            0,
        ]
        # A crash brings it back aligned too (crash recovery reads the chunks).
        assert d.cell("import os\nos._exit(1)")[2].status == "error"
        assert d.value("[big.sum().hex(), big.ctypes.data % 64, bool(big.flags.writeable)]") == [
            original,
            0,
            True,
        ]
        # The first save after the recovery is incremental: the array is not hashed again.
        d.ex("after_crash = 1")
        d.states()
        newest = json.loads(state_files(d.autosave)[-1].read_text())
        assert newest["incremental"] is True and newest["bytes_added"] < 10_000
        # Retention dropped the first states; every chunk a kept state names is there,
        # and nothing else.
        on_disk = {p.name for p in (d.autosave / "objects").iterdir()}
        needed: set[str] = set()
        for path in [*state_files(d.autosave), d.autosave / "auto.json"]:
            for entry in json.loads(path.read_text())["names"].values():
                needed |= {entry["blob"]} if entry.get("blob") else set()
                for digests in (entry.get("chunks") or {}).values():
                    needed |= set(digests)
        assert on_disk == needed
        # A corrupt chunk: the checkout is refused, the namespace untouched.
        latest = json.loads(state_files(d.autosave)[-1].read_text())
        victim = d.autosave / "objects" / latest["names"]["big"]["chunks"]["0"][3]
        data = bytearray(victim.read_bytes())
        data[100] ^= 0xFF
        victim.write_bytes(bytes(data))
        d.ex("big[0] = 123.0")
        message = d.usage_error(f"%checkout {latest['cell_number']}")
        assert "corrupt" in message and "namespace was not changed" in message
        assert d.value("float(big[0])") == 123.0
    finally:
        d.close()
