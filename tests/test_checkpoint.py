"""Checkpoints: save, restore (same worker, fresh worker, new Jupyter kernel),
corruption, incremental saves, identity, source tracking, and the three
interfaces (``%checkpoint``, the native ``checkpoint`` request, the
``pyrepl3.checkpoint`` comm).

The worker-level tests share one event loop and one worker (``main``) that
holds the issue's workload and its checkpoint; tests that need a fresh
worker start one (a worker starts in about 0.2 s). Every test runs with
``PYREPL3_CHECKPOINT_DIR`` (and ``IPYTHONDIR``) pointing into a temporary
directory, so nothing reaches the user's stores.
"""

from __future__ import annotations

import asyncio
import json
import runpy
import shutil
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from session_helpers import collect, of_type, reply_of, stream_text

from pyrepl3_kernel.protocol import CheckpointMessage, CheckpointReplyMessage, MessageType
from pyrepl3_kernel.session import WorkerProcess
from pyrepl3_kernel.worker.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    Store,
    pack_blob,
    unpack_blob,
)

TIMEOUT = 60.0

#: The issue's workload: the 12 kinds of values, set up in one cell (the one
#: benchmarks/bench_checkpoint.py measures).
WORKLOAD = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "workloads.py"))[
    "CHECKPOINT"
]

#: Prints a JSON fingerprint of the workload: equal before the save and after a restore.
FINGERPRINT = """
import hashlib as _h, json as _j
print(_j.dumps({
    "arr": [arr.dtype.str, arr.shape[0], _h.sha1(arr.tobytes()).hexdigest()],
    "df": [list(df.columns), [str(t) for t in df.dtypes], df.shape[0],
           str(pd.util.hash_pandas_object(df, index=True).sum()),
           df["s"].iloc[12345], bool(df["b"].iloc[3]), str(df["t"].iloc[-1])],
    "d": [len(d), _h.sha1(repr(sorted(d.items())).encode()).hexdigest()],
    "f": f(3), "lam": lam(1), "adder": adder(1),
    "adder_cell": adder.__closure__[0].cell_contents,
    "points": [len(points), type(points[0]) is Point, points[7].norm(),
               all(isinstance(p, Point) for p in points)],
    "m": m.sqrt(16.0),
    "fh": [fh.name, fh.mode, fh.tell(), fh.closed],
}, sort_keys=True))
del _h, _j
"""


class Worker:
    """A Session driven from sync tests on a loop shared by the module."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.session = WorkerProcess()
        self.run(self.session.start())

    def run(self, coro: Any, timeout: float = TIMEOUT) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def close(self) -> None:
        self.run(self.session.shutdown())

    def ex(self, code: str) -> str:
        """Run ``code``; its stdout. A cell that fails fails the test."""
        msgs = self.run(collect(self.session, code))
        errors = of_type(msgs, MessageType.ERROR)
        assert not errors and reply_of(msgs).status == "ok", "\n".join(
            "\n".join(e.traceback) for e in errors
        ) or stream_text(msgs, "stderr")
        return stream_text(msgs)

    def error(self, code: str) -> tuple[str, str]:
        """Run ``code``, which must fail; its (ename, evalue)."""
        msgs = self.run(collect(self.session, code))
        reply = reply_of(msgs)
        assert reply.status == "error", msgs
        return reply.ename, reply.evalue

    def value(self, expression: str) -> Any:
        """``expression`` evaluated in the worker, through JSON."""
        return json.loads(self.ex(f"import json as _j; print(_j.dumps({expression})); del _j"))

    def ck(self, action: str, name: str = "", **fields: Any) -> CheckpointReplyMessage:
        reply = self.run(
            self.session.request(CheckpointMessage(action=action, name=name, **fields))
        )
        assert isinstance(reply, CheckpointReplyMessage)
        assert reply.parent_id and reply.action == action and reply.name == name
        return reply

    def ok(self, action: str, name: str = "", **fields: Any) -> dict[str, Any]:
        reply = self.ck(action, name, **fields)
        assert reply.status == "ok", (reply.ename, reply.evalue)
        return reply.result


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The module's temporary directory; the default store is ``<it>/store``."""
    root = tmp_path_factory.mktemp("checkpoints")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYREPL3_CHECKPOINT_DIR", str(root / "store"))
        mp.setenv("IPYTHONDIR", str(root / "ipython"))
        (root / "data.txt").write_text("line1\nline2\nline3\n")
        yield root


@pytest.fixture(scope="module")
def loop(env: Path) -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


@pytest.fixture(scope="module")
def main(loop: asyncio.AbstractEventLoop, env: Path) -> Iterator[Worker]:
    """A worker holding the workload, saved as checkpoint ``work``."""
    worker = Worker(loop)
    try:
        worker.ex(f"DATA_FILE = {str(env / 'data.txt')!r}\n" + WORKLOAD + "\ndel DATA_FILE")
        worker.ex("lock.acquire()")  # saved held; comes back as a new, free lock
        worker.fingerprint = json.loads(worker.ex(FINGERPRINT))  # type: ignore[attr-defined]
        worker.report = worker.ok("save", "work")  # type: ignore[attr-defined]
        yield worker
    finally:
        worker.close()


@pytest.fixture
def fresh(loop: asyncio.AbstractEventLoop, env: Path) -> Iterator[Worker]:
    """A new worker for this test alone (a fresh process: nothing defined)."""
    worker = Worker(loop)
    try:
        yield worker
    finally:
        worker.close()


