"""The thin asyncio driver of an IMAP connection: read -> receiver -> session -> write.

It owns the socket: STARTTLS (RFC 9051 §6.2.1, dropping pipelined plaintext), IDLE (RFC 2177:
waiting on the store's change feed and the socket at once), AUTHENTICATE continuation lines,
the inactivity timeout (RFC 9051 §5.4: at least 30 minutes) and polite shutdown (``* BYE``).
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import logging
import ssl
import zlib
from typing import Any

from postfach.context import ConnectionInfo, ServerContext
from postfach.imap import responses as r
from postfach.imap.counts import ACCOUNT_COUNTS_KEY, AccountCounts
from postfach.imap.receiver import NeedContinuation, NeedData, Receiver, Rejected, Request
from postfach.imap.session import Next, Session

log = logging.getLogger("postfach.imap")

READ_SIZE = 65536
INFLATE_CHUNK = 1024 * 1024  # RFC 4978: inflate at most this much per step (deflate bombs)
WRITE_HIGH_WATER = 256 * 1024

MIN_TIMEOUT_SECONDS = 1800  # RFC 9051 §5.4: the autologout timer is at least 30 minutes
DRIVERS_KEY = "imap.drivers"
WATCHER_KEY = "imap.shutdown_watcher"


class _Closed(ConnectionError):
    """The peer went away, the session timed out or the server shuts down."""


class _WriterSink:
    """Writes with backpressure: a slow reader blocks only its own session (issue 3 §9), and a
    peer that stops reading altogether is dropped after the inactivity timeout. After COMPRESS
    DEFLATE every write is deflated and sync-flushed (RFC 4978 §4)."""

    __slots__ = ("deflate", "timeout", "writer")

    def __init__(self, writer: asyncio.StreamWriter, timeout: float) -> None:
        self.writer = writer
        self.timeout = timeout
        self.deflate: Any = None  # zlib compressobj once COMPRESS is active

    def encode(self, data: bytes) -> bytes:
        if self.deflate is None:
            return data
        return bytes(self.deflate.compress(data) + self.deflate.flush(zlib.Z_SYNC_FLUSH))

    async def write(self, data: bytes) -> None:
        writer = self.writer
        if writer.is_closing():
            raise _Closed()
        writer.write(self.encode(data))
        if writer.transport.get_write_buffer_size() <= WRITE_HIGH_WATER:
            await writer.drain()  # returns at once below the transport's high-water mark
            return
        try:
            await asyncio.wait_for(writer.drain(), self.timeout)
        except TimeoutError:
            writer.close()
            raise _Closed() from None


class _Driver:
    __slots__ = ("__weakref__", "_inflate", "_notify_task", "_read_task", "_sink", "_timer", "_waiting", "conn", "ctx",
                 "reader", "receiver", "session", "timeout", "writer")

    def __init__(self, ctx: ServerContext, conn: ConnectionInfo, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.ctx = ctx
        self.conn = conn
        self.reader = reader
        self.writer = writer
        limits = ctx.config.limits
        self.timeout = float(max(limits.imap_idle_timeout_seconds, MIN_TIMEOUT_SECONDS))
        self.receiver = Receiver(limits.max_line_bytes, limits.max_literal_bytes)
        counts: AccountCounts = ctx.services.setdefault(ACCOUNT_COUNTS_KEY, AccountCounts())
        self._sink = _WriterSink(writer, self.timeout)
        self._inflate: Any = None  # zlib decompressobj once COMPRESS is active
        self.session = Session(ctx, conn, self._sink, account_connections=counts)
        self._read_task: asyncio.Task[bytes] | None = None
        self._notify_task: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._waiting = False
        _watch_shutdown(ctx, self)

    # --- reading ---------------------------------------------------------------------------------
    def _on_timeout(self) -> None:
        self._timer = None
        if self._waiting:
            self._closing("Autologout; idle for too long")

    def _on_shutdown(self) -> None:
        if self._waiting:
            self._closing("Server shutting down")

    def _closing(self, text: str) -> None:
        """Say BYE and close from a callback while the driver waits for the client."""
        with contextlib.suppress(Exception):
            self.writer.write(self._sink.encode(r.untagged("BYE " + text)))
            self.writer.close()

    async def _read(self, extra: asyncio.Future[None] | None = None) -> bytes | None:
        """More bytes from the peer; None when ``extra`` finished first. Raises _Closed on EOF,
        timeout or shutdown (RFC 9051 §5.4: the autologout timer runs while we wait)."""
        if self.ctx.shutdown.is_set():
            await self._bye("Server shutting down")
            raise _Closed()
        if self._inflate is not None and self._inflate.unconsumed_tail:
            return self._inflated(b"")
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.timeout, self._on_timeout)
        self._waiting = True
        try:
            if extra is None:
                data = await self.reader.read(READ_SIZE)
            else:
                if self._read_task is None:
                    self._read_task = asyncio.ensure_future(self.reader.read(READ_SIZE))
                waiting: set[asyncio.Future[Any]] = {self._read_task, extra}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if self._read_task not in done:
                    return None
                task, self._read_task = self._read_task, None
                data = task.result()
        finally:
            self._waiting = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if not data:
            raise _Closed()
        if self._inflate is not None:
            return self._inflated(data)
        return data

    def _inflated(self, raw: bytes) -> bytes:
        """Inflate what came in (RFC 4978), at most INFLATE_CHUNK at a time; the rest waits in
        ``unconsumed_tail``. A broken stream ends the session with BYE."""
        d = self._inflate
        try:
            out = bytes(d.decompress(d.unconsumed_tail + raw, INFLATE_CHUNK))
        except zlib.error:
            log.info("broken DEFLATE stream from %s", self.conn.remote_ip)
            self._closing("Invalid compressed data")
            raise _Closed() from None
        if d.eof:
            self._closing("Compressed stream ended")
            raise _Closed()
        return out

    async def _line(self) -> bytes:
        while True:
            line = self.receiver.read_line()
            if line is not None:
                return line
            data = await self._read()
            assert data is not None
            self.receiver.feed(data)

    async def _bye(self, text: str) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(self._sink.encode(r.untagged("BYE " + text)))
            await asyncio.wait_for(self.writer.drain(), 5)

    # --- the loop ---------------------------------------------------------------------------------
    async def run(self) -> None:
        await self.session.out.write(self.session.greeting())
        while True:
            ev = self.receiver.next_event()
            if isinstance(ev, NeedData):
                if self.session.notify_active:
                    # RFC 5465: with NOTIFY on, changes are told while the client is quiet too.
                    if self._notify_task is None:
                        self._notify_task = asyncio.ensure_future(self.session.wait_change())
                    data = await self._read(self._notify_task)
                    if data is None:
                        self._notify_task = None
                        if await self.session.notify_update() is Next.LOGOUT:
                            return
                        continue
                else:
                    data = await self._read()
                assert data is not None
                self.receiver.feed(data)
                continue
            if isinstance(ev, NeedContinuation):
                await self.session.out.write(r.continuation("Ready for literal data"))
                continue
            if isinstance(ev, Rejected):
                nxt = await self.session.rejected(ev.tag, ev.code, ev.text, ev.no)
            else:
                assert isinstance(ev, Request)
                nxt = await self.session.execute(ev.raw)
            while nxt is Next.SASL:
                nxt = await self.session.sasl_line(await self._line())
            if nxt is Next.LOGOUT:
                return
            if nxt is Next.STARTTLS:
                await self._starttls()
            elif nxt is Next.COMPRESS:
                await self._compress()
            elif nxt is Next.IDLE:
                self._stop_notify_wait()
                await self._idle()
            if self.ctx.shutdown.is_set():
                await self._bye("Server shutting down")
                return

    async def _starttls(self) -> None:
        # RFC 9051 §6.2.1: stop reading before the OK goes out. What is buffered now was sent
        # before the client saw the OK (plaintext to drop, RFC 3207 §4); what comes after is
        # the TLS handshake, which start_tls must get untouched (it resumes reading itself).
        pause = getattr(self.writer.transport, "pause_reading", None)  # uvloop's too
        if callable(pause):
            pause()
        await self.session.starttls_ready()
        dropped = self.receiver.reset()
        buffered = getattr(self.reader, "_buffer", None)  # the StreamReader's own buffer
        if isinstance(buffered, bytearray) and buffered:
            dropped += len(buffered)
            buffered.clear()
        if self._read_task is not None:  # a pending read would race the TLS handshake
            self._read_task.cancel()
            self._read_task = None
        if dropped:
            # RFC 3207 §4 / RFC 9051 §6.2.1: never carry plaintext across into TLS.
            log.warning("dropped %d bytes pipelined after STARTTLS from %s", dropped, self.conn.remote_ip)
        try:
            await self.writer.start_tls(
                self.ctx.tls_context(),
                ssl_handshake_timeout=self.ctx.config.limits.tls_handshake_timeout_seconds,
            )
        except (ssl.SSLError, OSError, TimeoutError) as e:
            log.info("STARTTLS handshake failed from %s: %s", self.conn.remote_ip, e)
            raise _Closed() from None
        self.session.tls_started()

    async def _compress(self) -> None:
        # RFC 4978 §3: the tagged OK is the last uncompressed byte either way; whatever the
        # client sent after the command is already compressed.
        await self.session.compress_ready()
        pending = self.receiver.take_buffered()
        self._sink.deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        self._inflate = zlib.decompressobj(-15)
        if pending:
            self.receiver.feed(self._inflated(pending))

    async def _idle(self) -> None:
        change: asyncio.Task[None] = asyncio.ensure_future(self.session.wait_change())
        try:
            while True:
                line = self.receiver.read_line()
                if line is not None:
                    if await self.session.idle_done(line) is Next.LOGOUT:
                        raise _Closed()
                    return
                data = await self._read(change)
                if data is None:
                    if await self.session.idle_update() is Next.LOGOUT:
                        raise _Closed()
                    change = asyncio.ensure_future(self.session.wait_change())
                    continue
                self.receiver.feed(data)
        finally:
            change.cancel()

    def _stop_notify_wait(self) -> None:
        if self._notify_task is not None:
            self._notify_task.cancel()
            self._notify_task = None

    async def close(self) -> None:
        drivers: set[_Driver] = self.ctx.services.get(DRIVERS_KEY, set())
        drivers.discard(self)
        self._stop_notify_wait()
        if self._read_task is not None:
            self._read_task.cancel()
        if self._timer is not None:
            self._timer.cancel()
        await self.session.close()


def _watch_shutdown(ctx: ServerContext, driver: _Driver) -> None:
    """One watcher task per server (not per connection) wakes idle sessions for their BYE."""
    drivers: set[_Driver] = ctx.services.setdefault(DRIVERS_KEY, set())
    drivers.add(driver)
    if ctx.services.get(WATCHER_KEY) is None:
        async def watch() -> None:
            await ctx.shutdown.wait()
            for d in list(ctx.services.get(DRIVERS_KEY, ())):
                d._on_shutdown()

        ctx.services[WATCHER_KEY] = asyncio.ensure_future(watch())


async def handle(ctx: ServerContext, conn: ConnectionInfo, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
    """Serve one IMAP connection (implicit TLS is already active when the listener says so)."""
    driver = _Driver(ctx, conn, reader, writer)
    try:
        await driver.run()
    except (_Closed, ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        await driver.close()
