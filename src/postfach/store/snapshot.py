"""The SQLite-specific half of backups: consistent snapshots of a store folder and restores from them.

A store folder holds ``meta.sqlite3`` (WAL) and ``blobs/ab/cd/<sha256>`` (immutable, content-addressed).
A snapshot folder holds a copy of the database, ``blobs/ab/<sha256>`` and ``manifest.json`` (written
by ``postfach.backup``):

* the metadata is copied with SQLite's online backup API (``Connection.backup`` in one step from a
  read connection): one read transaction, so the copy is a point in time while the server keeps
  writing — WAL readers never block writers, so clients see no pause;
* every blob the copy refers to is hard-linked into the snapshot — from the previous snapshot when it
  has it (verified there already), otherwise from the store; across filesystems new blobs are copied.
  Unchanged blobs therefore cost one directory entry, and a snapshot costs only the new mail.

A blob may vanish between the metadata copy and its link (an expunge in the server process drops the
last reference and removes the file): the metadata is then copied again and the blob set recomputed,
so the final copy and its blobs always match (a few rounds at most; each round only links what is new).

Restores that must keep UIDVALIDITY, UIDs, modseqs and password hashes work directly on database files
and need the server stopped (``--replace``) or a fresh data dir (``--all``); the gentle restore into a
"Restored" folder goes through the Store interface and lives in ``postfach.backup``.

Everything here blocks: callers run it in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import hashlib
import os
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postfach.errors import PostfachError

META_NAME = "meta.sqlite3"
#: The store's small messages (store/sqlite.py); a snapshot holds them as files like the others.
INLINE_DB = "inline.sqlite3"
META_GZ = META_NAME + ".gz"  # older snapshots keep their metadata compressed (see compress_database)
BLOB_DIR = "blobs"
_CHUNK = 1 << 20
_ROUNDS = 5
_LINK_THREADS = 4

#: Called with (done, total) while blobs are placed.
ProgressFn = Callable[[int, int], None]


class SnapshotError(PostfachError):
    """A snapshot could not be made or used; the message is one line for the operator."""


class Cancelled(SnapshotError):
    """The caller asked to stop (server shutdown during a scheduled backup)."""


def blob_relpath(blob_id: str) -> Path:
    """Where a blob sits in a snapshot: ``blobs/ab/<sha256>`` (one level: 256 folders to make per
    snapshot instead of up to 65,536; the store itself uses ``ab/cd/``)."""
    return Path(BLOB_DIR) / blob_id[0:2] / blob_id


def store_blob_path(store_dir: Path, blob_id: str) -> Path:
    return store_dir / BLOB_DIR / blob_id[0:2] / blob_id[2:4] / blob_id


def file_sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_filesystem(path: Path) -> None:
    """Make every write below ``path`` durable: ``syncfs(2)`` on its filesystem (Linux), else
    ``sync()``. One call instead of an fsync per hard link and folder."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        syncfs = libc.syncfs
    except (OSError, AttributeError):
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


@contextlib.contextmanager
def snapshot_db(snap: Path) -> Iterator[Path]:
    """The snapshot's database as a plain file: the file itself, or a temporary decompressed copy
    (removed afterwards) when the snapshot's metadata has been compressed."""
    raw = snap / META_NAME
    if raw.is_file() or not (snap / META_GZ).is_file():
        yield raw
        return
    tmpdir = Path(tempfile.mkdtemp(prefix=".db-", dir=snap.parent))
    try:
        out = tmpdir / META_NAME
        with gzip.open(snap / META_GZ, "rb") as fin, out.open("wb") as fout:
            shutil.copyfileobj(fin, fout, _CHUNK)
        yield out
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def compress_database(snap: Path) -> int:
    """Replace the snapshot's ``meta.sqlite3`` by ``meta.sqlite3.gz`` (the metadata is copied whole
    every day, so this is most of what an old snapshot costs; blob files are never compressed,
    they are shared by hard link). Returns the bytes saved. Crash-safe: the raw file goes only
    after the compressed one is durable; readers prefer the raw file while both exist."""
    raw, gz = snap / META_NAME, snap / META_GZ
    if not raw.is_file():
        return 0
    if not gz.is_file():
        tmp = snap / (META_GZ + ".part")
        with raw.open("rb") as fin, gzip.open(tmp, "wb", compresslevel=6) as fout:
            shutil.copyfileobj(fin, fout, _CHUNK)
        _fsync_file(tmp)
        os.replace(tmp, gz)
        fsync_dir(snap)
    saved = raw.stat().st_size - gz.stat().st_size
    raw.unlink()
    fsync_dir(snap)
    return saved


