"""The full-text index and the stored SORT/THREAD keys (issue 8), on both backends: exact answers on
decoded text (QP, base64, charsets, HTML, encoded words), account isolation, removal with the blob,
the backfill of blobs stored before schema version 4, and a property test: index == scan."""

from __future__ import annotations

import asyncio
import base64
import quopri
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.store.storehelpers import account_with_inbox, backend_params, index_settled, msg, new_store, opened

from postfach.errors import NotFound
from postfach.mail import parse_message
from postfach.mail.search import body_text, header_fields, header_text, sort_row
from postfach.store.base import Store
from postfach.store.postgres import PostgresStore
from postfach.store.postgres import load_migrations as pg_migrations
from postfach.store.sqlite import SqliteStore, load_migrations
from postfach.types import AccountId, MailboxId, Uid

pytestmark = pytest.mark.timeout(120)


def mime(subject: str, body: bytes, ctype: str = "text/plain; charset=utf-8", cte: str = "8bit",
         frm: str = "Sender <sender@example.org>") -> bytes:
    return (f"From: {frm}\r\nTo: user@example.com\r\nSubject: {subject}\r\n"
            f"Date: Fri, 27 Nov 2026 09:00:00 +0000\r\nMessage-ID: <{abs(hash(body))}@x>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: {ctype}\r\nContent-Transfer-Encoding: {cte}\r\n\r\n"
            ).encode() + body


def corpus() -> list[bytes]:
    pdf = base64.encodebytes(b"%PDF-1.4 quarterly figures").replace(b"\n", b"\r\n")
    return [
        mime("=?utf-8?q?Gr=C3=BC=C3=9Fe?= aus Bern",
             quopri.encodestring("Viele Grüße aus Zürich\r\n".encode()), cte="quoted-printable",
             frm="=?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <jm@example.org>"),
        mime("Dessert", base64.encodebytes("Café crème brûlée\r\n".encode("latin-1")),
             "text/plain; charset=iso-8859-1", "base64"),
        mime("Newsletter", b"<html><body><p>Hello <b>World</b> &amp; friends</p>"
             b"<script>var secretscript = 1;</script></body></html>", "text/html; charset=utf-8"),
        mime("Report attached", b"--b1\r\nContent-Type: text/plain\r\n\r\nPlease see attached.\r\n--b1\r\n"
             b"Content-Type: application/pdf; name=\"quarterly-report.pdf\"\r\nContent-Transfer-Encoding: base64\r\n"
             b"Content-Disposition: attachment; filename=\"quarterly-report.pdf\"\r\n\r\n" + pdf + b"--b1--\r\n",
             "multipart/mixed; boundary=b1"),
        mime("Cyrillic", "Привет, мир!\r\n".encode("koi8-r"), "text/plain; charset=koi8-r"),
        mime("Plain one", b"Nothing special here, just text.\r\nSecond line: meeting at noon.\r\n"),
    ]


NEEDLES = [
    ("body", "grüsse"), ("body", "zürich"), ("body", "café"), ("body", "brûlée"), ("body", "world"),
    ("body", "& friends"), ("body", "secretscript"), ("body", "see attached"), ("body", "quarterly-report"),
    ("body", "привет"), ("body", "мир!"), ("body", "meeting at"), ("body", "nothing special here, just"),
    ("text", "grüße"), ("text", "example.org"), ("text", "quarterly-report.pdf"), ("subject", "grüsse"),
    ("subject", "report"), ("from", "müller"), ("from", "sender@"), ("to", "user@example"), ("cc", "any"),
    ("bcc", "nobody"),
]


def scan(datas: dict[Uid, bytes], field: str, needle: str) -> set[Uid]:
    """What the IMAP matcher answers for one folded needle (postfach.imap.session._match)."""
    out = set()
    for uid, data in datas.items():
        info = parse_message(data)
        if field == "body":
            hay = [body_text(data, info)]
        elif field == "text":
            hay = [body_text(data, info), header_text(data, info)]
        else:
            f = header_fields(info)[["subject", "from", "to", "cc", "bcc"].index(field)]
            hay = [] if f == "\0" else [f]
        if any(needle in h for h in hay):
            out.add(uid)
    return out


async def fill(store: Store, aid: AccountId, mbox: MailboxId, datas: list[bytes]) -> dict[Uid, bytes]:
    """Append, and wait until the new messages are indexed (test_new_mail_is_indexed_after_its_commit
    covers the moment between)."""
    res = await store.append_many(aid, mbox, [(d, frozenset(), None) for d in datas])
    await index_settled(store)
    return {r.uid: d for r, d in zip(res, datas, strict=True)}


