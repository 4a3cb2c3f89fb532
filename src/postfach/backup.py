"""Backups: snapshots with a manifest, list / verify / prune / restore, the daily scheduler, the CLI.

Layout of a backup directory (``--to DIR``, default ``[backup] directory`` below the data dir)::

    <dir>/.lock                      flock: one backup or prune at a time
    <dir>/20261127T031500Z/          one complete snapshot (the id the subcommands take)
        manifest.json                written last: format, counts, per-account summary, every blob
        meta.sqlite3                 point-in-time copy of the metadata (online backup API)
        blobs/ab/<sha256>            hard links (unchanged blobs cost nothing)
        config/postfach.toml ...     the config, TLS and DKIM files, for ``restore --all``
    <dir>/.tmp-<id>-<pid>/           a snapshot being written (never listed as complete)

A snapshot is written under a temporary name and renamed into place only once its manifest is
durable, so a snapshot that looks complete always is; a failed one (disk full, crash, shutdown)
leaves only a temporary folder that the next run removes. The SQLite-specific work lives in
``postfach.store.snapshot``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postfach.config import Config
from postfach.errors import AlreadyExists, PostfachError, QuotaExceeded, UsageError
from postfach.store import snapshot as snapmod
from postfach.store.snapshot import Finding, SnapshotError

if TYPE_CHECKING:
    from postfach.context import ServerContext
    from postfach.store.base import Store

log = logging.getLogger("postfach.backup")

MANIFEST = "manifest.json"
BLOB_LIST = "blobs.txt"  # "<sha256> <size>" per line; its own hash is in the manifest
FORMAT = 1
LOCK_NAME = ".lock"
TMP_PREFIX = ".tmp-"
ID_RE = re.compile(r"^\d{8}T\d{6}Z(?:-\d+)?$")
RETRY_SECONDS = 600


class BackupError(PostfachError):
    """A backup operation failed; one line for the operator (the CLI exits 1)."""


# ------------------------------------------------------------------------------------------ progress


class Progress:
    """A one-line progress bar on stderr, shown only when stderr is a terminal."""

    def __init__(self, label: str, *, enabled: bool | None = None) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0
        self._shown = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        width = 30
        frac = done / total if total else 1.0
        bar = "#" * int(width * frac)
        sys.stderr.write(f"\r{self.label} [{bar:<{width}}] {done}/{total}")
        sys.stderr.flush()
        self._shown = True

    def close(self) -> None:
        if self.enabled and self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._shown = False


# ------------------------------------------------------------------------------------------ snapshots


@dataclass(frozen=True)
class SnapshotInfo:
    id: str
    path: Path
    created: datetime | None
    complete: bool
    size: int  # bytes of mail and metadata in the snapshot (what a restore brings back)
    added: int  # bytes this snapshot added on disk beyond the previous one
    messages: int
    accounts: int
    problem: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created": self.created.isoformat() if self.created else None,
            "complete": self.complete,
            "size": self.size,
            "added_bytes": self.added,
            "messages": self.messages,
            "accounts": self.accounts,
            "path": str(self.path),
            "problem": self.problem,
        }


def backup_root(config: Config, to: str | None = None) -> Path:
    return Path(to) if to else config.path(config.backup.directory)


def store_dir(config: Config) -> Path:
    if config.store.backend != "sqlite":
        raise UsageError(
            f"backups of the {config.store.backend} backend are made with its own tools (pg_dump); "
            "postfach backup handles the embedded sqlite store"
        )
    return config.path(config.store.path)


def load_manifest(snap: Path) -> dict[str, Any]:
    path = snap / MANIFEST
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise BackupError(f"snapshot {snap.name}: no {MANIFEST} (incomplete or not a snapshot)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BackupError(f"snapshot {snap.name}: {MANIFEST} is unreadable or damaged: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BackupError(f"snapshot {snap.name}: {MANIFEST} is not a postfach manifest (format {FORMAT})")
    return data


def load_blobs(snap: Path, manifest: dict[str, Any]) -> dict[str, int]:
    """The snapshot's blob list (sha256 -> size), checked against its hash in the manifest."""
    info = manifest.get("blob_list")
    if not isinstance(info, dict):
        if isinstance(manifest.get("blobs"), dict):  # small hand-made manifests (tests)
            return {k: int(v) for k, v in manifest["blobs"].items()}
        raise BackupError(f"snapshot {snap.name}: the manifest names no blob list")
    try:
        raw = (snap / BLOB_LIST).read_bytes()
    except OSError as exc:
        raise BackupError(f"snapshot {snap.name}: {BLOB_LIST} unreadable: {exc.strerror or exc}") from None
    if hashlib.sha256(raw).hexdigest() != info.get("sha256"):
        raise BackupError(f"snapshot {snap.name}: {BLOB_LIST} does not match its hash in the manifest (damaged)")
    out: dict[str, int] = {}
    for line in raw.decode("ascii", errors="replace").splitlines():
        blob_id, _, size = line.partition(" ")
        out[blob_id] = int(size)
    return out