def _connect_ro(path: Path) -> sqlite3.Connection:
    """Read-only connection to a snapshot database (never modified after the snapshot)."""
    if not path.is_file():
        raise SnapshotError(f"{path}: missing")
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    conn.row_factory = sqlite3.Row
    return conn


#: Tables of derived data (the full-text index and sort keys, schema 4): rebuilt from the blobs
#: and message rows, never copied row by row; their ``blob_id`` is not a reference.
DERIVED_TABLES = frozenset({"blob_key", "blob_text", "message_key"})


def _tables(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
    ).fetchall()
    return [r[0] for r in rows]


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")').fetchall()]


def referenced_blobs(conn: sqlite3.Connection) -> dict[str, int]:
    """Every blob id any row refers to (messages, queue, and whatever else has a ``blob_id``), with
    its size from the ``blob`` table (-1 when that row is missing)."""
    ids: set[str] = set()
    for t in _tables(conn):
        if "blob_id" in _columns(conn, t):
            ids.update(r[0] for r in conn.execute(f'SELECT DISTINCT blob_id FROM "{t}"'))
    sizes: dict[str, int] = {}
    if "blob" in _tables(conn):
        for r in conn.execute("SELECT id, size FROM blob"):
            if r[0] in ids:
                sizes[r[0]] = int(r[1])
    return {b: sizes.get(b, -1) for b in ids}


def schema_version(conn: sqlite3.Connection) -> int:
    """The store's migration level (``schema_version`` table of store/sqlite.py)."""
    if "schema_version" in _tables(conn):
        return int(conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0])
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def store_in_use(store_dir: Path) -> bool:
    """True while a process has the store open (SqliteStore holds a shared flock on ``lock``)."""
    lock = store_dir / "lock"
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def metadata_counts(conn: sqlite3.Connection) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Counts for the manifest: totals and one entry per account (address, messages, bytes)."""
    tables = set(_tables(conn))
    counts: dict[str, int] = {}
    for t in ("domain", "account", "alias", "mailbox", "message", "expunged", "blob", "queue"):
        if t in tables:
            key = t if t.endswith("s") else t + "s"
            counts[key] = int(conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0])
    accounts: list[dict[str, Any]] = []
    if {"account", "mailbox", "message"} <= tables:
        for r in conn.execute(
            "SELECT a.id, a.address, a.used_bytes, a.used_messages, "
            " (SELECT count(*) FROM message m JOIN mailbox b ON m.mailbox_id=b.id WHERE b.account_id=a.id),"
            " (SELECT coalesce(sum(m.size),0) FROM message m JOIN mailbox b ON m.mailbox_id=b.id"
            "  WHERE b.account_id=a.id) FROM account a ORDER BY a.address"
        ):
            accounts.append(
                {
                    "id": r[0],
                    "address": r[1],
                    "used_bytes": r[2],
                    "used_messages": r[3],
                    "messages": r[4],
                    "bytes": r[5],
                }
            )
    return counts, accounts


# ------------------------------------------------------------------------------------------ creation


@dataclass
class SnapshotResult:
    blobs: dict[str, int]  # sha256 -> size, every blob in the snapshot
    new_blobs: int  # blobs not in the previous snapshot
    new_bytes: int  # their size: what this snapshot adds on disk
    copied_blobs: int  # placed by copying (other filesystem) rather than hard link
    db_sha256: str
    db_size: int
    schema_version: int
    counts: dict[str, int]
    accounts: list[dict[str, Any]]
    missing_in_store: list[str] = field(default_factory=list)  # referenced but absent in the store
    damaged_in_store: list[str] = field(default_factory=list)  # present with the wrong hash


def copy_database(meta: Path, dest: Path) -> None:
    """Point-in-time copy of a live WAL database with the online backup API (one step, one read
    transaction: consistent, and writers in the server are not blocked)."""
    if not meta.is_file():
        raise SnapshotError(f"{meta}: no store database here")
    dest.unlink(missing_ok=True)
    src = sqlite3.connect(str(meta), timeout=60)
    try:
        src.execute("PRAGMA query_only=1")
        dst = sqlite3.connect(str(dest))
        try:
            src.backup(dst, pages=-1)
            # A snapshot is a plain file that is never written again: no WAL beside it.
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
    finally:
        src.close()
    _fsync_file(dest)


def _write_file(dst: str, data: bytes) -> None:
    """A new snapshot file with ``data``; made durable with every link and folder by the caller's
    one ``sync_filesystem`` of the finished snapshot (backup.py), not by an fsync per file."""
    tmp = dst + ".part"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, dst)


def _connect_live_ro(path: Path) -> sqlite3.Connection:
    """A read-only look into a database a running store may be writing (WAL)."""
    conn = sqlite3.connect(str(path), timeout=60, check_same_thread=False)
    conn.execute("PRAGMA query_only=1")
    return conn


def _same_filesystem(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


def _link_or_copy(src: Path, dst: Path, *, link: bool, expect: str | None) -> tuple[bool, str | None]:
    """Place ``src`` at ``dst`` (making its folder). Returns (copied, sha256-if-computed)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    del expect
    return _place(str(src), str(dst), link=link)


