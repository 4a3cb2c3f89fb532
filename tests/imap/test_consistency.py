"""Two sessions on one mailbox through 1,000 random operations (issue 3: "Sequence numbers in a
session stay consistent"). Each client keeps its own model of the mailbox built only from the
untagged responses it got (EXISTS, EXPUNGE, FETCH); it must agree with the store at every sync
point, and a FETCH by sequence number must always name the UID the client's model expects."""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imap_helpers import Env, conninfo, make_env, message

from postfach.imap.counts import AccountCounts
from postfach.imap.receiver import NeedContinuation, NeedData, Receiver, Request
from postfach.imap.session import Next, Session

_UNTAGGED = re.compile(rb"\* (\d+) (EXISTS|EXPUNGE|FETCH)(?: \((.*)\))?\Z")
_UID = re.compile(rb"UID (\d+)")
_FLAGS = re.compile(rb"FLAGS \(([^)]*)\)")


class Client:
    def __init__(self, env: Env, name: str) -> None:
        self.name = name
        self.out = bytearray()
        self.session = Session(env.ctx, conninfo(tls_active=True), self, account_connections=AccountCounts())
        self.rx = Receiver()
        self.model: list[int | None] = []  # uid by sequence number - 1
        self.flags: dict[int, frozenset[bytes]] = {}
        self.n = 0

    async def write(self, data: bytes) -> None:
        self.out += data

    async def cmd(self, text: str, literal: bytes | None = None) -> tuple[bytes, list[bytes]]:
        self.n += 1
        tag = f"{self.name}{self.n}"
        raw = f"{tag} {text}".encode()
        if literal is not None:
            raw += b" {%d+}\r\n" % len(literal) + literal
        self.rx.feed(raw + b"\r\n")
        while True:
            ev = self.rx.next_event()
            if isinstance(ev, NeedData):
                break
            assert not isinstance(ev, NeedContinuation)
            assert isinstance(ev, Request)
            assert await self.session.execute(ev.raw) is Next.CONTINUE
        lines = bytes(self.out).split(b"\r\n")
        self.out.clear()
        assert lines.pop() == b""
        status = lines.pop()
        assert status.startswith(tag.encode() + b" "), status
        for line in lines:
            self._apply(line)
        return status[len(tag) + 1 :], lines

    def _apply(self, line: bytes) -> None:
        m = _UNTAGGED.match(line)
        if not m:
            return
        n, kind, rest = int(m.group(1)), m.group(2), m.group(3) or b""
        if kind == b"EXISTS":
            assert n >= len(self.model), (self.name, line, len(self.model))
            self.model.extend([None] * (n - len(self.model)))
        elif kind == b"EXPUNGE":
            assert 1 <= n <= len(self.model), (self.name, line)
            uid = self.model.pop(n - 1)
            if uid is not None:
                self.flags.pop(uid, None)
        else:
            assert 1 <= n <= len(self.model), (self.name, line, len(self.model))
            u = _UID.search(rest)
            if u:
                uid = int(u.group(1))
                known = self.model[n - 1]
                assert known in (None, uid), (self.name, line, known)
                self.model[n - 1] = uid
            f = _FLAGS.search(rest)
            uid2 = self.model[n - 1]
            if f and uid2 is not None:
                self.flags[uid2] = frozenset(f.group(1).split())


OPS = ("append", "store", "uidstore", "expunge", "fetch", "search", "move", "copy", "noop", "delete")


@pytest.mark.asyncio
async def test_two_sessions_1000_random_operations(tmp_path: Path) -> None:
    env = await make_env(tmp_path)
    rng = random.Random(20240605)
    try:
        a, b = Client(env, "a"), Client(env, "b")
        for cl in (a, b):
            assert (await cl.cmd("LOGIN user@example.org secret-pass-1"))[0].startswith(b"OK")
            assert (await cl.cmd("SELECT INBOX"))[0].startswith(b"OK")
        counter = 0
        for step in range(1000):
            cl = a if rng.random() < 0.5 else b
            op = rng.choice(OPS)
            size = len(cl.model)
            if op == "append" or size == 0:
                counter += 1
                st, _ = await cl.cmd("APPEND INBOX", message(counter))
                assert st.startswith(b"OK [APPENDUID"), st
            elif op in ("store", "delete"):
                seq = rng.randint(1, size)
                flag = "\\Deleted" if op == "delete" else rng.choice(["\\Seen", "\\Flagged", "$Work"])
                sign = rng.choice("+-")
                st, lines = await cl.cmd(f"STORE {seq} {sign}FLAGS ({flag})")
                assert st.startswith(b"OK"), st
                assert not any(b"EXPUNGE" in x for x in lines), "EXPUNGE during STORE"
            elif op == "uidstore":
                known = [u for u in cl.model if u is not None]
                if known:
                    st, _ = await cl.cmd(f"UID STORE {rng.choice(known)} +FLAGS (\\Answered)")
                    assert st.startswith(b"OK"), st
            elif op == "expunge":
                st, _ = await cl.cmd("EXPUNGE")
                assert st.startswith(b"OK"), st
            elif op == "fetch":
                seq = rng.randint(1, size)
                expected = cl.model[seq - 1]
                st, lines = await cl.cmd(f"FETCH {seq} (UID FLAGS)")
                assert not any(b"EXPUNGE" in x for x in lines), "EXPUNGE during FETCH"
                assert st.startswith(b"OK") or b"EXPUNGEISSUED" in st, st
                got = [x for x in lines if x.startswith(b"* %d FETCH (UID" % seq)]
                if expected is not None and got:
                    assert _UID.search(got[-1]).group(1) == str(expected).encode()  # type: ignore[union-attr]
            elif op == "search":
                st, lines = await cl.cmd("SEARCH ALL")
                assert not any(b"EXPUNGE" in x for x in lines), "EXPUNGE during SEARCH"
                res = next(x for x in lines if x.startswith(b"* SEARCH")).split()[2:]
                assert [int(x) for x in res] == list(range(1, len(cl.model) + 1))
            elif op in ("move", "copy"):
                seq = rng.randint(1, size)
                st, _ = await cl.cmd(f"{op.upper()} {seq} Trash")
                assert st.startswith(b"OK"), st
            else:
                st, _ = await cl.cmd("NOOP")
                assert st.startswith(b"OK")
            if step % 50 == 49:
                for c2 in (a, b):
                    await c2.cmd("NOOP")
                    await c2.cmd("FETCH 1:* (UID FLAGS)") if c2.model else None
                mb = await env.store.get_mailbox(env.account_id, "INBOX")
                assert mb is not None
                truth = await env.store.list_messages(env.account_id, mb.id)
                for c2 in (a, b):
                    assert c2.model == [m.uid for m in truth], (step, c2.name)
                    for m in truth:
                        want = {f.encode() for f in m.flags}
                        assert c2.flags[m.uid] - {b"\\Recent"} == want, (step, c2.name, m.uid)
        assert counter > 50
        for cl in (a, b):
            await cl.session.close()
    finally:
        await env.store.close()
