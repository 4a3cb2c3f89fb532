"""Backups against the real SQLite store: consistency under load, incremental size, verify, prune,
single-account restore, --replace, --all, disk full, the scheduler."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import shutil
import sqlite3
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from postfach import backup
from postfach.store import snapshot as snapmod
from postfach.store.base import FlagOp
from postfach.store.sqlite import SqliteStore
from postfach.types import AccountId, MailboxId, ModSeq, Uid

from .conftest import HASH_USER, OTHER, USER, Env, message

# `postfach backup` snapshots the embedded store's files (PostgreSQL is backed up with pg_dump,
# src/postfach/backup.py refuses it): every test here is about those files.
pytestmark = pytest.mark.sqlite_only("backups snapshot the embedded store's files; PostgreSQL uses pg_dump")


def disk_usage(root: Path) -> int:
    """Bytes on disk below ``root``, each inode counted once (hard links are free)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            total += st.st_size
    return total


def snapshot_ids(env: Env) -> list[str]:
    return [s.id for s in backup.list_snapshots(env.backups, include_incomplete=False)]


def mail_state(db: Path) -> dict[str, Any]:
    """Everything a client can observe of every account: mailboxes with UIDVALIDITY/UIDNEXT/modseq,
    messages with UID, blob, flags, modseq, INTERNALDATE; password hashes; METADATA entries."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        accounts = {r[0]: r[1] for r in conn.execute("SELECT address, password_hash FROM account")}
        boxes = conn.execute(
            "SELECT a.address, m.name, m.uidvalidity, m.uidnext, m.highestmodseq, m.id FROM mailbox m "
            "JOIN account a ON a.id = m.account_id ORDER BY 1, 2"
        ).fetchall()
        state: dict[str, Any] = {"accounts": accounts, "mailboxes": {}}
        for addr, name, uv, un, hms, mid in boxes:
            msgs = conn.execute(
                "SELECT uid, blob_id, flags, modseq, internaldate FROM message WHERE mailbox_id=? ORDER BY uid", (mid,)
            ).fetchall()
            state["mailboxes"][f"{addr}:{name}"] = {"uidvalidity": uv, "uidnext": un, "highestmodseq": hms,
                                                    "messages": [tuple(m) for m in msgs]}
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "metadata" in tables and conn.execute("SELECT 1 FROM metadata").fetchone():
            state["metadata"] = sorted(conn.execute(
                "SELECT a.address, coalesce(m.name, ''), d.name, d.value FROM metadata d"
                " JOIN account a ON a.id = d.account_id LEFT JOIN mailbox m ON m.id = d.mailbox_id").fetchall())
        return state
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------ create


def test_create_list_verify_cli(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    assert env.run("backup", "create") == 0
    assert env.run("backup", "list", "--json") == 0
    out = capsys.readouterr().out
    listing = json.loads(out[out.index("[") :])
    assert len(listing) == 1
    snap = listing[0]
    assert snap["complete"] is True
    assert snap["messages"] == 12 + 4 + 1 + 5
    assert snap["size"] > 0 and snap["created"]
    assert env.run("backup", "verify", snap["id"]) == 0
    assert "OK" in capsys.readouterr().out
    # The snapshot holds the config for a full restore, and the manifest every blob with its size.
    sdir = env.backups / snap["id"]
    assert (sdir / "config" / "postfach.toml").is_file()
    manifest = json.loads((sdir / "manifest.json").read_text())
    assert manifest["blob_count"] == len(backup.load_blobs(sdir, manifest)) == 12 + 4 + 1 + 5
    # --to works the same for every subcommand.
    other = env.data.parent / "elsewhere"
    assert env.run("backup", "create", "--to", str(other)) == 0
    assert env.run("backup", "list", "--to", str(other), "--json") == 0
    listed = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert env.run("backup", "verify", listed[0]["id"], "--to", str(other)) == 0


def test_unknown_snapshot_is_a_usage_error(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    assert env.run("backup", "verify", "20200101T000000Z") == 2
    assert "no snapshot" in capsys.readouterr().err
    assert env.run("backup", "verify", "../etc") == 2


@pytest.mark.asyncio
async def test_snapshot_consistent_while_store_is_busy(env: Env) -> None:
    """Appends, flag changes and expunges run while snapshots are taken: every snapshot is a point in
    time: each message has its blob, usage counters match a recount, UIDs below UIDNEXT."""
    store = env.store()
    await store.open()
    stop = asyncio.Event()
    writes = 0
    try:
        acct = await store.get_account(USER)
        assert acct is not None
        aid = AccountId(acct.id)
        inbox = await store.get_mailbox(aid, "INBOX")
        assert inbox is not None
        mid = MailboxId(inbox.id)
        rnd = random.Random(7)

        async def load() -> None:
            nonlocal writes
            n = 1000
            while not stop.is_set():
                n += 1
                res = await store.append(aid, mid, message(n, size=rnd.randint(200, 4000), tag="load"))
                await store.store_flags(aid, mid, [res.uid], FlagOp.ADD, frozenset({"\\Seen"}))
                if n % 3 == 0:
                    await store.store_flags(aid, mid, [res.uid], FlagOp.ADD, frozenset({"\\Deleted"}))
                    await store.expunge(aid, mid, [res.uid])
                writes += 1
                await asyncio.sleep(0)

        tasks = [asyncio.create_task(load()) for _ in range(3)]
        infos = []
        for _ in range(3):
            infos.append(await asyncio.to_thread(backup.create_backup, env.config, env.backups))
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        await store.close()
    assert writes > 0
    for info in infos:
        assert backup.verify(env.backups, info.id) == []
        db = info.path / "meta.sqlite3"
        manifest = json.loads((info.path / "manifest.json").read_text())
        referenced = {r[0] for r in env.db_rows("SELECT blob_id FROM message", db=db)}
        assert referenced <= set(backup.load_blobs(info.path, manifest))
        for blob_id in referenced:
            assert (info.path / snapmod.blob_relpath(blob_id)).is_file()
        for addr, used_b, used_m, real_b, real_m in env.db_rows(
            "SELECT a.address, a.used_bytes, a.used_messages,"
            " (SELECT coalesce(sum(m.size),0) FROM message m JOIN mailbox b ON b.id=m.mailbox_id"
            "  WHERE b.account_id=a.id),"
            " (SELECT count(*) FROM message m JOIN mailbox b ON b.id=m.mailbox_id WHERE b.account_id=a.id)"
            " FROM account a", db=db,
        ):
            assert (used_b, used_m) == (real_b, real_m), addr
        for uidnext, maxuid, hms, maxmod in env.db_rows(
            "SELECT b.uidnext, max(m.uid), b.highestmodseq, max(m.modseq) FROM mailbox b"
            " JOIN message m ON m.mailbox_id=b.id GROUP BY b.id", db=db,
        ):
            assert maxuid < uidnext and maxmod <= hms
        refs = dict(env.db_rows("SELECT blob_id, count(*) FROM message GROUP BY blob_id", db=db))
        for blob_id, refcount in env.db_rows("SELECT id, refcount FROM blob", db=db):
            assert refs.get(blob_id, 0) <= refcount


def test_incremental_backup_costs_only_new_mail(env: Env) -> None:
    first = backup.create_backup(env.config, env.backups)
    before = disk_usage(env.backups)
    size = 20_000

    async def add() -> None:
        s = env.store()
        await s.open()
        try:
            acct = await s.get_account(USER)
            assert acct is not None
            inbox = await s.get_mailbox(AccountId(acct.id), "INBOX")
            assert inbox is not None
            for i in range(10):
                await s.append(AccountId(acct.id), MailboxId(inbox.id), message(i, size=size, tag="new"))
        finally:
            await s.close()

    asyncio.run(add())
    second = backup.create_backup(env.config, env.backups)
    added = disk_usage(env.backups) - before
    db_size = (second.path / "meta.sqlite3").stat().st_size
    other = added - db_size
    # The 10 new messages plus the metadata copy and a small manifest: nothing else is copied.
    assert 10 * size <= other <= 10 * size + 64_000, (added, db_size)
    m2 = json.loads((second.path / "manifest.json").read_text())
    assert m2["new_blobs"] == 10 and m2["previous"] == first.id
    # Old blobs are the same inodes as in the first snapshot.
    some = next(iter(backup.load_blobs(first.path, json.loads((first.path / "manifest.json").read_text()))))
    ino = (first.path / snapmod.blob_relpath(some)).stat().st_ino
    assert (second.path / snapmod.blob_relpath(some)).stat().st_ino == ino


def test_disk_full_fails_cleanly(env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = snapmod._place
    calls = 0

    def failing(*args: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[1]))
        return real(*args, **kw)

    monkeypatch.setattr(snapmod, "_place", failing)
    assert env.run("backup", "create") == 1
    assert "disk full" in capsys.readouterr().err
    assert list(env.backups.iterdir()) == [env.backups / ".lock"]  # no temp folder, no snapshot
    monkeypatch.setattr(snapmod, "_place", real)
    assert env.run("backup", "create") == 0
    assert len(snapshot_ids(env)) == 1


def test_leftover_temp_folder_never_counts_as_complete(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    info = backup.create_backup(env.config, env.backups)
    fake = env.backups / ".tmp-20261127T000000Z-999"
    shutil.copytree(info.path, fake)
    assert snapshot_ids(env) == [info.id]
    assert env.run("backup", "list", "--json") == 0
    listing = json.loads(capsys.readouterr().out)
    assert [(s["id"], s["complete"]) for s in listing].count((fake.name, False)) == 1
    backup.create_backup(env.config, env.backups)
    assert not fake.exists()  # removed by the next run, which holds the lock


# ------------------------------------------------------------------------------------------ verify


def test_verify_detects_missing_and_corrupt_blob_and_restore_refuses(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    info = backup.create_backup(env.config, env.backups)
    manifest = json.loads((info.path / "manifest.json").read_text())
    blobs = sorted(backup.load_blobs(info.path, manifest))
    missing = info.path / snapmod.blob_relpath(blobs[0])
    missing.unlink()
    corrupt = info.path / snapmod.blob_relpath(blobs[1])
    data = corrupt.read_bytes()
    tmp = corrupt.with_name("x")
    tmp.write_bytes(data[:-5] + b"XXXXX")  # a new inode: the store's copy stays intact
    os.replace(tmp, corrupt)
    assert env.run("backup", "verify", info.id) == 1
    out = capsys.readouterr().out
    assert "missing-blob" in out and blobs[0] in out
    assert "bad-hash" in out and blobs[1] in out
    assert "2 problem(s)" in out
    assert env.run("backup", "restore", info.id, "--all", "--data", str(env.data.parent / "new")) == 1
    assert "damaged" in capsys.readouterr().err
    assert not (env.data.parent / "new").exists()
    # The store itself was not touched by the damage.
    assert env.run("check") == 0


def test_truncated_snapshot_is_reported(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    info = backup.create_backup(env.config, env.backups)
    db = info.path / "meta.sqlite3"
    with db.open("r+b") as f:
        f.truncate(db.stat().st_size // 2)
    assert env.run("backup", "verify", info.id) == 1
    assert "database" in capsys.readouterr().out
    assert env.run("backup", "restore", info.id, "--account", USER) == 1
    assert "damaged" in capsys.readouterr().err
    (info.path / "manifest.json").write_text('{"format": 1, "blo')
    assert env.run("backup", "verify", info.id) == 1
    assert "manifest" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- prune


def _fake_snapshot(root: Path, when: datetime) -> str:
    sid = when.strftime("%Y%m%dT%H%M%SZ")
    d = root / sid
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps(
        {"format": 1, "id": sid, "created": when.isoformat(), "complete": True, "blobs": {}, "counts": {}}
    ))
    return sid


def test_prune_keeps_daily_weekly_monthly(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    root = env.backups
    start = datetime(2026, 6, 1, 3, 15, tzinfo=UTC)  # a Monday
    ids = [_fake_snapshot(root, start + timedelta(days=d)) for d in range(120)]
    # Two snapshots on the newest day: only the newer one counts for that day.
    extra = _fake_snapshot(root, start + timedelta(days=119, hours=5))
    assert env.run("backup", "prune", "--keep-daily", "7", "--keep-weekly", "4", "--keep-monthly", "3") == 0
    kept = snapshot_ids(env)
    newest = start + timedelta(days=119, hours=5)
    expected_daily = {extra} | {ids[119 - d] for d in range(1, 7)}
    assert expected_daily <= set(kept)
    assert ids[119] not in kept  # same day as `extra`, older
    # Weekly: newest of each of the last 4 ISO weeks; monthly: newest of each of the last 3 months.
    by_week: dict[tuple[int, int], str] = {}
    by_month: dict[tuple[int, int], str] = {}
    for sid in [*ids, extra]:
        when = datetime.strptime(sid, "%Y%m%dT%H%M%SZ")
        by_week.setdefault(tuple(when.isocalendar()[:2]), sid)  # type: ignore[arg-type]
        by_week[tuple(when.isocalendar()[:2])] = max(by_week[tuple(when.isocalendar()[:2])], sid)  # type: ignore[index]
        by_month[(when.year, when.month)] = max(by_month.get((when.year, when.month), sid), sid)
    weeks = sorted(by_week.values())[-4:]
    months = sorted(by_month.values())[-3:]
    assert set(kept) == expected_daily | set(weeks) | set(months)
    assert newest.strftime("%Y%m%dT%H%M%SZ") in kept
    out = capsys.readouterr().out
    assert f"{len(kept)} snapshot(s) kept" in out
    assert env.run("backup", "prune", "--keep-daily", "0", "--keep-weekly", "0", "--keep-monthly", "0") == 2


# ------------------------------------------------------------------------------------------ restore


def test_restore_one_account_into_folder(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    info = backup.create_backup(env.config, env.backups)
    before_other = mail_state(env.store_dir / "meta.sqlite3")["mailboxes"][f"{OTHER}:INBOX"]

    async def damage() -> None:
        s = env.store()
        await s.open()
        try:
            acct = await s.get_account(USER)
            assert acct is not None
            inbox = await s.get_mailbox(AccountId(acct.id), "INBOX")
            assert inbox is not None
            metas = await s.list_messages(AccountId(acct.id), MailboxId(inbox.id))
            await s.delete_messages(AccountId(acct.id), MailboxId(inbox.id), [m.uid for m in metas[:8]])
            await s.append(AccountId(acct.id), MailboxId(inbox.id), message(99, tag="after"))
        finally:
            await s.close()

    asyncio.run(damage())
    current_inbox = mail_state(env.store_dir / "meta.sqlite3")["mailboxes"][f"{USER}:INBOX"]
    assert env.run("backup", "restore", info.id, "--account", USER) == 0
    day = info.created.strftime("%Y-%m-%d") if info.created else ""
    state = mail_state(env.store_dir / "meta.sqlite3")
    restored = state["mailboxes"][f"{USER}:Restored {day}/INBOX"]["messages"]
    snap_state = mail_state(info.path / "meta.sqlite3")
    snap_inbox = snap_state["mailboxes"][f"{USER}:INBOX"]["messages"]
    # Same bytes, flags and INTERNALDATE, in the same order.
    assert [(m[1], m[2], m[4]) for m in restored] == [(m[1], m[2], m[4]) for m in snap_inbox]
    assert f"{USER}:Restored {day}/Archive/2025" in state["mailboxes"]
    assert len(state["mailboxes"][f"{USER}:Restored {day}/Sent"]["messages"]) == 4
    # Current mail and the other account untouched.
    assert state["mailboxes"][f"{USER}:INBOX"] == current_inbox
    assert state["mailboxes"][f"{OTHER}:INBOX"] == before_other
    # A second run adds nothing; --mailbox restores one folder into the named folder.
    assert env.run("backup", "restore", info.id, "--account", USER) == 0
    assert "already there" in capsys.readouterr().out
    again = mail_state(env.store_dir / "meta.sqlite3")["mailboxes"]
    assert len(again[f"{USER}:Restored {day}/INBOX"]["messages"]) == 12
    assert env.run("backup", "restore", info.id, "--account", USER, "--mailbox", "Sent", "--folder", "Sent back") == 0
    assert len(mail_state(env.store_dir / "meta.sqlite3")["mailboxes"][f"{USER}:Sent back"]["messages"]) == 4
    assert env.run("backup", "restore", info.id, "--account", USER, "--mailbox", "Nope") == 1
    assert "no folder" in capsys.readouterr().err
    assert env.run("check") == 0


def test_replace_puts_a_deleted_account_back_exactly(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    info = backup.create_backup(env.config, env.backups)
    before = mail_state(env.store_dir / "meta.sqlite3")

    async def delete() -> None:
        s = env.store()
        await s.open()
        try:
            acct = await s.get_account(USER)
            assert acct is not None
            await s.delete_account(AccountId(acct.id))
        finally:
            await s.close()

    asyncio.run(delete())
    assert env.run("backup", "restore", info.id, "--account", USER, "--replace") == 0
    after = mail_state(env.store_dir / "meta.sqlite3")
    assert after == before  # UIDVALIDITY, UIDs, modseqs, flags, dates and password hashes
    assert after["accounts"][USER] == HASH_USER
    assert env.run("check") == 0


def test_replace_keeps_uids_and_modseqs_growing(env: Env) -> None:
    """The account moved on after the snapshot (new mail, flag changes): --replace brings the
    snapshot's messages back but never lowers UIDNEXT/HIGHESTMODSEQ, and tells QRESYNC clients."""
    info = backup.create_backup(env.config, env.backups)

    async def change() -> tuple[int, int, int]:
        s = env.store()
        await s.open()
        try:
            acct = await s.get_account(USER)
            assert acct is not None
            aid = AccountId(acct.id)
            inbox = await s.get_mailbox(aid, "INBOX")
            assert inbox is not None
            new = await s.append(aid, MailboxId(inbox.id), message(500, tag="late"))
            await s.store_flags(aid, MailboxId(inbox.id), [Uid(1)], FlagOp.ADD, frozenset({"\\Flagged"}))
            mb = await s.get_mailbox(aid, "INBOX")
            assert mb is not None
            return int(new.uid), int(mb.uidnext), int(mb.highestmodseq)
        finally:
            await s.close()

    late_uid, uidnext, hms = asyncio.run(change())

    async def check() -> None:
        s = env.store()
        await s.open()
        try:
            acct = await s.get_account(USER)
            assert acct is not None
            aid = AccountId(acct.id)
            mb = await s.get_mailbox(aid, "INBOX")
            assert mb is not None
            assert mb.uidnext == uidnext and mb.highestmodseq > hms
            ch = await s.mailbox_changes(aid, MailboxId(mb.id), ModSeq(hms))
            assert late_uid in ch.expunged
            assert Uid(1) in [m.uid for m in ch.changed]  # its flag change was undone: clients must refetch
            metas = await s.list_messages(aid, MailboxId(mb.id))
            assert [m.uid for m in metas] == list(range(1, 13))
            assert "\\Flagged" not in metas[0].flags
        finally:
            await s.close()

    assert env.run("backup", "restore", info.id, "--account", USER, "--replace") == 0
    asyncio.run(check())
    assert env.run("check") == 0


