"""Child process of test_durability: appends in a loop and prints every acknowledged message.

Usage: python durability_worker.py STORE_PATH ACCOUNT_ID MAILBOX_ID [DSN SCHEMA] (with a DSN: the
PostgreSQL store in that schema instead of the embedded one at STORE_PATH). Each line printed is
``<uid> <sha256>``, written only after ``append`` returned (i.e. after the durable commit).
The parent kills this process with SIGKILL while it runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from pathlib import Path

from postfach.store.base import Store
from postfach.store.postgres import PostgresStore
from postfach.store.sqlite import SqliteStore
from postfach.types import AccountId, MailboxId


async def main(path: Path, account_id: AccountId, mailbox_id: MailboxId, pg: list[str]) -> None:
    store: Store = PostgresStore(pg[0], schema=pg[1]) if pg else SqliteStore(path, group_commit_max=32)
    await store.open()
    out = sys.stdout

    async def writer(w: int) -> None:
        i = 0
        while True:
            data = f"Subject: {w}-{i}\r\nX-Pid: {os.getpid()}\r\n\r\n".encode() + os.urandom(3000).hex().encode()
            r = await store.append(account_id, mailbox_id, data)
            out.write(f"{r.uid} {hashlib.sha256(data).hexdigest()}\n")
            out.flush()
            i += 1

    await asyncio.gather(*(writer(w) for w in range(8)))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), AccountId(int(sys.argv[2])), MailboxId(int(sys.argv[3])), sys.argv[4:6]))
