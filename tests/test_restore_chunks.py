"""Reading a chunked buffer back (worker/checkpoint/chunks.py): the chunks of
a large out-of-band buffer are read by a few threads straight into aligned
memory and each is checked against its digest; a missing, corrupt, short or
long chunk refuses the whole buffer with an error that names the chunk.

Most tests work on a real store directory (and fsspec's in-memory file
system); the last one runs a worker: a crash whose saved state has a corrupt
chunk says so and restores nothing.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from session_helpers import collect, reply_of, run, stream_text

from pyrepl3_kernel.session import Session
from pyrepl3_kernel.worker.checkpoint import chunks
from pyrepl3_kernel.worker.checkpoint.buffers import address
from pyrepl3_kernel.worker.checkpoint.errors import CheckpointError
from pyrepl3_kernel.worker.checkpoint.store import Store

#: Four full chunks and a short one whose length is not a multiple of a page.
NBYTES = 4 * chunks.CHUNK_SIZE + 12_345


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Store, list[str], np.ndarray]:
    store = Store(str(tmp_path / "store"))
    store.fsync = False
    data = np.random.default_rng(3).integers(0, 256, NBYTES, dtype=np.uint8)
    digests, written = chunks.write(store, memoryview(data))
    assert written == NBYTES and len(digests) == 5
    return store, digests, data


def chunk_path(store: Store, digest: str) -> Path:
    return Path(store.root) / "objects" / digest


def test_chunks_read_back_bit_for_bit_aligned_and_writable(
    saved: tuple[Store, list[str], np.ndarray],
) -> None:
    store, digests, data = saved
    out = chunks.read(store, digests, NBYTES)
    assert out.nbytes == NBYTES and not out.readonly
    assert address(out) % 64 == 0
    back = np.frombuffer(out, dtype=np.uint8)
    assert np.array_equal(back, data)
    back[:3] = 7  # writable, and its own memory
    assert data[0] != 7 or data[1] != 7 or data[2] != 7


def test_one_chunk_is_read_without_threads(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    data = bytes(range(256)) * 1000
    digests, _ = chunks.write(store, memoryview(data))
    assert len(digests) == 1
    assert bytes(chunks.read(store, digests, len(data))) == data


@pytest.mark.parametrize("which", [0, 2, 4])
def test_a_corrupt_chunk_refuses_the_buffer_and_names_it(
    saved: tuple[Store, list[str], np.ndarray], which: int
) -> None:
    store, digests, _ = saved
    victim = chunk_path(store, digests[which])
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit
    victim.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"chunk {digests[which]} is corrupt"):
        chunks.read(store, digests, NBYTES)


def test_a_missing_chunk_refuses_the_buffer_and_names_it(
    saved: tuple[Store, list[str], np.ndarray],
) -> None:
    store, digests, _ = saved
    chunk_path(store, digests[3]).unlink()
    with pytest.raises(CheckpointError, match=f"chunk {digests[3]} is missing"):
        chunks.read(store, digests, NBYTES)


@pytest.mark.parametrize("change", ["shorter", "longer"])
def test_a_chunk_of_the_wrong_length_is_corrupt(
    saved: tuple[Store, list[str], np.ndarray], change: str
) -> None:
    store, digests, _ = saved
    victim = chunk_path(store, digests[1])
    raw = victim.read_bytes()
    victim.write_bytes(raw[:-1] if change == "shorter" else raw + b"\0")
    with pytest.raises(CheckpointError, match=f"chunk {digests[1]} is corrupt"):
        chunks.read(store, digests, NBYTES)


@pytest.mark.parametrize("count", [0, 4, 6])
def test_digests_that_do_not_add_up_are_refused(
    saved: tuple[Store, list[str], np.ndarray], count: int
) -> None:
    store, digests, _ = saved
    listed = (digests * 2)[:count]
    with pytest.raises(CheckpointError, match="do not add up"):
        chunks.read(store, listed, NBYTES)


def test_chunks_on_an_fsspec_store_read_back_and_are_checked(tmp_path: Path) -> None:
    fsspec = pytest.importorskip("fsspec")
    store = Store(f"memory://restore-chunks-{tmp_path.name}")
    data = np.random.default_rng(4).integers(0, 256, 2 * chunks.CHUNK_SIZE + 5, dtype=np.uint8)
    digests, _ = chunks.write(store, memoryview(data))
    out = chunks.read(store, digests, data.nbytes)
    assert address(out) % 64 == 0 and np.array_equal(np.frombuffer(out, np.uint8), data)
    path = f"{store.root}/objects/{digests[1]}"
    with fsspec.open(path, "wb") as f:
        f.write(bytes(chunks.CHUNK_SIZE))  # the right length, the wrong bytes
    with pytest.raises(CheckpointError, match=f"chunk {digests[1]} is corrupt"):
        chunks.read(store, digests, data.nbytes)


def test_a_crash_with_a_corrupt_chunk_restores_nothing_and_says_why(tmp_path: Path) -> None:
    autosave = tmp_path / "autosave"

    async def scenario() -> tuple[str, str]:
        session = Session(autosave=str(autosave))
        await session.start()
        try:
            code = "import numpy as np\nbig = np.random.default_rng(8).random(3_000_000)\nsmall = 5"
            assert reply_of(await collect(session, code)).status == "ok"
            await session.states()  # the save lands
            manifest = json.loads((autosave / "auto.json").read_text())
            victim = autosave / "objects" / manifest["names"]["big"]["chunks"]["0"][2]
            raw = bytearray(victim.read_bytes())
            raw[-1] ^= 0xFF
            victim.write_bytes(bytes(raw))
            crash = await collect(session, "import os\nos._exit(1)")
            note = stream_text(crash, "stderr")
            after = await collect(
                session, "print(sorted(k for k in ('big', 'small') if k in globals()))"
            )
            return note + stream_text(after, "stderr"), stream_text(after)
        finally:
            await asyncio.wait_for(session.shutdown(), 30)

    note, names = run(scenario())
    assert "could not be restored" in note and "the data of 'big'" in note, note
    assert "chunk" in note and "corrupt" in note, note
    assert names.strip() == "[]"
