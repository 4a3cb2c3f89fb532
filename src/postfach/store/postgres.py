"""The scale-out store: every Store method on PostgreSQL (asyncpg), shared by several postfach nodes.

The data model is the embedded store's (``store/migrations/``), in ``pg_migrations/``, with:

* **message bytes in the database**, content-addressed like the embedded blobs (``blob`` row per
  sha256, refcounted) and cut into 1 MiB ``blob_chunk`` rows, stored uncompressed (``STORAGE
  EXTERNAL``): a 25 MB message is 25 rows, ``BlobReader.read(offset, length)`` asks the server for
  just the slices of the chunks it needs, and nobody ever reads one 25 MB row.
* **one transaction per write**, committed with ``synchronous_commit = on`` before the call returns
  (ARCHITECTURE.md invariant 1). Every mail write locks its account row first (ascending ids when
  there are several), then mailbox rows by id, then blob rows by id: writes to one account from any
  number of nodes serialise there, and the fixed lock order keeps them free of deadlocks (a
  deadlock or serialisation failure that still happens is retried).
* **UIDs and modseqs** come from ``UPDATE mailbox ... RETURNING`` inside that transaction (a row
  lock), **quota usage** from ``UPDATE account SET used_bytes = used_bytes + n ... RETURNING``, checked
  before the commit: exact under any number of nodes.
* **change notifications** (``subscribe``): local subscribers are fed right after the commit, as
  in the embedded store; other nodes hear of it by ``NOTIFY`` (sent inside the transaction, so only a
  commit publishes) on a dedicated control connection that ``LISTEN``s.
* **the control connection** also holds this node's liveness lock (a session-level advisory lock
  on its random node id) and the POP3 maildrop locks (session-level advisory locks): all of them die
  with the node's session. It reconnects by itself; subscribers get a wake-up afterwards, since
  notifications sent while it was away are lost (the change log in the tables is the truth).
* **the outbound queue** is claimed with ``FOR UPDATE SKIP LOCKED``: ``queue_due`` marks the rows
  it takes with the node id and a lease; another node skips them while the lease runs and the
  claiming node is alive (its liveness lock is held), so two nodes never send the same message.

Errors: a lost connection, a server restarting or refusing connections → ``StoreUnavailable``
(temporary; the pool replaces broken connections by itself); a full disk → ``StorageFull``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import random
import time
import zlib
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from postfach.errors import (
    AlreadyExists,
    MailboxInUse,
    NotFound,
    NotPermitted,
    PostfachError,
    QuotaExceeded,
    StorageFull,
    StoreError,
    StoreUnavailable,
    TooManyEntries,
)
from postfach.mail.search import IndexText, SortRow, indexable
from postfach.store.base import (
    ALL_ACCOUNTS,
    DEFAULT_MAILBOXES,
    HIERARCHY_DELIMITER,
    WIRE_CRLF_ONLY,
    WIRE_NO_DOT_LINES,
    Account,
    Alias,
    AppendResult,
    Change,
    ChangeKind,
    CopyResult,
    DeliveryTarget,
    Domain,
    FlagOp,
    Mailbox,
    MailboxChanges,
    MailboxStatus,
    MessageMeta,
    Problem,
    QueueItem,
    QueueRecipient,
    RecipientState,
    SearchHits,
    StoreFlagsResult,
)
from postfach.store.common import SORT_COLUMNS, in_mailbox_chunks, normalize_flags
from postfach.store.common import Subscription as _Subscription
from postfach.store.common import apply_flag_op as _apply_flag_op
from postfach.store.common import norm_address as _norm_address
from postfach.store.common import norm_mailbox_name as _norm_mailbox_name
from postfach.store.common import parse_for_ingest as _parse_for_ingest
from postfach.store.common import parse_info as _parse_info
from postfach.types import AccountId, BlobId, MailboxId, ModSeq, QueueId, Uid, UidValidity

log = logging.getLogger("postfach.store")

T = TypeVar("T")

CHUNK_BYTES = 1 << 20  # one blob_chunk row
PARSE_WITHOUT_ASKING_BYTES = 256 << 10  # smaller messages are parsed at once, bigger ones if new
MAX_UID = 0xFFFFFFFF  # RFC 9051 §2.3.1.1: nz-number, 32 bits
QUEUE_CLAIM_SECONDS = 3600  # a claimed queue item returns to the pool after this, or when its node dies
NOTIFY_MAX_BYTES = 7900  # PostgreSQL's payload limit is 8000 bytes
TX_RETRIES = 8
CONTROL_PING_SECONDS = 10.0
MIGRATIONS_DIR = Path(__file__).parent / "pg_migrations"


# Errors that mean "the database is not reachable right now" (temporary for the client).
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # class 08, incl. ConnectionDoesNotExistError
    asyncpg.exceptions.OperatorInterventionError,  # 57: admin/crash shutdown, cannot connect now
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.InterfaceError,  # "connection is closed", pool closing
    asyncpg.exceptions.InternalClientError,  # protocol state broken by a connection killed mid-statement
    ConnectionError,
    OSError,
    TimeoutError,
)
_RELEASE_ERRORS: tuple[type[BaseException], ...] = (StoreError, *_UNAVAILABLE)


# ----------------------------------------------------------------------------------------- helpers


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def _norm_domain(name: str) -> str:
    return name.strip().lower().rstrip(".")


def _int4(x: int) -> int:
    """Any integer folded into PostgreSQL's int4 (advisory lock keys)."""
    return ((x + 2**31) % 2**32) - 2**31


def _key(namespace: str) -> int:
    """A positive int4 advisory-lock namespace (the first key of the two-key form)."""
    return zlib.crc32(namespace.encode()) & 0x7FFFFFFF


def _storable(text: str) -> bool:
    """Can PostgreSQL hold this text? (Its text type has no NUL character; SQLite's has.) Lookups
    by a key that cannot be stored find nothing, as on the embedded store, instead of failing."""
    return "\x00" not in text


def _translate(exc: BaseException) -> BaseException:
    """Never let a raw asyncpg/OS error reach a caller."""
    if isinstance(exc, PostfachError):
        return exc
    if isinstance(exc, asyncpg.exceptions.CharacterNotInRepertoireError):  # 22021: a NUL in text
        return NotPermitted("names, addresses and flags cannot contain a NUL character")
    if isinstance(exc, asyncpg.exceptions.DiskFullError):
        return StorageFull(f"database: {exc}")
    if isinstance(exc, _UNAVAILABLE):
        return StoreUnavailable(f"database unavailable: {exc.__class__.__name__}: {exc}")
    if isinstance(exc, asyncpg.exceptions.InsufficientResourcesError):
        return StoreUnavailable(f"database out of resources: {exc}")
    if isinstance(exc, asyncpg.PostgresError):
        return StoreError(f"database error: {exc}")
    return exc


def _raised(exc: BaseException) -> BaseException:
    """Our errors raised by SQL functions ('postfach:<kind>:<detail>') as PostfachErrors."""
    text = str(exc)
    if not text.startswith("postfach:"):
        return _translate(exc)
    _, kind, detail = [*text.split(":", 2), "", ""][:3]
    if kind == "quota":
        if detail == "MESSAGE":
            return QuotaExceeded("mailbox message-count quota exceeded", resource="MESSAGE")
        return QuotaExceeded("mailbox storage quota exceeded", resource="STORAGE")
    if kind == "not-found":
        return NotFound(detail)
    if kind == "not-permitted":
        return NotPermitted(detail)
    return StoreError(detail or text)


def wire_bits(data: bytes) -> int:
    """The WIRE_* bits (store/base.py): does every LF follow a CR, does no line start with "."?"""
    bits = 0
    if data.count(b"\n") == data.count(b"\r\n"):
        bits |= WIRE_CRLF_ONLY
    if not data.startswith(b".") and b"\n." not in data:
        bits |= WIRE_NO_DOT_LINES
    return bits


def _change_payload(node: int, ch: Change) -> str:
    doc: dict[str, Any] = {"n": node, "a": int(ch.account_id), "k": ch.kind.value}
    if ch.mailbox_id is not None:
        doc["m"] = int(ch.mailbox_id)
    if ch.modseq is not None:
        doc["s"] = int(ch.modseq)
    if ch.name is not None:
        doc["nm"] = ch.name
    if ch.uids:
        doc["u"] = _ranges(ch.uids)
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode()) > NOTIFY_MAX_BYTES:
        doc.pop("u", None)  # the uids are a hint; the subscriber re-reads with mailbox_changes
        text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode()) > NOTIFY_MAX_BYTES:
        doc.pop("nm", None)
        text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    return text


def _ranges(uids: Iterable[int]) -> list[list[int]]:
    """Ascending UIDs as [first, last] runs: an append of 10,000 messages is one pair."""
    out: list[list[int]] = []
    for u in sorted({int(x) for x in uids}):
        if out and out[-1][1] == u - 1:
            out[-1][1] = u
        else:
            out.append([u, u])
    return out


def _change_from_payload(payload: str) -> tuple[int, Change] | None:
    try:
        doc = json.loads(payload)
        ch = Change(
            account_id=AccountId(int(doc["a"])),
            kind=ChangeKind(doc["k"]),
            mailbox_id=MailboxId(int(doc["m"])) if "m" in doc else None,
            modseq=ModSeq(int(doc["s"])) if "s" in doc else None,
            uids=tuple(Uid(u) for lo, hi in doc.get("u", ()) for u in range(int(lo), int(hi) + 1)),
            name=str(doc["nm"]) if "nm" in doc else None,
        )
        return int(doc["n"]), ch
    except (ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------ internal records

Conn = Any  # asyncpg.Connection (asyncpg ships no type information)
Row = Any  # asyncpg.Record


@dataclass(slots=True)
class _Tx:
    """What one write transaction publishes after its commit."""

    changes: list[Change] = field(default_factory=list)
    notified: list[Change] = field(default_factory=list)  # NOTIFY sent by SQL already; local only
    in_line: list[int] = field(default_factory=list)  # accounts whose local feed waits for this one
    state: int = 0  # 0 running, 1 committed, 2 failed (see PostgresStore._tx_done)


@dataclass(frozen=True, slots=True)
class _Blob:
    id: str
    size: int
    info: bytes | None
    data: bytes | None  # None: the blob exists already (copy/move); never uploaded
    wire: int | None = None  # WIRE_* bits, learned at ingest
    index: tuple[SortRow, IndexText] | None = None  # sort keys and index text (schema 4)


#: Search field -> blob_index columns (as INDEX_FIELDS of the embedded store).
_PG_INDEX_COLUMNS: dict[str, tuple[str, ...]] = {
    "subject": ("t_subject",), "from": ("t_from",), "to": ("t_to",), "cc": ("t_cc",), "bcc": ("t_bcc",),
    "body": ("t_body",), "text": ("t_header", "t_body"),
}


_INDEX_INSERT = (
    "INSERT INTO blob_index (blob_id, date, from_addr, to_addr, cc_addr, subject, display_from, display_to,"
    " message_id, refs, reply, t_subject, t_from, t_to, t_cc, t_bcc, t_header, t_body, t_names)"
    " SELECT * FROM unnest($1::text[], $2::float8[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],"
    " $8::text[], $9::text[], $10::text[], $11::bool[], $12::text[], $13::text[], $14::text[], $15::text[],"
    " $16::text[], $17::text[], $18::text[], $19::text[])"
    " ON CONFLICT (blob_id) DO NOTHING"
)


def _pg_text(s: str) -> str:
    return s.replace("\x00", "\n")  # PostgreSQL text cannot hold NUL (IndexText has none already)


async def _insert_index(conn: Conn, blobs: Sequence[_Blob]) -> None:
    """Sort keys and search text of new blobs, in the transaction that stores them (one round
    trip); a blob indexed already is left alone. The trigger marks the blob row indexed."""
    rows: dict[str, tuple[SortRow, IndexText]] = {}
    for b in blobs:
        if b.index is not None:
            rows.setdefault(b.id, b.index)
    if not rows:
        return
    cols: list[list[Any]] = [list(rows)]
    keys = [k for k, _ in rows.values()]
    texts = [t for _, t in rows.values()]
    cols.append([k.date for k in keys])
    for i in range(1, 9):
        cols.append([_pg_text(str(k[i])) for k in keys])
    cols.append([bool(k.reply) for k in keys])
    for i in range(8):
        cols.append([_pg_text(t[i]) for t in texts])
    await conn.execute(_INDEX_INSERT, *cols)


class _MaildropLock:
    """RFC 1939 §8: a session-level advisory lock on the node's control connection, so it dies
    with the node; within the node an in-process set keeps two sessions apart (advisory locks
    are re-entrant within one database session)."""

    def __init__(self, store: PostgresStore, account_id: AccountId) -> None:
        self._store = store
        self._account_id = account_id
        self._held = False

    @property
    def lost(self) -> bool:
        return self._held and self._account_id in self._store._maildrop_lost

    async def __aenter__(self) -> None:
        store = self._store
        if self._account_id in store._maildrop_locks:
            raise MailboxInUse("the maildrop is locked by another session")
        store._maildrop_locks.add(self._account_id)
        try:
            ok = await store._control_fetchval(
                "SELECT pg_try_advisory_lock($1::int4, $2::int4)", store._ns_maildrop, _int4(self._account_id)
            )
        except BaseException:
            store._maildrop_locks.discard(self._account_id)
            raise
        if not ok:
            store._maildrop_locks.discard(self._account_id)
            raise MailboxInUse("the maildrop is locked by another session")
        self._held = True

    async def __aexit__(self, *exc: object) -> None:
        if not self._held:
            return
        self._held = False
        store = self._store
        try:
            await store._control_fetchval(
                "SELECT pg_advisory_unlock($1::int4, $2::int4)", store._ns_maildrop, _int4(self._account_id)
            )
        except _RELEASE_ERRORS:
            pass  # the control connection went away: the lock went with it
        finally:
            store._maildrop_locks.discard(self._account_id)
            store._maildrop_lost.discard(self._account_id)


class _ChunkBlobReader:
    def __init__(self, store: PostgresStore, blob_id: str, size: int, wire: int | None = None) -> None:
        self._store = store
        self._blob_id = blob_id
        self._size = size
        self.wire = wire  # WIRE_* bits (base.py), None when not known

    @property
    def size(self) -> int:
        return self._size

    async def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self._size)
        if end <= offset:
            return b""
        first, last = offset // CHUNK_BYTES, (end - 1) // CHUNK_BYTES
        # Only the needed slice of each needed chunk crosses the wire (substring on an
        # uncompressed EXTERNAL value reads just those bytes).
        rows = await self._store._fetch(
            "SELECT seq, substring(data FROM (greatest($2::bigint - seq::bigint * $5, 0) + 1)::int"
            " FOR (least($3::bigint, (seq::bigint + 1) * $5) - greatest($2::bigint, seq::bigint * $5))::int)"
            " AS part FROM blob_chunk WHERE blob_id = $1 AND seq BETWEEN $4 AND $6 ORDER BY seq",
            self._blob_id,
            offset,
            end,
            first,
            CHUNK_BYTES,
            last,
        )
        if len(rows) != last - first + 1:
            raise NotFound("the message data is gone")
        return b"".join(bytes(r["part"]) for r in rows)

    async def close(self) -> None:
        return None


