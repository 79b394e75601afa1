"""What an automatic save after a small change pickles and writes: a big
dict of immutable values is saved in parts, and a change to one key
re-pickles and writes one part (``save_parts`` and ``bytes_added`` in the
state's manifest), while nothing a cell changes is ever missed (alias,
function, ``exec``, ``globals()``, a mutable value inside, a deleted key)
and every state checks out, and comes back after a crash, equal and in the
same order.

One supervised :class:`Session` for the module, saving into a temporary
autosave directory; each cell waits for its state to land.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from session_helpers import collect, of_type, reply_of, stream_text

from pyrepl3_kernel.protocol import MessageType
from pyrepl3_kernel.session import Session

TIMEOUT = 60.0
#: The checkpoint workload's dict (benchmarks/workloads.py): 10 parts.
BIG = "d = {f'k{i}': (i, i / 7, f'v{i}') for i in range(10_000)}"
#: A digest of a value's repr, printed by the kernel (order included).
FINGERPRINT = "import hashlib as _h; print(_h.sha256(repr({}).encode()).hexdigest()); del _h"


class Driver:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        autosave: Path,
        env: dict[str, str] | None = None,
        **options: Any,
    ) -> None:
        self.loop = loop
        self.autosave = autosave
        self.session = Session(autosave=str(autosave), env=env, **options)
        self.run(self.session.start())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, TIMEOUT))

    def cell(self, code: str) -> tuple[str, Any]:
        msgs = self.run(collect(self.session, code))
        if self.session.is_ready:
            self.run(self.session.states())  # the state of this cell lands
        return stream_text(msgs, "stderr"), reply_of(msgs)

    def ex(self, code: str) -> str:
        msgs = self.run(collect(self.session, code))
        self.run(self.session.states())
        errors = of_type(msgs, MessageType.ERROR)
        assert not errors and reply_of(msgs).status == "ok", [
            (e.ename, e.evalue) for e in errors
        ] or stream_text(msgs, "stderr")
        return stream_text(msgs)

    def value(self, expression: str) -> Any:
        return json.loads(self.ex(f"import json as _j; print(_j.dumps({expression})); del _j"))

    def fingerprint(self, expression: str) -> str:
        return self.ex(FINGERPRINT.format(expression)).strip()

    def newest(self) -> dict[str, Any]:
        """The newest state's manifest."""
        path = sorted((self.autosave / "states").glob("*.json"))[-1]
        return json.loads(path.read_text())  # type: ignore[no-any-return]

    def numbered(self, code: str) -> int:
        """Run ``code``, which must succeed; its cell number (``In [N]``)."""
        err, reply = self.cell(code)
        assert reply.status == "ok", err
        return int(reply.execution_count)


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    loop = asyncio.new_event_loop()
    d = None
    try:
        d = Driver(loop, tmp_path_factory.mktemp("save-cost") / "autosave")
        yield d
    finally:
        if d is not None:
            d.run(d.session.shutdown())
        loop.close()


def test_a_change_to_one_key_pickles_and_writes_one_part(driver: Driver) -> None:
    cell_before = driver.numbered(BIG)
    first = driver.newest()
    assert first["names"]["d"]["parts"]["items"] == 1024
    assert first["save_parts"]["d"] == [10, 0]  # every part pickled the first time
    assert first["version"] == 3  # what a kernel needs to read parts
    whole = first["names"]["d"]["size"]
    before = driver.fingerprint("d")

    driver.ex("gen = (i for i in range(3))")  # cannot be saved
    cell_changed = driver.numbered("d['k1'] = (1, 2.5, 'changed')")
    state = driver.newest()
    # Left out again, with its reason, without being pickled again.
    assert state["names"]["gen"]["status"] == "skipped"
    assert "generator" in state["names"]["gen"]["reason"]
    assert state["incremental"] is True
    assert state["save_parts"]["d"] == [1, 9]  # one part pickled, nine taken as they were
    assert state["changed"] == ["d"]
    assert [s["skipped"] for s in driver.run(driver.session.states())["states"][-1:]] == [["gen"]]
    # What the save wrote: that part and the dict's small index blob.
    assert 0 < state["bytes_added"] < whole // 5

    driver.ex("d['k9999'] = None")  # the last part
    assert driver.newest()["save_parts"]["d"] == [1, 9]
    driver.ex("del d['k5000']")  # leaves a hole in its part only
    assert driver.newest()["save_parts"]["d"] == [1, 9]
    cell_after = driver.numbered("d['new'] = 'appended'")  # grows the last part
    assert driver.newest()["save_parts"]["d"] == [1, 9]
    after = driver.fingerprint("d")

    # Each state checks out equal, in the same order.
    driver.ex(f"%checkout {cell_before}")
    assert driver.fingerprint("d") == before
    assert driver.value("d['k1']") == [1, 1 / 7, "v1"]
    driver.ex(f"%checkout {cell_changed}")
    assert driver.value("d['k1']") == [1, 2.5, "changed"]
    assert driver.value("['new' in d, 'k5000' in d]") == [False, True]
    driver.ex(f"%checkout {cell_after}")
    assert driver.fingerprint("d") == after != before
    assert driver.value("[list(d)[4999:5001], list(d)[-1]]") == [["k4999", "k5001"], "new"]
    # After checkouts the next saves go on in parts from the state checked out.
    driver.ex(f"%checkout {cell_before}")
    cell_k2 = driver.numbered("d['k2'] = 'after checkouts'")
    driver.ex("d['k3'] = 'and one more'")
    assert driver.newest()["save_parts"]["d"] == [1, 9]
    driver.ex(f"%checkout {cell_k2}")
    assert driver.value("[d['k1'][2], d['k2'], d['k3']]") == [
        "v1",
        "after checkouts",
        [3, 3 / 7, "v3"],
    ]
    assert driver.value("list(d)[:3]") == ["k0", "k1", "k2"]


