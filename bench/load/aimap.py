"""Asyncio load clients for many concurrent connections (IMAP, POP3, SMTP) over real TLS.

They speak only what every IMAP4rev1 / POP3 / ESMTP server understands, so the same load runs
against postfach and against Dovecot (``bench/compare_dovecot.py``). Latencies are measured per
command, from the write to the tagged / final reply.
"""

from __future__ import annotations

import asyncio
import base64
import random
import ssl
import time
from dataclasses import dataclass, field

USER_MESSAGES = 200


def bench_message(i: int, who: str, size: int = 2400, sender: str | None = None) -> bytes:
    head = (
        f"From: Sender {i % 97} <{sender or f'sender{i % 97}@example.com'}>\r\nTo: {who}\r\n"
        f"Subject: Report {i} about topic {i % 1000}\r\nDate: Mon, 01 Jan 2024 10:{i % 60:02d}:00 +0000\r\n"
        f"Message-ID: <bench{i}.{who}>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    line = f"Hello, this is message {i}, with some text to search in.\r\n"
    return (head + line * max(1, (size - len(head)) // len(line))).encode()


async def open_tls(host: str, port: int, ctx: ssl.SSLContext, attempts: int = 6,
                   timeout: float = 15.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect with TLS, retrying a handshake the server dropped (busy past its handshake timeout)."""
    last: BaseException | None = None
    for _ in range(attempts):
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ctx, server_hostname="localhost", limit=1 << 22), timeout
            )
        except (ssl.SSLError, TimeoutError, ConnectionResetError) as e:
            last = e
            await asyncio.sleep(0.1 + random.random() * 0.3)
    assert last is not None
    raise last


class ImapClient:
    def __init__(self) -> None:
        self.n = 0
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter
        self.exists = 0

    async def connect(self, host: str, port: int, ctx: ssl.SSLContext) -> None:
        self.reader, self.writer = await open_tls(host, port, ctx)
        await self.reader.readline()

    async def cmd(self, text: str, literal: bytes | None = None) -> list[bytes]:
        """Send a command (a LITERAL+ literal at the end if given); the untagged lines and the tagged one."""
        self.n += 1
        tag = b"t%d" % self.n
        line = tag + b" " + text.encode()
        if literal is not None:
            line += b" {%d+}\r\n" % len(literal) + literal
        self.writer.write(line + b"\r\n")
        out: list[bytes] = []
        while True:
            ln = await self.reader.readline()
            if not ln:
                raise EOFError(text)
            if ln.endswith(b"}\r\n"):
                k = ln.rfind(b"{")
                if k >= 0 and ln[k + 1 : -3].isdigit():
                    await self.reader.readexactly(int(ln[k + 1 : -3]))
                    continue
            if ln.startswith(b"* ") and ln.rstrip().endswith(b" EXISTS"):
                self.exists = int(ln.split()[1])
            elif ln.startswith(b"* ") and ln.rstrip().endswith(b" EXPUNGE"):
                self.exists -= 1
            if ln.startswith(tag + b" "):
                if not ln.startswith(tag + b" OK"):
                    raise RuntimeError(f"{text[:60]!r}: {ln[:200]!r}")
                out.append(ln)
                return out
            out.append(ln)

    async def close(self) -> None:
        try:
            self.writer.write(b"z LOGOUT\r\n")
            await asyncio.wait_for(self.writer.drain(), 2)
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except Exception:
            pass


@dataclass
class Latencies:
    ops: dict[str, list[float]] = field(default_factory=dict)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def add(self, op: str, seconds: float) -> None:
        self.ops.setdefault(op, []).append(seconds)

    def all(self) -> list[float]:
        return [x for v in self.ops.values() for x in v]


MIX = ["fetch_headers"] * 4 + ["fetch_body"] * 3 + ["store"] * 3 + ["search"] * 2 + ["select", "append"] + ["noop"] * 2


async def imap_mixed_client(idx: int, host: str, port: int, ctx: ssl.SSLContext, user: str, password: str,
                            ready: asyncio.Barrier | None, seconds: float, lat: Latencies) -> None:
    """What a desktop client does, in a loop: header and body fetches, flag changes, searches,
    re-SELECT, and an APPEND followed by deleting one message (so the mailbox keeps its size)."""
    rng = random.Random(idx)
    c = ImapClient()
    await c.connect(host, port, ctx)
    await c.cmd(f'LOGIN "{user}" "{password}"')
    await c.cmd("SELECT INBOX")
    if ready is not None:
        await ready.wait()
    stop = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < stop:
        op = rng.choice(MIX)
        total = max(c.exists, 1)
        t = time.perf_counter()
        try:
            if op == "select":
                await c.cmd("SELECT INBOX")
            elif op == "fetch_headers":
                lo = rng.randint(1, max(1, total - 19))
                await c.cmd(f"FETCH {lo}:{min(total, lo + 19)} (UID FLAGS RFC822.SIZE "
                            "BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE MESSAGE-ID)])")
            elif op == "fetch_body":
                await c.cmd(f"FETCH {rng.randint(1, total)} (BODY.PEEK[])")
            elif op == "store":
                await c.cmd(f"STORE {rng.randint(1, total)} {rng.choice('+-')}FLAGS (\\Seen)")
            elif op == "search":
                await c.cmd(rng.choice(["UID SEARCH UNSEEN", "SEARCH FLAGGED", "UID SEARCH SINCE 1-Jan-2020"]))
            elif op == "append":
                n += 1
                await c.cmd("APPEND INBOX", bench_message(1_000_000 + idx * 100_000 + n, user))
                await c.cmd("STORE 1 +FLAGS.SILENT (\\Deleted)")
                await c.cmd("EXPUNGE")
            else:
                await c.cmd("NOOP")
        except RuntimeError as e:
            lat.errors += 1
            if len(lat.error_samples) < 5:
                lat.error_samples.append(str(e))
        lat.add(op, time.perf_counter() - t)
    await c.close()


async def imap_load(host: str, port: int, cafile: str, users: list[str], password: str, clients: int,
                    seconds: float, first: int = 0) -> dict[str, object]:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = False
    lat = Latencies()
    ready = asyncio.Barrier(clients)
    t0 = time.perf_counter()
    await asyncio.gather(*(
        imap_mixed_client(first + i, host, port, ctx, users[(first + i) % len(users)], password, ready, seconds, lat)
        for i in range(clients)
    ))
    return {"ops": lat.ops, "errors": lat.errors, "error_samples": lat.error_samples,
            "wall": time.perf_counter() - t0}


async def pop3_client(host: str, port: int, ctx: ssl.SSLContext, user: str, password: str, stop: float,
                      lat: Latencies, rng: random.Random) -> int:
    """Sessions of a leave-mail-on-server POP3 client: login, STAT, UIDL, RETR a few, QUIT."""
    octets = 0
    while time.perf_counter() < stop:
        t = time.perf_counter()
        reader, writer = await open_tls(host, port, ctx)

        async def line(reader: asyncio.StreamReader = reader) -> bytes:
            ln = await reader.readline()
            if not ln.startswith(b"+OK"):
                raise RuntimeError(ln[:200])
            return ln

        async def multi(reader: asyncio.StreamReader = reader) -> int:
            size = 0
            while True:
                ln = await reader.readline()
                if ln in (b".\r\n", b""):
                    return size
                size += len(ln)

        await line()
        writer.write(f"USER {user}\r\nPASS {password}\r\nSTAT\r\nUIDL\r\n".encode())
        await line()
        await line()
        stat = await line()
        count = int(stat.split()[1])
        await line()
        await multi()
        for _ in range(5):
            writer.write(b"RETR %d\r\n" % rng.randint(1, max(1, count)))
            await line()
            octets += await multi()
        writer.write(b"QUIT\r\n")
        await line()
        writer.close()
        lat.add("session", time.perf_counter() - t)
    return octets


async def pop3_load(host: str, port: int, cafile: str, users: list[str], password: str, clients: int,
                    seconds: float) -> dict[str, object]:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = False
    lat = Latencies()
    stop = time.perf_counter() + seconds
    octets = await asyncio.gather(*(
        pop3_client(host, port, ctx, users[i % len(users)], password, stop, lat, random.Random(i))
        for i in range(clients)
    ))
    return {"ops": lat.ops, "octets": sum(octets), "errors": lat.errors}


async def smtp_client(host: str, port: int, ctx: ssl.SSLContext, user: str, password: str, rcpts: list[str],
                      stop: float, lat: Latencies, idx: int) -> None:
    """Submission with AUTH PLAIN over implicit TLS, PIPELINING MAIL/RCPT/DATA (RFC 2920)."""
    reader, writer = await open_tls(host, port, ctx)

    async def reply() -> bytes:
        while True:
            ln = await reader.readline()
            if not ln:
                raise EOFError("closed")
            if ln[3:4] != b"-":
                return ln

    await reply()
    auth = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    writer.write(f"EHLO bench.example\r\nAUTH PLAIN {auth}\r\n".encode())
    await reply()
    if not (await reply()).startswith(b"235"):
        raise RuntimeError("AUTH failed")
    n = 0
    while time.perf_counter() < stop:
        n += 1
        rcpt = rcpts[(idx + n) % len(rcpts)]
        t = time.perf_counter()
        writer.write(f"MAIL FROM:<{user}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
        for _ in range(3):
            await reply()
        writer.write(bench_message(idx * 1_000_000 + n, rcpt, 4096, sender=user) + b".\r\n")
        answer = await reply()
        if answer.startswith(b"250"):
            lat.add("deliver", time.perf_counter() - t)
        else:
            lat.errors += 1
            if len(lat.error_samples) < 5:
                lat.error_samples.append(answer.decode(errors="replace").strip())
    writer.write(b"QUIT\r\n")
    writer.close()


async def smtp_load(host: str, port: int, cafile: str, user: str, password: str, rcpts: list[str],
                    connections: int, seconds: float) -> dict[str, object]:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = False
    lat = Latencies()
    stop = time.perf_counter() + seconds
    await asyncio.gather(*(smtp_client(host, port, ctx, user, password, rcpts, stop, lat, i)
                           for i in range(connections)))
    return {"ops": lat.ops, "errors": lat.errors, "error_samples": lat.error_samples}


async def load_mailbox(host: str, port: int, cafile: str, user: str, password: str, count: int,
                       start: int = 0, batch: int = 50) -> None:
    """Fill a mailbox over IMAP (APPEND with LITERAL+, pipelined in batches): works on any server."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = False
    c = ImapClient()
    await c.connect(host, port, ctx)
    await c.cmd(f'LOGIN "{user}" "{password}"')
    i = start
    while i < start + count:
        n = min(batch, start + count - i)
        tags = []
        for k in range(n):
            c.n += 1
            tag = b"t%d" % c.n
            tags.append(tag)
            data = bench_message(i + k, user)
            flags = "(\\Seen)" if (i + k) % 3 else "()"
            c.writer.write(tag + b" APPEND INBOX " + flags.encode() + b" {%d+}\r\n" % len(data) + data + b"\r\n")
        done = 0
        while done < n:
            ln = await c.reader.readline()
            if not ln:
                raise EOFError("APPEND")
            if ln.split(b" ", 1)[0] in tags:
                if ln.split(b" ", 2)[1:2] != [b"OK"]:
                    raise RuntimeError(ln[:200])
                done += 1
        i += n
    await c.close()
