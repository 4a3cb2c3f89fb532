"""POP3 over real sockets: poplib over STLS and implicit TLS, STLS injection, bad input,
timeouts, shutdown, dropped connections, large messages, the change feed and restarts."""

from __future__ import annotations

import asyncio
import hashlib
import os
import poplib
import socket
import ssl
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pop3_helpers import PASSWORD, USER, Env, make_env, message, open_store, serve

from postfach.auth import Authenticator
from postfach.context import ServerContext
from postfach.store.base import ChangeKind
from postfach.types import Uid

pytestmark = pytest.mark.timeout(120)


def _not_loopback(ip: str) -> str:
    return "192.0.2.77"  # pretend the client is outside cleartext_networks


@pytest.mark.asyncio
async def test_poplib_over_stls(tmp_path: Path) -> None:
    env = await make_env(tmp_path)
    try:
        datas = [message(i) for i in range(1, 4)]
        for d in datas:
            await env.append(d)
        async with serve(env, remote_ip=_not_loopback) as port:

            def client() -> tuple[bytes, list[bytes], list[bytes], list[bytes], bytes]:
                c = poplib.POP3("127.0.0.1", port, timeout=30)
                try:
                    before = c.capa()
                    assert "STLS" in before and "USER" not in before and "SASL" not in before
                    with pytest.raises(poplib.error_proto) as refused:
                        c.user(USER)
                    assert b"[AUTH]" in refused.value.args[0]
                    c.stls(env.client_tls)
                    after = c.capa()
                    assert "STLS" not in after and "USER" in after and after["SASL"] == ["PLAIN", "LOGIN"]
                    c.user(USER)
                    c.pass_(PASSWORD)
                    stat = c.stat()
                    assert stat == (3, sum(len(d) for d in datas))
                    _, listing, _ = c.list()
                    _, uidls, _ = c.uidl()
                    _, lines, _ = c.retr(2)
                    _, top, _ = c.top(3, 1)
                    c.dele(1)
                    quit_resp = c.quit()
                    return quit_resp, listing, uidls, lines, b"\r\n".join(top)
                finally:
                    c.close()

            quit_resp, listing, uidls, lines, top = await asyncio.to_thread(client)
        assert quit_resp.startswith(b"+OK")
        assert listing == [b"%d %d" % (i, len(d)) for i, d in enumerate(datas, 1)]
        assert len({u.split()[1] for u in uidls}) == 3
        # poplib undoes the dot-stuffing: the lines are the stored message exactly.
        assert b"\r\n".join(lines) + b"\r\n" == datas[1]
        assert top == datas[2].split(b"\r\n\r\n")[0] + b"\r\n\r\n.dotted first line"
        remaining = await env.store.list_messages(env.account_id, env.inbox_id)
        assert [m.uid for m in remaining] == [2, 3]
        assert any(f == "\\Seen" for f in remaining[0].flags)
    finally:
        await env.store.close()


@pytest.mark.asyncio
async def test_poplib_implicit_tls_large_message(tmp_path: Path) -> None:
    env = await make_env(tmp_path)
    try:
        # ~6 MiB with many dot-lines: streamed in chunks, stuffing across chunk boundaries.
        body = b"".join(b"." * (i % 5) + b"x" * (i % 97) + b"\r\n" for i in range(120_000))
        big = b"Subject: big\r\n\r\n" + body
        await env.append(big)
        async with serve(env, implicit_tls=True) as port:

            def client() -> tuple[int, bytes, list[bytes]]:
                c = poplib.POP3_SSL("127.0.0.1", port, context=env.client_tls, timeout=60)
                try:
                    assert "STLS" not in c.capa()
                    c.user(USER)
                    c.pass_(PASSWORD)
                    _, lines, octets = c.retr(1)
                    _, top, _ = c.top(1, 99999999)  # fetchmail's "keep" download
                    c.quit()
                    return octets, b"\r\n".join(lines) + b"\r\n", top
                finally:
                    c.close()

            octets, got, top = await asyncio.to_thread(client)
        assert hashlib.sha256(got).digest() == hashlib.sha256(big).digest()
        assert b"\r\n".join(top) + b"\r\n" == big
        assert octets >= len(big)
    finally:
        await env.store.close()