@pytest.mark.asyncio
@pytest.mark.parametrize("backend", backend_params())
async def test_index_answers_exactly_on_decoded_text(backend: str, tmp_path: Path) -> None:
    async with opened(backend, tmp_path / "s") as store:
        aid, inbox = await account_with_inbox(store)
        datas = await fill(store, aid, inbox, corpus())
        for field, needle in NEEDLES:
            hits = await store.search_index(aid, inbox, [(field, needle)])
            assert hits is not None and hits.unindexed == frozenset()
            assert set(hits.uids) == scan(datas, field, needle), (field, needle)
        # A conjunction: every needle must be there.
        both = await store.search_index(aid, inbox, [("body", "café"), ("subject", "dessert")])
        assert both is not None and set(both.uids) == scan(datas, "body", "café")
        none = await store.search_index(aid, inbox, [("body", "café"), ("subject", "cyrillic")])
        assert none is not None and none.uids == frozenset()
        # Needles the index cannot answer: too short, or with a line break.
        assert await store.search_index(aid, inbox, [("body", "ab")]) is None
        assert await store.search_index(aid, inbox, [("body", "line\nsecond")]) is None
        # FTS5 query syntax in a needle is just text.
        q = await store.search_index(aid, inbox, [("body", '"hello" OR NEAR(x) *')])
        assert q is not None and q.uids == frozenset()
        assert await store.check() == []


@pytest.mark.asyncio
@pytest.mark.parametrize("backend", backend_params())
async def test_index_is_per_account_and_goes_with_the_blob(backend: str, tmp_path: Path) -> None:
    async with opened(backend, tmp_path / "s") as store:
        a, inbox_a = await account_with_inbox(store, "a@example.com")
        b, inbox_b = await account_with_inbox(store, "b@example.com")
        shared = mime("Shared", b"the secret word is pineapple\r\n")
        await fill(store, a, inbox_a, [shared, mime("Other", b"nothing here\r\n")])
        await fill(store, b, inbox_b, [mime("B only", b"b has no fruit\r\n"), shared])
        got_b = await store.search_index(b, inbox_b, [("body", "pineapple")])
        assert got_b is not None and got_b.uids == frozenset({Uid(2)})
        got_a = await store.search_index(a, inbox_a, [("body", "pineapple")])
        assert got_a is not None and got_a.uids == frozenset({Uid(1)})
        with pytest.raises(NotFound):
            await store.search_index(b, inbox_a, [("body", "pineapple")])  # not b's mailbox
        with pytest.raises(NotFound):
            await store.sort_rows(b, inbox_a)
        # Expunging a's copy leaves b's (the blob is shared); removing b's too drops the blob.
        await store.delete_messages(a, inbox_a, [Uid(1)])
        got_a = await store.search_index(a, inbox_a, [("body", "pineapple")])
        assert got_a is not None and got_a.uids == frozenset()
        got_b = await store.search_index(b, inbox_b, [("body", "pineapple")])
        assert got_b is not None and got_b.uids == frozenset({Uid(2)})
        await store.delete_messages(b, inbox_b, [Uid(2)])
        assert await index_rows(store) == 2  # "Other" and "B only" are left
        await store.delete_messages(a, inbox_a, [Uid(2)])
        await store.delete_messages(b, inbox_b, [Uid(1)])
        assert await index_rows(store) == 0
        assert await store.check() == []


async def index_rows(store: Store) -> int:
    """Rows of the index tables (each table must agree)."""
    if isinstance(store, SqliteStore):
        with sqlite3.connect(store.path / "meta.sqlite3") as c:
            counts = {t: c.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                      for t in ("blob_key", "blob_text", "blob_fts", "message_key", "message")}
            c.execute("INSERT INTO blob_fts (blob_fts) VALUES ('integrity-check')")  # raises if corrupt
        assert counts["blob_key"] == counts["blob_text"] == counts["blob_fts"], counts
        assert counts["message_key"] == counts["message"], counts  # every blob here is indexed
        return int(counts["blob_key"])
    assert isinstance(store, PostgresStore)
    rows = await store._fetch("SELECT count(*) AS n FROM blob_index")
    return int(rows[0]["n"])


