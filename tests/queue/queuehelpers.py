"""Fixtures for the outbound queue: a loopback DNS server, aiosmtpd sinks as remote MX hosts on
127.0.0.x (all on one port: ``config.smtp.relay_port``), and a real SQLite store."""

from __future__ import annotations

import asyncio
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiosmtpd.controller import Controller

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import backends

from dnsserver import DnsTestServer, free_port
from postfach.auth import Authenticator
from postfach.config import AuthConfig, Config, QueueConfig, SmtpConfig
from postfach.context import ServerContext
from postfach.store.base import Account, Store

__all__ = [
    "ALICE",
    "DnsTestServer",
    "QueueEnv",
    "Sink",
    "dns_server",
    "env",
    "free_port",
    "make_queue_config",
    "open_env",
    "wait_for",
]

FAST_AUTH = AuthConfig(argon2_time_cost=1, argon2_memory_kib=8, argon2_parallelism=1)
LOCAL_DOMAIN = "postfach.test"
ALICE = f"alice@{LOCAL_DOMAIN}"


@dataclass
class Received:
    peer: tuple[str, int]
    local_ip: str
    mail_from: str
    mail_options: list[str]
    rcpts: list[str]
    data: bytes
    tls: bool


@dataclass
class SinkHandler:
    """Remote MX behaviour: ``rcpt_reply(addr)`` / ``data_reply()`` pick the answers."""

    local_ip: str
    received: list[Received] = field(default_factory=list)
    rcpt_reply: Callable[[str], str] = lambda addr: "250 2.1.5 OK"
    data_reply: Callable[[], str] = lambda: "250 2.0.0 queued"

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        reply = self.rcpt_reply(address)
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        reply = self.data_reply()
        if reply.startswith("2"):
            self.received.append(Received(
                peer=session.peer, local_ip=self.local_ip, mail_from=envelope.mail_from,
                mail_options=list(envelope.mail_options), rcpts=list(envelope.rcpt_tos),
                data=bytes(envelope.original_content or envelope.content), tls=session.ssl is not None,
            ))
        return reply


class Sink:
    def __init__(self, ip: str, port: int, tls_context: ssl.SSLContext | None = None,
                 smtputf8: bool = False, idle_timeout: float = 300) -> None:
        self.handler = SinkHandler(ip)
        kwargs: dict[str, Any] = {"enable_SMTPUTF8": smtputf8, "timeout": idle_timeout}
        if tls_context is not None:
            kwargs["tls_context"] = tls_context
        self.controller = Controller(self.handler, hostname=ip, port=port, decode_data=False,
                                     ready_timeout=10, server_hostname="sink.test", **kwargs)

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    def start(self) -> Sink:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()


@dataclass
class QueueEnv:
    config: Config
    dns: DnsTestServer
    store: Store
    ctx: ServerContext
    alice: Account
    tmp_path: Path
    sinks: list[Sink] = field(default_factory=list)

    def sink(self, ip: str, tls_context: ssl.SSLContext | None = None, smtputf8: bool = False,
             idle_timeout: float = 300) -> Sink:
        s = Sink(ip, self.config.smtp.relay_port, tls_context, smtputf8, idle_timeout).start()
        self.sinks.append(s)
        return s

    async def inbox(self, account: Account | None = None) -> list[bytes]:
        acc = account or self.alice
        mb = await self.store.get_mailbox(acc.id, "INBOX")
        assert mb is not None
        metas = await self.store.list_messages(acc.id, mb.id)
        return [await self.store.read_message(acc.id, mb.id, m.uid) for m in metas]


async def wait_for(cond: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    """Waits until ``cond()`` holds (not a timing assertion: a generous deadline for slow machines)."""
    deadline = time.monotonic() + timeout
    while True:
        if await cond():
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="session")
def dns_server() -> Iterator[DnsTestServer]:
    with DnsTestServer() as srv:
        yield srv


def make_queue_config(tmp_path: Path, dns: DnsTestServer, relay_port: int, **queue: Any) -> Config:
    q = {"retry_schedule_seconds": (1,), "max_age_seconds": 3600, "delay_warning_seconds": 0,
         "connect_timeout_seconds": 3, **queue}
    return Config(
        hostname="mail.postfach.test",
        data_dir=tmp_path,
        auth=FAST_AUTH,
        smtp=SmtpConfig(dns_nameservers=("127.0.0.1",), dns_port=dns.port, relay_port=relay_port),
        queue=QueueConfig(**q),
    )


async def open_env(tmp_path: Path, dns: DnsTestServer, config: Config) -> QueueEnv:
    store = await backends.open_new_store(tmp_path / "store")
    if await store.get_domain(LOCAL_DOMAIN) is None:
        await store.add_domain(LOCAL_DOMAIN)
    alice = await store.get_account(ALICE) or await store.create_account(ALICE, "$argon2id$unused")
    ctx = ServerContext(
        config=config, store=store, auth=Authenticator(store, FAST_AUTH),
        tls_context=lambda: ssl.create_default_context(ssl.Purpose.CLIENT_AUTH),
    )
    return QueueEnv(config, dns, store, ctx, alice, tmp_path)


@pytest_asyncio.fixture
async def env(tmp_path: Path, dns_server: DnsTestServer) -> AsyncIterator[QueueEnv]:
    config = make_queue_config(tmp_path, dns_server, free_port())
    e = await open_env(tmp_path, dns_server, config)
    try:
        yield e
    finally:
        for s in e.sinks:
            s.stop()
        await e.store.close()
