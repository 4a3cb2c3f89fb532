"""The asyncio driver for SMTP listeners (submission 587/465/any, MX 25): bytes in, replies out.

PIPELINING (RFC 2920 §3): every complete command already received is answered in order and the
answers are buffered; they are flushed whenever the server would otherwise wait for input, which
is exactly the "flush before blocking" rule (so a group ending in DATA, BDAT, STARTTLS, QUIT, AUTH
or NOOP gets its answers before the server waits).

STARTTLS (RFC 3207 §4): every plaintext byte the client pipelined behind STARTTLS is discarded
(the command-injection attack, CVE-2011-0411) — what our receiver holds through ``reset()``, what
the StreamReader still holds through the public ``read`` (its length is only peeked at) — then the
``220`` is written and the stream upgraded with ``StreamWriter.start_tls`` without yielding to the
loop in between (see ``_start_tls``).

Limits: connections per IP are enforced by server.py for every protocol; bad commands (in the
session), message size (in the receiver).

Timeouts (RFC 5321 §4.5.3.2): ``[limits] smtp_idle_timeout_seconds`` for every wait for the client
(the 5-minute command timeout of §4.5.3.2.7 and the data-block timeout); on expiry ``421 4.4.2``.
Shutdown: ``421 4.3.2`` at the next point where no transaction is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from typing import Any

from postfach.context import ConnectionInfo, ServerContext
from postfach.smtp import codes
from postfach.smtp.session import Conversation, Peer

log = logging.getLogger("postfach.smtp")

READ_SIZE = 256 * 1024
_ids = itertools.count(1)

def tls_description(writer: asyncio.StreamWriter) -> str | None:
    obj = writer.get_extra_info("ssl_object")
    if obj is None:
        return None
    cipher = obj.cipher()
    version = obj.version() or "TLS"
    if cipher is None:
        return version
    name, _proto, bits = cipher
    return f"{version} with cipher {name} ({bits}/{bits} bits)"


async def handle(
    ctx: ServerContext, conn: ConnectionInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    if not conn.id:
        conn.id = f"s{next(_ids)}"
    try:
        await _serve(ctx, conn, reader, writer)
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, OSError) as e:
        log.debug("smtp %s: connection lost: %s", conn.id, e)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 5)


async def _drain(writer: asyncio.StreamWriter, timeout: float) -> None:
    """``drain`` bounded by the idle timeout (a client that never reads cannot hold us)."""
    async with asyncio.timeout(timeout):
        await writer.drain()


def _stream_buffered(reader: asyncio.StreamReader) -> int:
    """Bytes the StreamReader holds that we have not read yet (looked at, never changed)."""
    buf = getattr(reader, "_buffer", None)
    return len(buf) if buf is not None else 0


async def _start_tls(
    conn: ConnectionInfo,
    conv: Conversation,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    before: bytes,
    ready: bytes,
    sslctx: ssl.SSLContext,
    timeout: float,
    handshake_timeout: float,
) -> None:
    """RFC 3207 §4 / CVE-2011-0411: nothing the client sent before it saw our 220 may be read
    as if it had come through TLS. Order matters:

    1. flush the replies before the 220 (this may wait for the client);
    2. discard what the receiver holds and what the StreamReader has buffered — all of it was
       sent before the 220 existed, so it is injected plaintext. ``reader.read`` on a non-empty
       buffer returns at once without yielding to the loop;
    3. write the 220 and upgrade without yielding in between (``drain`` does not yield while the
       transport is below its high-water mark, and ``start_tls`` pauses reading first), so the
       client's ClientHello cannot land in the plaintext buffer.
    """
    if before:
        writer.write(before)
        await _drain(writer, timeout)
    dropped = len(conv.receiver.reset())
    while _stream_buffered(reader):
        dropped += len(await reader.read(READ_SIZE))
    if dropped:
        log.info("smtp %s: discarded %d plaintext bytes pipelined after STARTTLS", conn.id, dropped)
    writer.write(ready)
    await writer.drain()
    await writer.start_tls(sslctx, ssl_handshake_timeout=handshake_timeout)
    conn.tls_active = True


async def _read(
    reader: asyncio.StreamReader, timeout: float, stop: asyncio.Future[Any] | None
) -> bytes | None:
    """Next bytes from the client; None on timeout; b"" on EOF or when ``stop`` (shutdown) fires."""
    if stop is None:
        try:
            async with asyncio.timeout(timeout):
                return await reader.read(READ_SIZE)
        except TimeoutError:
            return None
    read_task = asyncio.ensure_future(reader.read(READ_SIZE))
    done, _ = await asyncio.wait({read_task, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if read_task in done:
        return read_task.result()
    read_task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await read_task
    return b"" if stop in done else None


async def _serve(
    ctx: ServerContext, conn: ConnectionInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    # Every wait on the client — for input and for it to take our replies — is bounded.
    timeout = float(ctx.config.limits.smtp_idle_timeout_seconds)
    peer = Peer(
        remote_ip=conn.remote_ip,
        listener_tls=conn.listener.tls,
        tls_active=conn.tls_active,
        tls_info=tls_description(writer) if conn.tls_active else None,
    )
    conv = Conversation.create(ctx, peer, conn.listener.protocol)
    if ctx.shutdown.is_set():
        writer.write(codes.R421_SHUTDOWN.with_text(f"{ctx.hostname} {codes.R421_SHUTDOWN.text}").to_bytes())
        await _drain(writer, timeout)
        return
    out = bytearray(conv.greeting())
    log.info("smtp %s: connect from [%s] on %s", conn.id, conn.remote_ip, conn.listener.describe())
    stop = asyncio.ensure_future(ctx.shutdown.wait())
    try:
        await _converse(ctx, conn, conv, reader, writer, out, timeout, stop)
    finally:
        stop.cancel()


async def _converse(
    ctx: ServerContext,
    conn: ConnectionInfo,
    conv: Conversation,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    out: bytearray,
    timeout: float,
    stop: asyncio.Future[Any],
) -> None:
    session = conv.session
    while True:
        # Answer every complete command already received (PIPELINING), then flush and wait.
        while True:
            step = await conv.next()
            if step is None:
                break
            if step.starttls:
                try:
                    sslctx = ctx.tls_context()
                except Exception:  # no usable certificate right now: RFC 3207 §4 454
                    log.exception("smtp %s: no TLS context for STARTTLS", conn.id)
                    out += codes.R454_TLS_UNAVAILABLE.to_bytes()
                    continue
                await _start_tls(conn, conv, reader, writer, bytes(out), step.data, sslctx, timeout,
                                 float(ctx.config.limits.tls_handshake_timeout_seconds))
                out.clear()
                session.tls_started(tls_description(writer))
                log.info("smtp %s: TLS started (%s)", conn.id, session.peer.tls_info)
                continue
            out += step.data
            if step.close:
                writer.write(bytes(out))
                await _drain(writer, timeout)
                return
        if out:
            writer.write(bytes(out))
            out.clear()
            await _drain(writer, timeout)
        if ctx.shutdown.is_set() and not session.in_transaction:
            writer.write(codes.R421_SHUTDOWN.with_text(f"{ctx.hostname} {codes.R421_SHUTDOWN.text}").to_bytes())
            await _drain(writer, timeout)
            return
        data = await _read(reader, timeout, None if session.in_transaction else stop)
        if data is None:
            log.info("smtp %s: timeout", conn.id)
            writer.write(codes.R421_TIMEOUT.with_text(f"{ctx.hostname} {codes.R421_TIMEOUT.text}").to_bytes())
            await _drain(writer, timeout)
            return
        if not data:
            if ctx.shutdown.is_set():
                continue  # answered with 421 at the top of the loop
            log.info("smtp %s: disconnect", conn.id)
            return
        conv.feed(data)
