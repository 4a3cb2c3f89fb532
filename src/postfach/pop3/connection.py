"""The thin asyncio driver of a POP3 session: read → LineReceiver → Session → write.

It owns the socket-side concerns only: the inactivity timeout (RFC 1939 §3, at least 10 minutes),
STLS (RFC 2595 §4), graceful shutdown, streaming RETR/TOP from the blob store with backpressure,
and catching every error at the command boundary so that no input can crash the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

from postfach.context import ConnectionInfo, ServerContext
from postfach.errors import StoreError, StoreUnavailable
from postfach.pop3.parser import LineReceiver, LineTooLong, verb_of
from postfach.pop3.responses import (
    SYS_TEMP,
    DotStuffer,
    Err,
    MessageBody,
    Response,
    TopFilter,
    serialise,
    status_line,
)
from postfach.pop3.session import Session, State

log = logging.getLogger("postfach.pop3")

READ_SIZE = 65536
STREAM_CHUNK = 1024 * 1024  # bytes read from a blob per step of RETR / TOP (memory per session)
WRITE_SLICE = 128 * 1024  # bytes handed to the transport at a time while streaming


class _ConnectionClosedError(Exception):
    """The peer went away, timed out, or the server is shutting down."""


async def handle(
    ctx: ServerContext,
    conn: ConnectionInfo,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    session = Session(ctx, conn)
    driver = _Driver(ctx, conn, reader, writer, session)
    try:
        await driver.run()
    except (ConnectionError, ssl.SSLError, _ConnectionClosedError, asyncio.IncompleteReadError):
        pass
    except Exception:
        log.exception("pop3 connection %s failed", conn.id or conn.remote_ip)
    finally:
        try:
            await session.close()
        except Exception:
            log.exception("pop3 session close failed")
        await driver.shutdown_watch_cancel()
        writer.close()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(writer.wait_closed(), 5)


class _Driver:
    def __init__(
        self,
        ctx: ServerContext,
        conn: ConnectionInfo,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: Session,
    ) -> None:
        self.ctx = ctx
        self.conn = conn
        self.reader = reader
        self.writer = writer
        self.session = session
        self.receiver = LineReceiver(ctx.config.limits.max_line_bytes)
        self.idle_timeout = ctx.config.limits.pop3_idle_timeout_seconds
        self._shutdown_task: asyncio.Task[bool] | None = None

    async def shutdown_watch_cancel(self) -> None:
        if self._shutdown_task is not None:
            self._shutdown_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._shutdown_task

    async def _write(self, data: bytes) -> None:
        self.writer.write(data)
        await self._drain()

    async def _drain(self) -> None:
        """Backpressure; a client that stops reading for the idle timeout is dropped (else it
        could hold the maildrop lock forever)."""
        try:
            async with asyncio.timeout(self.idle_timeout):
                await self.writer.drain()
        except TimeoutError:
            log.info("pop3 %s: client stopped reading; closing", self.conn.id)
            raise _ConnectionClosedError from None

    async def _read_more(self) -> None:
        """Wait for input, the inactivity timeout or the shutdown signal."""
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.ensure_future(self.ctx.shutdown.wait())
        read = asyncio.ensure_future(self.reader.read(READ_SIZE))
        done, _ = await asyncio.wait(
            {read, self._shutdown_task},
            timeout=self.idle_timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if read not in done:
            read.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await read
            if self._shutdown_task in done:
                await self._goodbye(Err("Server shutting down", SYS_TEMP))
            else:
                await self._goodbye(Err("Disconnected for inactivity"))
            raise _ConnectionClosedError
        data = read.result()
        if not data:
            raise _ConnectionClosedError
        self.receiver.feed(data)

    async def _goodbye(self, err: Err) -> None:
        with contextlib.suppress(TimeoutError, Exception):
            await asyncio.wait_for(self._write(serialise(err)), 10)

    async def run(self) -> None:
        await self._write(serialise(self.session.greeting()))
        while True:
            if self.ctx.shutdown.is_set():
                await self._goodbye(Err("Server shutting down", SYS_TEMP))
                return
            line = self.receiver.next_line()
            if line is None:
                await self._read_more()
                continue
            if isinstance(line, LineTooLong):
                response: Response = self.session.line_too_long(line.limit)
            else:
                if not self.session.in_sasl:
                    log.debug("pop3 %s C: %s", self.conn.id, verb_of(line))
                try:
                    response = await self.session.handle_line(line)
                except StoreError as e:
                    log.warning("pop3 store error: %s", e)
                    response = Err("Temporary server failure, try again later", SYS_TEMP)
                except Exception:
                    log.exception("pop3 command failed")
                    response = Err("Internal server error", SYS_TEMP)
            if isinstance(response, MessageBody):
                await self._stream(response)
            else:
                await self._write(serialise(response))
            if self.session.want_tls:
                await self._start_tls()
            if self.session.want_close or self.session.state is State.CLOSED:
                return

    async def _stream(self, body: MessageBody) -> None:
        """RETR / TOP: status line, the message dot-stuffed in chunks with backpressure, '.'.

        The first chunk is read before the status line, so a message that vanished meanwhile
        (expunged through IMAP, its file gone) still gets a clean -ERR for most messages."""
        blob = body.blob
        try:
            # The store may know that the message needs no line-end repair and no dot-stuffing
            # (learned at ingest): then its bytes go out as they are, without a scan.
            stuffer = DotStuffer(getattr(blob, "wire", None))
            top = TopFilter(body.top_lines) if body.top_lines is not None else None
            size = blob.size
            try:
                chunk = await blob.read(0, min(STREAM_CHUNK, size)) if size else b""
            except StoreUnavailable as e:  # RFC 3206 §4: try again later
                log.warning("pop3 %s: store unavailable for RETR: %s", self.conn.id, e)
                await self._write(serialise(Err("Temporary server failure, try again later", SYS_TEMP)))
                return
            except StoreError as e:
                log.info("pop3 %s: message vanished before RETR: %s", self.conn.id, e)
                await self._write(serialise(Err("Message was deleted by another session (e.g. IMAP)")))
                return
            self.writer.write(status_line(True, body.status.text, body.status.code))
            offset = len(chunk)
            while True:
                if top is not None:
                    chunk = top.feed(chunk)
                out = stuffer.feed(chunk)
                # In slices, each drained: TLS encrypts at write(), so the client can decrypt
                # the first slice while we encrypt the next, instead of waiting for a whole MiB.
                if len(out) <= WRITE_SLICE:
                    if out:
                        self.writer.write(out)
                        await self._drain()
                else:
                    view = memoryview(out)
                    for i in range(0, len(out), WRITE_SLICE):
                        self.writer.write(view[i : i + WRITE_SLICE])
                        await self._drain()
                if offset >= size or (top is not None and top.done):
                    break
                try:
                    chunk = await blob.read(offset, min(STREAM_CHUNK, size - offset))
                except StoreError as e:
                    # The +OK is out; a truncated answer must not look complete: hang up.
                    log.warning("pop3 %s: message vanished during RETR: %s", self.conn.id, e)
                    raise _ConnectionClosedError from None
                if not chunk:
                    log.warning("pop3 %s: message file shorter than recorded", self.conn.id)
                    raise _ConnectionClosedError
                offset += len(chunk)
            self.writer.write(stuffer.finish())
            await self._drain()
        finally:
            await blob.close()
        self.session.message_sent(body)

    async def _start_tls(self) -> None:
        # RFC 2595 §4 / RFC 3207 §4 (STARTTLS injection): nothing the client pipelined after STLS
        # in plaintext may be taken as if it had come over TLS.
        if self.receiver.buffered:
            log.warning(
                "pop3 %s: discarding %d bytes pipelined after STLS", self.conn.id, self.receiver.buffered
            )
        self.receiver.reset()
        try:
            tls_ctx = self.ctx.tls_context()
        except Exception:
            log.exception("pop3: no TLS context")
            await self._goodbye(Err("TLS is not available", SYS_TEMP))
            raise _ConnectionClosedError from None
        # From the "+OK" above to loop.start_tls() there must be no await that yields to the loop:
        # otherwise the client's ClientHello could land in the plaintext StreamReader. For the same
        # reason the timeout is a context manager (no extra task), not wait_for().
        # Plaintext already in the StreamReader came before the handshake: an injection attempt.
        # The stream API offers no public way to drop it, so refuse to go on.
        if getattr(self.reader, "_buffer", None):
            log.warning("pop3 %s: plaintext pipelined after STLS; closing", self.conn.id)
            raise _ConnectionClosedError
        timeout = self.ctx.config.limits.tls_handshake_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                await self.writer.start_tls(tls_ctx)
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as e:
            log.info("pop3 %s: TLS handshake failed: %s", self.conn.id, e)
            raise _ConnectionClosedError from None
        self.session.tls_started()
