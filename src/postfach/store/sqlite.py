"""The embedded store: SQLite (WAL) for metadata, content-addressed files for message bytes.

Threads (the Datasette pattern):

* one **writer thread** owns the write connection. Write requests queue up; the writer takes as
  many as are waiting (up to ``group_commit_max``), runs them in one ``BEGIN IMMEDIATE``
  transaction, commits once with ``synchronous=FULL`` and then resolves every request's future on
  the event loop (one wake-up of the loop per batch). When a batch of message writes finds the
  queue empty while ingest threads are still busy, it waits up to ``commit_delay`` (2 ms) for them
  (PostgreSQL's commit_delay), so that one commit and one blob barrier serve them all. A run of
  plain appends (``append``/``append_many``, ``deliver`` to one target) is merged into one set of
  statements (one UPDATE per mailbox for UIDs and modseqs, one per account for usage, one INSERT
  each for blob and message rows) with the same per-request results, quotas and change events.
* a few **ingest threads** that hash, write (blobs.py) and parse each new message
  (``postfach.mail.parse_message``, cached as JSON in the ``blob`` row, with the ``wire`` bits
  POP3 uses to skip its scans) and hand the write straight to the writer queue: one hop per
  message, no round trip through the event loop between the blob and the metadata.
* a small pool of **reader threads**, each with its own connection; WAL gives every read a
  consistent snapshot, and since a write is acknowledged only after its commit, a caller always
  reads its own writes. Lookups of one row by key (account, alias, mailbox, blob info) run on the
  event loop's own read-only connection instead: ~20 µs, less than the hop to a thread.
* a pool of **blob threads** that read message files.

Message bytes: up to ``inline_max`` (64 KiB) in ``inline.sqlite3`` (a database of its own, so
that the metadata stays small for backups); bigger ones as files (blobs.py). See
docs/architecture.md, "Message bytes in the embedded store".

Durability (ARCHITECTURE.md invariant 1), in the writer, per batch: first the batch's small
messages, committed to inline.sqlite3 (``_commit_inline``, one fsync); if any request wrote a blob
file, the blob barrier (one ``syncfs(2)`` covering every file and folder written so far — see
blobs.py; on platforms without it each ingest thread fsyncs its file and folder instead); then
``BEGIN IMMEDIATE`` ... ``COMMIT`` with ``synchronous=FULL``; only then are the callers answered.

Full-text rows of new blobs are not part of those commits: the writer keeps them
(``_index_pending``) and adds them in a transaction of their own once ``background_max`` have
gathered, after ``background_idle`` without writes, or at close (``_flush_background``). The batch
first runs without savepoints; if a request fails it is rolled back and run again with a
SAVEPOINT per request, so one failure never fails its neighbours.

Checkpoints (WAL -> database file): a **checkpointer thread** with its own connection runs a
PASSIVE checkpoint shortly after commits (``checkpoint_interval``), so that the copying happens
outside the writer's commit path. The writer keeps SQLite's automatic checkpoint (every
``wal_autocheckpoint_pages``): under a steady stream of commits only the writer itself can
restart the WAL from its beginning (a restart needs a moment when every frame is copied and
the writer begins its next transaction; without it the WAL file grew to ~40 MB in the soak),
and it now finds little left to copy. ``journal_size_limit`` shrinks the WAL file back after a
spike (a long-running reader that held the checkpoints back).

Files of blobs whose refcount drops to 0 are removed after the commit. A crash between a blob
file's rename and the commit leaves an unreferenced file; the next open that finds the "dirty"
marker of an unclean shutdown removes such files (see ``_recover``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import queue
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

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
from postfach.store.blobs import FileBlobStore, fsync_dir, os_error, sha256_hex, wire_flags
from postfach.store.common import INDEX_FIELDS, SORT_COLUMNS, fts_query, in_mailbox_chunks, normalize_flags
from postfach.store.common import Subscription as _Subscription
from postfach.store.common import apply_flag_op as _apply_flag_op
from postfach.store.common import norm_address as _norm_address
from postfach.store.common import norm_mailbox_name as _norm_mailbox_name
from postfach.store.common import parse_for_ingest as _parse_for_ingest
from postfach.store.common import parse_info as _parse_info
from postfach.types import AccountId, BlobId, MailboxId, ModSeq, QueueId, Uid, UidValidity

log = logging.getLogger("postfach.store")

T = TypeVar("T")

MAX_UID = 0xFFFFFFFF  # RFC 9051 §2.3.1.1: nz-number, 32 bits
QUEUE_CLAIM_SECONDS = 3600.0  # a claimed queue item returns to the pool if its worker went silent
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIGRATION_RE = re.compile(r"^(\d{4})_[A-Za-z0-9_]+\.sql$")


# ------------------------------------------------------------------------------------- migrations


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(folder: Path | None = None) -> list[Migration]:
    """The numbered ``NNNN_name.sql`` files, in order; versions must run 1, 2, 3 ... without gaps."""
    folder = folder or Path(__file__).parent / "migrations"
    found: list[Migration] = []
    for p in sorted(folder.iterdir()):
        m = _MIGRATION_RE.match(p.name)
        if m:
            found.append(Migration(int(m.group(1)), p.stem, p.read_text("utf-8")))
    for i, mig in enumerate(found, start=1):
        if mig.version != i:
            raise StoreError(f"migration {mig.name}: expected version {i} (no gaps allowed)")
    return found


def _statements(sql: str) -> Iterable[str]:
    buf: list[str] = []
    for line in sql.splitlines(keepends=True):
        buf.append(line)
        text = "".join(buf)
        if sqlite3.complete_statement(text):
            if text.strip() and not all(ln.strip().startswith("--") or not ln.strip() for ln in text.splitlines()):
                yield text
            buf = []
    rest = "".join(buf)
    if any(ln.strip() and not ln.strip().startswith("--") for ln in rest.splitlines()):
        raise StoreError("migration ends with an incomplete SQL statement")


def _apply_migrations(conn: sqlite3.Connection, migrations: Sequence[Migration], where: Path) -> int:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
        " applied INTEGER NOT NULL)"
    )
    known = len(migrations)
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
            current = int(row[0])
            if current > known:
                raise StoreError(
                    f"{where}: the data was written by a newer postfach (schema version {current}, "
                    f"this program knows up to {known}); refusing to open it - upgrade postfach"
                )
            if current == known:
                conn.execute("COMMIT")
                return current
            mig = migrations[current]
            log.info("store %s: applying migration %s", where, mig.name)
            for stmt in _statements(mig.sql):
                conn.execute(stmt)
            conn.execute(
                "INSERT INTO schema_version (version, name, applied) VALUES (?, ?, ?)",
                (mig.version, mig.name, _now_us()),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


# ----------------------------------------------------------------------------------------- helpers


def _now_us() -> int:
    return time.time_ns() // 1000


def _to_us(dt: datetime) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // timedelta(microseconds=1)


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _flags_text(flags: frozenset[str]) -> str:
    return " ".join(sorted(flags))


def _flags_from(text: str) -> frozenset[str]:
    return frozenset(text.split()) if text else frozenset()


_LOOP_READ_ROWS = 256  # at most this many rows per statement for a read on the event loop


class _TooManyRows(Exception):
    """A read on the event loop found more than _LOOP_READ_ROWS rows (see _snapshot_read)."""


def _capped(cur: sqlite3.Cursor, cap: int) -> list[Any]:
    rows = cur.fetchmany(cap + 1)
    if len(rows) > cap:
        cur.close()
        raise _TooManyRows()
    return rows


def _translate(exc: BaseException) -> BaseException:
    """Never let a raw sqlite3/OSError reach a caller."""
    if isinstance(exc, PostfachError):
        return exc
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        if primary in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
            return StorageFull(f"database: {exc}")
        if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return StoreUnavailable(f"database busy: {exc}")
        return StoreError(f"database error: {exc}")
    if isinstance(exc, OSError):
        return os_error(exc, "store")
    return exc


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _abandoned(tx: _Tx) -> None:
    raise StoreError("abandoned: the caller went away before the write")


def _gc_only(tx: _Tx) -> None:
    raise StoreError("no-op: only removes deferred blob files")


def _connect(path: Path, inline: Path | None = None) -> sqlite3.Connection:
    """A connection with our settings; ``inline``: the store's inline.sqlite3, attached as ``inl``
    (reader connections, so that one SELECT can join a blob row with its bytes)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA busy_timeout = 30000")
    if inline is not None:
        conn.execute("ATTACH DATABASE ? AS inl", (str(inline),))
    return conn


# ------------------------------------------------------------------------------ internal records


