"""SEARCH through the session with the full-text index gives exactly the scan's answer (issue 8):
QP, base64, charsets, HTML, encoded words, attachments; mixed keys, OR/NOT, short needles; the
same mailbox before its blobs are indexed (schema 3 data, backfill not run yet)."""

from __future__ import annotations

import base64
import quopri
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from imap_helpers import Env, make_env
from test_transcripts import Peer

from conftest import PASSWORD, USER

pytestmark = pytest.mark.timeout(120)


def mime(n: int, subject: str, body: bytes, ctype: str = "text/plain; charset=utf-8", cte: str = "8bit",
         frm: str = "Sender <sender@example.org>") -> bytes:
    return (f"From: {frm}\r\nTo: {USER}\r\nSubject: {subject}\r\n"
            f"Date: Fri, 27 Nov 2026 09:00:00 +0000\r\nMessage-ID: <m{n}@x>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: {ctype}\r\nContent-Transfer-Encoding: {cte}\r\n\r\n"
            ).encode() + body


def corpus() -> list[bytes]:
    pdf = base64.encodebytes(b"%PDF-1.4 quarterly figures").replace(b"\n", b"\r\n")
    return [
        mime(1, "=?utf-8?q?Gr=C3=BC=C3=9Fe?= aus Bern",
             quopri.encodestring("Viele Grüße aus Zürich\r\n".encode()), cte="quoted-printable",
             frm="=?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <jm@example.org>"),
        mime(2, "Dessert", base64.encodebytes("Café crème brûlée\r\n".encode("latin-1")),
             "text/plain; charset=iso-8859-1", "base64"),
        mime(3, "Newsletter", b"<html><body><p>Hello <b>World</b> &amp; friends</p>"
             b"<script>var secretscript = 1;</script></body></html>", "text/html; charset=utf-8"),
        mime(4, "Report attached", b"--b1\r\nContent-Type: text/plain\r\n\r\nPlease see attached.\r\n--b1\r\n"
             b"Content-Type: application/pdf; name=\"quarterly-report.pdf\"\r\n"
             b"Content-Transfer-Encoding: base64\r\n"
             b"Content-Disposition: attachment; filename=\"quarterly-report.pdf\"\r\n\r\n" + pdf + b"--b1--\r\n",
             "multipart/mixed; boundary=b1"),
        mime(5, "Cyrillic", "Привет, мир! Grüße\r\n".encode("koi8-r", "replace"), "text/plain; charset=koi8-r"),
        mime(6, "Plain one", b"Nothing special here, just text.\r\nSecond line: meeting at noon.\r\n"),
        mime(7, "Re: Dessert", b"> Caf\xc3\xa9 cr\xc3\xa8me\r\nYes please, caf\xc3\xa9!\r\n"),
    ]


SEARCHES = [
    'BODY "grüsse"', "BODY Zürich", 'BODY "CAFÉ"', 'BODY "brûlée"', "BODY world", 'BODY "& friends"',
    "BODY secretscript", 'BODY "see attached"', "BODY quarterly-report", "BODY привет", 'BODY "мир!"',
    'BODY "meeting at"', "TEXT grüße", "TEXT example.org", "TEXT quarterly-report.pdf", "SUBJECT grüsse",
    "SUBJECT dessert", "FROM müller", "FROM sender@", 'TO "user@example"', "CC any", "BCC nobody",
    "BODY café UNSEEN", "SEEN BODY café", "BODY café SUBJECT re:", "BODY café SUBJECT dessert LARGER 10",
    "OR BODY café BODY привет", "NOT BODY café", "BODY ca", 'BODY ""', "SUBJECT re", "BODY café HEADER X-None y",
    "BODY café BODY crème", "TEXT café NOT SUBJECT re:", "UID 2:5 BODY e",
]


async def login(tmp: Path, indexed: bool) -> tuple[Peer, Env]:
    env = await make_env(tmp)
    if not indexed:
        # As a store upgraded from schema 3 before the backfill ran: no blob is indexed yet.
        env.store.backfill_batch = 0
        import sqlite3

        mb = await env.store.get_mailbox(env.account_id, "INBOX")
        assert mb is not None
        for i, data in enumerate(corpus()):
            await env.store.append(env.account_id, mb.id, data, frozenset({"\\Seen"}) if i % 2 else frozenset())
        await env.store.flush_index()  # the writer's own indexing first, or it could come after the edit
        with sqlite3.connect(env.store.path / "meta.sqlite3") as c:
            c.execute("DELETE FROM blob_key")
            c.execute("UPDATE blob SET fts = NULL")
    else:
        mb = await env.store.get_mailbox(env.account_id, "INBOX")
        assert mb is not None
        for i, data in enumerate(corpus()):
            await env.store.append(env.account_id, mb.id, data, frozenset({"\\Seen"}) if i % 2 else frozenset())
    peer = Peer(env, "127.0.0.1", True)
    await peer.lines()
    await peer.feed(f"a LOGIN {USER} {PASSWORD}".encode())
    await peer.feed(b"b SELECT INBOX")
    await peer.lines()
    return peer, env


async def answer(peer: Peer, line: str) -> bytes:
    await peer.feed(line.encode())
    got = await peer.lines()
    assert got[-1].split()[1] == b"OK", got
    return next(x for x in got if x.startswith(b"* SEARCH"))


