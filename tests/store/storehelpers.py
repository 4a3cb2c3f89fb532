"""Shared helpers for the store contract suite (imported by the test modules of this folder).

The suite is parametrized by backend: "sqlite" (embedded) and "postgres" (issue 9). PostgreSQL runs at
127.0.0.1:5432 (trust auth, user postgres) on developers' machines and in CI; set POSTFACH_TEST_PG to
another server DSN. Each test run creates one uniquely named database there (on first use) and
drops it when the run ends; each store a test opens lives in its own schema named after the store's
path, so every test starts empty and reopening the same path finds the same data. When the server
is unreachable the postgres params FAIL when $CI is set and are skipped, loudly, otherwise.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import os
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from postfach.store.base import Store
from postfach.store.sqlite import SqliteStore
from postfach.types import AccountId, MailboxId

BACKENDS = ["sqlite", "postgres"]

PG_SERVER_DSN = os.environ.get("POSTFACH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")

T = TypeVar("T")


def backend_params() -> list[object]:
    return [pytest.param(name, id=name) for name in BACKENDS]


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end from sync code, even inside a running event loop (own thread)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(coro)
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target, name="pg-test-setup")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


def _dsn_for(dbname: str) -> str:
    base, _, _ = PG_SERVER_DSN.rpartition("/")
    return f"{base}/{dbname}"


class _TestDatabase:
    """One database per test run, made on first use, dropped at exit."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.error: str | None = None
        self._lock = threading.Lock()

    def dsn(self) -> str:
        with self._lock:
            if self.name is None and self.error is None:
                self._create()
        if self.error is not None:
            msg = f"PostgreSQL at {PG_SERVER_DSN} is unreachable: {self.error}"
            if os.environ.get("CI"):
                pytest.fail(f"{msg} (CI is set: the postgres backend must run)", pytrace=False)
            print(f"\n*** SKIPPING THE POSTGRES BACKEND: {msg} ***", file=sys.__stderr__)
            pytest.skip(f"NOT TESTED ON POSTGRES: {msg}")
        assert self.name is not None
        return _dsn_for(self.name)

    def _create(self) -> None:
        import asyncpg

        name = f"postfach_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"

        async def create() -> None:
            conn = await asyncpg.connect(PG_SERVER_DSN, timeout=5)
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        try:
            run_sync(create())
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            self.error = f"{exc.__class__.__name__}: {exc}"
            return
        self.name = name
        atexit.register(self.drop)

    def drop(self) -> None:
        import asyncpg

        name = self.name
        if name is None:
            return
        self.name = None

        async def drop() -> None:
            conn = await asyncpg.connect(PG_SERVER_DSN, timeout=5)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()

        try:
            run_sync(drop())
        except Exception as exc:  # the run is over; say so, do not fail it
            print(f"could not drop test database {name}: {exc}", file=sys.__stderr__)


TEST_DB = _TestDatabase()


def pg_dsn() -> str:
    """The DSN of this run's test database (created on first use; fails/skips when unreachable)."""
    return TEST_DB.dsn()


def pg_schema_for(path: Path) -> str:
    return "s_" + hashlib.sha1(str(Path(path).resolve()).encode(), usedforsecurity=False).hexdigest()[:20]


def new_store(backend: str, path: Path, **kw: int) -> Store:
    if backend == "sqlite":
        return SqliteStore(path, **kw)  # type: ignore[arg-type]
    if backend == "postgres":
        from postfach.store.postgres import PostgresStore

        kw.pop("group_commit_max", None)  # the database commits each write itself
        return PostgresStore(pg_dsn(), schema=pg_schema_for(path), **kw)  # type: ignore[arg-type]
    raise AssertionError(f"unknown backend {backend}")


@asynccontextmanager
async def opened(backend: str, path: Path, **kw: int) -> AsyncIterator[Store]:
    store = new_store(backend, path, **kw)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


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
