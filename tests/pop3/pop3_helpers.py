"""Shared test helpers for the POP3 tests: a real SQLite store, an Authenticator, TLS, a server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from tests import backends

from postfach.auth import Authenticator
from postfach.config import AuthConfig, Config, ListenerConfig
from postfach.context import ConnectionInfo, ServerContext
from postfach.pop3.connection import handle
from postfach.store.base import Store
from postfach.types import AccountId, MailboxId

USER = "user@example.org"
PASSWORD = "secret-pass"
FAST_AUTH = AuthConfig(
    argon2_time_cost=1, argon2_memory_kib=8, argon2_parallelism=1, failure_delay_seconds=0.0
)


def message(i: int, body_lines: int = 3) -> bytes:
    """A small standard test message; message(i) differs for each i."""
    body = b"".join(b"line %d of message %d\r\n" % (n, i) for n in range(1, body_lines + 1))
    return (
        b"From: sender@example.net\r\n"
        b"To: user@example.org\r\n"
        b"Subject: message %d\r\n"
        b"Message-ID: <m%d@example.net>\r\n"
        b"\r\n"
        b".dotted first line\r\n" % (i, i)
    ) + body


def with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """``{"pop3.dele_mode": "hide"}`` → a Config with that field replaced."""
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
    # fetchmail insists on a subject CN besides the subjectAltNames.
    cert = ca.issue_cert("mail.example.org", "localhost", "127.0.0.1", common_name="mail.example.org")
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
    account_id: AccountId
    inbox_id: MailboxId
    server_tls: ssl.SSLContext
    client_tls: ssl.SSLContext
    ca: trustme.CA
    extra: dict[str, Any] = field(default_factory=dict)

    async def append(self, data: bytes, flags: frozenset[str] = frozenset()) -> int:
        res = await self.store.append(self.account_id, self.inbox_id, data, flags)
        return int(res.uid)


async def make_env(tmp_path: Path, overrides: dict[str, Any] | None = None) -> Env:
    store = await open_store(tmp_path / "store")
    auth_cfg = FAST_AUTH
    config = Config(hostname="mail.example.org", auth=auth_cfg)
    config = with_overrides(config, overrides or {})
    auth = Authenticator(store, config.auth)
    await store.add_domain("example.org")
    account = await store.create_account(USER, await auth.hash_password(PASSWORD))
    inbox = await store.get_mailbox(account.id, "INBOX")
    assert inbox is not None
    server_tls, client_tls, ca = make_tls()
    ctx = ServerContext(config=config, store=store, auth=auth, tls_context=lambda: server_tls)
    return Env(store, ctx, account.id, inbox.id, server_tls, client_tls, ca)


def conninfo(tls: str, remote_ip: str = "127.0.0.1", *, tls_active: bool = False) -> ConnectionInfo:
    return ConnectionInfo(
        listener=ListenerConfig("pop3", 110 if tls != "implicit" else 995, tls=tls),
        remote_ip=remote_ip,
        remote_port=40000,
        local_ip="127.0.0.1",
        local_port=110,
        tls_active=tls_active,
    )


@contextlib.asynccontextmanager
async def serve(
    env: Env, *, implicit_tls: bool = False, remote_ip: Callable[[str], str] | None = None
) -> AsyncIterator[int]:
    """A POP3 listener on a free loopback port; yields the port."""
    tasks: set[asyncio.Task[None]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        ip = peer[0] if remote_ip is None else remote_ip(peer[0])
        conn = conninfo("implicit" if implicit_tls else "starttls", ip, tls_active=implicit_tls)
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handle(env.ctx, conn, reader, writer)
        finally:
            tasks.discard(task)

    server = await asyncio.start_server(
        on_connect, "127.0.0.1", 0, ssl=env.server_tls if implicit_tls else None
    )
    port = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
