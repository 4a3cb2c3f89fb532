"""Group commit under concurrency: UID/modseq monotonicity, blob dedup and refcounts, exact quota."""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
from pathlib import Path
from typing import Any

import pytest
from tests import backends
from tests.store.storehelpers import account_with_inbox, msg

from postfach.errors import QuotaExceeded
from postfach.store.base import FlagOp
from postfach.store.sqlite import SqliteStore
from postfach.types import Uid

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio]


def blob_path(root: Path, blob_id: str) -> Path:
    return root / "blobs" / blob_id[:2] / blob_id[2:4] / blob_id


async def test_uids_and_modseqs_strictly_grow_under_concurrent_writers(tmp_path: Path) -> None:
    store = backends.new_store(tmp_path, group_commit_max=64)
    await store.open()
    try:
        aid, inbox = await account_with_inbox(store)
        sub = store.subscribe(aid)

        async def writer(w: int) -> list[tuple[int, int]]:
            out: list[tuple[int, int]] = []
            for i in range(15):
                r = await store.append(aid, inbox, msg(i, tag=f"w{w}-"))
                out.append((r.uid, r.modseq))
                if i % 5 == 0:
                    res = await store.store_flags(aid, inbox, [r.uid], FlagOp.ADD, frozenset({"\\Seen"}))
                    out.append((r.uid, res.updated[0].modseq))
            return out

        results = await asyncio.gather(*(writer(w) for w in range(20)))
        # every acknowledged modseq is distinct per change, and UIDs are distinct and dense
        appends = [u for res in results for (u, _) in res]
        uids = sorted(set(appends))
        assert uids == list(range(1, 20 * 15 + 1))
        modseqs = [m for res in results for (_, m) in res]
        assert len(modseqs) == len(set(modseqs))
        for res in results:  # within one writer, sequential calls see growing modseqs and uids
            assert [m for _, m in res] == sorted(m for _, m in res)
        # the feed saw changes in commit order: modseqs ascend
        seen = []
        while (c := sub.get_nowait()) is not None:
            assert c.modseq is not None
            seen.append(c.modseq)
        assert seen == sorted(seen) and len(seen) == len(modseqs)
        mb = await store.get_mailbox_by_id(aid, inbox)
        assert mb is not None and mb.highestmodseq == max(modseqs) and mb.uidnext == len(uids) + 1
        assert await store.check() == []
    finally:
        await store.close()


@pytest.mark.sqlite_only("the embedded store's group commit (writer thread and its queue)")
async def test_one_failure_does_not_fail_its_batch(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    await store.open()
    try:
        aid, inbox = await account_with_inbox(store)
        full, finbox = await account_with_inbox(store, "full@example.com", quota_messages=0)
        gate = threading.Event()
        blocker = asyncio.ensure_future(store._write(lambda tx: gate.wait(100)))  # outlasts the wait below
        tasks = []
        for i in range(40):  # all forty queue up behind the blocker: one batch
            if i % 4 == 0:
                tasks.append(asyncio.create_task(store.append(full, finbox, msg(i, tag="f"))))
            else:
                tasks.append(asyncio.create_task(store.append(aid, inbox, msg(i))))
        for _ in range(3000):
            if store._wq.qsize() >= 40:
                break
            await asyncio.sleep(0.01)
        gate.set()
        await blocker
        res = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in res if isinstance(r, BaseException)]
        assert len(errors) == 10 and all(isinstance(e, QuotaExceeded) for e in errors)
        assert len(await store.list_messages(aid, inbox)) == 30
        assert await store.list_messages(full, finbox) == []
        # the refused messages left no blob files behind
        assert await store.check() == []
    finally:
        await store.close()


