"""Fixtures for the backup tests: a data dir made by the real ``postfach init`` with a real store
(of the run's backend, tests/backends.py; the backup tests themselves are SQLite-only) holding two
accounts with mail in several folders and flags."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tests import backends

from postfach import config as cfgmod
from postfach.cli import main
from postfach.config import Config
from postfach.store.base import Store
from postfach.types import AccountId, MailboxId

USER = "user@example.org"
OTHER = "other@example.org"
HASH_USER = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$user-hash-for-tests"
HASH_OTHER = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$other-hash-for-tests"


def message(n: int, size: int = 0, tag: str = "m") -> bytes:
    head = (
        f"From: Sender <sender@example.net>\r\nTo: {USER}\r\nSubject: {tag} {n}\r\n"
        f"Message-ID: <{tag}{n}.{os.getpid()}@example.net>\r\nDate: Fri, 27 Nov 2026 09:00:00 +0000\r\n\r\n"
    ).encode()
    body = f"Body of {tag} {n}.\r\nFrom here on a line that needs quoting in mbox.\r\n".encode()
    if size > len(head) + len(body):
        line = b"y" * 70 + b"\r\n"
        need = size - len(head) - len(body)
        body += (line * (need // len(line) + 1))[:need]
    return head + body


@dataclass
class Env:
    data: Path
    config: Config

    @property
    def store_dir(self) -> Path:
        return self.config.path(self.config.store.path)

    @property
    def backups(self) -> Path:
        return self.config.path(self.config.backup.directory)

    def run(self, *argv: str) -> int:
        return main(["--data", str(self.data), *argv])

    def store(self) -> Store:
        return backends.new_store(self.store_dir)

    def db_rows(self, sql: str, params: tuple[Any, ...] = (), db: Path | None = None) -> list[tuple[Any, ...]]:
        path = db or self.store_dir / "meta.sqlite3"
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return [tuple(r) for r in conn.execute(sql, params)]
        finally:
            conn.close()


async def populate(store: Store, *, metadata: bool = True) -> None:
    await store.add_domain("example.org")
    user = await store.create_account(USER, HASH_USER)
    other = await store.create_account(OTHER, HASH_OTHER)
    aid = AccountId(user.id)
    inbox = await store.get_mailbox(aid, "INBOX")
    sent = await store.get_mailbox(aid, "Sent")
    assert inbox is not None and sent is not None
    child = await store.create_mailbox(aid, "Archive/2025")
    base = datetime(2026, 11, 1, 8, 30, tzinfo=UTC)
    for i in range(12):
        flags = frozenset({"\\Seen"} if i % 2 else set()) | (frozenset({"$Label1"}) if i % 3 == 0 else frozenset())
        await store.append(aid, MailboxId(inbox.id), message(i), flags, base + timedelta(hours=i))
    for i in range(4):
        await store.append(aid, MailboxId(sent.id), message(i, tag="sent"), frozenset({"\\Seen", "\\Answered"}),
                           base - timedelta(days=i))
    await store.append(aid, MailboxId(child.id), message(1, size=3000, tag="old"), frozenset({"\\Flagged"}), base)
    if metadata:  # METADATA entries (RFC 5464, schema version 5) travel too
        lim = {"max_mailbox_entries": 10, "max_account_entries": 20}
        await store.set_metadata(aid, MailboxId(child.id), {"/private/comment": b"old", "/shared/x": b"\x00"}, **lim)
        await store.set_metadata(aid, None, {"/shared/comment": b"server"}, **lim)
    oinbox = await store.get_mailbox(AccountId(other.id), "INBOX")
    assert oinbox is not None
    for i in range(5):
        await store.append(AccountId(other.id), MailboxId(oinbox.id), message(i, tag="other"), frozenset(), base)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    data = tmp_path / "data"
    assert main(["--data", str(data), "init", "--dev", *backends.init_args(data)]) == 0
    config = cfgmod.load(data)
    e = Env(data, config)

    async def setup() -> None:
        s = e.store()
        await s.open()
        try:
            await populate(s)
        finally:
            await s.close()

    asyncio.run(setup())
    yield e
