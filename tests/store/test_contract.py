"""The Store contract: every method of postfach.store.base.Store, parametrized by backend."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from tests import backends
from tests.store.storehelpers import account_with_inbox, backend_params, msg, new_store, opened

from postfach.errors import AlreadyExists, MailboxInUse, NotFound, NotPermitted, QuotaExceeded, StoreError
from postfach.mail import MessageInfo, parse_message
from postfach.store.base import (
    ALL_ACCOUNTS,
    DEFAULT_MAILBOXES,
    ChangeKind,
    DeliveryTarget,
    FlagOp,
    QueueRecipient,
    RecipientState,
    Store,
)
from postfach.types import AccountId, BlobId, ModSeq, QueueId, Uid

pytestmark = pytest.mark.timeout(60)


@pytest_asyncio.fixture(params=backend_params())
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s = new_store(request.param, tmp_path / "store")
    await s.open()
    yield s
    problems = await s.check()
    await s.close()
    assert problems == [], problems  # every test leaves a consistent store


def test_store_satisfies_protocol(tmp_path: Path) -> None:
    assert isinstance(new_store(backends.backend(), tmp_path), Store)


# ------------------------------------------------------------------------------------ domains


@pytest.mark.asyncio
async def test_domains(store: Store) -> None:
    d = await store.add_domain("Example.COM", quota_bytes=1000)
    assert d.name == "example.com" and d.quota_bytes == 1000
    assert d.created.tzinfo is not None and d.created.utcoffset() == timedelta(0)
    with pytest.raises(AlreadyExists):
        await store.add_domain("example.com")
    await store.add_domain("b.example")
    assert [x.name for x in await store.list_domains()] == ["b.example", "example.com"]
    got = await store.get_domain("EXAMPLE.com")
    assert got is not None and got.quota_bytes == 1000
    assert await store.get_domain("nope.example") is None
    acct = await store.create_account("u@example.com", "h")
    assert acct.quota_bytes == 1000  # the domain's default
    with pytest.raises(NotPermitted):
        await store.delete_domain("example.com")
    await store.delete_account(acct.id)
    await store.delete_domain("example.com")
    with pytest.raises(NotFound):
        await store.delete_domain("example.com")
    assert [x.name for x in await store.list_domains()] == ["b.example"]


# ----------------------------------------------------------------------------------- accounts


@pytest.mark.asyncio
async def test_lookups_by_a_key_with_nul_find_nothing(store: Store) -> None:
    """A login name or address with a NUL (an IMAP literal, POP3 USER) is no account, no alias,
    no mailbox: "not found", never a database error (PostgreSQL's text cannot hold NUL)."""
    await store.add_domain("example.com")
    a = await store.create_account("alice@example.com", "h")
    await store.add_alias("sales@example.com", "alice@example.com")
    assert await store.get_account("alice\x00@example.com") is None
    assert await store.get_domain("example.com\x00") is None
    assert await store.aliases_for("sales\x00@example.com") == []
    assert await store.list_accounts("example.com\x00") == []
    assert await store.list_aliases("example.com\x00") == []
    assert await store.get_mailbox(a.id, "IN\x00BOX") is None


@pytest.mark.asyncio
async def test_accounts(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.create_account("a@example.com", "h")  # no domain
    await store.add_domain("example.com")
    a = await store.create_account("Alice@Example.com", "hash1", quota_bytes=10_000, quota_messages=5)
    assert a.address == "alice@example.com" and a.domain == "example.com"
    assert (a.quota_bytes, a.quota_messages, a.used_bytes, a.used_messages) == (10_000, 5, 0, 0)
    with pytest.raises(AlreadyExists):
        await store.create_account("alice@example.com", "h")
    b = await store.create_account("bob@example.com", "hash2")
    assert b.quota_bytes is None
    assert [x.address for x in await store.list_accounts()] == ["alice@example.com", "bob@example.com"]
    assert [x.address for x in await store.list_accounts("example.com")] == ["alice@example.com", "bob@example.com"]
    assert await store.list_accounts("other.example") == []
    got = await store.get_account("ALICE@example.com")
    assert got is not None and got.id == a.id
    assert await store.get_account("nobody@example.com") is None
    await store.set_password(a.id, "hash3")
    await store.set_quota(a.id, None, 100)
    got = await store.get_account_by_id(a.id)
    assert got is not None and got.password_hash == "hash3"
    assert (got.quota_bytes, got.quota_messages) == (None, 100)
    boxes = await store.list_mailboxes(a.id)
    assert [(m.name, m.special_use) for m in boxes] == [
        ("INBOX", None),
        *sorted((n, s) for n, s in DEFAULT_MAILBOXES if n != "INBOX"),
    ]
    assert all(m.subscribed for m in boxes)
    assert len({m.uidvalidity for m in boxes}) == len(boxes)
    await store.delete_account(a.id)
    assert await store.get_account_by_id(a.id) is None
    with pytest.raises(NotFound):
        await store.set_password(a.id, "x")
    with pytest.raises(NotFound):
        await store.delete_account(a.id)
    b2 = await store.get_account_by_id(b.id)
    assert b2 is not None


# ------------------------------------------------------------------------------------ aliases


@pytest.mark.asyncio
async def test_aliases(store: Store) -> None:
    await store.add_domain("example.com")
    await store.add_domain("example.org")
    a = await store.add_alias("Postmaster@example.com", "admin@example.com")
    assert (a.source, a.target) == ("postmaster@example.com", "admin@example.com")
    await store.add_alias("postmaster@example.com", "root@elsewhere.example")
    await store.add_alias("@example.org", "catchall@example.com")
    with pytest.raises(AlreadyExists):
        await store.add_alias("postmaster@example.com", "admin@example.com")
    with pytest.raises(NotFound):
        await store.add_alias("x@unknown.example", "a@example.com")
    assert [x.target for x in await store.aliases_for("POSTMASTER@example.com")] == [
        "admin@example.com",
        "root@elsewhere.example",
    ]
    assert [x.source for x in await store.aliases_for("@example.org")] == ["@example.org"]
    assert await store.aliases_for("nobody@example.org") == []  # exact only
    assert len(await store.list_aliases()) == 3
    assert [x.source for x in await store.list_aliases("example.org")] == ["@example.org"]
    await store.delete_alias("postmaster@example.com", "admin@example.com")
    with pytest.raises(NotFound):
        await store.delete_alias("postmaster@example.com", "admin@example.com")
    assert len(await store.list_aliases("example.com")) == 1


# ---------------------------------------------------------------------------------- mailboxes


@pytest.mark.asyncio
async def test_mailboxes_create_get_delete(store: Store) -> None:
    aid, inbox = await account_with_inbox(store)
    other, _ = await account_with_inbox(store, "other@example.com")
    for spelling in ("inbox", "InBoX", "INBOX"):
        mb = await store.get_mailbox(aid, spelling)
        assert mb is not None and mb.id == inbox and mb.name == "INBOX"
    assert await store.get_mailbox(aid, "sent") is None  # case-sensitive except INBOX
    work = await store.create_mailbox(aid, "Work/Projekte ä", special_use="\\Flagged")
    assert work.name == "Work/Projekte ä" and work.special_use == "\\Flagged"
    assert work.uidnext == 1 and work.highestmodseq >= 1 and not work.subscribed
    with pytest.raises(AlreadyExists):
        await store.create_mailbox(aid, "Work/Projekte ä")
    with pytest.raises(AlreadyExists):
        await store.create_mailbox(aid, "inbox")
    # invariant 5: another account cannot reach it
    assert await store.get_mailbox_by_id(other, work.id) is None
    with pytest.raises(NotFound):
        await store.delete_mailbox(other, work.id)
    with pytest.raises(NotFound):
        await store.append(other, work.id, msg(1))
    got = await store.get_mailbox_by_id(aid, work.id)
    assert got == work
    await store.append(aid, work.id, msg(1))
    with pytest.raises(NotPermitted):
        await store.delete_mailbox(aid, inbox)
    await store.delete_mailbox(aid, work.id)
    assert await store.get_mailbox(aid, "Work/Projekte ä") is None
    with pytest.raises(NotFound):
        await store.list_messages(aid, work.id)
    acct = await store.get_account_by_id(aid)
    assert acct is not None and (acct.used_bytes, acct.used_messages) == (0, 0)
    # recreated with the same name: a new, larger UIDVALIDITY (RFC 9051 §2.3.1.1)
    again = await store.create_mailbox(aid, "Work/Projekte ä")
    assert again.uidvalidity > work.uidvalidity and again.id != work.id


@pytest.mark.asyncio
async def test_rename_with_children_and_subscriptions(store: Store) -> None:
    aid, _ = await account_with_inbox(store)
    a = await store.create_mailbox(aid, "a")
    ab = await store.create_mailbox(aid, "a/b")
    await store.create_mailbox(aid, "ab")  # not a child of "a"
    await store.set_subscribed(aid, "a/b", True)
    r = await store.append(aid, ab.id, msg(1))
    await store.rename_mailbox(aid, a.id, "x/y")
    names = {m.name for m in await store.list_mailboxes(aid)}
    assert {"x/y", "x/y/b", "ab"} <= names and "a" not in names and "a/b" not in names
    moved = await store.get_mailbox(aid, "x/y/b")
    assert moved is not None and moved.id == ab.id and moved.uidvalidity == ab.uidvalidity
    assert moved.subscribed
    assert "x/y/b" in await store.list_subscriptions(aid)
    assert "a/b" not in await store.list_subscriptions(aid)
    assert [m.uid for m in await store.list_messages(aid, ab.id)] == [r.uid]
    with pytest.raises(AlreadyExists):
        await store.rename_mailbox(aid, a.id, "ab")
    with pytest.raises(NotPermitted):
        await store.rename_mailbox(aid, a.id, "x/y/z")
    # a child collision refuses the whole rename
    await store.create_mailbox(aid, "c/b")
    with pytest.raises(AlreadyExists):
        await store.rename_mailbox(aid, a.id, "c")
    assert (await store.get_mailbox(aid, "x/y/b")) is not None


@pytest.mark.asyncio
async def test_rename_inbox_moves_messages(store: Store) -> None:
    aid, inbox = await account_with_inbox(store)
    child = await store.create_mailbox(aid, "INBOX/child")
    r1 = await store.append(aid, inbox, msg(1), frozenset({"\\Seen"}))
    await store.append(aid, inbox, msg(2))
    before = await store.get_mailbox_by_id(aid, inbox)
    assert before is not None
    await store.rename_mailbox(aid, inbox, "Old-Inbox")
    new = await store.get_mailbox(aid, "Old-Inbox")
    assert new is not None and new.id != inbox
    moved = await store.list_messages(aid, new.id)
    assert [m.flags for m in moved] == [frozenset({"\\Seen"}), frozenset()]
    assert await store.read_message(aid, new.id, moved[0].uid) == msg(1)
    after = await store.get_mailbox_by_id(aid, inbox)
    assert after is not None and after.name == "INBOX"
    assert after.uidvalidity == before.uidvalidity and after.uidnext == before.uidnext  # UIDs not reused
    assert await store.list_messages(aid, inbox) == []
    ch = await store.mailbox_changes(aid, inbox, before.highestmodseq)
    assert ch.expunged == (r1.uid, Uid(r1.uid + 1))
    assert (await store.get_mailbox_by_id(aid, child.id)) is not None  # children unaffected
    acct = await store.get_account_by_id(aid)
    assert acct is not None and acct.used_messages == 2


@pytest.mark.asyncio
async def test_subscriptions(store: Store) -> None:
    aid, _ = await account_with_inbox(store)
    await store.set_subscribed(aid, "does/not/exist", True)
    await store.set_subscribed(aid, "Sent", False)
    await store.set_subscribed(aid, "does/not/exist", True)  # idempotent
    subs = await store.list_subscriptions(aid)
    assert subs[0] == "INBOX" and "does/not/exist" in subs and "Sent" not in subs
    sent = await store.get_mailbox(aid, "Sent")
    assert sent is not None and not sent.subscribed
    await store.set_subscribed(aid, "inbox", False)
    assert "INBOX" not in await store.list_subscriptions(aid)


# ----------------------------------------------------------------------------------- messages


@pytest.mark.asyncio
async def test_append_read_status(store: Store) -> None:
    aid, inbox = await account_with_inbox(store)
    date = datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)
    m0 = await store.get_mailbox_by_id(aid, inbox)
    assert m0 is not None
    r1 = await store.append(aid, inbox, msg(1), frozenset({"\\seen", "$Label", "\\Recent"}), date)
    r2 = await store.append(aid, inbox, msg(2, 5000))
    assert r1.uidvalidity == m0.uidvalidity and r1.mailbox_id == inbox
    assert r2.uid > r1.uid and r2.modseq > r1.modseq > m0.highestmodseq
    metas = await store.list_messages(aid, inbox)
    assert [m.uid for m in metas] == [r1.uid, r2.uid]
    first = metas[0]
    assert first.flags == frozenset({"\\Seen", "$Label"})  # canonical system flags, no \Recent
    assert first.internaldate == date and first.size == len(msg(1))
    assert first.blob_id == hashlib.sha256(msg(1)).hexdigest()
    assert first.savedate is not None and first.savedate.tzinfo is not None
    assert metas[1].internaldate.tzinfo is not None
    assert await store.read_message(aid, inbox, r2.uid) == msg(2, 5000)
    assert await store.read_blob(first.blob_id) == msg(1)
    reader = await store.open_blob(metas[1].blob_id)
    assert reader.size == len(msg(2, 5000))
    assert await reader.read(10, 20) == msg(2, 5000)[10:30]
    await reader.close()
    with pytest.raises(NotFound):
        await store.read_message(aid, inbox, Uid(999))
    with pytest.raises(NotFound):
        await store.read_blob(BlobId("0" * 64))
    st = await store.mailbox_status(aid, inbox)
    assert (st.messages, st.unseen, st.size, st.deleted) == (2, 1, len(msg(1)) + len(msg(2, 5000)), 0)
    assert st.first_unseen_uid == r2.uid
    assert st.mailbox.uidnext == r2.uid + 1 and st.mailbox.highestmodseq == r2.modseq
    got = await store.get_messages(aid, inbox, [Uid(999), r2.uid, r1.uid])
    assert [m.uid for m in got] == [r1.uid, r2.uid]
    acct = await store.get_account_by_id(aid)
    assert acct is not None and (acct.used_bytes, acct.used_messages) == (st.size, 2)


@pytest.mark.asyncio
async def test_message_info_cached(store: Store) -> None:
    aid, inbox = await account_with_inbox(store)
    r = await store.append(aid, inbox, msg(7))
    (meta,) = await store.get_messages(aid, inbox, [r.uid])
    info = await store.message_info(meta.blob_id)
    assert info == parse_message(msg(7)).to_json()
    assert MessageInfo.from_json(info).subject == "test 7"
    # a copy shares the blob and its cached info; bytes of any shape are accepted (invariant 7)
    junk = b"\x00\xff not a mail at all \r\n\r\n\r\n--"
    r2 = await store.append(aid, inbox, junk)
    (m2,) = await store.get_messages(aid, inbox, [r2.uid])
    assert await store.read_message(aid, inbox, r2.uid) == junk
    MessageInfo.from_json(await store.message_info(m2.blob_id))
    with pytest.raises(NotFound):
        await store.message_info(BlobId("f" * 64))


@pytest.mark.asyncio
async def test_append_many_all_or_nothing(store: Store) -> None:
    aid, inbox = await account_with_inbox(store, quota_messages=3)
    res = await store.append_many(aid, inbox, [(msg(i), frozenset(), None) for i in range(3)])
    assert [r.uid for r in res] == [res[0].uid, res[0].uid + 1, res[0].uid + 2]
    assert len({r.modseq for r in res}) == 1
    with pytest.raises(QuotaExceeded) as ei:
        await store.append_many(aid, inbox, [(msg(i), frozenset(), None) for i in range(10, 12)])
    assert ei.value.resource == "MESSAGE"
    assert len(await store.list_messages(aid, inbox)) == 3
    assert await store.append_many(aid, inbox, []) == []


@pytest.mark.asyncio
async def test_store_flags_and_unchangedsince(store: Store) -> None:
    aid, inbox = await account_with_inbox(store)
    r = await store.append_many(aid, inbox, [(msg(i), frozenset(), None) for i in range(3)])
    uids = [x.uid for x in r]
    res = await store.store_flags(aid, inbox, uids[:2], FlagOp.ADD, frozenset({"\\Seen", "Work"}))
    assert [m.uid for m in res.updated] == uids[:2] and res.unchanged == () and res.modified == ()
    ms = res.updated[0].modseq
    assert all(m.modseq == ms for m in res.updated) and ms > r[0].modseq
    res2 = await store.store_flags(aid, inbox, uids, FlagOp.ADD, frozenset({"\\SEEN", "work"}))
    assert [m.uid for m in res2.updated] == [uids[2]]
    assert [m.uid for m in res2.unchanged] == uids[:2]
    assert res2.updated[0].flags == frozenset({"\\Seen", "work"})
    metas = await store.list_messages(aid, inbox)
    assert metas[0].flags == frozenset({"\\Seen", "Work"})  # existing keyword spelling kept
    res3 = await store.store_flags(aid, inbox, uids, FlagOp.REMOVE, frozenset({"WORK"}))
    assert len(res3.updated) == 3 and all(m.flags == frozenset({"\\Seen"}) for m in res3.updated)
    # RFC 7162 §3.1.3 UNCHANGEDSINCE
    hms = res3.updated[0].modseq
    await store.store_flags(aid, inbox, [uids[0]], FlagOp.ADD, frozenset({"\\Flagged"}))
    res4 = await store.store_flags(aid, inbox, uids, FlagOp.REPLACE, frozenset({"\\Answered"}), unchangedsince=hms)
    assert res4.modified == (uids[0],) and [m.uid for m in res4.updated] == uids[1:]
    res5 = await store.store_flags(aid, inbox, [Uid(999)], FlagOp.ADD, frozenset({"x"}))
    assert res5.updated == () and res5.unchanged == () and res5.modified == ()
    st = await store.mailbox_status(aid, inbox)
    assert st.unseen == 2  # uids[1:] lost \Seen by REPLACE
    ch = await store.mailbox_changes(aid, inbox, ModSeq(hms))
    assert [m.uid for m in ch.changed] == uids and ch.expunged == ()


@pytest.mark.asyncio
async def test_expunge_delete_and_changes(store: Store) -> None:
    aid, inbox = await account_with_inbox(store)
    r = await store.append_many(aid, inbox, [(msg(i), frozenset(), None) for i in range(5)])
    uids = [x.uid for x in r]
    base = r[-1].modseq
    await store.store_flags(aid, inbox, uids[:3], FlagOp.ADD, frozenset({"\\Deleted"}))
    st = await store.mailbox_status(aid, inbox)
    assert st.deleted == 3
    assert await store.expunge(aid, inbox, [uids[0], uids[3]]) == [uids[0]]  # only \Deleted among uids
    assert await store.expunge(aid, inbox) == uids[1:3]
    assert await store.expunge(aid, inbox) == []
    assert await store.delete_messages(aid, inbox, [uids[4], Uid(999)]) == [uids[4]]
    ch = await store.mailbox_changes(aid, inbox, base)
    assert ch.expunged == (uids[0], uids[1], uids[2], uids[4])
    assert [m.uid for m in ch.changed] == []  # uids[3] was not touched after base
    ch0 = await store.mailbox_changes(aid, inbox, ModSeq(0))
    assert [m.uid for m in ch0.changed] == [uids[3]]
    assert ch0.mailbox.highestmodseq > base
    # UIDs are never reused
    nxt = await store.append(aid, inbox, msg(99))
    assert nxt.uid == uids[-1] + 1
    acct = await store.get_account_by_id(aid)
    assert acct is not None and acct.used_messages == 2
    assert acct.used_bytes == len(msg(3)) + len(msg(99))


@pytest.mark.asyncio
async def test_copy_and_move(store: Store) -> None:
    aid, inbox = await account_with_inbox(store)
    other, oinbox = await account_with_inbox(store, "other@example.com")
    arch = await store.get_mailbox(aid, "Archive")
    assert arch is not None
    date = datetime(2019, 5, 6, 7, 8, 9, tzinfo=UTC)
    r = await store.append_many(
        aid, inbox, [(msg(i), frozenset({"\\Flagged"}) if i == 1 else frozenset(), date) for i in range(3)]
    )
    uids = [x.uid for x in r]
    c = await store.copy_messages(aid, inbox, [uids[2], uids[1], Uid(999)], arch.id)
    assert c.uidvalidity == arch.uidvalidity and c.source_uids == (uids[1], uids[2])
    assert c.dest_uids == (Uid(1), Uid(2))
    copied = await store.list_messages(aid, arch.id)
    assert copied[0].flags == frozenset({"\\Flagged"}) and copied[0].internaldate == date
    acct = await store.get_account_by_id(aid)
    assert acct is not None and acct.used_messages == 5
    with pytest.raises(NotFound):
        await store.copy_messages(aid, inbox, uids, oinbox)  # other account's mailbox
    with pytest.raises(NotFound):
        await store.copy_messages(other, inbox, uids, oinbox)
    mv = await store.move_messages(aid, inbox, uids[:2], arch.id)
    assert mv.source_uids == tuple(uids[:2]) and mv.dest_uids == (Uid(3), Uid(4))
    assert [m.uid for m in await store.list_messages(aid, inbox)] == [uids[2]]
    acct = await store.get_account_by_id(aid)
    assert acct is not None and acct.used_messages == 5  # move does not change usage
    empty = await store.copy_messages(aid, inbox, [Uid(999)], arch.id)
    assert empty.source_uids == () and empty.dest_uids == ()


@pytest.mark.asyncio
async def test_quota_storage_and_expunge_always_works(store: Store) -> None:
    size = len(msg(0, 1000))
    aid, inbox = await account_with_inbox(store, quota_bytes=size * 2)
    arch = await store.get_mailbox(aid, "Archive")
    assert arch is not None
    r1 = await store.append(aid, inbox, msg(0, 1000))
    await store.copy_messages(aid, inbox, [r1.uid], arch.id)  # exactly at the limit
    with pytest.raises(QuotaExceeded) as ei:
        await store.copy_messages(aid, inbox, [r1.uid], arch.id)
    assert ei.value.resource == "STORAGE"
    acct = await store.get_account_by_id(aid)
    assert acct is not None and (acct.used_bytes, acct.used_messages) == (size * 2, 2)
    assert len(await store.list_messages(aid, arch.id)) == 1
    with pytest.raises(QuotaExceeded):
        await store.append(aid, inbox, msg(2, 3000))
    # lowering the quota under the usage: expunge and delete still work, moves too
    await store.set_quota(aid, 10, None)
    await store.move_messages(aid, inbox, [r1.uid], arch.id)
    left = await store.list_messages(aid, arch.id)
    assert await store.delete_messages(aid, arch.id, [m.uid for m in left]) == [m.uid for m in left]
    acct = await store.get_account_by_id(aid)
    assert acct is not None and (acct.used_bytes, acct.used_messages) == (0, 0)


@pytest.mark.asyncio
async def test_deliver(store: Store) -> None:
    a, ainbox = await account_with_inbox(store, "a@example.com")
    b, _ = await account_with_inbox(store, "b@example.com", quota_messages=1)
    junk = await store.get_mailbox(a, "Junk")
    assert junk is not None
    data = msg(1)
    res = await store.deliver(
        data,
        [
            DeliveryTarget(a, "INBOX", prepend=b"Delivered-To: a@example.com\r\n"),
            DeliveryTarget(a, "Junk", frozenset({"$Junk"})),
            DeliveryTarget(b, "No/Such/Folder"),  # falls back to INBOX
        ],
    )
    assert [x.mailbox_id for x in res[:2]] == [ainbox, junk.id]
    binbox = await store.get_mailbox(b, "INBOX")
    assert binbox is not None and res[2].mailbox_id == binbox.id
    assert await store.read_message(a, ainbox, res[0].uid) == b"Delivered-To: a@example.com\r\n" + data
    assert await store.read_message(a, junk.id, res[1].uid) == data
    (jm,) = await store.list_messages(a, junk.id)
    assert jm.flags == frozenset({"$Junk"})
    # b is full: the whole delivery is refused, nothing half-written for a either
    with pytest.raises(QuotaExceeded):
        await store.deliver(msg(2), [DeliveryTarget(a), DeliveryTarget(b)])
    assert len(await store.list_messages(a, ainbox)) == 1
    with pytest.raises(NotFound):
        await store.deliver(msg(3), [DeliveryTarget(AccountId(9999))])
    assert await store.deliver(msg(3), []) == []


@pytest.mark.asyncio
async def test_claim_recent(store: Store) -> None:
    aid, inbox = await account_with_inbox(store)
    r = await store.append_many(aid, inbox, [(msg(i), frozenset(), None) for i in range(2)])
    assert await store.claim_recent(aid, inbox) == Uid(1)
    assert await store.claim_recent(aid, inbox) == r[-1].uid + 1  # nothing recent any more
    r3 = await store.append(aid, inbox, msg(3))
    assert await store.claim_recent(aid, inbox) == r3.uid


# -------------------------------------------------------------------------------- change feed


@pytest.mark.asyncio
async def test_change_feed(store: Store) -> None:
    aid, inbox = await account_with_inbox(store)
    other, oinbox = await account_with_inbox(store, "other@example.com")
    sub = store.subscribe(aid)
    osub = store.subscribe(other)
    assert sub.get_nowait() is None
    r = await store.append(aid, inbox, msg(1))
    ch = await sub.get()
    assert (ch.kind, ch.mailbox_id, ch.uids, ch.modseq) == (ChangeKind.APPEND, inbox, (r.uid,), r.modseq)
    await store.store_flags(aid, inbox, [r.uid], FlagOp.ADD, frozenset({"\\Deleted"}))
    assert (await sub.get()).kind is ChangeKind.FLAGS
    await store.expunge(aid, inbox)
    ch = await sub.get()
    assert ch.kind is ChangeKind.EXPUNGE and ch.uids == (r.uid,)
    mb = await store.create_mailbox(aid, "New")
    ch = await sub.get()
    assert (ch.kind, ch.mailbox_id, ch.name) == (ChangeKind.MAILBOX_CREATE, mb.id, "New")
    await store.rename_mailbox(aid, mb.id, "Newer")
    ch = await sub.get()
    assert (ch.kind, ch.name) == (ChangeKind.MAILBOX_RENAME, "Newer")
    await store.delete_mailbox(aid, mb.id)
    assert (await sub.get()).kind is ChangeKind.MAILBOX_DELETE
    assert sub.get_nowait() is None
    assert osub.get_nowait() is None  # nothing of aid's leaks to other
    await store.append(other, oinbox, msg(2))
    assert (await osub.get()).account_id == other
    # a failed write publishes nothing
    await store.set_quota(aid, None, 0)
    with pytest.raises(QuotaExceeded):
        await store.append(aid, inbox, msg(3))
    assert (await sub.get()).kind is ChangeKind.ACCOUNT
    assert sub.get_nowait() is None
    sub.close()
    await store.set_quota(aid, None, None)
    assert sub.get_nowait() is None
    osub.close()


@pytest.mark.asyncio
async def test_change_feed_for_all_accounts(store: Store) -> None:
    a1, inbox1 = await account_with_inbox(store, "one@example.com")
    a2, inbox2 = await account_with_inbox(store, "two@example.com")
    watcher = store.subscribe(ALL_ACCOUNTS)
    try:
        r1 = await store.append(a1, inbox1, msg(1))
        r2 = await store.append(a2, inbox2, msg(2))
        seen = []
        for _ in range(2):
            ch = await asyncio.wait_for(watcher.get(), 5)
            seen.append((ch.account_id, ch.kind, ch.uids))
        assert seen == [(a1, ChangeKind.APPEND, (r1.uid,)), (a2, ChangeKind.APPEND, (r2.uid,))]
    finally:
        watcher.close()


@pytest.mark.asyncio
async def test_change_feed_overflow_keeps_wakeup(store: Store) -> None:
    from postfach.store import common as common_mod

    aid, inbox = await account_with_inbox(store)
    sub = store.subscribe(aid)
    n = common_mod.SUBSCRIPTION_QUEUE_SIZE + 20
    for i in range(0, n, 50):
        await store.append_many(aid, inbox, [(msg(j, tag="o"), frozenset(), None) for j in range(i, i + 50)])
    await store.store_flags(aid, inbox, [Uid(1)], FlagOp.ADD, frozenset({"\\Seen"}))
    got = []
    while (c := sub.get_nowait()) is not None:
        got.append(c)
    assert 0 < len(got) <= common_mod.SUBSCRIPTION_QUEUE_SIZE
    assert got[-1].kind is ChangeKind.FLAGS  # the newest survives, the oldest were dropped
    sub.close()


# ------------------------------------------------------------------------------- maildrop lock


@pytest.mark.asyncio
async def test_maildrop_lock(store: Store) -> None:
    aid, _ = await account_with_inbox(store)
    other, _ = await account_with_inbox(store, "other@example.com")
    async with store.lock_maildrop(aid):
        with pytest.raises(MailboxInUse):
            async with store.lock_maildrop(aid):
                pass
        async with store.lock_maildrop(other):
            pass
    async with store.lock_maildrop(aid):  # released on exit, also after an error
        pass
    with pytest.raises(RuntimeError):
        async with store.lock_maildrop(aid):
            raise RuntimeError("boom")
    async with store.lock_maildrop(aid):
        pass


# -------------------------------------------------------------------------------------- queue


@pytest.mark.asyncio
async def test_queue(store: Store) -> None:
    data = msg(1, 2000)
    item = await store.queue_add(
        "sender@example.com",
        [QueueRecipient("a@remote.example", notify="FAILURE"), QueueRecipient("b@remote.example")],
        data,
        ret="HDRS",
        envid="env-1",
        requiretls=True,
    )
    assert item.sender == "sender@example.com" and item.size == len(data)
    assert item.recipients[0].notify == "FAILURE" and item.ret == "HDRS" and item.envid == "env-1"
    assert item.requiretls and not item.smtputf8 and item.attempts == 0
    assert await store.read_blob(item.blob_id) == data
    bounce = await store.queue_add("", [QueueRecipient("sender@example.com")], msg(2))
    now = datetime.now(UTC)
    due = await store.queue_due(now)
    assert [i.id for i in due] == [item.id, bounce.id]
    assert await store.queue_due(now) == []  # claimed in this process
    later = now + timedelta(minutes=5)
    await store.queue_update(
        item.id,
        [
            QueueRecipient("a@remote.example", RecipientState.DELIVERED, 1),
            QueueRecipient("b@remote.example", RecipientState.PENDING, 1, "451 try later"),
        ],
        later,
        "451 try later",
        delay_warned=True,
    )
    got = await store.queue_get(item.id)
    assert got is not None and got.attempts == 1 and got.last_error == "451 try later" and got.delay_warned
    assert got.next_attempt == later.replace(microsecond=later.microsecond)
    assert [r.state for r in got.recipients] == [RecipientState.DELIVERED, RecipientState.PENDING]
    assert await store.queue_due(now) == []  # not due yet (and bounce still claimed)
    assert [i.id for i in await store.queue_due(later)] == [item.id]
    assert await store.queue_retry(bounce.id) == 1
    assert await store.queue_retry() == 2
    assert len(await store.queue_list()) == 2
    await store.queue_update(
        item.id, [QueueRecipient("b@remote.example", RecipientState.FAILED, 2, "550 no")], later, "550 no"
    )
    assert await store.queue_get(item.id) is None  # nothing pending: removed
    with pytest.raises(NotFound):
        await store.read_blob(item.blob_id)  # its blob went with it
    await store.queue_delete(bounce.id)
    with pytest.raises(NotFound):
        await store.queue_delete(bounce.id)
    with pytest.raises(NotFound):
        await store.queue_update(QueueId(12345), [], later, None)
    assert await store.queue_list() == []
    assert await store.queue_get(QueueId(12345)) is None


@pytest.mark.asyncio
async def test_queue_survives_restart(tmp_path: Path) -> None:
    s = new_store(backends.backend(), tmp_path)
    await s.open()
    item = await s.queue_add("s@example.com", [QueueRecipient("r@remote.example")], msg(1))
    due = await s.queue_due(datetime.now(UTC))
    assert [i.id for i in due] == [item.id]
    await s.close()
    s2 = new_store(backends.backend(), tmp_path)
    await s2.open()
    try:
        due = await s2.queue_due(datetime.now(UTC))  # claims do not survive the process
        assert [i.id for i in due] == [item.id]
        assert await s2.read_blob(due[0].blob_id) == msg(1)
    finally:
        await s2.close()


# -------------------------------------------------------------------------------- maintenance


@pytest.mark.asyncio
@pytest.mark.sqlite_only("tampers with the embedded store's blob files (PostgreSQL: test_postgres_nodes.py)")
async def test_check_finds_problems_and_recount(tmp_path: Path) -> None:
    """The embedded store's blob files (PostgreSQL's chunks: test_postgres_nodes.py,
    test_check_finds_tampered_chunks)."""
    async with opened("sqlite", tmp_path / "store") as store:
        await _check_finds_problems_and_recount(store, tmp_path)


async def _check_finds_problems_and_recount(store: Store, tmp_path: Path) -> None:
    aid, inbox = await account_with_inbox(store)
    big = msg(1, 70_000)  # above inline_max: a file of its own
    r = await store.append(aid, inbox, big)
    small = msg(2)  # inline: its bytes live in inline.sqlite3
    r2 = await store.append(aid, inbox, small)
    assert await store.check() == []
    (meta,) = await store.get_messages(aid, inbox, [r.uid])
    blob_file = tmp_path / "store" / "blobs" / meta.blob_id[:2] / meta.blob_id[2:4] / meta.blob_id
    assert blob_file.read_bytes() == big
    orphan = tmp_path / "store" / "blobs" / "00" / "00" / ("00" * 32)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"x")
    blob_file.chmod(0o644)
    good = blob_file.read_bytes()
    blob_file.write_bytes(b"tampered")
    kinds = sorted(p.kind for p in await store.check())
    assert kinds == ["bad-hash", "bad-size", "orphan-blob"]
    blob_file.write_bytes(good)
    orphan.unlink()
    assert await store.check() == []
    # The inline bytes are checked the same way.
    (meta2,) = await store.get_messages(aid, inbox, [r2.uid])
    assert not (tmp_path / "store" / "blobs" / meta2.blob_id[:2] / meta2.blob_id[2:4] / meta2.blob_id).exists()
    with sqlite3.connect(tmp_path / "store" / "inline.sqlite3") as db:
        db.execute("UPDATE blob_inline SET data = ? WHERE id = ?", (b"tampered", meta2.blob_id))
    problems = await store.check()
    assert sorted(p.kind for p in problems) == ["bad-hash", "bad-size"]
    assert all(meta2.blob_id in p.detail for p in problems)
    with sqlite3.connect(tmp_path / "store" / "inline.sqlite3") as db:
        db.execute("UPDATE blob_inline SET data = ? WHERE id = ?", (small, meta2.blob_id))
    assert await store.check() == []
    assert await store.recount_usage(aid) == (len(big) + len(small), 2)
    with pytest.raises(NotFound):
        await store.recount_usage(AccountId(999))