def test_no_change_to_a_big_dict_is_missed(driver: Driver) -> None:
    driver.ex(BIG)
    cases = {
        "alias": ("e = d", "e['k5'] = 'alias'", "d['k5'] == 'alias'"),
        "called function": (
            "def setk(k, v):\n    d[k] = v",
            "setk('k6', 'function')",
            "d['k6'] == 'function'",
        ),
        "exec": ("", "exec(\"d['k7'] = 'exec'\")", "d['k7'] == 'exec'"),
        "globals()": ("", "globals()['d']['k8'] = 'globals'", "d['k8'] == 'globals'"),
        "deleted key": ("", "del d['k100']", "list(d)[100] == 'k101' and 'k100' not in d"),
        "mutable value": (
            "d['k9'] = (1, [2])",
            "d['k9'][1].append(3)",
            "d['k9'] == (1, [2, 3])",
        ),
    }
    cells = {}
    for case, (setup, change, _) in cases.items():
        if setup:
            driver.ex(setup)
        err, reply = driver.cell(change)
        assert reply.status == "ok", (case, err)
        cells[case] = reply.execution_count
    # A dict holding a list is pickled whole (a change inside the list
    # does not change any address), and its change is still saved.
    state = driver.newest()
    assert "parts" not in state["names"]["d"] and "d" not in state.get("save_parts", {})
    assert state["version"] == 2  # no dict in parts: older kernels read it too
    for case, cell in cells.items():
        driver.ex("d = None")
        driver.ex(f"%checkout {cell}")
        assert driver.value(f"bool({cases[case][2]})") is True, case


def test_a_big_dict_in_parts_survives_a_worker_crash(driver: Driver) -> None:
    driver.ex(BIG)
    driver.ex("d['k3'] = ('third', 3.5)")
    driver.ex("d['k4000'] = ('far', -0.0)")
    state = driver.newest()
    assert state["save_parts"]["d"] == [1, 9]
    expected = driver.fingerprint("d")
    pid = driver.session.pid
    err, reply = driver.cell("import os\nos._exit(3)")
    assert reply.status == "error" and "restored" in err, err
    assert driver.session.pid != pid
    assert driver.fingerprint("d") == expected
    assert driver.value("repr(d['k4000'][1])") == "-0.0"
    # The first save after the recovery and the one after it are incremental again.
    driver.ex("d['k1'] = 'after the crash'")
    driver.ex("d['k2'] = 'and again'")
    assert driver.newest()["save_parts"]["d"] == [1, 9]
    assert driver.value("[d['k1'], d['k2']]") == ["after the crash", "and again"]


def test_the_blob_bytes_the_saves_note_are_those_on_disk(driver: Driver) -> None:
    # Retention reads the store's blob bytes from what the saves noted
    # (counted again every RECOUNT_EVERY saves), not from every blob's size.
    from pyrepl3_kernel.worker.checkpoint.retention import BLOB_BYTES_NAME, RECOUNT_EVERY

    driver.ex(BIG)
    seen = set()
    for i in range(RECOUNT_EVERY + 2):
        driver.ex(f"d['k{i}'] = {i}\nb = bytes({i * 1000})")
        noted, saves = map(int, (driver.autosave / BLOB_BYTES_NAME).read_text().split())
        on_disk = sum(p.stat().st_size for p in (driver.autosave / "objects").iterdir())
        assert noted == on_disk, (i, noted, saves)
        seen.add(saves)
    assert 0 in seen and RECOUNT_EVERY - 1 in seen  # counted, then added up to a recount


