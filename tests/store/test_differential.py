"""The PostgreSQL store against the reference, operation by operation: the same random mail
operations (mailboxes, appends, deliveries, flags with UNCHANGEDSINCE, expunges, copies, moves,
subscriptions, listings, change sets) on an embedded store and a PostgreSQL store give the same
answers and the same errors (ids, UIDVALIDITY and clock times aside)."""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tests import backends
from tests.store.storehelpers import msg

from postfach.store.base import DeliveryTarget, FlagOp, Store
from postfach.store.postgres import PostgresStore
from postfach.store.sqlite import SqliteStore
from postfach.types import AccountId, MailboxId, ModSeq, Uid

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.asyncio,
    pytest.mark.postgres_only("compares the PostgreSQL store with the embedded one; needs both"),
]

NAMES = ["INBOX", "inbox", "Archive", "Archive/2024", "Archive/2024/Q1", "a", "A", "b.c", "Ünïcode", "Sent", "x y",
         "Trash", "work", "Work/Sub"]
FLAGS = ["\\Seen", "\\Flagged", "\\Deleted", "\\Answered", "\\Draft", "$Label1", "$label1", "Junk", "NonJunk", "foo"]
NOT_COMPARED = {"uidvalidity", "created", "savedate", "id", "account_id", "mailbox_id", "blob_id"}
NOWHERE = MailboxId(999_999)


def _norm(x: Any) -> Any:
    """A comparable form: errors by class, dataclasses without ids and clock times."""
    if isinstance(x, BaseException):
        return ("error", type(x).__name__)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        d = {f.name: _norm(getattr(x, f.name)) for f in dataclasses.fields(x) if f.name not in NOT_COMPARED}
        if isinstance(d.get("internaldate"), datetime) and d["internaldate"] > datetime(2026, 1, 1, tzinfo=UTC):
            d["internaldate"] = "now"  # no date given: the store's clock
        return (type(x).__name__, tuple(sorted(d.items())))
    if isinstance(x, list | tuple):
        return tuple(_norm(i) for i in x)
    if isinstance(x, set | frozenset):
        return tuple(sorted(_norm(i) for i in x))
    return x


async def _one(s: Store, aid: AccountId, other: AccountId, op: str, a: dict[str, Any]) -> Any:
    src = (m.id if (m := await s.get_mailbox(aid, a["name"])) else NOWHERE)
    dst = (m.id if (m := await s.get_mailbox(aid, a["name2"])) else NOWHERE)
    match op:
        case "create":
            return await s.create_mailbox(aid, a["name"])
        case "delete":
            return await s.delete_mailbox(aid, src)
        case "rename":
            return await s.rename_mailbox(aid, src, a["name2"])
        case "append":
            return await s.append(aid, src, msg(a["n"]), a["flags"], a["idate"])
        case "flags":
            return await s.store_flags(aid, src, a["uids"], a["fop"], a["flags"], a["unchangedsince"])
        case "expunge":
            return await s.expunge(aid, src, a["uids"] or None)
        case "copy":
            return await s.copy_messages(aid, src, a["uids"], dst)
        case "move":
            return await s.move_messages(aid, src, a["uids"], dst)
        case "list":
            return await s.list_mailboxes(aid)
        case "status":
            return await s.mailbox_status(aid, src)
        case "changes":
            return await s.mailbox_changes(aid, src, a["since"])
        case "subscribe":
            await s.set_subscribed(aid, a["name"], a["on"])
            return await s.list_subscriptions(aid)
        case "messages":
            return await s.list_messages(aid, src)
        case "get":
            return await s.get_messages(aid, src, a["uids"])
        case "deliver":
            return await s.deliver(msg(a["n"]), [DeliveryTarget(aid, a["name"], a["flags"]), DeliveryTarget(other)])
    raise AssertionError(op)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_same_operations_same_answers(tmp_path: Path, seed: int) -> None:
    stores: list[Store] = [
        SqliteStore(tmp_path / "sqlite"),
        PostgresStore(backends.pg_dsn(), schema=backends.pg_schema_for(tmp_path / "pg")),
    ]
    accounts: list[tuple[AccountId, AccountId]] = []
    for s in stores:
        await s.open()
        await s.add_domain("example.com")
        u = await s.create_account("u@example.com", "h", quota_messages=40)  # the quota is reached
        v = await s.create_account("v@example.com", "h")
        accounts.append((u.id, v.id))
    rng = random.Random(seed)
    ops = ["create", "delete", "rename", "append", "flags", "expunge", "copy", "move", "list", "status", "changes",
           "subscribe", "messages", "get", "deliver"]
    try:
        for step in range(250):
            op = rng.choice(ops)
            args = {
                "name": rng.choice(NAMES),
                "name2": rng.choice(NAMES),
                "flags": frozenset(rng.sample(FLAGS, rng.randint(0, 3))),
                "fop": rng.choice(list(FlagOp)),
                "n": rng.randint(0, 40),
                "uids": [Uid(rng.randint(1, 30)) for _ in range(rng.randint(0, 4))],
                "since": ModSeq(rng.randint(0, 20)),
                "unchangedsince": rng.choice([None, ModSeq(rng.randint(0, 30))]),
                "on": rng.random() < 0.5,
                "idate": datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randint(0, 10**7)),
            }
            answers = []
            for s, (aid, other) in zip(stores, accounts, strict=True):
                try:
                    answers.append(_norm(await _one(s, aid, other, op, args)))
                except Exception as exc:
                    answers.append(_norm(exc))
            assert answers[1] == answers[0], f"step {step}: {op} {args}"
        for s in stores:
            assert await s.check() == []
    finally:
        for s in stores:
            await s.close()
