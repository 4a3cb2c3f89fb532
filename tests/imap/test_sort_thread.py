"""SORT (RFC 5256, RFC 5957 SORT=DISPLAY, RFC 5267 ESORT) and THREAD (ORDEREDSUBJECT,
REFERENCES) through the session over the real store."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from imap_helpers import make_env
from test_transcripts import Peer

from conftest import PASSWORD, USER

# (from, subject, message-id, references, size padding) — dates ascend with the number.
MESSAGES = [
    ("Zed Zulu <zz@example.com>", "Hello", "<1@x>", "", 50),
    ("alice <b-alice@example.com>", "Re: Hello", "<2@x>", "<1@x>", 10),
    ("Bob <a-bob@example.com>", "Other", "<3@x>", "", 300),
    ("Carol <c@example.com>", "RE: Hello", "<4@x>", "<1@x> <2@x>", 0),
    ("Dave <d@example.com>", "Re: Other", "<5@x>", "<missing@x>", 20),
    ("Eve <e@example.com>", "hello", "<6@x>", "", 5),
]


def _raw(i: int) -> bytes:
    frm, subject, mid, refs, pad = MESSAGES[i - 1]
    head = (f"From: {frm}\r\nTo: u{7 - i}@example.org\r\nSubject: {subject}\r\n"
            f"Date: Mon, {i:02d} Jan 2024 10:00:00 +0000\r\nMessage-ID: {mid}\r\n")
    if refs:
        head += f"References: {refs}\r\n"
    return (head + "\r\n" + "x" * pad + "\r\n").encode()


async def _session(tmp_path: Path) -> tuple[Peer, object]:
    env = await make_env(tmp_path)
    mb = await env.store.get_mailbox(env.account_id, "INBOX")
    assert mb is not None
    for i in range(1, 7):
        # Arrival order differs from the sent dates for message 3 (arrived last).
        when = datetime(2024, 2, 10 - i if i != 3 else 20, tzinfo=UTC)
        await env.store.append(env.account_id, mb.id, _raw(i), frozenset({"\\Seen"} if i % 2 else ()),
                               when)
    peer = Peer(env, "127.0.0.1", True)
    await peer.lines()
    return peer, env


async def _cmd(peer: Peer, line: str) -> list[bytes]:
    await peer.feed(line.encode())
    return await peer.lines()


@pytest.mark.asyncio
async def test_sort_and_thread(tmp_path: Path) -> None:
    peer, env = await _session(tmp_path)
    try:
        assert (await _cmd(peer, f"a LOGIN {USER} {PASSWORD}"))[-1].startswith(b"a OK")
        caps = b" ".join(await _cmd(peer, "b CAPABILITY"))
        for cap in (b"SORT", b"SORT=DISPLAY", b"ESORT", b"THREAD=REFERENCES", b"THREAD=ORDEREDSUBJECT"):
            assert b" " + cap + b" " in caps
        await _cmd(peer, "c SELECT INBOX")

        async def one(line: str) -> bytes:
            got = await _cmd(peer, line)
            assert got[-1].split()[1] == b"OK", got
            assert len(got) == 2, got
            return got[0]

        assert await one("s1 SORT (SUBJECT) UTF-8 ALL") == b"* SORT 1 2 4 6 3 5"
        assert await one("s2 SORT (REVERSE DATE) UTF-8 ALL") == b"* SORT 6 5 4 3 2 1"
        assert await one("s3 SORT (ARRIVAL) US-ASCII ALL") == b"* SORT 6 5 4 2 1 3"
        assert await one("s4 SORT (SIZE) UTF-8 SEEN") == b"* SORT 5 1 3"
        assert await one("s5 SORT (FROM) UTF-8 ALL") == b"* SORT 3 2 4 5 6 1"
        # RFC 5957: by display name (alice, Bob, Carol, Dave, Eve, Zed Zulu), case-insensitive.
        assert await one("s6 SORT (DISPLAYFROM) UTF-8 ALL") == b"* SORT 2 3 4 5 6 1"
        assert await one("s7 SORT (TO REVERSE SIZE) UTF-8 ALL") == b"* SORT 6 5 4 3 2 1"
        assert await one("s8 UID SORT (SUBJECT REVERSE DATE) UTF-8 NOT SEEN") == b"* SORT 6 4 2"
        assert await one("s9 SORT RETURN (MIN MAX COUNT ALL) (SUBJECT) UTF-8 ALL") == (
            b'* ESEARCH (TAG "s9") MIN 1 MAX 5 ALL 1:2,4,6,3,5 COUNT 6')
        assert await one("t1 UID SORT RETURN () (DATE) UTF-8 1:3") == b'* ESEARCH (TAG "t1") UID ALL 1:3'
        assert await one("t2 SORT RETURN (PARTIAL 2:3) (SUBJECT) UTF-8 ALL") == (
            b'* ESEARCH (TAG "t2") PARTIAL (2:3 2,4)')
        # RFC 5256 §3 REFERENCES: 2 and 4 hang under 1; 5's parent is unknown, so it joins 3 by
        # subject as a reply; 6 shares 1's subject without being a reply: a dummy holds both.
        assert await one("r1 THREAD REFERENCES UTF-8 ALL") == b"* THREAD ((1 2 4)(6))(3 5)"
        assert await one("r2 THREAD ORDEREDSUBJECT UTF-8 ALL") == b"* THREAD (1 (2)(4)(6))(3 5)"
        assert await one("r3 UID THREAD REFERENCES UTF-8 SEEN") == b"* THREAD (1)(3 5)"
        assert await one("r4 THREAD REFERENCES UTF-8 LARGER 100000") == b"* THREAD"
        bad = await _cmd(peer, "x1 SORT (FOO) UTF-8 ALL")
        assert bad[-1].startswith(b"x1 BAD")
        bad = await _cmd(peer, "x2 SORT (DATE) KOI8-R ALL")
        assert bad[-1].startswith(b"x2 NO [BADCHARSET")
        bad = await _cmd(peer, "x3 THREAD FOO UTF-8 ALL")
        assert bad[-1].startswith(b"x3 BAD")
        bad = await _cmd(peer, "x4 SORT (REVERSE) UTF-8 ALL")
        assert bad[-1].startswith(b"x4 BAD")
        await peer.session.close()
    finally:
        await env.store.close()  # type: ignore[attr-defined]