@pytest.mark.asyncio
async def test_index_answers_like_the_scan(tmp_path: Path) -> None:
    peer, env = await login(tmp_path / "i", indexed=True)
    try:
        seen = 0
        for n, key in enumerate(SEARCHES):
            fast = await answer(peer, f"s{n} UID SEARCH CHARSET UTF-8 {key}")
            # NOT NOT is the same question, but the index only narrows top-level ANDs: a scan.
            slow = await answer(peer, f"t{n} UID SEARCH CHARSET UTF-8 NOT NOT ({key})")
            assert fast == slow, key
            seen += fast != b"* SEARCH"
        assert seen >= 20  # most keys find something
        assert await answer(peer, "u1 UID SEARCH BODY grüsse") == b"* SEARCH 1"
        assert await answer(peer, "u2 UID SEARCH BODY café") == b"* SEARCH 2 7"
        assert await answer(peer, "u3 UID SEARCH BODY quarterly") == b"* SEARCH"  # a file name is not body text
        # Attachment names are in the index, but SEARCH keeps the matcher's answers (RFC 9051 §6.4.4:
        # BODY/TEXT look at the body text and the message header, not at part headers).
        assert await answer(peer, "u4 UID SEARCH TEXT quarterly") == b"* SEARCH"
    finally:
        await env.store.close()


@pytest.mark.sqlite_only(
    "makes a pre-schema-4 store by editing meta.sqlite3; the PostgreSQL backfill: tests/store/test_search_index.py")
@pytest.mark.asyncio
async def test_unindexed_blobs_are_scanned(tmp_path: Path) -> None:
    peer, env = await login(tmp_path / "u", indexed=False)
    ref, ref_env = await login(tmp_path / "r", indexed=True)
    try:
        inbox = await env.store.get_mailbox(env.account_id, "INBOX")
        assert inbox is not None
        hits = await env.store.search_index(env.account_id, inbox.id, [("body", "café")])
        assert hits is not None and hits.uids == frozenset() and len(hits.unindexed) == len(corpus())
        for n, key in enumerate(SEARCHES):
            assert await answer(peer, f"s{n} UID SEARCH CHARSET UTF-8 {key}") == \
                await answer(ref, f"s{n} UID SEARCH CHARSET UTF-8 {key}"), key
        # A message appended now is found too (indexed a moment later, scanned until then).
        mb = await env.store.get_mailbox(env.account_id, "INBOX")
        assert mb is not None
        await env.store.append(env.account_id, mb.id, mime(8, "Late", b"one more cafe\xcc\x81 note\r\n"))
        await peer.feed(b"n NOOP")
        await peer.lines()
        assert await answer(peer, "v1 UID SEARCH BODY note") == b"* SEARCH 8"
        assert await answer(peer, "v2 UID SEARCH BODY café") == b"* SEARCH 2 7"
    finally:
        await env.store.close()
        await ref_env.store.close()


async def untagged(peer: Peer, line: str, prefix: bytes) -> bytes:
    await peer.feed(line.encode())
    got = await peer.lines()
    assert got[-1].split()[1] == b"OK", got
    return next(x for x in got if x.startswith(prefix))


@pytest.mark.asyncio
async def test_sort_and_thread_answers_follow_the_mailbox(tmp_path: Path) -> None:
    """Repeated SORT/THREAD answers come from a small cache keyed by the messages asked about:
    a new message, an expunge or another search key gives a new answer."""
    peer, env = await login(tmp_path / "c", indexed=True)
    try:
        first = await untagged(peer, "a1 UID THREAD REFERENCES UTF-8 ALL", b"* THREAD")
        assert await untagged(peer, "a2 UID THREAD REFERENCES UTF-8 ALL", b"* THREAD") == first
        sort1 = await untagged(peer, "a3 UID SORT (REVERSE SUBJECT) UTF-8 ALL", b"* SORT")
        mb = await env.store.get_mailbox(env.account_id, "INBOX")
        assert mb is not None
        reply = (b"From: x@example.org\r\nSubject: Re: Dessert\r\nMessage-ID: <r1@x>\r\nIn-Reply-To: <m2@x>\r\n"
                 b"Date: Sat, 28 Nov 2026 09:00:00 +0000\r\n\r\nyes\r\n")
        await env.store.append(env.account_id, mb.id, reply)
        await peer.feed(b"n NOOP")
        await peer.lines()
        second = await untagged(peer, "a4 UID THREAD REFERENCES UTF-8 ALL", b"* THREAD")
        assert second != first and b"(2 (7)(8))" in second, second
        sort2 = await untagged(peer, "a5 UID SORT (REVERSE SUBJECT) UTF-8 ALL", b"* SORT")
        assert sort2 != sort1 and b" 8" in sort2
        assert await untagged(peer, "a6 UID SORT (REVERSE SUBJECT) UTF-8 SEEN", b"* SORT") != sort2
        await peer.feed(b"d UID STORE 8 +FLAGS (\\Deleted)")
        await peer.feed(b"x EXPUNGE")
        await peer.lines()
        assert await untagged(peer, "a7 UID THREAD REFERENCES UTF-8 ALL", b"* THREAD") == first
        assert await untagged(peer, "a8 THREAD REFERENCES UTF-8 ALL", b"* THREAD") == first  # seqs = uids here
    finally:
        await env.store.close()
