"""RFC 1939 §8 on PostgreSQL: the maildrop lock is a session-level advisory lock on the node's
control connection. When that connection is lost and re-established, the lock was not held
without a gap (another node may have opened the maildrop meanwhile): the POP3 session must not
delete anything at QUIT. A real PostgreSQL, its backend terminated by pg_terminate_backend."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pop3_helpers import PASSWORD, USER, conninfo, make_env, message

from postfach.pop3.responses import Err, Ok, serialise
from postfach.pop3.session import Session
from postfach.store.postgres import PostgresStore

pytestmark = [pytest.mark.timeout(60), pytest.mark.postgres_only("an advisory lock on the control connection")]


async def _lose_control_connection(store: PostgresStore) -> None:
    """Terminate the node's control connection on the server; return once it is back."""
    control = store._control
    assert control is not None
    pid = control.get_server_pid()
    rows = await store._fetch("SELECT pg_terminate_backend($1) AS ok", pid)
    assert rows[0]["ok"]
    for _ in range(200):
        if store._control is not None and store._control is not control and not store._control.is_closed():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the control connection did not come back")


@pytest.mark.asyncio
async def test_quit_deletes_nothing_after_the_lock_was_lost(tmp_path: Path) -> None:
    env = await make_env(tmp_path)
    store = env.store
    assert isinstance(store, PostgresStore)
    try:
        for i in range(3):
            await env.append(message(i))
        session = Session(env.ctx, conninfo("starttls"))
        for line in (f"USER {USER}", f"PASS {PASSWORD}", "DELE 1"):
            assert isinstance(await session.handle_line(line.encode()), Ok), line
        await _lose_control_connection(store)
        resp = await session.handle_line(b"QUIT")
        assert isinstance(resp, Err) and serialise(resp).startswith(b"-ERR [IN-USE]"), serialise(resp)
        assert session.want_close
        await session.close()
        assert len(await store.list_messages(env.account_id, env.inbox_id)) == 3  # nothing deleted
        # The lock is free again, and a session that keeps its lock deletes as usual.
        again = Session(env.ctx, conninfo("starttls"))
        for line in (f"USER {USER}", f"PASS {PASSWORD}", "DELE 1"):
            assert isinstance(await again.handle_line(line.encode()), Ok), line
        assert isinstance(await again.handle_line(b"QUIT"), Ok)
        await again.close()
        assert len(await store.list_messages(env.account_id, env.inbox_id)) == 2
        # Without a DELE, QUIT after a loss is a plain +OK (nothing to refuse).
        third = Session(env.ctx, conninfo("starttls"))
        for line in (f"USER {USER}", f"PASS {PASSWORD}"):
            assert isinstance(await third.handle_line(line.encode()), Ok), line
        await _lose_control_connection(store)
        assert isinstance(await third.handle_line(b"QUIT"), Ok)
        await third.close()
    finally:
        await store.close()
