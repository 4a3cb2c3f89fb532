"""Random commands through receiver + parser + session with the real store: every command gets
exactly one tagged answer (or the session ends with BYE), and no exception escapes."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imap_helpers import conninfo, make_env, message

from postfach.imap.counts import AccountCounts
from postfach.imap.receiver import NeedContinuation, NeedData, Receiver, Rejected, Request
from postfach.imap.session import Next, Session

TOKENS = [
    "FETCH", "STORE", "SEARCH", "UID", "COPY", "MOVE", "EXPUNGE", "SELECT", "EXAMINE", "LIST", "LSUB",
    "STATUS", "APPEND", "CREATE", "DELETE", "RENAME", "NOOP", "CHECK", "CLOSE", "UNSELECT", "ENABLE",
    "IMAP4rev2", "INBOX", "Trash", '"a/b"', "1", "1:*", "*", "2,4:5", "4294967295", "0", "(", ")",
    "FLAGS", "+FLAGS.SILENT", "-FLAGS", "(\\Seen)", "\\Deleted", "BODY[]", "BODY.PEEK[HEADER]",
    "BINARY[1]", "<0.10>", "ENVELOPE", "BODYSTRUCTURE", "ALL", "FAST", "OR", "NOT", "SUBJECT", '"x"',
    "SINCE", "1-Jan-2024", "LARGER", "100", "RETURN", "(MIN MAX)", "CHARSET", "UTF-8", "{3+}\r\nabc",
    '""', "%", "(SUBSCRIBED)", "(MESSAGES SIZE)", "\x00", "\xff", "~{1+}\r\n\x00", "NIL", "$",
]


@pytest.mark.asyncio
async def test_random_commands_always_get_one_answer(tmp_path: Path) -> None:
    env = await make_env(tmp_path, limits={"max_bad_commands": 10**6})
    inbox = await env.store.get_mailbox(env.account_id, "INBOX")
    assert inbox is not None
    for i in range(5):
        await env.store.append(env.account_id, inbox.id, message(i))
    rng = random.Random(7)
    out = bytearray()

    class Sink:
        async def write(self, data: bytes) -> None:
            out.extend(data)

    session = Session(env.ctx, conninfo(tls_active=True), Sink(), account_connections=AccountCounts())
    rx = Receiver(max_line_bytes=2000, max_literal_bytes=1000)
    try:
        assert await session.execute(b"l LOGIN user@example.org secret-pass-1") is Next.CONTINUE
        assert await session.execute(b"s SELECT INBOX") is Next.CONTINUE
        for n in range(600):
            tag = f"f{n}"
            words = [rng.choice(TOKENS) for _ in range(rng.randint(1, 7))]
            out.clear()
            rx.feed(f"{tag} {' '.join(words)}\r\n".encode("utf-8", "surrogateescape"))
            answers = 0
            while True:
                ev = rx.next_event()
                if isinstance(ev, NeedData):
                    break
                if isinstance(ev, NeedContinuation):
                    rx.feed(b"x" * ev.size + b"\r\n")
                    continue
                if isinstance(ev, Rejected):
                    nxt = await session.rejected(ev.tag, ev.code, ev.text, ev.no)
                else:
                    assert isinstance(ev, Request)
                    nxt = await session.execute(ev.raw)
                answers += 1
                if nxt is Next.IDLE:
                    assert await session.idle_done(b"DONE") is Next.CONTINUE
                elif nxt is Next.SASL:
                    await session.sasl_line(b"*")
            lines = bytes(out).split(b"\r\n")
            tagged = [ln for ln in lines if ln[:1] not in (b"*", b"+", b"") and b" " in ln
                      and ln.split(b" ", 1)[1][:3] in (b"OK ", b"NO ", b"BAD")]
            assert len(tagged) >= answers >= 1, (words, lines[-3:])
            assert not any(b"SERVERBUG" in ln for ln in lines), (words, lines)
            if session.state.value == "authenticated":
                await session.execute(b"s SELECT INBOX")
    finally:
        await session.close()
        await env.store.close()
