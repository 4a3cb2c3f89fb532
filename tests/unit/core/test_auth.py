"""Passwords, throttling and lockout, against the real store."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_asyncio
from tests import backends
from tests.conftest import FAST_AUTH

from postfach.auth import Authenticator, AuthOutcome
from postfach.auth.sasl import Credentials
from postfach.store.base import Store

CFG = replace(
    FAST_AUTH,
    free_failures=2,
    failure_delay_seconds=0.05,
    max_failure_delay_seconds=0.2,
    lockout_failures=5,
    window_seconds=60,
    lockout_seconds=30,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Store, Authenticator, Clock]]:
    store = await backends.open_new_store(tmp_path / "store")
    clock = Clock()
    auth = Authenticator(store, CFG, clock=clock)
    await store.add_domain("example.org")
    await store.create_account("user@example.org", await auth.hash_password("right password"))
    try:
        yield store, auth, clock
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_hash_is_argon2id_and_verifies(env: tuple[Store, Authenticator, Clock]) -> None:
    store, auth, _ = env
    acct = await store.get_account("user@example.org")
    assert acct is not None and acct.password_hash.startswith("$argon2id$")
    ok = await auth.authenticate("User@Example.org", "right password", remote_ip="192.0.2.1", protocol="imap")
    assert ok.outcome is AuthOutcome.OK and ok.account is not None and ok.account.address == "user@example.org"
    bad = await auth.authenticate("user@example.org", "wrong", remote_ip="192.0.2.1", protocol="imap")
    assert bad.outcome is AuthOutcome.FAILED and bad.account is None
    nouser = await auth.authenticate("ghost@example.org", "x", remote_ip="192.0.2.1", protocol="imap")
    assert nouser.outcome is AuthOutcome.FAILED


@pytest.mark.asyncio
async def test_failures_slow_down_then_lock_out(env: tuple[Store, Authenticator, Clock]) -> None:
    _, auth, clock = env
    durations = []
    for _ in range(4):
        t0 = time.monotonic()
        r = await auth.authenticate("user@example.org", "wrong", remote_ip="198.51.100.7", protocol="pop3")
        durations.append(time.monotonic() - t0)
        assert r.outcome is AuthOutcome.FAILED
    # the first `free_failures` cost nothing extra, later ones wait a growing delay
    assert durations[2] >= 0.05 and durations[3] >= 0.1
    r = await auth.authenticate("user@example.org", "wrong", remote_ip="198.51.100.7", protocol="smtp")
    assert r.outcome is AuthOutcome.FAILED
    # locked now: even the right password is refused, from that IP and for that account
    r = await auth.authenticate("user@example.org", "right password", remote_ip="198.51.100.7", protocol="imap")
    assert r.outcome is AuthOutcome.LOCKED
    r = await auth.authenticate("user@example.org", "right password", remote_ip="203.0.113.9", protocol="imap")
    assert r.outcome is AuthOutcome.LOCKED
    clock.now += CFG.lockout_seconds + 1
    r = await auth.authenticate("user@example.org", "right password", remote_ip="198.51.100.7", protocol="imap")
    assert r.outcome is AuthOutcome.OK


@pytest.mark.asyncio
async def test_authzid_must_match(env: tuple[Store, Authenticator, Clock]) -> None:
    _, auth, _ = env
    same = Credentials("user@example.org", "right password", "user@example.org")
    assert (await auth.authenticate_credentials(same, remote_ip="192.0.2.2", protocol="imap")).ok
    other = Credentials("user@example.org", "right password", "admin@example.org")
    assert not (await auth.authenticate_credentials(other, remote_ip="192.0.2.2", protocol="imap")).ok


def test_cleartext_networks() -> None:
    auth = Authenticator.__new__(Authenticator)
    auth._networks = FAST_AUTH.networks()  # only the policy part is exercised here
    assert auth.cleartext_allowed("127.0.0.1")
    assert auth.cleartext_allowed("::1")
    assert auth.cleartext_allowed("::ffff:127.0.0.5")
    assert not auth.cleartext_allowed("192.0.2.1")
    assert not auth.cleartext_allowed("garbage")


@pytest.mark.asyncio
async def test_outcomes_relayed_between_workers_count_there_too(env: tuple[Store, Authenticator, Clock]) -> None:
    """``serve --workers N``: each worker's Authenticator sends its outcomes to the others
    (supervisor.py relays them); failures add up to one lockout, a success clears the account's
    count everywhere, and a malformed event changes nothing."""
    store, a, clock = env
    b = Authenticator(store, CFG, clock=clock)
    a.set_relay(b.apply_remote)
    b.set_relay(a.apply_remote)
    for i in range(2):  # two failures in each worker: four in all, one short of the lockout
        assert (await a.authenticate("user@example.org", f"w{i}", remote_ip="192.0.2.7", protocol="imap")).outcome \
            is AuthOutcome.FAILED
        assert (await b.authenticate("user@example.org", f"x{i}", remote_ip="192.0.2.8", protocol="pop3")).outcome \
            is AuthOutcome.FAILED
    # The right password through b clears the account's count in a too.
    ok = await b.authenticate("user@example.org", "right password", remote_ip="192.0.2.9", protocol="imap")
    assert ok.outcome is AuthOutcome.OK
    assert (await a.authenticate("user@example.org", "w9", remote_ip="192.0.2.10", protocol="imap")).outcome \
        is AuthOutcome.FAILED  # one failure since the success: far from locked
    for i in range(4):
        await (a if i % 2 else b).authenticate("user@example.org", f"y{i}", remote_ip=f"198.51.100.{i}",
                                               protocol="smtp")
    for auth in (a, b):  # five failures of the account over both workers: locked in each
        res = await auth.authenticate("user@example.org", "right password", remote_ip="203.0.113.1", protocol="imap")
        assert res.outcome is AuthOutcome.LOCKED
    a.apply_remote(("failed",))
    a.apply_remote(("what", "user@example.org"))