class Raw:
    """A line-oriented raw client over a socket (blocking; run in a thread)."""

    def __init__(self, port: int) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def at_eof(self) -> bool:
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionResetError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.mark.asyncio
async def test_stls_discards_pipelined_plaintext(tmp_path: Path) -> None:
    env = await make_env(tmp_path)
    try:
        async with serve(env, remote_ip=_not_loopback) as port:

            def client() -> bytes | None:
                r = Raw(port)
                r.line()
                # An attacker appends a command to STLS in the same packet (RFC 3207 §4 injection).
                r.send(b"STLS\r\nUSER " + USER.encode() + b"\r\n")
                assert r.line().startswith(b"+OK")
                assert r.buf == b""
                tls = env.client_tls.wrap_socket(r.sock, server_hostname="mail.example.org")
                r.sock = tls
                try:
                    r.send(b"PASS " + PASSWORD.encode() + b"\r\n")
                    return r.line()
                except (EOFError, ConnectionResetError, ssl.SSLError):
                    return None  # closing the connection is an acceptable answer too
                finally:
                    r.close()

            answer = await asyncio.to_thread(client)
        # The injected USER must not count: either "Send USER first" or the server hung up.
        assert answer is None or answer == b"-ERR Send USER first"
    finally:
        await env.store.close()