def manifest_of(store: Path, name: str) -> dict[str, Any]:
    return json.loads((store / f"{name}.json").read_text())  # type: ignore[no-any-return]


def blobs_in(store: Path) -> set[str]:
    return {p.name for p in (store / "objects").iterdir() if not p.name.startswith(".")}


# -- the workload ---------------------------------------------------------------------


def test_save_reports_every_name_of_the_workload(main: Worker, env: Path) -> None:
    report = main.report  # type: ignore[attr-defined]
    statuses = {var: entry["status"] for var, entry in report["saved"].items()}
    assert statuses == {
        "threading": "reference",
        "np": "reference",
        "pd": "reference",
        "m": "reference",
        "Point": "saved",
        "f": "saved",
        "make_adder": "saved",
        "lam": "saved",
        "adder": "saved",
        "arr": "saved",
        "df": "saved",
        "d": "saved",
        "scale": "saved",
        "points": "saved",
        "lock": "reconstructed",
        "fh": "reconstructed",
    }
    # The one that cannot come back is reported, with the reason.
    assert list(report["skipped"]) == ["gen"]
    assert "generator" in report["skipped"]["gen"]
    assert report["failed"] == {} and report["removed"] == []
    assert report["bytes_written"] > 8_000_000 and report["seconds"] > 0
    manifest = manifest_of(env / "store", "work")
    assert manifest["names"]["gen"]["status"] == "skipped"
    assert manifest["names"]["gen"]["type"] == "builtins.generator"
    assert manifest["names"]["adder"]["type"] == "builtins.function"
    assert manifest["python"][:1] == [3]


def test_restore_into_a_fresh_worker(main: Worker, fresh: Worker) -> None:
    fresh.ex("import numpy, pandas")
    report = fresh.ok("restore", "work")
    assert report["failed"] == {}
    assert report["skipped"] == {"gen": main.report["skipped"]["gen"]}  # type: ignore[attr-defined]
    assert sorted(report["saved"]) == sorted(main.report["saved"])  # type: ignore[attr-defined]
    assert report["removed"] == ["numpy", "pandas"]  # not in the checkpoint
    # Every value is back: same fingerprint (arrays, frame, dict, functions,
    # closure, class and instances, module, file position).
    assert json.loads(fresh.ex(FINGERPRINT)) == main.fingerprint  # type: ignore[attr-defined]
    assert fresh.value("[m is __import__('math'), 'gen' in globals()]") == [True, False]
    # The function reads the live global: rebinding it changes its result.
    assert fresh.value("f(3)") == 6
    fresh.ex("scale = 5")
    assert fresh.value("f(3)") == 15
    # The file is reopened at the saved position; the lock is a new, free lock.
    assert fresh.value("[fh.readline(), fh.tell()]") == ["line2\n", 12]
    assert fresh.value("[type(lock) is type(threading.Lock()), lock.acquire(blocking=False)]") == [
        True,
        True,
    ]
    # Methods of the restored class see the restored module and other instances.
    assert fresh.value("points[3].norm() == m.hypot(3, 6)") is True


ALIGNMENT_PROBE = """
import json as _j
import numpy as _np
_out = {}
for _k, _a in {"arr": arr, "ro": ro, "f32": f32, "fort": fort, "col": df["f"].to_numpy()}.items():
    _out[_k] = [bool(_a.flags.aligned), _a.ctypes.data % 64, bool(_a.flags.writeable),
                _a.tobytes().hex()[:64], float(_a.sum()), _a.dtype.str, list(_a.shape)]
print(_j.dumps(_out))
del _j, _np, _out, _k, _a
"""


def test_restored_arrays_are_aligned_equal_and_writable_as_saved(
    loop: asyncio.AbstractEventLoop, fresh: Worker
) -> None:
    fresh.ex(
        "import numpy as np, pandas as pd\n"
        "arr = np.random.default_rng(3).random(300_001)\n"  # odd length: odd offsets follow
        "ro = np.arange(1001, dtype=np.int16); ro.flags.writeable = False\n"
        "f32 = np.random.default_rng(4).random(17).astype(np.float32)\n"
        "fort = np.asfortranarray(np.random.default_rng(5).random((33, 7)))\n"
        "df = pd.DataFrame({'f': np.random.default_rng(6).random(5001), 'i': np.arange(5001)})\n"
        "small = np.arange(3, dtype=np.uint8)"
    )
    before = json.loads(fresh.ex(ALIGNMENT_PROBE))
    exact = fresh.value("[arr.sum().hex(), float(df['f'].sum()).hex()]")
    fresh.ok("save", "aligned")
    other = Worker(loop)
    try:
        other.ex("import numpy, pandas")
        report = other.ok("restore", "aligned")
        assert report["failed"] == {}
        after = json.loads(other.ex(ALIGNMENT_PROBE))
        for key, (is_aligned, offset, writable, *data) in after.items():
            assert is_aligned and offset == 0, (key, after[key])
            assert writable == before[key][2], key  # read-only stays read-only
            assert data == before[key][3:], key
        # Bit for bit: the same sums, to the last bit.
        assert other.value("[arr.sum().hex(), float(df['f'].sum()).hex()]") == exact
        assert other.value("fort.flags.f_contiguous and not fort.flags.c_contiguous") is True
        other.ex("arr[0] = 1.5; fort[0, 0] = 2.5; small[0] = 9")
        assert other.error("ro[0] = 1")[0] == "ValueError"
    finally:
        other.close()


