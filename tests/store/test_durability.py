"""Invariant 1 (durable before acknowledged) and robustness of the blob writes."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tests import backends
from tests.store.storehelpers import account_with_inbox, msg

from postfach.errors import StorageFull
from postfach.store import blobs
from postfach.store.base import DeliveryTarget, MessageMeta, QueueRecipient
from postfach.store.sqlite import SqliteStore
from postfach.types import AccountId, MailboxId

pytestmark = pytest.mark.timeout(120)

WORKER = Path(__file__).with_name("durability_worker.py")
SRC = Path(__file__).resolve().parents[2] / "src"


def test_sigkill_mid_stream_loses_nothing_acknowledged(tmp_path: Path) -> None:
    aid, inbox = asyncio.run(_setup(tmp_path))
    acked = _run_and_kill(tmp_path, aid, inbox)
    asyncio.run(_verify(tmp_path, aid, inbox, acked))


async def _setup(tmp_path: Path) -> tuple[AccountId, MailboxId]:
    store = backends.new_store(tmp_path)
    await store.open()
    try:
        return await account_with_inbox(store)
    finally:
        await store.close()


def _run_and_kill(tmp_path: Path, aid: AccountId, inbox: MailboxId) -> dict[int, str]:

    pg = [backends.pg_dsn(), backends.pg_schema_for(tmp_path)] if backends.is_postgres() else []
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(tmp_path), str(aid), str(inbox), *pg],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    acked: dict[int, str] = {}
    assert proc.stdout is not None
    try:
        while len(acked) < 300:
            line = proc.stdout.readline()
            if not line:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"worker ended early: {err}")
            uid, digest = line.decode().split()
            acked[int(uid)] = digest
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # lines printed after our last read were acknowledged too
    rest = proc.stdout.read().decode().split("\n")
    for ln in rest:
        if ln.strip():
            uid, digest = ln.split()
            acked[int(uid)] = digest
    return acked


async def _verify(tmp_path: Path, aid: AccountId, inbox: MailboxId, acked: dict[int, str]) -> None:
    store = backends.new_store(tmp_path)
    await store.open()
    try:
        metas: dict[int, MessageMeta] = {int(m.uid): m for m in await store.list_messages(aid, inbox)}
        for uid, digest in acked.items():
            assert uid in metas, f"acknowledged uid {uid} lost"
            data = await store.read_message(aid, inbox, metas[uid].uid)
            assert hashlib.sha256(data).hexdigest() == digest
        # everything present is whole: every row has its blob, counters match, no orphan files
        for m in metas.values():
            assert hashlib.sha256(await store.read_blob(m.blob_id)).hexdigest() == m.blob_id
        assert await store.check() == []
        if not backends.is_postgres():
            assert list((tmp_path / "blobs" / "tmp").iterdir()) == []
            assert list((tmp_path / "blobs").rglob(".*.tmp")) == []  # temp files of the killed writer went
        # and the store goes on: UIDs continue above everything ever assigned
        r = await store.append(aid, inbox, msg(1))
        assert r.uid > max(metas)
    finally:
        await store.close()


@pytest.mark.asyncio
@pytest.mark.sqlite_only("ENOSPC while writing the embedded store's blob files")
async def test_enospc_while_writing_blob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SqliteStore(tmp_path, inline_max=0)  # blob files (small messages otherwise go inline)
    await store.open()
    try:
        aid, inbox = await account_with_inbox(store)

        def full(fd: int, data: object) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(blobs, "_os_write", full)
        with pytest.raises(StorageFull):
            await store.append(aid, inbox, msg(1))
        with pytest.raises(StorageFull):
            await store.append_many(aid, inbox, [(msg(2), frozenset(), None), (msg(3), frozenset(), None)])
        with pytest.raises(StorageFull):
            await store.deliver(msg(4), [DeliveryTarget(aid)])
        assert list((tmp_path / "blobs").rglob("*.tmp")) == []
        assert await store.list_messages(aid, inbox) == []
        monkeypatch.setattr(blobs, "_os_write", os.write)
        r = await store.append(aid, inbox, msg(1))
        assert await store.read_message(aid, inbox, r.uid) == msg(1)
        assert await store.check() == []
    finally:
        await store.close()


@pytest.mark.asyncio
@pytest.mark.sqlite_only("EIO while writing the embedded store's blob files")
async def test_eio_is_temporary_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SqliteStore(tmp_path, inline_max=0)  # blob files (small messages otherwise go inline)
    await store.open()
    try:
        await account_with_inbox(store)

        def eio(fd: int, data: object) -> int:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(blobs, "_os_write", eio)
        with pytest.raises(StorageFull):
            await store.queue_add("s@example.com", [QueueRecipient("r@remote.example")], msg(1))
        assert await store.queue_list() == []
        assert list((tmp_path / "blobs" / "tmp").iterdir()) == []
    finally:
        await store.close()


@pytest.mark.asyncio
@pytest.mark.sqlite_only("orphaned blob files of the embedded store")
async def test_unclean_shutdown_orphans_removed_on_open(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path, inline_max=0)  # blob files (small messages otherwise go inline)
    await store.open()
    aid, inbox = await account_with_inbox(store)
    await store.append(aid, inbox, msg(1))
    await store.close()
    assert not (tmp_path / "dirty").exists()  # clean shutdown
    # simulate a crash after a blob rename but before its commit, and a leftover temp file
    orphan_id = hashlib.sha256(b"never committed").hexdigest()
    p = tmp_path / "blobs" / orphan_id[:2] / orphan_id[2:4] / orphan_id
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"never committed")
    (tmp_path / "blobs" / "tmp" / "x.tmp").write_bytes(b"half")
    half = p.parent / f".{orphan_id}.0123456789ab.tmp"
    half.write_bytes(b"half-written")
    (tmp_path / "dirty").touch()
    store = SqliteStore(tmp_path, inline_max=0)  # blob files (small messages otherwise go inline)
    await store.open()
    try:
        assert not p.exists() and not half.exists()
        assert list((tmp_path / "blobs" / "tmp").iterdir()) == []
        assert await store.check() == []
        assert len(await store.list_messages(aid, inbox)) == 1
    finally:
        await store.close()


@pytest.mark.asyncio
@pytest.mark.sqlite_only("two processes opening one meta.sqlite3")
async def test_second_opener_shares_the_store(tmp_path: Path) -> None:
    """A second opener (the CLI beside a running server) neither recovers nor cleans temp files."""
    a = SqliteStore(tmp_path)
    await a.open()
    aid, inbox = await account_with_inbox(a)
    inflight = tmp_path / "blobs" / "tmp" / "in-flight.tmp"
    inflight.write_bytes(b"being written by a")
    b = SqliteStore(tmp_path)
    await b.open()
    try:
        assert inflight.exists()
        r = await b.append(aid, inbox, msg(1))
        assert await a.read_message(aid, inbox, r.uid) == msg(1)
        await b.close()
        assert (tmp_path / "dirty").exists()  # a is still running
    finally:
        await b.close()
        inflight.unlink()
        await a.close()
    assert not (tmp_path / "dirty").exists()


@pytest.mark.asyncio
@pytest.mark.sqlite_only("the embedded store's syncfs barrier")
async def test_failed_barrier_refuses_and_cleans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SqliteStore(tmp_path, inline_max=0)  # blob files (small messages otherwise go inline)
    await store.open()
    try:
        aid, inbox = await account_with_inbox(store)

        def eio() -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(store._blobs, "barrier", eio)
        with pytest.raises(StorageFull):
            await store.append(aid, inbox, msg(1))
        assert await store.list_messages(aid, inbox) == []
        assert await store.check() == []  # the written file went with the refusal
        await store.add_domain("other.example")  # writes without blobs need no barrier
        monkeypatch.undo()
        r = await store.append(aid, inbox, msg(1))
        assert await store.read_message(aid, inbox, r.uid) == msg(1)
    finally:
        await store.close()
