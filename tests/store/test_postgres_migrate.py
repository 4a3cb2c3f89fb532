"""``postfach store migrate``: embedded -> PostgreSQL -> embedded keeps everything a client can see."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.store.storehelpers import fresh_pg_database, msg

from postfach.cli import main
from postfach.store.base import FlagOp, QueueRecipient, Store
from postfach.store.migrate import MigrateError, describe, migrate
from postfach.store.postgres import CHUNK_BYTES, PostgresStore
from postfach.store.sqlite import SqliteStore
from postfach.types import Uid

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.postgres_only("copies between both backends; needs the PostgreSQL server either way"),
]


@pytest.fixture
def fresh_db() -> Iterator[str]:
    """A database of its own: migrate works on a whole database, without a test schema."""
    with fresh_pg_database("postfach_mig") as dsn:
        yield dsn


async def fill(store: Store) -> None:
    await store.add_domain("example.com", quota_bytes=50_000_000)
    await store.add_domain("example.org")
    a = await store.create_account("alice@example.com", "$argon2id$v=19$m=8,t=1,p=1$c2FsdA$alice-hash")
    b = await store.create_account("bob@example.org", "$argon2id$v=19$m=8,t=1,p=1$c2FsdA$bob-hash", None, 500)
    await store.add_alias("postmaster@example.com", "alice@example.com")
    await store.add_alias("@example.org", "bob@example.org")
    inbox = await store.get_mailbox(a.id, "INBOX")
    assert inbox is not None
    work = await store.create_mailbox(a.id, "Arbeit/Projekte ä", special_use="\\Flagged")
    await store.set_subscribed(a.id, "Arbeit/Projekte ä", True)
    await store.set_subscribed(a.id, "not/there", True)
    await store.set_subscribed(a.id, "Junk", False)
    date = datetime(2020, 2, 3, 4, 5, 6, 789000, tzinfo=UTC)
    r = await store.append_many(
        a.id,
        inbox.id,
        [(msg(i, tag="mig"), frozenset({"\\Seen", "$Label"} if i % 2 else set()), date) for i in range(6)],
    )
    await store.append(a.id, inbox.id, msg(99, int(CHUNK_BYTES * 2.3), tag="big"), frozenset({"\\Flagged"}))
    await store.store_flags(a.id, inbox.id, [r[1].uid, r[2].uid], FlagOp.ADD, frozenset({"\\Deleted", "Work"}))
    await store.expunge(a.id, inbox.id)
    await store.trim_expunge_history(timedelta(days=365), timedelta(0))  # a checkpoint ...
    await store.trim_expunge_history(timedelta(0), timedelta(0))  # ... and the history up to it trimmed
    await store.copy_messages(a.id, inbox.id, [r[3].uid, r[4].uid], work.id)
    await store.move_messages(a.id, inbox.id, [r[5].uid], work.id)
    await store.claim_recent(a.id, inbox.id)
    lim = {"max_mailbox_entries": 10, "max_account_entries": 20}
    await store.set_metadata(a.id, work.id, {"/private/comment": "ä".encode(), "/shared/v": b"\x00\xff"}, **lim)
    await store.set_metadata(a.id, None, {"/shared/comment": b"server entry"}, **lim)
    await store.trim_expunge_history(timedelta(days=365), timedelta(0))  # a checkpoint kept
    binbox = await store.get_mailbox(b.id, "INBOX")
    assert binbox is not None
    await store.append(b.id, binbox.id, msg(0, tag="mig"))  # the same bytes as alice's: one blob
    await store.append(b.id, binbox.id, b"\x00\xff not mail at all\r\n")
    await store.queue_add(
        "alice@example.com",
        [QueueRecipient("x@remote.example", notify="FAILURE,DELAY", orcpt="rfc822;x@remote.example")],
        msg(7, tag="out"),
        ret="HDRS",
        envid="e-1",
        requiretls=True,
    )


async def state(store: Store) -> dict[str, Any]:
    """Everything a client or an admin can see, ids included."""
    out: dict[str, Any] = {
        "domains": await store.list_domains(),
        "accounts": await store.list_accounts(),
        "aliases": await store.list_aliases(),
        "queue": [
            (
                q.sender,
                q.recipients,
                q.blob_id,
                q.size,
                q.created,
                q.next_attempt,
                q.attempts,
                q.ret,
                q.envid,
                q.requiretls,
                q.smtputf8,
            )
            for q in await store.queue_list()
        ],
    }
    for acct in out["accounts"]:
        boxes = await store.list_mailboxes(acct.id)
        out[f"subs {acct.address}"] = await store.list_subscriptions(acct.id)
        out[f"server metadata {acct.address}"] = await store.get_metadata(acct.id, None)
        for mb in boxes:
            metas = await store.list_messages(acct.id, mb.id)
            ch = await store.mailbox_changes(acct.id, mb.id, 0)  # type: ignore[arg-type]
            st = await store.mailbox_status(acct.id, mb.id)
            out[f"box {acct.address} {mb.name}"] = (mb, metas, ch.expunged, ch.history_floor, st)
            out[f"metadata {acct.address} {mb.name}"] = await store.get_metadata(acct.id, mb.id)
            out[f"bytes {acct.address} {mb.name}"] = [
                hashlib.sha256(await store.read_message(acct.id, mb.id, m.uid)).hexdigest() for m in metas
            ]
            out[f"info {acct.address} {mb.name}"] = [await store.message_info(m.blob_id) for m in metas]
    return out


def test_round_trip_sqlite_postgres_sqlite(tmp_path: Path, fresh_db: str) -> None:
    async def run() -> None:
        src = SqliteStore(tmp_path / "a")
        await src.open()
        await fill(src)
        before = await state(src)
        await src.close()

        rep = await migrate(str(tmp_path / "a"), fresh_db)
        assert rep.problems == [] and rep.rows["message"] == 9 and rep.rows["account"] == 2
        pg = PostgresStore(fresh_db)
        await pg.open()
        try:
            assert await state(pg) == before
            # the copy goes on where the original stopped: UIDs, modseqs and ids do not restart
            alice = await pg.get_account("alice@example.com")
            assert alice is not None
            inbox = await pg.get_mailbox(alice.id, "INBOX")
            assert inbox is not None
            r = await pg.append(alice.id, inbox.id, msg(1000))
            assert r.uid == inbox.uidnext and r.modseq == inbox.highestmodseq + 1
            await pg.delete_messages(alice.id, inbox.id, [r.uid])
            await pg.add_domain("new.example")
            carol = await pg.create_account("carol@new.example", "h")
            assert carol.id > max(a.id for a in before["accounts"])
            await pg.delete_account(carol.id)
            await pg.delete_domain("new.example")
            after_pg = await state(pg)
        finally:
            await pg.close()

        with pytest.raises(MigrateError, match="not empty"):
            await migrate(str(tmp_path / "a"), fresh_db)
        rep2 = await migrate(fresh_db, str(tmp_path / "b"))
        assert rep2.problems == []
        back = SqliteStore(tmp_path / "b")
        await back.open()
        try:
            assert await state(back) == after_pg
            assert await back.check() == []
            # the original and the round trip agree except for the one message appended and deleted
            got = await state(back)
            for key, value in before.items():
                if key.startswith("box alice@example.com INBOX"):
                    mb, metas, _exp, _floor, _st = value
                    bmb, bmetas, _bexp, _bfloor, _bst = got[key]
                    assert (bmb.uidvalidity, bmetas) == (mb.uidvalidity, metas)
                    assert bmb.uidnext == mb.uidnext + 1
                else:
                    assert got[key] == value, key
        finally:
            await back.close()

    asyncio.run(run())


def test_refusals(tmp_path: Path, fresh_db: str) -> None:
    async def run() -> None:
        with pytest.raises(MigrateError, match="no embedded store"):
            await migrate(str(tmp_path / "nothing"), fresh_db)
        with pytest.raises(MigrateError, match="must be PostgreSQL"):
            await migrate(str(tmp_path / "x"), str(tmp_path / "y"))
        node = PostgresStore(fresh_db)  # a running node on the target
        await node.open()
        try:
            s = SqliteStore(tmp_path / "a")
            await s.open()
            await s.add_domain("example.com")
            await s.close()
            with pytest.raises(MigrateError, match="node"):
                await migrate(str(tmp_path / "a"), fresh_db)
            with pytest.raises(MigrateError, match="node"):
                await migrate(fresh_db, str(tmp_path / "c"))
            # a backup while serving: one consistent snapshot into an embedded store
            await node.add_domain("served.example")
            rep = await migrate(fresh_db, str(tmp_path / "c"), while_serving=True)
            assert rep.problems == [] and rep.rows["domain"] == 1
            with pytest.raises(MigrateError, match="while-serving needs"):
                await migrate(str(tmp_path / "a"), fresh_db, while_serving=True)
        finally:
            await node.close()

    asyncio.run(run())
    assert describe("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"


def test_cli_store_migrate(tmp_path: Path, fresh_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "data"
    assert main(["init", "--data", str(d), "--dev", "--hostname", "mail.example.org"]) == 0
    assert main(["domain", "add", "example.org", "--data", str(d)]) == 0
    capsys.readouterr()
    assert main(["store", "migrate", "--to", fresh_db, "--data", str(d)]) == 0
    out = capsys.readouterr().out
    assert "check of the target: OK" in out and 'backend = "postgres"' in out

    async def domains() -> list[str]:
        s = PostgresStore(fresh_db)
        await s.open()
        try:
            return [x.name for x in await s.list_domains()]
        finally:
            await s.close()

    assert asyncio.run(domains()) == ["example.org"]
    assert main(["store", "migrate", "--to", fresh_db, "--data", str(d)]) == 2  # not empty: one line
    assert "not empty" in capsys.readouterr().err
    # a node configured for the database (`postfach init --store DSN`) sees the data; `check` agrees
    d2 = tmp_path / "node"
    assert main(["init", "--data", str(d2), "--dev", "--hostname", "localhost", "--store", fresh_db]) == 0
    capsys.readouterr()
    assert main(["check", "--data", str(d2)]) == 0
    assert main(["domain", "list", "--data", str(d2)]) == 0
    assert "example.org" in capsys.readouterr().out
    assert Uid(1) == 1


def test_cli_store_migrate_into_and_out_of_a_schema(
    tmp_path: Path, fresh_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "data"
    assert main(["init", "--data", str(d), "--dev", "--hostname", "mail.example.org"]) == 0
    assert main(["domain", "add", "schema.example", "--data", str(d)]) == 0
    capsys.readouterr()
    assert main(["store", "migrate", "--to", fresh_db, "--schema", "mail", "--data", str(d)]) == 0
    assert 'schema = "mail"' in capsys.readouterr().out

    async def domains(schema: str | None) -> list[str]:
        s = PostgresStore(fresh_db, schema=schema)
        await s.open()
        try:
            return [x.name for x in await s.list_domains()]
        finally:
            await s.close()

    assert asyncio.run(domains("mail")) == ["schema.example"]
    assert asyncio.run(domains(None)) == []  # the default schema stays empty
    assert main(["store", "migrate", "--to", fresh_db, "--schema", "Bad-Name", "--data", str(d)]) == 2
    capsys.readouterr()
    # a node configured for that schema is the source by default; back into a folder
    node = tmp_path / "node"
    assert main(["init", "--data", str(node), "--dev", "--store", fresh_db, "--schema", "mail"]) == 0
    assert main(["store", "migrate", "--to", str(tmp_path / "back"), "--data", str(node)]) == 0

    async def back() -> list[str]:
        s = SqliteStore(tmp_path / "back")
        await s.open()
        try:
            return [x.name for x in await s.list_domains()]
        finally:
            await s.close()

    assert asyncio.run(back()) == ["schema.example"]