def test_restore_into_the_same_worker_undoes_changes(main: Worker) -> None:
    main.ex(
        "arr[:10] = -1.0\ndf.loc[0, 's'] = 'changed'\nd.clear()\nscale = 100\n"
        "def f(x):\n    return 'redefined'\n"
        "points.append(Point(0, 0))\nextra = 'not in the checkpoint'\nfh.read()"
    )
    before = main.value("id(arr)")
    report = main.ok("restore", "work")
    # ``gen`` could not be saved: a restore does not keep today's generator.
    assert report["removed"] == ["gen", "extra"] and report["failed"] == {}
    assert "generator" in report["skipped"]["gen"]
    assert main.value("id(arr)") != before
    assert json.loads(main.ex(FINGERPRINT)) == main.fingerprint  # type: ignore[attr-defined]
    assert main.value("'extra' in globals()") is False
    # ``clear=False`` keeps variables the checkpoint does not have.
    main.ex("extra = 1")
    report = main.ok("restore", "work", clear=False)
    assert report["removed"] == [] and main.value("extra") == 1
    main.ex("del extra\ngen = (i * i for i in range(10))\nnext(gen), next(gen)")


def test_incremental_save_rewrites_only_what_changed(main: Worker, env: Path) -> None:
    store = env / "store"
    # The worker was restored from ``work`` (previous test): saving the same
    # state again pickles to the same bytes, so every blob is reused.
    first = main.ok("save", "inc-1")
    work = manifest_of(store, "work")["names"]
    one = manifest_of(store, "inc-1")["names"]
    assert {v for v in work if work[v].get("blob") != one[v].get("blob")} == set()
    assert first["bytes_written"] == 0
    blobs = blobs_in(store)

    main.ex("d['k1'] = (1, 1.5, 'changed')")
    second = main.ok("save", "inc-2")
    two = manifest_of(store, "inc-2")["names"]
    new_blobs = blobs_in(store) - blobs
    assert new_blobs == {two["d"]["blob"]}  # only d's blob is new
    saved = [v for v, e in second["saved"].items() if e["status"] != "alias"]
    assert second["reused"] == len(saved) - 1
    assert {v for v in saved if one[v]["blob"] == two[v]["blob"]} == set(saved) - {"d"}
    # What was written is d's blob: a few hundred kB, not the 11 MB of the workload.
    d_size = second["saved"]["d"]["size"]
    assert d_size < second["bytes_written"] < d_size + 1_000 < 1_000_000

    main.ok("delete", "inc-1")
    main.ok("delete", "inc-2")
    main.ex("d['k1'] = (1, 1 / 7, 'v1')")
    assert blobs_in(store) == blobs  # delete collected d's new blob, kept work's


# -- identity ------------------------------------------------------------------------


def test_shared_references_survive(loop: asyncio.AbstractEventLoop, fresh: Worker) -> None:
    source = Worker(loop)
    try:
        source.ex(
            textwrap.dedent(
                """
                class Point:
                    def __init__(self, x):
                        self.x = x
                a = b = [1, 2, 3]
                x = [10, 20]
                y = {'a': x, 'n': 1}
                points = [Point(i) for i in range(5)]
                p = points[0]
                registry = {'first': p, 'cls': Point}
                shared = [0]
                u = [shared]
                v = [shared]
                w = [[0]]
                w2 = [w[0]]
                deep = [1]
                z = {'k': [deep]}
                """
            )
        )
        report = source.ok("save", "ids")
        assert report["saved"]["b"] == {"status": "alias", "of": "a", "type": "builtins.list"}
    finally:
        source.close()
    report = fresh.ok("restore", "ids")
    assert report["failed"] == {} and report["saved"]["b"] == {"status": "alias", "of": "a"}
    checks = fresh.value(
        "[a is b, y['a'] is x, p is points[0], type(points[0]) is Point, "
        "registry['first'] is p, registry['cls'] is Point, isinstance(p, Point)]"
    )
    assert checks == [True] * 7
    fresh.ex("a.append(4); x.append(30)")
    assert fresh.value("[b, y['a']]") == [[1, 2, 3, 4], [10, 20, 30]]
    assert fresh.value("[u[0] is shared, v[0] is shared]") == [True, True]
    # Documented limitations: a plain container shared by two names but bound
    # to none, and a named plain container nested more than one level deep in
    # another named container, come back as equal copies.
    assert fresh.value("[w[0] == w2[0], w[0] is w2[0]]") == [True, False]
    assert fresh.value("[z['k'][0] == deep, z['k'][0] is deep]") == [True, False]


# -- source tracking ------------------------------------------------------------------


SOURCES = {
    "area": "def area(r):\n    return 3 * r * r\n",
    "Circle": (
        "class Circle:\n"
        "    '''A circle.'''\n"
        "    def __init__(self, r):\n"
        "        self.r = r\n\n"
        "    def area(self):\n"
        "        return area(self.r)\n"
    ),
    "Marker": "class Marker:\n    kind = 'plain'\n",
}


def getsources(worker: Worker) -> dict[str, str]:
    return worker.value(  # type: ignore[no-any-return]
        "{k: __import__('inspect').getsource(globals()[k]) for k in ('area', 'Circle', 'Marker')}"
    )


def test_getsource_works_in_cells_and_after_a_fresh_restore(
    loop: asyncio.AbstractEventLoop, fresh: Worker
) -> None:
    source = Worker(loop)
    try:
        for code in SOURCES.values():
            source.ex(code)
        source.ex("c = Circle(2)")
        assert getsources(source) == SOURCES
        source.ok("save", "sources")
    finally:
        source.close()
    fresh.ok("restore", "sources")
    assert getsources(fresh) == SOURCES
    assert fresh.value("[c.area(), Circle.__doc__, Marker.kind]") == [12, "A circle.", "plain"]
    # A cell run after the restore has its own source too.
    fresh.ex("def later():\n    return 1\n")
    assert fresh.value("__import__('inspect').getsource(later)") == "def later():\n    return 1\n"