def test_replace_refuses_while_store_is_open(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    info = backup.create_backup(env.config, env.backups)

    async def attempt() -> int:
        s = env.store()
        await s.open()
        try:
            return await asyncio.to_thread(env.run, "backup", "restore", info.id, "--account", USER, "--replace")
        finally:
            await s.close()

    assert asyncio.run(attempt()) == 1
    assert "stop the server" in capsys.readouterr().err


def test_restore_all_rebuilds_data_dir(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    info = backup.create_backup(env.config, env.backups)
    before = mail_state(env.store_dir / "meta.sqlite3")
    new = env.data.parent / "rebuilt"
    assert env.run("backup", "restore", info.id, "--all", "--data", str(new)) == 0
    assert (new / "postfach.toml").read_bytes() == (env.data / "postfach.toml").read_bytes()
    assert (new / "tls" / "key.pem").is_file()
    assert mail_state(new / "store" / "meta.sqlite3") == before
    assert main_check(new) == 0
    # The target must be new.
    assert env.run("backup", "restore", info.id, "--all", "--data", str(new)) == 2
    assert "not empty" in capsys.readouterr().err
    assert env.run("backup", "restore", info.id, "--all") == 2


def main_check(data: Path) -> int:
    from postfach.cli import main

    return main(["--data", str(data), "check"])


def test_full_restore_pop3_uidls_identical(env: Env) -> None:
    """A POP3 client that leaves mail on the server sees the same UIDLs after a full restore, so it
    downloads nothing twice."""
    poplib = pytest.importorskip("poplib")
    from tests.conftest import start_live_server, stop_live_server

    try:
        import postfach.pop3.connection  # noqa: F401
    except ImportError:
        pytest.skip("POP3 server not available yet")

    def uidls(data: Path) -> list[bytes]:
        from tests.conftest import FAST_AUTH, PASSWORD

        from postfach.auth import make_hasher

        async def set_pw() -> None:
            s = SqliteStore(data / "store")
            await s.open()
            try:
                acct = await s.get_account(USER)
                assert acct is not None
                await s.set_password(AccountId(acct.id), make_hasher(FAST_AUTH).hash(PASSWORD))
            finally:
                await s.close()

        asyncio.run(set_pw())
        live, thread = start_live_server(data)
        try:
            pop = poplib.POP3("127.0.0.1", live.port("pop3", "starttls"), timeout=30)
            try:
                pop.stls(live.client_context())
                pop.user(USER)
                pop.pass_(PASSWORD)
                return list(pop.uidl()[1])
            finally:
                pop.quit()
        finally:
            stop_live_server(live, thread)

    original = uidls(env.data)
    info = backup.create_backup(env.config, env.backups)
    new = env.data.parent / "rebuilt"
    backup.restore_all(info.path, new)
    assert len(original) == 12
    assert uidls(new) == original


# --------------------------------------------------------------------------------------- scheduler


@pytest.mark.asyncio
async def test_scheduler_runs_logs_retries_and_prunes(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    from dataclasses import replace

    from postfach.context import ServerContext

    store = env.store()
    await store.open()
    try:
        ctx = ServerContext(config=env.config, store=store, auth=None, tls_context=_no_tls)  # type: ignore[arg-type]
        sched = backup.BackupScheduler(ctx, retry_seconds=3600)
        await sched.start()
        try:
            assert await sched.run_once() is True
            assert sched.last_result is not None and sched.last_result.complete
        finally:
            await sched.stop()
        # A failing backup (the backup directory is a file) is logged loudly, leaves nothing complete.
        blocker = env.data / "blocked"
        blocker.write_text("not a folder")
        bad = replace(env.config, backup=replace(env.config.backup, directory=str(blocker / "x")))
        ctx2 = ServerContext(config=bad, store=store, auth=None, tls_context=_no_tls)  # type: ignore[arg-type]
        sched2 = backup.BackupScheduler(ctx2)
        assert await sched2.run_once() is False
        assert sched2.last_error
        assert any("BACKUP FAILED" in r.getMessage() for r in caplog.records)
    finally:
        await store.close()
    assert len(snapshot_ids(env)) == 1


def _no_tls() -> ssl.SSLContext:
    raise AssertionError("the scheduler needs no TLS")


def test_next_run_is_after_now() -> None:
    now = datetime(2026, 11, 27, 2, 0, tzinfo=UTC).astimezone()
    at = backup.next_run(now, now.strftime("%H:%M"))
    assert at > now and (at - now) <= timedelta(days=1)
    later = backup.next_run(now, (now + timedelta(hours=1)).strftime("%H:%M"))
    assert timedelta(minutes=59) <= later - now <= timedelta(hours=1)


def test_backup_to_another_filesystem_copies_once(env: Env, tmp_path: Path) -> None:
    """Across filesystems new blobs are copied (and hashed while copying); the next snapshot reuses
    them from the previous one by hard link, so it still costs only the new mail."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem (/dev/shm) here")
    root = shm / f"postfach-test-{os.getpid()}-{tmp_path.name}"
    try:
        first = backup.create_backup(env.config, root)
        m1 = json.loads((first.path / "manifest.json").read_text())
        assert m1["copied_blobs"] == m1["blob_count"] == 22
        second = backup.create_backup(env.config, root)
        m2 = json.loads((second.path / "manifest.json").read_text())
        assert m2["copied_blobs"] == 0 and m2["new_blobs"] == 0
        assert backup.verify(root, second.id) == []
        some = next(iter(backup.load_blobs(first.path, m1)))
        ino = (first.path / snapmod.blob_relpath(some)).stat().st_ino
        assert (second.path / snapmod.blob_relpath(some)).stat().st_ino == ino
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_disaster_recovery_with_only_the_backups(env: Env, tmp_path: Path) -> None:
    """The machine is gone, the backup directory survived: the snapshot's own config folder serves
    as the source data dir (see `backup restore --help`)."""
    from postfach.cli import main

    moved = tmp_path / "offsite"
    info = backup.create_backup(env.config, moved)
    before = mail_state(env.store_dir / "meta.sqlite3")
    shutil.rmtree(env.data)
    new = tmp_path / "new-machine"
    argv = ["--data", str(moved / info.id / "config"), "backup", "restore", info.id, "--all", "--data", str(new),
            "--to", str(moved)]
    assert main(argv) == 0
    assert mail_state(new / "store" / "meta.sqlite3") == before
    assert main(["--data", str(new), "check"]) == 0


def test_replace_from_a_snapshot_older_than_the_store_schema(tmp_path: Path) -> None:
    """The store was upgraded after the snapshot: --replace migrates a copy of the snapshot's
    metadata with the store's own migrations, then puts the account back."""
    from postfach import config as cfgmod
    from postfach.cli import main
    from postfach.store.sqlite import load_migrations

    from .conftest import populate

    data = tmp_path / "data"
    assert main(["--data", str(data), "init", "--dev"]) == 0
    config = cfgmod.load(data)
    sdir = config.path(config.store.path)
    shutil.rmtree(sdir)

    async def old_store() -> None:
        s = SqliteStore(sdir, migrations=load_migrations()[:1])
        await s.open()
        try:
            await populate(s, metadata=False)
        finally:
            await s.close()

    asyncio.run(old_store())
    info = backup.create_backup(config, config.path(config.backup.directory))
    before = mail_state(sdir / "meta.sqlite3")

    async def upgrade_and_delete() -> None:
        s = SqliteStore(sdir)
        await s.open()
        try:
            acct = await s.get_account(USER)
            assert acct is not None
            await s.delete_account(AccountId(acct.id))
        finally:
            await s.close()

    asyncio.run(upgrade_and_delete())
    assert main(["--data", str(data), "backup", "restore", info.id, "--account", USER, "--replace"]) == 0
    assert mail_state(sdir / "meta.sqlite3") == before
    assert main(["--data", str(data), "check"]) == 0


def test_damaged_blob_list_is_reported(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    info = backup.create_backup(env.config, env.backups)
    blob_list = info.path / backup.BLOB_LIST
    lines = blob_list.read_text().splitlines()
    blob_list.write_text("\n".join(lines[:-1]) + "\n")  # one entry lost
    assert env.run("backup", "verify", info.id) == 1
    assert "blobs.txt does not match" in capsys.readouterr().out
    assert env.run("backup", "restore", info.id, "--account", USER) == 1
    assert "blobs.txt" in capsys.readouterr().err


def test_backup_while_imap_clients_write(tmp_path: Path) -> None:
    """IMAP clients append, flag and expunge over real sockets while snapshots are taken: every
    client command succeeds, and each snapshot is consistent and verifies."""
    import imaplib
    import threading

    try:
        import postfach.imap.connection  # noqa: F401
    except ImportError:
        pytest.skip("IMAP server not available yet")
    from tests.conftest import PASSWORD, start_live_server, stop_live_server

    live, thread = start_live_server(tmp_path / "data")
    stop = threading.Event()
    errors: list[BaseException] = []
    done = [0]

    def client(n: int) -> None:
        try:
            imap = imaplib.IMAP4_SSL("127.0.0.1", live.port("imap", "implicit"), ssl_context=live.client_context(),
                                     timeout=30)
            imap.login(USER, PASSWORD)
            i = 0
            while not stop.is_set():
                i += 1
                typ, _ = imap.append("INBOX", "(\\Seen)", None, message(i, size=1500, tag=f"c{n}-"))
                assert typ == "OK"
                imap.select("INBOX")
                typ, data = imap.uid("SEARCH", "ALL")
                uids = (data[0] or b"").decode().split()
                if uids:
                    assert imap.uid("STORE", uids[-1], "+FLAGS", "(\\Flagged)")[0] == "OK"
                    if i % 3 == 0:
                        assert imap.uid("STORE", uids[0], "+FLAGS", "(\\Deleted)")[0] == "OK"
                        assert imap.expunge()[0] == "OK"
                done[0] += 1
            imap.logout()
        except BaseException as e:
            errors.append(e)

    workers = [threading.Thread(target=client, args=(n,)) for n in range(2)]
    try:
        for w in workers:
            w.start()
        root = tmp_path / "backups"
        infos = []
        for _ in range(3):
            infos.append(backup.create_backup(live.config, root))
        stop.set()
        for w in workers:
            w.join(60)
    finally:
        stop.set()
        stop_live_server(live, thread)
    assert not errors, errors
    assert done[0] > 0
    for info in infos:
        assert backup.verify(root, info.id) == []
        db = info.path / "meta.sqlite3"
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = conn.execute(
                "SELECT a.used_bytes, a.used_messages,"
                " (SELECT coalesce(sum(m.size),0) FROM message m JOIN mailbox b ON b.id=m.mailbox_id"
                "  WHERE b.account_id=a.id),"
                " (SELECT count(*) FROM message m JOIN mailbox b ON b.id=m.mailbox_id WHERE b.account_id=a.id)"
                " FROM account a"
            ).fetchall()
        finally:
            conn.close()
        for used_b, used_m, real_b, real_m in rows:
            assert (used_b, used_m) == (real_b, real_m)


def test_prune_compresses_older_metadata_and_it_still_restores(env: Env) -> None:
    first = backup.create_backup(env.config, env.backups, now=datetime.now(UTC) - timedelta(days=1))
    before = mail_state(first.path / "meta.sqlite3")
    raw_size = (first.path / "meta.sqlite3").stat().st_size
    second = backup.create_backup(env.config, env.backups)
    kept, removed = backup.prune(env.backups, 7, 0, 0)
    assert removed == [] and set(kept) == {first.id, second.id}
    assert not (first.path / "meta.sqlite3").exists()
    assert (first.path / snapmod.META_GZ).stat().st_size < raw_size
    assert (second.path / "meta.sqlite3").is_file()  # the newest stays as it is
    assert backup.verify(env.backups, first.id) == []
    new = env.data.parent / "from-compressed"
    backup.restore_all(first.path, new)
    assert mail_state(new / "store" / "meta.sqlite3") == before
    assert env.run("backup", "restore", first.id, "--account", USER, "--folder", "Old") == 0
    # A damaged compressed file is reported, not a traceback.
    gz = first.path / snapmod.META_GZ
    gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    found = backup.verify(env.backups, first.id)
    assert [f.kind for f in found] == ["database"]
    assert env.run("backup", "restore", first.id, "--account", USER, "--folder", "Old2") == 1


def test_disk_full_while_copying_metadata(env: Env, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    def full(meta: Path, dest: Path) -> None:
        dest.write_bytes(b"partial")
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(snapmod, "copy_database", full)
    assert env.run("backup", "create") == 1
    assert "disk full" in capsys.readouterr().err
    assert [p.name for p in env.backups.iterdir()] == [".lock"]