@pytest.mark.sqlite_only("blob files on disk and the refcount column of meta.sqlite3")
async def test_blob_dedup_and_refcount(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path, inline_max=0)  # blob files (small messages otherwise go inline)
    await store.open()
    try:
        a, ainbox = await account_with_inbox(store, "a@example.com")
        b, binbox = await account_with_inbox(store, "b@example.com")
        data = msg(1, 4096)
        blob_id = hashlib.sha256(data).hexdigest()
        r1, r2 = await asyncio.gather(store.append(a, ainbox, data), store.append(b, binbox, data))
        files = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file() and p.parent.name != "tmp"]
        assert files == [blob_path(tmp_path, blob_id)]
        assert files[0].read_bytes() == data

        def refcount() -> int | None:
            import sqlite3

            with sqlite3.connect(tmp_path / "meta.sqlite3") as c:
                row = c.execute("SELECT refcount FROM blob WHERE id = ?", (blob_id,)).fetchone()
            return None if row is None else int(row[0])

        assert refcount() == 2
        arch = await store.get_mailbox(a, "Archive")
        assert arch is not None
        await store.copy_messages(a, ainbox, [r1.uid], arch.id)
        assert refcount() == 3
        await store.delete_messages(a, ainbox, [r1.uid])
        await store.delete_mailbox(a, arch.id)
        assert refcount() == 1 and blob_path(tmp_path, blob_id).exists()
        await store.delete_account(b)
        assert refcount() is None
        assert not blob_path(tmp_path, blob_id).exists()
        # the same bytes again after removal: written afresh
        r3 = await store.append(a, ainbox, data)
        assert await store.read_message(a, ainbox, r3.uid) == data
        assert refcount() == 1
        assert await store.check() == []
        del r2
    finally:
        await store.close()


async def test_concurrent_append_delete_same_bytes(tmp_path: Path) -> None:
    """Appends racing deletes of identical bytes never lose a blob (pins) nor leak one."""
    store = backends.new_store(tmp_path, group_commit_max=8)
    await store.open()
    try:
        aid, inbox = await account_with_inbox(store)
        data = msg(0, 2048)

        async def churn() -> None:
            for _ in range(15):
                r = await store.append(aid, inbox, data)
                assert await store.read_message(aid, inbox, r.uid) == data
                await store.delete_messages(aid, inbox, [r.uid])

        await asyncio.gather(*(churn() for _ in range(8)))
        assert await store.list_messages(aid, inbox) == []
        assert await store.check() == []
        assert not await backends.blob_stored(tmp_path, hashlib.sha256(data).hexdigest())
    finally:
        await store.close()


async def test_quota_exact_under_concurrent_appends_copies_expunges(tmp_path: Path) -> None:
    store = backends.new_store(tmp_path, group_commit_max=16)
    await store.open()
    try:
        size = len(msg(0, 1000))
        limit = size * 40
        aid, inbox = await account_with_inbox(store, quota_bytes=limit)
        arch = await store.get_mailbox(aid, "Archive")
        assert arch is not None
        rng = random.Random(7)
        refused = 0

        async def worker(w: int) -> None:
            nonlocal refused
            for i in range(25):
                op = rng.random()
                try:
                    if op < 0.5:
                        await store.append(aid, inbox, msg(i, 1000, tag=f"q{w}-"))
                    elif op < 0.75:
                        metas = await store.list_messages(aid, inbox)
                        if metas:
                            await store.copy_messages(aid, inbox, [rng.choice(metas).uid], arch.id)
                    else:
                        box = rng.choice([inbox, arch.id])
                        metas = await store.list_messages(aid, box)
                        if metas:
                            uid = rng.choice(metas).uid
                            await store.store_flags(aid, box, [uid], FlagOp.ADD, frozenset({"\\Deleted"}))
                            await store.expunge(aid, box, [uid])
                except QuotaExceeded:
                    refused += 1
                acct = await store.get_account_by_id(aid)
                assert acct is not None and acct.used_bytes <= limit

        await asyncio.gather(*(worker(w) for w in range(10)))
        acct = await store.get_account_by_id(aid)
        assert acct is not None
        assert refused > 0  # the limit was really reached
        before = (acct.used_bytes, acct.used_messages)
        assert await store.recount_usage(aid) == before
        assert await store.check() == []
        n = len(await store.list_messages(aid, inbox)) + len(await store.list_messages(aid, arch.id))
        assert before[1] == n and before[0] == n * size
    finally:
        await store.close()


