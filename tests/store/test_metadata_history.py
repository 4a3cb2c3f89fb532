"""The store's METADATA table (RFC 5464) and expunge-history trimming (RFC 7162 §3.2.5.2), on both
backends: entries per mailbox and per account, all-or-nothing writes with limits, entries that
follow RENAME (copied from INBOX) and go with DELETE and the account; the sweep that drops
expunge records older than the retention and raises the mailbox's floor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from tests.store.storehelpers import account_with_inbox, backend_params, msg, new_store

from postfach.errors import NotFound, TooManyEntries
from postfach.store.base import FlagOp, Store
from postfach.types import MailboxId, ModSeq

pytestmark = pytest.mark.timeout(60)

LIMITS = {"max_mailbox_entries": 3, "max_account_entries": 5}


@pytest_asyncio.fixture(params=backend_params())
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s = new_store(request.param, tmp_path / "store")
    await s.open()
    yield s
    problems = await s.check()
    await s.close()
    assert problems == [], problems


@pytest.mark.asyncio
async def test_metadata_set_get_remove_and_limits(store: Store) -> None:
    acct, inbox = await account_with_inbox(store)
    other, other_inbox = await account_with_inbox(store, "other@example.com")
    await store.set_metadata(acct, inbox, {"/private/Comment": b"mine", "/shared/comment": b"\x00bin"}, **LIMITS)
    await store.set_metadata(acct, None, {"/shared/comment": b"server"}, **LIMITS)
    assert await store.get_metadata(acct, inbox) == {"/private/comment": b"mine", "/shared/comment": b"\x00bin"}
    assert await store.get_metadata(acct, None) == {"/shared/comment": b"server"}
    assert await store.get_metadata(other, other_inbox) == {}  # per account
    assert await store.get_metadata(other, None) == {}
    # replacing is not a new entry; removing frees a place; NIL of a missing entry is fine
    await store.set_metadata(acct, inbox, {"/private/comment": b"new", "/private/x": None}, **LIMITS)
    await store.set_metadata(acct, inbox, {"/private/a": b"1"}, **LIMITS)
    with pytest.raises(TooManyEntries):  # a fourth in the mailbox
        await store.set_metadata(acct, inbox, {"/private/b": b"2", "/private/comment": b"lost"}, **LIMITS)
    assert (await store.get_metadata(acct, inbox))["/private/comment"] == b"new"  # all or nothing
    await store.set_metadata(acct, inbox, {"/private/a": None, "/private/b": b"2"}, **LIMITS)
    sent = await store.get_mailbox(acct, "Sent")
    assert sent is not None
    await store.set_metadata(acct, sent.id, {"/private/s": b"1"}, **LIMITS)  # five in the account
    with pytest.raises(TooManyEntries):
        await store.set_metadata(acct, sent.id, {"/private/t": b"1"}, **LIMITS)
    with pytest.raises(NotFound):
        await store.set_metadata(acct, other_inbox, {"/private/t": b"1"}, **LIMITS)  # not its mailbox
    with pytest.raises(NotFound):
        await store.get_metadata(acct, MailboxId(999999))


@pytest.mark.asyncio
async def test_metadata_follows_rename_and_goes_with_delete(store: Store) -> None:
    acct, inbox = await account_with_inbox(store)
    box = await store.create_mailbox(acct, "Projects")
    await store.set_metadata(acct, box.id, {"/private/comment": b"p"}, **LIMITS)
    await store.set_metadata(acct, inbox, {"/shared/comment": b"in"}, **LIMITS)
    await store.rename_mailbox(acct, box.id, "Work")
    assert await store.get_metadata(acct, box.id) == {"/private/comment": b"p"}
    await store.rename_mailbox(acct, inbox, "Old")  # RFC 5464 §4.1: copied, INBOX keeps them
    old = await store.get_mailbox(acct, "Old")
    assert old is not None
    assert await store.get_metadata(acct, old.id) == {"/shared/comment": b"in"}
    assert await store.get_metadata(acct, inbox) == {"/shared/comment": b"in"}
    await store.delete_mailbox(acct, box.id)
    again = await store.create_mailbox(acct, "Work")
    assert await store.get_metadata(acct, again.id) == {}
    await store.set_metadata(acct, None, {"/private/vendor/x/y": b"1"}, **LIMITS)
    await store.delete_account(acct)
    acct2, _ = await account_with_inbox(store)
    assert await store.get_metadata(acct2, None) == {}


@pytest.mark.asyncio
async def test_expunge_history_sweep_in_chunks_covers_every_mailbox(store: Store) -> None:
    """A sweep runs ``chunk`` mailboxes per transaction; the result is that of one sweep of all."""
    acct, inbox = await account_with_inbox(store)
    boxes = [inbox] + [(await store.create_mailbox(acct, f"Box{i}")).id for i in range(6)]
    for i, box in enumerate(boxes):
        u = (await store.append(acct, box, msg(i))).uid
        await store.store_flags(acct, box, [u], FlagOp.ADD, frozenset({"\\Deleted"}))
        await store.expunge(acct, box, [u])
    tops = [(await store.mailbox_changes(acct, b, ModSeq(0))).mailbox.highestmodseq for b in boxes]
    assert await store.trim_expunge_history(timedelta(0), timedelta(0), chunk=2) == 0  # checkpoints
    assert await store.trim_expunge_history(timedelta(0), timedelta(0), chunk=2) == len(boxes)
    assert [await store.expunge_history_floor(acct, b) for b in boxes] == tops
    assert await store.trim_expunge_history(timedelta(0), timedelta(0), chunk=1) == 0


@pytest.mark.asyncio
async def test_expunge_history_is_trimmed_to_a_floor(store: Store) -> None:
    acct, inbox = await account_with_inbox(store)
    uids = [(await store.append(acct, inbox, msg(i))).uid for i in range(6)]

    async def expunge(u: int) -> None:
        await store.store_flags(acct, inbox, [u], FlagOp.ADD, frozenset({"\\Deleted"}))
        await store.expunge(acct, inbox, [u])

    await expunge(uids[0])
    await expunge(uids[1])
    before = (await store.mailbox_changes(acct, inbox, ModSeq(0))).mailbox.highestmodseq
    year, hour = timedelta(days=365), timedelta(hours=1)
    # A retention of a year trims nothing; the sweep takes a checkpoint (HIGHESTMODSEQ, now).
    assert await store.trim_expunge_history(year, hour) == 0
    assert await store.expunge_history_floor(acct, inbox) == 0
    # With no retention that checkpoint is old enough: everything up to it goes.
    assert await store.trim_expunge_history(timedelta(0), hour) == 2
    assert await store.expunge_history_floor(acct, inbox) == before
    ch = await store.mailbox_changes(acct, inbox, ModSeq(0))
    assert ch.expunged == () and ch.history_floor == before
    # Later expunges stay until a later checkpoint ages out.
    await expunge(uids[2])
    after = (await store.mailbox_changes(acct, inbox, ModSeq(0))).mailbox.highestmodseq
    ch = await store.mailbox_changes(acct, inbox, before)
    assert ch.expunged == (uids[2],) and ch.history_floor == before
    assert await store.trim_expunge_history(timedelta(0), hour) == 0  # takes a checkpoint
    assert await store.trim_expunge_history(year, hour) == 0  # too young for a year
    assert await store.trim_expunge_history(timedelta(0), timedelta(0)) == 1
    assert await store.expunge_history_floor(acct, inbox) == after
    assert (await store.mailbox_changes(acct, inbox, before)).expunged == ()
    # The floor goes with the mailbox; other accounts see no floor of it.
    other, _ = await account_with_inbox(store, "other@example.com")
    assert await store.expunge_history_floor(other, inbox) == 0
    box = await store.create_mailbox(acct, "Tmp")
    u = (await store.append(acct, box.id, msg(99))).uid
    await store.store_flags(acct, box.id, [u], FlagOp.ADD, frozenset({"\\Deleted"}))
    await store.expunge(acct, box.id, [u])
    await store.trim_expunge_history(timedelta(0), timedelta(0))
    await store.trim_expunge_history(timedelta(0), timedelta(0))
    assert await store.expunge_history_floor(acct, box.id) > 0
    await store.delete_mailbox(acct, box.id)
    assert await store.expunge_history_floor(acct, box.id) == 0


@pytest.mark.asyncio
async def test_sweeper_service(store: Store) -> None:
    """``serve``'s sweeper: off with 0 days; else it sweeps at start and then periodically."""
    from types import SimpleNamespace

    from postfach.config import ImapConfig
    from postfach.store.history import ExpungeHistoryTrimmer, sweep_params

    assert sweep_params(365, 60) == (timedelta(days=365), timedelta(days=365) / 100)
    assert sweep_params(1, 60) == (timedelta(days=1), timedelta(minutes=60))
    acct, inbox = await account_with_inbox(store)
    await store.append(acct, inbox, msg(1))
    off = ExpungeHistoryTrimmer(SimpleNamespace(store=store, config=SimpleNamespace(  # type: ignore[arg-type]
        imap=ImapConfig(expunge_history_days=0))))
    await off.start()
    assert off._task is None
    on = ExpungeHistoryTrimmer(SimpleNamespace(store=store, config=SimpleNamespace(  # type: ignore[arg-type]
        imap=ImapConfig(expunge_history_days=1))))
    await on.start()
    try:
        assert on._task is not None
        assert await on.sweep() == 0  # nothing is a day old
    finally:
        await on.stop()
    assert on._task is None
