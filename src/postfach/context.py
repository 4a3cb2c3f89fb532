"""What a protocol connection gets from the server: config, store, auth, TLS, shutdown signal.

Each protocol package exposes ``async def handle(ctx: ServerContext, conn: ConnectionInfo,
reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None`` in its ``connection.py``;
``server.py`` calls it for every accepted connection (implicit TLS already wrapped by then).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from postfach.auth import Authenticator
from postfach.config import Config, ListenerConfig
from postfach.store.base import Store


@dataclass
class ConnectionInfo:
    listener: ListenerConfig
    remote_ip: str
    remote_port: int
    local_ip: str
    local_port: int
    tls_active: bool  # True from the start for implicit TLS; the protocol sets it after STARTTLS
    id: str = ""  # short connection id for logs


@dataclass
class ServerContext:
    config: Config
    store: Store
    auth: Authenticator
    tls_context: Callable[[], ssl.SSLContext]  # current server context (SIGHUP swaps certificates)
    shutdown: asyncio.Event = field(default_factory=asyncio.Event)
    # Connection counts per IP for [limits] max_connections_per_ip (kept by server.py).
    connections_per_ip: dict[str, int] = field(default_factory=dict)
    # Services later issues plug in (e.g. "delivery" for SMTP local delivery, "queue").
    services: dict[str, Any] = field(default_factory=dict)

    @property
    def hostname(self) -> str:
        return self.config.hostname