@pytest.mark.sqlite_only("the embedded store's group commit (one transaction per batch)")
async def test_group_commit_batches(tmp_path: Path) -> None:
    """Writes waiting together share one transaction and one commit; each caller gets its own
    result after that commit."""
    store = SqliteStore(tmp_path, group_commit_max=256)
    await store.open()
    batches: list[int] = []
    orig = store._run_batch

    def spy(batch: list[Any]) -> None:
        batches.append(len(batch))
        orig(batch)

    store._run_batch = spy  # type: ignore[method-assign]
    try:
        aid, inbox = await account_with_inbox(store)
        batches.clear()
        gate, running = threading.Event(), threading.Event()

        def hold(tx: Any) -> bool:
            running.set()
            return gate.wait(100)  # outlasts the wait below

        # Hold the writer busy (it has taken the blocker alone) until all 100 appends queued up behind it.
        blocker = asyncio.ensure_future(store._write(hold))
        assert await asyncio.to_thread(running.wait, 60)
        tasks = [asyncio.create_task(store.append(aid, inbox, msg(i))) for i in range(100)]
        for _ in range(3000):
            if store._wq.qsize() >= 100:
                break
            await asyncio.sleep(0.01)
        gate.set()
        results = await asyncio.gather(*tasks)
        assert await blocker is True
        assert batches == [1, 100]
        assert sorted(r.uid for r in results) == [Uid(i) for i in range(1, 101)]
        assert len({r.modseq for r in results}) == 100
        assert len(await store.list_messages(aid, inbox)) == 100
    finally:
        await store.close()


@pytest.mark.sqlite_only("fsync of the embedded store's blob files")
async def test_per_file_sync_mode(tmp_path: Path) -> None:
    """Without syncfs (other platforms): fsync of file and folder per blob, same guarantees."""
    store = SqliteStore(tmp_path, batch_sync=False, inline_max=0)  # blob files (small messages otherwise go inline)
    await store.open()
    try:
        assert not store._blobs.batch_sync
        aid, inbox = await account_with_inbox(store)
        res = await asyncio.gather(*(store.append(aid, inbox, msg(i % 10)) for i in range(30)))
        assert sorted(r.uid for r in res) == [Uid(i) for i in range(1, 31)]
        for r in res[:10]:
            assert await store.read_message(aid, inbox, r.uid) in {msg(i) for i in range(10)}
        files = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file() and p.parent.name != "tmp"]
        assert len(files) == 10  # deduplicated
        await store.delete_messages(aid, inbox, [r.uid for r in res])
        assert [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == []
        assert await store.check() == []
    finally:
        await store.close()


async def test_cancelled_callers_leave_a_consistent_store(tmp_path: Path) -> None:
    store = backends.new_store(tmp_path)
    await store.open()
    try:
        aid, inbox = await account_with_inbox(store)
        for delay_steps in (0, 1, 2, 3, 5, 8):
            tasks = [
                asyncio.create_task(store.append(aid, inbox, msg(i, 3000, tag=f"c{delay_steps}-"))) for i in range(20)
            ]
            for _ in range(delay_steps):
                await asyncio.sleep(0)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # Abandoned writes run to their end (blob files in their threads; a PostgreSQL transaction
        # may still commit): wait until nothing changes any more, then the store must be consistent.
        for _ in range(200):
            problems = await store.check()
            listed = await store.list_messages(aid, inbox)
            usage = await store.recount_usage(aid)
            if not problems and await store.list_messages(aid, inbox) == listed:
                break
            await asyncio.sleep(0.05)
        assert problems == []
        assert usage == (sum(m.size for m in listed), len(listed))
    finally:
        await store.close()


@pytest.mark.sqlite_only("blob files kept on disk for a backup of the embedded store")
async def test_blob_gc_paused_keeps_files_for_a_backup(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path, inline_max=0)  # blob files (small messages otherwise go inline)
    await store.open()
    try:
        aid, inbox = await account_with_inbox(store)
        r = await store.append(aid, inbox, msg(1))
        path = blob_path(tmp_path, hashlib.sha256(msg(1)).hexdigest())
        with store.blob_gc_paused():
            await store.delete_messages(aid, inbox, [r.uid])
            assert path.exists()  # a backup may still hard-link it
            assert await store.check() == []  # deferred, not an orphan
        await store.append(aid, inbox, msg(2))  # the writer has caught up after this
        assert not path.exists()
        assert await store.check() == []
    finally:
        await store.close()