def test_function_is_rebuilt_from_source_when_it_cannot_be_unpickled(
    loop: asyncio.AbstractEventLoop, fresh: Worker, env: Path
) -> None:
    # An honest trigger: the function carries (as an attribute) an object of
    # a module the restoring worker cannot import. Its blob is intact but does
    # not unpickle there; its source still defines it.
    moddir = env / "only-in-the-first-worker"
    moddir.mkdir(exist_ok=True)
    (moddir / "tagmod.py").write_text("class Tag:\n    pass\n")
    source = Worker(loop)
    try:
        source.ex(
            f"import sys\nsys.path.insert(0, {str(moddir)!r})\nimport tagmod\n"
            "def double(x, *, by=2):\n    return x * by * unit\n"
            "double.tag = tagmod.Tag()\nunit = 1\ndel sys, tagmod"
        )
        source.ok("save", "rebuild")
    finally:
        source.close()
    report = fresh.ok("restore", "rebuild")
    entry = report["saved"]["double"]
    assert entry["status"] == "rebuilt" and entry["from"] == "source"
    assert "tagmod" in entry["error"]
    assert report["failed"] == {}
    # Keyword-only defaults survive the rebuild; globals are the live namespace.
    assert fresh.value("double(3)") == 6
    fresh.ex("unit = 10")
    assert fresh.value("double(3)") == 60
    assert fresh.value("hasattr(double, 'tag')") is False  # what did not unpickle is lost
    out = fresh.ex("%checkpoint restore rebuild")
    assert (
        "  rebuilt from its source: double (ModuleNotFoundError: No module named 'tagmod')" in out
    )


def test_classes_that_do_not_pickle_by_value_are_saved_as_source(
    loop: asyncio.AbstractEventLoop, fresh: Worker
) -> None:
    source = Worker(loop)
    try:
        source.ex(
            textwrap.dedent(
                """
                import dataclasses, enum, functools, typing

                PREFIX = 'item:'

                @dataclasses.dataclass
                class Item:
                    name: str
                    tags: list = dataclasses.field(default_factory=list)

                    def label(self):
                        return PREFIX + self.name

                class Color(enum.Enum):
                    RED = 1
                    BLUE = 2

                class Pair(typing.NamedTuple):
                    a: int
                    b: int = 0

                class Box:
                    def __init__(self, v):
                        self._v = v
                    @property
                    def v(self):
                        return self._v
                    @staticmethod
                    def kind():
                        return 'box'
                    @classmethod
                    def make(cls):
                        return cls(7)

                @functools.lru_cache(maxsize=None)
                def fib(n):
                    return n if n < 2 else fib(n - 1) + fib(n - 2)

                item = Item('a')
                color = Color.BLUE
                pair = Pair(1)
                box = Box.make()
                fib(20)
                """
            )
        )
        out = source.ex("%checkpoint save classes")
        assert "  saved as their source: Item, Color, Pair\n" in out
        report = source.ok("save", "classes")
        statuses = {v: report["saved"][v]["status"] for v in ("Item", "Color", "Pair", "Box")}
        assert statuses == {"Item": "source", "Color": "source", "Pair": "source", "Box": "saved"}
        assert report["skipped"] == {}
    finally:
        source.close()
    report = fresh.ok("restore", "classes")
    assert report["failed"] == {} and report["skipped"] == {}
    for var in ("Item", "Color", "Pair"):
        assert report["saved"][var]["status"] == "rebuilt", report["saved"][var]
    checks = fresh.value(
        "[type(item) is Item, item.tags == [] and Item('b').tags is not Item('c').tags, "
        "color is Color.BLUE, pair == Pair(1, 0) and type(pair) is Pair, "
        "box.v, Box.kind(), Box.make().v, fib(30), fib.cache_info().maxsize]"
    )
    assert checks == [True, True, True, True, 7, "box", 7, 832040, None]
    # Methods of a class rebuilt from source read the live namespace too.
    assert fresh.value("item.label()") == "item:a"
    fresh.ex("PREFIX = 'new:'")
    assert fresh.value("item.label()") == "new:a"


# -- corruption ------------------------------------------------------------------------


def _flip_bytes(store: Path, manifest: dict[str, Any]) -> None:
    blob = store / "objects" / manifest["names"]["data"]["blob"]
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    raw[-1] ^= 0x01
    blob.write_bytes(bytes(raw))


def _truncate_blob(store: Path, manifest: dict[str, Any]) -> None:
    blob = store / "objects" / manifest["names"]["arr"]["blob"]
    blob.write_bytes(blob.read_bytes()[:-100])


def _truncate_header(store: Path, manifest: dict[str, Any]) -> None:
    blob = store / "objects" / manifest["names"]["arr"]["blob"]
    blob.write_bytes(blob.read_bytes()[:20])


def _missing_blob(store: Path, manifest: dict[str, Any]) -> None:
    (store / "objects" / manifest["names"]["data"]["blob"]).unlink()


def _garbage_manifest(store: Path, manifest: dict[str, Any]) -> None:
    (store / "snap.json").write_bytes(b"\x00\x9f not json {{{")


def _truncated_manifest(store: Path, manifest: dict[str, Any]) -> None:
    path = store / "snap.json"
    path.write_bytes(path.read_bytes()[:200])


