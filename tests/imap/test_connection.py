"""The asyncio driver over real sockets: STARTTLS injection, size caps, budgets, stuck TLS
handshakes, slow readers, per-account caps and polite shutdown (issue 3 §1, §8, §9)."""

from __future__ import annotations

import imaplib
import os
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import PASSWORD, USER, LiveServer, start_live_server, stop_live_server
from postfach.config import LimitsConfig


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[LiveServer]:
    limits = replace(LimitsConfig(), max_literal_bytes=4096, max_line_bytes=1024, max_bad_commands=5,
                     max_connections_per_account=3)
    live, thread = start_live_server(tmp_path / "data", limits=limits)
    try:
        yield live
    finally:
        stop_live_server(live, thread)


class Wire:
    """A tiny line-oriented IMAP client over a (TLS) socket."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket) -> None:
        self.sock = sock
        self.buf = b""
        sock.settimeout(20)

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

    def until_tag(self, tag: bytes) -> list[bytes]:
        out = []
        while True:
            ln = self.line()
            out.append(ln)
            if ln.startswith(tag + b" "):
                return out


def tls_wire(live: LiveServer) -> Wire:
    raw = socket.create_connection(("127.0.0.1", live.port("imap", "implicit")))
    sock = live.client_context().wrap_socket(raw, server_hostname="localhost")
    w = Wire(sock)
    assert w.line().startswith(b"* OK")
    return w


def test_starttls_drops_pipelined_plaintext(live_server: LiveServer) -> None:
    raw = socket.create_connection(("127.0.0.1", live_server.port("imap", "starttls")))
    w = Wire(raw)
    assert w.line().startswith(b"* OK")
    w.send(b"a1 STARTTLS\r\ninj LOGIN " + USER.encode() + b" " + PASSWORD.encode() + b"\r\n")
    assert w.line().startswith(b"a1 OK")
    tls = live_server.client_context().wrap_socket(raw, server_hostname="localhost")
    w2 = Wire(tls)
    w2.send(b"a2 NOOP\r\n")
    lines = w2.until_tag(b"a2")
    assert not any(ln.startswith(b"inj") for ln in lines)
    w2.send(b"a3 SELECT INBOX\r\n")
    assert w2.until_tag(b"a3")[-1].startswith(b"a3 BAD")  # the injected LOGIN never ran


def test_literal_too_big_keeps_connection(small_server: LiveServer) -> None:
    w = tls_wire(small_server)
    w.send(b"a1 LOGIN " + USER.encode() + b" " + PASSWORD.encode() + b"\r\n")
    assert w.until_tag(b"a1")[-1].startswith(b"a1 OK")
    w.send(b"a2 APPEND INBOX {5000}\r\n")
    assert w.line().startswith(b"a2 NO [TOOBIG]")
    w.send(b"a3 APPEND INBOX {5000+}\r\n" + b"x" * 5000 + b"\r\n")
    assert w.until_tag(b"a3")[-1].startswith(b"a3 BAD [TOOBIG]")
    w.send(b"a4 NOOP " + b"y" * 3000 + b"\r\n")
    assert w.until_tag(b"a4")[-1].startswith(b"a4 BAD [TOOBIG]")
    w.send(b"a5 NOOP\r\n")
    assert w.until_tag(b"a5")[-1] == b"a5 OK NOOP completed"


def test_bad_command_budget_ends_with_bye(small_server: LiveServer) -> None:
    w = tls_wire(small_server)
    for i in range(6):
        w.send(b"x%d FROB\r\n" % i)
        assert w.line().startswith(b"x%d BAD" % i)
    assert w.line().startswith(b"* BYE")
    with pytest.raises((EOFError, OSError)):
        w.line()


def test_random_bytes_never_break_the_server(small_server: LiveServer) -> None:
    w = tls_wire(small_server)
    rnd = os.urandom(20000)
    w.send(rnd.replace(b"{", b"(") + b"\r\n")
    try:
        while True:
            w.line()
    except (EOFError, OSError):
        pass
    w2 = tls_wire(small_server)
    w2.send(b"a1 NOOP\r\n")
    assert w2.until_tag(b"a1")[-1].startswith(b"a1 OK")


def test_stuck_tls_handshake_does_not_stall_others(live_server: LiveServer) -> None:
    stuck = socket.create_connection(("127.0.0.1", live_server.port("imap", "implicit")))
    stuck.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # half a ClientHello
    try:
        start = time.monotonic()
        imap = imaplib.IMAP4_SSL("localhost", live_server.port("imap", "implicit"),
                                 ssl_context=live_server.client_context(), timeout=10)
        imap.login(USER, PASSWORD)
        imap.select("INBOX")
        imap.logout()
        assert time.monotonic() - start < 10
    finally:
        stuck.close()


def test_slow_reader_does_not_block_others(live_server: LiveServer) -> None:
    imap = imaplib.IMAP4_SSL("localhost", live_server.port("imap", "implicit"),
                             ssl_context=live_server.client_context(), timeout=30)
    imap.login(USER, PASSWORD)
    big = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 8000  # 8 MB
    imap.append("INBOX", None, None, big)
    imap.logout()
    slow = tls_wire(live_server)
    slow.send(b"a1 LOGIN " + USER.encode() + b" " + PASSWORD.encode() + b"\r\n")
    slow.until_tag(b"a1")
    slow.send(b"a2 SELECT INBOX\r\n")
    slow.until_tag(b"a2")
    slow.send(b"a3 FETCH 1 BODY.PEEK[]\r\n")  # and never read the answer
    time.sleep(0.2)
    other = imaplib.IMAP4_SSL("localhost", live_server.port("imap", "implicit"),
                              ssl_context=live_server.client_context(), timeout=10)
    other.login(USER, PASSWORD)
    typ, data = other.select("INBOX")
    assert typ == "OK"
    typ, data = other.fetch("1", "(RFC822.SIZE)")
    assert b"RFC822.SIZE %d" % len(big) in data[0]
    other.logout()
    # the slow one still gets its message when it reads at last
    got = b""
    slow.sock.settimeout(30)
    while len(got) < len(big):
        chunk = slow.sock.recv(1 << 20)
        assert chunk
        got += chunk
    assert big[:1000] in got


def test_per_account_connection_cap(small_server: LiveServer) -> None:
    clients = []
    try:
        for _ in range(3):
            imap = imaplib.IMAP4_SSL("localhost", small_server.port("imap", "implicit"),
                                     ssl_context=small_server.client_context(), timeout=10)
            imap.login(USER, PASSWORD)
            clients.append(imap)
        extra = imaplib.IMAP4_SSL("localhost", small_server.port("imap", "implicit"),
                                  ssl_context=small_server.client_context(), timeout=10)
        with pytest.raises(imaplib.IMAP4.error, match="LIMIT"):
            extra.login(USER, PASSWORD)
        extra.logout()
        clients.pop().logout()
        again = imaplib.IMAP4_SSL("localhost", small_server.port("imap", "implicit"),
                                  ssl_context=small_server.client_context(), timeout=10)
        again.login(USER, PASSWORD)
        clients.append(again)
    finally:
        for c in clients:
            c.logout()


def test_shutdown_says_bye(tmp_path: Path) -> None:
    live, thread = start_live_server(tmp_path / "data")
    w = tls_wire(live)
    w.send(b"a1 LOGIN " + USER.encode() + b" " + PASSWORD.encode() + b"\r\n")
    w.until_tag(b"a1")
    w.send(b"a2 SELECT INBOX\r\n")
    w.until_tag(b"a2")
    w.send(b"a3 IDLE\r\n")
    assert w.line().startswith(b"+ ")
    stop_live_server(live, thread)
    assert w.line().startswith(b"* BYE")


def test_inactivity_autologout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from postfach.imap import connection

    monkeypatch.setattr(connection, "MIN_TIMEOUT_SECONDS", 0)  # the real floor is 30 minutes
    live, thread = start_live_server(tmp_path / "data",
                                     limits=replace(LimitsConfig(), imap_idle_timeout_seconds=1))
    try:
        w = tls_wire(live)
        w.send(b"a1 NOOP\r\n")
        w.until_tag(b"a1")
        assert w.line() == b"* BYE Autologout; idle for too long"
        with pytest.raises((EOFError, OSError)):
            w.line()
    finally:
        stop_live_server(live, thread)


def test_starttls_and_implicit_tls_under_uvloop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Production runs uvloop: STARTTLS must not lose the client's handshake to the plain
    buffers (the session pauses reading before its OK)."""
    uvloop = pytest.importorskip("uvloop")
    import asyncio

    monkeypatch.setattr(asyncio, "new_event_loop", uvloop.new_event_loop)
    live, thread = start_live_server(tmp_path / "data")
    try:
        for _ in range(5):
            imap = imaplib.IMAP4("127.0.0.1", live.port("imap", "starttls"), timeout=10)
            imap.starttls(ssl_context=live.client_context())
            imap.login(USER, PASSWORD)
            imap.logout()
        imap2 = imaplib.IMAP4_SSL("localhost", live.port("imap", "implicit"),
                                  ssl_context=live.client_context(), timeout=10)
        imap2.login(USER, PASSWORD)
        imap2.logout()
    finally:
        stop_live_server(live, thread)
