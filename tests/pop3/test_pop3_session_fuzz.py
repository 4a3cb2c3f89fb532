"""Hypothesis: any sequence of lines (random bytes mixed with real commands, including a valid
login) gives every line a well-formed answer; no exception escapes the session, and the maildrop
lock is free once the session is closed."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pop3_helpers import PASSWORD, USER, Env, conninfo, make_env, message

from postfach.pop3.responses import Continue, Err, MessageBody, MultiLine, Ok, serialise
from postfach.pop3.session import Session

VERBS = ["USER", "PASS", "APOP", "AUTH", "CAPA", "STLS", "STAT", "LIST", "UIDL", "RETR", "DELE",
         "TOP", "NOOP", "RSET", "QUIT", "auth plain", "AUTH LOGIN", "TOP 1"]

line_strategy = st.one_of(
    st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"")),
    st.tuples(st.sampled_from(VERBS), st.text(max_size=12)).map(
        lambda t: f"{t[0]} {t[1]}".encode("utf-8", "surrogatepass").replace(b"\n", b"")
    ),
    st.tuples(st.sampled_from(["RETR", "TOP", "DELE", "LIST", "UIDL"]), st.integers(-2, 6),
              st.integers(-1, 3)).map(lambda t: f"{t[0]} {t[1]} {t[2]}".encode()),
    st.just(f"USER {USER}".encode()),
    st.just(f"PASS {PASSWORD}".encode()),
    st.just(b"*"),
    st.just(b"AHVzZXJAZXhhbXBsZS5vcmcAc2VjcmV0LXBhc3M="),
)


@pytest.fixture(scope="module")
def loop_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[asyncio.AbstractEventLoop, Env]]:
    loop = asyncio.new_event_loop()
    env = loop.run_until_complete(make_env(tmp_path_factory.mktemp("fuzz")))
    try:
        yield loop, env
    finally:
        loop.run_until_complete(env.store.close())
        loop.close()


async def play(env: Env, lines: list[bytes]) -> None:
    if len(await env.store.list_messages(env.account_id, env.inbox_id)) < 3:
        for i in range(3):
            await env.append(message(i))
    session = Session(env.ctx, conninfo("starttls"))
    try:
        for line in [f"USER {USER}".encode(), f"PASS {PASSWORD}".encode(), *lines] if lines[:1] == [
            b"login"
        ] else lines:
            if session.want_close:
                break
            resp = await session.handle_line(line)
            if isinstance(resp, MessageBody):
                data = await resp.blob.read(0, resp.blob.size)
                await resp.blob.close()
                assert data
                session.message_sent(resp)
            else:
                assert isinstance(resp, Ok | Err | MultiLine | Continue)
                out = serialise(resp)
                assert out.endswith(b"\r\n") and out[:1] in (b"+", b"-")
    finally:
        await session.close()
    # The lock is free again.
    async with env.store.lock_maildrop(env.account_id):
        pass


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(line_strategy, max_size=12), st.booleans())
def test_session_survives_anything(
    loop_env: tuple[asyncio.AbstractEventLoop, Env], lines: list[bytes], login_first: bool
) -> None:
    loop, env = loop_env
    if login_first:
        lines = [b"login", *lines]
    loop.run_until_complete(asyncio.wait_for(play(env, lines), 60))
