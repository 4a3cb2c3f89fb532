"""Command parser: RFC 9051 grammar rows, and a hypothesis fuzz of the whole wire path."""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from postfach.imap import commands as c
from postfach.imap.parser import ParseError, parse
from postfach.imap.receiver import NeedContinuation, NeedData, Receiver, Rejected, Request
from postfach.imap.responses import uid_set
from postfach.imap.utf7 import Utf7Error, decode, encode

OK_ROWS: list[tuple[bytes, c.Command]] = [
    (b"a1 capability", c.Capability("a1")),
    (b"a1 LOGIN {4+}\r\nuser \"p a\\\"ss\"", c.Login("a1", "user", 'p a"ss')),
    (b"a1 SELECT inbox", c.Select("a1", "INBOX")),
    (b"a1 EXAMINE \"Sent\"", c.Select("a1", "Sent", readonly=True)),
    (b"a1 SELECT &AMQ-rger", c.Select("a1", "Ärger")),
    (b"a1 CREATE Lists (USE (\\Archive))", c.Create("a1", "Lists", ("\\Archive",))),
    (b"a1 LIST \"\" *", c.List("a1", "", ("*",))),
    (b"a1 LIST (SUBSCRIBED) \"\" (INBOX %) RETURN (CHILDREN STATUS (MESSAGES))",
     c.List("a1", "", ("INBOX", "%"), ("SUBSCRIBED",), ("CHILDREN", "STATUS"), ("MESSAGES",),
            extended=True)),
    (b"a1 STATUS INBOX (MESSAGES UIDNEXT SIZE)", c.Status("a1", "INBOX", ("MESSAGES", "UIDNEXT", "SIZE"))),
    (b"a1 UID STORE 1:* +FLAGS.SILENT (\\seen $Junk)",
     c.Store("a1", c.SeqSet(((1, None),)), "+", True, frozenset({"\\Seen", "$Junk"}), uid=True)),
    (b"a1 STORE 2,4:5 FLAGS \\Deleted",
     c.Store("a1", c.SeqSet(((2, 2), (4, 5))), "", False, frozenset({"\\Deleted"}))),
    (b"a1 FETCH 1 (BODY.PEEK[1.2.HEADER.FIELDS (From To)]<0.100>)",
     c.Fetch("a1", c.SeqSet(((1, 1),)), (c.FetchAtt("BODY[]", c.Section((1, 2), "HEADER.FIELDS",
                                                                          ("From", "To")), (0, 100), True),))),
    (b"a1 FETCH 1:4294967295 FAST",
     c.Fetch("a1", c.SeqSet(((1, 4294967295),)),
             (c.FetchAtt("FLAGS"), c.FetchAtt("INTERNALDATE"), c.FetchAtt("RFC822.SIZE")))),
    (b"a1 UID FETCH 5 FLAGS", c.Fetch("a1", c.SeqSet(((5, 5),)), (c.FetchAtt("UID"), c.FetchAtt("FLAGS")),
                                      uid=True)),
    (b"a1 SEARCH CHARSET UTF-8 OR SEEN NOT FROM \"x y\"",
     c.Search("a1", c.SearchKey("OR", (c.SearchKey("FLAG", ("\\Seen",)),
                            c.SearchKey("NOT", (c.SearchKey("HEADER", ("From", "x y")),)))),
         charset="UTF-8")),
    (b"a1 UID EXPUNGE 3:5", c.Expunge("a1", c.SeqSet(((3, 5),)))),
    (b"a1 AUTHENTICATE PLAIN =", c.Authenticate("a1", "PLAIN", b"")),
    (b"a1 ENABLE IMAP4rev2 UTF8=ACCEPT", c.Enable("a1", ("IMAP4REV2", "UTF8=ACCEPT"))),
    (b"a1 ID NIL", c.Id("a1", None)),
]

