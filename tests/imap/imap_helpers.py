"""Shared setup for IMAP tests: a ServerContext over a real store of the run's backend (tests/backends.py)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tests import backends

from postfach.auth import Authenticator
from postfach.config import AuthConfig, Config, LimitsConfig, ListenerConfig
from postfach.context import ConnectionInfo, ServerContext
from postfach.store.base import Store
from postfach.types import AccountId

USER = "user@example.org"
OTHER = "other@example.org"
PASSWORD = "secret-pass-1"
FAST_AUTH = AuthConfig(argon2_time_cost=1, argon2_memory_kib=8, argon2_parallelism=1)


@dataclass
class Env:
    ctx: ServerContext
    store: Store
    account_id: AccountId
    other_id: AccountId


def _no_tls() -> ssl.SSLContext:
    raise RuntimeError("no TLS in this environment")


async def make_env(tmp: Path, *, tls_context: Any = None, limits: dict[str, Any] | None = None,
                   auth: dict[str, Any] | None = None, **config: Any) -> Env:
    store = await backends.open_new_store(tmp / "store")
    auth_cfg = replace(FAST_AUTH, **(auth or {}))
    authn = Authenticator(store, auth_cfg)
    cfg = Config(
        hostname="localhost",
        listeners=(ListenerConfig("imap", 143, tls="starttls"),),
        auth=auth_cfg,
        limits=replace(LimitsConfig(), **(limits or {})),
        **config,
    )
    ctx = ServerContext(config=cfg, store=store, auth=authn, tls_context=tls_context or _no_tls)
    await store.add_domain("example.org")
    acct = await store.create_account(USER, await authn.hash_password(PASSWORD))
    other = await store.create_account(OTHER, await authn.hash_password(PASSWORD))
    return Env(ctx, store, acct.id, other.id)


def conninfo(tls: str = "starttls", remote: str = "127.0.0.1", tls_active: bool = False) -> ConnectionInfo:
    return ConnectionInfo(
        listener=ListenerConfig("imap", 143 if tls != "implicit" else 993, tls=tls),
        remote_ip=remote, remote_port=40000, local_ip="127.0.0.1", local_port=143,
        tls_active=tls_active, id="t1",
    )


def message(i: int, subject: str | None = None, body: str | None = None, extra: str = "") -> bytes:
    subject = subject if subject is not None else f"Test message {i}"
    body = body if body is not None else f"Hello, this is message number {i}.\r\n"
    return (
        f"From: Sender {i} <sender{i}@example.com>\r\n"
        f"To: {USER}\r\n"
        f"Subject: {subject}\r\n"
        f"Date: Mon, 0{1 + i % 9} Jan 2024 10:00:00 +0000\r\n"
        f"Message-ID: <msg{i}@example.com>\r\n"
        f"{extra}"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
        f"{body}"
    ).encode()
