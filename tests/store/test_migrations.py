"""Versioned schema: upgrades in order, never opening data of a newer version."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from tests.store.storehelpers import account_with_inbox, msg

from postfach.config import Config, StoreConfig
from postfach.errors import StoreError
from postfach.store import open_store
from postfach.store.base import QueueRecipient
from postfach.store.postgres import PostgresStore
from postfach.store.sqlite import Migration, SqliteStore, load_migrations

pytestmark = pytest.mark.timeout(60)


def versions(path: Path) -> list[int]:
    with sqlite3.connect(path / "meta.sqlite3") as c:
        return [int(r[0]) for r in c.execute("SELECT version FROM schema_version ORDER BY version")]


@pytest.mark.sqlite_only("the embedded store's migration files (PostgreSQL's: test_postgres_nodes.py)")
def test_migration_files_are_numbered_without_gaps() -> None:
    migs = load_migrations()
    assert [m.version for m in migs] == list(range(1, len(migs) + 1))
    assert len(migs) >= 2


@pytest.mark.sqlite_only("the embedded store's migration files (PostgreSQL's: test_postgres_nodes.py)")
def test_gap_in_migration_files_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (x);")
    (tmp_path / "0003_c.sql").write_text("CREATE TABLE c (x);")
    with pytest.raises(StoreError, match="no gaps"):
        load_migrations(tmp_path)


@pytest.mark.sqlite_only("the embedded store's migration files (PostgreSQL's: test_postgres_nodes.py)")
@pytest.mark.asyncio
async def test_upgrade_v1_database_keeps_data(tmp_path: Path) -> None:
    all_migs = load_migrations()
    v1 = SqliteStore(tmp_path, migrations=all_migs[:1])
    await v1.open()
    aid, inbox = await account_with_inbox(v1)
    r = await v1.append(aid, inbox, msg(1), frozenset({"\\Seen"}))
    await v1.close()
    assert versions(tmp_path) == [1]

    cur = SqliteStore(tmp_path)
    await cur.open()
    try:
        assert versions(tmp_path) == [m.version for m in all_migs]
        assert cur.schema_version == len(all_migs)
        acct = await cur.get_account("user@example.com")
        assert acct is not None and acct.id == aid and acct.used_messages == 1
        (meta,) = await cur.list_messages(aid, inbox)
        assert meta.uid == r.uid and meta.flags == frozenset({"\\Seen"})
        assert await cur.read_message(aid, inbox, r.uid) == msg(1)
        item = await cur.queue_add("s@example.com", [QueueRecipient("r@remote.example")], msg(2))
        assert item.id >= 1  # the v2 table works
        assert await cur.check() == []
    finally:
        await cur.close()


@pytest.mark.sqlite_only("the embedded store's migration files (PostgreSQL's: test_postgres_nodes.py)")
@pytest.mark.asyncio
async def test_newer_schema_refused(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path)
    await s.open()
    await s.close()
    with sqlite3.connect(tmp_path / "meta.sqlite3") as c:
        c.execute("INSERT INTO schema_version (version, name, applied) VALUES (99, '0099_future', 0)")
    again = SqliteStore(tmp_path)
    with pytest.raises(StoreError, match="newer postfach"):
        await again.open()
    assert versions(tmp_path)[-1] == 99  # nothing touched


@pytest.mark.sqlite_only("the embedded store's migration files (PostgreSQL's: test_postgres_nodes.py)")
@pytest.mark.asyncio
async def test_failing_migration_rolls_back(tmp_path: Path) -> None:
    migs = load_migrations()
    broken = [*migs, Migration(len(migs) + 1, "9999_broken", "CREATE TABLE ok_part (x);\nSELECT * FROM nope;\n")]
    s = SqliteStore(tmp_path, migrations=broken)
    with pytest.raises(StoreError):
        await s.open()
    assert versions(tmp_path) == [m.version for m in migs]
    with sqlite3.connect(tmp_path / "meta.sqlite3") as c:
        assert c.execute("SELECT 1 FROM sqlite_master WHERE name = 'ok_part'").fetchone() is None
    ok = SqliteStore(tmp_path)
    await ok.open()
    await ok.close()


def test_open_store_from_config(tmp_path: Path) -> None:
    cfg = Config(store=StoreConfig(backend="sqlite", path="st", group_commit_max=7), data_dir=tmp_path)
    s = open_store(cfg)
    assert isinstance(s, SqliteStore) and s.path == tmp_path / "st" and s.group_commit_max == 7
    pg = open_store(Config(store=StoreConfig(backend="postgres", dsn="postgresql://x"), data_dir=tmp_path))
    assert isinstance(pg, PostgresStore) and pg.schema is None
    named = StoreConfig(backend="postgres", dsn="postgresql://x", schema="mail")
    pg = open_store(Config(store=named, data_dir=tmp_path))
    assert isinstance(pg, PostgresStore) and pg.schema == "mail"
