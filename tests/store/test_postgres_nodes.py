"""PostgreSQL as the store of several nodes: two PostgresStore objects on one database are two nodes.

UID allocation, quota, queue claims, maildrop locks and change notifications are checked across
them; then what the PostgreSQL backend has beyond the contract suite (chunked blobs, check(),
migrations, connection loss)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from tests.store.storehelpers import account_with_inbox, msg, pg_dsn, pg_schema_for

from postfach.errors import MailboxInUse, QuotaExceeded, StoreError, StoreUnavailable
from postfach.store.base import (
    WIRE_CRLF_ONLY,
    WIRE_NO_DOT_LINES,
    ChangeKind,
    DeliveryTarget,
    FlagOp,
    QueueRecipient,
    Store,
)
from postfach.store.postgres import CHUNK_BYTES, PgMigration, PostgresStore, load_migrations
from postfach.types import BlobId, Uid

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.asyncio,
    pytest.mark.postgres_only("nodes, LISTEN/NOTIFY, advisory locks and chunked blobs of the PostgreSQL store"),
]


@pytest_asyncio.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    dsn, schema = pg_dsn(), pg_schema_for(tmp_path)
    a = PostgresStore(dsn, schema=schema)
    b = PostgresStore(dsn, schema=schema)
    await asyncio.gather(a.open(), b.open())  # both migrate at once: one does it, one waits
    yield a, b
    problems = await a.check()
    await asyncio.gather(a.close(), b.close())
    assert problems == [], problems


async def test_postgres_store_satisfies_protocol() -> None:
    assert isinstance(PostgresStore("postgresql://x@127.0.0.1/none"), Store)


# ----------------------------------------------------------------------------------- two nodes


async def test_concurrent_appends_through_two_nodes(nodes: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = nodes
    aid, inbox = await account_with_inbox(a)

    async def writer(store: PostgresStore, w: int) -> list[tuple[int, int]]:
        out = []
        for i in range(10):
            r = await store.append(aid, inbox, msg(i, tag=f"w{w}-"))
            out.append((int(r.uid), int(r.modseq)))
        return out

    results = await asyncio.gather(*(writer(a if w % 2 else b, w) for w in range(8)))
    uids = sorted(u for res in results for u, _ in res)
    assert uids == list(range(1, 81))  # distinct and dense
    modseqs = [m for res in results for _, m in res]
    assert len(set(modseqs)) == len(modseqs)
    for res in results:  # each writer saw its UIDs and modseqs ascend
        assert res == sorted(res)
    metas = await b.list_messages(aid, inbox)
    assert [m.uid for m in metas] == uids
    mb = await a.get_mailbox_by_id(aid, inbox)
    assert mb is not None and mb.uidnext == 81 and mb.highestmodseq == max(modseqs)
    await a.store_flags(aid, inbox, [Uid(2), Uid(3)], FlagOp.ADD, frozenset({"\\Seen", "$Work"}))
    lean = await b.list_uids_sizes(aid, inbox)
    assert [(u, n) for u, n, _ in lean] == [(m.uid, m.size) for m in metas]
    assert lean[1][2] == frozenset({"\\Seen", "$Work"}) and lean[0][2] == frozenset()


async def test_change_through_b_reaches_subscriber_on_a(nodes: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = nodes
    aid, inbox = await account_with_inbox(a)
    other, oinbox = await account_with_inbox(a, "other@example.com")
    sub = a.subscribe(aid)
    osub = a.subscribe(other)
    t0 = time.monotonic()
    r = await b.append(aid, inbox, msg(1))
    ch = await asyncio.wait_for(sub.get(), 1.0)  # issue 9: within 1 s
    latency = time.monotonic() - t0
    assert (ch.account_id, ch.kind, ch.mailbox_id, ch.modseq, ch.uids) == (
        aid,
        ChangeKind.APPEND,
        inbox,
        r.modseq,
        (r.uid,),
    )
    assert latency < 1.0
    await b.store_flags(aid, inbox, [r.uid], FlagOp.ADD, frozenset({"\\Deleted"}))
    ch = await asyncio.wait_for(sub.get(), 1.0)
    assert ch.kind is ChangeKind.FLAGS and ch.uids == (r.uid,)
    await b.expunge(aid, inbox)
    ch = await asyncio.wait_for(sub.get(), 1.0)
    assert ch.kind is ChangeKind.EXPUNGE and ch.uids == (r.uid,)
    mb = await b.create_mailbox(aid, "Neu/Ordner ä")
    ch = await asyncio.wait_for(sub.get(), 1.0)
    assert (ch.kind, ch.mailbox_id, ch.name) == (ChangeKind.MAILBOX_CREATE, mb.id, "Neu/Ordner ä")
    # what A changes itself is published once (locally at commit), not again by its own NOTIFY
    await a.append(aid, inbox, msg(2))
    assert (await asyncio.wait_for(sub.get(), 1.0)).kind is ChangeKind.APPEND
    await b.append(other, oinbox, msg(3))  # a fence: B's NOTIFY comes after A's would have
    assert (await asyncio.wait_for(osub.get(), 1.0)).account_id == other
    assert sub.get_nowait() is None
    # a failed write publishes nothing
    await b.set_quota(aid, None, 0)
    assert (await asyncio.wait_for(sub.get(), 1.0)).kind is ChangeKind.ACCOUNT
    with pytest.raises(QuotaExceeded):
        await b.append(aid, inbox, msg(4))
    await b.append(other, oinbox, msg(5))
    await asyncio.wait_for(osub.get(), 1.0)
    assert sub.get_nowait() is None
    sub.close()
    osub.close()


async def test_big_delivery_notification_without_uid_list(nodes: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = nodes
    aid, inbox = await account_with_inbox(a)
    sub = a.subscribe(aid)
    res = await b.append_many(aid, inbox, [(msg(i), frozenset(), None) for i in range(2000)])
    ch = await asyncio.wait_for(sub.get(), 2.0)
    # consecutive UIDs travel as one range
    assert ch.kind is ChangeKind.APPEND and ch.modseq == res[0].modseq and ch.uids == tuple(r.uid for r in res)
    every_other = [r.uid for r in res[::2]]
    fl = await b.store_flags(aid, inbox, every_other, FlagOp.ADD, frozenset({"\\Seen"}))
    ch = await asyncio.wait_for(sub.get(), 2.0)
    # 1000 separate UIDs do not fit PostgreSQL's 8000-byte payload: the wake-up comes without the hint
    assert ch.kind is ChangeKind.FLAGS and ch.modseq == fl.updated[0].modseq and ch.uids == ()
    changes = await a.mailbox_changes(aid, inbox, res[0].modseq)
    assert [m.uid for m in changes.changed] == every_other  # the store is the truth
    sub.close()


async def test_queue_items_claimed_once(nodes: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = nodes
    items = [await a.queue_add("s@example.com", [QueueRecipient(f"r{i}@remote.example")], msg(i)) for i in range(30)]
    now = datetime.now(UTC)
    claims = await asyncio.gather(*(s.queue_due(now, limit=4) for _ in range(6) for s in (a, b)))
    claimed = [i.id for batch in claims for i in batch]
    assert len(claimed) == len(set(claimed))  # never the same item twice
    rest_a, rest_b = await asyncio.gather(a.queue_due(now), b.queue_due(now))
    everything = claimed + [i.id for i in rest_a] + [i.id for i in rest_b]
    assert sorted(everything) == sorted(i.id for i in items)
    assert await a.queue_due(now) == [] and await b.queue_due(now) == []
    # an attempt ends the claim: after queue_update the item is free for any node again
    first = items[0]
    await a.queue_update(first.id, [QueueRecipient(first.recipients[0].address, attempts=1)], now, "451 later")
    again = await b.queue_due(now)
    assert [i.id for i in again] == [first.id]


async def test_claims_of_a_dead_node_are_released(tmp_path: Path) -> None:
    dsn, schema = pg_dsn(), pg_schema_for(tmp_path)
    a = PostgresStore(dsn, schema=schema)
    b = PostgresStore(dsn, schema=schema)
    await a.open()
    await b.open()
    try:
        aid, _ = await account_with_inbox(a)
        item = await a.queue_add("s@example.com", [QueueRecipient("r@remote.example")], msg(1))
        now = datetime.now(UTC)
        assert [i.id for i in await a.queue_due(now)] == [item.id]
        assert await b.queue_due(now) == []  # A is alive and holds it
        async with a.lock_maildrop(aid):
            with pytest.raises(MailboxInUse):
                async with b.lock_maildrop(aid):
                    pass
            await a.close()  # node A goes away: its session, its liveness and its locks with it
        assert [i.id for i in await b.queue_due(now)] == [item.id]
        async with b.lock_maildrop(aid):
            pass
        await b.queue_delete(item.id)
    finally:
        await a.close()
        await b.close()


async def test_maildrop_lock_across_nodes(nodes: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = nodes
    aid, _ = await account_with_inbox(a)
    async with a.lock_maildrop(aid):
        with pytest.raises(MailboxInUse):
            async with b.lock_maildrop(aid):
                pass
        with pytest.raises(MailboxInUse):
            async with a.lock_maildrop(aid):  # same node, another session
                pass
    async with b.lock_maildrop(aid):
        with pytest.raises(MailboxInUse):
            async with a.lock_maildrop(aid):
                pass
    async with a.lock_maildrop(aid):
        pass


async def test_quota_exact_across_nodes(nodes: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = nodes
    size = len(msg(0, 2000, tag="q"))
    aid, inbox = await account_with_inbox(a, quota_bytes=size * 10)

    async def one(store: PostgresStore, i: int) -> bool:
        try:
            await store.append(aid, inbox, msg(i, 2000, tag="q"))
        except QuotaExceeded:
            return False
        return True

    ok = await asyncio.gather(*(one(a if i % 2 else b, i) for i in range(25)))
    assert sum(ok) == 10
    acct = await b.get_account_by_id(aid)
    assert acct is not None and (acct.used_bytes, acct.used_messages) == (size * 10, 10)


async def test_singleton_job_runs_on_one_node(nodes: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = nodes
    async with a.singleton("backup") as mine_a, b.singleton("backup") as mine_b:
        assert mine_a and not mine_b
    async with b.singleton("backup") as mine_b:
        assert mine_b


# ------------------------------------------------------------------------------ chunked blobs


async def test_big_message_is_chunked_and_read_by_range(nodes: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = nodes
    aid, inbox = await account_with_inbox(a)
    data = msg(1, int(CHUNK_BYTES * 3.5))
    r = await a.append(aid, inbox, data)
    (meta,) = await b.get_messages(aid, inbox, [r.uid])
    assert meta.size == len(data) and meta.blob_id == hashlib.sha256(data).hexdigest()
    conn = await asyncpg.connect(pg_dsn(), server_settings={"search_path": a.schema or "public"})
    try:
        sizes = await conn.fetch(
            "SELECT seq, length(data) AS n FROM blob_chunk WHERE blob_id = $1 ORDER BY seq", meta.blob_id
        )
    finally:
        await conn.close()
    assert [x["seq"] for x in sizes] == [0, 1, 2, 3]
    assert [x["n"] for x in sizes] == [CHUNK_BYTES] * 3 + [len(data) - 3 * CHUNK_BYTES]
    reader = await b.open_blob(meta.blob_id)
    assert reader.size == len(data)
    assert getattr(reader, "wire", None) == WIRE_CRLF_ONLY | WIRE_NO_DOT_LINES  # learned at ingest
    for off, n in [(0, 10), (CHUNK_BYTES - 5, 10), (CHUNK_BYTES * 2 - 3, CHUNK_BYTES + 7), (len(data) - 4, 100)]:
        assert await reader.read(off, n) == data[off : off + n]
    assert await reader.read(len(data), 10) == b""
    await reader.close()
    assert await b.read_message(aid, inbox, r.uid) == data
    # the same bytes again share the blob (one row, refcount 2)
    r2 = await b.append(aid, inbox, data)
    assert await a.read_message(aid, inbox, r2.uid) == data
    await a.delete_messages(aid, inbox, [r.uid, r2.uid])
    with pytest.raises(StoreError):
        await a.read_blob(BlobId(meta.blob_id))
    # delivery of a multi-chunk message to two accounts: one blob, two references
    other, _ = await account_with_inbox(a, "other@example.com")
    big = msg(2, CHUNK_BYTES + 1000)
    res = await b.deliver(big, [DeliveryTarget(aid), DeliveryTarget(other, "Archive")])
    assert await a.read_message(aid, inbox, res[0].uid) == big
    archive = await a.get_mailbox(other, "Archive")
    assert archive is not None and res[1].mailbox_id == archive.id
    assert await b.read_message(other, archive.id, res[1].uid) == big
    assert (await a.get_account_by_id(other)).used_bytes == len(big)  # type: ignore[union-attr]


async def test_check_finds_tampered_chunks(nodes: tuple[PostgresStore, PostgresStore]) -> None:
    a, _ = nodes
    aid, inbox = await account_with_inbox(a)
    r = await a.append(aid, inbox, msg(1))
    (meta,) = await a.get_messages(aid, inbox, [r.uid])
    assert await a.check() == []
    conn = await asyncpg.connect(pg_dsn(), server_settings={"search_path": a.schema or "public"})
    try:
        await conn.execute("UPDATE blob_chunk SET data = 'tampered'::bytea WHERE blob_id = $1", meta.blob_id)
        await conn.execute("UPDATE account SET used_messages = 7 WHERE id = $1", aid)
        kinds = sorted(p.kind for p in await a.check())
        assert kinds == ["bad-hash", "bad-size", "counter"]
        await conn.execute("UPDATE blob_chunk SET data = $2 WHERE blob_id = $1", meta.blob_id, msg(1))
    finally:
        await conn.close()
    assert await a.recount_usage(aid) == (len(msg(1)), 1)
    assert await a.check() == []


# --------------------------------------------------------------------------------- migrations


async def test_migrations_versioned_and_newer_schema_refused(tmp_path: Path) -> None:
    dsn, schema = pg_dsn(), pg_schema_for(tmp_path)
    migs = load_migrations()
    assert [m.version for m in migs] == list(range(1, len(migs) + 1))
    s = PostgresStore(dsn, schema=schema)
    await s.open()
    await s.add_domain("example.com")
    await s.close()
    assert s.schema_version == len(migs)
    extra = PgMigration(len(migs) + 1, f"{len(migs) + 1:04d}_test", "CREATE TABLE later_thing (x integer);")
    s2 = PostgresStore(dsn, schema=schema, migrations=[*migs, extra])
    await s2.open()
    assert [d.name for d in await s2.list_domains()] == ["example.com"]  # data kept
    await s2.close()
    s3 = PostgresStore(dsn, schema=schema)  # this program knows fewer versions than the database
    with pytest.raises(StoreError, match="newer postfach"):
        await s3.open()


async def test_upgrade_from_version_1_keeps_data(tmp_path: Path) -> None:
    dsn, schema = pg_dsn(), pg_schema_for(tmp_path)
    migs = load_migrations()
    old = PostgresStore(dsn, schema=schema, migrations=migs[:1])
    await old.open()
    aid, inbox = await account_with_inbox(old)
    r1 = await old.append(aid, inbox, msg(1))  # the version-1 code path (no postfach_append yet)
    dotted = await old.append(aid, inbox, b"Subject: x\r\n\r\n.starts with a dot\n")
    await old.close()
    new = PostgresStore(dsn, schema=schema)
    await new.open()
    try:
        assert new.schema_version == len(migs) >= 2
        r2 = await new.append(aid, inbox, msg(2))
        assert r2.uid == dotted.uid + 1 and r2.modseq > r1.modseq
        metas = await new.list_messages(aid, inbox)
        assert [m.uid for m in metas] == [r1.uid, dotted.uid, r2.uid]
        assert getattr(await new.open_blob(metas[0].blob_id), "wire", 0) is None  # stored before version 3
        r3 = await new.append(aid, inbox, b"Subject: y\r\n\r\n.dot and bare LF\n")  # the fast path
        (m3,) = await new.get_messages(aid, inbox, [r3.uid])
        assert getattr(await new.open_blob(m3.blob_id), "wire", None) == 0
        assert await new.check() == []
    finally:
        await new.close()


async def test_unreachable_database_is_temporary() -> None:
    s = PostgresStore("postgresql://postgres@127.0.0.1:1/nothing", connect_timeout=2)
    with pytest.raises(StoreUnavailable):
        await s.open()
    with pytest.raises(StoreUnavailable):
        await s.list_domains()


# ------------------------------------------------------------------------------ connection loss


async def _kill_backends(store: PostgresStore) -> int:
    """pg_terminate_backend on every connection of this test database but ours: what a
    PostgreSQL restart does to the nodes."""
    conn = await asyncpg.connect(pg_dsn())
    try:
        n: int = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name = 'postfach'"
        )
    finally:
        await conn.close()
    return n


async def test_connection_loss_is_temporary_and_nodes_reconnect(nodes: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = nodes
    aid, inbox = await account_with_inbox(a)
    sub = a.subscribe(aid)
    acked = [await a.append(aid, inbox, msg(i)) for i in range(3)]
    while sub.get_nowait() is not None:
        pass
    assert await _kill_backends(a) >= 2
    outcomes: list[str] = []
    for i in range(3, 9):  # each call either works or fails as temporary; none hangs or crashes
        try:
            acked.append(await b.append(aid, inbox, msg(i)))
            outcomes.append("ok")
        except StoreUnavailable:
            outcomes.append("unavailable")
    assert outcomes[-1] == "ok"
    # A's control connection came back (a wake-up says so) and hears B's changes again
    deadline = time.monotonic() + 10
    while True:
        try:
            r = await b.append(aid, inbox, msg(100 + len(outcomes)))
            acked.append(r)
            ch = await asyncio.wait_for(sub.get(), 1.0)
            while ch.kind is not ChangeKind.APPEND or ch.modseq != r.modseq:
                ch = await asyncio.wait_for(sub.get(), 1.0)
            break
        except TimeoutError:
            outcomes.append("waiting")
            assert time.monotonic() < deadline, "node A never heard from B again"
    # nothing acknowledged is lost
    have = {m.uid for m in await a.list_messages(aid, inbox)}
    assert {x.uid for x in acked} <= have
    async with a.lock_maildrop(aid):  # the lock connection is back too
        with pytest.raises(MailboxInUse):
            async with b.lock_maildrop(aid):
                pass
    sub.close()
    assert Uid(1) in have


async def test_connections_killed_under_load_lose_nothing_acknowledged(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    aid, inbox = await account_with_inbox(a)
    acked: list[Uid] = []
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def writer(store: PostgresStore, w: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = await store.append(aid, inbox, msg(i, tag=f"load{w}-"))
            except StoreUnavailable:
                failures.append(StoreUnavailable())
                await asyncio.sleep(0.01)
                continue
            except BaseException as exc:  # anything else is a bug
                failures.append(exc)
                raise
            acked.append(r.uid)

    tasks = [asyncio.ensure_future(writer(a if w % 2 else b, w)) for w in range(8)]
    for _ in range(3):
        await asyncio.sleep(0.3)
        await _kill_backends(a)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*tasks)
    assert all(isinstance(f, StoreUnavailable) for f in failures), failures
    assert len(acked) == len(set(acked)) and acked
    stored = {m.uid for m in await b.list_messages(aid, inbox)}
    assert set(acked) <= stored  # every acknowledged append survived
    acct = await a.get_account_by_id(aid)
    assert acct is not None and acct.used_messages == len(stored)
