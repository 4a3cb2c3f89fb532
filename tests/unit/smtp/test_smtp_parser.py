"""The sans-I/O receiver and command parser: tables, byte-by-byte splits, smuggling, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from postfach.smtp import codes
from postfach.smtp.parser import (
    Auth,
    Bdat,
    BdatSyntaxError,
    Body,
    ChunkComplete,
    CommandError,
    DataComplete,
    Ehlo,
    Event,
    Line,
    LineTooLong,
    MailFrom,
    MailParams,
    RcptParams,
    RcptTo,
    Receiver,
    bare_line_end,
    parse_bdat,
    parse_command,
    xtext_decode,
)


def drain(r: Receiver) -> list[Event]:
    out: list[Event] = []
    while True:
        ev = r.next_event()
        if ev is None:
            return out
        out.append(ev)


def run_data(stream: bytes, *, split: int | None = None, limit: int = 10_000) -> tuple[list[Event], bytes]:
    """Feed ``stream`` in DATA mode (all at once or in ``split``-byte pieces); events and leftovers."""
    r = Receiver(1000, limit)
    r.start_data()
    events: list[Event] = []
    pieces = [stream] if split is None else [stream[i : i + split] for i in range(0, len(stream), split)]
    done = False
    for piece in pieces:
        r.feed(piece)
        while not done:
            ev = r.next_event()
            if ev is None:
                break
            events.append(ev)
            done = isinstance(ev, DataComplete)
    rest = bytes(r._buf)  # what is left for the command reader
    return events, rest


DATA_CASES: list[tuple[bytes, bytes | None, bytes]] = [
    # (stream after DATA, unstuffed message or None if DATA has not ended, leftover)
    (b".\r\n", b"", b""),
    (b"a\r\n.\r\n", b"a\r\n", b""),
    (b"a\r\n..b\r\n.\r\nNOOP\r\n", b"a\r\n.b\r\n", b"NOOP\r\n"),
    (b"..\r\n.\r\n", b".\r\n", b""),
    (b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n", b""),
    (b"a\n.\n", None, b""),
    (b"a\r\n.\n", None, b""),
    (b"a\n.\r\n", None, b""),
    (b"a\r.\r", None, b""),
    (b"a\r\n.\rMAIL\r\n", None, b""),
    (b"a\r\n. \r\n.\r\n", b"a\r\n \r\n", b""),
]


@pytest.mark.parametrize(("stream", "body", "rest"), DATA_CASES)
@pytest.mark.parametrize("split", [None, 1, 2, 3, 5])
def test_data_end_only_crlf_dot_crlf(stream: bytes, body: bytes | None, rest: bytes, split: int | None) -> None:
    events, left = run_data(stream, split=split)
    if body is None:
        assert events == []
    else:
        assert events == [DataComplete(body, False, len(body))]
        assert left == rest


def test_bare_line_ends_are_detected() -> None:
    assert bare_line_end(b"a\r\nb\r\n") is None
    assert bare_line_end(b"a\nb\r\n") is codes.R550_BARE_LF
    assert bare_line_end(b"a\rb\r\n") is codes.R550_BARE_CR
    assert bare_line_end(b"a\r\n\n") is codes.R550_BARE_LF


@pytest.mark.parametrize("split", [None, 1, 7, 4096])
def test_data_too_big_is_read_to_its_end(split: int | None) -> None:
    big = (b"x" * 98 + b"\r\n") * 500 + b".\r\nQUIT\r\n"
    events, left = run_data(big, split=split, limit=1000)
    assert len(events) == 1
    ev = events[0]
    assert isinstance(ev, DataComplete) and ev.too_big and ev.data == b""
    assert left == b"QUIT\r\n"


def test_command_lines_byte_by_byte_equal_whole() -> None:
    stream = b"EHLO a\r\nNOOP\nMAIL FROM:<a@b>\r\n" + b"X" * 50 + b"\r\nRSET\r\n"
    whole = Receiver(20, 1000)
    whole.feed(stream)
    expected = drain(whole)
    assert expected == [Line(b"EHLO a"), Line(b"NOOP"), Line(b"MAIL FROM:<a@b>"), LineTooLong(), Line(b"RSET")]
    split = Receiver(20, 1000)
    got: list[Event] = []
    for i in range(len(stream)):
        split.feed(stream[i : i + 1])
        got += drain(split)
    assert got == expected


def test_bdat_chunk_exact_and_discard() -> None:
    r = Receiver(100, 1000)
    r.start_chunk(7, discard=False)
    r.feed(b"ab\r\n.\r\nQUIT\r\n")
    assert r.next_event() == ChunkComplete(b"ab\r\n.\r\n", 7, False)
    assert r.next_event() == Line(b"QUIT")
    r.start_chunk(3, discard=True)
    for b in b"xyzNOOP\r\n":
        r.feed(bytes([b]))
    assert r.next_event() == ChunkComplete(b"", 3, True)
    assert r.next_event() == Line(b"NOOP")


def test_reset_drops_pipelined_input() -> None:
    r = Receiver(100, 1000)
    r.feed(b"STARTTLS\r\nMAIL FROM:<x@y>\r\n")
    assert r.next_event() == Line(b"STARTTLS")
    assert r.reset() == b"MAIL FROM:<x@y>\r\n"
    assert r.next_event() is None


PARSE_OK = [
    (b"EHLO mail.example", Ehlo("mail.example")),
    (b"ehlo [192.0.2.1]", Ehlo("[192.0.2.1]")),
    (b"EHLO mail.starttls", Ehlo("mail.starttls")),
    (b"MAIL FROM:<>", MailFrom("", MailParams())),
    (b"MAIL FROM: <a@b.example>", MailFrom("a@b.example", MailParams())),
    (b"mail from:a@b.example size=10", MailFrom("a@b.example", MailParams(size=10))),
    (
        b"MAIL FROM:<a@b> SIZE=1 BODY=binarymime SMTPUTF8 RET=hdrs ENVID=x+2By REQUIRETLS AUTH=<>",
        MailFrom("a@b", MailParams(1, Body.BINARY, True, "HDRS", "x+y", True, "<>")),
    ),
    (b'MAIL FROM:<"a b>c"@b.example>', MailFrom('"a b>c"@b.example', MailParams())),
    (b"RCPT TO:<@x.example,@y.example:u@z.example>", RcptTo("u@z.example", RcptParams())),
    (b"RCPT TO:<Postmaster>", RcptTo("postmaster", RcptParams())),
    (
        b"RCPT TO:<u@z> NOTIFY=success,delay ORCPT=rfc822;u+40z",
        RcptTo("u@z", RcptParams("SUCCESS,DELAY", "rfc822;u@z")),
    ),
    (b"AUTH PLAIN AGEAYg==", Auth("PLAIN", b"\x00a\x00b")),
    (b"AUTH login =", Auth("LOGIN", b"")),
    (b"AUTH LOGIN", Auth("LOGIN", None)),
]


@pytest.mark.parametrize(("line", "expected"), PARSE_OK)
def test_parse_ok(line: bytes, expected: object) -> None:
    assert parse_command(line) == expected


PARSE_BAD = [
    (b"", 500),
    (b"HELO", 501),
    (b"MAIL FROM:<a@b", 501),
    (b"MAIL FROM:<a b@c>", 553),
    (b"MAIL FROM:<a@b> SIZE", 501),
    (b"MAIL FROM:<a@b> X-UNKNOWN=1", 555),
    (b"MAIL FROM:<a@b> SMTPUTF8=yes", 501),
    (b"MAIL FROM:<a@b> ENVID=a+zz", 501),
    (b"RCPT TO:<a@b> NOTIFY=NEVER,SUCCESS", 501),
    (b"RCPT TO:<a@b> NOTIFY=FAILURE,FAILURE", 501),
    (b"RCPT TO:<a@-bad-.example>", 553),
    (b"AUTH", 501),
    (b"AUTH PLAIN ***", 501),
    (b"QUIT now", 501),
    (b"FOO", 500),
    (b"EHLO a\x00b", 500),
    (b"\xff\xfe", 500),
]


@pytest.mark.parametrize(("line", "code"), PARSE_BAD)
def test_parse_bad(line: bytes, code: int) -> None:
    with pytest.raises(CommandError) as exc:
        parse_command(line)
    assert exc.value.reply.code == code
    assert exc.value.reply.enhanced is not None


def test_bdat_parsing() -> None:
    assert parse_bdat(b"BDAT 10") == Bdat(10, False)
    assert parse_bdat(b"bdat 0 last") == Bdat(0, True)
    for bad in (b"BDAT", b"BDAT x", b"BDAT 10 FIRST", b"BDAT -1", b"BDAT 1 LAST x", b"BDAT 99999999999999"):
        assert isinstance(parse_bdat(bad), BdatSyntaxError)


def test_xtext() -> None:
    assert xtext_decode("a+2Bb+3Dc") == "a+b=c"
    with pytest.raises(CommandError):
        xtext_decode("a+2b")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
@example(b"MAIL FROM:<\x00>")
@example(b"RCPT TO:<" + b"a" * 300 + b"@b>")
@example(b'MAIL FROM:<"\\')
def test_fuzz_parse_command_only_raises_command_error(line: bytes) -> None:
    try:
        parse_command(line)
    except CommandError as e:
        assert e.reply.code >= 500
    parse_bdat(line)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20), st.sampled_from(["command", "data", "chunk"]))
def test_fuzz_receiver_never_raises(chunks: list[bytes], mode: str) -> None:
    r = Receiver(32, 256)
    if mode == "data":
        r.start_data()
    elif mode == "chunk":
        r.start_chunk(40, discard=False)
    for c in chunks:
        r.feed(c)
        for ev in drain(r):
            if isinstance(ev, DataComplete):
                assert ev.too_big or len(ev.data) <= 256
            if isinstance(ev, Line):
                assert len(ev.data) <= 32 and b"\n" not in ev.data


@pytest.mark.parametrize("split", [1, 2, 3, 100])
def test_line_of_exactly_the_cap_passes(split: int) -> None:
    stream = b"N" * 20 + b"\r\n" + b"M" * 21 + b"\r\n"
    r = Receiver(20, 1000)
    got: list[Event] = []
    for i in range(0, len(stream), split):
        r.feed(stream[i : i + split])
        got += drain(r)
    assert got == [Line(b"N" * 20), LineTooLong()]