_MAILBOX_COLS = (
    "m.id, m.account_id, m.name, m.special_use, m.uidvalidity, m.uidnext, m.highestmodseq, "
    "EXISTS(SELECT 1 FROM subscription s WHERE s.account_id = m.account_id AND s.name = m.name)"
    " AS subscribed"
)
_MESSAGE_COLS = "uid, modseq, flags, size, internaldate, blob_id, savedate"


def _mailbox(row: Row) -> Mailbox:
    return Mailbox(
        id=MailboxId(row["id"]),
        account_id=AccountId(row["account_id"]),
        name=row["name"],
        special_use=row["special_use"],
        uidvalidity=UidValidity(row["uidvalidity"]),
        uidnext=Uid(row["uidnext"]),
        highestmodseq=ModSeq(row["highestmodseq"]),
        subscribed=bool(row["subscribed"]),
    )


def _meta(row: Row) -> MessageMeta:
    return MessageMeta(
        uid=Uid(row["uid"]),
        modseq=ModSeq(row["modseq"]),
        flags=frozenset(row["flags"]),
        size=row["size"],
        internaldate=row["internaldate"],
        blob_id=BlobId(row["blob_id"]),
        savedate=row["savedate"],
    )


def _account(row: Row) -> Account:
    return Account(
        id=AccountId(row["id"]),
        address=row["address"],
        password_hash=row["password_hash"],
        quota_bytes=row["quota_bytes"],
        quota_messages=row["quota_messages"],
        used_bytes=row["used_bytes"],
        used_messages=row["used_messages"],
        created=row["created"],
        disabled=bool(row["disabled"]),
    )


def _domain(row: Row) -> Domain:
    return Domain(row["name"], row["created"], row["quota_bytes"])


# ------------------------------------------------------------------------------------- migrations


@dataclass(frozen=True, slots=True)
class PgMigration:
    version: int
    name: str
    sql: str


