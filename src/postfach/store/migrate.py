"""``postfach store migrate``: copy a whole store between the embedded backend and PostgreSQL.

Everything travels as it is: account and mailbox ids, UIDVALIDITY, UIDs, uidnext, modseqs and the
expunge log (so IMAP clients resynchronise with CONDSTORE/QRESYNC instead of downloading again),
flags, internal and save dates, POP3 UIDLs (they are made of UIDVALIDITY and UID), password hashes,
quotas and usage, aliases, subscriptions, \\Recent state, IMAP METADATA entries and the outbound
queue; message bytes are copied and their sha256 verified on the way.

The source is read in one consistent snapshot (one SQLite read transaction; one PostgreSQL
REPEATABLE READ transaction), the target written in one transaction, so a failed copy leaves the
target as it was. Both ends must be idle: the copy is the final state of the source, and writes
after it would be lost — the command refuses while a server has the embedded store open or a node
is connected to the database. The target must be empty. Afterwards the target's ``check()`` runs.

Usage: ``postfach store migrate --to postgresql://user@host/db`` copies the configured embedded
store to PostgreSQL; ``postfach store migrate --to DIR`` copies the configured PostgreSQL store
into a new embedded store in DIR; ``--from`` names a source other than the configured one. Then
point ``[store]`` of the config at the target.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from postfach.errors import PostfachError, UsageError
from postfach.store.base import Problem

if TYPE_CHECKING:
    from postfach.config import Config

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CHUNK = 1 << 20

# Table -> columns, in an order that satisfies every foreign key.
TABLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("counter", ("name", "value")),
    ("domain", ("name", "created", "quota_bytes")),
    (
        "account",
        (
            "id",
            "address",
            "domain",
            "password_hash",
            "quota_bytes",
            "quota_messages",
            "used_bytes",
            "used_messages",
            "created",
            "disabled",
        ),
    ),
    ("alias", ("source", "target", "domain")),
    ("mailbox", ("id", "account_id", "name", "special_use", "uidvalidity", "uidnext", "highestmodseq", "recent_uid")),
    ("subscription", ("account_id", "name")),
    ("blob", ("id", "size", "refcount", "info", "wire")),
    (
        "message",
        ("mailbox_id", "uid", "blob_id", "size", "internaldate", "savedate", "flags", "seen", "deleted", "modseq"),
    ),
    ("expunged", ("mailbox_id", "uid", "modseq")),
    ("expunge_mark", ("mailbox_id", "modseq", "marked")),
    ("expunge_floor", ("mailbox_id", "modseq")),
    ("metadata", ("account_id", "mailbox_id", "name", "value")),
    (
        "queue",
        (
            "id",
            "sender",
            "blob_id",
            "size",
            "created",
            "next_attempt",
            "attempts",
            "last_error",
            "ret",
            "envid",
            "requiretls",
            "smtputf8",
            "delay_warned",
            "extra",
        ),
    ),
    ("queue_recipient", ("queue_id", "idx", "address", "state", "attempts", "last_error", "notify", "orcpt")),
)
_TIME_COLS = frozenset({"created", "internaldate", "savedate", "next_attempt", "marked"})
_BOOL_COLS = frozenset({"disabled", "seen", "deleted", "requiretls", "smtputf8", "delay_warned"})
_IDENTITY_TABLES = ("account", "mailbox", "queue")


class MigrateError(PostfachError):
    """The copy could not be made; one line for the operator."""


@dataclass
class MigrateReport:
    source: str
    target: str
    rows: dict[str, int] = field(default_factory=dict)
    blob_bytes: int = 0
    problems: list[Problem] = field(default_factory=list)


Row = dict[str, Any]  # a row in neutral form: aware datetimes, bools, flags as a list


def is_dsn(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def describe(location: str) -> str:
    """A location for messages, without a password."""
    if is_dsn(location):
        scheme, _, rest = location.partition("://")
        creds, at, host = rest.rpartition("@")
        if at and ":" in creds:
            return f"{scheme}://{creds.partition(':')[0]}:***@{host}"
    return location


# ------------------------------------------------------------------------------------ conversions


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(us))


def _to_us(dt: datetime) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // timedelta(microseconds=1)


def _neutral_from_sqlite(col: str, value: Any) -> Any:
    if value is None:
        return None
    if col in _TIME_COLS:
        return _from_us(value)
    if col in _BOOL_COLS:
        return bool(value)
    if col == "flags":
        return sorted(str(value).split())
    if col == "info":
        return bytes(value)
    return value


def _sqlite_from_neutral(col: str, value: Any) -> Any:
    if value is None:
        return None
    if col in _TIME_COLS:
        return _to_us(value)
    if col in _BOOL_COLS:
        return int(bool(value))
    if col == "flags":
        return " ".join(sorted(value))
    return value


def _neutral_from_pg(col: str, value: Any) -> Any:
    if col == "flags" and value is not None:
        return sorted(value)
    if col == "info" and value is not None:
        return bytes(value)
    return value


# ---------------------------------------------------------------------------------------- sources


class Source(Protocol):
    async def rows(self, table: str, cols: Sequence[str]) -> list[Row]: ...
    async def blob_data(self, blob_id: str) -> bytes: ...


class SqliteSource:
    """An embedded store folder, read in one read transaction (blobs are immutable: rows of
    ``blob_inline`` or files)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        db = folder / "meta.sqlite3"
        if not db.exists():
            raise MigrateError(f"{folder}: no embedded store here (meta.sqlite3 missing)")
        self.conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("BEGIN")  # one snapshot for the whole copy
        # Small messages live in inline.sqlite3 (store/sqlite.py), bigger ones in files.
        inline = folder / "inline.sqlite3"
        self._inline: sqlite3.Connection | None = None
        if inline.exists():
            self._inline = sqlite3.connect(f"file:{inline}?mode=ro", uri=True, isolation_level=None)

    def close(self) -> None:
        self.conn.close()
        if self._inline is not None:
            self._inline.close()

    async def rows(self, table: str, cols: Sequence[str]) -> list[Row]:
        q = f"SELECT {', '.join(cols)} FROM {table}"
        return [{c: _neutral_from_sqlite(c, r[c]) for c in cols} for r in self.conn.execute(q)]

    async def blob_data(self, blob_id: str) -> bytes:
        if self._inline is not None:
            r = self._inline.execute("SELECT data FROM blob_inline WHERE id = ?", (blob_id,)).fetchone()
            if r is not None:
                return bytes(r[0])
        p = self.folder / "blobs" / blob_id[0:2] / blob_id[2:4] / blob_id
        try:
            return p.read_bytes()
        except OSError as exc:
            raise MigrateError(f"blob {blob_id}: cannot read {p}: {exc.strerror}") from exc


