"""WAL checkpoints of the SQLite store: done by the checkpointer thread, not in the writer's
commit path, and the WAL file comes back to its size limit after a reader held checkpoints back
(issue 7 item 8: a long soak must not slow down as the WAL grows)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from tests.store.storehelpers import account_with_inbox, msg

from postfach.store.sqlite import SqliteStore

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.sqlite_only("WAL checkpoints of the embedded store's meta.sqlite3"),
]


async def _caught_up(store: SqliteStore) -> tuple[int, int, int]:
    for _ in range(1000):
        last = store.last_checkpoint
        if last is not None and last[1] > 0 and last[1] == last[2] and store._ckpt_wake.is_set() is False:
            return last
        await asyncio.sleep(0.02)
    raise AssertionError(f"the checkpointer did not catch up: {store.last_checkpoint}")


@pytest.mark.asyncio
async def test_checkpointer_thread_checkpoints_without_the_writer(tmp_path: Path) -> None:
    # the writer's own automatic checkpoint is off: whatever gets checkpointed, the thread did
    store = SqliteStore(tmp_path, wal_autocheckpoint_pages=0, checkpoint_interval=0.01)
    await store.open()
    try:
        aid, inbox = await account_with_inbox(store)
        await asyncio.gather(*(store.append(aid, inbox, msg(i, 2000)) for i in range(200)))
        busy, frames, done = await _caught_up(store)
        assert busy == 0 and frames == done > 0
        assert len(await store.list_messages(aid, inbox)) == 200
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_wal_shrinks_back_after_a_reader_held_checkpoints_back(tmp_path: Path) -> None:
    limit = 256 * 1024
    store = SqliteStore(tmp_path, wal_autocheckpoint_pages=0, checkpoint_interval=0.01, wal_size_limit=limit)
    await store.open()
    wal = tmp_path / "meta.sqlite3-wal"
    try:
        aid, inbox = await account_with_inbox(store)
        reader = sqlite3.connect(tmp_path / "meta.sqlite3", isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM message").fetchone()  # an old snapshot, held
            for k in range(10):
                await asyncio.gather(*(store.append(aid, inbox, msg(k * 50 + i, 4000, "r")) for i in range(50)))
            await asyncio.sleep(0.1)
            assert wal.stat().st_size > limit  # the checkpoint could not pass the reader
            last = store.last_checkpoint
            assert last is not None and last[2] < last[1]
        finally:
            reader.execute("COMMIT")
            reader.close()
        await store.append(aid, inbox, msg(1, 100, "after"))
        await _caught_up(store)  # everything copied back now that the reader is gone
        await store.append(aid, inbox, msg(2, 100, "after"))  # restarts the WAL: cut to the limit
        assert wal.stat().st_size <= limit
        assert len(await store.list_messages(aid, inbox)) == 502
    finally:
        await store.close()