BAD_ROWS = [
    b"", b"a1", b"a1 ", b"a1 NOPE", b"a1 NOOP x", b"a1 LOGIN a", b"a1 SELECT", b"a1 FETCH 0 FLAGS",
    b"a1 FETCH 1 (FLAGS", b"a1 FETCH * BODY[1.]", b"a1 FETCH 1 BODY[HEADER.FIELDS ()]",
    b"a1 STORE 1 +FLAGS (\\Recent)", b"a1 SEARCH", b"a1 SEARCH ((((", b"a1 LOGIN {5}\r\nab c",
    b"a1 APPEND INBOX", b"a1 UID FROB 1", b"a1 STATUS INBOX (FOO)", b"a1 FETCH 99999999999 FLAGS",
    b"a1 SEARCH " + b"(" * 200 + b"ALL" + b")" * 200, b"a1 SEARCH " + b"NOT " * 5000 + b"ALL",
]


@pytest.mark.parametrize(("raw", "expected"), OK_ROWS)
def test_parse_ok(raw: bytes, expected: c.Command) -> None:
    assert parse(raw) == expected


@pytest.mark.parametrize("raw", BAD_ROWS)
def test_parse_bad(raw: bytes) -> None:
    with pytest.raises(ParseError) as info:
        parse(raw)
    assert info.value.text


def test_append_with_date_and_multi() -> None:
    cmd = parse(b'a1 APPEND Sent (\\Seen) " 5-Mar-2024 10:11:12 +0100" {3+}\r\nabc {2+}\r\nde')
    assert isinstance(cmd, c.Append)
    assert cmd.messages[0].data == b"abc"
    assert cmd.messages[0].internaldate == datetime(2024, 3, 5, 10, 11, 12,
                                                    tzinfo=timezone(timedelta(hours=1)))
    assert cmd.messages[1].data == b"de"


def test_seqset_bounds_and_uid_set() -> None:
    s = c.SeqSet(((5, 2), (None, None)))
    assert s.bounds(9) == [(2, 5), (9, 9)]
    assert uid_set([5, 1, 2, 3, 9, 10]) == "1:3,5,9:10"


@pytest.mark.parametrize("name", ["INBOX", "Ärger", "日本語/テスト", "a&b", "~peter/mail/台北/日本語"])
def test_utf7_roundtrip(name: str) -> None:
    assert decode(encode(name)) == name


def test_utf7_rfc_example() -> None:
    assert encode("~peter/mail/台北/日本語") == "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
    with pytest.raises(Utf7Error):
        decode("&Jjo!")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
@example(b"a1 FETCH 1:4294967295 (BODY[1.2.3.4.5.6.7.8.9.10.11.12])\r\n")
@example(b"a1 LOGIN {99999999999999999999}\r\n")
@example(b"* OK\r\n{0}\r\n\r\n")
def test_fuzz_every_input_gets_an_answer(data: bytes) -> None:
    """Arbitrary bytes through receiver + parser: each command parses or gives ParseError; no
    other exception escapes, and each finished command has exactly one outcome."""
    rx = Receiver(max_line_bytes=200, max_literal_bytes=100)
    rx.feed(data + b"\r\n")
    for _ in range(1000):
        ev = rx.next_event()
        if isinstance(ev, NeedData):
            return
        if isinstance(ev, NeedContinuation | Rejected):
            continue
        assert isinstance(ev, Request)
        try:
            cmd = parse(ev.raw)
        except ParseError as e:
            assert e.tag
            continue
        assert isinstance(cmd, c.Command)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([
    b"FETCH", b"1:*", b"(", b")", b"BODY[", b"]", b"\"", b"\\", b"{3}\r\n", b"{2+}\r\n", b" ", b"UID",
    b"SEARCH", b"OR", b"NOT", b"HEADER", b"~{1+}\r\n", b"*", b"%", b"$", b"<1.2>", b"\x00", b"\xff",
    b"INBOX", b"LIST", b"APPEND", b"STORE", b"+FLAGS", b"\\Seen", b"RETURN", b"CHARSET",
]), max_size=30))
def test_fuzz_structured(tokens: list[bytes]) -> None:
    raw = b"t1 " + b"".join(tokens)
    with contextlib.suppress(ParseError):
        parse(raw)