@pytest.mark.asyncio
async def test_random_bytes_and_long_lines_never_crash(tmp_path: Path) -> None:
    env = await make_env(tmp_path)
    try:
        await env.append(message(1))
        async with serve(env) as port:

            def client() -> list[bytes]:
                r = Raw(port)
                out = [r.line()]
                rnd = os.urandom(4000).replace(b"\n", b"")
                for chunk in (rnd[:100], b"\x00\xff\xfe", b"RETR \xd9\xa3", b"TOP 1 -1", rnd[100:300]):
                    r.send(chunk + b"\r\n")
                    out.append(r.line())
                r.send(b"X" * 200_000 + b"\r\n")  # over limits.max_line_bytes
                out.append(r.line())
                r.send(b"USER " + USER.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\nSTAT\r\n")
                out += [r.line(), r.line(), r.line()]
                r.send(b"QUIT\r\n")
                out.append(r.line())
                r.close()
                return out

            out = await asyncio.to_thread(client)
        assert out[0].startswith(b"+OK")
        assert all(line.startswith(b"-ERR") for line in out[1:7]), out
        assert b"Line too long" in out[6]
        assert out[7].startswith(b"+OK") and out[8].startswith(b"+OK")
        assert out[9] == b"+OK 1 %d" % len(message(1))
        assert out[10].startswith(b"+OK")
    finally:
        await env.store.close()


@pytest.mark.asyncio
async def test_pipelining(tmp_path: Path) -> None:
    env = await make_env(tmp_path)
    try:
        for i in range(1, 4):
            await env.append(message(i))
        async with serve(env) as port:

            def client() -> bytes:
                r = Raw(port)
                r.line()
                r.send(
                    b"USER %s\r\nPASS %s\r\nSTAT\r\nLIST\r\nRETR 1\r\nDELE 1\r\nUIDL 2\r\nQUIT\r\n"
                    % (USER.encode(), PASSWORD.encode())
                )
                assert r.at_eof()
                return r.buf

            data = await asyncio.to_thread(client)
        lines = data.split(b"\r\n")
        assert lines[0].startswith(b"+OK") and lines[1].startswith(b"+OK Logged in")
        assert lines[2] == b"+OK 3 %d" % (3 * len(message(1)))
        assert data.endswith(b"+OK postfach POP3 server signing off (1 messages deleted)\r\n")
        assert b"\r\n..dotted first line\r\n" in data
    finally:
        await env.store.close()


@pytest.mark.asyncio
async def test_idle_timeout(tmp_path: Path) -> None:
    env = await make_env(tmp_path, {"limits.pop3_idle_timeout_seconds": 1})
    try:
        async with serve(env) as port:

            def client() -> tuple[bytes, bool]:
                r = Raw(port)
                r.line()
                line = r.line()  # nothing sent: the server gives up
                return line, r.at_eof()

            line, eof = await asyncio.to_thread(client)
        assert line == b"-ERR Disconnected for inactivity"
        assert eof
    finally:
        await env.store.close()


@pytest.mark.asyncio
async def test_shutdown_says_goodbye(tmp_path: Path) -> None:
    env = await make_env(tmp_path)
    try:
        async with serve(env) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert (await reader.readline()).startswith(b"+OK")
            writer.write(b"NOOP\r\n")
            assert await reader.readline() == b"+OK\r\n"
            env.ctx.shutdown.set()
            assert await reader.readline() == b"-ERR [SYS/TEMP] Server shutting down\r\n"
            assert await reader.read() == b""
            writer.close()
    finally:
        await env.store.close()


async def _login(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    writer.write(b"USER %s\r\nPASS %s\r\n" % (USER.encode(), PASSWORD.encode()))
    await reader.readline()
    return reader, writer, await reader.readline()


@pytest.mark.asyncio
async def test_dropped_connection_releases_lock_and_deletes_nothing(tmp_path: Path) -> None:
    env = await make_env(tmp_path)
    try:
        for i in range(1, 3):
            await env.append(message(i))
        async with serve(env) as port:
            reader, writer, answer = await _login(port)
            assert answer.startswith(b"+OK Logged in")
            _r2, w2, second = await _login(port)
            assert second.startswith(b"-ERR [IN-USE]")
            w2.close()
            writer.write(b"DELE 1\r\nDELE 2\r\n")
            assert (await reader.readline()).startswith(b"+OK")
            assert (await reader.readline()).startswith(b"+OK")
            writer.transport.abort()  # dropped: no QUIT
            for _ in range(200):  # the server notices the EOF and releases the lock
                r3, w3, third = await _login(port)
                if not third.startswith(b"-ERR [IN-USE]"):
                    break
                w3.close()
                await asyncio.sleep(0.05)
            assert third == b"+OK Logged in, 2 messages (%d octets)\r\n" % (2 * len(message(1)))
            w3.write(b"QUIT\r\n")
            await r3.readline()
            w3.close()
        assert len(await env.store.list_messages(env.account_id, env.inbox_id)) == 2
    finally:
        await env.store.close()


@pytest.mark.asyncio
async def test_change_feed_sees_pop3_expunge(tmp_path: Path) -> None:
    """What an IMAP session in IDLE relies on: the POP3 DELE+QUIT reaches the change feed."""
    env = await make_env(tmp_path)
    try:
        uids = [await env.append(message(i)) for i in range(1, 4)]
        sub = env.store.subscribe(env.account_id)
        async with serve(env) as port:
            reader, writer, answer = await _login(port)
            assert answer.startswith(b"+OK")
            writer.write(b"DELE 2\r\nQUIT\r\n")
            assert (await reader.readline()).startswith(b"+OK")
            quit_answer = await reader.readline()
            assert quit_answer.startswith(b"+OK")
            # Durable before +OK: by the time QUIT was answered, the change is in the feed.
            change = sub.get_nowait()
            while change is not None and change.kind is not ChangeKind.EXPUNGE:
                change = sub.get_nowait()
            assert change is not None
            assert change.uids == (Uid(uids[1]),)
            writer.close()
        sub.close()
        changes = await env.store.mailbox_changes(env.account_id, env.inbox_id, 0)  # type: ignore[arg-type]
        assert Uid(uids[1]) in changes.expunged
    finally:
        await env.store.close()


async def _uidl_listing(env: Env, port: int) -> list[bytes]:
    reader, writer, answer = await _login(port)
    assert answer.startswith(b"+OK")
    writer.write(b"UIDL\r\nQUIT\r\n")
    lines = []
    assert (await reader.readline()).startswith(b"+OK")
    while (line := await reader.readline()) != b".\r\n":
        lines.append(line)
    await reader.readline()
    writer.close()
    return lines


@pytest.mark.asyncio
async def test_uidl_survives_restart(tmp_path: Path) -> None:
    env = await make_env(tmp_path)
    for i in range(1, 4):
        await env.append(message(i))
    async with serve(env) as port:
        before = await _uidl_listing(env, port)
    await env.store.close()
    # "Restart": a new store object on the same files, a new context.
    store = await open_store(tmp_path / "store")
    try:
        env.store = store
        env.ctx = ServerContext(
            config=env.ctx.config,
            store=store,
            auth=Authenticator(store, env.ctx.config.auth),
            tls_context=env.ctx.tls_context,
        )
        async with serve(env) as port:
            after = await _uidl_listing(env, port)
        assert before == after and len(before) == 3
    finally:
        await store.close()
