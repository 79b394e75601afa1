"""``%transaction_policy``: setting a policy says what is now in force and
what it does to a failing cell, as showing it does."""

from __future__ import annotations

import os

import pytest
from session_helpers import collect, reply_of, run, stream_text

from pyrepl3_kernel.session import Session


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.delenv("PYREPL3_TRANSACTION_POLICY", raising=False)


async def said(s: Session, code: str) -> str:
    msgs = await collect(s, code)
    assert reply_of(msgs).status == "ok", (code, msgs)
    return stream_text(msgs)


def test_setting_a_policy_says_what_it_set_and_what_it_does():
    async def body():
        async with Session(env={**os.environ, "PYREPL3_TRANSACTION_POLICY": "full"}) as s:
            assert await said(s, "%transaction_policy bindings") == (
                "transaction policy: bindings (set by %transaction_policy): a failing "
                "cell's new, rebound and deleted names are rolled back\n"
            )
            # showing it says the same
            assert await said(s, "%transaction_policy") == await said(
                s, "%transaction_policy bindings"
            )
            full = await said(s, "%transaction_policy full")
            assert full.startswith("transaction policy: full (set by %transaction_policy): ")
            assert "in-place changes" in full
            off = await said(s, "%transaction_policy off")
            assert off.startswith("transaction policy: off (set by %transaction_policy): ")
            assert "stay" in off
            # `default` goes back to the environment's, and says so
            assert await said(s, "%transaction_policy default") == (
                "transaction policy: full ($PYREPL3_TRANSACTION_POLICY): " + full.split(": ", 2)[2]
            )

    run(body())
