"""Shared helpers for the store suite (imported by the test modules of this folder).

The backend is the run's (tests/backends.py: ``pytest --store=postgres``, default sqlite); the
PostgreSQL database and schema machinery lives there and is re-exported here.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from tests import backends
from tests.backends import PG_SERVER_DSN, pg_dsn, pg_schema_for, run_sync

from postfach.store.base import Store
from postfach.types import AccountId, MailboxId

__all__ = ["PG_SERVER_DSN", "pg_dsn", "pg_schema_for", "run_sync"]


def backend_params() -> list[object]:
    """The run's backend as the one parameter (each pass of ``make test`` covers one backend)."""
    name = backends.backend()
    return [pytest.param(name, id=name)]


def new_store(backend: str, path: Path, **kw: Any) -> Store:
    return backends.new_store(path, backend_name=backend, **kw)


@asynccontextmanager
async def opened(backend: str, path: Path, **kw: float) -> AsyncIterator[Store]:
    store = new_store(backend, path, **kw)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@contextmanager
def fresh_pg_database(prefix: str) -> Iterator[str]:
    """A PostgreSQL database of its own (for what works on a whole database: several nodes, store
    migrate); yields its DSN, dropped afterwards. Fails (CI) or skips loudly without PostgreSQL."""
    import asyncpg

    pg_dsn()
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(PG_SERVER_DSN, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    run_sync(run(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_SERVER_DSN.rpartition("/")[0] + "/" + name
    finally:
        run_sync(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def index_settled(store: Store) -> None:
    """The embedded store adds the full-text rows of new mail a moment after the commit (its
    writer's background flush); PostgreSQL in the write itself. Returns when they are in."""
    flush = getattr(store, "flush_index", None)
    if flush is not None:
        await flush()


def msg(n: int, size: int = 0, tag: str = "") -> bytes:
    """A small distinct RFC 5322 message (padded to about ``size`` bytes)."""
    head = (
        f"From: Sender <sender@example.org>\r\nTo: user@example.com\r\nSubject: test {tag}{n}\r\n"
        f"Message-ID: <{tag}{n}.{os.getpid()}@example.org>\r\nDate: Fri, 27 Nov 2026 09:00:00 +0000\r\n\r\n"
    ).encode()
    body = f"Body of message {tag}{n}.\r\n".encode()
    if size > len(head) + len(body):
        line = b"x" * 76 + b"\r\n"
        need = size - len(head) - len(body)
        body += (line * (need // len(line) + 1))[:need]
    return head + body


async def account_with_inbox(
    store: Store, address: str = "user@example.com", **quota: int | None
) -> tuple[AccountId, MailboxId]:
    domain = address.rpartition("@")[2]
    if await store.get_domain(domain) is None:
        await store.add_domain(domain)
    acct = await store.create_account(address, "$argon2id$fake", **quota)
    inbox = await store.get_mailbox(acct.id, "INBOX")
    assert inbox is not None
    return acct.id, inbox.id