def _place(src: str, dst: str, *, link: bool) -> tuple[bool, str | None]:
    """Hard-link ``src`` to ``dst``, or copy it (other filesystem, link limit, no link support).
    Returns (copied, sha256 of the copy or None for a link). The folder of ``dst`` exists."""
    if link:
        try:
            os.link(src, dst)
            return False, None
        except FileExistsError:
            return False, None
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM, errno.ENOTSUP):
                raise
    tmp = dst + ".part"
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            h.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, dst)
    return True, h.hexdigest()


def create_snapshot(
    store_dir: Path,
    dest: Path,
    *,
    previous: Path | None = None,
    previous_blobs: dict[str, int] | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> SnapshotResult:
    """Fill the (new, empty) folder ``dest`` with a consistent snapshot of ``store_dir``.

    ``previous``/``previous_blobs``: the newest complete snapshot and its manifest blobs, reused by
    hard link. Raises OSError (e.g. ENOSPC) or SnapshotError; the caller removes ``dest`` then."""
    meta = store_dir / META_NAME
    store_blobs = store_dir / BLOB_DIR
    dest.mkdir(parents=True, exist_ok=True)
    dest.chmod(0o700)  # password hashes and private keys inside: the owner only
    (dest / BLOB_DIR).mkdir(exist_ok=True)
    db_copy = dest / META_NAME
    prev_blobs = previous_blobs or {}
    same_fs_store = store_blobs.is_dir() and _same_filesystem(store_blobs, dest)
    same_fs_prev = previous is not None and previous.is_dir() and _same_filesystem(previous, dest)

    placed: dict[str, int] = {}
    new_blobs = new_bytes = copied = 0
    damaged: list[str] = []
    missing: list[str] = []
    wanted: dict[str, int] = {}
    # Plain strings and one mkdir per folder: this runs once per blob of the whole store. The
    # link(2) calls dominate and release the GIL, so a few threads share the folders between them.
    dest_s, store_s = str(dest), str(store_blobs)
    prev_s = str(previous) if previous is not None else ""
    lock = threading.Lock()
    abort = threading.Event()  # one group failed (disk full ...): the others stop too
    done = 0
    inline_db = store_dir / INLINE_DB

    def place_group(group: list[str], total: int) -> tuple[dict[str, int], int, int, int, list[str], list[str]]:
        g_placed: dict[str, int] = {}
        g_missing: list[str] = []
        g_damaged: list[str] = []
        if not group:
            return g_placed, 0, 0, 0, g_missing, g_damaged
        os.makedirs(f"{dest_s}/{BLOB_DIR}/{group[0][0:2]}", exist_ok=True)
        inline_conn: list[sqlite3.Connection] = []

        def inline_data(blob_id: str) -> bytes | None:
            if not inline_db.is_file():
                return None
            if not inline_conn:
                inline_conn.append(_connect_live_ro(inline_db))
            r = inline_conn[0].execute("SELECT data FROM blob_inline WHERE id = ?", (blob_id,)).fetchone()
            return None if r is None else bytes(r[0])

        try:
            return place(group, g_placed, g_missing, g_damaged, inline_data, total)
        finally:
            for c in inline_conn:
                c.close()

    def place(
        group: list[str],
        g_placed: dict[str, int],
        g_missing: list[str],
        g_damaged: list[str],
        inline_data: Callable[[str], bytes | None],
        total: int,
    ) -> tuple[dict[str, int], int, int, int, list[str], list[str]]:
        nonlocal done
        g_new = g_bytes = g_copied = 0
        for blob_id in group:
            if abort.is_set() or (cancel is not None and cancel.is_set()):
                raise Cancelled("backup cancelled")
            rel = f"{BLOB_DIR}/{blob_id[0:2]}/{blob_id}"
            target = f"{dest_s}/{rel}"
            if prev_s and blob_id in prev_blobs:
                try:
                    was_copied, _ = _place(f"{prev_s}/{rel}", target, link=same_fs_prev)
                except FileNotFoundError:
                    pass  # not in the previous snapshot after all: take it from the store
                else:
                    g_copied += int(was_copied)
                    g_placed[blob_id] = prev_blobs[blob_id]
                    continue
            src = f"{store_s}/{blob_id[0:2]}/{blob_id[2:4]}/{blob_id}"
            try:
                was_copied, digest = _place(src, target, link=same_fs_store)
            except FileNotFoundError:
                # A small message lives in the store's inline.sqlite3: the snapshot gets it as a
                # file like any other (a message expunged since the metadata copy is "missing":
                # the next round copies the metadata again).
                data = inline_data(blob_id)
                if data is None:
                    g_missing.append(blob_id)
                    continue
                _write_file(target, data)
                was_copied, digest = True, hashlib.sha256(data).hexdigest()
            if digest is None:  # hard-linked: hash the new blob once, here
                digest, size = file_sha256(Path(target))
            else:
                size = os.stat(target).st_size
            if digest != blob_id:
                g_damaged.append(blob_id)
            g_copied += int(was_copied)
            g_new += 1
            g_bytes += size
            g_placed[blob_id] = size
        if progress is not None:
            with lock:
                done += len(group)
                progress(min(done, total), total)
        return g_placed, g_new, g_bytes, g_copied, g_missing, g_damaged

    for _round in range(_ROUNDS):
        copy_database(meta, db_copy)
        conn = _connect_ro(db_copy)
        try:
            wanted = referenced_blobs(conn)
        finally:
            conn.close()
        groups: dict[str, list[str]] = {}
        for b in sorted(wanted):
            if b not in placed:
                groups.setdefault(b[0:2], []).append(b)
        missing = []
        done = len(placed)
        with ThreadPoolExecutor(max_workers=_LINK_THREADS, thread_name_prefix="postfach-backup") as pool:
            futures = [pool.submit(place_group, g, len(wanted)) for g in groups.values()]
            for fut in futures:
                try:
                    g_placed, g_new, g_bytes, g_copied, g_missing, g_damaged = fut.result()
                except BaseException:
                    abort.set()
                    raise
                placed.update(g_placed)
                new_blobs += g_new
                new_bytes += g_bytes
                copied += g_copied
                missing += g_missing
                damaged += g_damaged
        if not missing:
            break
        # A blob vanished after the metadata copy (expunged meanwhile) or the store lacks it: copy the
        # metadata again; what is still referenced and absent on the last round is store damage.
    # Blobs linked in an earlier round that the final copy no longer refers to.
    for blob_id in [b for b in placed if b not in wanted]:
        size = placed.pop(blob_id)
        (dest / blob_relpath(blob_id)).unlink(missing_ok=True)
        if blob_id not in prev_blobs:
            new_blobs -= 1
            new_bytes -= size
    conn = _connect_ro(db_copy)
    try:
        version = schema_version(conn)
        counts, accounts = metadata_counts(conn)
        integrity = conn.execute("PRAGMA quick_check").fetchone()[0]
    finally:
        conn.close()
    if integrity != "ok":
        raise SnapshotError(f"the copied store database fails its integrity check: {integrity}")
    db_sha, db_size = file_sha256(db_copy)
    if progress is not None:
        progress(len(wanted), len(wanted))
    return SnapshotResult(
        blobs=dict(sorted(placed.items())),
        new_blobs=new_blobs,
        new_bytes=new_bytes,
        copied_blobs=copied,
        db_sha256=db_sha,
        db_size=db_size,
        schema_version=version,
        counts=counts,
        accounts=accounts,
        missing_in_store=sorted(missing),
        damaged_in_store=sorted(damaged),
    )


# ---------------------------------------------------------------------------------------- verifying


@dataclass(frozen=True)
class Finding:
    kind: str  # "missing-blob", "bad-hash", "bad-size", "database", "manifest", "unlisted-blob", ...
    detail: str


def verify_files(
    snap: Path,
    blobs: dict[str, int],
    db_sha256: str | None,
    *,
    only: Iterable[str] | None = None,
    progress: ProgressFn | None = None,
) -> list[Finding]:
    """Check the database file and every blob (present, size, sha256). ``only``: check these blobs
    (a single-account restore needs no more)."""
    found: list[Finding] = []
    if not (snap / META_NAME).is_file() and not (snap / META_GZ).is_file():
        return [Finding("database", f"{META_NAME} is missing")]
    try:
        with snapshot_db(snap) as db:
            found += _verify_db(db, blobs, db_sha256)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        found.append(Finding("database", f"{META_GZ} cannot be decompressed: {exc}"))
    found += _verify_blobs(snap, blobs, only, progress)
    return found


def _verify_db(db: Path, blobs: dict[str, int], db_sha256: str | None) -> list[Finding]:
    found: list[Finding] = []
    if db_sha256 is not None:
        digest, _ = file_sha256(db)
        if digest != db_sha256:
            found.append(Finding("database", f"{META_NAME} does not match its hash in the manifest"))
    try:
        conn = _connect_ro(db)
        try:
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                found.append(Finding("database", f"{META_NAME} integrity check: {check}"))
            else:
                refs = referenced_blobs(conn)
                unlisted = sorted(b for b in refs if b not in blobs)
                for b in unlisted[:20]:
                    found.append(Finding("unlisted-blob", f"{b}: referenced by the database, not in the manifest"))
                if len(unlisted) > 20:
                    found.append(Finding("unlisted-blob", f"... and {len(unlisted) - 20} more"))
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        found.append(Finding("database", f"{META_NAME} cannot be read: {exc}"))
    return found


def _verify_blobs(
    snap: Path, blobs: dict[str, int], only: Iterable[str] | None, progress: ProgressFn | None
) -> list[Finding]:
    found: list[Finding] = []
    ids = sorted(blobs) if only is None else sorted(set(only))
    for i, blob_id in enumerate(ids):
        if progress is not None and (i % 256 == 0 or i == len(ids) - 1):
            progress(i + 1, len(ids))
        path = snap / blob_relpath(blob_id)
        if blob_id not in blobs:
            found.append(Finding("unlisted-blob", f"{blob_id}: not in the manifest"))
            continue
        try:
            digest, size = file_sha256(path)
        except FileNotFoundError:
            found.append(Finding("missing-blob", f"{blob_id}: file {path.relative_to(snap)} is missing"))
            continue
        except OSError as exc:
            found.append(Finding("missing-blob", f"{blob_id}: cannot read: {exc.strerror or exc}"))
            continue
        if digest != blob_id:
            found.append(Finding("bad-hash", f"{blob_id}: content has sha256 {digest} (damaged)"))
        elif blobs[blob_id] >= 0 and size != blobs[blob_id]:
            found.append(Finding("bad-size", f"{blob_id}: {size} bytes, manifest says {blobs[blob_id]}"))
    return found


# ------------------------------------------------------------------------------------ reading a snapshot


@dataclass(frozen=True)
class SnapMailbox:
    id: int
    name: str
    special_use: str | None
    uidvalidity: int


@dataclass(frozen=True)
class SnapMessage:
    uid: int
    blob_id: str
    size: int
    internaldate_us: int
    flags: frozenset[str]


class SnapshotReader:
    """Read access to a snapshot's metadata for the gentle (Store-interface) restore."""

    def __init__(self, snap: Path) -> None:
        self.snap = snap
        self._stack = contextlib.ExitStack()
        try:
            self.conn = _connect_ro(self._stack.enter_context(snapshot_db(snap)))
        except BaseException:
            self._stack.close()
            raise

    def close(self) -> None:
        self.conn.close()
        self._stack.close()

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def account_id(self, address: str) -> int | None:
        row = self.conn.execute("SELECT id FROM account WHERE address=?", (address,)).fetchone()
        return None if row is None else int(row[0])

    def addresses(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT address FROM account ORDER BY address")]

    def mailboxes(self, account_id: int) -> list[SnapMailbox]:
        return [
            SnapMailbox(int(r["id"]), r["name"], r["special_use"], int(r["uidvalidity"]))
            for r in self.conn.execute(
                "SELECT id, name, special_use, uidvalidity FROM mailbox WHERE account_id=? ORDER BY name",
                (account_id,),
            )
        ]

    def messages(self, mailbox_id: int) -> list[SnapMessage]:
        return [
            SnapMessage(
                int(r["uid"]),
                r["blob_id"],
                int(r["size"]),
                int(r["internaldate"]),
                frozenset(f for f in (r["flags"] or "").split() if f),
            )
            for r in self.conn.execute(
                "SELECT uid, blob_id, size, internaldate, flags FROM message WHERE mailbox_id=? ORDER BY uid",
                (mailbox_id,),
            )
        ]

    def account_blobs(self, account_id: int) -> set[str]:
        return {
            r[0]
            for r in self.conn.execute(
                "SELECT DISTINCT m.blob_id FROM message m JOIN mailbox b ON m.mailbox_id=b.id WHERE b.account_id=?",
                (account_id,),
            )
        }

    def read_blob(self, blob_id: str) -> bytes:
        return (self.snap / blob_relpath(blob_id)).read_bytes()


# ------------------------------------------------------------------------------------- restore --all


def restore_store_dir(
    snap: Path, new_store_dir: Path, *, progress: ProgressFn | None = None, blobs: Iterable[str] = ()
) -> None:
    """Rebuild a store folder from a snapshot: the database is copied (it will be written), blob
    files are hard-linked (immutable; copied across filesystems). ``new_store_dir`` must be new."""
    new_store_dir.mkdir(parents=True, exist_ok=False, mode=0o700)
    (new_store_dir / BLOB_DIR).mkdir()
    ids = sorted(blobs)
    link = _same_filesystem(snap, new_store_dir)
    for i, blob_id in enumerate(ids):
        if progress is not None and (i % 256 == 0 or i == len(ids) - 1):
            progress(i + 1, len(ids))
        _link_or_copy(snap / blob_relpath(blob_id), store_blob_path(new_store_dir, blob_id), link=link, expect=blob_id)
    tmp = new_store_dir / (META_NAME + ".part")
    with snapshot_db(snap) as db:
        shutil.copyfile(db, tmp)
    _fsync_file(tmp)
    os.replace(tmp, new_store_dir / META_NAME)
    sync_filesystem(new_store_dir)  # every link and folder durable before we say "done"


# --------------------------------------------------------------------------------- restore --replace


@dataclass
class ReplaceResult:
    mailboxes: int
    messages: int
    blobs_added: int
    bumped_mailboxes: list[str]


@contextlib.contextmanager
def _writer(meta: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(str(meta), timeout=30, isolation_level=None)
    try:
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute("PRAGMA synchronous=FULL")
        yield conn
    finally:
        conn.close()


def replace_account(snap: Path, store_dir: Path, address: str, *, snap_db: Path | None = None) -> ReplaceResult:
    """Put ``address`` back exactly as in the snapshot: account row (password hash, quota), mailboxes
    with their ids, UIDVALIDITY, UIDNEXT and modseqs, messages with UIDs, flags and modseqs, and every
    other row keyed by the account or its mailboxes. Other accounts are not touched.

    UIDs and modseqs only grow (RFC 7162 §3.1.1, RFC 9051 §2.3.1.1): when a mailbox still exists
    with the same UIDVALIDITY and moved past the snapshot, the restored mailbox keeps the higher
    UIDNEXT, messages that differ from what clients last saw get a modseq above the current
    HIGHESTMODSEQ, and messages added after the snapshot are recorded as expunged — so QRESYNC and
    CONDSTORE clients resynchronise exactly, without downloading the rest again.

    Offline: the server must be stopped (a running server would keep its own cached view).
    ``snap_db``: read the metadata from this copy instead (the snapshot's, migrated to the store's
    schema version by the caller); blobs always come from ``snap``."""
    meta = store_dir / META_NAME
    if not meta.is_file():
        raise SnapshotError(f"{meta}: no store database here")
    stack = contextlib.ExitStack()
    src = _connect_ro(snap_db or stack.enter_context(snapshot_db(snap)))
    try:
        acct = src.execute("SELECT * FROM account WHERE address=?", (address,)).fetchone()
        if acct is None:
            raise SnapshotError(f"the snapshot has no account {address}")
        snap_version = schema_version(src)
        snap_tables = {t: _columns(src, t) for t in _tables(src)}
        acct_id = int(acct["id"])
        snap_mbox = {int(r["id"]): dict(r) for r in src.execute("SELECT * FROM mailbox WHERE account_id=?", (acct_id,))}
        snap_ids = list(snap_mbox)
        marks = ",".join("?" * len(snap_ids)) or "NULL"
        # Rows to put back, per table.
        rows: dict[str, list[sqlite3.Row]] = {}
        for t, cols in snap_tables.items():
            if t == "account":
                rows[t] = [acct]
            elif t == "blob" or t in DERIVED_TABLES:
                continue
            elif "account_id" in cols:
                rows[t] = src.execute(f'SELECT * FROM "{t}" WHERE account_id=?', (acct_id,)).fetchall()
            elif "mailbox_id" in cols:
                rows[t] = src.execute(f'SELECT * FROM "{t}" WHERE mailbox_id IN ({marks})', snap_ids).fetchall()
        dom_row = (
            src.execute("SELECT * FROM domain WHERE name=?", (acct["domain"],)).fetchone()
            if "domain" in snap_tables and "domain" in snap_tables["account"]
            else None
        )
        msg_blobs = {r["blob_id"] for r in rows.get("message", [])}
        blob_rows = (
            {r["id"]: r for r in src.execute("SELECT * FROM blob").fetchall() if r["id"] in msg_blobs}
            if "blob" in snap_tables
            else {}
        )
    finally:
        src.close()
        stack.close()

    # Blob files first (durable before any row points at them), then one transaction.
    link = _same_filesystem(snap, store_dir)
    added = 0
    for blob_id in sorted(msg_blobs):
        target = store_blob_path(store_dir, blob_id)
        if target.is_file():
            continue
        _link_or_copy(snap / blob_relpath(blob_id), target, link=link, expect=blob_id)
        fsync_dir(target.parent)
        added += 1

    bumped: list[str] = []
    with _writer(meta) as db:
        db.row_factory = sqlite3.Row
        if schema_version(db) != snap_version:
            raise SnapshotError(
                f"the store has schema version {schema_version(db)}, the snapshot {snap_version}: "
                "upgrade the snapshot's copy first (postfach.backup does) or restore with --all"
            )
        live_tables = {t: _columns(db, t) for t in _tables(db)}
        db.execute("BEGIN IMMEDIATE")
        try:
            live = db.execute("SELECT id FROM account WHERE address=?", (address,)).fetchone()
            live_ids = {acct_id} | ({int(live["id"])} if live is not None else set())
            a_marks = ",".join("?" * len(live_ids))
            live_mbox = {
                int(r["id"]): dict(r)
                for r in db.execute(f"SELECT * FROM mailbox WHERE account_id IN ({a_marks})", list(live_ids))
            }
            # What clients may have seen since the snapshot, per surviving mailbox.
            live_msgs: dict[int, dict[int, tuple[str, str]]] = {}
            if "message" in live_tables:
                for mid in live_mbox:
                    live_msgs[mid] = {
                        int(r["uid"]): (r["flags"], r["blob_id"])
                        for r in db.execute("SELECT uid, flags, blob_id FROM message WHERE mailbox_id=?", (mid,))
                    }
            old_blobs: set[str] = set()
            for m in live_msgs.values():
                old_blobs.update(b for _, b in m.values())
            lm_marks = ",".join("?" * len(live_mbox)) or "NULL"
            for t, cols in live_tables.items():
                if t == "account":
                    db.execute(f"DELETE FROM account WHERE id IN ({a_marks})", list(live_ids))
                elif t == "blob" or t in DERIVED_TABLES:
                    continue  # message_key rows go with their message rows (trigger)
                elif "account_id" in cols:
                    db.execute(f'DELETE FROM "{t}" WHERE account_id IN ({a_marks})', list(live_ids))
                elif "mailbox_id" in cols:
                    db.execute(f'DELETE FROM "{t}" WHERE mailbox_id IN ({lm_marks})', list(live_mbox))
            # Mailboxes that moved on since the snapshot: keep UIDs and modseqs growing.
            msg_rows = [dict(r) for r in rows.get("message", [])]
            extra_expunged: list[tuple[int, int, int]] = []
            for mid, sm in snap_mbox.items():
                lm = live_mbox.get(mid)
                if lm is None or int(lm["uidvalidity"]) != int(sm["uidvalidity"]):
                    continue
                if int(lm["highestmodseq"]) <= int(sm["highestmodseq"]) and int(lm["uidnext"]) <= int(sm["uidnext"]):
                    continue
                bump = max(int(lm["highestmodseq"]), int(sm["highestmodseq"])) + 1
                seen = live_msgs.get(mid, {})
                snap_uids = set()
                for mr in msg_rows:
                    if int(mr["mailbox_id"]) != mid:
                        continue
                    snap_uids.add(int(mr["uid"]))
                    if seen.get(int(mr["uid"]), (None, None))[0] != mr["flags"]:
                        mr["modseq"] = bump
                for uid in seen:
                    if uid not in snap_uids:
                        extra_expunged.append((mid, uid, bump))
                sm["highestmodseq"] = bump
                sm["uidnext"] = max(int(lm["uidnext"]), int(sm["uidnext"]))
                bumped.append(str(sm["name"]))
            rows["message"] = msg_rows  # type: ignore[assignment]
            if "mailbox" in rows:
                rows["mailbox"] = [snap_mbox[int(r["id"])] for r in rows["mailbox"]]  # type: ignore[misc]
            if "domain" in live_tables and dom_row is not None:
                cols = [c for c in snap_tables["domain"] if c in live_tables["domain"]]
                db.execute(
                    f"INSERT OR IGNORE INTO domain ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
                    [dom_row[c] for c in cols],
                )
            order = ["account", "mailbox"] + [t for t in rows if t not in ("account", "mailbox")]
            for t in order:
                if t not in live_tables:
                    continue
                cols = [c for c in snap_tables[t] if c in live_tables[t]]
                names = ",".join(f'"{c}"' for c in cols)
                sql = f'INSERT INTO "{t}" ({names}) VALUES ({",".join("?" * len(cols))})'
                for r in rows.get(t, []):
                    db.execute(sql, [r[c] for c in cols])
            if "expunged" in live_tables:
                snap_msg_keys = {(int(r["mailbox_id"]), int(r["uid"])) for r in msg_rows}
                for mid, uid, ms in extra_expunged:
                    if (mid, uid) not in snap_msg_keys:
                        db.execute(
                            "INSERT OR REPLACE INTO expunged (mailbox_id, uid, modseq) VALUES (?,?,?)", (mid, uid, ms)
                        )
            # Blob rows and reference counts for everything touched.
            for blob_id, br in blob_rows.items():
                if db.execute("SELECT 1 FROM blob WHERE id=?", (blob_id,)).fetchone() is None:
                    # Without its index rows (made again by the store's backfill at its next open;
                    # searches scan the blob until then): fts NULL.
                    cols = [c for c in snap_tables["blob"] if c in live_tables["blob"] and c != "fts"]
                    db.execute(
                        f"INSERT INTO blob ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
                        [br[c] for c in cols],
                    )
            ref_tables = [t for t, cols in live_tables.items() if "blob_id" in cols and t not in DERIVED_TABLES]
            gone: list[str] = []
            for blob_id in sorted(msg_blobs | old_blobs):
                n = sum(
                    int(db.execute(f'SELECT count(*) FROM "{t}" WHERE blob_id=?', (blob_id,)).fetchone()[0])
                    for t in ref_tables
                )
                if n == 0:
                    db.execute("DELETE FROM blob WHERE id=?", (blob_id,))
                    gone.append(blob_id)
                else:
                    db.execute("UPDATE blob SET refcount=? WHERE id=?", (n, blob_id))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    for blob_id in gone:
        store_blob_path(store_dir, blob_id).unlink(missing_ok=True)
    inline_db = store_dir / INLINE_DB
    if gone and inline_db.is_file():
        conn = sqlite3.connect(str(inline_db), timeout=60)
        try:
            with conn:
                conn.executemany("DELETE FROM blob_inline WHERE id = ?", [(b,) for b in gone])
        finally:
            conn.close()
    return ReplaceResult(
        mailboxes=len(snap_mbox), messages=len(rows.get("message", [])), blobs_added=added, bumped_mailboxes=bumped
    )