_KEY_INSERT = (
    "INSERT INTO blob_key (blob_id, date, from_addr, to_addr, cc_addr, subject, display_from, display_to,"
    " message_id, refs, reply) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(blob_id) DO NOTHING"
)
_TEXT_INSERT = (
    "INSERT INTO blob_text (id, subject, sender, rcpt_to, cc, bcc, header, body, names)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_FTS_INSERT = (
    "INSERT INTO blob_fts (rowid, subject, sender, rcpt_to, cc, bcc, header, body, names)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _blob_row(b: _Blob, index_now: bool = True) -> tuple[str, int, bytes | None, int | None, int | None]:
    """Parameters of the blob INSERT: fts is 1 when the index rows come along, else NULL (a
    blob ingested without a parse, or whose index rows the writer adds later, is indexed by the
    writer's background flush or the backfill)."""
    return (b.id, b.size, b.info, b.wire, 1 if index_now and b.index is not None else None)


#: The bytes of small messages (see "Message bytes" in docs/architecture.md): a database of its own
#: beside meta.sqlite3, so that the metadata (which backups copy whole, every day) stays small.
INLINE_DB = "inline.sqlite3"
_INLINE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS blob_inline ("
    " seq INTEGER PRIMARY KEY,"
    " id TEXT NOT NULL UNIQUE,"  # blob.id in meta.sqlite3: the sha256 of data
    " data BLOB NOT NULL)"
)
_INLINE_INSERT = "INSERT INTO blob_inline (id, data) VALUES (?, ?) ON CONFLICT(id) DO NOTHING"


def _backfill_write(blobs: Sequence[_Blob], failed: Sequence[str]) -> Callable[[_Tx], None]:
    def fn(tx: _Tx) -> None:
        conn = tx.conn
        # Blobs removed meanwhile have no row any more: nothing is inserted for them.
        live = [b for b in blobs if conn.execute("SELECT 1 FROM blob WHERE id = ? AND fts IS NULL",
                                                 (b.id,)).fetchone() is not None]
        _insert_index(conn, live)
        conn.executemany("UPDATE blob SET fts = 1 WHERE id = ?", [(b.id,) for b in live])
        conn.executemany("UPDATE blob SET fts = 0 WHERE id = ? AND fts IS NULL", [(i,) for i in failed])

    return fn


def _insert_index(conn: sqlite3.Connection, blobs: Sequence[_Blob]) -> None:
    """Sort keys and full-text rows of new blobs (after their blob rows; a blob already indexed
    is left alone), in the caller's transaction."""
    indexed = {b.id: b for b in blobs if b.index is not None}
    if not indexed:
        return
    conn.executemany(_KEY_INSERT, [(b.id, *b.index[0]) for b in indexed.values()])  # type: ignore[index]
    rows = []
    for chunk in _chunks(list(indexed), 500):
        for kid, blob_id in conn.execute(
            "SELECT k.id, k.blob_id FROM blob_key k WHERE k.blob_id IN (" + ",".join("?" * len(chunk)) + ")"
            " AND NOT EXISTS (SELECT 1 FROM blob_text t WHERE t.id = k.id)", chunk
        ):
            rows.append((kid, *indexed[blob_id].index[1]))  # type: ignore[index]
    conn.executemany(_TEXT_INSERT, rows)
    conn.executemany(_FTS_INSERT, rows)


@dataclass(slots=True)
class _Tx:
    """What one write request sees: the connection, and what to publish after the commit."""

    conn: sqlite3.Connection
    changes: list[Change] = field(default_factory=list)
    dead_blobs: set[str] = field(default_factory=set)
    after_commit: list[Callable[[], None]] = field(default_factory=list)
    index_later: list[_Blob] = field(default_factory=list)  # index rows for the background flush


@dataclass(slots=True)
class _WriteRequest:
    fn: Callable[[_Tx], Any]
    future: asyncio.Future[Any] | None
    pins: tuple[str, ...] = ()
    new_blobs: tuple[str, ...] = ()
    finished: bool = False  # _finish ran for it (pins released exactly once)
    error: BaseException | None = None  # failed before the writer (blob files): no SQL, just clean up
    append: _AppendSpec | None = None  # an append the writer may merge with its neighbours
    barrier: bool = True  # blob files of its own to sync before the commit (False: all inline)
    inline: tuple[tuple[str, bytes], ...] = ()  # (blob id, bytes) for inline.sqlite3, before the commit


@dataclass(frozen=True, slots=True)
class _AppendSpec:
    """What a plain append (``append_many``, or ``deliver`` to one target) inserts, so that the
    writer can run a run of them as one set of statements. ``fn`` of the same request does the
    same for one request alone (the fallback when anything in the merged run fails)."""

    account_id: AccountId
    mailbox_id: MailboxId | None  # None: resolve ``mailbox_name`` (INBOX when absent)
    mailbox_name: str
    entries: tuple[tuple[_Blob, frozenset[str], int, int | None], ...]


@dataclass(slots=True)
class _IngestJob:
    """Bytes to store as blobs, then a write built from the blobs, for one caller's future."""

    datas: Sequence[bytes]
    build: Callable[[list[_Blob]], Callable[[_Tx], Any]]
    future: asyncio.Future[Any]
    abandoned: bool = False  # the caller was cancelled before the write reached the writer
    # For mergeable appends: (account, mailbox id or None, mailbox name, [(flags, internaldate µs)])
    append: tuple[AccountId, MailboxId | None, str, Sequence[tuple[frozenset[str], int]]] | None = None


@dataclass(frozen=True, slots=True)
class _Blob:
    id: str
    size: int
    info: bytes | None
    wire: int | None = None  # WIRE_* bits (base.py); None when not learned (rows of older copies)
    index: tuple[SortRow, IndexText] | None = None  # sort keys and index text (None: not parsed)
    inline: bytes | None = None  # the bytes, when they live in inline.sqlite3 rather than a file


class _MaildropLock:
    """One POP3 session per maildrop (RFC 1939 §8): in this process a set, across processes
    (``serve --workers N``, another server on the same store) an flock on ``locks/maildrop-<id>``
    that dies with its process, so a killed worker never leaves a maildrop locked."""

    def __init__(self, store: SqliteStore, account_id: AccountId) -> None:
        self._store = store
        self._account_id = account_id
        self._held = False
        self._fd: int | None = None

    @property
    def lost(self) -> bool:
        return False  # an flock held by this process cannot go away under it

    async def __aenter__(self) -> None:
        if self._account_id in self._store._maildrop_locks:
            raise MailboxInUse("the maildrop is locked by another session")
        path = self._store.path / "locks" / f"maildrop-{int(self._account_id)}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        except FileNotFoundError:
            path.parent.mkdir(exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        except OSError as exc:
            raise os_error(exc, "maildrop lock file") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise MailboxInUse("the maildrop is locked by another session") from None
        self._fd = fd
        self._store._maildrop_locks.add(self._account_id)
        self._held = True

    async def __aexit__(self, *exc: object) -> None:
        if self._held:
            self._held = False
            self._store._maildrop_locks.discard(self._account_id)
            if self._fd is not None:
                os.close(self._fd)  # releases the flock
                self._fd = None


class _FileBlobReader:
    """A blob's bytes in pieces: from its file, or (inline blobs) from memory."""

    def __init__(
        self, store: SqliteStore, blob_id: str, size: int, wire: int | None = None, data: bytes | None = None
    ) -> None:
        self._store = store
        self._blob_id = blob_id
        self._size = size
        self.wire = wire  # WIRE_* bits (base.py), None when not known
        self._data = data

    @property
    def size(self) -> int:
        return self._size

    async def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        if self._data is not None:
            return self._data[offset : offset + length]
        return await self._store._in_blob_thread(self._store._blobs.read_range, self._blob_id, offset, length)

    async def close(self) -> None:
        return None


_MAILBOX_COLS = (
    "m.id, m.account_id, m.name, m.special_use, m.uidvalidity, m.uidnext, m.highestmodseq, "
    "EXISTS(SELECT 1 FROM subscription s WHERE s.account_id = m.account_id AND s.name = m.name)"
    " AS subscribed"
)
_MESSAGE_COLS = "uid, modseq, flags, size, internaldate, blob_id, savedate"


def _mailbox(row: sqlite3.Row) -> Mailbox:
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


def _meta(row: sqlite3.Row) -> MessageMeta:
    return MessageMeta(
        uid=Uid(row["uid"]),
        modseq=ModSeq(row["modseq"]),
        flags=_flags_from(row["flags"]),
        size=row["size"],
        internaldate=_from_us(row["internaldate"]),
        blob_id=BlobId(row["blob_id"]),
        savedate=_from_us(row["savedate"]) if row["savedate"] is not None else None,
    )


def _metas(rows: Iterable[tuple[Any, ...]]) -> list[MessageMeta]:
    """MessageMeta records from plain tuples of _MESSAGE_COLS, sharing equal flag sets."""
    memo: dict[str, frozenset[str]] = {}
    epoch, us = _EPOCH, timedelta
    out: list[MessageMeta] = []
    append = out.append
    for uid, modseq, flags, size, idate, blob_id, sdate in rows:
        f = memo.get(flags)
        if f is None:
            f = memo[flags] = _flags_from(flags)
        append(
            MessageMeta(
                uid,
                modseq,
                f,
                size,
                epoch + us(microseconds=idate),
                blob_id,
                epoch + us(microseconds=sdate) if sdate is not None else None,
            )
        )
    return out


def _account(row: sqlite3.Row) -> Account:
    return Account(
        id=AccountId(row["id"]),
        address=row["address"],
        password_hash=row["password_hash"],
        quota_bytes=row["quota_bytes"],
        quota_messages=row["quota_messages"],
        used_bytes=row["used_bytes"],
        used_messages=row["used_messages"],
        created=_from_us(row["created"]),
        disabled=bool(row["disabled"]),
    )


def _chunks(seq: Sequence[T], n: int = 500) -> Iterable[Sequence[T]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


# ------------------------------------------------------------------------------------------ store


class SqliteStore:
    """The embedded implementation of :class:`postfach.store.base.Store`."""

    def __init__(
        self,
        path: Path,
        *,
        group_commit_max: int = 256,
        readers: int = 4,
        blob_threads: int = 8,
        migrations: Sequence[Migration] | None = None,
        batch_sync: bool | None = None,
        ingest_threads: int | None = None,
        commit_delay: float = 0.002,
        backfill_batch: int = 200,
        checkpoint_interval: float = 0.25,
        wal_autocheckpoint_pages: int = 1000,
        wal_size_limit: int = 64 * 1024 * 1024,
        inline_max: int = 64 * 1024,
        background_max: int = 256,
        background_idle: float = 0.05,
    ) -> None:
        self.path = Path(path)
        self.group_commit_max = max(1, group_commit_max)
        self._readers_n = max(1, readers)
        self._blob_threads_n = max(1, blob_threads)
        self._migrations = list(migrations) if migrations is not None else None
        self._blobs = FileBlobStore(self.path / "blobs", batch_sync=batch_sync)
        # Ingest threads: with batch sync their work is CPU (hash, parse, file creation), and two
        # keep two cores busy (more only contend for the GIL); per-file fsyncs wait on the disk.
        if ingest_threads is None:
            ingest_threads = 2 if self._blobs.batch_sync else 6
        self._ingest_threads_n = max(1, ingest_threads)
        self._db_path = self.path / "meta.sqlite3"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wq: queue.SimpleQueue[_WriteRequest | None] = queue.SimpleQueue()
        self._iq: queue.SimpleQueue[_IngestJob | None] = queue.SimpleQueue()
        self._ingesters: list[threading.Thread] = []
        # Ingest jobs submitted but not yet handed to the writer (guarded by _inflight_lock): the
        # writer waits up to commit_delay for them, so that one commit serves them all.
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self.commit_delay = commit_delay
        self.checkpoint_interval = checkpoint_interval
        self._wal_autocheckpoint = max(0, wal_autocheckpoint_pages)
        self._wal_size_limit = wal_size_limit
        self._checkpointer: threading.Thread | None = None
        self._ckpt_wake = threading.Event()
        self._ckpt_stop = threading.Event()
        # (busy, WAL frames, frames checkpointed) of the checkpointer's last PASSIVE checkpoint
        self.last_checkpoint: tuple[int, int, int] | None = None
        self._writer: threading.Thread | None = None
        self._wconn: sqlite3.Connection | None = None
        self._read_pool: ThreadPoolExecutor | None = None
        self._blob_pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._rconns: list[sqlite3.Connection] = []
        self._rconns_lock = threading.Lock()
        self._lconn: sqlite3.Connection | None = None  # the event loop's own, for point reads
        self._subs: dict[AccountId, set[_Subscription]] = {}
        self._maildrop_locks: set[AccountId] = set()
        self._queue_claims: dict[int, float] = {}
        self._lock_fd: int | None = None
        self._gc_lock = threading.Lock()
        self._gc_paused = 0
        self._gc_deferred: set[str] = set()
        # Cross-process GC pause (``gc.lock``): a pause holds a shared flock on one descriptor;
        # removal first probes for an exclusive one on another (flocks of two descriptors
        # conflict even within one process).
        self._gc_pause_fd: int | None = None
        self._gc_probe_fd: int | None = None
        self._write_lock_fd: int | None = None  # write.lock (see _begin), writer thread only
        self._write_locked = False
        # ``serve --workers N``: where committed changes go for the other processes (set_change_relay).
        self._relay: Callable[[list[Change]], None] | None = None
        self._open = False
        self.schema_version = 0
        self._blob_insert_sql = ""
        self.has_index = False  # schema 4: the full-text index and sort-key tables exist
        self._backfill: threading.Thread | None = None
        self._backfill_stop = threading.Event()
        #: Blobs per backfill write (0: no backfill, for tests of the not-yet-indexed state).
        self.backfill_batch = backfill_batch
        self.backfilled = 0  # blobs the backfill has indexed (or found unindexable) since open
        self._blob_open_sql = ""
        # Messages up to ``inline_max`` bytes live in inline.sqlite3, not in a file of their own.
        self.inline_max = max(0, inline_max)
        self._inline_path = self.path / INLINE_DB
        self._pconn: sqlite3.Connection | None = None  # the writer's connection to inline.sqlite3
        # Index rows of new blobs wait in ``_index_pending`` (writer thread only) and go in with
        # one transaction (_flush_background) once ``background_max`` have gathered or the
        # writer has been idle ``background_idle`` s. background_max=1: in the write itself.
        self.background_max = max(1, background_max)
        self.background_idle = background_idle
        self._index_pending: list[_Blob] = []

    # ------------------------------------------------------------------------------- lifecycle
    async def open(self) -> None:
        if self._open:
            return
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._open_sync)
        self._read_pool = ThreadPoolExecutor(self._readers_n, thread_name_prefix="postfach-store-read")
        self._blob_pool = ThreadPoolExecutor(self._blob_threads_n, thread_name_prefix="postfach-store-blob")
        self._writer = threading.Thread(target=self._writer_main, name="postfach-store-writer", daemon=True)
        self._writer.start()
        self._ckpt_stop.clear()
        self._checkpointer = threading.Thread(
            target=self._checkpointer_main, name="postfach-store-checkpoint", daemon=True
        )
        self._checkpointer.start()
        self._ingesters = [
            threading.Thread(target=self._ingest_main, name=f"postfach-store-ingest-{i}", daemon=True)
            for i in range(self._ingest_threads_n)
        ]
        for t in self._ingesters:
            t.start()
        try:
            self._lconn = self._loop_connection()
        except sqlite3.Error:
            self._lconn = None  # point reads go through the reader threads instead
        self._open = True
        await self._open_reader_connections()
        if self.has_index and self.backfill_batch > 0:
            self._backfill_stop.clear()
            self._backfill = threading.Thread(target=self._backfill_main, name="postfach-store-backfill", daemon=True)
            self._backfill.start()

    async def _open_reader_connections(self) -> None:
        """Every reader thread opens its connection now, not at its first request under load: a
        steady number of open files from the start (each connection holds meta.sqlite3 and
        inline.sqlite3 with their WAL files), and no connection set-up inside a client's command."""
        loop = self._check_open()
        n = self._readers_n
        started = threading.Barrier(n)

        def warm(conn: sqlite3.Connection) -> None:
            with contextlib.suppress(threading.BrokenBarrierError):
                started.wait(5.0)  # n tasks at once: one on each of the n threads

        assert self._read_pool is not None
        await asyncio.gather(*(loop.run_in_executor(self._read_pool, self._read_call, warm) for _ in range(n)))

    def _open_sync(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o640)
        except OSError as exc:
            raise os_error(exc, f"store folder {self.path}") from exc
        try:
            exclusive = True
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                exclusive = False  # another process (e.g. the CLI beside the server) has it open
            conn = _connect(self._db_path)
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"{self._db_path}: cannot switch to WAL mode (got {mode})")
                migrations = self._migrations if self._migrations is not None else load_migrations()
                self.schema_version = _apply_migrations(conn, migrations, self.path)
                # The wire column comes with schema version 3 (a store may be opened with fewer
                # migrations, by tests of upgrades): without it, readers scan as before.
                cols = {r[1] for r in conn.execute("PRAGMA table_info(blob)")}
                has_wire = "wire" in cols
                # The index comes with schema version 4: the same five parameters every time.
                self.has_index = "fts" in cols
                if self.has_index:
                    # A blob stored before version 4 and ingested again gets its index rows now.
                    self._blob_insert_sql = (
                        "INSERT INTO blob (id, size, refcount, info, wire, fts) VALUES (?, ?, 1, ?, ?, ?)"
                        " ON CONFLICT(id) DO UPDATE SET refcount = refcount + 1,"
                        " fts = CASE WHEN excluded.fts = 1 THEN 1 ELSE fts END"
                    )
                else:
                    self._blob_insert_sql = (
                        "INSERT INTO blob (id, size, refcount, info, wire) SELECT ?, ?, 1, ?, ? WHERE ? IS NULL OR 1"
                        if has_wire  # else the same parameters, the last ones ignored
                        else "INSERT INTO blob (id, size, refcount, info) SELECT ?, ?, 1, ?"
                        " WHERE (? IS NULL OR 1) AND (? IS NULL OR 1)"
                    ) + " ON CONFLICT(id) DO UPDATE SET refcount = refcount + 1"
                # The bytes of a small blob come along with its row (reader connections attach
                # inline.sqlite3 as ``inl``).
                self._blob_open_sql = (
                    f"SELECT b.size, {'b.wire' if has_wire else 'NULL'}, i.data FROM blob b"
                    " LEFT JOIN inl.blob_inline i ON i.id = b.id WHERE b.id = ?"
                )
            except BaseException:
                conn.close()
                raise
            # The checkpointer thread does the copying; the writer's automatic checkpoint
            # restarts the WAL (see the module docstring). journal_size_limit: the WAL file is
            # cut back to it when it restarts after a spike.
            conn.execute(f"PRAGMA wal_autocheckpoint = {int(self._wal_autocheckpoint)}")
            conn.execute(f"PRAGMA journal_size_limit = {int(self._wal_size_limit)}")
            self._wconn = conn
            self._pconn = self._open_inline()
            self._blobs.prepare(clean_tmp=exclusive, pin_file=self.path / "pins")
            self._gc_pause_fd = os.open(self.path / "gc.lock", os.O_RDWR | os.O_CREAT, 0o640)
            self._gc_probe_fd = os.open(self.path / "gc.lock", os.O_RDWR)
            self._write_lock_fd = os.open(self.path / "write.lock", os.O_RDWR | os.O_CREAT, 0o640)
            dirty = self.path / "dirty"
            if exclusive:
                if dirty.exists():
                    self._recover(conn)
                    self._recover_inline()
                dirty.touch()
                with contextlib.suppress(OSError):
                    fsync_dir(self.path)
                fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
            else:
                fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        except BaseException as exc:
            if self._wconn is not None:
                self._wconn.close()
                self._wconn = None
            if self._pconn is not None:
                self._pconn.close()
                self._pconn = None
            self._blobs.close()
            self._close_gc_fds()
            os.close(self._lock_fd)
            self._lock_fd = None
            if isinstance(exc, (sqlite3.Error, OSError)):
                raise _translate(exc) from exc
            raise

    def _open_inline(self) -> sqlite3.Connection:
        """The writer's connection to inline.sqlite3 (made when missing: stores from before it,
        and restored ones, start empty)."""
        pconn = _connect(self._inline_path)
        try:
            mode = pconn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self._inline_path}: cannot switch to WAL mode (got {mode})")
            pconn.execute(_INLINE_SCHEMA)
            pconn.execute(f"PRAGMA wal_autocheckpoint = {int(self._wal_autocheckpoint)}")
            pconn.execute(f"PRAGMA journal_size_limit = {int(self._wal_size_limit)}")
        except BaseException:
            pconn.close()
            raise
        return pconn

    def _recover_inline(self) -> None:
        """After an unclean shutdown: drop inline bytes no blob row refers to (their commit in
        inline.sqlite3 came, the metadata commit did not)."""
        pconn = self._pconn
        assert pconn is not None
        pconn.execute("ATTACH DATABASE ? AS meta", (str(self._db_path),))
        try:
            n = pconn.execute(
                "DELETE FROM main.blob_inline WHERE id NOT IN (SELECT id FROM meta.blob)"
            ).rowcount
        finally:
            pconn.execute("DETACH DATABASE meta")
        if n:
            log.warning("store %s: removed %d unreferenced inline messages after an unclean shutdown", self.path, n)

    def _recover(self, conn: sqlite3.Connection) -> None:
        """After an unclean shutdown: remove temp files and blob files no row refers to (written
        and renamed, but the crash came before the commit; nobody was ever told they were stored)."""
        known = {r[0] for r in conn.execute("SELECT id FROM blob")}
        removed = 0
        for name, p in self._blobs.iter_files():
            if name not in known:
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed += 1
        if removed:
            log.warning("store %s: removed %d unreferenced blob files after an unclean shutdown", self.path, removed)

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False
        # The backfill first (it waits for the writer), then the ingest threads: what they finish
        # still goes to the writer before it stops.
        self._backfill_stop.set()
        if self._backfill is not None:
            await asyncio.to_thread(self._backfill.join)
            self._backfill = None
        for _ in self._ingesters:
            self._iq.put(None)
        for t in self._ingesters:
            await asyncio.to_thread(t.join)
        self._ingesters = []
        self._wq.put(None)
        if self._writer is not None:
            await asyncio.to_thread(self._writer.join)
        self._ckpt_stop.set()
        self._ckpt_wake.set()
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.join)
            self._checkpointer = None
        if self._read_pool is not None:
            self._read_pool.shutdown(wait=True)
        if self._blob_pool is not None:
            self._blob_pool.shutdown(wait=True)
        self._blobs.close()
        with self._rconns_lock:
            for c in self._rconns:
                c.close()
            self._rconns.clear()
        self._local = threading.local()
        if self._lconn is not None:
            self._lconn.close()
            self._lconn = None
        if self._wconn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._wconn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._wconn.close()
            self._wconn = None
        if self._pconn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._pconn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._pconn.close()
            self._pconn = None
        if self._lock_fd is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                with self._gc_lock:
                    leftovers = bool(self._gc_deferred)
                if not leftovers:  # else the next open removes them, as after a crash
                    (self.path / "dirty").unlink(missing_ok=True)  # last one out: a clean shutdown
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None
        self._close_gc_fds()
        for subs in self._subs.values():
            for s in subs:
                s._closed = True
        self._subs.clear()

    def _close_gc_fds(self) -> None:
        for fd in (self._gc_pause_fd, self._gc_probe_fd, self._write_lock_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._gc_pause_fd = self._gc_probe_fd = self._write_lock_fd = None

    def _gc_paused_elsewhere(self) -> bool:
        """Another process (a worker's backup, ``postfach backup``) pauses blob removal. Called
        under ``_gc_lock`` with no local pause: the probe is released at once, which is enough —
        a pause that starts after it copies a database that no longer names our dead blobs."""
        fd = self._gc_probe_fd
        if fd is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False

    @contextlib.contextmanager
    def blob_gc_paused(self) -> Iterator[None]:
        """While held (from any thread), blob files whose last reference went are kept: a backup
        that copied the database can then hard-link every file its copy names. Removal catches
        up when the last holder leaves. Holds in every process that has the store open (a shared
        flock on ``gc.lock``). Not part of the Store protocol (SQLite layout only)."""
        with self._gc_lock:
            self._gc_paused += 1
            if self._gc_paused == 1 and self._gc_pause_fd is not None:
                fcntl.flock(self._gc_pause_fd, fcntl.LOCK_SH)
        try:
            yield
        finally:
            with self._gc_lock:
                self._gc_paused -= 1
                deferred: set[str] = set()
                if self._gc_paused == 0:
                    if self._gc_pause_fd is not None:
                        with contextlib.suppress(OSError):
                            fcntl.flock(self._gc_pause_fd, fcntl.LOCK_UN)
                    deferred, self._gc_deferred = self._gc_deferred, set()
            if deferred:
                if self._open:
                    # The writer re-checks each against the database and removes the dead ones.
                    self._wq.put(_WriteRequest(_gc_only, None, (), tuple(deferred)))
                else:
                    with self._gc_lock:
                        self._gc_deferred |= deferred

    # --------------------------------------------------------------------------- thread plumbing
    def _check_open(self) -> asyncio.AbstractEventLoop:
        if not self._open or self._loop is None:
            raise StoreUnavailable("the store is not open")
        return self._loop

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = self._check_open()
        assert self._read_pool is not None
        return await loop.run_in_executor(self._read_pool, self._read_call, fn)

    def _read_call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        try:
            if conn is None:
                conn = _connect(self._db_path, self._inline_path)
                conn.execute("PRAGMA query_only = ON")
                self._local.conn = conn
                with self._rconns_lock:
                    self._rconns.append(conn)
            conn.execute("BEGIN")  # one snapshot for the whole read
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")
        except BaseException as exc:
            t = _translate(exc)
            if t is exc:
                raise
            raise t from exc

    def _loop_connection(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._db_path, isolation_level=None, check_same_thread=False, timeout=0.0)
        conn.row_factory = sqlite3.Row
        conn.execute("ATTACH DATABASE ? AS inl", (str(self._inline_path),))
        conn.execute("PRAGMA query_only = ON")
        conn.execute("PRAGMA busy_timeout = 0")
        return conn

    async def _point_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A read of one indexed row (account by address, alias, mailbox by name ...), run right
        here on the event loop: in WAL mode a reader never waits for the writer, and such a
        lookup costs ~20 µs, a sixth of a hop to a reader thread and back (which every SMTP RCPT
        and POP3/IMAP login pays several times). ``fn`` must be one SELECT (its own snapshot).
        Should SQLite ever report the database busy (recovery after a crash, a checkpoint that
        truncates), the read goes to a reader thread, which waits with the normal timeout."""
        self._check_open()
        conn = self._lconn
        if conn is not None:
            try:
                return fn(conn)
            except sqlite3.OperationalError as exc:
                code = getattr(exc, "sqlite_errorcode", None)
                if not isinstance(code, int) or code & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise _translate(exc) from exc
            except sqlite3.Error as exc:
                raise _translate(exc) from exc
        return await self._read(fn)

    async def _snapshot_read(self, quick: Callable[[sqlite3.Connection], T],
                             full: Callable[[sqlite3.Connection], T]) -> T:
        """A read of a few statements that must share one snapshot and usually touch few rows
        (an IMAP session's changes since it last looked): ``quick`` runs right here on the event
        loop's connection inside BEGIN ... COMMIT, like _point_read; it raises _TooManyRows when
        the answer turns out big, and then, or when SQLite reports the database busy, ``full``
        runs on a reader thread instead."""
        self._check_open()
        conn = self._lconn
        if conn is not None:
            try:
                conn.execute("BEGIN")
                try:
                    return quick(conn)
                finally:
                    if conn.in_transaction:
                        conn.execute("COMMIT")
            except _TooManyRows:
                pass
            except sqlite3.OperationalError as exc:
                code = getattr(exc, "sqlite_errorcode", None)
                if not isinstance(code, int) or code & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise _translate(exc) from exc
                with contextlib.suppress(sqlite3.Error):
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                raise _translate(exc) from exc
        return await self._read(full)

    async def _in_blob_thread(self, fn: Callable[..., T], *args: Any) -> T:
        loop = self._check_open()
        assert self._blob_pool is not None
        return await loop.run_in_executor(self._blob_pool, fn, *args)

    async def _write(self, fn: Callable[[_Tx], T], pins: Sequence[str] = (), new_blobs: Sequence[str] = ()) -> T:
        try:
            loop = self._check_open()
        except BaseException:
            for p in pins:
                self._blobs.unpin(p)
            raise
        fut: asyncio.Future[T] = loop.create_future()
        # A caller cancelled while waiting does not stop the write (it may already be committed);
        # consume the outcome so an unawaited failure is not reported as "never retrieved".
        fut.add_done_callback(_consume)
        self._wq.put(_WriteRequest(fn, fut, tuple(pins), tuple(new_blobs)))
        return await asyncio.shield(fut)

    async def _ingest_write(
        self,
        datas: Sequence[bytes],
        build: Callable[[list[_Blob]], Callable[[_Tx], T]],
        append: tuple[AccountId, MailboxId | None, str, Sequence[tuple[frozenset[str], int]]] | None = None,
    ) -> T:
        """Store ``datas`` as blobs and run the write ``build(blobs)`` returns, durable on return.

        One hop: an ingest thread hashes, writes and parses the blobs and hands the write straight
        to the writer queue; the writer resolves the future after the commit. The event loop
        wakes once per group commit, not once per message. A caller cancelled meanwhile does not
        stop the write (as with ``_write``)."""
        loop = self._check_open()
        fut: asyncio.Future[T] = loop.create_future()
        fut.add_done_callback(_consume)
        job = _IngestJob(datas, build, fut, append=append)
        with self._inflight_lock:
            self._inflight += 1
        self._iq.put(job)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            # Not yet handed to the writer: it never will be (its new files are removed).
            job.abandoned = True
            raise

    def _ingest_main(self) -> None:
        while True:
            job = self._iq.get()
            if job is None:
                return
            try:
                self._ingest_job(job)
            finally:
                with self._inflight_lock:
                    self._inflight -= 1

    def _ingest_job(self, job: _IngestJob) -> None:
        """Blobs of one job, then its write to the writer queue (or its clean-up on failure)."""
        blobs: list[_Blob] = []
        try:
            for d in job.datas:
                if job.abandoned:
                    raise StoreError("abandoned: the caller went away before the write")
                blobs.append(self._ingest_one(d))
            fn = job.build(blobs)
        except BaseException as exc:  # the writer unpins, removes the new files, answers
            ids = tuple(b.id for b in blobs)
            self._wq.put(_WriteRequest(_abandoned, job.future, ids, ids, error=_translate(exc)))
            return
        ids = tuple(b.id for b in blobs if b.inline is None)  # the pinned ones with files
        if job.abandoned:
            self._wq.put(_WriteRequest(_abandoned, job.future, ids, ids))
            return
        spec = None
        if job.append is not None:
            aid, mid, name, meta = job.append
            if len(meta) == len(blobs):
                spec = _AppendSpec(
                    aid, mid, name, tuple((b, f, d, None) for b, (f, d) in zip(blobs, meta, strict=True))
                )
        inline = tuple((b.id, b.inline) for b in blobs if b.inline is not None)
        # new_blobs: what to remove again if the write fails (files, and inline bytes).
        new = ids + tuple(i for i, _ in inline)
        self._wq.put(_WriteRequest(fn, job.future, ids, new, append=spec, barrier=bool(ids), inline=inline))

    def _writer_main(self) -> None:
        stop = False
        while not stop:
            if self._index_pending:
                try:
                    first = self._wq.get(timeout=self.background_idle)
                except queue.Empty:
                    self._flush_background()
                    continue
            else:
                first = self._wq.get()
            if first is None:
                break
            batch = [first]
            deadline = 0.0
            while len(batch) < self.group_commit_max:
                try:
                    nxt = self._wq.get_nowait()
                except queue.Empty:
                    # Commit delay (PostgreSQL's commit_delay): messages still being written by
                    # the ingest threads will be here in a moment; wait a little for them so
                    # that one commit and one blob barrier serve them all. Only then, never idle.
                    if self._inflight <= 0 or not first.pins:  # only batches of message writes wait
                        break
                    now = time.monotonic()
                    if not deadline:
                        deadline = now + self.commit_delay
                    if now >= deadline:
                        break
                    try:
                        nxt = self._wq.get(timeout=deadline - now)
                    except queue.Empty:
                        break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                try:
                    self._run_batch(batch)
                finally:
                    self._end_write_lock()
            except BaseException:  # never let the writer die silently
                log.exception("store writer: batch failed unexpectedly")
                if self._wconn is not None and self._wconn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._wconn.execute("ROLLBACK")
                self._finish([(r, False, StoreError("internal store error"), None) for r in batch])
                self._end_write_lock()
            if len(self._index_pending) >= self.background_max:
                self._flush_background()
        if self._index_pending:
            self._flush_background()  # closing: what is pending goes in before the writer stops

    def _flush_background(self) -> None:
        """The full-text and sort-key rows of new blobs, many at a time, in a transaction of their
        own: outside the commits that deliveries wait for (FTS5 work was a third of each one).
        Dovecot's indexer likewise indexes after delivery; until then searches scan the few
        unindexed blobs (fts NULL), SORT and THREAD parse them. A failure or a crash leaves them
        unindexed: the backfill at the next open takes them."""
        pending, self._index_pending = self._index_pending, []

        def fn(tx: _Tx) -> None:
            try:
                _backfill_write(pending, ())(tx)
            except BaseException as exc:
                log.warning("store %s: indexing %d new messages failed (the next open retries): %s",
                            self.path, len(pending), exc)
                raise

        req = _WriteRequest(fn, None)
        try:
            try:
                self._run_batch([req])
            finally:
                self._end_write_lock()
        except BaseException:
            log.exception("store writer: background flush failed unexpectedly")
            if self._wconn is not None and self._wconn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._wconn.execute("ROLLBACK")

    def _begin(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE, after taking ``write.lock``: when several processes write (``serve
        --workers N``, the CLI beside the server), a waiting writer is woken by the kernel the
        moment the other one is done, where SQLite's busy handler would sleep 1, 2, 5, 10 ...
        ms between attempts. Released after the batch (``_end_write_lock``)."""
        self._lock_writes()
        conn.execute("BEGIN IMMEDIATE")

    def _lock_writes(self) -> None:
        fd = self._write_lock_fd
        if fd is not None and not self._write_locked:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._write_locked = True

    def _commit_inline(self, rows: Sequence[tuple[str, bytes]]) -> None:
        """Store small messages' bytes durably (one fsync of inline.sqlite3's WAL for the batch)."""
        pconn = self._pconn
        assert pconn is not None
        pconn.execute("BEGIN IMMEDIATE")
        try:
            pconn.executemany(_INLINE_INSERT, rows)
            pconn.execute("COMMIT")
        finally:
            if pconn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    pconn.execute("ROLLBACK")

    def _end_write_lock(self) -> None:
        if self._write_locked:
            self._write_locked = False
            if self._write_lock_fd is not None:
                fcntl.flock(self._write_lock_fd, fcntl.LOCK_UN)

    def _run_batch(self, batch: list[_WriteRequest]) -> None:
        conn = self._wconn
        assert conn is not None
        outcomes: list[tuple[_WriteRequest, bool, Any, _Tx | None]] = []
        if any(r.fn is _gc_only or r.fn is _abandoned for r in batch):
            # Clean-up requests do no SQL: "failing" them hands their blob ids to _finish, which
            # removes the unreferenced ones (and answers the caller with the error, if any).
            outcomes = [(r, False, r.error, None) for r in batch if r.fn is _gc_only or r.fn is _abandoned]
            batch = [r for r in batch if not (r.fn is _gc_only or r.fn is _abandoned)]
            if not batch:
                self._finish(outcomes)
                return
        def fail(failed: Callable[[_WriteRequest], bool], exc: BaseException) -> bool:
            """The requests ``failed`` picks get ``exc``; the others go on. True when none are left."""
            nonlocal batch
            err = _translate(exc)
            outcomes.extend((r, False, err, None) for r in batch if failed(r))
            batch = [r for r in batch if not failed(r)]
            if not batch:
                self._finish(outcomes)
            return not batch

        if any(r.pins and r.barrier for r in batch):
            # Blob files of this batch become durable before the commit that refers to them.
            try:
                self._blobs.barrier()
            except OSError as exc:
                if fail(lambda r: bool(r.pins), exc):
                    return
        if any(r.inline for r in batch):
            # Small messages' bytes first, in inline.sqlite3, under the write lock: committed
            # before the metadata that refers to them (a crash between leaves bytes nobody refers
            # to, dropped at the next open), and no other process removes them meanwhile.
            try:
                self._lock_writes()
                self._commit_inline([row for r in batch for row in r.inline])
            except (sqlite3.Error, OSError) as exc:
                if fail(lambda r: bool(r.inline), exc):
                    return
        if self._run_fast(conn, batch, outcomes):
            return
        try:
            self._begin(conn)
        except sqlite3.Error as exc:
            err = _translate(exc)
            self._finish(outcomes + [(r, False, err, None) for r in batch])
            return
        lost = False
        for req in batch:
            if lost:
                outcomes.append((req, False, StoreUnavailable("transaction aborted; try again"), None))
                continue
            tx = _Tx(conn)
            try:
                conn.execute("SAVEPOINT req")
            except sqlite3.Error as exc:
                outcomes.append((req, False, _translate(exc), None))
                lost = not conn.in_transaction
                continue
            try:
                result = req.fn(tx)
            except BaseException as exc:
                try:
                    conn.execute("ROLLBACK TO req")
                    conn.execute("RELEASE req")
                except sqlite3.Error:
                    pass
                if not conn.in_transaction:
                    # SQLite rolled the whole transaction back (e.g. SQLITE_FULL): the earlier
                    # requests of this batch are gone too.
                    outcomes = [
                        (r, False, StoreUnavailable("transaction aborted; try again"), None) if ok else (r, ok, v, t)
                        for r, ok, v, t in outcomes
                    ]
                    lost = True
                outcomes.append((req, False, _translate(exc), None))
                continue
            conn.execute("RELEASE req")
            outcomes.append((req, True, result, tx))
        if conn.in_transaction:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                err = _translate(exc)
                outcomes = [(r, False, err, None) if ok else (r, ok, v, t) for r, ok, v, t in outcomes]
        self._finish(outcomes)

    def _run_fast(
        self,
        conn: sqlite3.Connection,
        batch: list[_WriteRequest],
        outcomes: list[tuple[_WriteRequest, bool, Any, _Tx | None]],
    ) -> bool:
        """The common case, without a SAVEPOINT per request: run the batch and commit. If a request
        fails, roll everything back and return False so the batch runs again with savepoints
        (requests are pure functions of the database, so running one twice is harmless). True
        when the batch is finished."""
        try:
            self._begin(conn)
        except sqlite3.Error as exc:
            err = _translate(exc)
            self._finish(outcomes + [(r, False, err, None) for r in batch])
            return True
        done: list[tuple[_WriteRequest, bool, Any, _Tx | None]] = []
        i, n = 0, len(batch)
        while i < n:
            req = batch[i]
            if req.append is not None and i + 1 < n and batch[i + 1].append is not None:
                j = i + 2
                while j < n and batch[j].append is not None:
                    j += 1
                try:
                    done.extend(self._append_merged(conn, batch[i:j]))
                except BaseException:
                    # Some request of the run fails (quota, a mailbox gone ...): the slow path
                    # finds out which one, with a savepoint each.
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    return False
                i = j
                continue
            tx = _Tx(conn)
            try:
                result = req.fn(tx)
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if n == 1:
                    self._finish([*outcomes, (req, False, _translate(exc), None)])
                    return True
                return False
            done.append((req, True, result, tx))
            i += 1
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            err = _translate(exc)
            done = [(r, False, err, None) for r, _, _, _ in done]
        self._finish(outcomes + done)
        return True

    def _append_merged(
        self, conn: sqlite3.Connection, run: Sequence[_WriteRequest]
    ) -> list[tuple[_WriteRequest, bool, Any, _Tx | None]]:
        """A run of plain appends as one set of statements: per mailbox one UPDATE that takes
        the UIDs and one modseq per request, per account one usage UPDATE, one INSERT of all
        blob rows and one of all message rows. Results, quota rules and change events are those
        of running each request's ``fn`` in order; raises (and the caller rolls back) if any
        request would fail, so that the slow path can tell which."""
        # 1. mailboxes and quotas, checked in request order
        mids: dict[tuple[int, str], MailboxId] = {}
        usage: dict[AccountId, list[Any]] = {}
        per_mailbox: dict[MailboxId, list[int]] = {}  # mailbox -> indexes into run
        targets: list[tuple[AccountId, MailboxId, _AppendSpec]] = []
        for k, req in enumerate(run):
            spec = req.append
            assert spec is not None
            aid = spec.account_id
            mid = spec.mailbox_id
            if mid is None:
                key = (aid, spec.mailbox_name)
                mid = mids.get(key)
                if mid is None:
                    r = conn.execute(
                        "SELECT id FROM mailbox WHERE account_id = ? AND name IN (?, 'INBOX')"
                        " ORDER BY name = 'INBOX' LIMIT 1",
                        (aid, spec.mailbox_name),
                    ).fetchone()
                    if r is None:
                        raise NotFound(f"no such account (id {aid})")
                    mid = mids[key] = MailboxId(int(r[0]))
            u = usage.get(aid)
            if u is None:
                row = conn.execute(
                    "SELECT quota_bytes, quota_messages, used_bytes, used_messages FROM account WHERE id = ?", (aid,)
                ).fetchone()
                if row is None:
                    raise NotFound("no such account")
                u = usage[aid] = [row[0], row[1], int(row[2]), int(row[3]), 0, 0]
            add_b = sum(e[0].size for e in spec.entries)
            add_n = len(spec.entries)
            qb, qm = u[0], u[1]
            if add_b > 0 and qb is not None and u[2] + u[4] + add_b > qb:
                raise QuotaExceeded("mailbox storage quota exceeded", resource="STORAGE")
            if add_n > 0 and qm is not None and u[3] + u[5] + add_n > qm:
                raise QuotaExceeded("mailbox message-count quota exceeded", resource="MESSAGE")
            u[4] += add_b
            u[5] += add_n
            per_mailbox.setdefault(mid, []).append(k)
            targets.append((aid, mid, spec))
        # 2. UIDs and modseqs: one statement per mailbox
        now = _now_us()
        firsts: dict[int, tuple[int, int, int]] = {}  # request index -> (first uid, modseq, uidvalidity)
        for mid, idxs in per_mailbox.items():
            total = sum(len(targets[k][2].entries) for k in idxs)
            mb = conn.execute(
                "UPDATE mailbox SET uidnext = uidnext + ?, highestmodseq = highestmodseq + ?"
                " WHERE id = ? AND account_id = ? RETURNING uidnext, highestmodseq, uidvalidity",
                (total, len(idxs), mid, targets[idxs[0]][0]),
            ).fetchall()
            if not mb:
                raise NotFound("no such mailbox")
            uid = int(mb[0][0]) - total
            if uid + total - 1 > MAX_UID:
                raise NotPermitted("the mailbox has run out of UIDs")
            modseq = int(mb[0][1]) - len(idxs)
            uv = int(mb[0][2])
            for k in idxs:
                modseq += 1
                firsts[k] = (uid, modseq, uv)
                uid += len(targets[k][2].entries)
        # 3. usage, blob rows, message rows
        for aid, u in usage.items():
            conn.execute(
                "UPDATE account SET used_bytes = used_bytes + ?, used_messages = used_messages + ? WHERE id = ?",
                (u[4], u[5], aid),
            )
        later = self.has_index and self.background_max > 1  # index rows: background flush
        blob_rows: list[tuple[str, int, bytes | None, int | None, int | None]] = []
        new_blobs: list[_Blob] = []
        msg_rows: list[tuple[int, int, str, int, int, int, str, int, int, int]] = []
        out: list[tuple[_WriteRequest, bool, Any, _Tx | None]] = []
        for k, (req, (aid, mid, spec)) in enumerate(zip(run, targets, strict=True)):
            uid, modseq, uv = firsts[k]
            results: list[AppendResult] = []
            for blob, flags, idate, sdate in spec.entries:
                blob_rows.append(_blob_row(blob, not later))
                new_blobs.append(blob)
                msg_rows.append(
                    (
                        mid,
                        uid,
                        blob.id,
                        blob.size,
                        idate,
                        sdate if sdate is not None else now,
                        _flags_text(flags),
                        int("\\Seen" in flags),
                        int("\\Deleted" in flags),
                        modseq,
                    )
                )
                results.append(AppendResult(mid, UidValidity(uv), Uid(uid), ModSeq(modseq)))
                uid += 1
            tx = _Tx(conn)
            tx.changes.append(Change(aid, ChangeKind.APPEND, mid, ModSeq(modseq), tuple(r.uid for r in results)))
            out.append((req, True, results, tx))
        conn.executemany(self._blob_insert_sql, blob_rows)
        first_tx = out[0][3]
        assert first_tx is not None
        if later:
            first_tx.index_later.extend(b for b in new_blobs if b.index is not None)
        elif self.has_index:
            _insert_index(conn, new_blobs)
        conn.executemany(
            "INSERT INTO message (mailbox_id, uid, blob_id, size, internaldate, savedate, flags, seen, deleted,"
            " modseq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            msg_rows,
        )
        return out

    def _finish(self, outcomes: list[tuple[_WriteRequest, bool, Any, _Tx | None]]) -> None:
        """After the commit: unpin, remove dead blob files, publish, resolve futures."""
        changes: list[Change] = []
        candidates: set[str] = set()
        outcomes = [o for o in outcomes if not o[0].finished]
        for req, ok, _value, tx in outcomes:
            req.finished = True
            for p in req.pins:
                self._blobs.unpin(p)
            if ok and tx is not None:
                changes.extend(tx.changes)
                candidates |= tx.dead_blobs
                if tx.index_later:
                    self._index_pending.extend(tx.index_later)
                for cb in tx.after_commit:
                    try:
                        cb()
                    except Exception:
                        log.exception("store: after-commit hook failed")
            elif not ok:
                candidates.update(req.new_blobs)
        if candidates:
            # Before the callers hear back: once a delete returned, its files are gone.
            self._remove_dead(candidates)
        if any(ok for _, ok, _, _ in outcomes):
            self._ckpt_wake.set()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._resolve, [(r.future, ok, v) for r, ok, v, _ in outcomes], changes)

    def _checkpointer_main(self) -> None:
        """PASSIVE checkpoints from a connection of its own, a little after commits: they copy
        what no reader still needs and never wait for readers or block the writer (SQLite's
        checkpointer lock is not the write lock). Idle when nothing is written."""
        conn: sqlite3.Connection | None = None
        try:
            # close() sets _ckpt_stop before _ckpt_wake: checking stop after every wake-up (and
            # after every clear) means a wake-up consumed here can never hide the stop.
            while not self._ckpt_stop.is_set():
                self._ckpt_wake.wait()
                if self._ckpt_stop.is_set() or self._ckpt_stop.wait(self.checkpoint_interval):
                    return
                self._ckpt_wake.clear()  # commits from now on ask for the next round
                try:
                    if conn is None:
                        conn = _connect(self._db_path, self._inline_path)  # checkpoints both
                    row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.last_checkpoint = (int(row[0]), int(row[1]), int(row[2]))
                except sqlite3.Error as exc:  # the writer's automatic checkpoint still runs
                    log.warning("store %s: checkpoint failed: %s", self.path, exc)
                    self._ckpt_stop.wait(1.0)
        finally:
            if conn is not None:
                conn.close()

    def _remove_dead(self, candidates: set[str]) -> None:
        with self._gc_lock:
            if self._gc_paused or self._gc_paused_elsewhere():
                self._gc_deferred |= candidates
                return
            if self._gc_deferred:  # left by another process's pause: try them again now
                candidates = candidates | self._gc_deferred
                self._gc_deferred = set()
        conn = self._wconn
        assert conn is not None
        # The check and the removals under the write lock (a batch holds it already; clean-up
        # requests take it here; the writer loop releases it): no other process commits a new
        # reference to the same bytes in between.
        self._lock_writes()
        dead: list[str] = []
        for blob_id in candidates:
            try:
                row = conn.execute("SELECT 1 FROM blob WHERE id = ?", (blob_id,)).fetchone()
            except sqlite3.Error:
                continue
            if row is None:
                self._blobs.remove_if_unpinned(blob_id)
                dead.append(blob_id)
        if dead and self._pconn is not None:
            # Not synced: bytes a crash brings back are dropped at the next open.
            pconn = self._pconn
            try:
                pconn.execute("PRAGMA synchronous = NORMAL")
                pconn.execute("BEGIN IMMEDIATE")
                pconn.executemany("DELETE FROM blob_inline WHERE id = ?", [(d,) for d in dead])
                pconn.execute("COMMIT")
            except sqlite3.Error as exc:
                log.warning("store %s: removing inline bytes failed (dropped at the next open): %s", self.path, exc)
                if pconn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        pconn.execute("ROLLBACK")
            finally:
                with contextlib.suppress(sqlite3.Error):
                    pconn.execute("PRAGMA synchronous = FULL")

    def _resolve(self, results: list[tuple[asyncio.Future[Any] | None, bool, Any]], changes: list[Change]) -> None:
        self._publish(changes)
        if changes and self._relay is not None:
            try:
                self._relay(changes)
            except Exception:
                log.exception("store: relaying changes to the other workers failed")
        for fut, ok, value in results:
            if fut is None or fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value if isinstance(value, BaseException) else StoreError("write failed"))

    def set_change_relay(self, relay: Callable[[list[Change]], None] | None) -> None:
        """``serve --workers N``: ``relay`` gets every batch of changes committed by this process
        (on the event loop), for the other processes' feeds. Not part of the Store protocol."""
        self._relay = relay

    def inject_changes(self, changes: Sequence[Change]) -> None:
        """Changes another process committed: to this process's subscribers (event loop only)."""
        self._publish(changes)

    def _publish(self, changes: Sequence[Change]) -> None:
        watchers = self._subs.get(ALL_ACCOUNTS, ())
        for ch in changes:
            for sub in list(self._subs.get(ch.account_id, ())):
                sub._put(ch)
            for sub in list(watchers):
                sub._put(ch)
    # ------------------------------------------------------------------------------- backfill
    def _backfill_main(self) -> None:
        """Index the blobs stored before schema version 4 (fts NULL), in the background: read and
        parse a batch here, then hand one write per batch to the writer (bounded, so that writes
        of clients queue behind at most one batch). Until a blob is indexed, searches scan it."""
        last = ""
        total = 0
        try:
            conn = _connect(self._db_path, self._inline_path)
        except sqlite3.Error:
            log.exception("store %s: full-text backfill cannot start", self.path)
            return
        try:
            while not self._backfill_stop.is_set():
                ids = [r[0] for r in conn.execute(
                    "SELECT id FROM blob INDEXED BY blob_unindexed WHERE fts IS NOT 1 AND fts IS NULL AND id > ?"
                    " ORDER BY id LIMIT ?", (last, self.backfill_batch))]
                if not ids:
                    break
                last = ids[-1]
                blobs: list[_Blob] = []
                failed: list[str] = []
                for blob_id in ids:
                    try:
                        data = self._blob_bytes_sync(conn, blob_id)
                    except (OSError, StoreError, NotFound):
                        failed.append(blob_id)  # checked by `postfach check`; scanned meanwhile
                        continue
                    _info, index = _parse_for_ingest(data)
                    if index is None:
                        failed.append(blob_id)
                    else:
                        blobs.append(_Blob(blob_id, len(data), None, None, index))
                    if self._backfill_stop.is_set():
                        return
                done: concurrent.futures.Future[None] = concurrent.futures.Future()
                self._wq.put(_WriteRequest(_backfill_write(blobs, failed), done))  # type: ignore[arg-type]
                try:
                    done.result()
                except Exception:
                    log.exception("store %s: full-text backfill write failed; retried at the next open", self.path)
                    return
                total += len(ids)
                self.backfilled = total
                time.sleep(0.005)  # a breath for the readers between batches
        finally:
            conn.close()
            if total:
                log.info("store %s: full-text index built for %d blobs stored before it", self.path, total)

    # --------------------------------------------------------------------------------- ingest
    def _ingest_one(self, data: bytes) -> _Blob:
        blob_id = sha256_hex(data)
        inline = data if len(data) <= self.inline_max else None
        if inline is not None:
            # Small: the bytes go into the same transaction as the rows (no file, no pin: a
            # concurrent delete of the same content is ordered by the writer).
            info, index = _parse_for_ingest(data) if self.has_index else (_parse_info(data), None)
            return _Blob(blob_id, len(data), info, wire_flags(data), index, inline)
        self._blobs.pin(blob_id)
        try:
            created = self._blobs.ensure(blob_id, data)
        except BaseException:
            self._blobs.unpin(blob_id)
            raise
        del created  # parsed either way: the row may be new even when the file is not
        info, index = _parse_for_ingest(data) if self.has_index else (_parse_info(data), None)
        return _Blob(blob_id, len(data), info, wire_flags(data), index, inline)

    # ------------------------------------------------------------------ transaction building blocks
    def _incref(self, tx: _Tx, blobs: Sequence[_Blob]) -> None:
        # info is None when the file existed already (its row committed by a concurrent writer,
        # or removed meanwhile): message_info then parses on demand.
        later = self.has_index and self.background_max > 1
        tx.conn.executemany(self._blob_insert_sql, [_blob_row(b, not later) for b in blobs])
        if later:
            tx.index_later.extend(b for b in blobs if b.index is not None)
        elif self.has_index:
            _insert_index(tx.conn, blobs)


    @staticmethod
    def _decref(tx: _Tx, counts: Counter[str]) -> None:
        conn = tx.conn
        for blob_id, n in counts.items():
            conn.execute("UPDATE blob SET refcount = refcount - ? WHERE id = ?", (n, blob_id))
            row = conn.execute("SELECT refcount FROM blob WHERE id = ?", (blob_id,)).fetchone()
            if row is not None and row[0] <= 0:
                conn.execute("DELETE FROM blob WHERE id = ?", (blob_id,))
                tx.dead_blobs.add(blob_id)

    @staticmethod
    def _mailbox_row(conn: sqlite3.Connection, account_id: AccountId, mailbox_id: MailboxId) -> sqlite3.Row:
        row = conn.execute(
            "SELECT id, name, uidvalidity, uidnext, highestmodseq FROM mailbox WHERE id = ? AND account_id = ?",
            (mailbox_id, account_id),
        ).fetchone()
        if row is None:
            raise NotFound("no such mailbox")
        return row  # type: ignore[no-any-return]

    @staticmethod
    def _check_quota(conn: sqlite3.Connection, account_id: AccountId, add_bytes: int, add_messages: int) -> None:
        row = conn.execute(
            "SELECT quota_bytes, quota_messages, used_bytes, used_messages FROM account WHERE id = ?",
            (account_id,),
        ).fetchone()
        if row is None:
            raise NotFound("no such account")
        qb, qm, ub, um = row
        if add_bytes > 0 and qb is not None and ub + add_bytes > qb:
            raise QuotaExceeded("mailbox storage quota exceeded", resource="STORAGE")
        if add_messages > 0 and qm is not None and um + add_messages > qm:
            raise QuotaExceeded("mailbox message-count quota exceeded", resource="MESSAGE")

    @staticmethod
    def _add_usage(
        conn: sqlite3.Connection, account_id: AccountId, add_bytes: int, add_messages: int, *, check: bool = False
    ) -> None:
        """Adjust usage; with ``check``, refuse (QuotaExceeded) when the result is over quota.
        The caller's transaction (or savepoint) is rolled back on the exception."""
        if not (add_bytes or add_messages or check):
            return
        row = conn.execute(
            "UPDATE account SET used_bytes = used_bytes + ?, used_messages = used_messages + ? WHERE id = ?"
            " RETURNING quota_bytes, quota_messages, used_bytes, used_messages",
            (add_bytes, add_messages, account_id),
        ).fetchall()
        if not row:
            raise NotFound("no such account")
        if check:
            qb, qm, ub, um = row[0]
            if add_bytes > 0 and qb is not None and ub > qb:
                raise QuotaExceeded("mailbox storage quota exceeded", resource="STORAGE")
            if add_messages > 0 and qm is not None and um > qm:
                raise QuotaExceeded("mailbox message-count quota exceeded", resource="MESSAGE")

    def _insert_messages(
        self,
        tx: _Tx,
        account_id: AccountId,
        mailbox_id: MailboxId,
        entries: Sequence[tuple[_Blob, frozenset[str], int, int | None]],
        *,
        check_quota: bool = True,
        count_usage: bool = True,
    ) -> tuple[UidValidity, list[Uid], ModSeq]:
        """entries: (blob, normalized flags, internaldate µs, savedate µs or None=now)."""
        conn = tx.conn
        n = len(entries)
        total = sum(b.size for b, _, _, _ in entries)
        if count_usage:
            self._add_usage(conn, account_id, total, n, check=check_quota)
        elif check_quota:
            self._check_quota(conn, account_id, total, n)
        # One statement takes the UIDs and the modseq (few statements: each one costs a GIL
        # round trip in the writer thread).
        mb = conn.execute(
            "UPDATE mailbox SET uidnext = uidnext + ?, highestmodseq = highestmodseq + 1"
            " WHERE id = ? AND account_id = ? RETURNING uidnext, highestmodseq, uidvalidity",
            (n, mailbox_id, account_id),
        ).fetchall()
        if not mb:
            raise NotFound("no such mailbox")
        first = int(mb[0][0]) - n
        if first + n - 1 > MAX_UID:
            raise NotPermitted("the mailbox has run out of UIDs")
        modseq = int(mb[0][1])
        now = _now_us()
        rows = []
        uids: list[Uid] = []
        for i, (blob, flags, idate, sdate) in enumerate(entries):
            uid = first + i
            rows.append(
                (
                    mailbox_id,
                    uid,
                    blob.id,
                    blob.size,
                    idate,
                    sdate if sdate is not None else now,
                    _flags_text(flags),
                    int("\\Seen" in flags),
                    int("\\Deleted" in flags),
                    modseq,
                )
            )
            uids.append(Uid(uid))
        self._incref(tx, [b for b, _, _, _ in entries])
        conn.executemany(
            "INSERT INTO message (mailbox_id, uid, blob_id, size, internaldate, savedate, flags, seen, deleted,"
            " modseq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        tx.changes.append(Change(account_id, ChangeKind.APPEND, mailbox_id, ModSeq(modseq), tuple(uids)))
        return UidValidity(int(mb[0][2])), uids, ModSeq(modseq)

    def _remove_messages(
        self,
        tx: _Tx,
        account_id: AccountId,
        mailbox_id: MailboxId,
        rows: Sequence[sqlite3.Row],
        *,
        count_usage: bool = True,
        log_expunge: bool = True,
    ) -> list[Uid]:
        """Delete the given message rows (uid, blob_id, size), log the expunge with a new modseq."""
        if not rows:
            return []
        conn = tx.conn
        uids = sorted(int(r["uid"]) for r in rows)
        modseq = 0
        if log_expunge:
            mb = conn.execute("SELECT highestmodseq FROM mailbox WHERE id = ?", (mailbox_id,)).fetchone()
            modseq = int(mb[0]) + 1
            conn.execute("UPDATE mailbox SET highestmodseq = ? WHERE id = ?", (modseq, mailbox_id))
        conn.executemany("DELETE FROM message WHERE mailbox_id = ? AND uid = ?", [(mailbox_id, u) for u in uids])
        if log_expunge:
            conn.executemany(
                "INSERT OR REPLACE INTO expunged (mailbox_id, uid, modseq) VALUES (?, ?, ?)",
                [(mailbox_id, u, modseq) for u in uids],
            )
        self._decref(tx, Counter(str(r["blob_id"]) for r in rows))
        if count_usage:
            self._add_usage(conn, account_id, -sum(int(r["size"]) for r in rows), -len(rows))
        if log_expunge:
            tx.changes.append(
                Change(account_id, ChangeKind.EXPUNGE, mailbox_id, ModSeq(modseq), tuple(Uid(u) for u in uids))
            )
        return [Uid(u) for u in uids]

    @staticmethod
    def _select_uids(
        conn: sqlite3.Connection, mailbox_id: MailboxId, uids: Sequence[Uid], cols: str, extra: str = ""
    ) -> list[sqlite3.Row]:
        out: list[sqlite3.Row] = []
        wanted = sorted(set(int(u) for u in uids))
        for chunk in _chunks(wanted):
            q = ",".join("?" * len(chunk))
            out.extend(
                conn.execute(
                    f"SELECT {cols} FROM message WHERE mailbox_id = ? AND uid IN ({q}) {extra} ORDER BY uid",
                    (mailbox_id, *chunk),
                ).fetchall()
            )
        out.sort(key=lambda r: int(r["uid"]))
        return out

    @staticmethod
    def _drop_mailbox_rows(conn: sqlite3.Connection, account_id: AccountId, mailbox_ids: Sequence[int]) -> None:
        """The rows that live and die with a mailbox: expunge history and METADATA entries."""
        for mid in mailbox_ids:
            conn.execute("DELETE FROM expunged WHERE mailbox_id = ?", (mid,))
            conn.execute("DELETE FROM expunge_mark WHERE mailbox_id = ?", (mid,))
            conn.execute("DELETE FROM expunge_floor WHERE mailbox_id = ?", (mid,))
            conn.execute("DELETE FROM metadata WHERE account_id = ? AND mailbox_id = ?", (account_id, mid))

    @staticmethod
    def _next_uidvalidity(conn: sqlite3.Connection) -> int:
        """Time-based and strictly increasing across the whole store, so a mailbox deleted and
        created again under the same name never repeats a UIDVALIDITY (RFC 9051 §2.3.1.1)."""
        row = conn.execute("SELECT value FROM counter WHERE name = 'uidvalidity'").fetchone()
        last = int(row[0]) if row else 0
        value = max(int(time.time()), last + 1)
        conn.execute(
            "INSERT INTO counter (name, value) VALUES ('uidvalidity', ?)"
            " ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (value,),
        )
        return value

    def _create_mailbox_tx(self, tx: _Tx, account_id: AccountId, name: str, special_use: str | None) -> MailboxId:
        conn = tx.conn
        try:
            cur = conn.execute(
                "INSERT INTO mailbox (account_id, name, special_use, uidvalidity) VALUES (?, ?, ?, ?)",
                (account_id, name, special_use, self._next_uidvalidity(conn)),
            )
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"mailbox {name!r} exists already") from exc
        mid = MailboxId(int(cur.lastrowid or 0))
        tx.changes.append(Change(account_id, ChangeKind.MAILBOX_CREATE, mid, name=name))
        return mid

    # ----------------------------------------------------------------------------------- domains
    async def add_domain(self, name: str, quota_bytes: int | None = None) -> Domain:
        name = name.strip().lower().rstrip(".")
        if not name:
            raise NotPermitted("empty domain name")

        def fn(tx: _Tx) -> Domain:
            now = _now_us()
            try:
                tx.conn.execute(
                    "INSERT INTO domain (name, created, quota_bytes) VALUES (?, ?, ?)", (name, now, quota_bytes)
                )
            except sqlite3.IntegrityError as exc:
                raise AlreadyExists(f"domain {name} exists already") from exc
            return Domain(name, _from_us(now), quota_bytes)

        return await self._write(fn)

    async def list_domains(self) -> list[Domain]:
        def fn(conn: sqlite3.Connection) -> list[Domain]:
            return [
                Domain(r["name"], _from_us(r["created"]), r["quota_bytes"])
                for r in conn.execute("SELECT * FROM domain ORDER BY name")
            ]

        return await self._read(fn)

    async def get_domain(self, name: str) -> Domain | None:
        name = name.strip().lower().rstrip(".")

        def fn(conn: sqlite3.Connection) -> Domain | None:
            r = conn.execute("SELECT * FROM domain WHERE name = ?", (name,)).fetchone()
            return Domain(r["name"], _from_us(r["created"]), r["quota_bytes"]) if r else None

        return await self._point_read(fn)

    async def delete_domain(self, name: str) -> None:
        name = name.strip().lower().rstrip(".")

        def fn(tx: _Tx) -> None:
            conn = tx.conn
            if conn.execute("SELECT 1 FROM domain WHERE name = ?", (name,)).fetchone() is None:
                raise NotFound(f"no domain {name}")
            if conn.execute("SELECT 1 FROM account WHERE domain = ? LIMIT 1", (name,)).fetchone():
                raise NotPermitted(f"domain {name} still has accounts")
            conn.execute("DELETE FROM alias WHERE domain = ?", (name,))
            conn.execute("DELETE FROM domain WHERE name = ?", (name,))

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

        def fn(tx: _Tx) -> AccountId:
            conn = tx.conn
            d = conn.execute("SELECT quota_bytes FROM domain WHERE name = ?", (domain,)).fetchone()
            if d is None:
                raise NotFound(f"no domain {domain}")
            qb = quota_bytes if quota_bytes is not None else d[0]
            try:
                cur = conn.execute(
                    "INSERT INTO account (address, domain, password_hash, quota_bytes, quota_messages, created)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (address, domain, password_hash, qb, quota_messages, _now_us()),
                )
            except sqlite3.IntegrityError as exc:
                raise AlreadyExists(f"account {address} exists already") from exc
            aid = AccountId(int(cur.lastrowid or 0))
            for name, special in DEFAULT_MAILBOXES:
                self._create_mailbox_tx(tx, aid, name, special)
                conn.execute("INSERT OR IGNORE INTO subscription (account_id, name) VALUES (?, ?)", (aid, name))
            return aid

        aid = await self._write(fn)
        acct = await self.get_account_by_id(aid)
        assert acct is not None
        return acct

    async def get_account(self, address: str) -> Account | None:
        address = _norm_address(address)

        def fn(conn: sqlite3.Connection) -> Account | None:
            r = conn.execute("SELECT * FROM account WHERE address = ?", (address,)).fetchone()
            return _account(r) if r else None

        return await self._point_read(fn)

    async def get_account_by_id(self, account_id: AccountId) -> Account | None:
        def fn(conn: sqlite3.Connection) -> Account | None:
            r = conn.execute("SELECT * FROM account WHERE id = ?", (account_id,)).fetchone()
            return _account(r) if r else None

        return await self._point_read(fn)

    async def list_accounts(self, domain: str | None = None) -> list[Account]:
        def fn(conn: sqlite3.Connection) -> list[Account]:
            if domain is None:
                rows = conn.execute("SELECT * FROM account ORDER BY address")
            else:
                rows = conn.execute(
                    "SELECT * FROM account WHERE domain = ? ORDER BY address", (domain.strip().lower(),)
                )
            return [_account(r) for r in rows]

        return await self._read(fn)

    async def set_password(self, account_id: AccountId, password_hash: str) -> None:
        def fn(tx: _Tx) -> None:
            cur = tx.conn.execute("UPDATE account SET password_hash = ? WHERE id = ?", (password_hash, account_id))
            if cur.rowcount == 0:
                raise NotFound("no such account")
            tx.changes.append(Change(account_id, ChangeKind.ACCOUNT))

        await self._write(fn)

    async def set_quota(self, account_id: AccountId, quota_bytes: int | None, quota_messages: int | None) -> None:
        def fn(tx: _Tx) -> None:
            cur = tx.conn.execute(
                "UPDATE account SET quota_bytes = ?, quota_messages = ? WHERE id = ?",
                (quota_bytes, quota_messages, account_id),
            )
            if cur.rowcount == 0:
                raise NotFound("no such account")
            tx.changes.append(Change(account_id, ChangeKind.ACCOUNT))

        await self._write(fn)

    async def delete_account(self, account_id: AccountId) -> None:
        def fn(tx: _Tx) -> None:
            conn = tx.conn
            if conn.execute("SELECT 1 FROM account WHERE id = ?", (account_id,)).fetchone() is None:
                raise NotFound("no such account")
            counts: Counter[str] = Counter()
            for r in conn.execute(
                "SELECT m.blob_id, count(*) FROM message m JOIN mailbox b ON b.id = m.mailbox_id"
                " WHERE b.account_id = ? GROUP BY m.blob_id",
                (account_id,),
            ):
                counts[r[0]] += int(r[1])
            mids = [r[0] for r in conn.execute("SELECT id FROM mailbox WHERE account_id = ?", (account_id,))]
            for mid in mids:
                conn.execute("DELETE FROM message WHERE mailbox_id = ?", (mid,))
            self._drop_mailbox_rows(conn, account_id, mids)
            conn.execute("DELETE FROM metadata WHERE account_id = ?", (account_id,))
            conn.execute("DELETE FROM mailbox WHERE account_id = ?", (account_id,))
            conn.execute("DELETE FROM subscription WHERE account_id = ?", (account_id,))
            conn.execute("DELETE FROM account WHERE id = ?", (account_id,))
            self._decref(tx, counts)
            tx.changes.append(Change(account_id, ChangeKind.ACCOUNT))

        await self._write(fn)

    # ----------------------------------------------------------------------------------- aliases
    async def add_alias(self, source: str, target: str) -> Alias:
        source = _norm_address(source)
        target = target.strip()
        domain = source.rpartition("@")[2]
        if "@" not in source or not domain or not target:
            raise NotPermitted("an alias needs local@domain (or @domain) and a target")

        def fn(tx: _Tx) -> Alias:
            if tx.conn.execute("SELECT 1 FROM domain WHERE name = ?", (domain,)).fetchone() is None:
                raise NotFound(f"no domain {domain}")
            try:
                tx.conn.execute("INSERT INTO alias (source, target, domain) VALUES (?, ?, ?)", (source, target, domain))
            except sqlite3.IntegrityError as exc:
                raise AlreadyExists(f"alias {source} -> {target} exists already") from exc
            return Alias(source, target)

        return await self._write(fn)

    async def list_aliases(self, domain: str | None = None) -> list[Alias]:
        def fn(conn: sqlite3.Connection) -> list[Alias]:
            if domain is None:
                rows = conn.execute("SELECT source, target FROM alias ORDER BY source, target")
            else:
                rows = conn.execute(
                    "SELECT source, target FROM alias WHERE domain = ? ORDER BY source, target",
                    (domain.strip().lower(),),
                )
            return [Alias(r[0], r[1]) for r in rows]

        return await self._read(fn)

    async def delete_alias(self, source: str, target: str) -> None:
        source = _norm_address(source)
        target = target.strip()

        def fn(tx: _Tx) -> None:
            cur = tx.conn.execute("DELETE FROM alias WHERE source = ? AND target = ?", (source, target))
            if cur.rowcount == 0:
                raise NotFound(f"no alias {source} -> {target}")

        await self._write(fn)

    async def aliases_for(self, source: str) -> list[Alias]:
        source = _norm_address(source)

        def fn(conn: sqlite3.Connection) -> list[Alias]:
            rows = conn.execute("SELECT source, target FROM alias WHERE source = ? ORDER BY target", (source,))
            return [Alias(r[0], r[1]) for r in rows]

        return await self._point_read(fn)

    # --------------------------------------------------------------------------------- mailboxes
    async def list_mailboxes(self, account_id: AccountId) -> list[Mailbox]:
        def fn(conn: sqlite3.Connection) -> list[Mailbox]:
            rows = conn.execute(
                f"SELECT {_MAILBOX_COLS} FROM mailbox m WHERE m.account_id = ? ORDER BY m.name <> 'INBOX', m.name",
                (account_id,),
            )
            return [_mailbox(r) for r in rows]

        return await self._read(fn)

    async def get_mailbox(self, account_id: AccountId, name: str) -> Mailbox | None:
        name = _norm_mailbox_name(name)

        def fn(conn: sqlite3.Connection) -> Mailbox | None:
            r = conn.execute(
                f"SELECT {_MAILBOX_COLS} FROM mailbox m WHERE m.account_id = ? AND m.name = ?", (account_id, name)
            ).fetchone()
            return _mailbox(r) if r else None

        return await self._point_read(fn)

    async def get_mailbox_by_id(self, account_id: AccountId, mailbox_id: MailboxId) -> Mailbox | None:
        def fn(conn: sqlite3.Connection) -> Mailbox | None:
            r = conn.execute(
                f"SELECT {_MAILBOX_COLS} FROM mailbox m WHERE m.account_id = ? AND m.id = ?",
                (account_id, mailbox_id),
            ).fetchone()
            return _mailbox(r) if r else None

        return await self._point_read(fn)

    async def create_mailbox(self, account_id: AccountId, name: str, special_use: str | None = None) -> Mailbox:
        name = _norm_mailbox_name(name)
        if not name:
            raise NotPermitted("empty mailbox name")

        def fn(tx: _Tx) -> MailboxId:
            if tx.conn.execute("SELECT 1 FROM account WHERE id = ?", (account_id,)).fetchone() is None:
                raise NotFound("no such account")
            return self._create_mailbox_tx(tx, account_id, name, special_use)

        mid = await self._write(fn)
        mb = await self.get_mailbox_by_id(account_id, mid)
        assert mb is not None
        return mb

    async def delete_mailbox(self, account_id: AccountId, mailbox_id: MailboxId) -> None:
        def fn(tx: _Tx) -> None:
            conn = tx.conn
            mb = self._mailbox_row(conn, account_id, mailbox_id)
            if mb["name"] == "INBOX":
                raise NotPermitted("INBOX cannot be deleted")
            rows = conn.execute("SELECT uid, blob_id, size FROM message WHERE mailbox_id = ?", (mailbox_id,)).fetchall()
            self._remove_messages(tx, account_id, mailbox_id, rows, log_expunge=False)
            self._drop_mailbox_rows(conn, account_id, [mailbox_id])
            conn.execute("DELETE FROM mailbox WHERE id = ?", (mailbox_id,))
            tx.changes.append(Change(account_id, ChangeKind.MAILBOX_DELETE, mailbox_id, name=mb["name"]))

        await self._write(fn)

    async def rename_mailbox(self, account_id: AccountId, mailbox_id: MailboxId, new_name: str) -> None:
        new_name = _norm_mailbox_name(new_name)
        if not new_name:
            raise NotPermitted("empty mailbox name")

        def fn(tx: _Tx) -> None:
            conn = tx.conn
            mb = self._mailbox_row(conn, account_id, mailbox_id)
            old = str(mb["name"])
            if new_name == old:
                raise AlreadyExists(f"mailbox {new_name!r} exists already")
            if conn.execute(
                "SELECT 1 FROM mailbox WHERE account_id = ? AND name = ?", (account_id, new_name)
            ).fetchone():
                raise AlreadyExists(f"mailbox {new_name!r} exists already")
            if old == "INBOX":
                # RFC 9051 §6.3.6: INBOX's messages move to a new mailbox of the new name, INBOX
                # stays (empty); INBOX's children are not affected.
                dest = self._create_mailbox_tx(tx, account_id, new_name, None)
                # RFC 5464 §4.1: INBOX's annotations are copied to the new mailbox (and kept).
                conn.execute(
                    "INSERT INTO metadata (account_id, mailbox_id, name, value)"
                    " SELECT account_id, ?, name, value FROM metadata WHERE account_id = ? AND mailbox_id = ?",
                    (dest, account_id, mailbox_id),
                )
                rows = conn.execute(
                    f"SELECT {_MESSAGE_COLS} FROM message WHERE mailbox_id = ? ORDER BY uid", (mailbox_id,)
                ).fetchall()
                if rows:
                    self._insert_messages(
                        tx,
                        account_id,
                        dest,
                        [
                            (_Blob(r["blob_id"], r["size"], None), _flags_from(r["flags"]), r["internaldate"], None)
                            for r in rows
                        ],
                        check_quota=False,
                        count_usage=False,
                    )
                    self._remove_messages(tx, account_id, mailbox_id, rows, count_usage=False)
                return
            if new_name.startswith(old + HIERARCHY_DELIMITER):
                raise NotPermitted("a mailbox cannot be moved below itself")
            prefix = old + HIERARCHY_DELIMITER
            children = [
                (int(r[0]), str(r[1]))
                for r in conn.execute(
                    "SELECT id, name FROM mailbox WHERE account_id = ? AND substr(name, 1, ?) = ?",
                    (account_id, len(prefix), prefix),
                )
            ]
            renames = [(mailbox_id, old, new_name)] + [
                (cid, cname, new_name + cname[len(old) :]) for cid, cname in children
            ]
            for _, _, nn in renames[1:]:
                if conn.execute("SELECT 1 FROM mailbox WHERE account_id = ? AND name = ?", (account_id, nn)).fetchone():
                    raise AlreadyExists(f"mailbox {nn!r} exists already")
            # Two steps, so that renaming "a" -> "b" never collides with an old child name midway.
            for mid, _, _ in renames:
                conn.execute("UPDATE mailbox SET name = ? WHERE id = ?", (f"\x00renaming\x00{mid}", mid))
            for mid, oname, nn in renames:
                conn.execute("UPDATE mailbox SET name = ? WHERE id = ?", (nn, mid))
                # Subscriptions follow the mailbox, as in Dovecot.
                if conn.execute(
                    "DELETE FROM subscription WHERE account_id = ? AND name = ?", (account_id, oname)
                ).rowcount:
                    conn.execute(
                        "INSERT OR IGNORE INTO subscription (account_id, name) VALUES (?, ?)", (account_id, nn)
                    )
                tx.changes.append(Change(account_id, ChangeKind.MAILBOX_RENAME, MailboxId(mid), name=nn))

        await self._write(fn)

    async def set_subscribed(self, account_id: AccountId, name: str, subscribed: bool) -> None:
        name = _norm_mailbox_name(name)

        def fn(tx: _Tx) -> None:
            if tx.conn.execute("SELECT 1 FROM account WHERE id = ?", (account_id,)).fetchone() is None:
                raise NotFound("no such account")
            if subscribed:
                tx.conn.execute(
                    "INSERT OR IGNORE INTO subscription (account_id, name) VALUES (?, ?)", (account_id, name)
                )
            else:
                tx.conn.execute("DELETE FROM subscription WHERE account_id = ? AND name = ?", (account_id, name))

        await self._write(fn)

    async def list_subscriptions(self, account_id: AccountId) -> list[str]:
        def fn(conn: sqlite3.Connection) -> list[str]:
            return [
                r[0]
                for r in conn.execute(
                    "SELECT name FROM subscription WHERE account_id = ? ORDER BY name <> 'INBOX', name",
                    (account_id,),
                )
            ]

        return await self._read(fn)

    async def mailbox_status(self, account_id: AccountId, mailbox_id: MailboxId) -> MailboxStatus:
        def fn(conn: sqlite3.Connection) -> MailboxStatus:
            r = conn.execute(
                f"SELECT {_MAILBOX_COLS} FROM mailbox m WHERE m.account_id = ? AND m.id = ?",
                (account_id, mailbox_id),
            ).fetchone()
            if r is None:
                raise NotFound("no such mailbox")
            c = conn.execute(
                "SELECT count(*), coalesce(sum(1 - seen), 0), coalesce(sum(size), 0), coalesce(sum(deleted), 0),"
                " min(CASE WHEN seen = 0 THEN uid END) FROM message WHERE mailbox_id = ?",
                (mailbox_id,),
            ).fetchone()
            return MailboxStatus(
                mailbox=_mailbox(r),
                messages=int(c[0]),
                unseen=int(c[1]),
                size=int(c[2]),
                deleted=int(c[3]),
                first_unseen_uid=Uid(int(c[4])) if c[4] is not None else None,
            )

        return await self._read(fn)

    async def claim_recent(self, account_id: AccountId, mailbox_id: MailboxId) -> Uid:
        def fn(tx: _Tx) -> Uid:
            conn = tx.conn
            self._mailbox_row(conn, account_id, mailbox_id)
            r = conn.execute("SELECT recent_uid, uidnext FROM mailbox WHERE id = ?", (mailbox_id,)).fetchone()
            conn.execute("UPDATE mailbox SET recent_uid = uidnext WHERE id = ?", (mailbox_id,))
            return Uid(int(r[0]))

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
        now = _now_us()
        meta = [(normalize_flags(flags), _to_us(idate) if idate is not None else now) for _, flags, idate in items]

        def build(blobs: list[_Blob]) -> Callable[[_Tx], list[AppendResult]]:
            entries = [(blob, flags, idate, None) for blob, (flags, idate) in zip(blobs, meta, strict=True)]

            def fn(tx: _Tx) -> list[AppendResult]:
                uidvalidity, uids, modseq = self._insert_messages(tx, account_id, mailbox_id, entries)
                return [AppendResult(mailbox_id, uidvalidity, u, modseq) for u in uids]

            return fn

        return await self._ingest_write([bytes(d) for d, _, _ in items], build, (account_id, mailbox_id, "", meta))

    async def deliver(self, data: bytes, targets: Sequence[DeliveryTarget]) -> list[AppendResult]:
        if not targets:
            return []
        distinct: dict[bytes, int] = {}
        for t in targets:
            distinct.setdefault(t.prepend, len(distinct))
        datas = [p + data if p else data for p in distinct]
        now = _now_us()
        plan = [
            (t.account_id, _norm_mailbox_name(t.mailbox), normalize_flags(t.flags), distinct[t.prepend])
            for t in targets
        ]

        def build(blobs: list[_Blob]) -> Callable[[_Tx], list[AppendResult]]:
            def fn(tx: _Tx) -> list[AppendResult]:
                conn = tx.conn
                # Resolve every target and check every quota first: nothing is written if any fails.
                plans: list[tuple[AccountId, MailboxId, frozenset[str], _Blob]] = []
                need: dict[AccountId, tuple[int, int]] = {}
                for aid, name, flags, bi in plan:
                    blob = blobs[bi]
                    # The named folder, else INBOX (one query: the named one sorts first).
                    r = conn.execute(
                        "SELECT id FROM mailbox WHERE account_id = ? AND name IN (?, 'INBOX')"
                        " ORDER BY name = 'INBOX' LIMIT 1",
                        (aid, name),
                    ).fetchone()
                    if r is None:
                        raise NotFound(f"no such account (id {aid})")
                    plans.append((aid, MailboxId(int(r[0])), flags, blob))
                    b, n = need.get(aid, (0, 0))
                    need[aid] = (b + blob.size, n + 1)
                for aid, (b, n) in need.items():
                    self._check_quota(conn, aid, b, n)
                results: list[AppendResult] = []
                for aid, mid, flags, blob in plans:
                    uv, uids, modseq = self._insert_messages(
                        tx, aid, mid, [(blob, flags, now, None)], check_quota=False
                    )
                    results.append(AppendResult(mid, uv, uids[0], modseq))
                return results

            return fn

        single = None
        if len(plan) == 1:  # the common case: one recipient, mergeable with other appends
            aid, name, flags, _ = plan[0]
            single = (aid, None, name, [(flags, now)])
        return await self._ingest_write(datas, build, single)

    async def list_messages(self, account_id: AccountId, mailbox_id: MailboxId) -> list[MessageMeta]:
        def fn(conn: sqlite3.Connection) -> list[MessageMeta]:
            self._mailbox_row(conn, account_id, mailbox_id)
            cur = conn.cursor()
            cur.row_factory = None  # plain tuples: a 100,000-message mailbox in well under a second
            rows = cur.execute(f"SELECT {_MESSAGE_COLS} FROM message WHERE mailbox_id = ? ORDER BY uid", (mailbox_id,))
            return _metas(rows)

        return await self._read(fn)

    async def list_uids_sizes(
        self, account_id: AccountId, mailbox_id: MailboxId
    ) -> list[tuple[Uid, int, frozenset[str]]]:
        """(uid, size, flags) of every message, ascending by UID: one query, plain tuples, flag
        sets shared between messages with the same flags. For POP3 login and the first view of
        a large mailbox, where MessageMeta records for every message cost more than the query."""

        def fn(conn: sqlite3.Connection) -> list[tuple[Uid, int, frozenset[str]]]:
            self._mailbox_row(conn, account_id, mailbox_id)
            cur = conn.cursor()
            cur.row_factory = None
            rows = cur.execute("SELECT uid, size, flags FROM message WHERE mailbox_id = ? ORDER BY uid", (mailbox_id,))
            memo: dict[str, frozenset[str]] = {}
            out: list[tuple[Uid, int, frozenset[str]]] = []
            append = out.append
            for uid, size, flags in rows:
                f = memo.get(flags)
                if f is None:
                    f = memo[flags] = _flags_from(flags)
                append((uid, size, f))
            return out

        return await self._read(fn)

    async def get_messages(
        self, account_id: AccountId, mailbox_id: MailboxId, uids: Sequence[Uid]
    ) -> list[MessageMeta]:
        def fn(conn: sqlite3.Connection) -> list[MessageMeta]:
            self._mailbox_row(conn, account_id, mailbox_id)
            return [_meta(r) for r in self._select_uids(conn, mailbox_id, uids, _MESSAGE_COLS)]

        if len(uids) <= 16:
            # A few messages (POP3 RETR, an IMAP FETCH of one message): indexed reads, right here.
            # Two statements, two snapshots: harmless, a mailbox never changes its owner.
            return await self._point_read(fn)
        return await self._read(fn)

    async def mailbox_changes(self, account_id: AccountId, mailbox_id: MailboxId, since: ModSeq) -> MailboxChanges:
        def fn(conn: sqlite3.Connection, cap: int | None = None) -> MailboxChanges:
            r = conn.execute(
                f"SELECT {_MAILBOX_COLS},"
                " coalesce((SELECT f.modseq FROM expunge_floor f WHERE f.mailbox_id = m.id), 0) AS floor"
                " FROM mailbox m WHERE m.account_id = ? AND m.id = ?",
                (account_id, mailbox_id),
            ).fetchone()
            if r is None:
                raise NotFound("no such mailbox")
            # No ORDER BY uid in SQL: it would make SQLite walk the (mailbox, uid) key over the
            # whole mailbox instead of the modseq index; the changes are few, sort them here.
            cur = conn.execute(
                f"SELECT {_MESSAGE_COLS} FROM message INDEXED BY message_modseq WHERE mailbox_id = ? AND modseq > ?",
                (mailbox_id, since),
            )
            rows = cur.fetchall() if cap is None else _capped(cur, cap)
            changed = sorted((_meta(x) for x in rows), key=lambda m: m.uid)
            cur = conn.execute(
                "SELECT uid FROM expunged INDEXED BY expunged_modseq WHERE mailbox_id = ? AND modseq > ?",
                (mailbox_id, since),
            )
            gone = cur.fetchall() if cap is None else _capped(cur, cap)
            expunged = sorted(Uid(int(x[0])) for x in gone)
            return MailboxChanges(_mailbox(r), tuple(changed), tuple(expunged), ModSeq(int(r["floor"])))

        # Asked before nearly every IMAP command that follows a change: on the loop when small.
        return await self._snapshot_read(lambda conn: fn(conn, _LOOP_READ_ROWS), fn)

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

        def fn(tx: _Tx) -> StoreFlagsResult:
            conn = tx.conn
            mb = self._mailbox_row(conn, account_id, mailbox_id)
            rows = self._select_uids(conn, mailbox_id, uids, _MESSAGE_COLS)
            modseq = int(mb["highestmodseq"]) + 1
            updated: list[MessageMeta] = []
            unchanged: list[MessageMeta] = []
            modified: list[Uid] = []
            writes: list[tuple[str, int, int, int, int, int]] = []
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
                writes.append(
                    (_flags_text(new), int("\\Seen" in new), int("\\Deleted" in new), modseq, mailbox_id, meta.uid)
                )
                updated.append(
                    MessageMeta(
                        meta.uid, ModSeq(modseq), new, meta.size, meta.internaldate, meta.blob_id, meta.savedate
                    )
                )
            if writes:
                conn.executemany(
                    "UPDATE message SET flags = ?, seen = ?, deleted = ?, modseq = ? WHERE mailbox_id = ? AND uid = ?",
                    writes,
                )
                conn.execute("UPDATE mailbox SET highestmodseq = ? WHERE id = ?", (modseq, mailbox_id))
                tx.changes.append(
                    Change(account_id, ChangeKind.FLAGS, mailbox_id, ModSeq(modseq), tuple(m.uid for m in updated))
                )
            return StoreFlagsResult(tuple(updated), tuple(unchanged), tuple(modified))

        return await self._write(fn)

    async def expunge(
        self, account_id: AccountId, mailbox_id: MailboxId, uids: Sequence[Uid] | None = None
    ) -> list[Uid]:
        def fn(tx: _Tx) -> list[Uid]:
            conn = tx.conn
            self._mailbox_row(conn, account_id, mailbox_id)
            if uids is None:
                rows = conn.execute(
                    "SELECT uid, blob_id, size FROM message WHERE mailbox_id = ? AND deleted = 1", (mailbox_id,)
                ).fetchall()
            else:
                rows = self._select_uids(conn, mailbox_id, uids, "uid, blob_id, size", "AND deleted = 1")
            return self._remove_messages(tx, account_id, mailbox_id, rows)

        return await self._write(fn)

    async def delete_messages(self, account_id: AccountId, mailbox_id: MailboxId, uids: Sequence[Uid]) -> list[Uid]:
        def fn(tx: _Tx) -> list[Uid]:
            conn = tx.conn
            self._mailbox_row(conn, account_id, mailbox_id)
            rows = self._select_uids(conn, mailbox_id, uids, "uid, blob_id, size")
            return self._remove_messages(tx, account_id, mailbox_id, rows)

        return await self._write(fn)

    def _copy_tx(
        self,
        tx: _Tx,
        account_id: AccountId,
        source_id: MailboxId,
        uids: Sequence[Uid],
        dest_id: MailboxId,
        move: bool,
    ) -> CopyResult:
        conn = tx.conn
        self._mailbox_row(conn, account_id, source_id)
        dest = self._mailbox_row(conn, account_id, dest_id)
        rows = self._select_uids(conn, source_id, uids, _MESSAGE_COLS)
        if not rows:
            return CopyResult(UidValidity(int(dest["uidvalidity"])), (), ())
        entries = [
            (
                _Blob(r["blob_id"], r["size"], None),
                _flags_from(r["flags"]),
                int(r["internaldate"]),
                None,
            )
            for r in rows
        ]
        # A move within the account leaves usage unchanged; a copy counts every copy (as
        # Dovecot's quota does), and is refused as a whole when it does not fit.
        uv, new_uids, _ = self._insert_messages(
            tx, account_id, dest_id, entries, check_quota=not move, count_usage=not move
        )
        if move:
            self._remove_messages(tx, account_id, source_id, rows, count_usage=False)
        return CopyResult(uv, tuple(Uid(int(r["uid"])) for r in rows), tuple(new_uids))

    async def copy_messages(
        self, account_id: AccountId, source_id: MailboxId, uids: Sequence[Uid], dest_id: MailboxId
    ) -> CopyResult:
        return await self._write(lambda tx: self._copy_tx(tx, account_id, source_id, uids, dest_id, False))

    async def move_messages(
        self, account_id: AccountId, source_id: MailboxId, uids: Sequence[Uid], dest_id: MailboxId
    ) -> CopyResult:
        """RFC 6851 §3.3: new UIDs in the destination, then an expunge of the source messages,
        all in one transaction."""
        return await self._write(lambda tx: self._copy_tx(tx, account_id, source_id, uids, dest_id, True))

    async def read_message(self, account_id: AccountId, mailbox_id: MailboxId, uid: Uid) -> bytes:
        def fn(conn: sqlite3.Connection) -> str:
            r = conn.execute(
                "SELECT m.blob_id FROM message m JOIN mailbox b ON b.id = m.mailbox_id"
                " WHERE m.mailbox_id = ? AND m.uid = ? AND b.account_id = ?",
                (mailbox_id, uid, account_id),
            ).fetchone()
            if r is None:
                raise NotFound("no such message")
            return str(r[0])

        blob_id = await self._read(fn)
        return await self.read_blob(BlobId(blob_id))

    async def open_blob(self, blob_id: BlobId) -> _FileBlobReader:
        # Size and wire bits from the blob row (one indexed read, no thread hop); a file missing
        # behind the row's back shows up as NotFound at the first read.
        def fn(conn: sqlite3.Connection) -> tuple[int, int | None, bytes | None] | None:
            r = conn.execute(self._blob_open_sql, (blob_id,)).fetchall()
            return (int(r[0][0]), r[0][1], None if r[0][2] is None else bytes(r[0][2])) if r else None

        row = await self._point_read(fn)
        if row is None:
            raise NotFound("no such message data")
        return _FileBlobReader(self, blob_id, row[0], row[1], row[2])

    async def read_blob(self, blob_id: BlobId) -> bytes:
        data = await self._point_read(lambda conn: self._inline_bytes(conn, blob_id))
        if data is not None:
            return data
        return await self._in_blob_thread(self._blobs.read, blob_id)

    @staticmethod
    def _inline_bytes(conn: sqlite3.Connection, blob_id: str) -> bytes | None:
        r = conn.execute("SELECT data FROM inl.blob_inline WHERE id = ?", (blob_id,)).fetchone()
        return None if r is None else bytes(r[0])

    def _blob_bytes_sync(self, conn: sqlite3.Connection, blob_id: str) -> bytes:
        """A blob's bytes, inline or from its file (a thread with a connection of its own)."""
        data = self._inline_bytes(conn, blob_id)
        return data if data is not None else self._blobs.read(blob_id)

    # ------------------------------------------------------------------ full-text index, sort keys
    async def flush_index(self) -> None:
        """Index the new blobs the writer holds back for its next background flush, now; returns
        when they are in (tests, and whoever wants the index complete at a given moment)."""

        def fn(tx: _Tx) -> None:
            pending, self._index_pending = self._index_pending, []  # the writer thread's own list
            if pending:
                _backfill_write(pending, ())(tx)

        await self._write(fn)

    async def search_index(
        self, account_id: AccountId, mailbox_id: MailboxId, terms: Sequence[tuple[str, str]]
    ) -> SearchHits | None:
        query = fts_query(terms)
        if not self.has_index or query is None:
            return None
        usable = [(f, n) for f, n in terms if indexable(n)]
        exact: list[str] = []
        params: list[Any] = [query, mailbox_id]
        for f, n in usable:
            cols = INDEX_FIELDS[f]
            exact.append("(" + " OR ".join(f"instr(t.{c}, ?) > 0" for c in cols) + ")")
            params.extend([n] * len(cols))
        # CROSS JOIN fixes the order: the index first, then the few candidates' rows (left to
        # itself the planner would walk the whole mailbox and ask the index per message).
        sql = (
            "SELECT m.uid FROM blob_fts f CROSS JOIN blob_text t CROSS JOIN blob_key k CROSS JOIN message m"
            " WHERE blob_fts MATCH ? AND t.id = f.rowid AND k.id = f.rowid AND m.blob_id = k.blob_id"
            " AND m.mailbox_id = ? AND " + " AND ".join(exact)
        )

        def fn(conn: sqlite3.Connection) -> SearchHits:
            if conn.execute("SELECT 1 FROM mailbox WHERE id = ? AND account_id = ?",
                            (mailbox_id, account_id)).fetchone() is None:
                raise NotFound("no such mailbox")
            hits = frozenset(Uid(r[0]) for r in conn.execute(sql, params))
            rest = frozenset(Uid(r[0]) for r in conn.execute(
                "SELECT m.uid FROM blob b INDEXED BY blob_unindexed JOIN message m ON m.blob_id = b.id"
                " WHERE b.fts IS NOT 1 AND m.mailbox_id = ?", (mailbox_id,)))
            return SearchHits(hits, rest)

        return await self._read(fn)

    async def sort_rows(self, account_id: AccountId, mailbox_id: MailboxId) -> list[tuple[Uid, SortRow]] | None:
        if not self.has_index:
            return None

        def fn(conn: sqlite3.Connection) -> list[tuple[Uid, SortRow]]:
            if conn.execute("SELECT 1 FROM mailbox WHERE id = ? AND account_id = ?",
                            (mailbox_id, account_id)).fetchone() is None:
                raise NotFound("no such mailbox")
            conn.row_factory = None
            try:
                rows = conn.execute(
                    "SELECT uid, date, from_addr, to_addr, cc_addr, subject, display_from, display_to, message_id,"
                    " refs, reply FROM message_key WHERE mailbox_id = ?", (mailbox_id,)).fetchall()
            finally:
                conn.row_factory = sqlite3.Row
            make = SortRow._make
            return [(r[0], make(r[1:])) for r in rows]

        return await self._read(fn)

    async def sort_column(self, account_id: AccountId, mailbox_id: MailboxId, field: str) -> dict[Uid, object] | None:
        column = SORT_COLUMNS[field]
        if not self.has_index:
            return None

        def fn(conn: sqlite3.Connection) -> dict[Uid, object]:
            if conn.execute("SELECT 1 FROM mailbox WHERE id = ? AND account_id = ?",
                            (mailbox_id, account_id)).fetchone() is None:
                raise NotFound("no such mailbox")
            conn.row_factory = None
            try:
                return dict(conn.execute(f"SELECT uid, {column} FROM message_key WHERE mailbox_id = ?", (mailbox_id,)))
            finally:
                conn.row_factory = sqlite3.Row

        return await self._read(fn)

    async def message_info(self, blob_id: BlobId) -> bytes:
        def fn(conn: sqlite3.Connection) -> bytes | None:
            r = conn.execute("SELECT info FROM blob WHERE id = ?", (blob_id,)).fetchone()
            if r is None:
                raise NotFound("no such message data")
            return bytes(r[0]) if r[0] is not None else None

        info = await self._point_read(fn)  # one row by key: an IMAP FETCH of many ENVELOPEs
        if info is not None:
            return info
        data = await self.read_blob(blob_id)
        parsed = await self._in_blob_thread(_parse_info, data)
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

    # ------------------------------------------------------------------------------------- queue
    @staticmethod
    def _queue_items(conn: sqlite3.Connection, rows: Sequence[sqlite3.Row]) -> list[QueueItem]:
        items: list[QueueItem] = []
        for r in rows:
            rcpts = tuple(
                QueueRecipient(
                    address=x["address"],
                    state=RecipientState(x["state"]),
                    attempts=x["attempts"],
                    last_error=x["last_error"],
                    notify=x["notify"],
                    orcpt=x["orcpt"],
                )
                for x in conn.execute("SELECT * FROM queue_recipient WHERE queue_id = ? ORDER BY idx", (r["id"],))
            )
            try:
                extra = {str(k): str(v) for k, v in json.loads(r["extra"] or "{}").items()}
            except (ValueError, AttributeError):
                extra = {}
            items.append(
                QueueItem(
                    id=QueueId(r["id"]),
                    sender=r["sender"],
                    recipients=rcpts,
                    blob_id=BlobId(r["blob_id"]),
                    size=r["size"],
                    created=_from_us(r["created"]),
                    next_attempt=_from_us(r["next_attempt"]),
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
        now = _now_us()
        rcpt_rows = [
            (i, r.address, r.state.value, r.attempts, r.last_error, r.notify, r.orcpt) for i, r in enumerate(recipients)
        ]

        def build(blobs: list[_Blob]) -> Callable[[_Tx], int]:
            (blob,) = blobs

            def fn(tx: _Tx) -> int:
                conn = tx.conn
                self._incref(tx, [blob])
                cur = conn.execute(
                    "INSERT INTO queue (sender, blob_id, size, created, next_attempt, ret, envid, requiretls,"
                    " smtputf8) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (sender, blob.id, blob.size, now, now, ret, envid, int(requiretls), int(smtputf8)),
                )
                qid = int(cur.lastrowid or 0)
                conn.executemany(
                    "INSERT INTO queue_recipient (queue_id, idx, address, state, attempts, last_error, notify,"
                    " orcpt) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(qid, *row) for row in rcpt_rows],
                )
                return qid

            return fn

        qid = await self._ingest_write([bytes(data)], build)
        item = await self.queue_get(QueueId(qid))
        assert item is not None
        return item

    async def queue_due(self, now: datetime, limit: int = 100) -> list[QueueItem]:
        now_us = _to_us(now)
        mono = time.monotonic()
        for qid, at in list(self._queue_claims.items()):
            if mono - at > QUEUE_CLAIM_SECONDS:
                del self._queue_claims[qid]
        claimed = set(self._queue_claims)

        def fn(conn: sqlite3.Connection) -> list[QueueItem]:
            rows = conn.execute(
                "SELECT * FROM queue q WHERE q.next_attempt <= ? AND EXISTS (SELECT 1 FROM queue_recipient r"
                " WHERE r.queue_id = q.id AND r.state = 'pending') ORDER BY q.next_attempt, q.id",
                (now_us,),
            ).fetchall()
            rows = [r for r in rows if int(r["id"]) not in claimed][: max(0, limit)]
            return self._queue_items(conn, rows)

        items = await self._read(fn)
        out: list[QueueItem] = []
        for it in items:  # claim on the event loop: two workers of this process never share one
            if it.id not in self._queue_claims:
                self._queue_claims[it.id] = time.monotonic()
                out.append(it)
        return out

    async def queue_get(self, queue_id: QueueId) -> QueueItem | None:
        def fn(conn: sqlite3.Connection) -> QueueItem | None:
            rows = conn.execute("SELECT * FROM queue WHERE id = ?", (queue_id,)).fetchall()
            items = self._queue_items(conn, rows)
            return items[0] if items else None

        return await self._read(fn)

    async def queue_list(self) -> list[QueueItem]:
        def fn(conn: sqlite3.Connection) -> list[QueueItem]:
            return self._queue_items(conn, conn.execute("SELECT * FROM queue ORDER BY id").fetchall())

        return await self._read(fn)

    def _queue_remove_tx(self, tx: _Tx, queue_id: int) -> None:
        conn = tx.conn
        r = conn.execute("SELECT blob_id FROM queue WHERE id = ?", (queue_id,)).fetchone()
        if r is None:
            raise NotFound(f"no queue item {queue_id}")
        conn.execute("DELETE FROM queue_recipient WHERE queue_id = ?", (queue_id,))
        conn.execute("DELETE FROM queue WHERE id = ?", (queue_id,))
        self._decref(tx, Counter({str(r[0]): 1}))

    async def queue_update(
        self,
        queue_id: QueueId,
        recipients: Sequence[QueueRecipient],
        next_attempt: datetime,
        last_error: str | None,
        delay_warned: bool | None = None,
    ) -> None:
        next_us = _to_us(next_attempt)

        def fn(tx: _Tx) -> None:
            conn = tx.conn
            if conn.execute("SELECT 1 FROM queue WHERE id = ?", (queue_id,)).fetchone() is None:
                raise NotFound(f"no queue item {queue_id}")
            for rc in recipients:
                conn.execute(
                    "UPDATE queue_recipient SET state = ?, attempts = ?, last_error = ?, notify = ?, orcpt = ?"
                    " WHERE queue_id = ? AND address = ?",
                    (rc.state.value, rc.attempts, rc.last_error, rc.notify, rc.orcpt, queue_id, rc.address),
                )
            conn.execute(
                "UPDATE queue SET attempts = attempts + 1, next_attempt = ?, last_error = ?,"
                " delay_warned = coalesce(?, delay_warned) WHERE id = ?",
                (next_us, last_error, None if delay_warned is None else int(delay_warned), queue_id),
            )
            pending = conn.execute(
                "SELECT 1 FROM queue_recipient WHERE queue_id = ? AND state = 'pending' LIMIT 1", (queue_id,)
            ).fetchone()
            if pending is None:
                self._queue_remove_tx(tx, queue_id)

        try:
            await self._write(fn)
        finally:
            self._queue_claims.pop(queue_id, None)

    async def queue_retry(self, queue_id: QueueId | None = None) -> int:
        now = _now_us()

        def fn(tx: _Tx) -> int:
            if queue_id is None:
                cur = tx.conn.execute("UPDATE queue SET next_attempt = ?", (now,))
            else:
                cur = tx.conn.execute("UPDATE queue SET next_attempt = ? WHERE id = ?", (now, queue_id))
            return int(cur.rowcount)

        return await self._write(fn)

    async def queue_delete(self, queue_id: QueueId) -> None:
        try:
            await self._write(lambda tx: self._queue_remove_tx(tx, queue_id))
        finally:
            self._queue_claims.pop(queue_id, None)

    # --------------------------------------------------------------------- IMAP METADATA (RFC 5464)
    async def get_metadata(self, account_id: AccountId, mailbox_id: MailboxId | None) -> dict[str, bytes]:
        def fn(conn: sqlite3.Connection) -> dict[str, bytes]:
            if mailbox_id is not None:
                self._mailbox_row(conn, account_id, mailbox_id)
            return {
                str(r[0]): bytes(r[1])
                for r in conn.execute(
                    "SELECT name, value FROM metadata WHERE account_id = ? AND mailbox_id = ? ORDER BY name",
                    (account_id, mailbox_id or 0),
                )
            }

        return await self._read(fn)

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

        def fn(tx: _Tx) -> None:
            conn = tx.conn
            if mailbox_id is not None:
                self._mailbox_row(conn, account_id, mailbox_id)
            elif conn.execute("SELECT 1 FROM account WHERE id = ?", (account_id,)).fetchone() is None:
                raise NotFound("no such account")
            added = 0
            for name, value in items:
                if value is None:
                    added -= conn.execute(
                        "DELETE FROM metadata WHERE account_id = ? AND mailbox_id = ? AND name = ?",
                        (account_id, mid, name),
                    ).rowcount
                else:
                    had = conn.execute(
                        "SELECT 1 FROM metadata WHERE account_id = ? AND mailbox_id = ? AND name = ?",
                        (account_id, mid, name),
                    ).fetchone()
                    conn.execute(
                        "INSERT OR REPLACE INTO metadata (account_id, mailbox_id, name, value) VALUES (?, ?, ?, ?)",
                        (account_id, mid, name, value),
                    )
                    added += had is None
            if added > 0:
                n_box = conn.execute(
                    "SELECT count(*) FROM metadata WHERE account_id = ? AND mailbox_id = ?", (account_id, mid)
                ).fetchone()[0]
                n_all = conn.execute("SELECT count(*) FROM metadata WHERE account_id = ?", (account_id,)).fetchone()[0]
                if n_box > max_mailbox_entries or n_all > max_account_entries:
                    raise TooManyEntries("too many metadata entries")  # the transaction rolls back

        await self._write(fn)

    # ------------------------------------------------------------ expunge history (RFC 7162 §3.2.5.2)
    async def expunge_history_floor(self, account_id: AccountId, mailbox_id: MailboxId) -> ModSeq:
        def fn(conn: sqlite3.Connection) -> ModSeq:
            r = conn.execute(
                "SELECT f.modseq FROM expunge_floor f JOIN mailbox m ON m.id = f.mailbox_id"
                " WHERE f.mailbox_id = ? AND m.account_id = ?",
                (mailbox_id, account_id),
            ).fetchone()
            return ModSeq(int(r[0]) if r is not None else 0)

        return await self._point_read(fn)

    async def trim_expunge_history(self, keep: timedelta, mark_every: timedelta, *, chunk: int = 500) -> int:
        now = _now_us()
        cutoff = now - keep // timedelta(microseconds=1)
        marked_before = now - mark_every // timedelta(microseconds=1)

        def fn(tx: _Tx, after: int) -> tuple[int | None, int]:
            conn = tx.conn
            ids = [int(r[0]) for r in conn.execute(
                "SELECT id FROM mailbox WHERE id > ? ORDER BY id LIMIT ?", (after, max(1, chunk)))]
            if not ids:
                return None, 0
            lo, hi = ids[0], ids[-1]
            gone = 0
            # Checkpoints older than the retention: their modseq bounds what may go (the newest
            # such checkpoint per mailbox wins; older ones are dropped with the records).
            for mid, ms in conn.execute(
                "SELECT mailbox_id, max(modseq) FROM expunge_mark WHERE marked <= ? AND mailbox_id BETWEEN ? AND ?"
                " GROUP BY mailbox_id", (cutoff, lo, hi)
            ).fetchall():
                conn.execute("DELETE FROM expunge_mark WHERE mailbox_id = ? AND modseq <= ?", (mid, ms))
                # The floor is the highest modseq really dropped: above it the history is whole.
                top = conn.execute(
                    "SELECT max(modseq) FROM expunged WHERE mailbox_id = ? AND modseq <= ?", (mid, ms)
                ).fetchone()[0]
                if top is None:
                    continue
                gone += conn.execute(
                    "DELETE FROM expunged WHERE mailbox_id = ? AND modseq <= ?", (mid, ms)
                ).rowcount
                conn.execute(
                    "INSERT INTO expunge_floor (mailbox_id, modseq) VALUES (?, ?)"
                    " ON CONFLICT (mailbox_id) DO UPDATE SET modseq = max(modseq, excluded.modseq)",
                    (mid, top),
                )
            # New checkpoints where the mailbox moved on and its last checkpoint is old enough.
            conn.execute(
                "INSERT OR IGNORE INTO expunge_mark (mailbox_id, modseq, marked)"
                " SELECT m.id, m.highestmodseq, ? FROM mailbox m"
                " WHERE m.id BETWEEN ? AND ?"
                "   AND m.highestmodseq > coalesce((SELECT max(modseq) FROM expunge_mark k WHERE k.mailbox_id = m.id),"
                "                                  (SELECT modseq FROM expunge_floor f WHERE f.mailbox_id = m.id), 0)"
                "   AND coalesce((SELECT max(marked) FROM expunge_mark k WHERE k.mailbox_id = m.id), 0) <= ?",
                (now, lo, hi, marked_before),
            )
            return hi, gone

        return await in_mailbox_chunks(lambda after: self._write(functools.partial(fn, after=after)))

    # ------------------------------------------------------------------------------- maintenance
    async def check(self) -> list[Problem]:
        def fn(conn: sqlite3.Connection) -> tuple[list[Problem], dict[str, str]]:
            problems: list[Problem] = []
            blobs = {str(r[0]): (int(r[1]), int(r[2])) for r in conn.execute("SELECT id, size, refcount FROM blob")}
            refs: Counter[str] = Counter()
            for r in conn.execute("SELECT blob_id, count(*) FROM message GROUP BY blob_id"):
                refs[str(r[0])] += int(r[1])
            for r in conn.execute("SELECT blob_id, count(*) FROM queue GROUP BY blob_id"):
                refs[str(r[0])] += int(r[1])
            for blob_id, n in sorted(refs.items()):
                if blob_id not in blobs:
                    problems.append(Problem("missing-blob", f"{n} references to blob {blob_id} without a row"))
            for blob_id, (size, refcount) in sorted(blobs.items()):
                if refcount != refs.get(blob_id, 0):
                    problems.append(
                        Problem("refcount", f"blob {blob_id}: refcount {refcount}, references {refs.get(blob_id, 0)}")
                    )
                p = self._blobs.path_for(blob_id)
                inline = self._inline_bytes(conn, blob_id)
                try:
                    h = hashlib.sha256()
                    n = 0
                    if inline is not None:
                        h.update(inline)
                        n = len(inline)
                    else:
                        with p.open("rb") as f:
                            while chunk := f.read(1 << 20):
                                h.update(chunk)
                                n += len(chunk)
                except FileNotFoundError:
                    problems.append(Problem("missing-blob", f"blob {blob_id}: file {p} is missing"))
                    continue
                except OSError as exc:
                    problems.append(Problem("unreadable-blob", f"blob {blob_id}: {exc}"))
                    continue
                if h.hexdigest() != blob_id:
                    where = "stored bytes" if inline is not None else "file content"
                    problems.append(Problem("bad-hash", f"blob {blob_id}: {where} has sha256 {h.hexdigest()}"))
                if n != size:
                    problems.append(Problem("bad-size", f"blob {blob_id}: row says {size} bytes, file has {n}"))
            if self.has_index:
                # Blobs not indexed yet (fts NULL) are fine: the backfill takes them, searches
                # scan them. A blob marked indexed must have its rows.
                for r in conn.execute(
                    "SELECT b.id FROM blob b WHERE b.fts = 1 AND NOT EXISTS"
                    " (SELECT 1 FROM blob_key k JOIN blob_text t ON t.id = k.id WHERE k.blob_id = b.id)"
                ):
                    problems.append(Problem("index", f"blob {r[0]}: marked indexed but its index rows are missing"))
            for r in conn.execute(
                "SELECT a.id, a.address, a.used_bytes, a.used_messages,"
                " (SELECT coalesce(sum(m.size), 0) FROM message m JOIN mailbox b ON b.id = m.mailbox_id"
                "  WHERE b.account_id = a.id),"
                " (SELECT count(*) FROM message m JOIN mailbox b ON b.id = m.mailbox_id WHERE b.account_id = a.id)"
                " FROM account a"
            ):
                if (r[2], r[3]) != (r[4], r[5]):
                    problems.append(
                        Problem(
                            "counter",
                            f"account {r[1]}: usage says {r[2]} bytes/{r[3]} messages, recount {r[4]}/{r[5]}",
                        )
                    )
            for r in conn.execute(
                "SELECT b.id, b.name, b.uidnext, b.highestmodseq,"
                " max(coalesce((SELECT max(uid) FROM message WHERE mailbox_id = b.id), 0),"
                "     coalesce((SELECT max(uid) FROM expunged WHERE mailbox_id = b.id), 0)),"
                " max(coalesce((SELECT max(modseq) FROM message WHERE mailbox_id = b.id), 0),"
                "     coalesce((SELECT max(modseq) FROM expunged WHERE mailbox_id = b.id), 0))"
                " FROM mailbox b"
            ):
                if r[2] <= r[4]:
                    problems.append(Problem("uidnext", f"mailbox {r[0]} {r[1]!r}: uidnext {r[2]} <= max uid {r[4]}"))
                if r[3] < r[5]:
                    problems.append(
                        Problem("modseq", f"mailbox {r[0]} {r[1]!r}: highestmodseq {r[3]} < max modseq {r[5]}")
                    )
            orphans: dict[str, str] = {}
            try:
                for name, p in self._blobs.iter_files():
                    if self._blobs.is_temp(name):
                        continue  # a write in progress (a crash's leftovers go at the next open)
                    if name not in blobs and not self._blobs.pinned(name) and name not in self._gc_deferred:
                        orphans[name] = f"file {p}"
            except OSError as exc:
                problems.append(Problem("unreadable-blob", f"blob folder: {exc}"))
            for (name,) in conn.execute("SELECT id FROM inl.blob_inline"):
                if name not in blobs and name not in self._gc_deferred:
                    orphans.setdefault(name, f"inline message {name}")
            return problems, orphans

        problems, orphans = await self._read(fn)
        if orphans:
            # Our snapshot predates the folder walk: a write may have committed since. Look again.
            def recheck(conn: sqlite3.Connection) -> set[str]:
                return {n for n in orphans if conn.execute("SELECT 1 FROM blob WHERE id = ?", (n,)).fetchone()}

            now_known = await self._read(recheck)
            problems += [
                Problem("orphan-blob", f"{what} has no blob row")
                for n, what in sorted(orphans.items())
                if n not in now_known
            ]
        return problems

    async def recount_usage(self, account_id: AccountId) -> tuple[int, int]:
        def fn(tx: _Tx) -> tuple[int, int]:
            conn = tx.conn
            if conn.execute("SELECT 1 FROM account WHERE id = ?", (account_id,)).fetchone() is None:
                raise NotFound("no such account")
            r = conn.execute(
                "SELECT coalesce(sum(m.size), 0), count(*) FROM message m JOIN mailbox b ON b.id = m.mailbox_id"
                " WHERE b.account_id = ?",
                (account_id,),
            ).fetchone()
            conn.execute("UPDATE account SET used_bytes = ?, used_messages = ? WHERE id = ?", (r[0], r[1], account_id))
            return int(r[0]), int(r[1])

        return await self._write(fn)


__all__ = ["Migration", "SqliteStore", "load_migrations", "normalize_flags"]
