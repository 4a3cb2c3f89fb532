"""RETR/TOP byte-exactness over real TLS sockets on every path of the streaming code: messages the
store knows need no stuffing (sent as they are, in slices), messages with dot-lines, with bare
LFs, without a final line end, blobs without wire bits (rows from before schema version 3), and
multi-MiB messages that span several blob reads and write slices."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import sys
from pathlib import Path

import pytest
from tests import backends

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pop3_helpers import PASSWORD, USER, make_env, serve

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024


def expected_body(data: bytes) -> bytes:
    """RFC 1939 §3 multi-line body of ``data``, computed independently of postfach's filters:
    bare LF to CRLF (§11), a final line end, dot-stuffing, the terminating dot."""
    norm = re.sub(rb"(?<!\r)\n", b"\r\n", data)
    if norm and not norm.endswith(b"\r\n"):
        norm += b"\r\n"
    stuffed = (b"\r\n" + norm).replace(b"\r\n.", b"\r\n..")[2:]
    return stuffed + b".\r\n"


def _big(lines: int, dots: bool) -> bytes:
    out = [b"Subject: big\r\n\r\n"]
    for i in range(lines):
        lead = b"." * (i % 3) if dots else b""
        out.append(lead + b"%07d " % i + b"z" * (i % 120) + b"\r\n")
    return b"".join(out)


MESSAGES = [
    b"Subject: plain\r\n\r\nno dots, CRLF only\r\n",
    b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\nmid.dle\r\n.\r\n",
    b"Subject: bare\n\nbare LF lines\n.dot after bare LF\nlast",
    b"Subject: no end\r\n\r\nwithout a final CRLF",
    _big(60_000, dots=False),  # ~3.7 MiB: several blob reads, many write slices, no scan at all
    _big(40_000, dots=True),  # ~2.5 MiB with dot-lines across chunk boundaries
]


class Client:
    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.buf = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise EOFError(self.buf[:200])
        self.buf += chunk

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def body(self) -> bytes:
        """Everything up to and including the terminating dot line."""
        while True:
            if self.buf.startswith(b".\r\n"):
                end = 3
                break
            i = self.buf.find(b"\r\n.\r\n")
            if i >= 0:
                end = i + 5
                break
            self._fill()
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def cmd(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.line()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("forget_wire_bits", [False, True], ids=["wire-bits", "scanned"])
async def test_retr_and_top_are_byte_exact(tmp_path: Path, forget_wire_bits: bool) -> None:
    env = await make_env(tmp_path)
    try:
        for data in MESSAGES:
            await env.append(data)
        if forget_wire_bits:
            await backends.execute_sql(tmp_path / "store", "UPDATE blob SET wire = NULL")
        async with serve(env, implicit_tls=True) as port:

            def client() -> tuple[list[bytes], list[bytes], list[bytes]]:
                c = Client(port, env.client_tls)
                try:
                    assert c.line().startswith(b"+OK")
                    assert c.cmd(f"USER {USER}").startswith(b"+OK")
                    assert c.cmd(f"PASS {PASSWORD}").startswith(b"+OK")
                    retr, top, status = [], [], []
                    for i in range(1, len(MESSAGES) + 1):
                        status.append(c.cmd(f"RETR {i}"))
                        retr.append(c.body())
                        assert c.cmd(f"TOP {i} 1").startswith(b"+OK")
                        top.append(c.body())
                    assert c.cmd("QUIT").startswith(b"+OK")
                    return retr, top, status
                finally:
                    c.close()

            retr, top, status = await asyncio.to_thread(client)
        for data, got, st in zip(MESSAGES, retr, status, strict=True):
            assert st == b"+OK %d octets" % len(data)
            assert got == expected_body(data)
        for data, got in zip(MESSAGES, top, strict=True):
            head, sep, body = data.replace(b"\r\n", b"\n").partition(b"\n\n")
            first = body.split(b"\n", 1)[0] if body else b""
            assert got == expected_body(head + sep + first + (b"\n" if body else b""))
    finally:
        await env.store.close()