def _manifest_without_names(store: Path, manifest: dict[str, Any]) -> None:
    (store / "snap.json").write_text(json.dumps({**manifest, "names": 7}))


def _wrong_version(store: Path, manifest: dict[str, Any]) -> None:
    (store / "snap.json").write_text(json.dumps({**manifest, "version": FORMAT_VERSION + 1}))


def _wrong_python(store: Path, manifest: dict[str, Any]) -> None:
    (store / "snap.json").write_text(json.dumps({**manifest, "python": [3, 5]}))


CORRUPTIONS = {
    "flipped-bytes": (_flip_bytes, "does not match its digest"),
    "truncated-blob": (_truncate_blob, "truncated"),
    "truncated-blob-header": (_truncate_header, "truncated"),
    "missing-blob": (_missing_blob, "is missing"),
    "garbage-manifest": (_garbage_manifest, "corrupt (manifest"),
    "truncated-manifest": (_truncated_manifest, "corrupt (manifest"),
    "manifest-without-names": (_manifest_without_names, "corrupt"),
    "wrong-format-version": (_wrong_version, f"version {FORMAT_VERSION + 1}"),
    "wrong-python": (_wrong_python, "Python 3.5"),
}


@pytest.fixture(scope="module")
def small(loop: asyncio.AbstractEventLoop, env: Path) -> Iterator[tuple[Worker, Path]]:
    """A worker with a small namespace and its checkpoint ``snap`` (a store of its own)."""
    worker = Worker(loop)
    store = env / "small"
    try:
        worker.ex(
            "import numpy as np\ndata = {'k': list(range(100))}\narr = np.arange(1000.0)\n"
            "def g():\n    return 'g'\ncanary = 'saved'"
        )
        worker.ok("save", "snap", store=str(store))
        worker.ex("canary = 'current'\ndata = 'current'\nnew = 1\ndel g")
        yield worker, store
    finally:
        worker.close()


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_checkpoint_is_refused_and_session_untouched(
    small: tuple[Worker, Path], env: Path, corruption: str
) -> None:
    worker, pristine = small
    damage, message = CORRUPTIONS[corruption]
    store = env / f"corrupt-{corruption}"
    shutil.copytree(pristine, store)
    damage(store, manifest_of(pristine, "snap"))
    names = "sorted(k for k in globals() if k in ('arr', 'canary', 'data', 'g', 'new', 'np'))"
    visible = "sorted(k for k in globals() if k[0] != '_' and k not in ('In', 'Out'))"
    before = worker.value(visible)
    assert worker.value(names) == ["arr", "canary", "data", "new", "np"]

    reply = worker.ck("restore", "snap", store=str(store))
    assert reply.status == "error" and reply.ename == "CheckpointError"
    assert message in reply.evalue and reply.result == {}
    ename, evalue = worker.error(f"%checkpoint restore snap --store {store}")
    assert ename == "UsageError" and message in evalue
    # The session is exactly as it was: nothing restored, nothing removed.
    assert worker.value(visible) == before
    assert worker.value("[canary, data, new, float(arr.sum())]") == [
        "current",
        "current",
        1,
        499500.0,
    ]


def test_intact_copy_of_the_small_checkpoint_restores(
    small: tuple[Worker, Path], env: Path
) -> None:
    # The control for the corruption tests: the same steps without damage work.
    worker, pristine = small
    store = env / "corrupt-none"
    shutil.copytree(pristine, store)
    report = worker.ok("restore", "snap", store=str(store), clear=False)
    assert sorted(report["saved"]) == ["arr", "canary", "data", "g", "np"]
    assert worker.value("[canary, data, new, g()]") == ["saved", {"k": list(range(100))}, 1, "g"]
    worker.ex("canary = 'current'\ndata = 'current'\ndel g")


# -- interfaces ----------------------------------------------------------------------------


def test_magic_save_list_info_restore_delete(main: Worker, env: Path) -> None:
    store = env / "magic"
    saved = len(main.report["saved"])  # type: ignore[attr-defined]
    assert saved == 16
    out = main.ex(f"%checkpoint save m1 --store {store}")
    assert out.startswith(f"checkpoint 'm1': {saved} names saved in ")
    assert "MiB written" in out
    assert "  skipped gen: a generator's running state cannot be saved" in out
    out = main.ex(f"%checkpoint list --store {store}")
    assert out.startswith("m1: 17 names, 11.") and "MiB, cell " in out
    out = main.ex(f"%checkpoint info m1 --store {store}")
    lines = out.splitlines()
    assert lines[0].startswith("checkpoint 'm1': 11.") and "Python 3." in lines[0]
    assert "  m: reference (builtins.module; " in out
    assert "  fh: reconstructed (_io.TextIOWrapper; " in out
    assert "  gen: skipped (builtins.generator; a generator's running state" in out
    out = main.ex(f"%checkpoint restore m1 --store {store}")
    assert out.startswith(f"checkpoint 'm1': {saved} names restored in ")
    assert out.splitlines()[1:] == [
        "  skipped gen: a generator's running state cannot be saved; re-create it after a restore",
        "  removed (not in the checkpoint, or not restorable): gen",
    ]
    main.ex("gen = (i * i for i in range(10))\nnext(gen), next(gen)")
    assert main.ex(f"%checkpoint delete m1 --store {store}") == "checkpoint 'm1' deleted\n"
    assert main.ex(f"%checkpoint list --store {store}") == "no checkpoints\n"
    assert blobs_in(store) == set()


