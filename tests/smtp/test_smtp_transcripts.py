"""Plays every tests/transcripts/smtp/*.txt against session.py (through ``Conversation``, no socket)
and the real SQLite store.

Format (one item per line; '#' starts a comment line):
  @listener <submission|mx> <starttls|implicit|none>   (default: submission starttls)
  @remote <ip>                          the client's address (default 127.0.0.1)
  @config section.key = <python literal>
  @setup quota <address> <bytes>        set an account's storage quota
  C: <line>                             the client sends the line plus CRLF
  R: <python bytes expression>          the client sends exactly these bytes (b"x" * 9 allowed)
  S: <line>                             the next reply line; {{regex}} holes
  A: count <address> <mailbox> <n>      the mailbox holds n messages
  A: last <address> <mailbox> <regex>   the newest message there matches (re.S, UTF-8)
  A: queue <n>                          the outbound queue holds n items
  A: queue-rcpts <addr,addr>            recipients of the newest queue item
  A: closed                             the session asked to close
A STARTTLS step is simulated: pipelined bytes are discarded and the session is told TLS is up.
Files with an ``@socket`` line are also played over a loopback socket through connection.py, with
a real TLS upgrade after "220 2.0.0 Ready to start TLS".
"""

from __future__ import annotations

import ast
import asyncio
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.smtp.smtp_helpers import Env, conninfo, make_env, serve

from postfach.smtp.session import Conversation, Peer

TRANSCRIPTS = Path(__file__).resolve().parent.parent / "transcripts" / "smtp"
FILES = sorted(TRANSCRIPTS.glob("*.txt"))


def _match(pattern: str, line: str) -> bool:
    parts = re.split(r"\{\{(.*?)\}\}", pattern)
    rx = "".join(re.escape(p) if i % 2 == 0 else f"(?:{p})" for i, p in enumerate(parts))
    return re.fullmatch(rx, line) is not None


class Player:
    def __init__(self, env: Env, conv: Conversation, name: str) -> None:
        self.env = env
        self.conv = conv
        self.name = name
        self.pending: list[str] = []
        self.closed = False

    async def send(self, data: bytes) -> None:
        assert not self.closed, f"{self.name}: client sends after the server closed"
        self.conv.feed(data)
        while True:
            step = await self.conv.next()
            if step is None:
                break
            self.pending += step.data.decode("utf-8", "replace").split("\r\n")[:-1]
            if step.starttls:
                self.conv.receiver.reset()
                self.conv.session.tls_started("TLSv1.3 with cipher TEST (256/256 bits)")
            if step.close:
                self.closed = True
                break

    async def is_closed(self) -> bool:
        return self.closed

    async def expect_async(self, pattern: str, lineno: int) -> None:
        self.expect(pattern, lineno)

    def expect(self, pattern: str, lineno: int) -> None:
        assert self.pending, f"{self.name}:{lineno}: expected {pattern!r}, server sent nothing more"
        got = self.pending.pop(0)
        assert _match(pattern, got), f"{self.name}:{lineno}: expected {pattern!r}, got {got!r}"


async def _assert(env: Env, player: Player | SocketPlayer, arg: str, lineno: int) -> None:
    word, _, rest = arg.partition(" ")
    where = f"{player.name}:{lineno}"
    if word == "count":
        addr, mailbox, n = rest.split()
        got = len(await env.messages(addr, mailbox))
        assert got == int(n), f"{where}: {addr} {mailbox} holds {got}, expected {n}"
    elif word == "last":
        addr, mailbox, rx = rest.split(" ", 2)
        msgs = await env.messages(addr, mailbox)
        assert msgs, f"{where}: {addr} {mailbox} is empty"
        text = msgs[-1].decode("utf-8", "surrogateescape")
        assert re.search(rx, text, re.S), f"{where}: /{rx}/ not in {text[:600]!r}"
    elif word == "queue":
        items = await env.store.queue_list()
        assert len(items) == int(rest), f"{where}: queue holds {len(items)}, expected {rest}"
    elif word == "queue-rcpts":
        items = await env.store.queue_list()
        assert items, f"{where}: queue is empty"
        rcpts = sorted(r.address for r in items[-1].recipients)
        assert rcpts == sorted(rest.split(",")), f"{where}: queue recipients {rcpts}"
    else:
        raise AssertionError(f"{where}: unknown assertion {arg!r}")


@dataclass
class Script:
    overrides: dict[str, object]
    protocol: str
    tls: str
    remote: str
    setup: list[str]
    body: list[tuple[int, str]]


