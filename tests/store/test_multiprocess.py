"""The embedded store opened by several processes at once (``serve --workers N``, the CLI beside
the server): UIDs and modseqs without duplicates, quota exact, blob pins and the GC pause held
across processes, the maildrop lock dying with its process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from postfach.errors import MailboxInUse
from postfach.store.blobs import FileBlobStore, sha256_hex
from postfach.store.sqlite import SqliteStore
from postfach.types import AccountId

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.asyncio,
    pytest.mark.sqlite_only("several processes on one embedded store (meta.sqlite3, blob files, lock files);"
                            " PostgreSQL nodes: tests/multinode/"),
]

SRC = Path(__file__).resolve().parents[2] / "src"

_APPENDER = textwrap.dedent(
    """
    import asyncio, json, sys
    from postfach.errors import QuotaExceeded
    from postfach.store.sqlite import SqliteStore
    from postfach.types import AccountId, MailboxId

    async def main(path, aid, mid, who, n):
        store = SqliteStore(path)
        await store.open()
        async def one(i):
            data = f"Subject: {who} {i}\\r\\n\\r\\nbody {who} {i}\\r\\n".encode()
            try:
                r = await store.append(AccountId(aid), MailboxId(mid), data)
                return [r.uid, r.modseq]
            except QuotaExceeded:
                return None
        print("go", flush=True)
        sys.stdin.readline()
        out = await asyncio.gather(*(one(i) for i in range(n)))
        await store.close()
        print(json.dumps(out), flush=True)

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])))
    """
)


def _python(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


async def test_appends_from_two_processes_share_one_uid_sequence_and_an_exact_quota(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    await store.open()
    try:
        await store.add_domain("example.org")
        acct = await store.create_account("a@example.org", "x")
        await store.set_quota(acct.id, None, 50)
        inbox = await store.get_mailbox(acct.id, "INBOX")
        assert inbox is not None
        procs = [_python(_APPENDER, str(tmp_path), str(acct.id), str(inbox.id), who, "40") for who in ("p", "q")]
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "go"
        for p in procs:  # start both at once
            assert p.stdin is not None
            p.stdin.write("\n")
            p.stdin.flush()
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0
            results += [tuple(r) for r in json.loads(out.strip().splitlines()[-1]) if r is not None]
        assert len(results) == 50  # exactly the quota, though two processes raced for it
        uids = sorted(u for u, _ in results)
        assert uids == list(range(1, 51))
        assert len({m for _, m in results}) == 50
        metas = await store.list_messages(acct.id, inbox.id)
        assert [m.uid for m in metas] == uids
        assert (await store.recount_usage(acct.id))[1] == 50
        assert await store.check() == []
    finally:
        await store.close()


_PINNER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from postfach.store.blobs import FileBlobStore
    root = Path(sys.argv[1])
    b = FileBlobStore(root / "blobs")
    b.prepare(clean_tmp=False, pin_file=root / "pins")
    b.pin(sys.argv[2])
    print("pinned", flush=True)
    sys.stdin.readline()
    b.unpin(sys.argv[2])
    print("unpinned", flush=True)
    sys.stdin.readline()
    """
)


async def test_a_pin_in_another_process_keeps_the_blob_file(tmp_path: Path) -> None:
    data = b"Subject: shared\r\n\r\nsame bytes\r\n"
    blob_id = sha256_hex(data)
    blobs = FileBlobStore(tmp_path / "blobs")
    blobs.prepare(clean_tmp=False, pin_file=tmp_path / "pins")
    try:
        blobs.pin(blob_id)
        blobs.ensure(blob_id, data)
        blobs.unpin(blob_id)
        other = _python(_PINNER, str(tmp_path), blob_id)
        assert other.stdout is not None and other.stdin is not None
        assert other.stdout.readline().strip() == "pinned"
        assert blobs.remove_if_unpinned(blob_id) is False  # the other process is about to commit it
        assert blobs.path_for(blob_id).exists()
        # a pin of our own on a hash of the same slot survives our failed attempt
        other.stdin.write("\n")
        other.stdin.flush()
        assert other.stdout.readline().strip() == "unpinned"
        assert blobs.remove_if_unpinned(blob_id) is True
        assert not blobs.path_for(blob_id).exists()
        other.stdin.write("\n")
        other.stdin.flush()
        other.wait(30)
    finally:
        blobs.close()


_GC_PAUSER = textwrap.dedent(
    """
    import asyncio, sys
    from postfach.store.sqlite import SqliteStore

    async def main():
        store = SqliteStore(sys.argv[1], inline_max=0)  # blob files (small messages otherwise go inline)
        await store.open()
        with store.blob_gc_paused():
            print("paused", flush=True)
            await asyncio.to_thread(sys.stdin.readline)
        await store.close()

    asyncio.run(main())
    """
)


async def test_a_gc_pause_in_another_process_keeps_dead_blob_files(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path, inline_max=0)  # blob files (small messages otherwise go inline)
    await store.open()
    try:
        await store.add_domain("example.org")
        acct = await store.create_account("a@example.org", "x")
        inbox = await store.get_mailbox(acct.id, "INBOX")
        assert inbox is not None
        data = b"Subject: kept\r\n\r\nkept during a backup\r\n"
        r = await store.append(acct.id, inbox.id, data)
        path = store._blobs.path_for(sha256_hex(data))
        pauser = _python(_GC_PAUSER, str(tmp_path))
        assert pauser.stdout is not None and pauser.stdin is not None
        assert pauser.stdout.readline().strip() == "paused"
        await store.delete_messages(acct.id, inbox.id, [r.uid])
        assert path.exists()  # a backup elsewhere may still link it
        pauser.stdin.write("\n")
        pauser.stdin.flush()
        pauser.wait(30)
        # the next removal catches up with the deferred file
        r2 = await store.append(acct.id, inbox.id, b"Subject: other\r\n\r\nx\r\n")
        await store.delete_messages(acct.id, inbox.id, [r2.uid])
        assert not path.exists()
    finally:
        await store.close()


async def test_maildrop_lock_is_held_across_stores_and_released_on_exit(tmp_path: Path) -> None:
    a = SqliteStore(tmp_path)
    b = SqliteStore(tmp_path)  # a second store object: its own descriptors, as another process has
    await a.open()
    await b.open()
    try:
        aid = AccountId(7)
        async with a.lock_maildrop(aid):
            try:
                async with b.lock_maildrop(aid):
                    raise AssertionError("two holders of one maildrop")
            except MailboxInUse:
                pass
        async with b.lock_maildrop(aid):
            pass
    finally:
        await b.close()
        await a.close()