@pytest.mark.parametrize(
    "line, message",
    [
        ("", "usage: %checkpoint"),
        ("bogus x", "usage: %checkpoint"),
        ("save", "usage: %checkpoint"),
        ("save a b", "usage: %checkpoint"),
        ("list extra", "usage: %checkpoint"),
        ("save x --store", "--store needs a directory or URL"),
        ("save ../x", "bad checkpoint name '../x'"),
        ("restore .hidden", "bad checkpoint name '.hidden'"),
        ("restore no-such-checkpoint", "no checkpoint named 'no-such-checkpoint'"),
        ("info no-such-checkpoint", "no checkpoint named 'no-such-checkpoint'"),
        ("delete no-such-checkpoint", "no checkpoint named 'no-such-checkpoint'"),
    ],
)
def test_magic_misuse_is_a_usage_error(main: Worker, line: str, message: str) -> None:
    ename, evalue = main.error(f"%checkpoint {line}")
    assert ename == "UsageError" and message in evalue


def test_native_request_and_reply(main: Worker, env: Path) -> None:
    store = str(env / "native")
    saved = main.ok("save", "n1", store=store)
    assert set(saved) >= {
        "name",
        "saved",
        "skipped",
        "failed",
        "removed",
        "bytes_written",
        "reused",
        "seconds",
    }
    listed = main.ok("list", store=store)["checkpoints"]
    assert [c["name"] for c in listed] == ["n1"]
    info = main.ok("info", "n1", store=store)
    assert info["names"]["gen"]["status"] == "skipped" and info["python"].startswith("3.")
    assert info["size"] == sum(e.get("size", 0) for e in info["names"].values())
    restored = main.ok("restore", "n1", store=store)
    assert restored["failed"] == {} and "arr" in restored["saved"]
    assert main.ok("delete", "n1", store=store) == {"deleted": "n1"}
    for action, name, words in [
        ("restore", "n1", "no checkpoint named 'n1'"),
        ("bogus", "n1", "unknown checkpoint action 'bogus'"),
        ("save", "../x", "bad checkpoint name '../x'"),
        ("save", "", "bad checkpoint name ''"),
        ("save", "a/b", "bad checkpoint name 'a/b'"),
    ]:
        reply = main.ck(action, name, store=store)
        assert reply.status == "error" and reply.ename == "CheckpointError"
        assert words in reply.evalue and reply.result == {}
    # Nothing escaped the store through the bad names.
    assert not (env / "x.json").exists() and not (env / "native" / "a").exists()


def test_native_save_over_another_workers_checkpoint_is_refused(
    main: Worker, fresh: Worker, env: Path
) -> None:
    """A worker without a kernel (a Session) owns what it saved; another
    worker's save of that name is refused and writes nothing."""
    store = env / "owners"
    main.ok("save", "mine", store=str(store))
    before = (store / "mine.json").read_bytes()
    pid = main.value("__import__('os').getpid()")
    reply = fresh.ck("save", "mine", store=str(store))
    assert reply.status == "error" and reply.ename == "CheckpointExistsError"
    assert reply.evalue.startswith(f"checkpoint 'mine' was saved by worker {pid} (cell ")
    assert (store / "mine.json").read_bytes() == before
    ename, evalue = fresh.error(f"%checkpoint save mine --store {store}")
    assert ename == "UsageError" and "%checkpoint save mine --force" in evalue
    assert (store / "mine.json").read_bytes() == before
    assert main.ok("save", "mine", store=str(store))["replaced"]["saved_by"]["kernel"].startswith(
        f"worker-{pid}-"
    )
    out = fresh.ex(f"%checkpoint save mine --force --store {store}")
    assert "  replaced the checkpoint 'mine' of cell " in out and f" of worker {pid}, " in out
    assert fresh.ok("info", "mine", store=str(store))["saved_here"]
    assert not main.ok("info", "mine", store=str(store))["saved_here"]
    assert main.error(f"%checkpoint restore mine --force --store {store}") == (
        "UsageError",
        "--force is for save only",
    )


def test_native_force_replaces_another_workers_checkpoint(
    main: Worker, fresh: Worker, env: Path
) -> None:
    store = str(env / "forced")
    main.ok("save", "theirs", store=store)
    assert fresh.ck("save", "theirs", store=store).status == "error"
    owner = main.ok("info", "theirs", store=store)["saved_by"]
    replaced = fresh.ok("save", "theirs", store=store, force=True)["replaced"]
    assert replaced["saved_by"] == owner
    assert fresh.ok("info", "theirs", store=store)["saved_here"]


def test_checkpoint_of_an_older_format_says_its_cell_and_can_be_replaced(
    main: Worker, fresh: Worker, env: Path
) -> None:
    """Manifests written before the owner and the cell number were recorded
    (only ``execution_count``, one ahead of the cell): the cell is derived,
    and any kernel may replace them."""
    store = env / "older"
    main.ok("save", "old", store=str(store))
    manifest = manifest_of(store, "old")
    del manifest["saved_by"], manifest["cell_number"]
    manifest["execution_count"] = 7
    (store / "old.json").write_text(json.dumps(manifest))
    info = fresh.ok("info", "old", store=str(store))
    assert info["cell_number"] == 6 and info["saved_by"] is None and info["saved_here"]
    listed = fresh.ex(f"%checkpoint list --store {store}")
    assert listed.startswith("old: ") and "MiB, cell 6, " in listed
    restored = fresh.ok("restore", "old", store=str(store))
    assert restored["cell_number"] == 6 and restored["saved_by"] is None
    assert fresh.ok("save", "old", store=str(store))["replaced"]["cell_number"] == 6


