"""Transactions: a failing cell's effects rolled back, through a real worker.

Each test drives one worker (:class:`Session`) with the policy under test set
through the environment (``PYREPL3_TRANSACTION_POLICY``), the
``%transaction_policy`` magic or a ``%%transaction`` first line, and checks
the namespace with plain cells afterwards.
"""

from __future__ import annotations

import json
import os
import re
import textwrap

import pytest
from session_helpers import collect, of_type, reply_of, result_text, run, stream_text

from pyrepl3_kernel.protocol import MessageType
from pyrepl3_kernel.session import Session
from pyrepl3_kernel.units import parse_size
from pyrepl3_kernel.worker.transactions import PAYLOAD_SOURCE, strip_transaction_line


@pytest.fixture(autouse=True)
def _isolated_ipython_dir(tmp_path, monkeypatch):
    # Workers inherit the environment: keep their history database private.
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.delenv("PYREPL3_TRANSACTION_POLICY", raising=False)


def session(policy: str | None = None, **env: str) -> Session:
    """A worker whose environment sets ``policy`` and ``env``."""
    environ = dict(os.environ)
    if policy is not None:
        environ["PYREPL3_TRANSACTION_POLICY"] = policy
    environ.update(env)
    return Session(env=environ)


async def ok(s: Session, code: str) -> list:
    msgs = await collect(s, code)
    assert reply_of(msgs).status == "ok", (code, msgs)
    return msgs


async def fails(s: Session, code: str) -> list:
    msgs = await collect(s, code)
    assert reply_of(msgs).status == "error", (code, msgs)
    return msgs


async def value(s: Session, expr: str) -> str:
    return result_text(await ok(s, expr))


async def state(s: Session, expr: str) -> object:
    """``expr`` evaluated in the worker, as JSON."""
    return json.loads(stream_text(await ok(s, f"import json as _j; print(_j.dumps({expr}))")))


def rollback_payload(msgs: list) -> dict | None:
    found = [p for p in reply_of(msgs).payload if p.get("source") == PAYLOAD_SOURCE]
    assert len(found) <= 1
    return found[0] if found else None


SETUP = textwrap.dedent(
    """
    import numpy as np, pandas as pd
    arr = np.arange(5.0)
    arr_ref = arr
    lst = [1, 2, 3]
    lst_ref = lst
    d = {"a": 1}
    nested = {"xs": [1]}
    df = pd.DataFrame({"a": [1, 2, 3], "b": [0.5, 1.5, 2.5]})
    df_ref = df
    df_id = id(df)
    class Point:
        registry = []
        def __init__(self):
            self.x = 1
    p = Point()
    def add(v):
        lst.append(v)
    y = 1
    z = 1
    """
)

FAILING = textwrap.dedent(
    """
    arr[0] = -1
    lst.append(4)
    d["k"] = 1
    nested["xs"].append(2)
    df["c"] = 0
    df.iloc[0, 0] = 99
    p.x = 2
    p.extra = 3
    Point.registry.append(p)
    add(5)
    x = 1
    del y
    z = 2
    raise ValueError("boom")
    """
)


def test_off_is_the_default_and_rolls_back_nothing():
    async def body():
        async with session() as s:
            msgs = await ok(s, "%transaction_policy")
            assert "transaction policy: off (default)" in stream_text(msgs)
            await ok(s, "lst = [1]; y = 1")
            msgs = await fails(s, "x = 1; del y; lst.append(2); 1/0")
            assert "pyrepl3:" not in stream_text(msgs, "stderr")
            assert rollback_payload(msgs) is None
            assert await state(s, "[x, 'y' in globals(), lst]") == [1, False, [1, 2]]

    run(body())


def test_bindings_puts_names_back_but_not_objects():
    async def body():
        async with session("bindings") as s:
            await ok(s, "lst = [1]; y = 1; z = 1")
            msgs = await fails(s, "x = 1\ndel y\nz = 2\nlst.append(2)\nw = 3\n1/0")
            stderr = stream_text(msgs, "stderr")
            assert (
                "pyrepl3: cell failed; rolled back (bindings): removed: w, x; restored: y, z"
                in (stderr)
            )
            assert "not undone: changes to objects in place, files written" in stderr
            # The report follows the traceback and precedes the reply.
            kinds = [m.type for m in msgs]
            assert kinds.index(MessageType.ERROR) < len(msgs) - 2
            assert msgs[-2].type == MessageType.OUTPUT and "pyrepl3:" in msgs[-2].data
            payload = rollback_payload(msgs)
            assert payload is not None
            assert payload["policy"] == "bindings"
            assert payload["removed"] == ["w", "x"] and payload["restored"] == ["y", "z"]
            got = await state(s, "['x' in globals(), 'w' in globals(), y, z, lst]")
            assert got == [False, False, 1, 1, [1, 2]]  # the list stays appended to

            # A silent execution is rolled back too, without a report.
            msgs = await collect(s, "x = 1\n1/0", silent=True)
            assert reply_of(msgs).status == "error"
            assert "pyrepl3:" not in stream_text(msgs, "stderr")
            assert rollback_payload(msgs) == {**rollback_payload(msgs), "removed": ["x"]}
            # A cell that never ran (a syntax error) has nothing to report.
            msgs = await fails(s, "x = = 1")
            assert "pyrepl3:" not in stream_text(msgs, "stderr")
            assert await state(s, "'x' in globals()") is False

    run(body())


