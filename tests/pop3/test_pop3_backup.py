"""UIDL values survive a backup and a restore (both ``--replace`` and ``--all``): "leave a copy on
the server" clients must not download everything again after an operator restored a backup."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pop3_helpers import PASSWORD, USER, Env, make_env, message, open_store, serve

from postfach import backup
from postfach.auth import Authenticator
from postfach.context import ServerContext

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.sqlite_only("postfach backup snapshots the embedded store only (PostgreSQL: pg_dump)"),
]


async def uidl_listing(port: int) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    writer.write(b"USER %s\r\nPASS %s\r\nUIDL\r\nQUIT\r\n" % (USER.encode(), PASSWORD.encode()))
    await reader.readline()
    assert (await reader.readline()).startswith(b"+OK Logged in")
    assert (await reader.readline()).startswith(b"+OK")
    lines = []
    while (line := await reader.readline()) != b".\r\n":
        lines.append(line)
    await reader.readline()
    writer.close()
    return lines


async def listing_from(env: Env, store_path: Path) -> list[bytes]:
    store = await open_store(store_path)
    try:
        env.ctx = ServerContext(
            config=env.ctx.config,
            store=store,
            auth=Authenticator(store, env.ctx.config.auth),
            tls_context=env.ctx.tls_context,
        )
        async with serve(env) as port:
            return await uidl_listing(port)
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_uidl_unchanged_by_backup_and_restore(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    env = await make_env(data)
    config = dataclasses.replace(env.ctx.config, data_dir=data)
    env.ctx.config = config
    for i in range(1, 5):
        await env.append(message(i))
    async with serve(env) as port:
        before = await uidl_listing(port)
    assert len(before) == 4
    root = tmp_path / "backups"
    root.mkdir()
    snap = await asyncio.to_thread(backup.create_backup, config, root)
    # After the backup one message goes (as if the user deleted it) and the account is restored.
    metas = await env.store.list_messages(env.account_id, env.inbox_id)
    await env.store.delete_messages(env.account_id, env.inbox_id, [metas[0].uid])
    await env.store.close()

    await asyncio.to_thread(backup.restore_replace, config, snap.path, USER)
    assert await listing_from(env, data / "store") == before

    new_data = tmp_path / "restored"
    new_store = await asyncio.to_thread(backup.restore_all, snap.path, new_data)
    assert await listing_from(env, new_store) == before
