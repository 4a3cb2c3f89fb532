"""The writer's look-ahead: the batch queued behind a commit is gathered just before that COMMIT
and its blob barrier (syncfs) runs while the commit waits for the disk; each batch still commits
only after its own barrier returned (durability invariant 1)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from tests.store.storehelpers import account_with_inbox, msg

from postfach.store.sqlite import SqliteStore

pytestmark = pytest.mark.timeout(60)


@pytest.mark.asyncio
async def test_next_batch_barrier_overlaps_the_commit_and_precedes_its_own(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    if not store._blobs.batch_sync:
        pytest.skip("no syncfs here: per-file fsync, nothing to overlap")
    await store.open()
    events: list[str] = []
    lock = threading.Lock()
    real_barrier = store._blobs.barrier
    real_finish = store._finish
    real_start = store._start_barrier

    def start_barrier(batch: list[Any]) -> None:  # runs in the writer thread
        with lock:
            events.append("barrier-submitted")
        real_start(batch)

    def barrier() -> None:
        with lock:
            events.append("barrier-start")
        real_barrier()
        with lock:
            events.append("barrier-end")

    def finish(outcomes: list[Any]) -> None:
        kinds = {"pins" if r.pins else "plain" for r, *_ in outcomes}
        with lock:
            events.append("finish-" + "+".join(sorted(kinds)))
        real_finish(outcomes)

    store._blobs.barrier = barrier  # type: ignore[method-assign]
    store._finish = finish  # type: ignore[method-assign]
    store._start_barrier = start_barrier  # type: ignore[method-assign]
    try:
        aid, inbox = await account_with_inbox(store)
        gate = threading.Event()
        blocker = asyncio.ensure_future(store._write(lambda tx: gate.wait(30)))  # no blobs
        await asyncio.sleep(0.05)
        events.clear()
        appends = [asyncio.create_task(store.append(aid, inbox, msg(i))) for i in range(20)]
        for _ in range(3000):
            if store._wq.qsize() >= 20:
                break
            await asyncio.sleep(0.01)
        gate.set()
        results = await asyncio.gather(*appends)
        assert await blocker is True
        assert len({r.uid for r in results}) == 20
        # the appends' barrier was started (look-ahead) before the blocker's commit was done ...
        assert events.count("barrier-submitted") == 1 and events.count("finish-pins") == 1
        assert events.index("barrier-submitted") < events.index("finish-plain")
        # ... and the appends were answered only after their barrier had returned
        assert events.index("barrier-start") < events.index("barrier-end") < events.index("finish-pins")
        assert len(await store.list_messages(aid, inbox)) == 20
    finally:
        await store.close()