def test_full_undoes_in_place_changes_and_keeps_identity():
    async def body():
        async with session("full") as s:
            await ok(s, SETUP)
            msgs = await fails(s, FAILING)
            stderr = stream_text(msgs, "stderr")
            assert "rolled back (full): removed: x; restored: y, z; restored in place: " in stderr
            for name in ("arr", "lst", "d", "nested", "df", "p", "Point"):
                assert name in stderr.split("restored in place: ")[1].split("\n")[0], name
            payload = rollback_payload(msgs)
            assert payload is not None and payload["rebound"] == [] and payload["failed"] == {}
            assert await state(
                s,
                "[arr.tolist(), arr_ref is arr, lst, lst_ref is lst, d, nested,"
                " p.x, hasattr(p, 'extra'), Point.registry, 'x' in globals(), y, z]",
            ) == [
                [0.0, 1.0, 2.0, 3.0, 4.0],
                True,
                [1, 2, 3],
                True,
                {"a": 1},
                {"xs": [1]},
                1,
                False,
                [],
                False,
                1,
                1,
            ]
            assert await state(
                s, "[id(df) == df_id, df_ref is df, list(df.columns), df.to_dict('list')]"
            ) == [True, True, ["a", "b"], {"a": [1, 2, 3], "b": [0.5, 1.5, 2.5]}]
            # Globals a called user function changes are covered too.
            msgs = await fails(s, "add(7)\n1/0")
            assert "restored in place: lst" in stream_text(msgs, "stderr")
            assert await state(s, "lst") == [1, 2, 3]
            # The frame works normally afterwards (and its snapshot is gone).
            await ok(s, "df['c'] = df['a'] * 2; df.iloc[0, 0] = 7")
            assert await state(s, "df.to_dict('list')") == {
                "a": [7, 2, 3],
                "b": [0.5, 1.5, 2.5],
                "c": [2, 4, 6],
            }

    run(body())


def test_successful_cells_are_never_rolled_back():
    async def body():
        async with session("full") as s:
            await ok(s, SETUP)
            msgs = await ok(s, FAILING.replace('raise ValueError("boom")', "pass"))
            assert "pyrepl3:" not in stream_text(msgs, "stderr")
            assert rollback_payload(msgs) is None
            assert await state(
                s, "[arr[0], lst, d, p.x, 'y' in globals(), z, list(df.columns)]"
            ) == [-1.0, [1, 2, 3, 4, 5], {"a": 1, "k": 1}, 2, False, 2, ["a", "b", "c"]]
            # A failure later rolls back to the end of the last good cell only.
            await fails(s, "lst.clear(); 1/0")
            assert await state(s, "lst") == [1, 2, 3, 4, 5]

    run(body())


def test_transaction_cell_magic_overrides_the_kernel_policy():
    async def body():
        async with session() as s:
            await ok(s, "lst = [1]; y = 1")
            msgs = await fails(s, "%%transaction\nlst.append(2)\nx = 1\n1/0")
            assert "rolled back (full): removed: x; restored in place: lst" in stream_text(
                msgs, "stderr"
            )
            (error,) = of_type(msgs, MessageType.ERROR)
            plain = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(error.traceback))
            assert "----> 4 1/0" in plain  # the line number of the raw cell
            assert await state(s, "[lst, 'x' in globals()]") == [[1], False]

            msgs = await fails(s, "%%transaction bindings\nlst.append(2)\ndel y\n1/0")
            assert "rolled back (bindings): restored: y" in stream_text(msgs, "stderr")
            assert await state(s, "[lst, y]") == [[1, 2], 1]

            # Off for the kernel: the next cell is not rolled back.
            await fails(s, "lst.append(3); 1/0")
            assert await state(s, "lst") == [1, 2, 3]

            # The cell keeps an execution count and its raw text in history;
            # the cell's result is still displayed; other cell magics follow.
            count = reply_of(await ok(s, "%%transaction\nlst[0] = 0\nlst")).execution_count
            msgs = await ok(s, "%%transaction\nlst")
            assert reply_of(msgs).execution_count == count + 1
            assert result_text(msgs) == "[0, 2, 3]"
            assert await value(s, "_ih[-2]") != "''"
            assert "%%transaction" in await value(
                s, "get_ipython().history_manager.input_hist_raw[-3]"
            )
            await ok(s, "%%transaction\n%%capture out\nprint('hidden')")
            assert await state(s, "out.stdout") == "hidden\n"
            msgs = await fails(s, "%%transaction sometimes\npass")
            assert reply_of(msgs).ename == "UsageError"

    run(body())