def load_migrations(folder: Path | None = None) -> list[PgMigration]:
    """The numbered ``NNNN_name.sql`` files, in order; versions must run 1, 2, 3 ... without gaps."""
    folder = folder or MIGRATIONS_DIR
    found: list[PgMigration] = []
    for p in sorted(folder.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        found.append(PgMigration(int(p.name[:4]), p.stem, p.read_text("utf-8")))
    for i, mig in enumerate(found, start=1):
        if mig.version != i:
            raise StoreError(f"migration {mig.name}: expected version {i} (no gaps allowed)")
    return found


# ------------------------------------------------------------------------------------------ store


class PostgresStore:
    """The PostgreSQL implementation of :class:`postfach.store.base.Store`.

    ``schema`` puts every table into that schema (created when missing); tests use it for a clean
    store per test inside one database. Several instances (nodes) may share one database.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        pool_min: int = 1,
        pool_max: int = 10,
        command_timeout: float = 60.0,
        connect_timeout: float = 10.0,
        migrations: Sequence[PgMigration] | None = None,
        backfill_batch: int = 100,
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self._pool_min = max(0, pool_min)
        self._pool_max = max(1, pool_max, self._pool_min)
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._migrations = list(migrations) if migrations is not None else None
        self.node_id = random.randint(1, 2**31 - 1)  # an id, not a secret
        tag = schema or ""
        self._channel = "postfach_changes" + (f"_{tag}" if tag else "")
        self._ns_maildrop = _key(f"postfach:maildrop:{tag}")
        self._ns_node = _key(f"postfach:node:{tag}")
        self._ns_job = _key(f"postfach:job:{tag}")
        self._ns_migrate = _key(f"postfach:migrate:{tag}")
        self._pool: Any = None
        self._control: Conn | None = None
        self._control_lock = asyncio.Lock()
        self._control_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._backfill_task: asyncio.Task[None] | None = None
        #: Blobs per backfill transaction (0: no backfill, for tests of the not-yet-indexed state).
        self.backfill_batch = backfill_batch
        self.backfilled = 0
        self._subs: dict[AccountId, set[_Subscription]] = {}
        self._maildrop_locks: set[AccountId] = set()
        # Held maildrop locks whose control connection was lost meanwhile (see _control_start).
        self._maildrop_lost: set[AccountId] = set()
        self._feed_lines: dict[int, deque[_Tx]] = {}  # per account: its writes in lock (= commit) order
        self._open = False
        self._closing = False
        self.schema_version = 0

    # ------------------------------------------------------------------------------- lifecycle
    def _server_settings(self) -> dict[str, str]:
        s = {"synchronous_commit": "on", "application_name": "postfach"}
        if self.schema:
            s["search_path"] = self.schema
        return s

    async def _connect(self) -> Conn:
        return await asyncpg.connect(
            self.dsn,
            server_settings=self._server_settings(),
            timeout=self._connect_timeout,
            command_timeout=self._command_timeout,
        )

    async def open(self) -> None:
        if self._open:
            return
        self._closing = False
        try:
            await self._migrate()
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self._pool_min,
                max_size=self._pool_max,
                server_settings=self._server_settings(),
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                max_inactive_connection_lifetime=300.0,
            )
            await self._control_start()
        except BaseException as exc:
            await self._teardown()
            t = _translate(exc)
            if t is exc:
                raise
            raise t from exc
        self._open = True
        if self.schema_version >= 4 and self.backfill_batch > 0:
            self._backfill_task = asyncio.create_task(self._backfill_main(), name="postfach-pg-backfill")

    async def _backfill_main(self) -> None:
        """Index the blobs stored before schema version 4 (fts NULL) in the background, one
        bounded transaction per batch; until then searches scan them. Several nodes may do it at
        once: the inserts skip what another node indexed meanwhile."""
        last = ""
        total = 0
        try:
            while self._open:
                rows = await self._fetch(
                    "SELECT id FROM blob WHERE fts IS NOT TRUE AND fts IS NULL AND id > $1 ORDER BY id LIMIT $2",
                    last, self.backfill_batch)
                if not rows:
                    break
                ids = [str(r["id"]) for r in rows]
                last = ids[-1]
                blobs: list[_Blob] = []
                failed: list[str] = []
                for blob_id in ids:
                    try:
                        data = await self.read_blob(BlobId(blob_id))
                    except NotFound:
                        continue  # removed meanwhile
                    _info, index = await asyncio.to_thread(_parse_for_ingest, data)
                    if index is None:
                        failed.append(blob_id)
                    else:
                        blobs.append(_Blob(blob_id, len(data), None, None, None, index))

                async def fn(conn: Conn, tx: _Tx, blobs: list[_Blob] = blobs, failed: list[str] = failed) -> None:
                    live = {r["id"] for r in await conn.fetch(
                        "SELECT id FROM blob WHERE id = ANY($1::text[]) FOR NO KEY UPDATE", [b.id for b in blobs])}
                    await _insert_index(conn, [b for b in blobs if b.id in live])
                    await conn.execute("UPDATE blob SET fts = false WHERE id = ANY($1::text[]) AND fts IS NULL", failed)

                await self._write(fn)
                total += len(ids)
                self.backfilled = total
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("store: full-text backfill stopped; it resumes at the next open")
        if total:
            log.info("store: full-text index built for %d blobs stored before it", total)

    async def _migrate(self) -> None:
        migrations = self._migrations if self._migrations is not None else load_migrations()
        conn = await self._connect()
        try:
            async with conn.transaction():
                # One node migrates; the others wait here and then find nothing to do.
                await conn.execute("SELECT pg_advisory_xact_lock($1::int4, 0)", self._ns_migrate)
                if self.schema:
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, name text NOT NULL,"
                    " applied timestamptz NOT NULL DEFAULT now())"
                )
                current = int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))
                if current > len(migrations):
                    raise StoreError(
                        f"the database was written by a newer postfach (schema version {current}, this program"
                        f" knows up to {len(migrations)}); refusing to open it - upgrade postfach"
                    )
                for mig in migrations[current:]:
                    log.info("store: applying PostgreSQL migration %s", mig.name)
                    await conn.execute(mig.sql)
                    await conn.execute(
                        "INSERT INTO schema_version (version, name) VALUES ($1, $2)", mig.version, mig.name
                    )
                self.schema_version = len(migrations)
        finally:
            await conn.close()

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False
        await self._teardown()
        for subs in self._subs.values():
            for s in subs:
                s._closed = True
        self._subs.clear()
        self._maildrop_locks.clear()

    async def _teardown(self) -> None:
        self._closing = True
        task, self._backfill_task = self._backfill_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        for task in (self._control_task, self._watch_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._control_task = self._watch_task = None
        ctl, self._control = self._control, None
        if ctl is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ctl.close(), 5)
            if not ctl.is_closed():
                ctl.terminate()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 10)
            except Exception:
                pool.terminate()

    # ------------------------------------------------------------------------- control connection
    async def _control_start(self) -> None:
        conn = await self._connect()
        try:
            # This node's liveness: held as long as this session lives (queue claims check it).
            # A try: after a reconnect the old session may linger on the server until it notices
            # the loss; it holds the same node id, which is just as good, and goes in time.
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1::int4, $2::int4)", self._ns_node, self.node_id):
                log.info("store: a previous session of this node still holds its liveness lock")
            await conn.add_listener(self._channel, self._on_notify)
            # Maildrop locks held across the loss: taken again (so that no other session opens the
            # maildrop while ours ends), but not held without a gap: another node may have had
            # the maildrop meanwhile, so our POP3 sessions must not delete (MaildropLock.lost).
            for aid in list(self._maildrop_locks):
                self._maildrop_lost.add(aid)
                ok = await conn.fetchval(
                    "SELECT pg_try_advisory_lock($1::int4, $2::int4)", self._ns_maildrop, _int4(aid)
                )
                log.warning("store: maildrop lock of account %s %s while the connection was lost; its POP3"
                            " session will delete nothing", aid, "was released" if ok else "was taken by another node")
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._on_control_lost)
        self._control = conn
        if self._watch_task is None or self._watch_task.done():
            self._watch_task = asyncio.get_running_loop().create_task(self._control_watch())

    async def _control_watch(self) -> None:
        """A connection that died silently (no RST: a cable, a failover) is noticed here: a ping
        that does not come back in time ends it, and the termination listener reconnects."""
        while not self._closing:
            await asyncio.sleep(CONTROL_PING_SECONDS)
            conn = self._control
            if conn is None or conn.is_closed() or self._control_lock.locked():
                continue
            try:
                async with self._control_lock:
                    await conn.fetchval("SELECT 1", timeout=CONTROL_PING_SECONDS)
            except Exception as exc:
                log.warning("store: control connection does not answer (%s); reconnecting", exc)
                conn.terminate()

    def _on_control_lost(self, conn: Conn) -> None:
        if conn is not self._control or self._closing:
            return
        self._control = None
        log.warning("store: lost the PostgreSQL control connection; reconnecting")
        self._control_task = asyncio.get_running_loop().create_task(self._control_reconnect())

    async def _control_reconnect(self) -> None:
        delay = 0.1
        while not self._closing:
            try:
                async with self._control_lock:
                    await self._control_start()
            except Exception as exc:
                log.info("store: control connection: %s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            log.info("store: control connection back")
            # Notifications sent meanwhile are lost: wake every subscriber so it re-reads.
            for aid, subs in list(self._subs.items()):
                for s in list(subs):
                    s._put(Change(aid, ChangeKind.ACCOUNT))
            return

    async def _control_fetchval(self, sql: str, *args: Any) -> Any:
        self._check_open()
        async with self._control_lock:
            conn = self._control
            if conn is None or conn.is_closed():
                raise StoreUnavailable("the database connection is being re-established")
            try:
                return await conn.fetchval(sql, *args)
            except BaseException as exc:
                t = _translate(exc)
                if t is exc:
                    raise
                raise t from exc

    def _on_notify(self, conn: Conn, pid: int, channel: str, payload: str) -> None:
        got = _change_from_payload(payload)
        if got is None:
            log.warning("store: ignoring a malformed change notification")
            return
        node, change = got
        if node == self.node_id:
            return  # published locally at commit already
        self._dispatch([change])

    def _dispatch(self, changes: Iterable[Change], *, local: bool = False) -> None:
        watchers = self._subs.get(ALL_ACCOUNTS, ()) if local else ()
        for ch in changes:
            for sub in list(self._subs.get(ch.account_id, ())):
                sub._put(ch)
            for sub in list(watchers):
                sub._put(ch)

    # --------------------------------------------------------------------------------- plumbing
    def _check_open(self) -> None:
        if not self._open or self._pool is None:
            raise StoreUnavailable("the store is not open")

    async def _fetch(self, sql: str, *args: Any) -> list[Row]:
        return await self._read(lambda c: c.fetch(sql, *args))

    async def _fetchrow(self, sql: str, *args: Any) -> Row | None:
        return await self._read(lambda c: c.fetchrow(sql, *args))

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[Conn]:
        """A pooled connection; one that broke under us is terminated so the pool replaces it."""
        async with self._pool.acquire() as conn:
            try:
                yield conn
            except _UNAVAILABLE:
                # (A proxy asyncpg has already detached says so with an InterfaceError, which
                # would hide the real error.)
                with contextlib.suppress(asyncpg.InterfaceError):
                    conn.terminate()
                raise

    async def _read(self, fn: Callable[[Conn], Awaitable[T]], *, snapshot: bool = False) -> T:
        """Run a read. ``snapshot``: several statements in one REPEATABLE READ transaction. A
        connection found dead (the server restarted) is replaced once: reads are safe to retry."""
        self._check_open()
        tries = self._pool_max + 1
        for attempt in range(tries):
            try:
                async with self._conn() as conn:
                    if snapshot:
                        async with conn.transaction(isolation="repeatable_read", readonly=True):
                            return await fn(conn)
                    return await fn(conn)
            except PostfachError:
                raise
            except BaseException as exc:
                t = _translate(exc)
                if t is exc:
                    raise
                if attempt < tries - 1 and isinstance(t, StoreUnavailable) and not self._closing and self._open:
                    continue
                raise t from exc
        raise AssertionError("unreachable")

    async def _write(self, fn: Callable[[Conn, _Tx], Awaitable[T]]) -> T:
        """One transaction, committed before returning; its changes go out after the commit. The
        work runs to its end even when the caller is cancelled (it may already be committed)."""
        self._check_open()
        task = asyncio.ensure_future(self._write_task(fn))
        task.add_done_callback(lambda t: None if t.cancelled() else t.exception())
        return await asyncio.shield(task)

    async def _write_task(self, fn: Callable[[Conn, _Tx], Awaitable[T]]) -> T:
        delay = 0.005
        tries = max(TX_RETRIES, self._pool_max + 1)
        for attempt in range(tries):
            tx = _Tx()
            try:
                async with self._conn() as conn, self._tx_guard(tx):
                    tr = conn.transaction()
                    try:
                        await tr.start()
                    except _UNAVAILABLE as exc:
                        # Nothing ran yet: a connection that died with a server restart; try another.
                        if attempt < tries - 1 and self._open:
                            log.info("store: retrying on a fresh connection: %s", exc)
                            with contextlib.suppress(asyncpg.InterfaceError):
                                conn.terminate()  # the pool connects anew for the next acquire
                            await asyncio.sleep(delay)
                            delay = min(delay * 2, 0.5)
                            continue
                        raise
                    try:
                        result = await fn(conn, tx)
                        if tx.changes:  # delivered by PostgreSQL at commit, and only then
                            await conn.execute(
                                "SELECT pg_notify($1, p) FROM unnest($2::text[]) WITH ORDINALITY AS t(p, i) ORDER BY i",
                                self._channel,
                                [_change_payload(self.node_id, ch) for ch in tx.changes],
                            )
                    except BaseException:
                        with contextlib.suppress(Exception):
                            await tr.rollback()
                        raise
                    await tr.commit()
            except asyncpg.exceptions.TransactionRollbackError as exc:  # serialisation / deadlock
                if attempt < tries - 1:
                    log.debug("store: transaction retried: %s", exc)
                    await asyncio.sleep(delay * random.random())
                    delay = min(delay * 2, 0.5)
                    continue
                raise StoreUnavailable(f"database busy: {exc}") from exc
            except PostfachError:
                raise
            except BaseException as exc:
                t = _translate(exc)
                if t is exc:
                    raise
                raise t from exc
            self._tx_done(tx, committed=True)
            return result
        raise StoreUnavailable("database busy; try again")

    # The local feed in commit order. Writes to one account commit in the order they got its row
    # lock (they hold it to their commit), but two commits that return together may resume their
    # callers in either order: each write therefore gets in line for its accounts right after the
    # statement that took their locks returned, and its changes go out once every write ahead of
    # it in a line has committed (published first) or failed (publishes nothing).
    def _in_line(self, tx: _Tx, account_ids: Iterable[AccountId]) -> None:
        """Call right after the statement that locked these account rows returned."""
        for a in sorted({int(x) for x in account_ids} - set(tx.in_line)):
            tx.in_line.append(a)
            self._feed_lines.setdefault(a, deque()).append(tx)

    def _tx_done(self, tx: _Tx, *, committed: bool) -> None:
        if tx.state:
            return
        tx.state = 1 if committed else 2
        if committed:
            self._dispatch([ch for ch in tx.notified + tx.changes if int(ch.account_id) not in tx.in_line], local=True)
        for a in tx.in_line:
            line = self._feed_lines.get(a)
            while line and line[0].state:
                head = line.popleft()
                if head.state == 1:
                    self._dispatch([ch for ch in head.notified + head.changes if int(ch.account_id) == a], local=True)
            if line is not None and not line:
                del self._feed_lines[a]

    @contextlib.asynccontextmanager
    async def _tx_guard(self, tx: _Tx) -> AsyncIterator[None]:
        """A write attempt that ends without its commit leaves the lines it was in."""
        try:
            yield
        except BaseException:
            self._tx_done(tx, committed=False)
            raise

    # ------------------------------------------------------------------ transaction building blocks
    async def _prepare_blobs(self, datas: Sequence[bytes]) -> list[_Blob]:
        """Hash and parse message bytes, off the event loop, all in one thread hop. Big messages
        the database has already (a re-APPEND, a forward of an attachment) are not parsed again;
        small ones are parsed without asking (cheaper than the round trip)."""

        def hash_and_parse(skip: set[str]) -> list[_Blob]:
            out: list[_Blob] = []
            parsed: dict[str, tuple[bytes | None, tuple[SortRow, IndexText] | None]] = {}
            for data in datas:
                blob_id = hashlib.sha256(data).hexdigest()
                if blob_id not in parsed and blob_id not in skip:
                    parsed[blob_id] = _parse_for_ingest(data) if indexed else (_parse_info(data), None)
                info, index = parsed.get(blob_id, (None, None))
                out.append(_Blob(blob_id, len(data), info, data, wire_bits(data), index))
            return out

        indexed = self.schema_version >= 4

        known: set[str] = set()
        big = [d for d in datas if len(d) > PARSE_WITHOUT_ASKING_BYTES]
        if big:
            ids = await asyncio.to_thread(lambda: [hashlib.sha256(d).hexdigest() for d in big])
            rows = await self._fetch("SELECT id FROM blob WHERE id = ANY($1::text[]) AND info IS NOT NULL", ids)
            known = {r["id"] for r in rows}
        return await asyncio.to_thread(hash_and_parse, known)

    async def _incref(self, conn: Conn, blobs: Sequence[_Blob]) -> None:
        """One reference per entry; new content gets its row and its chunks."""
        counts: Counter[str] = Counter(b.id for b in blobs)
        first: dict[str, _Blob] = {}
        for b in blobs:
            first.setdefault(b.id, b)
        for blob_id in sorted(counts):  # a fixed order: no deadlocks between writers
            b = first[blob_id]
            if b.data is None:
                n = await conn.fetchval(
                    "UPDATE blob SET refcount = refcount + $2 WHERE id = $1 RETURNING refcount",
                    blob_id,
                    counts[blob_id],
                )
                if n is None:
                    raise NotFound("the message data is gone")
                continue
            if self.schema_version >= 3:
                inserted = await conn.fetchval(
                    "INSERT INTO blob (id, size, refcount, info, wire) VALUES ($1, $2, $3, $4, $5)"
                    " ON CONFLICT (id) DO UPDATE SET refcount = blob.refcount + EXCLUDED.refcount,"
                    " info = coalesce(blob.info, EXCLUDED.info), wire = coalesce(blob.wire, EXCLUDED.wire)"
                    " RETURNING (xmax = 0)",
                    blob_id,
                    b.size,
                    counts[blob_id],
                    b.info,
                    b.wire,
                )
            else:  # a database of schema version 1 or 2 (only while testing upgrades)
                inserted = await conn.fetchval(
                    "INSERT INTO blob (id, size, refcount, info) VALUES ($1, $2, $3, $4)"
                    " ON CONFLICT (id) DO UPDATE SET refcount = blob.refcount + EXCLUDED.refcount,"
                    " info = coalesce(blob.info, EXCLUDED.info) RETURNING (xmax = 0)",
                    blob_id,
                    b.size,
                    counts[blob_id],
                    b.info,
                )
            if inserted and b.index is not None:
                await _insert_index(conn, [b])
            if inserted:
                view = memoryview(b.data)
                await conn.executemany(
                    "INSERT INTO blob_chunk (blob_id, seq, data) VALUES ($1, $2, $3)",
                    [
                        (blob_id, i, view[off : off + CHUNK_BYTES])
                        for i, off in enumerate(range(0, len(view), CHUNK_BYTES))
                    ],
                )

    @staticmethod
    async def _decref(conn: Conn, counts: Counter[str]) -> None:
        for blob_id in sorted(counts):
            n = await conn.fetchval(
                "UPDATE blob SET refcount = refcount - $2 WHERE id = $1 RETURNING refcount", blob_id, counts[blob_id]
            )
            if n is not None and n <= 0:
                await conn.execute("DELETE FROM blob WHERE id = $1", blob_id)  # chunks cascade

    async def _lock_accounts(self, conn: Conn, tx: _Tx, account_ids: Iterable[AccountId]) -> set[AccountId]:
        """Every mail write starts here: the account rows, ascending. Returns those that exist."""
        ids = sorted({int(a) for a in account_ids})
        rows = await conn.fetch(
            "SELECT id FROM account WHERE id = ANY($1::bigint[]) ORDER BY id FOR NO KEY UPDATE", ids
        )
        found = {AccountId(r["id"]) for r in rows}
        self._in_line(tx, found)
        return found

    @staticmethod
    async def _drop_mailbox_rows(conn: Conn, account_id: AccountId, mailbox_ids: Sequence[int]) -> None:
        """The rows that live and die with a mailbox: expunge history and METADATA entries."""
        ids = [int(m) for m in mailbox_ids]
        await conn.execute("DELETE FROM expunged WHERE mailbox_id = ANY($1::bigint[])", ids)
        await conn.execute("DELETE FROM expunge_mark WHERE mailbox_id = ANY($1::bigint[])", ids)
        await conn.execute("DELETE FROM expunge_floor WHERE mailbox_id = ANY($1::bigint[])", ids)
        await conn.execute(
            "DELETE FROM metadata WHERE account_id = $1 AND mailbox_id = ANY($2::bigint[])", account_id, ids
        )

    @staticmethod
    async def _mailbox_row(conn: Conn, account_id: AccountId, mailbox_id: MailboxId, *, lock: bool = False) -> Row:
        row = await conn.fetchrow(
            "SELECT id, name, uidvalidity, uidnext, highestmodseq, recent_uid FROM mailbox"
            " WHERE id = $1 AND account_id = $2" + (" FOR NO KEY UPDATE" if lock else ""),
            mailbox_id,
            account_id,
        )
        if row is None:
            raise NotFound("no such mailbox")
        return row

    @staticmethod
    async def _check_quota(conn: Conn, account_id: AccountId, add_bytes: int, add_messages: int) -> None:
        row = await conn.fetchrow(
            "SELECT quota_bytes, quota_messages, used_bytes, used_messages FROM account WHERE id = $1", account_id
        )
        if row is None:
            raise NotFound("no such account")
        qb, qm, ub, um = row
        if add_bytes > 0 and qb is not None and ub + add_bytes > qb:
            raise QuotaExceeded("mailbox storage quota exceeded", resource="STORAGE")
        if add_messages > 0 and qm is not None and um + add_messages > qm:
            raise QuotaExceeded("mailbox message-count quota exceeded", resource="MESSAGE")

    @staticmethod
    async def _add_usage(
        conn: Conn, account_id: AccountId, add_bytes: int, add_messages: int, *, check: bool = False
    ) -> None:
        if not (add_bytes or add_messages or check):
            return
        row = await conn.fetchrow(
            "UPDATE account SET used_bytes = used_bytes + $1, used_messages = used_messages + $2 WHERE id = $3"
            " RETURNING quota_bytes, quota_messages, used_bytes, used_messages",
            add_bytes,
            add_messages,
            account_id,
        )
        if row is None:
            raise NotFound("no such account")
        if check:
            qb, qm, ub, um = row
            if add_bytes > 0 and qb is not None and ub > qb:
                raise QuotaExceeded("mailbox storage quota exceeded", resource="STORAGE")
            if add_messages > 0 and qm is not None and um > qm:
                raise QuotaExceeded("mailbox message-count quota exceeded", resource="MESSAGE")

    async def _insert_messages(
        self,
        conn: Conn,
        tx: _Tx,
        account_id: AccountId,
        mailbox_id: MailboxId,
        entries: Sequence[tuple[_Blob, frozenset[str], datetime, datetime | None]],
        *,
        check_quota: bool = True,
        count_usage: bool = True,
    ) -> tuple[UidValidity, list[Uid], ModSeq]:
        """entries: (blob, normalized flags, internaldate, savedate or None=now). The caller holds
        the account lock."""
        n = len(entries)
        total = sum(b.size for b, _, _, _ in entries)
        if count_usage:
            await self._add_usage(conn, account_id, total, n, check=check_quota)
        elif check_quota:
            await self._check_quota(conn, account_id, total, n)
        self._in_line(tx, [account_id])  # the usage UPDATE locked the account row (or the caller did)
        mb = await conn.fetchrow(
            "UPDATE mailbox SET uidnext = uidnext + $1, highestmodseq = highestmodseq + 1"
            " WHERE id = $2 AND account_id = $3 RETURNING uidnext, highestmodseq, uidvalidity",
            n,
            mailbox_id,
            account_id,
        )
        if mb is None:
            raise NotFound("no such mailbox")
        first = int(mb["uidnext"]) - n
        if first + n - 1 > MAX_UID:
            raise NotPermitted("the mailbox has run out of UIDs")
        modseq = int(mb["highestmodseq"])
        now = _now()
        await self._incref(conn, [b for b, _, _, _ in entries])
        uids = [Uid(first + i) for i in range(n)]
        await conn.executemany(
            "INSERT INTO message (mailbox_id, uid, blob_id, size, internaldate, savedate, flags, seen, deleted,"
            " modseq) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            [
                (
                    mailbox_id,
                    uid,
                    blob.id,
                    blob.size,
                    idate,
                    sdate if sdate is not None else now,
                    sorted(flags),
                    "\\Seen" in flags,
                    "\\Deleted" in flags,
                    modseq,
                )
                for uid, (blob, flags, idate, sdate) in zip(uids, entries, strict=True)
            ],
        )
        tx.changes.append(Change(account_id, ChangeKind.APPEND, mailbox_id, ModSeq(modseq), tuple(uids)))
        return UidValidity(int(mb["uidvalidity"])), uids, ModSeq(modseq)

    async def _append_fast(
        self,
        conn: Conn,
        tx: _Tx,
        account_id: AccountId,
        mailbox_id: MailboxId,
        entries: Sequence[tuple[_Blob, frozenset[str], datetime]],
        *,
        check_quota: bool = True,
    ) -> tuple[UidValidity, list[Uid], ModSeq]:
        """``_insert_messages`` in one round trip (``postfach_append``, migrations 0002/0003) for
        messages of one chunk at most; the function NOTIFYs the other nodes itself."""
        try:
            row = await conn.fetchrow(
                "SELECT o_uidvalidity, o_first, o_modseq FROM postfach_append($1, $2, $3, $4, $5, $6, $7, $8, $9,"
                " $10, $11, $12)",
                account_id,
                mailbox_id,
                [b.id for b, _, _ in entries],
                [b.size for b, _, _ in entries],
                [b.info for b, _, _ in entries],
                [b.data if b.data is not None else b"" for b, _, _ in entries],
                [" ".join(sorted(f)) for _, f, _ in entries],
                [d for _, _, d in entries],
                [b.wire for b, _, _ in entries],
                check_quota,
                self._channel,
                self.node_id,
            )
        except asyncpg.exceptions.RaiseError as exc:
            raise _raised(exc) from None
        self._in_line(tx, [account_id])  # postfach_append locked the account row
        if self.schema_version >= 4:
            await _insert_index(conn, [b for b, _, _ in entries])
        first, modseq = int(row["o_first"]), ModSeq(int(row["o_modseq"]))
        uids = [Uid(first + i) for i in range(len(entries))]
        tx.notified.append(Change(account_id, ChangeKind.APPEND, mailbox_id, modseq, tuple(uids)))
        return UidValidity(int(row["o_uidvalidity"])), uids, modseq

    def _fast_ok(self, blobs: Iterable[_Blob]) -> bool:
        return self.schema_version >= 3 and all(b.data is not None and b.size <= CHUNK_BYTES for b in blobs)

    async def _remove_messages(
        self,
        conn: Conn,
        tx: _Tx,
        account_id: AccountId,
        mailbox_id: MailboxId,
        rows: Sequence[Row],
        *,
        count_usage: bool = True,
        log_expunge: bool = True,
    ) -> list[Uid]:
        """Delete the given message rows (uid, blob_id, size), log the expunge with a new modseq."""
        if not rows:
            return []
        uids = sorted(int(r["uid"]) for r in rows)
        modseq = 0
        if log_expunge:
            modseq = int(
                await conn.fetchval(
                    "UPDATE mailbox SET highestmodseq = highestmodseq + 1 WHERE id = $1 RETURNING highestmodseq",
                    mailbox_id,
                )
            )
        await conn.execute("DELETE FROM message WHERE mailbox_id = $1 AND uid = ANY($2::bigint[])", mailbox_id, uids)
        if log_expunge:
            await conn.execute(
                "INSERT INTO expunged (mailbox_id, uid, modseq) SELECT $1, u, $3 FROM unnest($2::bigint[]) AS u"
                " ON CONFLICT (mailbox_id, uid) DO UPDATE SET modseq = EXCLUDED.modseq",
                mailbox_id,
                uids,
                modseq,
            )
        await self._decref(conn, Counter(str(r["blob_id"]) for r in rows))
        if count_usage:
            await self._add_usage(conn, account_id, -sum(int(r["size"]) for r in rows), -len(rows))
        if log_expunge:
            tx.changes.append(
                Change(account_id, ChangeKind.EXPUNGE, mailbox_id, ModSeq(modseq), tuple(Uid(u) for u in uids))
            )
        return [Uid(u) for u in uids]

    @staticmethod
    async def _select_uids(
        conn: Conn, mailbox_id: MailboxId, uids: Sequence[Uid], cols: str, extra: str = ""
    ) -> list[Row]:
        wanted = sorted({int(u) for u in uids})
        if not wanted:
            return []
        rows: list[Row] = await conn.fetch(
            f"SELECT {cols} FROM message WHERE mailbox_id = $1 AND uid = ANY($2::bigint[]) {extra} ORDER BY uid",
            mailbox_id,
            wanted,
        )
        return rows

    @staticmethod
    async def _next_uidvalidity(conn: Conn) -> int:
        """Time-based and strictly increasing across the whole store (all nodes), so a mailbox
        deleted and created again never repeats a UIDVALIDITY (RFC 9051 §2.3.1.1)."""
        value: int = await conn.fetchval(
            "INSERT INTO counter (name, value) VALUES ('uidvalidity', $1) ON CONFLICT (name) DO UPDATE"
            " SET value = greatest(EXCLUDED.value, counter.value + 1) RETURNING value",
            int(time.time()),
        )
        return value

    async def _create_mailbox_tx(
        self, conn: Conn, tx: _Tx, account_id: AccountId, name: str, special_use: str | None
    ) -> MailboxId:
        exists = await conn.fetchval("SELECT 1 FROM mailbox WHERE account_id = $1 AND name = $2", account_id, name)
        if exists:
            raise AlreadyExists(f"mailbox {name!r} exists already")
        try:
            mid = MailboxId(
                await conn.fetchval(
                    "INSERT INTO mailbox (account_id, name, special_use, uidvalidity) VALUES ($1, $2, $3, $4)"
                    " RETURNING id",
                    account_id,
                    name,
                    special_use,
                    await self._next_uidvalidity(conn),
                )
            )
        except asyncpg.UniqueViolationError as exc:
            raise AlreadyExists(f"mailbox {name!r} exists already") from exc
        tx.changes.append(Change(account_id, ChangeKind.MAILBOX_CREATE, mid, name=name))
        return mid

    # ----------------------------------------------------------------------------------- domains
    async def add_domain(self, name: str, quota_bytes: int | None = None) -> Domain:
        name = _norm_domain(name)
        if not name:
            raise NotPermitted("empty domain name")

        async def fn(conn: Conn, tx: _Tx) -> Domain:
            row = await conn.fetchrow(
                "INSERT INTO domain (name, created, quota_bytes) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"
                " RETURNING *",
                name,
                _now(),
                quota_bytes,
            )
            if row is None:
                raise AlreadyExists(f"domain {name} exists already")
            return _domain(row)

        return await self._write(fn)

    async def list_domains(self) -> list[Domain]:
        return [_domain(r) for r in await self._fetch('SELECT * FROM domain ORDER BY name COLLATE "C"')]

    async def get_domain(self, name: str) -> Domain | None:
        if not _storable(name):
            return None
        r = await self._fetchrow("SELECT * FROM domain WHERE name = $1", _norm_domain(name))
        return _domain(r) if r else None

    async def delete_domain(self, name: str) -> None:
        name = _norm_domain(name)

        async def fn(conn: Conn, tx: _Tx) -> None:
            if await conn.fetchval("SELECT 1 FROM domain WHERE name = $1 FOR UPDATE", name) is None:
                raise NotFound(f"no domain {name}")
            if await conn.fetchval("SELECT 1 FROM account WHERE domain = $1 LIMIT 1", name):
                raise NotPermitted(f"domain {name} still has accounts")
            await conn.execute("DELETE FROM alias WHERE domain = $1", name)
            await conn.execute("DELETE FROM domain WHERE name = $1", name)

        await self._write(fn)

    # ---------------------------------------------------------------------------------- accounts
    async def create_account(
        self,
        address: str,
        password_hash: str,
        quota_bytes: int | None = None,
        quota_messages: int | None = None,
    ) -> Account:
        address = _norm_address(address)
        local, _, domain = address.rpartition("@")
        if not local or not domain:
            raise NotPermitted(f"not an address: {address!r}")

        async def fn(conn: Conn, tx: _Tx) -> Row:
            d = await conn.fetchrow("SELECT quota_bytes FROM domain WHERE name = $1 FOR KEY SHARE", domain)
            if d is None:
                raise NotFound(f"no domain {domain}")
            qb = quota_bytes if quota_bytes is not None else d["quota_bytes"]
            row = await conn.fetchrow(
                "INSERT INTO account (address, domain, password_hash, quota_bytes, quota_messages, created)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (address) DO NOTHING RETURNING *",
                address,
                domain,
                password_hash,
                qb,
                quota_messages,
                _now(),
            )
            if row is None:
                raise AlreadyExists(f"account {address} exists already")
            aid = AccountId(row["id"])
            for name, special in DEFAULT_MAILBOXES:
                await self._create_mailbox_tx(conn, tx, aid, name, special)
            await conn.executemany(
                "INSERT INTO subscription (account_id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                [(aid, name) for name, _ in DEFAULT_MAILBOXES],
            )
            return row

        return _account(await self._write(fn))

    async def get_account(self, address: str) -> Account | None:
        if not _storable(address):
            return None  # a login name with a NUL (IMAP literal, POP3 USER): no such account
        r = await self._fetchrow("SELECT * FROM account WHERE address = $1", _norm_address(address))
        return _account(r) if r else None

    async def get_account_by_id(self, account_id: AccountId) -> Account | None:
        r = await self._fetchrow("SELECT * FROM account WHERE id = $1", account_id)
        return _account(r) if r else None

    async def list_accounts(self, domain: str | None = None) -> list[Account]:
        if domain is None:
            rows = await self._fetch('SELECT * FROM account ORDER BY address COLLATE "C"')
        elif not _storable(domain):
            return []
        else:
            rows = await self._fetch(
                'SELECT * FROM account WHERE domain = $1 ORDER BY address COLLATE "C"', domain.strip().lower()
            )
        return [_account(r) for r in rows]

    async def set_password(self, account_id: AccountId, password_hash: str) -> None:
        async def fn(conn: Conn, tx: _Tx) -> None:
            r = await conn.fetchval(
                "UPDATE account SET password_hash = $1 WHERE id = $2 RETURNING id", password_hash, account_id
            )
            if r is None:
                raise NotFound("no such account")
            tx.changes.append(Change(account_id, ChangeKind.ACCOUNT))

        await self._write(fn)

    async def set_quota(self, account_id: AccountId, quota_bytes: int | None, quota_messages: int | None) -> None:
        async def fn(conn: Conn, tx: _Tx) -> None:
            r = await conn.fetchval(
                "UPDATE account SET quota_bytes = $1, quota_messages = $2 WHERE id = $3 RETURNING id",
                quota_bytes,
                quota_messages,
                account_id,
            )
            if r is None:
                raise NotFound("no such account")
            tx.changes.append(Change(account_id, ChangeKind.ACCOUNT))

        await self._write(fn)

    async def delete_account(self, account_id: AccountId) -> None:
        async def fn(conn: Conn, tx: _Tx) -> None:
            if not await self._lock_accounts(conn, tx, [account_id]):
                raise NotFound("no such account")
            counts: Counter[str] = Counter()
            for r in await conn.fetch(
                "SELECT m.blob_id, count(*) AS n FROM message m JOIN mailbox b ON b.id = m.mailbox_id"
                " WHERE b.account_id = $1 GROUP BY m.blob_id",
                account_id,
            ):
                counts[r["blob_id"]] += int(r["n"])
            mids = [r["id"] for r in await conn.fetch("SELECT id FROM mailbox WHERE account_id = $1", account_id)]
            await conn.execute("DELETE FROM message WHERE mailbox_id = ANY($1::bigint[])", mids)
            await self._drop_mailbox_rows(conn, account_id, mids)
            await conn.execute("DELETE FROM metadata WHERE account_id = $1", account_id)
            await conn.execute("DELETE FROM mailbox WHERE account_id = $1", account_id)
            await conn.execute("DELETE FROM subscription WHERE account_id = $1", account_id)
            await conn.execute("DELETE FROM account WHERE id = $1", account_id)
            await self._decref(conn, counts)
            tx.changes.append(Change(account_id, ChangeKind.ACCOUNT))

        await self._write(fn)

    # ----------------------------------------------------------------------------------- aliases
    async def add_alias(self, source: str, target: str) -> Alias:
        source = _norm_address(source)
        target = target.strip()
        domain = source.rpartition("@")[2]
        if "@" not in source or not domain or not target:
            raise NotPermitted("an alias needs local@domain (or @domain) and a target")

        async def fn(conn: Conn, tx: _Tx) -> Alias:
            if await conn.fetchval("SELECT 1 FROM domain WHERE name = $1 FOR KEY SHARE", domain) is None:
                raise NotFound(f"no domain {domain}")
            r = await conn.fetchval(
                "INSERT INTO alias (source, target, domain) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING 1",
                source,
                target,
                domain,
            )
            if r is None:
                raise AlreadyExists(f"alias {source} -> {target} exists already")
            return Alias(source, target)

        return await self._write(fn)

    async def list_aliases(self, domain: str | None = None) -> list[Alias]:
        if domain is None:
            rows = await self._fetch('SELECT source, target FROM alias ORDER BY source COLLATE "C", target COLLATE "C"')
        elif not _storable(domain):
            return []
        else:
            rows = await self._fetch(
                'SELECT source, target FROM alias WHERE domain = $1 ORDER BY source COLLATE "C", target COLLATE "C"',
                domain.strip().lower(),
            )
        return [Alias(r["source"], r["target"]) for r in rows]

    async def delete_alias(self, source: str, target: str) -> None:
        source = _norm_address(source)
        target = target.strip()

        async def fn(conn: Conn, tx: _Tx) -> None:
            r = await conn.fetchval("DELETE FROM alias WHERE source = $1 AND target = $2 RETURNING 1", source, target)
            if r is None:
                raise NotFound(f"no alias {source} -> {target}")

        await self._write(fn)

    async def aliases_for(self, source: str) -> list[Alias]:
        if not _storable(source):
            return []
        rows = await self._fetch(
            'SELECT source, target FROM alias WHERE source = $1 ORDER BY target COLLATE "C"', _norm_address(source)
        )
        return [Alias(r["source"], r["target"]) for r in rows]

    # --------------------------------------------------------------------------------- mailboxes
    async def list_mailboxes(self, account_id: AccountId) -> list[Mailbox]:
        rows = await self._fetch(
            f"SELECT {_MAILBOX_COLS} FROM mailbox m WHERE m.account_id = $1"
            " ORDER BY m.name <> 'INBOX', m.name COLLATE \"C\"",
            account_id,
        )
        return [_mailbox(r) for r in rows]

    async def get_mailbox(self, account_id: AccountId, name: str) -> Mailbox | None:
        if not _storable(name):
            return None
        r = await self._fetchrow(
            f"SELECT {_MAILBOX_COLS} FROM mailbox m WHERE m.account_id = $1 AND m.name = $2",
            account_id,
            _norm_mailbox_name(name),
        )
        return _mailbox(r) if r else None

    async def get_mailbox_by_id(self, account_id: AccountId, mailbox_id: MailboxId) -> Mailbox | None:
        r = await self._fetchrow(
            f"SELECT {_MAILBOX_COLS} FROM mailbox m WHERE m.account_id = $1 AND m.id = $2", account_id, mailbox_id
        )
        return _mailbox(r) if r else None

    async def create_mailbox(self, account_id: AccountId, name: str, special_use: str | None = None) -> Mailbox:
        name = _norm_mailbox_name(name)
        if not name:
            raise NotPermitted("empty mailbox name")

        async def fn(conn: Conn, tx: _Tx) -> MailboxId:
            if not await self._lock_accounts(conn, tx, [account_id]):
                raise NotFound("no such account")
            return await self._create_mailbox_tx(conn, tx, account_id, name, special_use)

        mid = await self._write(fn)
        mb = await self.get_mailbox_by_id(account_id, mid)
        if mb is None:
            raise NotFound("the mailbox was deleted meanwhile")
        return mb

    async def delete_mailbox(self, account_id: AccountId, mailbox_id: MailboxId) -> None:
        async def fn(conn: Conn, tx: _Tx) -> None:
            await self._lock_accounts(conn, tx, [account_id])
            mb = await self._mailbox_row(conn, account_id, mailbox_id, lock=True)
            if mb["name"] == "INBOX":
                raise NotPermitted("INBOX cannot be deleted")
            rows = await conn.fetch("SELECT uid, blob_id, size FROM message WHERE mailbox_id = $1", mailbox_id)
            await self._remove_messages(conn, tx, account_id, mailbox_id, rows, log_expunge=False)
            await self._drop_mailbox_rows(conn, account_id, [mailbox_id])
            await conn.execute("DELETE FROM mailbox WHERE id = $1", mailbox_id)
            tx.changes.append(Change(account_id, ChangeKind.MAILBOX_DELETE, mailbox_id, name=mb["name"]))

        await self._write(fn)

    async def rename_mailbox(self, account_id: AccountId, mailbox_id: MailboxId, new_name: str) -> None:
        new_name = _norm_mailbox_name(new_name)
        if not new_name:
            raise NotPermitted("empty mailbox name")

        async def fn(conn: Conn, tx: _Tx) -> None:
            await self._lock_accounts(conn, tx, [account_id])
            mb = await self._mailbox_row(conn, account_id, mailbox_id, lock=True)
            old = str(mb["name"])
            if new_name == old or await conn.fetchval(
                "SELECT 1 FROM mailbox WHERE account_id = $1 AND name = $2", account_id, new_name
            ):
                raise AlreadyExists(f"mailbox {new_name!r} exists already")
            if old == "INBOX":
                # RFC 9051 §6.3.6: INBOX's messages move to a new mailbox of the new name, INBOX
                # stays (empty); INBOX's children are not affected.
                dest = await self._create_mailbox_tx(conn, tx, account_id, new_name, None)
                # RFC 5464 §4.1: INBOX's annotations are copied to the new mailbox (and kept).
                await conn.execute(
                    "INSERT INTO metadata (account_id, mailbox_id, name, value)"
                    " SELECT account_id, $1, name, value FROM metadata WHERE account_id = $2 AND mailbox_id = $3",
                    dest,
                    account_id,
                    mailbox_id,
                )
                rows = await conn.fetch(
                    f"SELECT {_MESSAGE_COLS} FROM message WHERE mailbox_id = $1 ORDER BY uid", mailbox_id
                )
                if rows:
                    await self._insert_messages(
                        conn,
                        tx,
                        account_id,
                        dest,
                        [
                            (_Blob(r["blob_id"], r["size"], None, None), frozenset(r["flags"]), r["internaldate"], None)
                            for r in rows
                        ],
                        check_quota=False,
                        count_usage=False,
                    )
                    await self._remove_messages(conn, tx, account_id, mailbox_id, rows, count_usage=False)
                return
            if new_name.startswith(old + HIERARCHY_DELIMITER):
                raise NotPermitted("a mailbox cannot be moved below itself")
            prefix = old + HIERARCHY_DELIMITER
            children = [
                (int(r["id"]), str(r["name"]))
                for r in await conn.fetch(
                    "SELECT id, name FROM mailbox WHERE account_id = $1 AND starts_with(name, $2) ORDER BY id"
                    " FOR NO KEY UPDATE",
                    account_id,
                    prefix,
                )
            ]
            renames = [(int(mailbox_id), old, new_name)] + [
                (cid, cname, new_name + cname[len(old) :]) for cid, cname in children
            ]
            for _, _, nn in renames[1:]:
                if await conn.fetchval("SELECT 1 FROM mailbox WHERE account_id = $1 AND name = $2", account_id, nn):
                    raise AlreadyExists(f"mailbox {nn!r} exists already")
            # Two steps, so that renaming "a" -> "b" never collides with an old child name midway.
            for mid, _, _ in renames:
                await conn.execute("UPDATE mailbox SET name = $1 WHERE id = $2", f"\x01renaming\x01{mid}", mid)
            for mid, oname, nn in renames:
                await conn.execute("UPDATE mailbox SET name = $1 WHERE id = $2", nn, mid)
                # Subscriptions follow the mailbox, as in Dovecot.
                if await conn.fetchval(
                    "DELETE FROM subscription WHERE account_id = $1 AND name = $2 RETURNING 1", account_id, oname
                ):
                    await conn.execute(
                        "INSERT INTO subscription (account_id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                        account_id,
                        nn,
                    )
                tx.changes.append(Change(account_id, ChangeKind.MAILBOX_RENAME, MailboxId(mid), name=nn))

        await self._write(fn)

    async def set_subscribed(self, account_id: AccountId, name: str, subscribed: bool) -> None:
        name = _norm_mailbox_name(name)

        async def fn(conn: Conn, tx: _Tx) -> None:
            if await conn.fetchval("SELECT 1 FROM account WHERE id = $1 FOR KEY SHARE", account_id) is None:
                raise NotFound("no such account")
            if subscribed:
                await conn.execute(
                    "INSERT INTO subscription (account_id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    account_id,
                    name,
                )
            else:
                await conn.execute("DELETE FROM subscription WHERE account_id = $1 AND name = $2", account_id, name)

        await self._write(fn)

    async def list_subscriptions(self, account_id: AccountId) -> list[str]:
        rows = await self._fetch(
            "SELECT name FROM subscription WHERE account_id = $1 ORDER BY name <> 'INBOX', name COLLATE \"C\"",
            account_id,
        )
        return [r["name"] for r in rows]

    async def mailbox_status(self, account_id: AccountId, mailbox_id: MailboxId) -> MailboxStatus:
        async def fn(conn: Conn) -> MailboxStatus:
            r = await conn.fetchrow(
                f"SELECT {_MAILBOX_COLS} FROM mailbox m WHERE m.account_id = $1 AND m.id = $2", account_id, mailbox_id
            )
            if r is None:
                raise NotFound("no such mailbox")
            c = await conn.fetchrow(
                "SELECT count(*) AS n, count(*) FILTER (WHERE NOT seen) AS unseen, coalesce(sum(size), 0) AS size,"
                " count(*) FILTER (WHERE deleted) AS deleted, min(uid) FILTER (WHERE NOT seen) AS first_unseen"
                " FROM message WHERE mailbox_id = $1",
                mailbox_id,
            )
            return MailboxStatus(
                mailbox=_mailbox(r),
                messages=int(c["n"]),
                unseen=int(c["unseen"]),
                size=int(c["size"]),
                deleted=int(c["deleted"]),
                first_unseen_uid=Uid(int(c["first_unseen"])) if c["first_unseen"] is not None else None,
            )

        return await self._read(fn, snapshot=True)

    async def claim_recent(self, account_id: AccountId, mailbox_id: MailboxId) -> Uid:
        async def fn(conn: Conn, tx: _Tx) -> Uid:
            r = await conn.fetchrow(
                "UPDATE mailbox m SET recent_uid = m.uidnext FROM (SELECT id, recent_uid FROM mailbox"
                " WHERE id = $1 AND account_id = $2 FOR NO KEY UPDATE) old WHERE m.id = old.id"
                " RETURNING old.recent_uid",
                mailbox_id,
                account_id,
            )
            if r is None:
                raise NotFound("no such mailbox")
            return Uid(int(r["recent_uid"]))

        return await self._write(fn)

    # ---------------------------------------------------------------------------------- messages
    async def append(
        self,
        account_id: AccountId,
        mailbox_id: MailboxId,
        data: bytes,
        flags: frozenset[str] = frozenset(),
        internaldate: datetime | None = None,
    ) -> AppendResult:
        return (await self.append_many(account_id, mailbox_id, [(data, flags, internaldate)]))[0]

    async def append_many(
        self,
        account_id: AccountId,
        mailbox_id: MailboxId,
        items: Sequence[tuple[bytes, frozenset[str], datetime | None]],
    ) -> list[AppendResult]:
        if not items:
            return []
        self._check_open()
        blobs = await self._prepare_blobs([bytes(d) for d, _, _ in items])
        now = _now()
        entries = [
            (blob, normalize_flags(flags), _aware(idate) if idate is not None else now, None)
            for blob, (_, flags, idate) in zip(blobs, items, strict=True)
        ]
        fast = self._fast_ok(blobs)

        async def fn(conn: Conn, tx: _Tx) -> list[AppendResult]:
            # The usage UPDATE in _insert_messages is the first statement touching the account
            # row: it takes the account lock (one round trip less than _lock_accounts).
            try:
                if fast:
                    uidvalidity, uids, modseq = await self._append_fast(
                        conn, tx, account_id, mailbox_id, [(b, f, d) for b, f, d, _ in entries]
                    )
                else:
                    uidvalidity, uids, modseq = await self._insert_messages(conn, tx, account_id, mailbox_id, entries)
            except NotFound:
                raise NotFound("no such mailbox") from None
            return [AppendResult(mailbox_id, uidvalidity, u, modseq) for u in uids]

        return await self._write(fn)

    async def deliver(self, data: bytes, targets: Sequence[DeliveryTarget]) -> list[AppendResult]:
        if not targets:
            return []
        self._check_open()
        distinct: dict[bytes, int] = {}
        for t in targets:
            distinct.setdefault(t.prepend, len(distinct))
        blobs = await self._prepare_blobs([p + data if p else data for p in distinct])
        now = _now()

        async def fn(conn: Conn, tx: _Tx) -> list[AppendResult]:
            existing = await self._lock_accounts(conn, tx, [t.account_id for t in targets])
            # Resolve every target and check every quota first: nothing is written if any fails.
            plans: list[tuple[DeliveryTarget, MailboxId, _Blob]] = []
            need: dict[AccountId, tuple[int, int]] = {}
            for t in targets:
                if t.account_id not in existing:
                    raise NotFound(f"no such account (id {t.account_id})")
                blob = blobs[distinct[t.prepend]]
                mid = await conn.fetchval(
                    "SELECT id FROM mailbox WHERE account_id = $1 AND name = $2",
                    t.account_id,
                    _norm_mailbox_name(t.mailbox),
                )
                if mid is None:
                    mid = await conn.fetchval(
                        "SELECT id FROM mailbox WHERE account_id = $1 AND name = 'INBOX'", t.account_id
                    )
                if mid is None:
                    raise NotFound(f"no such account (id {t.account_id})")
                plans.append((t, MailboxId(int(mid)), blob))
                b, n = need.get(t.account_id, (0, 0))
                need[t.account_id] = (b + blob.size, n + 1)
            for aid, (b, n) in need.items():
                await self._check_quota(conn, aid, b, n)
            results: list[AppendResult] = []
            fast = self._fast_ok(blobs)
            for t, mid, blob in plans:
                if fast:
                    uv, uids, modseq = await self._append_fast(
                        conn, tx, t.account_id, mid, [(blob, normalize_flags(t.flags), now)], check_quota=False
                    )
                else:
                    uv, uids, modseq = await self._insert_messages(
                        conn, tx, t.account_id, mid, [(blob, normalize_flags(t.flags), now, None)], check_quota=False
                    )
                results.append(AppendResult(mid, uv, uids[0], modseq))
            return results

        return await self._write(fn)

    async def list_messages(self, account_id: AccountId, mailbox_id: MailboxId) -> list[MessageMeta]:
        async def fn(conn: Conn) -> list[MessageMeta]:
            await self._mailbox_row(conn, account_id, mailbox_id)
            rows = await conn.fetch(
                f"SELECT {_MESSAGE_COLS} FROM message WHERE mailbox_id = $1 ORDER BY uid", mailbox_id
            )
            return [_meta(r) for r in rows]

        return await self._read(fn, snapshot=True)

    async def list_uids_sizes(
        self, account_id: AccountId, mailbox_id: MailboxId
    ) -> list[tuple[Uid, int, frozenset[str]]]:
        """(uid, size, flags) of every message, ascending by UID (POP3 login, first views of very
        large mailboxes); flag sets shared between messages with the same flags."""

        async def fn(conn: Conn) -> list[tuple[Uid, int, frozenset[str]]]:
            await self._mailbox_row(conn, account_id, mailbox_id)
            rows = await conn.fetch(
                "SELECT uid, size, array_to_string(flags, ' ') AS f FROM message WHERE mailbox_id = $1 ORDER BY uid",
                mailbox_id,
            )
            memo: dict[str, frozenset[str]] = {}
            out: list[tuple[Uid, int, frozenset[str]]] = []
            for r in rows:
                f = memo.get(r["f"])
                if f is None:
                    f = memo[r["f"]] = frozenset(r["f"].split()) if r["f"] else frozenset()
                out.append((Uid(r["uid"]), int(r["size"]), f))
            return out

        return await self._read(fn, snapshot=True)

    async def get_messages(
        self, account_id: AccountId, mailbox_id: MailboxId, uids: Sequence[Uid]
    ) -> list[MessageMeta]:
        async def fn(conn: Conn) -> list[MessageMeta]:
            await self._mailbox_row(conn, account_id, mailbox_id)
            return [_meta(r) for r in await self._select_uids(conn, mailbox_id, uids, _MESSAGE_COLS)]

        return await self._read(fn, snapshot=True)

    async def mailbox_changes(self, account_id: AccountId, mailbox_id: MailboxId, since: ModSeq) -> MailboxChanges:
        async def fn(conn: Conn) -> MailboxChanges:
            r = await conn.fetchrow(
                f"SELECT {_MAILBOX_COLS},"
                " coalesce((SELECT f.modseq FROM expunge_floor f WHERE f.mailbox_id = m.id), 0) AS floor"
                " FROM mailbox m WHERE m.account_id = $1 AND m.id = $2",
                account_id,
                mailbox_id,
            )
            if r is None:
                raise NotFound("no such mailbox")
            changed = await conn.fetch(
                f"SELECT {_MESSAGE_COLS} FROM message WHERE mailbox_id = $1 AND modseq > $2 ORDER BY uid",
                mailbox_id,
                since,
            )
            expunged = await conn.fetch(
                "SELECT uid FROM expunged WHERE mailbox_id = $1 AND modseq > $2 ORDER BY uid", mailbox_id, since
            )
            return MailboxChanges(
                _mailbox(r),
                tuple(_meta(x) for x in changed),
                tuple(Uid(int(x["uid"])) for x in expunged),
                ModSeq(int(r["floor"])),
            )

        return await self._read(fn, snapshot=True)

    async def store_flags(
        self,
        account_id: AccountId,
        mailbox_id: MailboxId,
        uids: Sequence[Uid],
        op: FlagOp,
        flags: frozenset[str],
        unchangedsince: ModSeq | None = None,
    ) -> StoreFlagsResult:
        flags = normalize_flags(flags)

        async def fn(conn: Conn, tx: _Tx) -> StoreFlagsResult:
            await self._lock_accounts(conn, tx, [account_id])
            mb = await self._mailbox_row(conn, account_id, mailbox_id, lock=True)
            rows = await self._select_uids(conn, mailbox_id, uids, _MESSAGE_COLS)
            modseq = int(mb["highestmodseq"]) + 1
            updated: list[MessageMeta] = []
            unchanged: list[MessageMeta] = []
            modified: list[Uid] = []
            for r in rows:
                meta = _meta(r)
                # RFC 7162 §3.1.3: fails UNCHANGEDSINCE when the message's modseq is greater.
                if unchangedsince is not None and meta.modseq > unchangedsince:
                    modified.append(meta.uid)
                    continue
                new = _apply_flag_op(meta.flags, op, flags)
                if new == meta.flags:
                    unchanged.append(meta)
                    continue
                updated.append(
                    MessageMeta(
                        meta.uid, ModSeq(modseq), new, meta.size, meta.internaldate, meta.blob_id, meta.savedate
                    )
                )
            if updated:
                await conn.executemany(
                    "UPDATE message SET flags = $1, seen = $2, deleted = $3, modseq = $4"
                    " WHERE mailbox_id = $5 AND uid = $6",
                    [
                        (sorted(m.flags), "\\Seen" in m.flags, "\\Deleted" in m.flags, modseq, mailbox_id, m.uid)
                        for m in updated
                    ],
                )
                await conn.execute("UPDATE mailbox SET highestmodseq = $1 WHERE id = $2", modseq, mailbox_id)
                tx.changes.append(
                    Change(account_id, ChangeKind.FLAGS, mailbox_id, ModSeq(modseq), tuple(m.uid for m in updated))
                )
            return StoreFlagsResult(tuple(updated), tuple(unchanged), tuple(modified))

        return await self._write(fn)

    async def expunge(
        self, account_id: AccountId, mailbox_id: MailboxId, uids: Sequence[Uid] | None = None
    ) -> list[Uid]:
        async def fn(conn: Conn, tx: _Tx) -> list[Uid]:
            await self._lock_accounts(conn, tx, [account_id])
            await self._mailbox_row(conn, account_id, mailbox_id, lock=True)
            if uids is None:
                rows = await conn.fetch(
                    "SELECT uid, blob_id, size FROM message WHERE mailbox_id = $1 AND deleted", mailbox_id
                )
            else:
                rows = await self._select_uids(conn, mailbox_id, uids, "uid, blob_id, size", "AND deleted")
            return await self._remove_messages(conn, tx, account_id, mailbox_id, rows)

        return await self._write(fn)

    async def delete_messages(self, account_id: AccountId, mailbox_id: MailboxId, uids: Sequence[Uid]) -> list[Uid]:
        async def fn(conn: Conn, tx: _Tx) -> list[Uid]:
            await self._lock_accounts(conn, tx, [account_id])
            await self._mailbox_row(conn, account_id, mailbox_id, lock=True)
            rows = await self._select_uids(conn, mailbox_id, uids, "uid, blob_id, size")
            return await self._remove_messages(conn, tx, account_id, mailbox_id, rows)

        return await self._write(fn)

    async def _copy_tx(
        self,
        conn: Conn,
        tx: _Tx,
        account_id: AccountId,
        source_id: MailboxId,
        uids: Sequence[Uid],
        dest_id: MailboxId,
        move: bool,
    ) -> CopyResult:
        await self._lock_accounts(conn, tx, [account_id])
        boxes = {}
        for mid in sorted({int(source_id), int(dest_id)}):  # ascending: a fixed lock order
            boxes[mid] = await self._mailbox_row(conn, account_id, MailboxId(mid), lock=True)
        dest = boxes[int(dest_id)]
        rows = await self._select_uids(conn, source_id, uids, _MESSAGE_COLS)
        if not rows:
            return CopyResult(UidValidity(int(dest["uidvalidity"])), (), ())
        entries = [
            (_Blob(r["blob_id"], r["size"], None, None), frozenset(r["flags"]), r["internaldate"], None) for r in rows
        ]
        # A move within the account leaves usage unchanged; a copy counts every copy (as
        # Dovecot's quota does), and is refused as a whole when it does not fit.
        uv, new_uids, _ = await self._insert_messages(
            conn, tx, account_id, dest_id, entries, check_quota=not move, count_usage=not move
        )
        if move:
            await self._remove_messages(conn, tx, account_id, source_id, rows, count_usage=False)
        return CopyResult(uv, tuple(Uid(int(r["uid"])) for r in rows), tuple(new_uids))

    async def copy_messages(
        self, account_id: AccountId, source_id: MailboxId, uids: Sequence[Uid], dest_id: MailboxId
    ) -> CopyResult:
        return await self._write(lambda c, tx: self._copy_tx(c, tx, account_id, source_id, uids, dest_id, False))

    async def move_messages(
        self, account_id: AccountId, source_id: MailboxId, uids: Sequence[Uid], dest_id: MailboxId
    ) -> CopyResult:
        """RFC 6851 §3.3: new UIDs in the destination, then an expunge of the source messages,
        all in one transaction."""
        return await self._write(lambda c, tx: self._copy_tx(c, tx, account_id, source_id, uids, dest_id, True))

    async def read_message(self, account_id: AccountId, mailbox_id: MailboxId, uid: Uid) -> bytes:
        async def fn(conn: Conn) -> bytes:
            blob_id = await conn.fetchval(
                "SELECT m.blob_id FROM message m JOIN mailbox b ON b.id = m.mailbox_id"
                " WHERE m.mailbox_id = $1 AND m.uid = $2 AND b.account_id = $3",
                mailbox_id,
                uid,
                account_id,
            )
            if blob_id is None:
                raise NotFound("no such message")
            return await self._read_chunks(conn, blob_id)

        return await self._read(fn, snapshot=True)

    @staticmethod
    async def _read_chunks(conn: Conn, blob_id: str) -> bytes:
        size = await conn.fetchval("SELECT size FROM blob WHERE id = $1", blob_id)
        if size is None:
            raise NotFound("no such message data")
        out = bytearray()
        for r in await conn.fetch("SELECT data FROM blob_chunk WHERE blob_id = $1 ORDER BY seq", blob_id):
            out += r["data"]
        if len(out) != size:
            raise StoreError(f"blob {blob_id}: {len(out)} bytes stored, {size} expected")
        return bytes(out)

    async def open_blob(self, blob_id: BlobId) -> _ChunkBlobReader:
        cols = "size, wire" if self.schema_version >= 3 else "size, NULL::integer AS wire"
        r = await self._fetchrow(f"SELECT {cols} FROM blob WHERE id = $1", blob_id)
        if r is None:
            raise NotFound("no such message data")
        return _ChunkBlobReader(self, blob_id, int(r["size"]), r["wire"])

    async def read_blob(self, blob_id: BlobId) -> bytes:
        return await self._read(lambda c: self._read_chunks(c, blob_id), snapshot=True)

    # ------------------------------------------------------------------ full-text index, sort keys
    async def search_index(
        self, account_id: AccountId, mailbox_id: MailboxId, terms: Sequence[tuple[str, str]]
    ) -> SearchHits | None:
        usable = [(f, n) for f, n in terms if indexable(n)]
        if self.schema_version < 4 or not usable:
            return None
        conds: list[str] = []
        params: list[Any] = [mailbox_id]
        for f, n in usable:
            params.append("%" + n.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
            cols = _PG_INDEX_COLUMNS[f]
            conds.append("(" + " OR ".join(f"k.{c} LIKE ${len(params)}" for c in cols) + ")")
        sql = ("SELECT m.uid FROM message m JOIN blob_index k ON k.blob_id = m.blob_id"
               " WHERE m.mailbox_id = $1 AND " + " AND ".join(conds))

        async def fn(conn: Conn) -> SearchHits:
            await self._mailbox_row(conn, account_id, mailbox_id)
            hits = frozenset(Uid(r[0]) for r in await conn.fetch(sql, *params))
            rest = frozenset(Uid(r[0]) for r in await conn.fetch(
                "SELECT m.uid FROM blob b JOIN message m ON m.blob_id = b.id"
                " WHERE b.fts IS NOT TRUE AND m.mailbox_id = $1", mailbox_id))
            return SearchHits(hits, rest)

        return await self._read(fn, snapshot=True)

    async def sort_rows(self, account_id: AccountId, mailbox_id: MailboxId) -> list[tuple[Uid, SortRow]] | None:
        if self.schema_version < 4:
            return None

        async def fn(conn: Conn) -> list[tuple[Uid, SortRow]]:
            await self._mailbox_row(conn, account_id, mailbox_id)
            rows = await conn.fetch(
                "SELECT m.uid, k.date, k.from_addr, k.to_addr, k.cc_addr, k.subject, k.display_from,"
                " k.display_to, k.message_id, k.refs, k.reply FROM message m JOIN blob_index k"
                " ON k.blob_id = m.blob_id WHERE m.mailbox_id = $1", mailbox_id)
            return [(Uid(r[0]), SortRow._make(tuple(r)[1:])) for r in rows]

        return await self._read(fn, snapshot=True)

    async def sort_column(self, account_id: AccountId, mailbox_id: MailboxId, field: str) -> dict[Uid, object] | None:
        column = SORT_COLUMNS[field]
        if self.schema_version < 4:
            return None

        async def fn(conn: Conn) -> dict[Uid, object]:
            await self._mailbox_row(conn, account_id, mailbox_id)
            rows = await conn.fetch(
                f"SELECT m.uid, k.{column} FROM message m JOIN blob_index k ON k.blob_id = m.blob_id"
                " WHERE m.mailbox_id = $1", mailbox_id)
            return {Uid(r[0]): r[1] for r in rows}

        return await self._read(fn, snapshot=True)

    async def message_info(self, blob_id: BlobId) -> bytes:
        r = await self._fetchrow("SELECT info FROM blob WHERE id = $1", blob_id)
        if r is None:
            raise NotFound("no such message data")
        if r["info"] is not None:
            return bytes(r["info"])
        data = await self.read_blob(blob_id)
        parsed = await asyncio.to_thread(_parse_info, data)
        if parsed is None:
            raise StoreError("the message could not be parsed")
        return parsed

    # -------------------------------------------------------------------------------- change feed
    def subscribe(self, account_id: AccountId) -> _Subscription:
        sub = _Subscription(account_id, self._unsubscribe)
        self._subs.setdefault(account_id, set()).add(sub)
        return sub

    def _unsubscribe(self, sub: _Subscription) -> None:
        subs = self._subs.get(sub.account_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.account_id]

    # -------------------------------------------------------------------------------- maildrop lock
    def lock_maildrop(self, account_id: AccountId) -> _MaildropLock:
        return _MaildropLock(self, account_id)

    async def live_nodes(self) -> int:
        """How many other nodes have this database open right now (their liveness locks)."""
        n = await self._read(
            lambda c: c.fetchval(
                "SELECT count(*) FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted"
                f" AND l.classid = {self._ns_node}::oid AND l.objsubid = 2 AND l.objid <> $1::bigint::oid"
                " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                self.node_id,
            )
        )
        return int(n)

    # ----------------------------------------------------------------------------- one node only
    @contextlib.asynccontextmanager
    async def singleton(self, job: str) -> Any:
        """``async with store.singleton("backup") as mine:`` — ``mine`` is True in exactly one
        node at a time (a session-level advisory lock on the control connection, so a dead node
        frees it). Not part of the Store protocol: for scheduled jobs such as the daily backup."""
        key = _int4(zlib.crc32(job.encode()))
        mine = bool(await self._control_fetchval("SELECT pg_try_advisory_lock($1::int4, $2::int4)", self._ns_job, key))
        try:
            yield mine
        finally:
            if mine:
                with contextlib.suppress(StoreError):
                    await self._control_fetchval("SELECT pg_advisory_unlock($1::int4, $2::int4)", self._ns_job, key)

    # ------------------------------------------------------------------------------------- queue
    @staticmethod
    async def _queue_items(conn: Conn, rows: Sequence[Row]) -> list[QueueItem]:
        if not rows:
            return []
        rc: dict[int, list[QueueRecipient]] = {}
        for x in await conn.fetch(
            "SELECT * FROM queue_recipient WHERE queue_id = ANY($1::bigint[]) ORDER BY queue_id, idx",
            [r["id"] for r in rows],
        ):
            rc.setdefault(int(x["queue_id"]), []).append(
                QueueRecipient(
                    address=x["address"],
                    state=RecipientState(x["state"]),
                    attempts=x["attempts"],
                    last_error=x["last_error"],
                    notify=x["notify"],
                    orcpt=x["orcpt"],
                )
            )
        items: list[QueueItem] = []
        for r in rows:
            try:
                extra = {str(k): str(v) for k, v in json.loads(r["extra"] or "{}").items()}
            except (ValueError, AttributeError):
                extra = {}
            items.append(
                QueueItem(
                    id=QueueId(r["id"]),
                    sender=r["sender"],
                    recipients=tuple(rc.get(int(r["id"]), ())),
                    blob_id=BlobId(r["blob_id"]),
                    size=r["size"],
                    created=r["created"],
                    next_attempt=r["next_attempt"],
                    attempts=r["attempts"],
                    last_error=r["last_error"],
                    ret=r["ret"],
                    envid=r["envid"],
                    requiretls=bool(r["requiretls"]),
                    smtputf8=bool(r["smtputf8"]),
                    delay_warned=bool(r["delay_warned"]),
                    extra=extra,
                )
            )
        return items

    async def queue_add(
        self,
        sender: str,
        recipients: Sequence[QueueRecipient],
        data: bytes,
        *,
        ret: str | None = None,
        envid: str | None = None,
        requiretls: bool = False,
        smtputf8: bool = False,
    ) -> QueueItem:
        if not recipients:
            raise NotPermitted("a queue item needs at least one recipient")
        self._check_open()
        (blob,) = await self._prepare_blobs([bytes(data)])
        now = _now()

        async def fn(conn: Conn, tx: _Tx) -> int:
            await self._incref(conn, [blob])
            qid: int = await conn.fetchval(
                "INSERT INTO queue (sender, blob_id, size, created, next_attempt, ret, envid, requiretls, smtputf8)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
                sender,
                blob.id,
                blob.size,
                now,
                now,
                ret,
                envid,
                requiretls,
                smtputf8,
            )
            await conn.executemany(
                "INSERT INTO queue_recipient (queue_id, idx, address, state, attempts, last_error, notify, orcpt)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                [
                    (qid, i, r.address, r.state.value, r.attempts, r.last_error, r.notify, r.orcpt)
                    for i, r in enumerate(recipients)
                ],
            )
            return qid

        qid = await self._write(fn)
        item = await self.queue_get(QueueId(qid))
        if item is None:
            raise NotFound("the queue item went away meanwhile")
        return item

    async def queue_due(self, now: datetime, limit: int = 100) -> list[QueueItem]:
        """Claims due items for this node: rows another node is claiming right now are skipped
        (FOR UPDATE SKIP LOCKED), and so are rows claimed before by a live node whose lease runs."""
        if limit <= 0:
            return []
        node_alive = (
            "EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted"
            f" AND l.classid = {self._ns_node}::oid AND l.objid = q.claimed_by::oid AND l.objsubid = 2"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))"
        )

        async def fn(conn: Conn, tx: _Tx) -> list[QueueItem]:
            rows = await conn.fetch(
                "WITH due AS (SELECT q.id FROM queue q WHERE q.next_attempt <= $1"
                " AND EXISTS (SELECT 1 FROM queue_recipient r WHERE r.queue_id = q.id AND r.state = 'pending')"
                f" AND (q.claimed_by IS NULL OR q.claimed_until < clock_timestamp() OR NOT {node_alive})"
                " ORDER BY q.next_attempt, q.id LIMIT $2 FOR UPDATE OF q SKIP LOCKED)"
                " UPDATE queue SET claimed_by = $3, claimed_until = clock_timestamp() + make_interval(secs => $4)"
                " FROM due WHERE queue.id = due.id RETURNING queue.*",
                _aware(now),
                limit,
                self.node_id,
                float(QUEUE_CLAIM_SECONDS),
            )
            rows = sorted(rows, key=lambda r: (r["next_attempt"], r["id"]))
            return await self._queue_items(conn, rows)

        return await self._write(fn)

    async def queue_get(self, queue_id: QueueId) -> QueueItem | None:
        async def fn(conn: Conn) -> QueueItem | None:
            items = await self._queue_items(conn, await conn.fetch("SELECT * FROM queue WHERE id = $1", queue_id))
            return items[0] if items else None

        return await self._read(fn, snapshot=True)

    async def queue_list(self) -> list[QueueItem]:
        async def fn(conn: Conn) -> list[QueueItem]:
            return await self._queue_items(conn, await conn.fetch("SELECT * FROM queue ORDER BY id"))

        return await self._read(fn, snapshot=True)

    @staticmethod
    async def _queue_remove_tx(conn: Conn, queue_id: int) -> None:
        blob_id = await conn.fetchval("DELETE FROM queue WHERE id = $1 RETURNING blob_id", queue_id)
        if blob_id is None:
            raise NotFound(f"no queue item {queue_id}")
        await PostgresStore._decref(conn, Counter({str(blob_id): 1}))  # recipients cascade

    async def queue_update(
        self,
        queue_id: QueueId,
        recipients: Sequence[QueueRecipient],
        next_attempt: datetime,
        last_error: str | None,
        delay_warned: bool | None = None,
    ) -> None:
        async def fn(conn: Conn, tx: _Tx) -> None:
            if await conn.fetchval("SELECT 1 FROM queue WHERE id = $1 FOR UPDATE", queue_id) is None:
                raise NotFound(f"no queue item {queue_id}")
            if recipients:
                await conn.executemany(
                    "UPDATE queue_recipient SET state = $1, attempts = $2, last_error = $3, notify = $4, orcpt = $5"
                    " WHERE queue_id = $6 AND address = $7",
                    [
                        (rc.state.value, rc.attempts, rc.last_error, rc.notify, rc.orcpt, queue_id, rc.address)
                        for rc in recipients
                    ],
                )
            await conn.execute(
                "UPDATE queue SET attempts = attempts + 1, next_attempt = $1, last_error = $2,"
                " delay_warned = coalesce($3, delay_warned), claimed_by = NULL, claimed_until = NULL WHERE id = $4",
                _aware(next_attempt),
                last_error,
                delay_warned,
                queue_id,
            )
            pending = await conn.fetchval(
                "SELECT 1 FROM queue_recipient WHERE queue_id = $1 AND state = 'pending' LIMIT 1", queue_id
            )
            if pending is None:
                await self._queue_remove_tx(conn, queue_id)

        await self._write(fn)

    async def queue_retry(self, queue_id: QueueId | None = None) -> int:
        now = _now()

        async def fn(conn: Conn, tx: _Tx) -> int:
            if queue_id is None:
                status = await conn.execute("UPDATE queue SET next_attempt = $1", now)
            else:
                status = await conn.execute("UPDATE queue SET next_attempt = $1 WHERE id = $2", now, queue_id)
            return int(str(status).rsplit(" ", 1)[-1])

        return await self._write(fn)

    async def queue_delete(self, queue_id: QueueId) -> None:
        async def fn(conn: Conn, tx: _Tx) -> None:
            await self._queue_remove_tx(conn, queue_id)

        await self._write(fn)

    # --------------------------------------------------------------------- IMAP METADATA (RFC 5464)
    async def get_metadata(self, account_id: AccountId, mailbox_id: MailboxId | None) -> dict[str, bytes]:
        async def fn(conn: Conn) -> dict[str, bytes]:
            if mailbox_id is not None:
                await self._mailbox_row(conn, account_id, mailbox_id)
            rows = await conn.fetch(
                "SELECT name, value FROM metadata WHERE account_id = $1 AND mailbox_id = $2"
                " ORDER BY name COLLATE \"C\"",
                account_id,
                mailbox_id or 0,
            )
            return {str(r["name"]): bytes(r["value"]) for r in rows}

        return await self._read(fn, snapshot=True)

    async def set_metadata(
        self,
        account_id: AccountId,
        mailbox_id: MailboxId | None,
        entries: Mapping[str, bytes | None],
        *,
        max_mailbox_entries: int,
        max_account_entries: int,
    ) -> None:
        items = [(k.lower(), v) for k, v in entries.items()]
        mid = mailbox_id or 0

        async def fn(conn: Conn, tx: _Tx) -> None:
            # The account row lock serialises metadata writers of the account (the counts below).
            if not await self._lock_accounts(conn, tx, [account_id]):
                raise NotFound("no such account")
            if mailbox_id is not None:
                await self._mailbox_row(conn, account_id, mailbox_id, lock=True)
            added = 0
            for name, value in items:
                if value is None:
                    r = await conn.fetchval(
                        "DELETE FROM metadata WHERE account_id = $1 AND mailbox_id = $2 AND name = $3 RETURNING 1",
                        account_id,
                        mid,
                        name,
                    )
                    added -= r is not None
                else:
                    fresh = await conn.fetchval(
                        "INSERT INTO metadata (account_id, mailbox_id, name, value) VALUES ($1, $2, $3, $4)"
                        " ON CONFLICT (account_id, mailbox_id, name) DO UPDATE SET value = EXCLUDED.value"
                        " RETURNING (xmax = 0)",
                        account_id,
                        mid,
                        name,
                        value,
                    )
                    added += bool(fresh)
            if added > 0:
                n_box = await conn.fetchval(
                    "SELECT count(*) FROM metadata WHERE account_id = $1 AND mailbox_id = $2", account_id, mid
                )
                n_all = await conn.fetchval("SELECT count(*) FROM metadata WHERE account_id = $1", account_id)
                if n_box > max_mailbox_entries or n_all > max_account_entries:
                    raise TooManyEntries("too many metadata entries")  # the transaction rolls back

        await self._write(fn)

    # ------------------------------------------------------------ expunge history (RFC 7162 §3.2.5.2)
    async def expunge_history_floor(self, account_id: AccountId, mailbox_id: MailboxId) -> ModSeq:
        v = await self._read(
            lambda c: c.fetchval(
                "SELECT f.modseq FROM expunge_floor f JOIN mailbox m ON m.id = f.mailbox_id"
                " WHERE f.mailbox_id = $1 AND m.account_id = $2",
                mailbox_id,
                account_id,
            )
        )
        return ModSeq(int(v) if v is not None else 0)

    async def trim_expunge_history(self, keep: timedelta, mark_every: timedelta, *, chunk: int = 500) -> int:
        now = datetime.now(UTC)
        cutoff = now - keep

        async def fn(conn: Conn, tx: _Tx, after: int) -> tuple[int | None, int]:
            ids = [int(r["id"]) for r in await conn.fetch(
                "SELECT id FROM mailbox WHERE id > $1 ORDER BY id LIMIT $2", after, max(1, chunk))]
            if not ids:
                return None, 0
            lo, hi = ids[0], ids[-1]
            gone = 0
            for r in await conn.fetch(
                "SELECT mailbox_id, max(modseq) AS ms FROM expunge_mark WHERE marked <= $1"
                " AND mailbox_id BETWEEN $2 AND $3 GROUP BY mailbox_id ORDER BY mailbox_id",
                cutoff,
                lo,
                hi,
            ):
                mid, ms = int(r["mailbox_id"]), int(r["ms"])
                await conn.execute("DELETE FROM expunge_mark WHERE mailbox_id = $1 AND modseq <= $2", mid, ms)
                # The floor is the highest modseq really dropped: above it the history is whole.
                d = await conn.fetchrow(
                    "WITH d AS (DELETE FROM expunged WHERE mailbox_id = $1 AND modseq <= $2 RETURNING modseq)"
                    " SELECT count(*) AS n, max(modseq) AS top FROM d",
                    mid,
                    ms,
                )
                if d is None or d["top"] is None:
                    continue
                gone += int(d["n"])
                await conn.execute(
                    "INSERT INTO expunge_floor (mailbox_id, modseq) VALUES ($1, $2) ON CONFLICT (mailbox_id)"
                    " DO UPDATE SET modseq = greatest(expunge_floor.modseq, EXCLUDED.modseq)",
                    mid,
                    int(d["top"]),
                )
            await conn.execute(
                "INSERT INTO expunge_mark (mailbox_id, modseq, marked)"
                " SELECT m.id, m.highestmodseq, $1 FROM mailbox m"
                " WHERE m.id BETWEEN $3 AND $4"
                "   AND m.highestmodseq > coalesce((SELECT max(modseq) FROM expunge_mark k WHERE k.mailbox_id = m.id),"
                "                                  (SELECT modseq FROM expunge_floor f WHERE f.mailbox_id = m.id), 0)"
                "   AND coalesce((SELECT max(marked) FROM expunge_mark k WHERE k.mailbox_id = m.id),"
                "                 'epoch'::timestamptz) <= $2"
                " ON CONFLICT DO NOTHING",
                now,
                now - mark_every,
                lo,
                hi,
            )
            return hi, gone

        return await in_mailbox_chunks(lambda after: self._write(functools.partial(fn, after=after)))

    # ------------------------------------------------------------------------------- maintenance
    async def check(self) -> list[Problem]:
        """One REPEATABLE READ snapshot: every blob's chunks re-hashed (streamed with a cursor),
        refcounts, usage counters, uidnext and highestmodseq."""

        async def fn(conn: Conn) -> list[Problem]:
            problems: list[Problem] = []
            blobs = {
                str(r["id"]): (int(r["size"]), int(r["refcount"]))
                for r in await conn.fetch("SELECT id, size, refcount FROM blob")
            }
            refs: Counter[str] = Counter()
            for r in await conn.fetch(
                "SELECT blob_id, count(*) AS n FROM message GROUP BY blob_id"
                " UNION ALL SELECT blob_id, count(*) FROM queue GROUP BY blob_id"
            ):
                refs[str(r["blob_id"])] += int(r["n"])
            for blob_id, n in sorted(refs.items()):
                if blob_id not in blobs:
                    problems.append(Problem("missing-blob", f"{n} references to blob {blob_id} without a row"))
            for blob_id, (_size, refcount) in sorted(blobs.items()):
                if refcount != refs.get(blob_id, 0):
                    problems.append(
                        Problem("refcount", f"blob {blob_id}: refcount {refcount}, references {refs.get(blob_id, 0)}")
                    )
            seen: set[str] = set()
            cur_id: str | None = None
            h = hashlib.sha256()
            n = 0
            expect_seq = 0

            def finish() -> None:
                if cur_id is None:
                    return
                seen.add(cur_id)
                if cur_id not in blobs:
                    problems.append(Problem("orphan-blob", f"chunks of {cur_id} have no blob row"))
                    return
                if h.hexdigest() != cur_id:
                    problems.append(Problem("bad-hash", f"blob {cur_id}: stored content has sha256 {h.hexdigest()}"))
                if n != blobs[cur_id][0]:
                    problems.append(
                        Problem("bad-size", f"blob {cur_id}: row says {blobs[cur_id][0]} bytes, chunks {n}")
                    )

            async for r in conn.cursor("SELECT blob_id, seq, data FROM blob_chunk ORDER BY blob_id, seq", prefetch=8):
                if r["blob_id"] != cur_id:
                    finish()
                    cur_id, h, n, expect_seq = r["blob_id"], hashlib.sha256(), 0, 0
                if r["seq"] != expect_seq:
                    problems.append(Problem("missing-chunk", f"blob {cur_id}: chunk {expect_seq} missing"))
                expect_seq = r["seq"] + 1
                h.update(r["data"])
                n += len(r["data"])
            finish()
            empty = hashlib.sha256(b"").hexdigest()
            for blob_id, (size, _) in sorted(blobs.items()):
                if blob_id not in seen and not (size == 0 and blob_id == empty):
                    problems.append(Problem("missing-blob", f"blob {blob_id}: no stored content"))
            for r in await conn.fetch(
                "SELECT a.address, a.used_bytes, a.used_messages, coalesce(u.b, 0) AS b, coalesce(u.n, 0) AS n"
                " FROM account a LEFT JOIN (SELECT b.account_id, sum(m.size) AS b, count(*) AS n FROM message m"
                " JOIN mailbox b ON b.id = m.mailbox_id GROUP BY b.account_id) u ON u.account_id = a.id"
            ):
                if (r["used_bytes"], r["used_messages"]) != (r["b"], r["n"]):
                    problems.append(
                        Problem(
                            "counter",
                            f"account {r['address']}: usage says {r['used_bytes']} bytes/{r['used_messages']}"
                            f" messages, recount {r['b']}/{r['n']}",
                        )
                    )
            for r in await conn.fetch(
                "SELECT b.id, b.name, b.uidnext, b.highestmodseq,"
                " greatest(coalesce((SELECT max(uid) FROM message WHERE mailbox_id = b.id), 0),"
                "     coalesce((SELECT max(uid) FROM expunged WHERE mailbox_id = b.id), 0)) AS maxuid,"
                " greatest(coalesce((SELECT max(modseq) FROM message WHERE mailbox_id = b.id), 0),"
                "     coalesce((SELECT max(modseq) FROM expunged WHERE mailbox_id = b.id), 0)) AS maxmodseq"
                " FROM mailbox b"
            ):
                if r["uidnext"] <= r["maxuid"]:
                    problems.append(
                        Problem("uidnext", f"mailbox {r['id']} {r['name']!r}: uidnext {r['uidnext']} <= {r['maxuid']}")
                    )
                if r["highestmodseq"] < r["maxmodseq"]:
                    problems.append(
                        Problem(
                            "modseq",
                            f"mailbox {r['id']} {r['name']!r}: highestmodseq {r['highestmodseq']} < {r['maxmodseq']}",
                        )
                    )
            return problems

        return await self._read(fn, snapshot=True)

    async def recount_usage(self, account_id: AccountId) -> tuple[int, int]:
        async def fn(conn: Conn, tx: _Tx) -> tuple[int, int]:
            if not await self._lock_accounts(conn, tx, [account_id]):
                raise NotFound("no such account")
            r = await conn.fetchrow(
                "SELECT coalesce(sum(m.size), 0) AS b, count(*) AS n FROM message m"
                " JOIN mailbox b ON b.id = m.mailbox_id WHERE b.account_id = $1",
                account_id,
            )
            await conn.execute(
                "UPDATE account SET used_bytes = $1, used_messages = $2 WHERE id = $3", r["b"], r["n"], account_id
            )
            return int(r["b"]), int(r["n"])

        return await self._write(fn)


__all__ = ["CHUNK_BYTES", "PgMigration", "PostgresStore", "load_migrations", "normalize_flags"]
