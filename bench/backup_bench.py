"""Backup benchmark: full and incremental snapshot time and size, verify, single-account restore.

Builds a SqliteStore of N messages (about 4 KiB each, spread over 20 accounts) in a temporary
folder, takes a full snapshot, adds M new messages, takes an incremental snapshot, verifies it and
restores one account into a "Restored" folder. Sizes are disk usage with every inode counted once
(hard links are free). Prints one JSON object.

    PYTHONPATH=src .venv/bin/python bench/backup_bench.py [--quick] [--messages 100000] [--new 1000]

Target (issue 6): incremental backup after 1,000 new messages on a 100,000-message store < 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from postfach import backup
from postfach.config import Config
from postfach.store.sqlite import SqliteStore
from postfach.types import AccountId, MailboxId

ACCOUNTS = 20


def make_message(n: int, salt: str, size: int = 4096) -> bytes:
    head = (
        f"From: bench@example.net\r\nTo: user{n % ACCOUNTS}@example.org\r\nSubject: bench {n}\r\n"
        f"Message-ID: <{n}.{salt}@example.net>\r\nDate: Fri, 27 Nov 2026 03:00:00 +0000\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    return head + (line * (size // len(line) + 1))[: max(0, size - len(head))]


def disk_usage(root: Path) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


async def fill(store: SqliteStore, start: int, count: int, salt: str, ids: list[tuple[AccountId, MailboxId]]) -> None:
    batch = 250
    per_account: dict[int, list[tuple[bytes, frozenset[str], datetime | None]]] = {}
    now = datetime.now(UTC)

    async def flush(i: int) -> None:
        items = per_account.pop(i, [])
        if items:
            await store.append_many(ids[i][0], ids[i][1], items)

    pending: list[asyncio.Task[None]] = []
    for n in range(start, start + count):
        a = n % ACCOUNTS
        per_account.setdefault(a, []).append((make_message(n, salt), frozenset({"\\Seen"}) if n % 2 else frozenset(),
                                              now))
        if len(per_account[a]) >= batch:
            pending.append(asyncio.create_task(flush(a)))
            if len(pending) >= 8:
                await asyncio.gather(*pending)
                pending = []
    await asyncio.gather(*pending)
    await asyncio.gather(*(flush(a) for a in list(per_account)))


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="postfach-backup-bench-", dir=args.tmp) as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        config = Config(data_dir=data)
        sdir = config.path(config.store.path)
        root = config.path(config.backup.directory)
        store = SqliteStore(sdir)
        await store.open()
        salt = os.urandom(6).hex()
        try:
            await store.add_domain("example.org")
            ids: list[tuple[AccountId, MailboxId]] = []
            for i in range(ACCOUNTS):
                acct = await store.create_account(f"user{i}@example.org", "$argon2id$bench")
                inbox = await store.get_mailbox(AccountId(acct.id), "INBOX")
                assert inbox is not None
                ids.append((AccountId(acct.id), MailboxId(inbox.id)))
            t0 = time.perf_counter()
            await fill(store, 0, args.messages, salt, ids)
            fill_s = time.perf_counter() - t0
            store_bytes = disk_usage(sdir)

            t0 = time.perf_counter()
            # Dated yesterday, as a daily backup would be, so that retention keeps both snapshots.
            yesterday = datetime.now(UTC) - timedelta(days=1)
            full = await asyncio.to_thread(lambda: backup.create_backup(config, root, now=yesterday))
            full_s = time.perf_counter() - t0
            full_bytes = disk_usage(root)

            await fill(store, args.messages, args.new, salt, ids)
            t0 = time.perf_counter()
            incr = await asyncio.to_thread(backup.create_backup, config, root)
            incr_s = time.perf_counter() - t0
            incr_bytes = disk_usage(root) - full_bytes

            t0 = time.perf_counter()
            problems = await asyncio.to_thread(backup.verify, root, incr.id)
            verify_s = time.perf_counter() - t0

            t0 = time.perf_counter()
            summary = await backup.restore_account(store, incr.path, "user0@example.org")
            restore_s = time.perf_counter() - t0

            # Prune compresses the metadata of every snapshot but the newest.
            t0 = time.perf_counter()
            await asyncio.to_thread(backup.prune, root, 7, 4, 6)
            prune_s = time.perf_counter() - t0
            gz_bytes = (full.path / "meta.sqlite3.gz").stat().st_size if (full.path / "meta.sqlite3.gz").exists() else 0
        finally:
            await store.close()
        new_bytes = sum(len(make_message(n, salt)) for n in range(args.messages, args.messages + args.new))
        return {
            "messages": args.messages,
            "new_messages": args.new,
            "store_fill_s": round(fill_s, 2),
            "store_disk_bytes": store_bytes,
            "full_backup_s": round(full_s, 3),
            "backup_full_s": round(full_s, 3),
            "full_backup_disk_bytes": full_bytes,
            "full_backup_messages": full.messages,
            "incremental_backup_s": round(incr_s, 3),
            "backup_incremental_s": round(incr_s, 3),
            "incremental_backup_disk_bytes": incr_bytes,
            "incremental_new_mail_bytes": new_bytes,
            "incremental_metadata_bytes": (incr.path / "meta.sqlite3").stat().st_size,
            "verify_s": round(verify_s, 3),
            "verify_problems": len(problems),
            "restore_one_account_messages": summary.messages,
            "restore_one_account_s": round(restore_s, 3),
            "prune_compress_s": round(prune_s, 3),
            "older_snapshot_metadata_gz_bytes": gz_bytes,
            "incremental_target_met": incr_s < 5.0,
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="2,000 messages and 100 new ones")
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--new", type=int, default=1000)
    p.add_argument("--tmp", default=None, help="folder for the temporary store (default: the system's)")
    args = p.parse_args()
    if args.quick:
        args.messages, args.new = 2000, 100
    print(json.dumps(asyncio.run(main_async(args))))


if __name__ == "__main__":
    main()
