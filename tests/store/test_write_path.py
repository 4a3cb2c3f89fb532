"""The fast write path of the SQLite store: ingest threads handing writes straight to the writer,
runs of appends merged into one set of statements, point reads on the event loop, the lean
listing for POP3, and the wire bits learned at ingest. Each must keep the semantics of the
plain path (uids, modseqs, quotas, change events, durability)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import threading
from pathlib import Path

import pytest
from tests import backends
from tests.store.storehelpers import account_with_inbox, msg

from postfach.errors import NotFound, QuotaExceeded
from postfach.store.base import WIRE_CRLF_ONLY, WIRE_NO_DOT_LINES, AppendResult, ChangeKind, DeliveryTarget
from postfach.store.blobs import FileBlobStore, sha256_hex, wire_flags
from postfach.store.sqlite import SqliteStore
from postfach.types import AccountId, MailboxId, Uid

pytestmark = pytest.mark.timeout(60)


async def _hold_writer(store: SqliteStore) -> tuple[threading.Event, asyncio.Future[object]]:
    """Keep the writer busy so that what follows queues up into one batch."""
    gate, running = threading.Event(), threading.Event()

    def hold(tx: object) -> bool:
        running.set()
        return gate.wait(50)

    blocker = asyncio.ensure_future(store._write(hold))
    assert await asyncio.to_thread(running.wait, 30)  # the writer has taken the blocker, alone
    return gate, blocker


async def _wait_queued(store: SqliteStore, n: int) -> None:
    for _ in range(3000):
        if store._wq.qsize() >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {store._wq.qsize()} of {n} writes queued")


@pytest.mark.asyncio
@pytest.mark.sqlite_only("merging of queued appends by the embedded store's writer thread")
async def test_merged_appends_keep_per_request_semantics(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    await store.open()
    try:
        a, a_inbox = await account_with_inbox(store, "a@example.com")
        b, b_inbox = await account_with_inbox(store, "b@example.com")
        a_arch = await store.get_mailbox(a, "Archive")
        assert a_arch is not None
        sub = store.subscribe(a)
        gate, blocker = await _hold_writer(store)
        tasks: list[asyncio.Task[list[AppendResult]]] = []
        for i in range(12):
            tasks.append(asyncio.create_task(store.append_many(a, a_inbox, [(msg(i, tag="a"), frozenset(), None)])))
            tasks.append(asyncio.create_task(store.append_many(b, b_inbox, [(msg(i, tag="b"), frozenset(), None)])))
        tasks.append(
            asyncio.create_task(
                store.append_many(
                    a, a_inbox, [(msg(100 + j, tag="many"), frozenset({"\\Seen"}), None) for j in range(3)]
                )
            )
        )
        tasks.append(asyncio.create_task(store.deliver(msg(200), [DeliveryTarget(a, "Archive")])))
        tasks.append(asyncio.create_task(store.deliver(msg(201), [DeliveryTarget(b, "No such folder")])))
        await _wait_queued(store, len(tasks))
        gate.set()
        assert await blocker is True
        results = await asyncio.gather(*tasks)

        # every request has its own modseq in its mailbox; uids are consecutive per mailbox
        pairs = [(r[0].mailbox_id, r[0].modseq) for r in results]
        assert len(set(pairs)) == len(results)
        for res in results:
            assert len({r.modseq for r in res}) == 1
        by_mailbox: dict[MailboxId, list[Uid]] = {}
        for res in results:
            for r in res:
                by_mailbox.setdefault(r.mailbox_id, []).append(r.uid)
        assert sorted(by_mailbox) == sorted({a_inbox, b_inbox, a_arch.id})
        for uids in by_mailbox.values():
            assert sorted(uids) == list(range(1, len(uids) + 1))
        assert len(by_mailbox[a_inbox]) == 15 and len(by_mailbox[b_inbox]) == 13 and len(by_mailbox[a_arch.id]) == 1

        # what the results say is what the store holds
        for res in results:
            for r in res:
                acct = a if r.mailbox_id in (a_inbox, a_arch.id) else b
                (meta,) = await store.get_messages(acct, r.mailbox_id, [r.uid])
                assert meta.modseq == r.modseq
        many = results[24]
        metas = await store.get_messages(a, a_inbox, [r.uid for r in many])
        assert [m.flags for m in metas] == [frozenset({"\\Seen"})] * 3
        assert [await store.read_blob(m.blob_id) for m in metas] == [msg(100 + j, tag="many") for j in range(3)]
        for acct, mid in ((a, a_inbox), (b, b_inbox), (a, a_arch.id)):
            mb = await store.get_mailbox_by_id(acct, mid)
            assert mb is not None
            assert mb.uidnext == len(by_mailbox[mid]) + 1
            assert mb.highestmodseq == max(r.modseq for res in results for r in res if r.mailbox_id == mid)
        for acct in (a, b):
            account = await store.get_account_by_id(acct)
            assert account is not None
            assert (account.used_bytes, account.used_messages) == await store.recount_usage(acct)
        # one APPEND change per request of account a, with its uids
        seen: list[tuple[int, tuple[Uid, ...]]] = []
        while (ch := sub.get_nowait()) is not None:
            if ch.kind is ChangeKind.APPEND:
                assert ch.modseq is not None
                seen.append((int(ch.modseq), ch.uids))
        expected = sorted((int(r[0].modseq), tuple(x.uid for x in r)) for r in results if r[0].mailbox_id != b_inbox)
        assert sorted(seen) == expected
        sub.close()
        assert await store.check() == []
    finally:
        await store.close()


@pytest.mark.asyncio
@pytest.mark.sqlite_only("merging of queued appends by the embedded store's writer thread")
async def test_merged_run_with_a_quota_failure_refuses_only_that_request(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    await store.open()
    try:
        aid, inbox = await account_with_inbox(store, quota_messages=5)
        gate, blocker = await _hold_writer(store)
        tasks = [asyncio.create_task(store.append(aid, inbox, msg(i))) for i in range(8)]
        await _wait_queued(store, 8)
        gate.set()
        await blocker
        res = await asyncio.gather(*tasks, return_exceptions=True)
        ok = [r for r in res if isinstance(r, AppendResult)]
        refused = [r for r in res if isinstance(r, QuotaExceeded)]
        assert len(ok) == 5 and len(refused) == 3
        assert sorted(r.uid for r in ok) == [Uid(i) for i in range(1, 6)]
        account = await store.get_account_by_id(aid)
        assert account is not None and account.used_messages == 5
        assert await store.check() == []  # the refused messages' files are gone
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_deliver_resolves_folder_or_inbox(tmp_path: Path) -> None:
    store = backends.new_store(tmp_path)
    await store.open()
    try:
        aid, inbox = await account_with_inbox(store)
        arch = await store.get_mailbox(aid, "Archive")
        assert arch is not None
        (r1,) = await store.deliver(msg(1), [DeliveryTarget(aid, "archive")])  # not the name: INBOX
        (r2,) = await store.deliver(msg(2), [DeliveryTarget(aid, "Archive", frozenset({"$Junk"}))])
        (r3,) = await store.deliver(msg(3), [DeliveryTarget(aid, "inbox", prepend=b"Delivered-To: x\r\n")])
        assert (r1.mailbox_id, r2.mailbox_id, r3.mailbox_id) == (inbox, arch.id, inbox)
        assert await store.read_message(aid, inbox, r3.uid) == b"Delivered-To: x\r\n" + msg(3)
        (m2,) = await store.get_messages(aid, arch.id, [r2.uid])
        assert m2.flags == frozenset({"$Junk"})
        with pytest.raises(NotFound):
            await store.deliver(msg(4), [DeliveryTarget(AccountId(9999))])
        assert await store.check() == []
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_lean_listing_matches_list_messages(tmp_path: Path) -> None:
    store = backends.new_store(tmp_path)
    await store.open()
    try:
        aid, inbox = await account_with_inbox(store)
        other, _ = await account_with_inbox(store, "other@example.com")
        for i in range(20):
            flags = (
                frozenset({"\\Seen"})
                if i % 3 == 0
                else frozenset({"$Label", "\\Flagged"})
                if i % 3 == 1
                else frozenset()
            )
            await store.append(aid, inbox, msg(i), flags)
        await store.delete_messages(aid, inbox, [Uid(5), Uid(6)])
        lean = await store.list_uids_sizes(aid, inbox)
        full = await store.list_messages(aid, inbox)
        assert lean == [(m.uid, m.size, m.flags) for m in full]
        assert [m.uid for m in full] == [u for u in range(1, 21) if u not in (5, 6)]
        with pytest.raises(NotFound):
            await store.list_uids_sizes(other, inbox)  # invariant 5: not another account's mailbox
        with pytest.raises(NotFound):
            await store.list_messages(other, inbox)
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_point_reads_see_the_callers_own_writes(tmp_path: Path) -> None:
    store = backends.new_store(tmp_path)
    await store.open()
    try:
        assert await store.get_domain("example.com") is None
        aid, inbox = await account_with_inbox(store)
        assert await store.get_domain("example.com") is not None
        await store.set_quota(aid, 1000, 7)
        account = await store.get_account("user@example.com")
        assert account is not None and (account.quota_bytes, account.quota_messages) == (1000, 7)
        await store.add_alias("alias@example.com", "user@example.com")
        assert [a.target for a in await store.aliases_for("alias@example.com")] == ["user@example.com"]
        mb = await store.create_mailbox(aid, "Fresh")
        assert await store.get_mailbox(aid, "Fresh") == mb
        r = await store.append(aid, inbox, msg(1))
        (meta,) = await store.get_messages(aid, inbox, [r.uid])
        assert meta.uid == r.uid
        await store.expunge(aid, inbox)  # not \Deleted: stays
        await store.delete_messages(aid, inbox, [r.uid])
        assert await store.get_messages(aid, inbox, [r.uid]) == []
        with pytest.raises(NotFound):
            await store.open_blob(meta.blob_id)  # its last reference went
    finally:
        await store.close()


def test_wire_flags() -> None:
    both = WIRE_CRLF_ONLY | WIRE_NO_DOT_LINES
    assert wire_flags(b"") == both
    assert wire_flags(b"a: b\r\n\r\nbody\r\n") == both
    assert wire_flags(b"a: b\r\n\r\n.body\r\n") == WIRE_CRLF_ONLY
    assert wire_flags(b".body\r\n") == WIRE_CRLF_ONLY
    assert wire_flags(b"a: b\n\nbody\n") == WIRE_NO_DOT_LINES
    assert wire_flags(b"a: b\r\n\r\nx\n.y\r\n") == 0
    assert wire_flags(b"no line end") == both


@pytest.mark.asyncio
async def test_open_blob_reports_wire_bits_learned_at_ingest(tmp_path: Path) -> None:
    store = backends.new_store(tmp_path)
    await store.open()
    try:
        aid, inbox = await account_with_inbox(store)
        for data in (msg(1), b"Subject: x\r\n\r\n.dot\r\n", b"Subject: y\n\nbare\n", msg(2, 300_000)):
            r = await store.append(aid, inbox, data)
            (meta,) = await store.get_messages(aid, inbox, [r.uid])
            reader = await store.open_blob(meta.blob_id)
            assert reader.size == len(data)
            assert reader.wire == wire_flags(data)
            assert await reader.read(0, len(data)) == data
            await reader.close()
        # rows from before schema version 3 have no bits: readers then scan
        await backends.execute_sql(tmp_path, "UPDATE blob SET wire = NULL")
        reader = await store.open_blob(meta.blob_id)
        assert reader.wire is None and reader.size == len(msg(2, 300_000))
    finally:
        await store.close()


@pytest.mark.sqlite_only("the embedded store's blob folders")
def test_blob_folders_made_again_when_removed_behind_the_store(tmp_path: Path) -> None:
    blobs = FileBlobStore(tmp_path / "blobs", batch_sync=False)
    blobs.prepare(clean_tmp=True)
    try:
        first = b"first message\r\n"
        fid = sha256_hex(first)
        assert blobs.ensure(fid, first) is True
        assert blobs.ensure(fid, first) is False  # exists: not written again
        # another blob in the same folder, after the folder vanished behind our back
        os.unlink(blobs.path_for(fid))
        shutil.rmtree(blobs.path_for(fid).parent)
        n = 0
        while True:
            data = b"other %d\r\n" % n
            if sha256_hex(data)[:4] == fid[:4]:
                break
            n += 1
            if n > 2_000_000:  # pragma: no cover - statistically unreachable
                pytest.skip("no colliding prefix found")
        assert blobs.ensure(sha256_hex(data), data) is True
        assert blobs.read(sha256_hex(data)) == data
        assert blobs.ensure(fid, first) is True
        assert hashlib.sha256(blobs.read(fid)).hexdigest() == fid
        assert list(blobs.path_for(fid).parent.glob(".*.tmp")) == []
        # and when the top folder ("ab/") went too
        os.unlink(blobs.path_for(fid))
        os.unlink(blobs.path_for(sha256_hex(data)))
        shutil.rmtree(blobs.path_for(fid).parent.parent)
        assert blobs.ensure(fid, first) is True
        assert blobs.read(fid) == first
    finally:
        blobs.close()


@pytest.mark.asyncio
@pytest.mark.sqlite_only("the embedded store's reader threads and their connections")
async def test_reader_connections_are_open_from_the_start(tmp_path: Path) -> None:
    """Every reader thread has its connection (meta.sqlite3 and inline.sqlite3, with their WAL
    files) once open() returns: a load later opens no more files (the soak compares the count)."""
    store = SqliteStore(tmp_path, readers=3)
    await store.open()
    try:
        assert len(store._rconns) == 3
        before = len(os.listdir("/proc/self/fd"))
        await asyncio.gather(*(store.list_domains() for _ in range(60)))
        assert len(store._rconns) == 3
        assert len(os.listdir("/proc/self/fd")) <= before  # (earlier tests' leftovers may close meanwhile)
    finally:
        await store.close()