def _info_from(snap: Path) -> SnapshotInfo:
    try:
        m = load_manifest(snap)
    except BackupError as exc:
        return SnapshotInfo(snap.name, snap, _created_from_id(snap.name), False, 0, 0, 0, 0, str(exc))
    counts = m.get("counts", {})
    return SnapshotInfo(
        id=snap.name,
        path=snap,
        created=datetime.fromisoformat(m["created"]),
        complete=bool(m.get("complete")),
        size=int(m.get("blob_bytes", 0)) + int(m.get("store", {}).get("database_size", 0)),
        added=int(m.get("new_bytes", 0)) + int(m.get("store", {}).get("database_size", 0)),
        messages=int(counts.get("messages", 0)),
        accounts=int(counts.get("accounts", 0)),
    )


def _created_from_id(name: str) -> datetime | None:
    m = re.search(r"(\d{8}T\d{6}Z)", name)
    if not m:
        return None
    return datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def list_snapshots(root: Path, *, include_incomplete: bool = True) -> list[SnapshotInfo]:
    """Snapshots oldest first; folders still being written (or left by a crash) as incomplete."""
    if not root.is_dir():
        return []
    out: list[SnapshotInfo] = []
    for p in sorted(root.iterdir()):
        if not p.is_dir():
            continue
        if ID_RE.match(p.name):
            info = _info_from(p)
            if info.complete or include_incomplete:
                out.append(info)
        elif p.name.startswith(TMP_PREFIX) and include_incomplete:
            why = "being written or left by a failed run"
            out.append(SnapshotInfo(p.name, p, _created_from_id(p.name), False, 0, 0, 0, 0, why))
    out.sort(key=lambda s: (s.created or datetime.min.replace(tzinfo=UTC), s.id))
    return out