def test_second_local_store_round_trip(main: Worker, fresh: Worker, env: Path) -> None:
    other = env / "elsewhere" / "nested"
    main.ok("save", "moved", store=str(other))
    assert (other / "moved.json").is_file()
    assert not (env / "store" / "moved.json").exists()
    reply = fresh.ck("restore", "moved")  # not in the default store
    assert reply.status == "error" and "no checkpoint named 'moved'" in reply.evalue
    out = fresh.ex(f"%checkpoint restore moved --store file://{other}")
    assert "names restored" in out
    assert json.loads(fresh.ex(FINGERPRINT)) == main.fingerprint  # type: ignore[attr-defined]


def test_default_store_comes_from_the_environment(main: Worker, env: Path) -> None:
    assert (env / "store" / "work.json").is_file()
    assert main.value("__import__('os').environ['PYREPL3_CHECKPOINT_DIR']") == str(env / "store")


# -- Store and blobs, in process --------------------------------------------------------------


def test_memory_store_round_trip() -> None:
    pytest.importorskip("fsspec")
    root = f"memory://pyrepl3-test-{uuid.uuid4().hex}"
    store = Store(root)
    assert store.names() == []
    parts = pack_blob(b"inband", [memoryview(b"buffer-one"), memoryview(b"2")])
    store.write_blob("abc", parts)
    assert store.has_blob("abc") and not store.has_blob("def")
    inband, buffers = unpack_blob(store.read_blob("abc"))
    assert bytes(inband) == b"inband" and [bytes(b) for b in buffers] == [b"buffer-one", b"2"]
    manifest = {"format": "pyrepl3-checkpoint", "version": FORMAT_VERSION, "names": {}}
    store.write_manifest("one", {**manifest, "names": {"x": {"blob": "abc"}}})
    store.write_manifest("two", manifest)
    assert store.names() == ["one", "two"]
    assert store.read_manifest("one")["names"] == {"x": {"blob": "abc"}}
    store.write_blob("orphan", parts)
    store.delete("two")  # collects blobs no manifest refers to
    assert store.names() == ["one"] and store.has_blob("abc") and not store.has_blob("orphan")
    with pytest.raises(CheckpointError, match="no checkpoint named 'two'"):
        store.read_manifest("two")
    with pytest.raises(CheckpointError, match="blob def is missing"):
        store.read_blob("def")
    store.delete("one")
    assert store.names() == [] and not store.has_blob("abc")


def test_blob_framing_refuses_damage() -> None:
    raw = b"".join(bytes(p) for p in pack_blob(b"pickle", [memoryview(b"x" * 100)]))
    assert bytes(unpack_blob(raw)[1][0]) == b"x" * 100
    for damaged in (raw[:-1], raw + b"!", raw[:10], raw[:17], b"NOPE" + raw[4:], b""):
        with pytest.raises(CheckpointError, match="blob is corrupt"):
            unpack_blob(damaged)


# -- through a real Jupyter kernel -----------------------------------------------------------


class JupyterKernel:
    def __init__(self) -> None:
        from jupyter_client.manager import KernelManager

        self.km = KernelManager(kernel_name="pyrepl3")
        self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=TIMEOUT)

    def close(self) -> None:
        try:
            self.kc.stop_channels()
        finally:
            self.km.shutdown_kernel(now=True)

    def execute(self, code: str) -> str:
        out: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                out.append(f"{msg['content']['ename']}: {msg['content']['evalue']}")

        reply = self.kc.execute_interactive(code, output_hook=hook, timeout=TIMEOUT)
        assert reply["content"]["status"] == "ok", out
        return "".join(out)

    def comm(self, msg_type: str, content: dict[str, Any]) -> dict[str, Any] | None:
        """Send a comm message on shell; the comm_msg it causes (or None at idle)."""
        msg = self.kc.session.msg(msg_type, content)
        self.kc.session.send(self.kc.shell_channel.socket, msg)
        msg_id = msg["header"]["msg_id"]
        deadline = time.monotonic() + TIMEOUT
        answer = None
        while True:
            try:
                got = self.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
            except Empty:
                raise AssertionError(f"no idle for {msg_type}") from None
            if got["parent_header"].get("msg_id") != msg_id:
                continue
            if got["msg_type"] == "comm_msg":
                answer = got["content"]
            if got["msg_type"] == "status" and got["content"]["execution_state"] == "idle":
                return answer


