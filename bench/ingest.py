"""Durable ingest throughput of the embedded store.

N concurrent writers (asyncio tasks) append distinct 4 KiB and 100 KiB messages to a SqliteStore in
a temporary folder; every append returns only after its blob and metadata are durable. Prints JSON:
``{"ingest_4k_msgs_per_s": ..., "ingest_100k_msgs_per_s": ..., "cpu_us_per_4k_msg": {"user", "sys"}, ...}``
— the CPU the process spent per message (all threads) varies far less with the load of a shared
machine than messages/s does; compare both, with the load average printed beside them.

    PYTHONPATH=src .venv/bin/python bench/ingest.py [--quick] [--writers 64] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from postfach.store.sqlite import SqliteStore
from postfach.types import AccountId, MailboxId


def make_message(n: int, size: int, salt: bytes) -> bytes:
    head = (
        f"From: bench@example.org\r\nTo: user@example.com\r\nSubject: bench {n}\r\n"
        f"Message-ID: <{n}.{salt.hex()}@example.org>\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head))]
    return head + body


async def run_size(
    store: SqliteStore, aid: AccountId, mailbox: MailboxId, size: int, writers: int, seconds: float, count: int
) -> tuple[float, float, float]:
    """(messages/s, user CPU µs per message, system CPU µs per message) of this process, all
    threads. CPU per message is far less sensitive to a busy machine than messages/s."""
    salt = os.urandom(8)
    # Pre-build distinct messages so the timing measures the store, not message building.
    msgs = [make_message(i, size, salt) for i in range(count)]
    next_i = 0
    done = 0
    deadline = 0.0

    async def writer() -> None:
        nonlocal next_i, done
        while time.perf_counter() < deadline and next_i < len(msgs):
            i = next_i
            next_i += 1
            await store.append(aid, mailbox, msgs[i])
            done += 1

    # warm-up (creates folders, reader threads ...)
    for i in range(min(20, count)):
        await store.append(aid, mailbox, make_message(10_000_000 + i, size, salt))
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(writer() for _ in range(writers)))
    elapsed = time.perf_counter() - start
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    n = max(1, done)
    return done / elapsed, (ru1.ru_utime - ru0.ru_utime) / n * 1e6, (ru1.ru_stime - ru0.ru_stime) / n * 1e6


def fs_baseline(folder: Path, size: int, seconds: float, threads: int = 8) -> float:
    """Bare filesystem ceiling under the same conditions: write + rename of distinct files of
    ``size`` bytes into ab/cd folders from ``threads`` threads, one syncfs-or-fsync per 64 files.
    No database, no hashing, no parsing."""
    from concurrent.futures import ThreadPoolExecutor

    from postfach.store.blobs import FileBlobStore, sha256_hex

    blobs = FileBlobStore(folder)
    blobs.prepare(clean_tmp=True)
    salt = os.urandom(8)
    n = 0
    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(threads) as ex:
            while time.perf_counter() - start < seconds:
                datas = [make_message(n + i, size, salt) for i in range(64)]
                list(ex.map(lambda d: blobs.ensure(sha256_hex(d), d), datas))
                blobs.barrier()
                n += 64
    finally:
        blobs.close()
    return n / (time.perf_counter() - start)


async def main_async(args: argparse.Namespace) -> dict[str, float | int | bool]:
    base = Path(args.dir) if args.dir else None
    with tempfile.TemporaryDirectory(prefix="postfach-bench-", dir=base) as tmp:
        store = SqliteStore(Path(tmp) / "store", group_commit_max=args.group_commit_max)
        await store.open()
        try:
            await store.add_domain("example.com")
            acct = await store.create_account("user@example.com", "x")
            inbox = await store.get_mailbox(acct.id, "INBOX")
            assert inbox is not None
            r4, u4, s4 = await run_size(store, acct.id, inbox.id, 4096, args.writers, args.seconds, args.count_4k)
            r100, u100, s100 = await run_size(
                store, acct.id, inbox.id, 100 * 1024, args.writers, args.seconds, args.count_100k
            )
            baseline_rate = (
                await asyncio.to_thread(fs_baseline, Path(tmp) / "baseline", 4096, args.seconds)
                if args.baseline
                else None
            )
            problems = await store.check() if args.check else []
            if problems:
                print(f"check found problems: {problems[:5]}", file=sys.stderr)
        finally:
            await store.close()
    return {
        "ingest_4k_msgs_per_s": round(r4, 1),
        "ingest_100k_msgs_per_s": round(r100, 1),
        "cpu_us_per_4k_msg": {"user": round(u4), "sys": round(s4)},
        "cpu_us_per_100k_msg": {"user": round(u100), "sys": round(s100)},
        "writers": args.writers,
        "batch_sync": store._blobs.batch_sync,
        "loadavg_1min": round(os.getloadavg()[0], 2),
    } | ({"fs_baseline_4k_files_per_s": round(baseline_rate, 1)} if baseline_rate is not None else {})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="short run (about 2 s per size)")
    p.add_argument("--writers", type=int, default=64, help="concurrent writers (default 64)")
    p.add_argument("--seconds", type=float, default=None, help="measuring time per size (default 5, quick 1.5)")
    p.add_argument("--group-commit-max", type=int, default=256)
    p.add_argument("--dir", default=None, help="parent folder for the temporary store")
    p.add_argument("--check", action="store_true", help="run store.check() afterwards")
    p.add_argument(
        "--baseline", action="store_true", help="also measure bare file write+rename+sync (no store) for context"
    )
    args = p.parse_args(argv)
    if args.seconds is None:
        args.seconds = 1.5 if args.quick else 5.0
    args.count_4k = 6000 if args.quick else 30000
    args.count_100k = 3000 if args.quick else 15000
    result = asyncio.run(main_async(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