@pytest.mark.asyncio
async def test_closed_store_refuses(tmp_path: Path) -> None:
    s = new_store(backends.backend(), tmp_path)
    with pytest.raises(StoreError):
        await s.list_domains()
    await s.open()
    await s.close()
    with pytest.raises(StoreError):
        await s.add_domain("example.com")


@pytest.mark.asyncio
async def test_mailbox_changes_small_and_large(store: Store) -> None:
    """Few changes are read on the event loop's connection (SQLite), many on a reader thread:
    both give every change, in UID order."""
    aid, inbox = await account_with_inbox(store)
    r = await store.append_many(aid, inbox, [(msg(i), frozenset(), None) for i in range(300)])
    uids = [x.uid for x in r]
    base = r[-1].modseq
    await store.store_flags(aid, inbox, uids[5:7], FlagOp.ADD, frozenset({"\\Seen"}))
    ch = await store.mailbox_changes(aid, inbox, base)
    assert [m.uid for m in ch.changed] == uids[5:7] and ch.expunged == ()
    assert all(m.flags == frozenset({"\\Seen"}) for m in ch.changed)
    await store.store_flags(aid, inbox, list(reversed(uids)), FlagOp.ADD, frozenset({"\\Deleted"}))
    ch = await store.mailbox_changes(aid, inbox, base)
    assert [m.uid for m in ch.changed] == uids and ch.expunged == ()
    mid = ch.mailbox.highestmodseq
    assert await store.expunge(aid, inbox, uids[:290]) == uids[:290]
    ch = await store.mailbox_changes(aid, inbox, mid)
    assert ch.changed == () and ch.expunged == tuple(uids[:290])
    assert ch.mailbox.highestmodseq > mid
    ch = await store.mailbox_changes(aid, inbox, base)
    assert [m.uid for m in ch.changed] == uids[290:] and ch.expunged == tuple(uids[:290])
