"""LocalDelivery against the real store: alias chains, loops, +tag folders, catch-all precedence,
self-keeping aliases, remote targets, ownership of sender addresses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from tests.smtp.smtp_helpers import OTHER, USER, Env, make_env

from postfach.smtp.delivery import LocalDelivery, Resolution
from postfach.smtp.policy import owns


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = await make_env(tmp_path)
    s = e.store
    await s.add_alias("chain1@example.org", "chain2@example.org")
    await s.add_alias("chain2@example.org", USER)
    await s.add_alias("loop1@example.org", "loop2@example.org")
    await s.add_alias("loop2@example.org", "loop1@example.org")
    await s.add_alias(OTHER, OTHER)  # keep a copy ...
    await s.add_alias(OTHER, "archive@remote.example")  # ... and forward one
    await s.add_alias("known@example.com", USER)  # beats the catch-all of example.com
    try:
        yield e
    finally:
        await e.store.close()


def summary(res: Resolution | None) -> tuple[set[tuple[str, str, str]], set[str]] | None:
    if res is None:
        return None
    return {(r.account.address, r.mailbox, r.delivered_to) for r in res.local}, set(res.remote)


@pytest.mark.asyncio
async def test_resolution(env: Env) -> None:
    d = LocalDelivery(env.store, env.ctx.config)
    assert summary(await d.resolve(USER)) == ({(USER, "INBOX", USER)}, set())
    assert summary(await d.resolve("User@Example.ORG")) == ({(USER, "INBOX", USER)}, set())
    assert summary(await d.resolve("user+WORK@example.org")) == ({(USER, "work", "user+work@example.org")}, set())
    assert summary(await d.resolve("user+none@example.org")) == ({(USER, "INBOX", "user+none@example.org")}, set())
    assert summary(await d.resolve("chain1@example.org")) == ({(USER, "INBOX", USER)}, set())
    assert summary(await d.resolve("sales+x@example.org")) == ({(USER, "INBOX", USER)}, set())
    assert summary(await d.resolve(OTHER)) == ({(OTHER, "INBOX", OTHER)}, {"archive@remote.example"})
    assert summary(await d.resolve("known@example.com")) == ({(USER, "INBOX", USER)}, set())
    assert summary(await d.resolve("whoever@example.com")) == (
        {(OTHER, "INBOX", OTHER)}, {"archive@remote.example"}
    )
    team = summary(await d.resolve("team@example.org"))
    assert team is not None
    assert {a for a, _, _ in team[0]} == {USER, OTHER}
    assert team[1] == {"friend@remote.example", "archive@remote.example"}
    assert await d.resolve("nobody@example.org") is None
    assert await d.resolve("loop1@example.org") is None  # a loop leads nowhere: unknown (550)
    assert await d.is_local_address("x@example.com")
    assert not await d.is_local_address("x@remote.example")


@pytest.mark.asyncio
async def test_sender_ownership(env: Env) -> None:
    d = LocalDelivery(env.store, env.ctx.config)
    user = await env.store.get_account(USER)
    other = await env.store.get_account(OTHER)
    assert user is not None and other is not None
    assert await owns(d, user, USER)
    assert await owns(d, user, "USER+tag@example.org")
    assert await owns(d, user, "sales@example.org")
    assert await owns(d, user, "team@example.org")
    assert await owns(d, user, "known@example.com")
    assert not await owns(d, user, OTHER)
    assert not await owns(d, user, "whoever@example.com")  # the catch-all belongs to other
    assert await owns(d, other, "whoever@example.com")
    assert not await owns(d, other, "known@example.com")  # claimed by an explicit alias
    assert not await owns(d, user, "user@remote.example")


@pytest.mark.asyncio
async def test_idn_domain_in_u_labels(env: Env) -> None:
    await env.store.add_domain("xn--bcher-kva.example")
    acct = await env.store.create_account("leser@xn--bcher-kva.example", "x")
    d = LocalDelivery(env.store, env.ctx.config)
    res = await d.resolve("Leser@Bücher.example")
    assert res is not None and res.local[0].account.id == acct.id
    assert await d.is_local_address("x@bücher.example")