def load(path: Path) -> Script:
    lines = path.read_text(encoding="utf-8").splitlines()
    script = Script({}, "submission", "starttls", "127.0.0.1", [], [])
    in_header = True
    for n, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith("#"):
            continue
        if in_header and line.startswith("@"):
            if line.startswith("@config "):
                key, _, value = line[8:].partition("=")
                script.overrides[key.strip()] = ast.literal_eval(value.strip())
            elif line.startswith("@listener "):
                script.protocol, script.tls = line.split()[1:3]
            elif line.startswith("@remote "):
                script.remote = line.split()[1]
            elif line.startswith("@setup "):
                script.setup.append(line)
            continue
        in_header = False
        script.body.append((n, line))
    return script


async def _setup(env: Env, script: Script) -> None:
    for line in script.setup:
        if line.startswith("@setup quota "):
            addr, size = line.split()[2:4]
            acct = await env.store.get_account(addr)
            assert acct is not None
            await env.store.set_quota(acct.id, int(size), None)


async def _play(env: Env, player: Player | SocketPlayer, script: Script, name: str) -> None:
    for n, line in script.body:
        tag, _, arg = line.partition(": ")
        if tag == "C":
            await player.send(arg.encode("utf-8") + b"\r\n")
        elif tag == "R":
            raw = eval(arg, {"__builtins__": {}})  # test data: bytes literals, + and *
            assert isinstance(raw, bytes)
            await player.send(raw)
        elif tag == "S":
            await player.expect_async(arg, n)
        elif tag == "A":
            if arg == "closed":
                assert await player.is_closed(), f"{name}:{n}: session still open"
            else:
                await _assert(env, player, arg, n)
        else:
            raise AssertionError(f"{name}:{n}: bad line {line!r}")


@pytest.mark.asyncio
@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
async def test_transcript(path: Path, tmp_path: Path) -> None:
    script = await asyncio.to_thread(load, path)
    env = await make_env(tmp_path, script.overrides)
    try:
        await _setup(env, script)
        conn = conninfo(script.protocol, script.tls, script.remote, tls_active=script.tls == "implicit")
        tls_info = "TLSv1.3 with cipher TEST (256/256 bits)" if conn.tls_active else None
        peer = Peer(script.remote, script.tls, conn.tls_active, tls_info)
        conv = Conversation.create(env.ctx, peer, script.protocol)
        player = Player(env, conv, path.name)
        player.pending += conv.greeting().decode().split("\r\n")[:-1]
        await _play(env, player, script, path.name)
        assert not player.pending, f"{path.name}: unexpected server lines {player.pending}"
    finally:
        await env.store.close()


class SocketPlayer:
    """The same script over a loopback socket through connection.py (real STARTTLS)."""

    def __init__(self, env: Env, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str) -> None:
        self.env = env
        self.reader = reader
        self.writer = writer
        self.name = name
        self.closed = False

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def expect_async(self, pattern: str, lineno: int) -> None:
        raw = await asyncio.wait_for(self.reader.readline(), 20)
        assert raw.endswith(b"\r\n"), f"{self.name}:{lineno}: expected {pattern!r}, connection gave {raw!r}"
        got = raw[:-2].decode("utf-8", "replace")
        assert _match(pattern, got), f"{self.name}:{lineno}: expected {pattern!r}, got {got!r}"
        if got.startswith("220 2.0.0 Ready to start TLS"):
            await self.writer.start_tls(self.env.client_tls, server_hostname="localhost")

    async def is_closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), 20) == b""


SOCKET_FILES = [p for p in FILES if "@socket" in p.read_text(encoding="utf-8")]


@pytest.mark.asyncio
@pytest.mark.parametrize("path", SOCKET_FILES, ids=[p.stem for p in SOCKET_FILES])
async def test_transcript_over_socket(path: Path, tmp_path: Path) -> None:
    script = await asyncio.to_thread(load, path)
    env = await make_env(tmp_path, script.overrides)
    try:
        await _setup(env, script)
        async with serve(env, script.protocol, script.tls, remote_ip=script.remote) as port:
            ssl_ctx = env.client_tls if script.tls == "implicit" else None
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ssl_ctx, server_hostname="localhost" if ssl_ctx else None
            )
            player = SocketPlayer(env, reader, writer, path.name)
            try:
                await _play(env, player, script, path.name)
            finally:
                writer.close()
    finally:
        await env.store.close()