def test_policy_magic_switches_the_kernel_policy():
    async def body():
        async with session("bindings") as s:
            assert "bindings ($PYREPL3_TRANSACTION_POLICY)" in stream_text(
                await ok(s, "%transaction_policy")
            )
            await ok(s, "lst = [1]")
            await ok(s, "%transaction_policy full")
            assert "full (set by %transaction_policy)" in stream_text(
                await ok(s, "%transaction_policy")
            )
            await fails(s, "lst.append(2); 1/0")
            assert await state(s, "lst") == [1]
            await ok(s, "%transaction_policy off")
            msgs = await fails(s, "lst.append(2); x = 1; 1/0")
            assert "pyrepl3:" not in stream_text(msgs, "stderr")
            assert await state(s, "[lst, x]") == [[1, 2], 1]
            await ok(s, "%transaction_policy default")
            await fails(s, "lst.append(3); del x; 1/0")
            assert await state(s, "[lst, x]") == [[1, 2, 3], 1]
            msgs = await fails(s, "%transaction_policy sometimes")
            assert reply_of(msgs).ename == "UsageError"

    run(body())


def test_interrupt_rolls_back():
    async def body():
        async with session("full") as s:
            await ok(s, "import time\nlst = [1]\ny = 1")

            async def interrupt_once_started(msg):
                if msg.type == MessageType.OUTPUT and "started" in msg.data:
                    await s.interrupt()

            code = "lst.append(2)\ndel y\nx = 1\nprint('started', flush=True)\ntime.sleep(60)"
            msgs = await collect(s, code, on_message=interrupt_once_started, timeout=20)
            assert reply_of(msgs).ename == "KeyboardInterrupt"
            assert "rolled back (full): removed: x; restored: y; restored in place: lst" in (
                stream_text(msgs, "stderr")
            )
            assert await state(s, "[lst, y, 'x' in globals()]") == [[1], 1, False]

    run(body())


def test_what_is_not_covered_is_reported(tmp_path):
    async def body():
        async with session("full", PYREPL3_TRANSACTION_MAX_BYTES="1K") as s:
            await s.configure(cwd=str(tmp_path), env=s.env)
            await ok(
                s,
                "import numpy as np\nsmall = np.zeros(10)\nbig = np.zeros(1000)\n"
                "def gen():\n    yield 1\n    yield 2\ng = gen()\n"
                "grow = np.arange(4.0)",
            )
            code = (
                "small[0] = 1\nbig[0] = 1\nnext(g)\ngrow.resize(8, refcheck=False)\n"
                "open('out.txt', 'w').write('x')\n1/0"
            )
            msgs = await fails(s, code)
            stderr = stream_text(msgs, "stderr")
            assert "restored in place: small" in stderr
            assert "rebound: grow" in stderr and "other references still see the change" in stderr
            assert "big (numpy.ndarray of 7.8 KiB: over the 1.0 KiB snapshot limit)" in stderr
            assert "g (generator: internal state)" in stderr
            assert "not undone: files written, network and subprocess effects" in stderr
            payload = rollback_payload(msgs)
            assert payload is not None and set(payload["not_covered"]) == {"big", "g"}
            assert await state(s, "[small[0], big[0], grow.tolist(), next(g)]") == [
                0.0,
                1.0,
                [0.0, 1.0, 2.0, 3.0],
                2,
            ]

    run(body())


def test_an_invalid_policy_means_off():
    async def body():
        async with session("sometimes") as s:
            assert "transaction policy: off" in stream_text(await ok(s, "%transaction_policy"))
            await ok(s, "lst = [1]")
            msgs = await fails(s, "lst.append(2); x = 1; 1/0")
            assert "pyrepl3: cell failed" not in stream_text(msgs, "stderr")
            assert await state(s, "[lst, x]") == [[1, 2], 1]

    run(body())


# -- no worker needed ------------------------------------------------------------


def test_strip_transaction_line():
    assert strip_transaction_line(["%%transaction\n", "x = 1\n"]) == ["\n", "x = 1\n"]
    assert strip_transaction_line(["%%transaction full \n", "x\n"]) == ["\n", "x\n"]
    assert strip_transaction_line(["%%transaction\n", "%%time\n", "x\n"]) == ["%%time\n", "x\n"]
    for lines in (["%%transaction?\n"], ["%%transaction bogus\n", "x\n"], ["x = 1\n"]):
        assert strip_transaction_line(lines) == lines


def test_parse_size():
    assert parse_size("1024") == 1024
    assert parse_size("1K") == 1024
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1G") == 1 << 30
    with pytest.raises(ValueError):
        parse_size("lots")