def resolve(root: Path, snapshot_id: str) -> Path:
    """The folder of a complete snapshot; ``latest`` names the newest."""
    if snapshot_id == "latest":
        done = [s for s in list_snapshots(root, include_incomplete=False)]
        if not done:
            raise BackupError(f"no complete snapshot in {root}")
        return done[-1].path
    if not ID_RE.match(snapshot_id):
        raise UsageError(f"{snapshot_id!r} is not a snapshot id (like 20261127T031500Z; see `backup list`)")
    path = root / snapshot_id
    if not path.is_dir():
        raise UsageError(f"no snapshot {snapshot_id} in {root} (see `postfach backup list`)")
    return path


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(f"another backup or prune is running in {root}") from None
        yield
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    """Remove a snapshot so that no half-deleted one ever looks complete: rename, then delete."""
    if not path.exists():
        return
    doomed = path.with_name(f"{TMP_PREFIX}del-{path.name}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _new_id(root: Path, now: datetime) -> str:
    base = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    candidate, n = base, 1
    while (root / candidate).exists():
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def _config_files(config: Config) -> list[Path]:
    """Files of the data dir a full restore needs besides the store (relative to the data dir)."""
    d = config.data_dir
    out: list[Path] = []
    candidates = [d / "postfach.toml", config.path(config.tls.cert), config.path(config.tls.key)]
    dkim = d / "dkim"
    if dkim.is_dir():
        candidates += [p for p in sorted(dkim.rglob("*")) if p.is_file()]
    for p in candidates:
        try:
            rel = p.resolve().relative_to(d.resolve())
        except ValueError:
            continue  # outside the data dir: managed elsewhere (e.g. /etc/letsencrypt)
        if p.is_file():
            out.append(rel)
    return out


def create_backup(
    config: Config,
    root: Path,
    *,
    now: datetime | None = None,
    progress: snapmod.ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> SnapshotInfo:
    """Take one snapshot (incremental against the newest complete one). Raises BackupError."""
    sdir = store_dir(config)
    if not (sdir / snapmod.META_NAME).is_file():
        raise BackupError(f"no store at {sdir} (run `postfach init` first?)")
    started = time.monotonic()
    with _locked(root):
        for stale in root.glob(TMP_PREFIX + "*"):  # left by a crash: nobody holds the lock
            shutil.rmtree(stale, ignore_errors=True)
        done = list_snapshots(root, include_incomplete=False)
        prev = done[-1] if done else None
        prev_blobs: dict[str, int] = {}
        if prev is not None:
            try:
                prev_blobs = load_blobs(prev.path, load_manifest(prev.path))
            except BackupError:
                prev = None
        created = now or datetime.now(UTC)
        snap_id = _new_id(root, created)
        tmp = root / f"{TMP_PREFIX}{snap_id}-{os.getpid()}"
        try:
            res = snapmod.create_snapshot(
                sdir, tmp, previous=prev.path if prev else None, previous_blobs=prev_blobs,
                progress=progress, cancel=cancel,
            )
            files: dict[str, str] = {}
            for rel in _config_files(config):
                target = tmp / "config" / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(config.data_dir / rel, target)
                files[str(rel)] = snapmod.file_sha256(target)[0]
            blob_text = "".join(f"{b} {n}\n" for b, n in res.blobs.items()).encode("ascii")
            with (tmp / BLOB_LIST).open("wb") as bf:
                bf.write(blob_text)
                bf.flush()
                os.fsync(bf.fileno())
            manifest = {
                "format": FORMAT,
                "id": snap_id,
                "created": created.astimezone(UTC).isoformat(),
                "complete": True,
                "hostname": config.hostname,
                "previous": prev.id if prev else None,
                "store": {
                    "backend": "sqlite",
                    "schema_version": res.schema_version,
                    "database": snapmod.META_NAME,
                    "database_sha256": res.db_sha256,
                    "database_size": res.db_size,
                    "path": config.store.path,
                },
                "counts": res.counts,
                "accounts": res.accounts,
                "blob_count": len(res.blobs),
                "blob_bytes": sum(max(0, s) for s in res.blobs.values()),
                "new_blobs": res.new_blobs,
                "new_bytes": res.new_bytes,
                "copied_blobs": res.copied_blobs,
                "missing_in_store": res.missing_in_store,
                "damaged_in_store": res.damaged_in_store,
                "files": files,
                "seconds": round(time.monotonic() - started, 3),
                "blob_list": {"file": BLOB_LIST, "sha256": hashlib.sha256(blob_text).hexdigest()},
            }
            mpath = tmp / MANIFEST
            with mpath.open("w", encoding="utf-8") as f:
                json.dump(manifest, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            snapmod.sync_filesystem(tmp)  # links, copies, folders durable before the rename completes it
            final = root / snap_id
            os.replace(tmp, final)
            snapmod.fsync_dir(root)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise BackupError(f"backup failed: disk full in {root}; nothing was kept") from None
            raise BackupError(f"backup failed: {exc.strerror or exc} ({exc.filename or root})") from None
        except sqlite3.Error as exc:  # the metadata copy: "database or disk is full", I/O errors
            shutil.rmtree(tmp, ignore_errors=True)
            what = "disk full" if "full" in str(exc) else f"the store database could not be copied: {exc}"
            raise BackupError(f"backup failed: {what} in {root}; nothing was kept") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if res.missing_in_store or res.damaged_in_store:
        log.error(
            "backup %s: the store itself lacks %d and has %d damaged message files (run `postfach check`)",
            snap_id, len(res.missing_in_store), len(res.damaged_in_store),
        )
    return _info_from(final)


def verify(root: Path, snapshot_id: str, *, progress: snapmod.ProgressFn | None = None) -> list[Finding]:
    snap = resolve(root, snapshot_id)
    try:
        m = load_manifest(snap)
        blobs = load_blobs(snap, m)
    except BackupError as exc:
        return [Finding("manifest", str(exc))]
    found = snapmod.verify_files(snap, blobs, m.get("store", {}).get("database_sha256"), progress=progress)
    for b in m.get("missing_in_store", []):
        found.append(Finding("missing-in-store", f"{b}: was already missing in the store when the snapshot was taken"))
    for b in m.get("damaged_in_store", []):
        found.append(Finding("damaged-in-store", f"{b}: was already damaged in the store when the snapshot was taken"))
    for rel, digest in m.get("files", {}).items():
        p = snap / "config" / rel
        if not p.is_file():
            found.append(Finding("missing-file", f"config/{rel} is missing"))
        elif snapmod.file_sha256(p)[0] != digest:
            found.append(Finding("bad-hash", f"config/{rel} does not match its hash"))
    return found


def _require_sound(snap: Path, m: dict[str, Any], only: set[str] | None) -> None:
    blobs = load_blobs(snap, m)
    found = snapmod.verify_files(snap, blobs, m.get("store", {}).get("database_sha256"), only=only)
    if found:
        first = found[0]
        raise BackupError(
            f"snapshot {snap.name} is damaged ({len(found)} problem(s), first: {first.kind}: {first.detail}); "
            f"refusing to restore from it - run `postfach backup verify {snap.name}` and pick another snapshot"
        )


# -------------------------------------------------------------------------------------------- prune


def select_keep(snaps: Sequence[SnapshotInfo], daily: int, weekly: int, monthly: int) -> set[str]:
    """Grandfather-father-son: the newest snapshot of each of the last ``daily`` days that have one,
    of the last ``weekly`` ISO weeks and of the last ``monthly`` months (restic/borg semantics)."""
    newest_first = sorted((s for s in snaps if s.complete and s.created), key=lambda s: s.created, reverse=True)  # type: ignore[arg-type,return-value]
    keep: set[str] = set()
    rules: list[tuple[int, Callable[[datetime], object]]] = [
        (daily, lambda d: d.date()),
        (weekly, lambda d: d.isocalendar()[:2]),
        (monthly, lambda d: (d.year, d.month)),
    ]
    for n, key in rules:
        periods: set[object] = set()
        for s in newest_first:
            assert s.created is not None
            k = key(s.created)
            if k in periods:
                continue
            if len(periods) >= n:
                break
            periods.add(k)
            keep.add(s.id)
    return keep


def prune(root: Path, daily: int, weekly: int, monthly: int) -> tuple[list[str], list[str]]:
    """Remove complete snapshots the policy does not keep, and leftovers of failed runs."""
    if daily + weekly + monthly <= 0:
        raise UsageError("prune would remove every snapshot: keep at least one (--keep-daily 1)")
    with _locked(root):
        for stale in root.glob(TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        snaps = list_snapshots(root, include_incomplete=False)
        keep = select_keep(snaps, daily, weekly, monthly)
        removed = []
        for s in snaps:
            if s.id not in keep:
                _remove_tree(s.path)
                removed.append(s.id)
        # The metadata is copied whole each day: compress it in every snapshot but the newest
        # (which stays ready for a quick restore and for the next incremental run).
        kept = [s for s in snaps if s.id in keep]
        for s in kept[:-1]:
            try:
                snapmod.compress_database(s.path)
            except OSError as exc:
                log.warning("backup %s: compressing its metadata failed: %s", s.id, exc.strerror or exc)
    return sorted(keep), removed


# ------------------------------------------------------------------------------------------ restore


@dataclass(frozen=True)
class RestoreSummary:
    folders: list[str]
    messages: int
    skipped: int  # already present (a second run of the same restore)


def default_folder(snap: Path) -> str:
    created = _created_from_id(snap.name) or datetime.now(UTC)
    return f"Restored {created.strftime('%Y-%m-%d')}"


async def restore_account(
    store: Store,
    snap: Path,
    address: str,
    *,
    folder: str | None = None,
    mailbox: str | None = None,
    progress: snapmod.ProgressFn | None = None,
) -> RestoreSummary:
    """Put the snapshot's mail of ``address`` into ``folder`` (default "Restored YYYY-MM-DD"): a tree
    of the account's folders below it, or with ``mailbox`` just that folder's messages in it. Flags
    and INTERNALDATE as they were; nothing else of the account, nor any other account, changes.
    Runs through the Store interface, so it is safe while the server serves. A second run adds
    only what is missing (same bytes in the same folder are skipped)."""
    from postfach.types import AccountId, MailboxId

    m = load_manifest(snap)
    target_root = folder or default_folder(snap)
    acct = await store.get_account(address)
    if acct is None:
        raise BackupError(f"no account {address} in the store: use --replace to recreate it from the snapshot")
    _require_sound(snap, m, set())  # the database first: nothing is read from a damaged one
    with snapmod.SnapshotReader(snap) as reader:
        sid = reader.account_id(address)
        if sid is None:
            raise BackupError(f"snapshot {snap.name} has no account {address}")
        boxes = reader.mailboxes(sid)
        if mailbox is not None:
            want = mailbox.upper() if mailbox.upper() == "INBOX" else mailbox
            boxes = [b for b in boxes if b.name == want]
            if not boxes:
                names = ", ".join(b.name for b in reader.mailboxes(sid))
                raise BackupError(f"snapshot {snap.name} has no folder {mailbox!r} for {address} (it has: {names})")
            plan = [(boxes[0], target_root)]
        else:
            plan = [(b, f"{target_root}/{b.name}") for b in boxes]
        _require_sound(snap, m, reader.account_blobs(sid) if mailbox is None else
                       {msg.blob_id for msg in reader.messages(boxes[0].id)})
        per_box = [(b, name, reader.messages(b.id)) for b, name in plan]
        total = sum(len(msgs) for _, _, msgs in per_box)
        need = sum(msg.size for _, _, msgs in per_box for msg in msgs)
        if acct.quota_bytes is not None and acct.used_bytes + need > acct.quota_bytes:
            raise BackupError(
                f"restoring {need} bytes would take {address} over its quota "
                f"({acct.used_bytes} of {acct.quota_bytes} bytes used): raise it with `postfach user quota` first"
            )
        account_id = AccountId(acct.id)
        made: list[str] = []

        async def ensure(name: str) -> MailboxId:
            parts = name.split("/")
            mid: MailboxId | None = None
            for i in range(1, len(parts) + 1):
                sub = "/".join(parts[:i])
                mb = await store.get_mailbox(account_id, sub)
                if mb is None:
                    try:
                        mb = await store.create_mailbox(account_id, sub)
                        await store.set_subscribed(account_id, sub, True)
                    except AlreadyExists:
                        mb = await store.get_mailbox(account_id, sub)
                        assert mb is not None
                mid = MailboxId(mb.id)
            assert mid is not None
            return mid

        done = restored = skipped = 0
        for _box, name, msgs in per_box:
            mid = await ensure(name)
            made.append(name)
            present = {meta.blob_id for meta in await store.list_messages(account_id, mid)}
            batch: list[tuple[bytes, frozenset[str], datetime | None]] = []
            batch_bytes = 0
            for msg in msgs:
                done += 1
                if msg.blob_id in present:
                    skipped += 1
                    continue
                data = reader.read_blob(msg.blob_id)
                flags = frozenset(f for f in msg.flags if f.lower() != "\\recent")
                idate = datetime.fromtimestamp(msg.internaldate_us / 1e6, UTC)
                batch.append((data, flags, idate))
                batch_bytes += len(data)
                if len(batch) >= 200 or batch_bytes >= 32 << 20:
                    await _append_batch(store, account_id, mid, batch)
                    restored += len(batch)
                    batch, batch_bytes = [], 0
                    if progress is not None:
                        progress(done, total)
            if batch:
                await _append_batch(store, account_id, mid, batch)
                restored += len(batch)
            if progress is not None:
                progress(done, total)
    return RestoreSummary(made, restored, skipped)


async def _append_batch(
    store: Store, account_id: Any, mid: Any, batch: list[tuple[bytes, frozenset[str], datetime | None]]
) -> None:
    try:
        await store.append_many(account_id, mid, batch)
    except QuotaExceeded as exc:
        raise BackupError(f"restore stopped: {exc} (raise the quota with `postfach user quota`)") from None


def restore_replace(config: Config, snap: Path, address: str) -> snapmod.ReplaceResult:
    """``--replace``: the account exactly as in the snapshot (offline: the server must be stopped)."""
    m = load_manifest(snap)
    sdir = store_dir(config)
    if snapmod.store_in_use(sdir):
        raise BackupError(
            f"the store {sdir} is in use: stop the server (and other postfach commands) before --replace"
        )
    _require_sound(snap, m, set())
    with snapmod.SnapshotReader(snap) as reader:
        sid = reader.account_id(address)
        if sid is None:
            raise BackupError(f"snapshot {snap.name} has no account {address}")
        _require_sound(snap, m, reader.account_blobs(sid))
    with tempfile.TemporaryDirectory(prefix=".restore-", dir=sdir.parent) as tmp:
        snap_db = _migrated_copy(snap, sdir, Path(tmp))
        try:
            return snapmod.replace_account(snap, sdir, address, snap_db=snap_db)
        except SnapshotError as exc:
            raise BackupError(str(exc)) from None


def _migrated_copy(snap: Path, sdir: Path, tmp: Path) -> Path | None:
    """When the store was upgraded since the snapshot, a copy of the snapshot's metadata brought to
    the same schema by the store's own migrations (never the snapshot itself: it stays read-only)."""

    def version(db: Path) -> int:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return snapmod.schema_version(conn)
        finally:
            conn.close()

    with snapmod.snapshot_db(snap) as db:
        have, want = version(db), version(sdir / snapmod.META_NAME)
        if have == want:
            return None
        if have > want:
            raise BackupError(
                f"snapshot {snap.name} was made by a newer postfach (schema {have} > {want}): upgrade first"
            )
        work = tmp / "store"
        work.mkdir()
        shutil.copyfile(db, work / snapmod.META_NAME)
    from postfach.store.sqlite import SqliteStore

    async def migrate() -> None:
        s = SqliteStore(work)
        await s.open()
        await s.close()

    asyncio.run(migrate())
    return work / snapmod.META_NAME


def restore_all(snap: Path, new_data: Path, *, progress: snapmod.ProgressFn | None = None) -> Path:
    """``--all``: a whole new data dir (config, certificates, DKIM keys, store) from the snapshot."""
    m = load_manifest(snap)
    if new_data.exists() and any(new_data.iterdir()):
        raise UsageError(f"{new_data} exists and is not empty: restore --all needs a new, empty data dir")
    _require_sound(snap, m, None)
    new_data.mkdir(parents=True, exist_ok=True)
    cfg_src = snap / "config"
    if cfg_src.is_dir():
        for p in sorted(cfg_src.rglob("*")):
            if p.is_file():
                target = new_data / p.relative_to(cfg_src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, target)
    store_rel = str(m.get("store", {}).get("path") or "store")
    if Path(store_rel).is_absolute():
        log.warning("the snapshot's store.path %s is absolute: restored into %s/store instead", store_rel, new_data)
        store_rel = "store"
    new_store = new_data / store_rel
    snapmod.restore_store_dir(snap, new_store, progress=progress, blobs=load_blobs(snap, m).keys())
    return new_store


# ----------------------------------------------------------------------------------------- schedule


def next_run(now: datetime, time_of_day: str) -> datetime:
    """The next local ``HH:MM`` strictly after ``now`` (aware, local time)."""
    hh, mm = (int(x) for x in time_of_day.split(":"))
    local = now.astimezone()
    at = datetime.combine(local.date(), dtime(hh, mm), tzinfo=local.tzinfo)
    if at <= local:
        at = datetime.combine(local.date() + timedelta(days=1), dtime(hh, mm)).astimezone()
    return at


class BackupScheduler:
    """``serve`` runs the daily backup itself: at ``[backup] time_of_day`` (local time), in a thread so
    the event loop keeps serving, then prunes by the retention policy. A failure is logged loudly and
    retried after ``retry_seconds``; a failed run never leaves a snapshot that looks complete."""

    def __init__(self, ctx: ServerContext, *, retry_seconds: float = RETRY_SECONDS) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.retry_seconds = retry_seconds
        self._task: asyncio.Task[None] | None = None
        self._cancel = threading.Event()
        self._wake = asyncio.Event()
        self.last_result: SnapshotInfo | None = None
        self.last_error: str | None = None
        self.runs = 0

    async def start(self) -> None:
        if self.config.store.backend != "sqlite":
            log.warning("scheduled backups cover the embedded store only; backend %s is not backed up",
                        self.config.store.backend)
            return
        self._task = asyncio.create_task(self._loop(), name="postfach-backup-scheduler")

    async def stop(self) -> None:
        self._cancel.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def run_now(self) -> None:
        """Start a backup at once (tests, admin hooks)."""
        self._wake.set()

    async def _sleep_until(self, when: datetime) -> None:
        delay = max(0.0, (when - datetime.now(UTC)).total_seconds())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=delay)
        self._wake.clear()

    async def _loop(self) -> None:
        due = next_run(datetime.now(UTC), self.config.backup.time_of_day)
        while True:
            await self._sleep_until(due)
            ok = await self.run_once()
            if ok:
                due = next_run(datetime.now(UTC), self.config.backup.time_of_day)
            else:
                due = datetime.now(UTC) + timedelta(seconds=self.retry_seconds)
                log.error("backup: next attempt at %s", due.astimezone().strftime("%Y-%m-%d %H:%M"))

    async def run_once(self) -> bool:
        root = backup_root(self.config)
        self.runs += 1
        try:
            info = await asyncio.to_thread(create_backup, self.config, root, cancel=self._cancel)
        except snapmod.Cancelled:
            log.warning("backup: cancelled by shutdown; nothing was kept")
            return False
        except Exception as exc:  # a backup failure must never take the server down
            self.last_error = str(exc)
            if isinstance(exc, PostfachError):
                log.error("BACKUP FAILED: %s", exc)
            else:
                log.exception("BACKUP FAILED: %s", exc)
            return False
        self.last_result, self.last_error = info, None
        log.info(
            "backup %s complete: %d messages, %d bytes, %d bytes new, in %s",
            info.id, info.messages, info.size, info.added, root,
        )
        b = self.config.backup
        try:
            kept, removed = await asyncio.to_thread(prune, root, b.keep_daily, b.keep_weekly, b.keep_monthly)
        except (PostfachError, OSError) as exc:
            log.error("backup: pruning old snapshots failed: %s", exc)
        else:
            if removed:
                log.info("backup: pruned %d old snapshot(s): %s; %d kept", len(removed), ", ".join(removed), len(kept))
        return True


# -------------------------------------------------------------------------------------------- CLI


def _print_findings(snap_id: str, found: Sequence[Finding]) -> None:
    for f in found:
        print(f"{f.kind}: {f.detail}")
    print(f"snapshot {snap_id}: {len(found)} problem(s) found")


def cmd_create(args: argparse.Namespace, config: Config) -> int:
    root = backup_root(config, args.to)
    bar = Progress("backup")
    try:
        info = create_backup(config, root, progress=bar)
    except BackupError as exc:
        bar.close()
        print(f"postfach: {exc}", file=sys.stderr)
        return 1
    bar.close()
    print(
        f"Snapshot {info.id}: {info.messages} messages, {info.accounts} accounts, "
        f"{_human(info.size)} in total, {_human(info.added)} new on disk ({info.path})"
    )
    return 0


def cmd_list(args: argparse.Namespace, config: Config) -> int:
    snaps = list_snapshots(backup_root(config, args.to))
    if args.json:
        print(json.dumps([s.to_json() for s in snaps], indent=2))
        return 0
    if not snaps:
        print(f"no snapshots in {backup_root(config, args.to)}")
        return 0
    rows = [
        (s.id, s.created.strftime("%Y-%m-%d %H:%M") if s.created else "?", _human(s.size), _human(s.added),
         str(s.messages), "yes" if s.complete else "NO")
        for s in snaps
    ]
    header = ("ID", "CREATED (UTC)", "SIZE", "ADDED", "MESSAGES", "COMPLETE")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_verify(args: argparse.Namespace, config: Config) -> int:
    root = backup_root(config, args.to)
    bar = Progress("verify")
    found = verify(root, args.snapshot, progress=bar)
    bar.close()
    snap_id = resolve(root, args.snapshot).name
    if found:
        _print_findings(snap_id, found)
        return 1
    m = load_manifest(root / snap_id)
    print(f"snapshot {snap_id} OK: {m['blob_count']} message files present with the right hash, database intact")
    return 0


def cmd_prune(args: argparse.Namespace, config: Config) -> int:
    b = config.backup
    d = b.keep_daily if args.keep_daily is None else args.keep_daily
    w = b.keep_weekly if args.keep_weekly is None else args.keep_weekly
    mo = b.keep_monthly if args.keep_monthly is None else args.keep_monthly
    kept, removed = prune(backup_root(config, args.to), d, w, mo)
    for r in removed:
        print(f"removed {r}")
    print(f"{len(kept)} snapshot(s) kept, {len(removed)} removed")
    return 0


def cmd_restore(args: argparse.Namespace, config: Config) -> int:
    if args.restore_data is not None and not args.all:
        # Without --all, --data after the subcommand is the ordinary data dir.
        from postfach import config as cfgmod

        config = cfgmod.load(Path(args.restore_data))
    root = backup_root(config, args.to)
    snap = resolve(root, args.snapshot)
    try:
        if args.all:
            if args.account or args.replace or args.folder or args.mailbox:
                raise UsageError("--all restores everything: it takes no --account, --folder, --mailbox or --replace")
            if not args.restore_data:
                raise UsageError("--all needs --data NEWDIR (a new, empty data dir)")
            bar = Progress("restore")
            new_store = restore_all(snap, Path(args.restore_data), progress=bar)
            bar.close()
            _check_opens(config, new_store)
            print(f"Restored snapshot {snap.name} into {args.restore_data}; start it with "
                  f"`postfach serve --data {args.restore_data}`")
            return 0
        if not args.account:
            raise UsageError("restore needs --account ADDRESS (or --all --data NEWDIR)")
        from postfach.cli import normalize_address

        address = normalize_address(args.account)
        if args.replace:
            if args.folder or args.mailbox:
                raise UsageError("--replace puts the whole account back: it takes no --folder or --mailbox")
            res = restore_replace(config, snap, address)
            extra = f"; moved past the snapshot, modseqs raised: {', '.join(res.bumped_mailboxes)}" \
                if res.bumped_mailboxes else ""
            print(f"Replaced {address} with its state of snapshot {snap.name}: {res.mailboxes} folders, "
                  f"{res.messages} messages{extra}")
            return 0
        bar = Progress("restore")
        summary = _with_store(config, lambda s: restore_account(
            s, snap, address, folder=args.folder, mailbox=args.mailbox, progress=bar))
        bar.close()
        more = f" ({summary.skipped} already there)" if summary.skipped else ""
        where = summary.folders[0] if args.mailbox else (args.folder or default_folder(snap))
        print(f"Restored {summary.messages} messages of {address} into {where}{more}")
        return 0
    except BackupError as exc:
        print(f"postfach: {exc}", file=sys.stderr)
        return 1


def _check_opens(config: Config, new_store: Path) -> None:
    """Open the rebuilt store once with the real store code (migrates it if it is older)."""
    from postfach.store.sqlite import SqliteStore

    async def run() -> None:
        s = SqliteStore(new_store)
        await s.open()
        await s.close()

    try:
        asyncio.run(run())
    except PostfachError as exc:
        raise BackupError(f"the restored store does not open: {exc}") from None


def _with_store(config: Config, fn: Callable[[Store], Any]) -> Any:
    from postfach.store import open_store

    async def run() -> Any:
        store = open_store(config)
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(run())


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _nonneg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return v


def add_parsers(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser | None = None) -> None:
    parents = [common] if common is not None else []
    p = sub.add_parser("backup", parents=parents, help="snapshots of the store: create, list, verify, prune, restore")
    bsub = p.add_subparsers(dest="backup_action", required=True, metavar="ACTION", parser_class=type(p))
    to_help = "backup directory (default: [backup] directory of the config, below the data dir)"

    s = bsub.add_parser("create", parents=parents, help="take a consistent snapshot while the server runs")
    s.add_argument("--to", metavar="DIR", help=to_help)
    s.set_defaults(func=cmd_create)

    s = bsub.add_parser("list", parents=parents, help="list snapshots, oldest first")
    s.add_argument("--to", metavar="DIR", help=to_help)
    s.add_argument("--json", action="store_true", help="a JSON list: id, created, size, messages, complete ...")
    s.set_defaults(func=cmd_list)

    s = bsub.add_parser(
        "verify", parents=parents, help="check every message file and hash of a snapshot (exit 1 if not)"
    )
    s.add_argument("snapshot", metavar="SNAPSHOT", help="snapshot id from `backup list` (or latest)")
    s.add_argument("--to", metavar="DIR", help=to_help)
    s.set_defaults(func=cmd_verify)

    s = bsub.add_parser("prune", parents=parents, help="remove snapshots beyond the retention policy")
    s.add_argument("--keep-daily", type=_nonneg, metavar="N", help="newest snapshot of each of the last N days")
    s.add_argument("--keep-weekly", type=_nonneg, metavar="N", help="... of each of the last N ISO weeks")
    s.add_argument("--keep-monthly", type=_nonneg, metavar="N", help="... of each of the last N months")
    s.add_argument("--to", metavar="DIR", help=to_help)
    s.set_defaults(func=cmd_prune)

    # No `common` parent here: --data means the NEW data dir with --all (see the help text).
    s = bsub.add_parser(
        "restore",
        help="bring mail back from a snapshot",
        description=(
            "Three forms. (1) --account ADDRESS [--folder NAME] [--mailbox NAME]: copies that account's "
            "mail of the snapshot into a folder (default \"Restored YYYY-MM-DD\") while the server runs; "
            "current mail and other accounts are not touched. (2) --account ADDRESS --replace: puts the "
            "account back exactly as it was (password, folders, UIDVALIDITY, UIDs, modseqs, flags, POP3 "
            "UIDLs) - OFFLINE: stop the server first. (3) --all --data NEWDIR: rebuilds a whole new data "
            "dir; here --data after `restore` names the NEW dir, while the source data dir (for the "
            "default --to) comes from `postfach --data DIR backup ...` or $POSTFACH_DATA. Without "
            "--all, --data after `restore` is the ordinary data dir. On a new machine with only the "
            "backups, pass the snapshot's config folder as the source: "
            "`postfach --data BACKUPS/ID/config backup restore ID --all --data NEWDIR --to BACKUPS`."
        ),
    )
    s.add_argument("snapshot", metavar="SNAPSHOT", help="snapshot id from `backup list` (or latest)")
    s.add_argument("--account", metavar="ADDRESS", help="the account to restore")
    s.add_argument("--folder", metavar="NAME", help="target folder (default: \"Restored YYYY-MM-DD\")")
    s.add_argument("--mailbox", metavar="NAME", help="only this folder of the account")
    s.add_argument("--replace", action="store_true", help="put the account back exactly as it was (server stopped)")
    s.add_argument("--all", action="store_true", help="rebuild a whole data dir into --data NEWDIR")
    s.add_argument("--data", dest="restore_data", metavar="DIR",
                   help="with --all: the NEW data dir; otherwise: the data dir")
    s.add_argument("--to", metavar="DIR", help=to_help)
    s.set_defaults(func=cmd_restore)


__all__ = [
    "BackupError",
    "BackupScheduler",
    "Progress",
    "SnapshotInfo",
    "add_parsers",
    "create_backup",
    "list_snapshots",
    "prune",
    "restore_account",
    "restore_all",
    "restore_replace",
    "select_keep",
    "verify",
]
