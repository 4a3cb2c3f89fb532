"""Plays every tests/transcripts/imap/*.txt against session.py and the real SQLite store.

Format (one item per line; lines starting with '#' are comments, blank lines are ignored):
  @remote <ip>                 the client's address (default 127.0.0.1, a cleartext network)
  @tls                         the connection is TLS-protected (default: plaintext on 143)
  @message <mailbox> <i> [flags...]   append imap_helpers.message(i) through the store
  @config limits.<key> = <int> configuration override (before the first C line)
  @config imap.<key> = <int|"text">  the same for [imap]
  @quota <bytes> <messages>    the account's quota
  C<k>: <line>                 session k receives the line (CRLF appended; literals count it)
  S<k>: <line>                 the next line session k sent; {{regex}} holes
  S<k>: <EOF>                  session k has ended (LOGOUT / BYE)
  {{=name}} in an S line captures a word (letters, digits, -); ${name} in a later line puts it in
Every line a session sends must be matched before its next C line and at the end.
"""

from __future__ import annotations

import re
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imap_helpers import Env, conninfo, make_env, message

from postfach.config import ImapConfig
from postfach.imap.counts import AccountCounts
from postfach.imap.receiver import NeedContinuation, NeedData, Receiver, Rejected, Request
from postfach.imap.session import Next, Session

TRANSCRIPTS = Path(__file__).resolve().parent.parent / "transcripts" / "imap"
FILES = sorted(TRANSCRIPTS.glob("*.txt"))


class ListSink:
    def __init__(self) -> None:
        self.data = bytearray()

    async def write(self, data: bytes) -> None:
        self.data += data


class Peer:
    def __init__(self, env: Env, remote: str, tls: bool) -> None:
        self.sink = ListSink()
        self.session = Session(env.ctx, conninfo("starttls", remote, tls_active=tls), self.sink,
                               account_connections=AccountCounts())
        self.receiver = Receiver(env.ctx.config.limits.max_line_bytes,
                                 env.ctx.config.limits.max_literal_bytes)
        self.mode = Next.CONTINUE
        self.ended = False
        self.sink.data += self.session.greeting()

    async def feed(self, line: bytes) -> None:
        self.receiver.feed(line + b"\r\n")
        while not self.ended:
            if self.mode is Next.SASL:
                got = self.receiver.read_line()
                if got is None:
                    return
                self.mode = await self.session.sasl_line(got)
                continue
            if self.mode is Next.IDLE:
                got = self.receiver.read_line()
                if got is None:
                    return
                self.mode = await self.session.idle_done(got)
                continue
            ev = self.receiver.next_event()
            if isinstance(ev, NeedData):
                return
            if isinstance(ev, NeedContinuation):
                self.sink.data += b"+ Ready for literal data\r\n"
                continue
            if isinstance(ev, Rejected):
                nxt = await self.session.rejected(ev.tag, ev.code, ev.text, ev.no)
            else:
                assert isinstance(ev, Request)
                nxt = await self.session.execute(ev.raw)
            if nxt is Next.LOGOUT:
                self.ended = True
            elif nxt is Next.STARTTLS:
                await self.session.starttls_ready()
                self.receiver.reset()
                self.session.tls_started()
            else:
                self.mode = nxt

    async def lines(self) -> list[bytes]:
        if self.mode is Next.IDLE:
            await self.session.idle_update()
        out = [bytes(x) for x in self.sink.data.split(b"\r\n")]
        rest = out.pop()
        self.sink.data = bytearray(rest)
        return out


def expected_regex(text: str) -> re.Pattern[str]:
    parts = re.split(r"\{\{(.*?)\}\}", text)
    rx = "".join((f"(?P<{p[1:]}>[\\w-]+)" if p.startswith("=") else p) if i % 2 else re.escape(p)
                 for i, p in enumerate(parts))
    return re.compile(rx + r"\Z")


async def play(path: Path, tmp_path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()  # noqa: ASYNC240 - a small test file
    remote, tls = "127.0.0.1", False
    limits: dict[str, int] = {}
    imap: dict[str, int | str] = {}
    setup: list[list[str]] = []
    quota: tuple[int, ...] | None = None
    for line in lines:
        if line.startswith("@remote "):
            remote = line.split()[1]
        elif line.strip() == "@tls":
            tls = True
        elif line.startswith("@config limits."):
            key, _, value = line[len("@config limits."):].partition("=")
            limits[key.strip()] = int(value)
        elif line.startswith("@config imap."):
            key, _, value = line[len("@config imap."):].partition("=")
            value = value.strip()
            imap[key.strip()] = value.strip('"') if value.startswith('"') else int(value)
        elif line.startswith("@message "):
            setup.append(line.split()[1:])
        elif line.startswith("@quota "):
            quota = tuple(int(x) for x in line.split()[1:3])
    env = await make_env(tmp_path, limits=limits, imap=replace(ImapConfig(), **imap))
    try:
        if quota is not None:
            await env.store.set_quota(env.account_id, quota[0], quota[1])
        for args in setup:
            mb = await env.store.get_mailbox(env.account_id, args[0])
            assert mb is not None, args
            when = datetime(2024, 1, 1 + int(args[1]) % 28, 12, 0, tzinfo=UTC)
            await env.store.append(env.account_id, mb.id, message(int(args[1])),
                                   frozenset(args[2:]), when)
        peers: dict[str, Peer] = {}
        pending: dict[str, list[bytes]] = {}

        def peer(k: str) -> Peer:
            if k not in peers:
                peers[k] = Peer(env, remote, tls)
                pending[k] = []
            return peers[k]

        async def collect(k: str) -> list[bytes]:
            p = peer(k)
            pending[k].extend(await p.lines())
            return pending[k]

        variables: dict[str, str] = {}
        for no, line in enumerate(lines, 1):
            m = re.match(r"([CS])(\d+): ?(.*)\Z", line)
            if not m:
                continue
            kind, k, text = m.groups()
            where = f"{path.name}:{no}"
            if kind == "C":
                got = await collect(k)
                assert not got, f"{where}: unexpected output from session {k}: {got!r}"
                text = re.sub(r"\$\{(\w+)\}", lambda v: variables[v.group(1)], text)
                await peer(k).feed(text.encode("utf-8"))
            else:
                got = await collect(k)
                if text == "<EOF>":
                    assert peer(k).ended, f"{where}: session {k} has not ended"
                    continue
                assert got, f"{where}: session {k} sent nothing, expected {text!r}"
                actual = got.pop(0).decode("utf-8", "replace")
                text = re.sub(r"\$\{(\w+)\}", lambda v: variables[v.group(1)], text)
                hit = expected_regex(text).match(actual)
                assert hit, f"{where}: expected {text!r}, got {actual!r}"
                variables.update(hit.groupdict())
        for k in peers:
            got = await collect(k)
            assert not got, f"{path.name}: unmatched output from session {k}: {got!r}"
            await peers[k].session.close()
    finally:
        await env.store.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
async def test_transcript(path: Path, tmp_path: Path) -> None:
    await play(path, tmp_path)
