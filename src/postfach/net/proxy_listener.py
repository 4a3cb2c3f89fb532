"""Listeners behind a load balancer that speaks the PROXY protocol: the socket side of ``proxy.py``.

The header has to be read from the raw socket *before* any transport exists: on implicit-TLS ports
it comes before the ClientHello (often in the same segment), an asyncio transport reads ahead, and
``start_tls`` cannot be handed bytes already read. So these listeners run their own accept loop:

1. a peer outside ``[proxy] trusted_networks`` is closed at once;
2. :func:`read_header` peeks and consumes exactly the header (v1 or v2, auto-detected by
   :func:`postfach.net.proxy.parse`) within ``header_timeout_seconds``; a missing, bad or slow
   header closes the connection — logged, no greeting (spec §2: the receiver "MUST NOT try to
   guess whether the protocol header is present or not");
3. the socket becomes a stream connection (``connect_accepted_socket``, with the TLS handshake on
   implicit-TLS ports through the listener's switching context, so SIGHUP reloads apply) and the
   server's connection callback runs with the header.

v2 TLVs are not used: in particular PP2_TYPE_SSL (the balancer terminated TLS) never makes a
connection count as TLS-protected; only our own TLS does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from postfach.net.proxy import V2_FIXED, V2_MAX_LENGTH, ProxyHeader, ProxyProtocolError, is_trusted, parse

access = logging.getLogger("postfach.access")
log = logging.getLogger("postfach.server")

#: The server's per-connection callback: the streams and the header that came first.
Connected = Callable[[asyncio.StreamReader, asyncio.StreamWriter, ProxyHeader], Awaitable[None]]

_PEEK = V2_FIXED + V2_MAX_LENGTH


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    fd = sock.fileno()
    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Take ``n`` bytes that a peek has shown to be there."""
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("the peer closed the connection inside the PROXY header")
        out += chunk
    return out


async def read_header(sock: socket.socket) -> ProxyHeader:
    """One PROXY header from a freshly accepted non-blocking socket, and not one byte more.

    Peek, let :func:`parse` say how long the header is, consume exactly that. While the header is
    incomplete every byte seen so far belongs to it and is consumed, so readiness is never spun on.
    Raises ProxyProtocolError for a bad header, ConnectionError when the peer closes first; the
    caller bounds the wait."""
    loop = asyncio.get_running_loop()
    consumed = b""
    while True:
        try:
            peeked = sock.recv(_PEEK - len(consumed), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            await _readable(loop, sock)
            continue
        if not peeked:
            raise ConnectionError("the peer closed the connection before a complete PROXY header")
        got = parse(consumed + peeked)
        if got is None:
            consumed += _recv_exactly(sock, len(peeked))
            if len(consumed) >= _PEEK:  # parse() refuses longer headers first; belt and braces
                raise ProxyProtocolError("PROXY header too long")
            continue
        header, used = got
        _recv_exactly(sock, used - len(consumed))
        return header


def bind(host: str | None, port: int, family: int, backlog: int) -> list[socket.socket]:
    """Listening sockets as ``asyncio.start_server`` makes them (one per address; v6 only v6)."""
    infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for af, kind, proto, _name, addr in dict.fromkeys(infos):
            sock = socket.socket(af, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if af == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def plain_ip(ip: str) -> str:
    """``::ffff:192.0.2.1`` → ``192.0.2.1``."""
    return ip[7:] if ip.startswith("::ffff:") else ip


class ProxyListener(asyncio.AbstractServer):
    """An accept loop over ``socks`` that admits only trusted balancers sending a valid header."""

    def __init__(
        self,
        socks: list[socket.socket],
        connected: Connected,
        *,
        name: str,
        trusted_networks: tuple[str, ...],
        header_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        ssl_handshake_timeout: float | None = None,
        limit: int = 2**16,
    ) -> None:
        self.sockets = socks
        self._connected, self._name = connected, name
        self._trusted, self._timeout = trusted_networks, header_timeout
        self._ssl, self._ssl_timeout, self._limit = ssl_context, ssl_handshake_timeout, limit
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()
        for s in socks:
            self._spawn(self._accept(s))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, lsock: socket.socket) -> None:
        while True:
            try:
                sock, addr = await self._loop.sock_accept(lsock)
            except OSError as e:  # EMFILE and friends: do not spin
                log.warning("accept on %s failed: %s", self._name, e)
                await asyncio.sleep(0.1)
                continue
            self._spawn(self._admit(sock, addr))

    async def _admit(self, sock: socket.socket, addr: Any) -> None:
        await admit(
            sock, addr, self._connected, name=self._name, trusted_networks=self._trusted,
            header_timeout=self._timeout, ssl_context=self._ssl, ssl_handshake_timeout=self._ssl_timeout,
            limit=self._limit,
        )

    # --- asyncio.AbstractServer --------------------------------------------------------------------
    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for sock in self.sockets:
            sock.close()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def is_serving(self) -> bool:
        return not self._closed.is_set()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    async def start_serving(self) -> None:
        """Serving starts at construction."""

    async def serve_forever(self) -> None:
        await self._closed.wait()


__all__ = ["Connected", "ProxyListener", "bind", "plain_ip", "read_header"]


async def admit(
    sock: socket.socket,
    addr: Any,
    connected: Connected,
    *,
    name: str,
    trusted_networks: tuple[str, ...],
    header_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    ssl_handshake_timeout: float | None = None,
    limit: int = 2**16,
) -> bool:
    """One accepted socket on a PROXY listener: refuse an untrusted peer or a bad/late header,
    else read exactly the header, run TLS (implicit ports) and hand the stream to ``connected``.
    True when the session was started (the transport owns the socket); else the socket is closed.
    Used by ``ProxyListener`` and by ``serve --workers`` workers for handed-over connections."""
    loop = asyncio.get_running_loop()
    peer_ip = plain_ip(str(addr[0]))
    handed_over = False
    try:
        if not is_trusted(peer_ip, trusted_networks):
            access.warning("refused %s on %s: not in proxy.trusted_networks", peer_ip, name)
            return False
        try:
            header = await asyncio.wait_for(read_header(sock), header_timeout)
        except (ProxyProtocolError, OSError, TimeoutError) as e:
            reason = "no complete PROXY header in time" if isinstance(e, TimeoutError) else str(e)
            access.warning("refused %s on %s: %s", peer_ip, name, reason or type(e).__name__)
            return False
        reader = asyncio.StreamReader(limit=limit, loop=loop)

        def on_stream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> Awaitable[None]:
            return connected(r, w, header)

        protocol = asyncio.StreamReaderProtocol(reader, on_stream, loop=loop)
        try:
            await loop.connect_accepted_socket(
                lambda: protocol, sock, ssl=ssl_context, ssl_handshake_timeout=ssl_handshake_timeout
            )
            handed_over = True  # the transport owns the socket now
        except (OSError, ssl.SSLError, TimeoutError) as e:
            access.info("TLS handshake with %s via %s failed: %s", header.client_ip or peer_ip, peer_ip, e)
        return handed_over
    finally:
        if not handed_over:  # (a socket the failed transport closed or detached already: a no-op)
            with contextlib.suppress(OSError):
                sock.close()