@pytest.mark.asyncio
@pytest.mark.parametrize("backend", backend_params())
async def test_sort_rows_are_the_parsed_keys(backend: str, tmp_path: Path) -> None:
    async with opened(backend, tmp_path / "s") as store:
        aid, inbox = await account_with_inbox(store)
        datas = await fill(store, aid, inbox, [*corpus(), msg(1), msg(2)])
        rows = await store.sort_rows(aid, inbox)
        assert rows is not None
        assert dict(rows) == {u: sort_row(parse_message(d)) for u, d in datas.items()}
        # Copies bring their keys along; expunged messages take theirs away.
        other = await store.create_mailbox(aid, "Other")
        await store.copy_messages(aid, inbox, [Uid(1), Uid(2)], other.id)
        copied = await store.sort_rows(aid, other.id)
        assert copied is not None and dict(copied) == {Uid(1): dict(rows)[Uid(1)], Uid(2): dict(rows)[Uid(2)]}
        await store.move_messages(aid, other.id, [Uid(1)], inbox)
        moved = await store.sort_rows(aid, other.id)
        assert moved is not None and [u for u, _ in moved] == [Uid(2)]
        again = await store.sort_rows(aid, inbox)
        assert again is not None and len(again) == len(datas) + 1


async def open_old(backend: str, path: Path) -> Store:
    """A store at schema version 3: no index (as before this change)."""
    if backend == "sqlite":
        s: Store = SqliteStore(path, migrations=load_migrations()[:3])
    else:
        from tests.store.storehelpers import pg_dsn, pg_schema_for

        s = PostgresStore(pg_dsn(), schema=pg_schema_for(path), migrations=pg_migrations()[:3])
    await s.open()
    return s


@pytest.mark.asyncio
@pytest.mark.parametrize("backend", backend_params())
async def test_backfill_indexes_blobs_stored_before_schema_4(backend: str, tmp_path: Path) -> None:
    path = tmp_path / "s"
    old = await open_old(backend, path)
    try:
        aid, inbox = await account_with_inbox(old)
        datas = await fill(old, aid, inbox, corpus())
        assert await old.check() == []
    finally:
        await old.close()
    # Upgraded, before the backfill ran: every message is unindexed and searched by a scan.
    async with opened(backend, path, backfill_batch=0) as store:
        hits = await store.search_index(aid, inbox, [("body", "zürich")])
        assert hits is not None and hits.uids == frozenset() and hits.unindexed == frozenset(datas)
        assert await store.sort_rows(aid, inbox) == []
        assert await store.check() == []
        # New mail is indexed at once, beside the old.
        old_uids = frozenset(datas)
        new = await fill(store, aid, inbox, [mime("New", b"fresh zurich mail\r\n")])
        hits = await store.search_index(aid, inbox, [("body", "zurich")])
        assert hits is not None and hits.uids == frozenset(new) and hits.unindexed == old_uids
        datas.update(new)
    # With the backfill (batches of 2): everything indexed, the answers exact.
    async with opened(backend, path, backfill_batch=2) as store:
        for _ in range(400):
            hits = await store.search_index(aid, inbox, [("body", "zürich")])
            assert hits is not None
            if not hits.unindexed:
                break
            await asyncio.sleep(0.05)
        assert hits.unindexed == frozenset()
        for field, needle in NEEDLES:
            got = await store.search_index(aid, inbox, [(field, needle)])
            assert got is not None and set(got.uids) == scan(datas, field, needle), (field, needle)
        rows = await store.sort_rows(aid, inbox)
        assert rows is not None and len(rows) == len(datas)
        assert await store.check() == []


# ------------------------------------------------------------------------- index == scan (property)

WORDS = ["Straße", "STRASSE", "Zürich", "zurich", "café", "naïve", "ΣΊΣΥΦΟΣ", "σίσυφος", "привет", "hello",
         "World", "a", "bb", "x-y", "foo.bar", "İstanbul", "ǅemal", "ﬁle", "ﬀ", "Ω", "😀", "tab\there", "=3D"]
ENCODINGS = ["8bit", "quoted-printable", "base64"]
CHARSETS = ["utf-8", "iso-8859-1", "koi8-r"]


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(st.lists(st.sampled_from(WORDS), min_size=0, max_size=6).map(" ".join),
                          min_size=1, max_size=5))
    text = "\r\n".join(lines) + "\r\n"
    subject = draw(st.lists(st.sampled_from(WORDS), max_size=3).map(" ".join))
    charset = draw(st.sampled_from(CHARSETS))
    try:
        raw = text.encode(charset)
    except UnicodeEncodeError:
        charset, raw = "utf-8", text.encode()
    cte = draw(st.sampled_from(ENCODINGS))
    if cte == "quoted-printable":
        raw = quopri.encodestring(raw)
    elif cte == "base64":
        raw = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    html = draw(st.booleans())
    if html:
        raw = b"<p>" + raw + b"</p>" if cte == "8bit" else raw
    subj = subject.encode("utf-8", "replace").decode("ascii", "replace") if draw(st.booleans()) else \
        "=?utf-8?b?" + base64.b64encode(subject.encode()).decode() + "?="
    return mime(subj, raw, f"text/{'html' if html else 'plain'}; charset={charset}", cte)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(messages(), min_size=1, max_size=6), picks=st.lists(
    st.tuples(st.sampled_from(["body", "text", "subject"]), st.integers(0, 10_000), st.integers(3, 12),
              st.booleans()), min_size=1, max_size=6))
