"""Plays every tests/transcripts/pop3/*.txt against session.py and the real SQLite store.

Format (one item per line; '#' starts a comment line):
  @config section.key = <python literal>   config override (before the first C line)
  @remote <ip>                             the client's address (default 127.0.0.1)
  @tls                                     the connection is TLS-protected
  @messages <n>                            n standard messages in INBOX (pop3_helpers.message)
  C<k>: <line>                             session k (1, 2, ...) receives the command line
  S<k>: <line>                             the next line session k sent; {{regex}} holes,
                                           ${size:N} = size of message N, ${uidl:N} = UIDL of UID N
  A: expunge <uid>...                      remove messages through the store (as IMAP would)
  A: deliver <i>                           append pop3_helpers.message(i) to INBOX
  A: flags <uid> <flag> / A: noflag <uid> <flag> / A: count <n>   assertions on the store
  A: drop <k>                              session k's connection drops (no QUIT)
  A: disable-account                       mark the test account disabled
  A: store-down                            close the store: later store calls fail
  A: end <k>                               session k must have ended (want_close)
"""

from __future__ import annotations

import ast
import asyncio
import re
import sys
from pathlib import Path

import pytest
from tests import backends

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pop3_helpers import Env, conninfo, make_env, message

from postfach.pop3.responses import DotStuffer, MessageBody, TopFilter, serialise
from postfach.pop3.session import Session, uidl_for
from postfach.types import Uid, UidValidity

TRANSCRIPTS = Path(__file__).resolve().parent.parent / "transcripts" / "pop3"
FILES = sorted(TRANSCRIPTS.glob("*.txt"))


async def render(session: Session, response: object) -> bytes:
    if isinstance(response, MessageBody):
        blob = response.blob
        data = await blob.read(0, blob.size)
        await blob.close()
        if response.top_lines is not None:
            data = TopFilter(response.top_lines).feed(data)
        stuffer = DotStuffer()
        out = b"+OK " + response.status.text.encode() + b"\r\n" + stuffer.feed(data) + stuffer.finish()
        session.message_sent(response)
        return out
    return serialise(response)  # type: ignore[arg-type]


class Player:
    def __init__(self, env: Env, remote: str, tls: bool, sizes: dict[int, int], store_path: Path) -> None:
        self.env = env
        self.store_path = store_path
        self.store_closed = False
        self.uidvalidity: UidValidity | None = None
        self.remote = remote
        self.tls = tls
        self.sizes = sizes
        self.sessions: dict[str, Session] = {}
        self.pending: dict[str, list[bytes]] = {}

    async def close(self) -> None:
        for s in self.sessions.values():
            await s.close()
        if not self.store_closed:
            await self.env.store.close()

    def session(self, k: str) -> Session:
        if k not in self.sessions:
            s = Session(self.env.ctx, conninfo("starttls", self.remote, tls_active=self.tls))
            self.sessions[k] = s
            self.pending[k] = serialise(s.greeting()).split(b"\r\n")[:-1]
        return self.sessions[k]

    async def expected_regex(self, text: str) -> re.Pattern[str]:
        if self.uidvalidity is None:
            mb = await self.env.store.get_mailbox_by_id(self.env.account_id, self.env.inbox_id)
            assert mb is not None
            self.uidvalidity = UidValidity(mb.uidvalidity)
        uidvalidity = self.uidvalidity

        def subst(m: re.Match[str]) -> str:
            kind, n = m.group(1), int(m.group(2))
            if kind == "size":
                return str(self.sizes[n])
            return uidl_for(uidvalidity, Uid(n))

        text = re.sub(r"\$\{(size|uidl):(\d+)\}", subst, text)
        parts = re.split(r"\{\{(.*?)\}\}", text)
        pattern = "".join(p if i % 2 else re.escape(p) for i, p in enumerate(parts))
        return re.compile(pattern)

    async def run(self, lines: list[tuple[int, str]]) -> None:
        for lineno, raw in lines:
            where = f"line {lineno}: {raw}"
            tag, _, rest = raw.partition(":")
            rest = rest[1:] if rest.startswith(" ") else rest
            if tag.startswith("C"):
                k = tag[1:]
                s = self.session(k)
                assert not self.pending[k], f"{where}: unread output {self.pending[k]!r}"
                resp = await s.handle_line(rest.encode())
                out = await render(s, resp)
                self.pending[k] = out.split(b"\r\n")[:-1]
            elif tag.startswith("S"):
                k = tag[1:]
                self.session(k)
                assert self.pending[k], f"{where}: the session sent nothing more"
                got = self.pending[k].pop(0).decode("utf-8", "replace")
                rx = await self.expected_regex(rest)
                assert rx.fullmatch(got), f"{where}: got {got!r}"
            elif tag == "A":
                await self.action(rest.split(), where)
            else:
                raise AssertionError(f"{where}: bad transcript line")
        for k, left in self.pending.items():
            assert not left, f"session {k}: unread output at the end {left!r}"

    async def action(self, words: list[str], where: str) -> None:
        env = self.env
        match words:
            case ["expunge", *uids]:
                await env.store.delete_messages(env.account_id, env.inbox_id, [Uid(int(u)) for u in uids])
            case ["deliver", i]:
                uid = await env.append(message(int(i)))
                self.sizes[uid] = len(message(int(i)))
            case ["flags" | "noflag" as what, uid, flag]:
                metas = await env.store.get_messages(env.account_id, env.inbox_id, [Uid(int(uid))])
                assert metas, f"{where}: no message {uid}"
                has = flag.lower() in {f.lower() for f in metas[0].flags}
                assert has == (what == "flags"), f"{where}: flags are {set(metas[0].flags)}"
            case ["count", n]:
                metas = await env.store.list_messages(env.account_id, env.inbox_id)
                assert len(metas) == int(n), f"{where}: {len(metas)} messages"
            case ["drop", k]:
                await self.sessions[k].close()
                self.pending[k] = []
                del self.sessions[k]
            case ["disable-account"]:
                # No Store API disables an account yet (an operator does it in the database).
                await backends.execute_sql(
                    self.store_path, f"UPDATE account SET disabled = TRUE WHERE id = {int(env.account_id)}"
                )
            case ["store-down"]:
                await env.store.close()  # every later store call raises StoreUnavailable
                self.store_closed = True
            case ["end", k]:
                assert self.sessions[k].want_close, f"{where}: session {k} still open"
            case _:
                raise AssertionError(f"{where}: unknown action")


@pytest.mark.asyncio
@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
async def test_transcript(path: Path, tmp_path: Path) -> None:
    overrides: dict[str, object] = {}
    remote, tls, count = "127.0.0.1", False, 0
    body: list[tuple[int, str]] = []
    text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("@config "):
            key, _, value = line[len("@config ") :].partition("=")
            overrides[key.strip()] = ast.literal_eval(value.strip())
        elif line.startswith("@remote "):
            remote = line.split()[1]
        elif line.strip() == "@tls":
            tls = True
        elif line.startswith("@messages "):
            count = int(line.split()[1])
        else:
            body.append((lineno, line))
    env = await make_env(tmp_path, overrides)
    player = Player(env, remote, tls, {}, tmp_path / "store")
    try:
        for i in range(1, count + 1):
            uid = await env.append(message(i))
            player.sizes[uid] = len(message(i))
        await player.run(body)
    finally:
        await player.close()


def test_every_transcript_is_collected() -> None:
    assert len(FILES) >= 10
