"""COMPRESS=DEFLATE (RFC 4978) over real TLS: deflate both ways, the second COMPRESS refused,
a broken deflate stream ends the session with BYE (never a crash)."""

from __future__ import annotations

import socket
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import PASSWORD, USER, LiveServer


class Wire:
    def __init__(self, live: LiveServer) -> None:
        raw = socket.create_connection(("127.0.0.1", live.port("imap", "implicit")), timeout=30)
        self.sock = live.client_context().wrap_socket(raw, server_hostname="localhost")
        self.buf = b""
        self.inflate: zlib._Decompress | None = None
        self.deflate: zlib._Compress | None = None

    def send(self, data: bytes) -> None:
        if self.deflate is not None:
            data = self.deflate.compress(data) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += self.inflate.decompress(chunk) if self.inflate is not None else chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def until(self, tag: bytes) -> list[bytes]:
        out = []
        while True:
            line = self.line()
            out.append(line)
            if line.startswith(tag + b" "):
                return out


def _login(live: LiveServer) -> Wire:
    w = Wire(live)
    assert b"COMPRESS=DEFLATE" not in w.line()  # not before authentication
    w.send(f"a LOGIN {USER} {PASSWORD}\r\n".encode())
    assert b"COMPRESS=DEFLATE" in w.until(b"a")[-1]
    return w


def test_compress_deflate_both_ways(live_server: LiveServer) -> None:
    w = _login(live_server)
    w.send(b"b COMPRESS DEFLATE\r\n")
    assert w.until(b"b") == [b"b OK DEFLATE active"]
    w.inflate, w.deflate = zlib.decompressobj(-15), zlib.compressobj(6, zlib.DEFLATED, -15)
    w.send(b"c CAPABILITY\r\n")
    lines = w.until(b"c")
    assert lines[-1].startswith(b"c OK") and b"COMPRESS=DEFLATE" not in lines[0]
    w.send(b"d COMPRESS DEFLATE\r\n")
    assert w.until(b"d")[-1].startswith(b"d NO [COMPRESSIONACTIVE]")
    body = b"Subject: squeeze\r\n\r\n" + b"hello compressed world\r\n" * 200
    w.send(b"e APPEND INBOX {%d+}\r\n" % len(body) + body + b"\r\n")
    assert w.until(b"e")[-1].startswith(b"e OK [APPENDUID")
    w.send(b"f SELECT INBOX\r\ng FETCH 1 BODY.PEEK[]\r\n")
    w.until(b"f")
    got = w.until(b"g")
    assert got[0] == b"* 1 FETCH (BODY[] {%d}" % len(body)
    w.send(b"h LOGOUT\r\n")
    assert w.until(b"h")[-1].startswith(b"h OK")


def test_broken_deflate_stream_gets_bye(live_server: LiveServer) -> None:
    w = _login(live_server)
    w.send(b"b COMPRESS DEFLATE\r\n")
    assert w.until(b"b") == [b"b OK DEFLATE active"]
    w.inflate = zlib.decompressobj(-15)
    w.sock.sendall(b"\xff\xff\xff\xff garbage that is no deflate stream")
    assert w.line().startswith(b"* BYE")
    assert w.sock.recv(100) == b""
    # The server is fine: a new session works.
    w2 = _login(live_server)
    w2.send(b"z LOGOUT\r\n")
    assert w2.until(b"z")[-1].startswith(b"z OK")