def test_a_full_history_drops_its_oldest_state_and_only_its_own_blobs(tmp_path: Path) -> None:
    # Beyond keep_states every save drops the oldest state; the blobs only it
    # named go, those a kept state or auto.json still names stay.
    from pyrepl3_kernel.worker.checkpoint.format import objects_of
    from pyrepl3_kernel.worker.checkpoint.retention import BLOB_BYTES_NAME

    loop = asyncio.new_event_loop()
    d = None
    try:
        d = Driver(loop, tmp_path / "auto", keep_states=2)
        d.ex("kept = bytes(range(256)) * 400")
        for i in range(5):
            d.ex(f"a = bytes([{i}]) * 100_000")
            manifests = [*(d.autosave / "states").glob("*.json"), d.autosave / "auto.json"]
            named = set().union(*(objects_of(json.loads(p.read_text())) for p in manifests))
            on_disk = {p.name for p in (d.autosave / "objects").iterdir()}
            assert on_disk == named, i
            noted = int((d.autosave / BLOB_BYTES_NAME).read_text().split()[0])
            assert noted == sum(p.stat().st_size for p in (d.autosave / "objects").iterdir())
        oldest = d.run(d.session.states())["states"]
        assert len(oldest) == 2
        d.ex(f"%checkout {oldest[0]['cell_number']}")  # the state of a = bytes([3]) * ...
        assert d.value("[kept[:3].hex(), a[0], len(a)]") == ["000102", 3, 100_000]
    finally:
        if d is not None:
            d.run(d.session.shutdown())
        loop.close()


def test_a_save_never_replaces_a_newer_one_also_in_a_store_without_history(
    tmp_path: Path,
) -> None:
    # The newest save's seq comes from the history's listing; a store without
    # one (older versions) is judged by auto.json's autosave_seq, as before.
    loop = asyncio.new_event_loop()
    d = None
    try:
        d = Driver(loop, tmp_path / "auto")
        d.ex("x = 1")
        auto = d.autosave / "auto.json"
        for path in (d.autosave / "states").glob("*.json"):
            path.unlink()
        newer = json.loads(auto.read_text())
        newer["autosave_seq"] = 2**62  # saved later than anything this worker saves
        auto.write_text(json.dumps(newer))
        d.ex("x = 2")
        assert json.loads(auto.read_text())["autosave_seq"] == 2**62  # not replaced
        assert not list((d.autosave / "states").glob("*.json"))
        newer["autosave_seq"] = 1  # older than the next save: replaced, and recorded
        auto.write_text(json.dumps(newer))
        d.ex("x = 3")
        states = sorted((d.autosave / "states").glob("*.json"))
        assert len(states) == 1
        seq = json.loads(states[0].read_text())["seq"]
        assert json.loads(auto.read_text())["autosave_seq"] == seq
        # From now on the history's newest state decides.
        d.ex("x = 4")
        assert len(list((d.autosave / "states").glob("*.json"))) == 2
    finally:
        if d is not None:
            d.run(d.session.shutdown())
        loop.close()


# -- finding the changed parts in the worker (no kernel) -----------------------------------
#
def test_every_nth_save_is_a_full_one(tmp_path: Path) -> None:
    # PYREPL3_STATES_FULL_EVERY=N: every Nth automatic save pickles every
    # name again, the N-1 between them only what changed (it was every N+1th).
    loop = asyncio.new_event_loop()
    d = None
    try:
        for every, pattern in (("1", [False] * 4), ("3", [True, True, False, True])):
            d = Driver(loop, tmp_path / f"every-{every}", {"PYREPL3_STATES_FULL_EVERY": every})
            d.ex(BIG)
            assert d.newest()["incremental"] is False  # the first save
            seen = []
            for i in range(len(pattern)):
                d.ex(f"d['k1'] = {i}")
                seen.append(d.newest()["incremental"])
            assert seen == pattern, every
            assert d.value("d['k1']") == len(pattern) - 1
            d.run(d.session.shutdown())
            d = None
    finally:
        if d is not None:
            d.run(d.session.shutdown())
        loop.close()


# Each runs in a fresh interpreter: the table is read only when no thread but
# the worker's own runs, and this test process has threads of its own.


