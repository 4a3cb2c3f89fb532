"""Shared helpers for the SMTP tests: a real SQLite store with a few accounts and aliases, an
Authenticator, trustme TLS, and an SMTP listener on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from tests import backends

from postfach.auth import Authenticator
from postfach.config import AuthConfig, Config, ListenerConfig
from postfach.context import ConnectionInfo, ServerContext
from postfach.smtp.connection import handle
from postfach.store.base import Store
from postfach.types import AccountId

USER = "user@example.org"
OTHER = "other@example.org"
PASSWORD = "secret-pass"
FAST_AUTH = AuthConfig(
    argon2_time_cost=1, argon2_memory_kib=8, argon2_parallelism=1, failure_delay_seconds=0.0
)


def with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """``{"smtp.over_quota_reply": "552"}`` → a Config with that field replaced."""
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if not name:
            config = dataclasses.replace(config, **{section: value})
            continue
        sub = getattr(config, section)
        config = dataclasses.replace(config, **{section: dataclasses.replace(sub, **{name: value})})
    return config


def make_tls() -> tuple[ssl.SSLContext, ssl.SSLContext, trustme.CA]:
    ca = trustme.CA()
    cert = ca.issue_cert("mail.example.org", "localhost", "127.0.0.1")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client, ca


async def open_store(path: Path) -> Store:
    """A real store of the run's backend (tests/backends.py) in ``path``."""
    return await backends.open_new_store(path)


@dataclass
class Env:
    store: Store
    ctx: ServerContext
    user_id: AccountId
    other_id: AccountId
    server_tls: ssl.SSLContext
    client_tls: ssl.SSLContext
    ca: trustme.CA
    extra: dict[str, Any] = field(default_factory=dict)

    async def messages(self, address: str, mailbox: str = "INBOX") -> list[bytes]:
        account = await self.store.get_account(address)
        assert account is not None
        mbox = await self.store.get_mailbox(account.id, mailbox)
        assert mbox is not None
        metas = await self.store.list_messages(account.id, mbox.id)
        return [await self.store.read_message(account.id, mbox.id, m.uid) for m in metas]


async def make_env(tmp_path: Path, overrides: dict[str, Any] | None = None) -> Env:
    """Domains example.org (accounts user, other; folder "work" for user; aliases sales → user,
    team → user + other + friend@remote.example, self-keeping alias for other) and example.com
    (catch-all → other)."""
    store = await open_store(tmp_path / "store")
    config = Config(hostname="mail.example.org", auth=FAST_AUTH)
    config = with_overrides(config, overrides or {})
    auth = Authenticator(store, config.auth)
    await store.add_domain("example.org")
    await store.add_domain("example.com")
    hashed = await auth.hash_password(PASSWORD)
    user = await store.create_account(USER, hashed)
    other = await store.create_account(OTHER, hashed)
    await store.create_mailbox(user.id, "work")
    await store.add_alias("sales@example.org", USER)
    await store.add_alias("team@example.org", USER)
    await store.add_alias("team@example.org", OTHER)
    await store.add_alias("team@example.org", "friend@remote.example")
    await store.add_alias("@example.com", OTHER)
    server_tls, client_tls, ca = make_tls()
    ctx = ServerContext(config=config, store=store, auth=auth, tls_context=lambda: server_tls)
    return Env(store, ctx, user.id, other.id, server_tls, client_tls, ca)


def conninfo(protocol: str, tls: str, remote_ip: str = "127.0.0.1", *, tls_active: bool = False) -> ConnectionInfo:
    return ConnectionInfo(
        listener=ListenerConfig(protocol, 25 if protocol == "mx" else 587, tls=tls),
        remote_ip=remote_ip,
        remote_port=40000,
        local_ip="127.0.0.1",
        local_port=587,
        tls_active=tls_active,
    )


@contextlib.asynccontextmanager
async def serve(
    env: Env, protocol: str = "submission", tls: str = "starttls", remote_ip: str | None = None
) -> AsyncIterator[int]:
    """An SMTP listener on a free loopback port; yields the port."""
    tasks: set[asyncio.Task[Any]] = set()
    implicit = tls == "implicit"

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        conn = conninfo(protocol, tls, remote_ip or peer[0], tls_active=implicit)
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handle(env.ctx, conn, reader, writer)
        finally:
            tasks.discard(task)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=env.server_tls if implicit else None)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def message(i: int = 1, *, sender: str = USER, to: str = OTHER, extra: bytes = b"") -> bytes:
    return (
        f"From: Sender <{sender}>\r\nTo: <{to}>\r\nSubject: test {i}\r\n".encode()
        + extra
        + b"\r\nHello number %d.\r\n.a dotted line\r\n" % i
    )