class PgSource:
    """A PostgreSQL store, read in one REPEATABLE READ, read-only transaction."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def rows(self, table: str, cols: Sequence[str]) -> list[Row]:
        recs = await self.conn.fetch(f"SELECT {', '.join(cols)} FROM {table}")
        return [{c: _neutral_from_pg(c, r[c]) for c in cols} for r in recs]

    async def blob_data(self, blob_id: str) -> bytes:
        out = bytearray()
        for r in await self.conn.fetch("SELECT data FROM blob_chunk WHERE blob_id = $1 ORDER BY seq", blob_id):
            out += r["data"]
        return bytes(out)


# ---------------------------------------------------------------------------------------- targets


class Target(Protocol):
    async def insert(self, table: str, cols: Sequence[str], rows: Sequence[Row]) -> None: ...
    async def put_blob(self, blob_id: str, data: bytes) -> None: ...


class PgTarget:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def insert(self, table: str, cols: Sequence[str], rows: Sequence[Row]) -> None:
        if not rows:
            return
        marks = ", ".join(f"${i}" for i in range(1, len(cols) + 1))
        await self.conn.executemany(
            f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})", [tuple(r[c] for c in cols) for r in rows]
        )

    async def put_blob(self, blob_id: str, data: bytes) -> None:
        view = memoryview(data)
        await self.conn.executemany(
            "INSERT INTO blob_chunk (blob_id, seq, data) VALUES ($1, $2, $3)",
            [(blob_id, i, view[off : off + _CHUNK]) for i, off in enumerate(range(0, len(view), _CHUNK))],
        )

    async def finish(self) -> None:
        for table in _IDENTITY_TABLES:
            await self.conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                f" coalesce((SELECT max(id) FROM {table}), 0) + 1, false)"
            )


class SqliteTarget:
    """A new embedded store: metadata in one transaction; blob files written, fsynced and renamed
    into place before that transaction commits."""

    def __init__(self, folder: Path, conn: sqlite3.Connection) -> None:
        self.folder = folder
        self.conn = conn
        self._dirs: set[Path] = set()

    async def insert(self, table: str, cols: Sequence[str], rows: Sequence[Row]) -> None:
        if not rows:
            return
        marks = ", ".join("?" * len(cols))
        self.conn.executemany(
            f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})",
            [tuple(_sqlite_from_neutral(c, r[c]) for c in cols) for r in rows],
        )

    async def put_blob(self, blob_id: str, data: bytes) -> None:
        d = self.folder / "blobs" / blob_id[0:2] / blob_id[2:4]
        d.mkdir(parents=True, exist_ok=True)
        self._dirs.add(d)
        final = d / blob_id
        tmp = d / f".{blob_id}.migrate.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)

    def sync_dirs(self) -> None:
        for d in sorted(self._dirs | {p.parent for p in self._dirs} | {self.folder / "blobs"}):
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# ------------------------------------------------------------------------------------------- copy


async def _copy(source: Source, target: Target, report: MigrateReport, progress: Callable[[str], None]) -> None:
    blobs: list[Row] = []
    for table, cols in TABLES:
        rows = await source.rows(table, cols)
        report.rows[table] = len(rows)
        if table == "blob":
            blobs = rows
            await target.insert(table, cols, rows)
            for i, b in enumerate(sorted(rows, key=lambda r: str(r["id"])), start=1):
                data = await source.blob_data(b["id"])
                if len(data) != b["size"] or hashlib.sha256(data).hexdigest() != b["id"]:
                    raise MigrateError(f"blob {b['id']}: the source's bytes do not match their hash or size")
                await target.put_blob(b["id"], data)
                report.blob_bytes += len(data)
                if i % 500 == 0:
                    progress(f"  {i}/{len(rows)} messages' data copied")
            continue
        await target.insert(table, cols, rows)
        progress(f"  {table}: {len(rows)} rows")
    del blobs


@asynccontextmanager
async def _pg_store(dsn: str, schema: str | None = None) -> AsyncIterator[Any]:
    from postfach.store.postgres import PostgresStore

    store = PostgresStore(dsn, schema=schema or None, pool_min=0, pool_max=2)
    try:
        await store.open()  # creates or migrates the schema
    except PostfachError as exc:
        raise MigrateError(f"{describe(dsn)}: {exc}") from exc
    try:
        yield store
    finally:
        await store.close()


async def _pg_refuse_live(store: Any, where: str) -> None:
    n = await store.live_nodes()
    if n:
        raise MigrateError(f"{where}: {n} postfach node(s) are connected; stop them first")


def _sqlite_refuse_live(folder: Path) -> None:
    from postfach.store.snapshot import store_in_use

    if store_in_use(folder):
        raise MigrateError(f"{folder}: a postfach process has this store open; stop it first")


async def _sqlite_prepare(folder: Path) -> None:
    """Create (or bring to the current schema) the embedded store in ``folder``."""
    from postfach.store.sqlite import SqliteStore

    s = SqliteStore(folder)
    try:
        await s.open()
    except PostfachError as exc:
        raise MigrateError(f"{folder}: {exc}") from exc
    await s.close()


async def migrate(
    source: str,
    target: str,
    *,
    progress: Callable[[str], None] | None = None,
    while_serving: bool = False,
    schema: str | None = None,
) -> MigrateReport:
    """Copy the store at ``source`` to the empty store at ``target`` (each a PostgreSQL DSN or an
    embedded store folder). Raises MigrateError. ``schema``: the PostgreSQL side's tables are in
    that schema (``[store] schema``), not in the database's default one.

    ``while_serving`` (PostgreSQL source only) copies while nodes keep serving: the copy is the
    consistent state of one REPEATABLE READ snapshot, and later writes are not in it — a backup of
    the database as an embedded store folder, which ``postfach backup`` and ``check`` understand."""
    say = progress or (lambda _m: None)
    report = MigrateReport(describe(source), describe(target))
    if is_dsn(source) == is_dsn(target) and source == target:
        raise MigrateError("source and target are the same store")
    if not is_dsn(source) and not is_dsn(target):
        raise MigrateError("one side must be PostgreSQL (postgresql://...); use `postfach backup` between folders")
    if not is_dsn(source):
        if while_serving:
            raise MigrateError("--while-serving needs a PostgreSQL source; stop the server to copy an embedded store")
        folder = Path(source)
        if not (folder / "meta.sqlite3").exists():
            raise MigrateError(f"{folder}: no embedded store here (meta.sqlite3 missing)")
        _sqlite_refuse_live(folder)
        await _sqlite_prepare(folder)  # an older embedded store is brought up to date first
        src = SqliteSource(folder)
        try:
            async with _pg_store(target, schema) as store:
                await _pg_refuse_live(store, describe(target))
                conn = await store._connect()
                try:
                    async with conn.transaction():
                        for table in ("domain", "account", "queue", "blob"):
                            if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):
                                raise MigrateError(f"{describe(target)}: the target is not empty ({table})")
                        dst = PgTarget(conn)
                        await _copy(src, dst, report, say)
                        await dst.finish()
                finally:
                    await conn.close()
                report.problems = await store.check()
        finally:
            src.close()
        return report
    folder = Path(target)
    if folder.exists():
        _sqlite_refuse_live(folder)
        db = folder / "meta.sqlite3"
        if db.exists():
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
                for table in ("domain", "account", "queue", "blob"):
                    if c.execute(f"SELECT EXISTS (SELECT 1 FROM {table})").fetchone()[0]:
                        raise MigrateError(f"{folder}: the target is not empty ({table})")
    await _sqlite_prepare(folder)
    async with _pg_store(source, schema) as store:
        if not while_serving:
            await _pg_refuse_live(store, describe(source))
        conn = await store._connect()
        wconn = sqlite3.connect(folder / "meta.sqlite3", isolation_level=None)
        try:
            wconn.execute("PRAGMA synchronous = FULL")
            wconn.execute("PRAGMA foreign_keys = ON")
            wconn.execute("BEGIN IMMEDIATE")
            sdst = SqliteTarget(folder, wconn)
            try:
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    # The tables the schema filled at creation (counters) are replaced by the source's.
                    wconn.execute("DELETE FROM counter")
                    await _copy(PgSource(conn), sdst, report, say)
                sdst.sync_dirs()
                wconn.execute("COMMIT")
            except BaseException:
                if wconn.in_transaction:
                    wconn.execute("ROLLBACK")
                raise
        finally:
            wconn.close()
            await conn.close()
    from postfach.store.sqlite import SqliteStore

    s = SqliteStore(folder)
    await s.open()
    try:
        report.problems = await s.check()
    finally:
        await s.close()
    return report


# -------------------------------------------------------------------------------------------- cli


def _configured_location(config: Config) -> str:
    if config.store.backend == "postgres":
        return config.store.dsn
    return str(config.path(config.store.path))


def cmd_migrate(args: argparse.Namespace, config: Config) -> int:
    source = args.source or _configured_location(config)
    target = str(args.to)
    schema = args.schema
    if schema is None and not args.source and config.store.backend == "postgres":
        schema = config.store.schema or None  # the configured store, where it keeps its tables
    if schema is not None and not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
        raise UsageError(f"--schema: {schema!r} is not a plain PostgreSQL name (a-z, 0-9, _; at most 63)")
    if not target:
        raise UsageError("--to needs a postgresql://... DSN or a folder")
    if not is_dsn(target):
        target = str(Path(target).expanduser().resolve())
    if not is_dsn(source):
        source = str(Path(source).expanduser().resolve())
    print(f"copying {describe(source)} -> {describe(target)}")
    try:
        report = asyncio.run(
            migrate(source, target, progress=print, while_serving=args.while_serving, schema=schema)
        )
    except MigrateError as exc:
        raise UsageError(str(exc)) from exc
    total = ", ".join(f"{n} {t}" for t, n in report.rows.items() if t in ("account", "mailbox", "message", "queue"))
    print(f"copied {total}; {report.blob_bytes} bytes of message data")
    if report.problems:
        for p in report.problems:
            print(f"check: {p.kind}: {p.detail}")
        return 1
    print("check of the target: OK")
    if is_dsn(target):
        where = f' and schema = "{schema}"' if schema else ""
        print(f'now set [store] backend = "postgres", dsn = "{describe(target)}"{where} in the config')
    else:
        print(f'now set [store] backend = "sqlite" and path = "{target}" in the config')
    return 0


def add_parsers(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser | None = None) -> None:
    parents = [common] if common is not None else []
    p = sub.add_parser("store", parents=parents, help="store administration: migrate between backends")
    ssub = p.add_subparsers(dest="store_action", required=True, metavar="ACTION", parser_class=type(p))
    s = ssub.add_parser(
        "migrate",
        parents=parents,
        help="copy the whole store to PostgreSQL (--to postgresql://...) or back to a folder (--to DIR)",
    )
    s.add_argument("--to", required=True, metavar="DSN|DIR", help="the empty target store")
    s.add_argument("--from", dest="source", metavar="DSN|DIR", help="the source store (default: the configured one)")
    s.add_argument(
        "--schema",
        metavar="NAME",
        help="the PostgreSQL side's schema (default: [store] schema when the source is the configured store)",
    )
    s.add_argument(
        "--while-serving",
        action="store_true",
        help="PostgreSQL source only: copy one consistent snapshot while the nodes keep serving (a backup)",
    )
    s.set_defaults(func=cmd_migrate)


__all__ = ["MigrateError", "MigrateReport", "add_parsers", "cmd_migrate", "describe", "is_dsn", "migrate"]