def test_index_narrowed_search_equals_full_scan(tmp_path_factory: pytest.TempPathFactory,
                                                batch: list[bytes], picks: list[tuple[str, int, int, bool]]) -> None:
    async def run() -> None:
        async with opened("sqlite", tmp_path_factory.mktemp("prop")) as store:
            aid, inbox = await account_with_inbox(store)
            datas = await fill(store, aid, inbox, batch)
            texts = [body_text(d, parse_message(d)) for d in batch]
            for field, start, length, upper in picks:
                src = texts[start % len(texts)]
                # A substring of some message (sometimes in other case), or of the word list.
                needle = src[start % max(1, len(src)):][:length] or WORDS[start % len(WORDS)]
                needle = (needle.upper() if upper else needle).casefold()
                hits = await store.search_index(aid, inbox, [(field, needle)])
                want = scan(datas, field, needle)
                if hits is None:
                    assert len(needle) < 3 or "\n" in needle
                    continue
                assert hits.unindexed == frozenset()
                assert set(hits.uids) == want, (field, needle)

    asyncio.run(run())


def test_store_protocol_has_the_index_methods(tmp_path: Path) -> None:
    s = new_store("sqlite", tmp_path)
    assert isinstance(s, Store)
    assert callable(s.search_index) and callable(s.sort_rows)


@pytest.mark.asyncio
@pytest.mark.sqlite_only("the embedded store's writer indexes after the commit; PostgreSQL in it")
async def test_new_mail_is_indexed_after_its_commit(tmp_path: Path) -> None:
    """The embedded store commits a delivery without its full-text rows (FTS5 work was a third of
    each commit); the writer adds them a moment later, many at a time. Until then the message is
    reported unindexed and the session scans it, so no answer is ever missing a message."""
    async with opened("sqlite", tmp_path / "held", background_idle=3600, background_max=1000) as store:
        aid, inbox = await account_with_inbox(store)
        r = await store.append(aid, inbox, mime("Held", b"a pineapple for later\r\n"))
        hits = await store.search_index(aid, inbox, [("body", "pineapple")])
        assert hits is not None and hits.uids == frozenset() and hits.unindexed == frozenset({r.uid})
        assert await store.sort_rows(aid, inbox) == []  # SORT parses the message meanwhile
        assert await store.check() == []  # unindexed is a valid state
        await index_settled(store)
        hits = await store.search_index(aid, inbox, [("body", "pineapple")])
        assert hits is not None and hits.uids == frozenset({r.uid}) and hits.unindexed == frozenset()
        rows = await store.sort_rows(aid, inbox)
        assert rows is not None and [u for u, _ in rows] == [r.uid]
        # Held back again, then a clean close: the writer indexes what it holds before it stops.
        r2 = await store.append(aid, inbox, mime("Held 2", b"a second pineapple\r\n"))
    async with opened("sqlite", tmp_path / "held", backfill_batch=0) as store:
        hits = await store.search_index(aid, inbox, [("body", "pineapple")])
        assert hits is not None and hits.uids == frozenset({r.uid, r2.uid}) and hits.unindexed == frozenset()
    # An idle writer indexes on its own after background_idle.
    async with opened("sqlite", tmp_path / "idle", background_idle=0.05, background_max=1000) as store:
        aid, inbox = await account_with_inbox(store)
        r = await store.append(aid, inbox, mime("Soon", b"pineapple soon\r\n"))
        for _ in range(200):
            hits = await store.search_index(aid, inbox, [("body", "pineapple")])
            assert hits is not None and hits.uids | hits.unindexed == frozenset({r.uid})
            if hits.uids:
                break
            await asyncio.sleep(0.02)
        assert hits.uids == frozenset({r.uid})
    # background_max new blobs trigger the flush at once, without waiting for idle.
    async with opened("sqlite", tmp_path / "full", background_idle=3600, background_max=3) as store:
        aid, inbox = await account_with_inbox(store)
        for i in range(3):
            await store.append(aid, inbox, mime(f"Full {i}", b"pineapple %d\r\n" % i))
        # The flush runs right after the commit that reached the limit, before the writer takes
        # the next request: a read queued behind one more write sees it done.
        await store.create_mailbox(aid, "After")
        hits = await store.search_index(aid, inbox, [("body", "pineapple")])
        assert hits is not None and len(hits.uids) == 3 and hits.unindexed == frozenset()
