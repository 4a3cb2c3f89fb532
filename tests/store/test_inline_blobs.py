"""Small messages stored in the database ``inline.sqlite3`` beside meta.sqlite3: no file, no
folder entry and no filesystem sync per delivery; their bytes are committed just before the
metadata. Bigger ones keep their file. Both kinds read the same, share by content, go away with
their last reference, survive an upgrade from file-only stores and a crash between the two
commits, and leave the store as files in a backup."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from pathlib import Path

import pytest
from tests.store.storehelpers import account_with_inbox, msg

from postfach.errors import NotFound, QuotaExceeded
from postfach.store import snapshot
from postfach.store.blobs import FileBlobStore
from postfach.store.sqlite import SqliteStore
from postfach.types import BlobId, Uid

pytestmark = [pytest.mark.timeout(60), pytest.mark.sqlite_only("the embedded store's inline.sqlite3")]


def blob_file(store_dir: Path, blob_id: str) -> Path:
    return store_dir / "blobs" / blob_id[:2] / blob_id[2:4] / blob_id


def inline_rows(store_dir: Path) -> dict[str, bytes]:
    with sqlite3.connect(store_dir / "inline.sqlite3") as db:
        return {r[0]: bytes(r[1]) for r in db.execute("SELECT id, data FROM blob_inline")}


@pytest.mark.asyncio
async def test_small_inline_big_in_a_file_both_read_the_same(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path, inline_max=8192)
    await store.open()
    try:
        aid, inbox = await account_with_inbox(store)
        small, big = msg(1, 4000), msg(2, 9000)
        r1 = await store.append(aid, inbox, small)
        r2 = await store.append(aid, inbox, big)
        m1, m2 = await store.get_messages(aid, inbox, [r1.uid, r2.uid])
        assert inline_rows(tmp_path) == {m1.blob_id: small}
        assert not blob_file(tmp_path, m1.blob_id).exists()
        assert blob_file(tmp_path, m2.blob_id).read_bytes() == big
        for meta, data in ((m1, small), (m2, big)):
            assert await store.read_blob(meta.blob_id) == data
            reader = await store.open_blob(meta.blob_id)
            assert reader.size == len(data)
            pieces = [await reader.read(off, 1000) for off in range(0, len(data), 1000)]
            assert b"".join(pieces) == data
            assert await reader.read(len(data) + 10, 5) == b""
            await reader.close()
        assert await store.check() == []
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_inline_bytes_are_shared_and_leave_with_the_last_reference(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    await store.open()
    try:
        a, a_inbox = await account_with_inbox(store, "a@example.com")
        b, b_inbox = await account_with_inbox(store, "b@example.com")
        data = msg(7, 3000)
        blob_id = hashlib.sha256(data).hexdigest()
        ra, rb = await asyncio.gather(store.append(a, a_inbox, data), store.append(b, b_inbox, data))
        other = await store.create_mailbox(a, "Other")
        await store.copy_messages(a, a_inbox, [ra.uid], other.id)
        assert list(inline_rows(tmp_path)) == [blob_id]  # one copy of the bytes for three messages
        with sqlite3.connect(tmp_path / "meta.sqlite3") as db:
            assert db.execute("SELECT refcount FROM blob WHERE id = ?", (blob_id,)).fetchone()[0] == 3
        await store.delete_messages(a, a_inbox, [ra.uid])
        await store.delete_messages(a, other.id, [Uid(1)])
        assert await store.read_blob(BlobId(blob_id)) == data  # b still has it
        await store.delete_messages(b, b_inbox, [rb.uid])
        assert inline_rows(tmp_path) == {}
        with pytest.raises(NotFound):
            await store.read_blob(BlobId(blob_id))
        assert await store.check() == []
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_inline_deliveries_commit_without_a_filesystem_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The point of inline blobs: a batch of small messages needs no syncfs before its commit (the
    bytes are committed to inline.sqlite3 first); one big message brings the barrier back."""
    calls: list[int] = []
    real = FileBlobStore.barrier

    def counting(self: FileBlobStore) -> None:
        calls.append(1)
        real(self)

    monkeypatch.setattr(FileBlobStore, "barrier", counting)
    store = SqliteStore(tmp_path)
    await store.open()
    try:
        aid, inbox = await account_with_inbox(store)
        await asyncio.gather(*(store.append(aid, inbox, msg(i, 2000)) for i in range(20)))
        await store.append_many(aid, inbox, [(msg(100 + i), frozenset(), None) for i in range(5)])
        assert calls == []
        await store.append(aid, inbox, msg(999, store.inline_max + 1000))
        assert len(calls) == 1
        assert len(inline_rows(tmp_path)) == 25
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_file_blobs_of_an_older_store_stay_readable_beside_inline_ones(tmp_path: Path) -> None:
    """A store that kept every message in a file (schema 5, or inline_max=0) goes on serving them;
    the same bytes delivered again are not stored twice as a file and share the blob row."""
    old = SqliteStore(tmp_path, inline_max=0)
    await old.open()
    try:
        aid, inbox = await account_with_inbox(old)
        data = msg(3, 2000)
        r_old = await old.append(aid, inbox, data)
    finally:
        await old.close()
    blob_id = hashlib.sha256(data).hexdigest()
    assert blob_file(tmp_path, blob_id).read_bytes() == data
    store = SqliteStore(tmp_path)
    await store.open()
    try:
        assert await store.read_blob(BlobId(blob_id)) == data
        r_new = await store.append(aid, inbox, data)
        assert await store.read_blob(BlobId(blob_id)) == data
        assert await store.check() == []
        await store.delete_messages(aid, inbox, [r_old.uid, r_new.uid])
        assert not blob_file(tmp_path, blob_id).exists()
        assert inline_rows(tmp_path) == {}
        assert await store.check() == []
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_a_backup_holds_inline_messages_as_files_and_restores_them(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store = SqliteStore(store_dir)
    await store.open()
    try:
        aid, inbox = await account_with_inbox(store)
        datas = [msg(i, 1500) for i in range(5)] + [msg(50, 80_000)]
        for d in datas:
            await store.append(aid, inbox, d)
        assert len(inline_rows(store_dir)) == 5
        snap = tmp_path / "snap1"
        result = await asyncio.to_thread(snapshot.create_snapshot, store_dir, snap)
        ids = {hashlib.sha256(d).hexdigest() for d in datas}
        assert set(result.blobs) == ids
        for blob_id in ids:
            assert (snap / snapshot.blob_relpath(blob_id)).read_bytes() in datas
        assert not (snap / "inline.sqlite3").exists()  # the files are the snapshot's copy
        with sqlite3.connect(snap / snapshot.META_NAME) as db:
            assert db.execute("SELECT count(*) FROM message").fetchone()[0] == len(datas)
        assert snapshot.verify_files(snap, result.blobs, None) == []
        # A second snapshot links the first one's files, inline or not.
        newer = msg(60, 1500)
        await store.append(aid, inbox, newer)
        snap2 = tmp_path / "snap2"
        result2 = await asyncio.to_thread(
            snapshot.create_snapshot, store_dir, snap2, previous=snap, previous_blobs=result.blobs
        )
        assert result2.new_blobs == 1 and set(result2.blobs) == ids | {hashlib.sha256(newer).hexdigest()}
    finally:
        await store.close()
    restored = tmp_path / "restored"
    await asyncio.to_thread(snapshot.restore_store_dir, snap2, restored, blobs=result2.blobs)
    back = SqliteStore(restored)
    await back.open()
    try:
        metas = await back.list_messages(aid, inbox)
        got = sorted([await back.read_blob(m.blob_id) for m in metas])
        assert got == sorted([*datas, newer])
        assert await back.check() == []
    finally:
        await back.close()


@pytest.mark.asyncio
async def test_inline_bytes_without_their_metadata_are_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write whose metadata fails after its bytes were committed (here: over quota; in a crash:
    the commit that never came) leaves no bytes behind: removed at once, or at the next open."""
    store = SqliteStore(tmp_path)
    await store.open()
    try:
        aid, inbox = await account_with_inbox(store)
        await store.set_quota(aid, 5000, None)
        await store.append(aid, inbox, msg(1, 3000))
        with pytest.raises(QuotaExceeded):
            await store.append(aid, inbox, msg(2, 3000))
        assert len(inline_rows(tmp_path)) == 1
        assert await store.check() == []
    finally:
        await store.close()
    # A crash between the two commits: bytes in inline.sqlite3, no row refers to them.
    stray = msg(3, 2000)
    stray_id = hashlib.sha256(stray).hexdigest()
    with sqlite3.connect(tmp_path / "inline.sqlite3") as db:
        db.execute("INSERT INTO blob_inline (id, data) VALUES (?, ?)", (stray_id, stray))
    again = SqliteStore(tmp_path)
    await again.open()
    try:
        problems = await again.check()
        assert [p.kind for p in problems] == ["orphan-blob"] and stray_id in problems[0].detail
    finally:
        await again.close()
    (tmp_path / "dirty").touch()  # as a crash leaves it
    third = SqliteStore(tmp_path)
    await third.open()
    try:
        assert stray_id not in inline_rows(tmp_path)
        assert await third.check() == []
    finally:
        await third.close()


def test_the_config_sets_the_inline_limit(tmp_path: Path) -> None:
    from postfach.config import Config, StoreConfig
    from postfach.store import open_store

    store = open_store(Config(data_dir=tmp_path, store=StoreConfig(inline_max_bytes=0)))
    assert isinstance(store, SqliteStore) and store.inline_max == 0
    assert isinstance(default := open_store(Config(data_dir=tmp_path)), SqliteStore) and default.inline_max == 65536