def run_alone(code: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_the_entry_table_is_read_on_this_python() -> None:
    # CPython 3.11/3.12: the layout check passed, so no list copies per save.
    run_alone(
        """
        from pyrepl3_kernel.worker.checkpoint import dictscan
        assert dictscan.FAST and dictscan.alone()
        """
    )


def test_a_scan_finds_the_changed_parts_and_holds_what_it_compared() -> None:
    run_alone(
        """
        import gc
        import weakref

        from pyrepl3_kernel.worker.checkpoint import dictscan

        class Value:
            pass

        d = {f"k{i}": Value() for i in range(1000)}
        scan, changed = dictscan.scan(d, None, 100)
        assert changed == set(range(10))
        assert dictscan.scan(d, scan, 100) == (scan, set())  # nothing changed

        replaced = weakref.ref(d["k150"])
        d["k150"] = Value()
        gc.collect()
        # Held by the scan: its address cannot be reused by another object
        # before the next scan compares it.
        assert replaced() is not None
        del d["k420"]  # a hole: the entries after it keep their places
        assert dictscan.scan(d, scan, 100) == (scan, {1, 4})
        keys, values = dictscan.items(scan, 4)
        assert len(keys) == 99 and "k420" not in keys and values[0] is d["k400"]
        gc.collect()
        assert replaced() is None  # let go once compared

        for i in range(1000, 3000):  # the table is rebuilt as it grows
            d[f"k{i}"] = Value()
        scan, changed = dictscan.scan(d, scan, 100)
        assert changed >= set(range(4, 30))
        flat = [k for i in range(len(scan.digests)) for k in dictscan.items(scan, i)[0]]
        assert flat == list(d)
        """
    )


def test_with_another_thread_running_lists_are_compared_instead() -> None:
    run_alone(
        """
        import threading

        from pyrepl3_kernel.worker.checkpoint import dictscan, parts

        d = {f"k{i}": (i, str(i)) for i in range(5 * parts.PART_ITEMS)}
        ns = {"d": d}
        first = parts.before_fork(ns, {"d"}, 1).dicts["d"]
        assert first.snapshot.scan is not None and first.base is None
        stop = threading.Event()
        user = threading.Thread(target=stop.wait, name="a-user-thread")
        user.start()
        # A thread that may change the dict meanwhile: no table reading.
        assert not dictscan.alone()
        d["k1"] = "changed"
        second = parts.before_fork(ns, {"d"}, 2).dicts["d"]
        assert second.snapshot.scan is None
        assert second.base is None  # not comparable with a table's parts
        d[f"k{parts.PART_ITEMS}"] = "changed too"
        third = parts.before_fork(ns, {"d"}, 3).dicts["d"]
        assert (third.base, third.unchanged) == (2, frozenset({0, 2, 3, 4}))
        stop.set()
        user.join()
        fourth = parts.before_fork(ns, {"d"}, 4).dicts["d"]
        assert fourth.snapshot.scan is not None and fourth.base is None
        """
    )


def test_a_scan_cut_short_starts_afresh() -> None:
    run_alone(
        """
        from pyrepl3_kernel.worker.checkpoint import dictscan

        d = {f"k{i}": i for i in range(500)}
        scan, _ = dictscan.scan(d, None, 100)
        d["k1"], d["k450"] = -1, -2
        objects = dictscan._objects

        def interrupted(*args):
            raise KeyboardInterrupt  # as SIGINT would, between two steps

        dictscan._objects = interrupted
        try:
            dictscan.scan(d, scan, 100)
            raise AssertionError("not interrupted")
        except KeyboardInterrupt:
            pass
        dictscan._objects = objects
        # No part is taken for unchanged on the word of a half-done scan.
        assert dictscan.scan(d, scan, 100) == (scan, set(range(5)))
        assert dictscan.items(scan, 4)[1][50] == -2
        """
    )


def test_a_big_dict_found_to_hold_a_list_is_left_to_whole_pickling() -> None:
    run_alone(
        """
        from pyrepl3_kernel.worker.checkpoint import parts

        d = {f"k{i}": (i, str(i)) for i in range(5 * parts.PART_ITEMS)}
        ns = {"d": d}
        assert "d" in parts.before_fork(ns, {"d"}, 1).dicts
        d["k3000"] = (1, [2])  # a list inside: a change in it moves no address
        plan = parts.before_fork(ns, {"d"}, 2)
        assert "d" in plan.whole and "d" not in plan.dicts
        d["k1"] = "changed"  # not looked at again (no scan) while it is that dict
        assert "d" in parts.before_fork(ns, {"d"}, 3).whole
        ns["d"] = dict(d)
        del ns["d"]["k3000"]
        plan = parts.before_fork(ns, {"d"}, 4)
        assert "d" in plan.dicts and not plan.whole
        """
    )