@pytest.fixture(scope="module")
def jupyter_env(
    pyrepl3_kernelspec: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    store = tmp_path_factory.mktemp("jupyter-checkpoints")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYREPL3_CHECKPOINT_DIR", str(store))
        yield store


def test_checkpoint_comm_and_restore_into_a_new_jupyter_kernel(jupyter_env: Path) -> None:
    first = JupyterKernel()
    second: JupyterKernel | None = None
    try:
        first.execute(
            "import numpy as np\nxs = np.arange(5)\nys = zs = [1, 2]\n"
            "def f(x):\n    return x + len(ys)\nclass K:\n    pass\nk = K()\n"
        )
        comm_id = uuid.uuid4().hex
        # A request may ride on the comm_open itself.
        answer = first.comm(
            "comm_open",
            {
                "comm_id": comm_id,
                "target_name": "pyrepl3.checkpoint",
                "data": {"action": "save", "name": "jk", "request_id": "r1"},
            },
        )
        assert answer is not None and answer["comm_id"] == comm_id
        data = answer["data"]
        assert data["status"] == "ok" and data["request_id"] == "r1"
        assert data["action"] == "save" and data["name"] == "jk"
        assert set(data["result"]["saved"]) == {"np", "xs", "ys", "zs", "f", "K", "k"}
        assert (jupyter_env / "jk.json").is_file()  # the default store, from the environment

        info_id = first.kc.comm_info(target_name="pyrepl3.checkpoint")
        reply = first.kc.get_shell_msg(timeout=TIMEOUT)
        while reply["parent_header"].get("msg_id") != info_id:
            reply = first.kc.get_shell_msg(timeout=TIMEOUT)
        assert reply["content"]["comms"] == {comm_id: {"target_name": "pyrepl3.checkpoint"}}

        def ask(**request: Any) -> dict[str, Any]:
            answer = first.comm("comm_msg", {"comm_id": comm_id, "data": request})
            assert answer is not None and answer["comm_id"] == comm_id
            return answer["data"]  # type: ignore[no-any-return]

        listed = ask(action="list", request_id=2)
        assert listed["status"] == "ok" and listed["request_id"] == 2
        assert [c["name"] for c in listed["result"]["checkpoints"]] == ["jk"]
        info = ask(action="info", name="jk")
        assert info["status"] == "ok" and info["result"]["names"]["zs"]["status"] == "alias"
        bad = ask(action="explode", name="jk", request_id="r3")
        assert bad["status"] == "error" and bad["ename"] == "ValueError"
        assert bad["request_id"] == "r3" and "action must be one of" in bad["evalue"]
        bad = ask(action="save", name="../x")
        assert bad["status"] == "error" and bad["ename"] == "CheckpointError"
        assert "bad checkpoint name" in bad["evalue"]
        missing = ask(action="restore", name="nope")
        assert missing["status"] == "error" and "no checkpoint named 'nope'" in missing["evalue"]
        assert ask(action="save")["status"] == "error"  # no name
        assert first.execute("print(f(1))") == "3\n"  # the kernel is fine

        closed = first.comm("comm_close", {"comm_id": comm_id, "data": {}})
        assert closed is None
        info_id = first.kc.comm_info(target_name="pyrepl3.checkpoint")
        reply = first.kc.get_shell_msg(timeout=TIMEOUT)
        while reply["parent_header"].get("msg_id") != info_id:
            reply = first.kc.get_shell_msg(timeout=TIMEOUT)
        assert reply["content"]["comms"] == {}

        # A new kernel restores it, with a per-name report.
        second = JupyterKernel()
        second.execute("before = 1")
        comm_id = uuid.uuid4().hex
        second.comm("comm_open", {"comm_id": comm_id, "target_name": "pyrepl3.checkpoint"})
        answer = second.comm(
            "comm_msg", {"comm_id": comm_id, "data": {"action": "restore", "name": "jk"}}
        )
        assert answer is not None
        result = answer["data"]["result"]
        assert answer["data"]["status"] == "ok" and result["failed"] == {}
        assert result["saved"]["zs"] == {"status": "alias", "of": "ys"}
        assert result["saved"]["np"]["status"] == "reference"
        assert result["removed"] == ["before"]
        out = second.execute("print(f(1), xs.sum(), ys is zs, type(k) is K, 'before' in dir())")
        assert out == "3 10 True True False\n"
        out = second.execute("%checkpoint info jk")
        assert "zs: alias (builtins.list; ys)" in out
    finally:
        first.close()
        if second is not None:
            second.close()


def test_failed_restore_through_the_comm_leaves_the_kernel_untouched(jupyter_env: Path) -> None:
    kernel = JupyterKernel()
    try:
        kernel.execute("value = 'kept'")
        store = jupyter_env / "broken"
        store.mkdir()
        (store / "bad.json").write_text("{not json")
        comm_id = uuid.uuid4().hex
        answer = kernel.comm(
            "comm_open",
            {
                "comm_id": comm_id,
                "target_name": "pyrepl3.checkpoint",
                "data": {"action": "restore", "name": "bad", "store": str(store)},
            },
        )
        assert answer is not None and answer["data"]["status"] == "error"
        assert "corrupt" in answer["data"]["evalue"]
        assert kernel.execute("print(value)") == "kept\n"
    finally:
        kernel.close()


def test_example_notebook_runs_on_pyrepl3(jupyter_env: Path, tmp_path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    path = Path(__file__).resolve().parent.parent / "examples" / "checkpoint_restore_rollback.ipynb"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, kernel_name="pyrepl3", timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = {
        i: out
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "error" or (out.output_type == "stream" and out.name == "stderr")
    }
    # Only the cell that fails on purpose (tagged raises-exception) has an error.
    tagged = [i for i, c in enumerate(nb.cells) if "raises-exception" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and set(errors) <= set(tagged), errors

    def text(i: int) -> str:
        return "".join(
            o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in nb.cells[i].outputs
        )

    sources = [c.source for c in nb.cells]
    save = text(sources.index("%checkpoint save demo --store {store}"))
    assert "names saved" in save and "skipped squares: a generator" in save
    restored = text(sources.index("%checkpoint restore demo --store {store}"))
    assert "removed (not in the checkpoint, or not restorable): squares, scratch" in restored
    after = next(i for i, s in enumerate(sources) if s.startswith("print(df.loc[0, 'x']"))
    assert text(after).splitlines()[:2] == ["0 1.5 100 True True", "False two"]
    there = text(next(i for i, s in enumerate(sources) if "start_new_kernel" in s))
    assert "names restored" in there and "def norm(self):" in there
    assert "(5, 2) 3.141592653589793" in there
