"""The store backend the whole suite runs on (issue 9): ``pytest --store=postgres`` or
``POSTFACH_TEST_STORE=postgres`` (default: sqlite). ``make test`` runs both passes.

Every fixture and helper that builds a store or a config asks this module: ``new_store(path)`` for a
store object, ``store_config(data_dir)`` for ``[store]`` of a Config, ``init_args(data_dir)`` for the
extra arguments of ``postfach init`` (subprocess servers then read the same ``[store]`` from
``postfach.toml``).

PostgreSQL runs at 127.0.0.1:5432 (trust auth, user postgres) on developers' machines and in CI; set
POSTFACH_TEST_PG to another server DSN. Each test process (each xdist worker) creates one uniquely
named database there on first use and drops it when it exits; each store a test opens lives in its
own schema named after the store's path, so every test starts empty and reopening the same path (a
restarted server, a CLI command on the same data dir) finds the same data. When the server is
unreachable PostgreSQL tests FAIL when $CI is set and are skipped, loudly, otherwise.

Tests that are inherently about one backend carry ``@pytest.mark.sqlite_only("reason")`` or
``@pytest.mark.postgres_only("reason")``; the pass of the other backend deselects them.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import os
import sys
import threading
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from postfach.config import StoreConfig
from postfach.store.base import Store

BACKENDS = ("sqlite", "postgres")
ENV = "POSTFACH_TEST_STORE"
RUN_ENV = "POSTFACH_TEST_RUN"  # one id per test run, shared by the xdist workers (set in pytest_configure)
DB_PREFIX = "postfach_test_"
PG_SERVER_DSN = os.environ.get("POSTFACH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")

T = TypeVar("T")


def backend() -> str:
    """The backend of this run (``--store`` sets the environment variable in pytest_configure)."""
    name = os.environ.get(ENV, "sqlite") or "sqlite"
    if name not in BACKENDS:
        raise pytest.UsageError(f"{ENV}={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def is_postgres() -> bool:
    return backend() == "postgres"


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


def dsn_for(dbname: str) -> str:
    base, _, _ = PG_SERVER_DSN.rpartition("/")
    return f"{base}/{dbname}"


def pg_unreachable() -> str | None:
    """Why the PostgreSQL server cannot be used (None: it answers)."""
    import asyncpg

    async def probe() -> None:
        conn = await asyncpg.connect(PG_SERVER_DSN, timeout=5)
        await conn.close()

    try:
        run_sync(probe())
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        return f"{exc.__class__.__name__}: {exc}"
    return None


class _TestDatabase:
    """One database per test process, made on first use, dropped at exit."""

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
        return dsn_for(self.name)

    def _create(self) -> None:
        import asyncpg

        run = os.environ.get(RUN_ENV) or uuid.uuid4().hex[:8]
        name = f"{DB_PREFIX}{run}_{os.getpid()}_{uuid.uuid4().hex[:4]}"

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


def drop_run_databases(run: str) -> list[str]:
    """Drop every database of test run ``run`` (those of workers that died before dropping theirs)."""
    import asyncpg

    async def sweep() -> list[str]:
        conn = await asyncpg.connect(PG_SERVER_DSN, timeout=5)
        try:
            names = [
                r["datname"]
                for r in await conn.fetch(
                    "SELECT datname FROM pg_database WHERE starts_with(datname, $1)", f"{DB_PREFIX}{run}_"
                )
            ]
            for name in names:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return names
        finally:
            await conn.close()

    return run_sync(sweep())


def pg_dsn() -> str:
    """The DSN of this process's test database (created on first use; fails/skips when unreachable)."""
    return TEST_DB.dsn()


def pg_schema_for(path: Path) -> str:
    return "s_" + hashlib.sha1(str(Path(path).resolve()).encode(), usedforsecurity=False).hexdigest()[:20]


# Keyword arguments only the embedded store knows (PostgreSQL commits each write itself).
_SQLITE_ONLY_KW = ("group_commit_max", "batch_sync", "inline_max", "background_max", "background_idle")


def new_store(path: Path, *, backend_name: str | None = None, **kw: Any) -> Store:
    """A store of this run's backend (not opened); ``path`` is the embedded store's folder, and
    names the schema on PostgreSQL (the same path is the same store)."""
    name = backend_name or backend()
    if name == "sqlite":
        from postfach.store.sqlite import SqliteStore

        return SqliteStore(path, **kw)
    if name == "postgres":
        from postfach.store.postgres import PostgresStore

        for k in _SQLITE_ONLY_KW:
            kw.pop(k, None)
        return PostgresStore(pg_dsn(), schema=pg_schema_for(path), **kw)
    raise AssertionError(f"unknown backend {name}")


async def open_new_store(path: Path, **kw: Any) -> Store:
    store = new_store(path, **kw)
    await store.open()
    return store


def store_config(data_dir: Path, path: str = "store") -> StoreConfig:
    """``[store]`` for a Config with this ``data_dir``: the same store as ``new_store(data_dir / path)``."""
    if is_postgres():
        return StoreConfig(backend="postgres", dsn=pg_dsn(), schema=pg_schema_for(Path(data_dir) / path))
    return StoreConfig(backend="sqlite", path=path)


def init_args(data_dir: Path) -> list[str]:
    """Extra arguments for ``postfach init --data DATA_DIR`` (the same store as ``store_config``)."""
    if is_postgres():
        return ["--store", pg_dsn(), "--schema", pg_schema_for(Path(data_dir) / "store")]
    return []


async def blob_stored(path: Path, blob_id: str) -> bool:
    """Are the bytes of ``blob_id`` still kept (a file of the embedded store, a row on PostgreSQL)?"""
    if not is_postgres():
        return (Path(path) / "blobs" / blob_id[:2] / blob_id[2:4] / blob_id).exists()
    import asyncpg

    conn = await asyncpg.connect(pg_dsn(), server_settings={"search_path": pg_schema_for(path)})
    try:
        n = await conn.fetchval(
            "SELECT (SELECT count(*) FROM blob WHERE id = $1) + (SELECT count(*) FROM blob_chunk WHERE blob_id = $1)",
            blob_id,
        )
    finally:
        await conn.close()
    return bool(n)


async def execute_sql(path: Path, sql: str) -> None:
    """Run one SQL statement on the store at ``path`` behind its back (both backends' SQL alike)."""
    if not is_postgres():
        import sqlite3

        with sqlite3.connect(Path(path) / "meta.sqlite3") as c:
            c.execute(sql)
        return
    import asyncpg

    conn = await asyncpg.connect(pg_dsn(), server_settings={"search_path": pg_schema_for(path)})
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def store_toml(data_dir: Path) -> str:
    """The ``[store]`` section of a hand-written postfach.toml for ``data_dir`` (see store_config)."""
    cfg = store_config(data_dir)
    if cfg.backend == "postgres":
        return f'[store]\nbackend = "postgres"\ndsn = "{cfg.dsn}"\nschema = "{cfg.schema}"\n'
    return f'[store]\nbackend = "sqlite"\npath = "{cfg.path}"\n'


if __name__ == "__main__":  # `python -m tests.backends`: exit 0 when the PostgreSQL server answers (make test-pg)
    why = pg_unreachable()
    if why is not None:
        print(f"PostgreSQL at {PG_SERVER_DSN} is unreachable: {why}", file=sys.stderr)
        sys.exit(1)
