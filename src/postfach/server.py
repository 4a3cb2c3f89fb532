"""The server's lifecycle: listeners from config, TLS, signals, graceful shutdown, background jobs.

Every listener is (protocol, address, port, TLS mode); any port can speak any protocol in any mode.
Implicit TLS is done by ``start_tls`` on the accepted connection with the *current* context, so a
SIGHUP certificate reload reaches new connections on every listener.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import importlib
import itertools
import logging
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

from postfach import log as plog
from postfach.auth import Authenticator
from postfach.backup import BackupScheduler
from postfach.config import Config, ListenerConfig
from postfach.context import ConnectionInfo, ServerContext
from postfach.dkim import DkimSigner
from postfach.dns import make_resolver
from postfach.net import proxy
from postfach.net.proxy_listener import ProxyListener, bind, plain_ip
from postfach.net.tls import TlsManager
from postfach.queue.scheduler import QueueRunner
from postfach.quota import QuotaWarner
from postfach.smtp import srs
from postfach.smtp.inbound_checks import InboundChecker
from postfach.store import open_store
from postfach.store.history import ExpungeHistoryTrimmer

log = logging.getLogger("postfach.server")
access = logging.getLogger("postfach.access")

Handler = Callable[[ServerContext, ConnectionInfo, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

_HANDLER_MODULES = {
    "imap": "postfach.imap.connection",
    "pop3": "postfach.pop3.connection",
    "submission": "postfach.smtp.connection",
    "mx": "postfach.smtp.connection",
}

#: What a protocol says when it must refuse a connection before its session starts.
_BUSY = {
    "imap": b"* BYE [UNAVAILABLE] Too many connections from your address\r\n",
    "pop3": b"-ERR [SYS/TEMP] Too many connections from your address\r\n",
    "submission": b"421 4.7.0 Too many connections from your address\r\n",
    "mx": b"421 4.7.0 Too many connections from your address\r\n",
}

_ids = itertools.count(1)

# The stdlib TLS transport gives every connection a 256 KiB receive buffer (asyncio.sslproto
# SSLProtocol.max_size): most of an idle connection's memory (issue 3: < 50 KiB per idle IMAP IDLE
# connection). The BIO reassembles records, so 4 KiB reads only cost a few more calls on bulk
# uploads. Process-wide, for every protocol.
_TLS_READ_BUFFER = 4 * 1024
if getattr(asyncio.sslproto.SSLProtocol, "max_size", 0) > _TLS_READ_BUFFER:
    asyncio.sslproto.SSLProtocol.max_size = _TLS_READ_BUFFER


def load_handler(protocol: str) -> Handler:
    module = importlib.import_module(_HANDLER_MODULES[protocol])
    handler: Handler = module.handle
    return handler


@dataclass
class BoundListener:
    config: ListenerConfig
    server: asyncio.AbstractServer
    port: int


class Server:
    def __init__(
        self,
        config: Config,
        *,
        handlers: dict[str, Handler] | None = None,
        worker: int | None = None,
        link: Any = None,
    ) -> None:
        self.config = config
        self._handlers = handlers
        # ``serve --workers N``: this process's index, and its link to the supervisor, which
        # accepts every connection and hands it over (postfach.supervisor.WorkerLink).
        self.worker = worker
        self._link = link
        self.listeners: list[BoundListener] = []
        self._connections: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self.ctx: ServerContext | None = None
        self.ready = asyncio.Event()
        self._background: list[Any] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- control ----------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Thread-safe: begin a graceful shutdown."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    def port_of(self, protocol: str, tls: str) -> int:
        for b in self.listeners:
            if b.config.protocol == protocol and b.config.tls == tls:
                return b.port
        raise KeyError((protocol, tls))

    # --- running ----------------------------------------------------------------------------------
    async def run(self, *, install_signals: bool = True, drain_seconds: float = 10.0) -> None:
        self._loop = asyncio.get_running_loop()
        cfg = self.config
        store = open_store(cfg)
        await store.open()
        try:
            tls = TlsManager(cfg)
            ctx = ServerContext(
                config=cfg,
                store=store,
                auth=Authenticator(store, cfg.auth),
                tls_context=tls.context,
            )
            self.ctx = ctx
            handlers = self._handlers or {p: load_handler(p) for p in {lst.protocol for lst in cfg.listeners}}
            await self._start_services(ctx)
            for lst in cfg.listeners:
                await self._listen(ctx, lst, handlers[lst.protocol])
            if install_signals:
                self._install_signals(tls)
            self.ready.set()
            await self._stop.wait()
            if self._link is not None:
                self._link.stop_accepting()
            log.info("shutting down: finishing in-flight commands")
            ctx.shutdown.set()
            for b in self.listeners:
                b.server.close()
            if self._connections:
                _done, pending = await asyncio.wait(set(self._connections), timeout=drain_seconds)
                for t in pending:
                    t.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=2)
            await self._stop_services()
        finally:
            await store.close()
            log.info("stopped")

    def _install_signals(self, tls: TlsManager) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, self._stop.set)
            loop.add_signal_handler(signal.SIGINT, self._stop.set)
            loop.add_signal_handler(signal.SIGHUP, tls.reload)

    async def _start_services(self, ctx: ServerContext) -> None:
        """DKIM signing and inbound checks for SMTP; quota warnings, the outbound queue, the
        expunge-history trimming and the daily backup as background services (stopped in reverse order)."""
        ctx.services["dkim_signer"] = DkimSigner(ctx.config)
        ctx.services["srs"] = srs.load(ctx.config)
        # Answers kept for their TTL: a busy sender domain is asked about for every message.
        ctx.services["inbound_checks"] = InboundChecker(ctx.config, make_resolver(ctx.config, cache=True))
        if self._link is not None:
            self._link.attach(ctx)
        if self.worker not in (None, 0):
            # The queue (claims in memory), quota warnings (one message per crossing), the
            # expunge-history sweep and the backup run once, in worker 0; it sees every
            # worker's changes through the link.
            return
        services: list[tuple[str, Any]] = [("quota_warner", QuotaWarner(ctx)), ("queue", QueueRunner(ctx)),
                                           ("expunge_history", ExpungeHistoryTrimmer(ctx))]
        if ctx.config.backup.enabled:
            services.append(("backup", BackupScheduler(ctx)))
        for key, svc in services:
            await svc.start()
            ctx.services[key] = svc
            self._background.append(svc)

    async def _stop_services(self) -> None:
        for svc in reversed(self._background):
            try:
                await svc.stop()
            except Exception:
                log.exception("stopping %s failed", type(svc).__name__)

    @staticmethod
    def _implicit_context(ctx: ServerContext) -> ssl.SSLContext:
        """The listener's context; each handshake switches to the *current* context, so that a
        SIGHUP certificate reload reaches implicit-TLS listeners too (OpenSSL calls the
        servername callback for every ClientHello, with or without SNI)."""
        first = ctx.tls_context()
        listener_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        listener_ctx.minimum_version = first.minimum_version
        listener_ctx.options = first.options

        def switch(sslobj: ssl.SSLObject, _name: str | None, _base: ssl.SSLContext) -> None:
            sslobj.context = ctx.tls_context()

        listener_ctx.sni_callback = switch
        return listener_ctx

    async def _listen(self, ctx: ServerContext, lst: ListenerConfig, handler: Handler) -> None:
        async def on_connect(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proxied: proxy.ProxyHeader | None = None
        ) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._connections.add(task)
            try:
                await self._serve_one(ctx, lst, handler, reader, writer, proxied)
            finally:
                self._connections.discard(task)

        host: str | None = None if lst.address in ("", "*", "::", "0.0.0.0") else lst.address
        family = socket.AF_INET if lst.address == "0.0.0.0" else socket.AF_UNSPEC
        if lst.proxy_protocol and self._link is not None:
            # A worker: the supervisor accepts and hands the raw connection over; the header is
            # read here, before TLS, as ProxyListener does.
            from postfach.supervisor import ProxySettings

            self._link.register(
                lst, on_connect, self._implicit_context(ctx) if lst.tls == "implicit" else None,
                ProxySettings(ctx.config.proxy.trusted_networks, ctx.config.proxy.header_timeout_seconds),
            )
            return
        if lst.proxy_protocol:
            # The header comes before everything, TLS included: our own accept loop reads it.
            socks = bind(host, lst.port, family, 512)
            port = socks[0].getsockname()[1]
            implicit = lst.tls == "implicit"
            listener = ProxyListener(
                socks,
                on_connect,
                name=replace(lst, port=port).describe(),
                trusted_networks=ctx.config.proxy.trusted_networks,
                header_timeout=ctx.config.proxy.header_timeout_seconds,
                ssl_context=self._implicit_context(ctx) if implicit else None,
                ssl_handshake_timeout=ctx.config.limits.tls_handshake_timeout_seconds if implicit else None,
            )
            self.listeners.append(BoundListener(lst, listener, port))
            log.info("listening: %s on %s port %d (%s, PROXY)", lst.protocol, lst.address or "*", port, lst.tls)
            return
        # Implicit TLS: asyncio does the handshake before the callback runs. (Calling start_tls in
        # the callback would race: a ClientHello that arrived first sits in the plaintext buffer.)
        ssl_ctx = self._implicit_context(ctx) if lst.tls == "implicit" else None
        if self._link is not None:  # a worker: the supervisor accepts and hands connections over
            self._link.register(lst, on_connect, ssl_ctx)
            return
        server = await asyncio.start_server(
            on_connect,
            host,
            lst.port,
            family=family,
            reuse_address=True,
            limit=2**16,
            backlog=512,
            ssl=ssl_ctx,
            ssl_handshake_timeout=ctx.config.limits.tls_handshake_timeout_seconds if ssl_ctx else None,
        )
        port = server.sockets[0].getsockname()[1]
        self.listeners.append(BoundListener(lst, server, port))
        log.info("listening: %s on %s port %d (%s)", lst.protocol, lst.address or "*", port, lst.tls)

    async def _serve_one(
        self,
        ctx: ServerContext,
        lst: ListenerConfig,
        handler: Handler,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        proxied: proxy.ProxyHeader | None = None,
    ) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        local = writer.get_extra_info("sockname") or ("?", 0)
        via = ""
        if proxied is not None and proxied.client_ip is not None and proxied.destination is not None:
            # The real client, as the load balancer saw it; everything below (per-IP cap, auth
            # throttling and lockout, cleartext_networks, logs, Received:, SPF) uses it. A v2 LOCAL
            # header (health check) or v1 UNKNOWN leaves the balancer's own address standing.
            via = f" via proxy {plain_ip(str(peer[0]))}"
            peer, local = proxied.source or peer, proxied.destination
        elif proxied is not None:
            via = " (PROXY header without a client address)"
        remote_ip = plain_ip(str(peer[0]))
        conn = ConnectionInfo(
            listener=lst,
            remote_ip=remote_ip,
            remote_port=int(peer[1]),
            local_ip=plain_ip(str(local[0])),
            local_port=int(local[1]),
            tls_active=False,
            id=f"{lst.protocol[:4]}{next(_ids)}",
        )
        token = plog.connection_id.set(conn.id)
        counts = ctx.connections_per_ip
        counts[remote_ip] = counts.get(remote_ip, 0) + 1
        try:
            access.info("connect %s from %s:%d%s", lst.describe(), remote_ip, conn.remote_port, via)
            if counts[remote_ip] > ctx.config.limits.max_connections_per_ip:
                access.warning("refused %s: over max_connections_per_ip", remote_ip)
                if lst.tls != "implicit":
                    writer.write(_BUSY[lst.protocol])
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(writer.drain(), 5)
                return
            conn.tls_active = lst.tls == "implicit"
            await handler(ctx, conn, reader, writer)
        except (ConnectionError, TimeoutError, ssl.SSLError) as e:
            access.info("connection from %s ended: %s", remote_ip, e)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unexpected error in %s connection from %s", lst.protocol, remote_ip)
        finally:
            counts[remote_ip] -= 1
            if counts[remote_ip] <= 0:
                del counts[remote_ip]
            with contextlib.suppress(Exception):
                writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), 2)
            access.info("disconnect %s", remote_ip)
            plog.connection_id.reset(token)


def client_settings(
    config: Config, address: str | None = None, *, bound: dict[tuple[str, str], int] | None = None
) -> str:
    """What a person types into a mail client, as a provider's help page shows it."""

    def ports(protocol: str) -> list[str]:
        out = []
        for lst in config.listeners:
            if lst.protocol != protocol:
                continue
            port = (bound or {}).get((lst.protocol, lst.tls), lst.port)
            mode = {"starttls": "STARTTLS", "implicit": "SSL/TLS", "none": "no encryption"}[lst.tls]
            out.append(f"{port} ({mode})")
        return out

    host = config.hostname
    user = address or "your full email address"
    rows = [
        ("Incoming mail (IMAP)", host, ports("imap")),
        ("Incoming mail (POP3)", host, ports("pop3")),
        ("Outgoing mail (SMTP)", host, ports("submission")),
    ]
    lines = ["Mail client settings:"]
    for label, h, p in rows:
        if p:
            lines.append(f"  {label:<22} server {h}, port {' or '.join(p)}")
    lines.append(f"  {'User name':<22} {user}")
    lines.append(f"  {'Password':<22} the account's password (normal password authentication)")
    lines.append(f"  {'Outgoing server':<22} requires authentication with the same user name and password")
    return "\n".join(lines)


def run_forever(config: Config) -> int:
    """``postfach serve``: run until SIGTERM/SIGINT; exit 0 after a graceful stop."""
    runner: Callable[[Coroutine[Any, Any, None]], None]
    try:
        import uvloop

        runner = uvloop.run
        loop_name = "uvloop"
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
        loop_name = "asyncio"
    server = Server(config)

    async def main() -> None:
        task = asyncio.create_task(server.run())
        ready = asyncio.create_task(server.ready.wait())
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if server.ready.is_set():
            bound = {(b.config.protocol, b.config.tls): b.port for b in server.listeners}
            log.info("ready (%s, %d listeners)", loop_name, len(server.listeners))
            print(client_settings(config, bound=bound), flush=True)
        ready.cancel()
        await task

    runner(main())
    return 0
