from __future__ import annotations

import pathlib

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from postfach.pop3 import parser as p

ROWS: list[tuple[bytes, p.Command]] = [
    (b"USER alice@example.org", p.User("alice@example.org")),
    (b"user  alice@example.org ", p.User("alice@example.org")),
    (b"PASS secret pass with spaces ", p.Pass("secret pass with spaces ")),
    (b"PASS \"$%\\#;", p.Pass("\"$%\\#;")),
    (b"APOP mrose c4c9334bac560ecc979e58001b3e22fb", p.Apop()),
    (b"AUTH", p.Auth(None)),
    (b"AUTH plain", p.Auth("PLAIN")),
    (b"AUTH PLAIN AHVzZXIAcGFzcw==", p.Auth("PLAIN", "AHVzZXIAcGFzcw==")),
    (b"AUTH PLAIN =", p.Auth("PLAIN", "=")),
    (b"CAPA", p.Capa()),
    (b"stls", p.Stls()),
    (b"STAT", p.Stat()),
    (b"LIST", p.List()),
    (b"LIST 3", p.List(3)),
    (b"UIDL", p.Uidl()),
    (b"UIDL 12", p.Uidl(12)),
    (b"RETR 1", p.Retr(1)),
    (b"DELE 2", p.Dele(2)),
    (b"TOP 1 0", p.Top(1, 0)),
    (b"TOP 1 99999999", p.Top(1, 99999999)),
    (b"TOP 1 999999999999999999999999", p.Top(1, p.MAX_NUMBER)),
    (b"NOOP", p.Noop()),
    (b"RSET", p.Rset()),
    (b"QUIT", p.Quit()),
    (b"QUIT now", p.Quit()),
]

BAD = [
    b"",
    b"   ",
    b"FOO",
    b"RETR",
    b"RETR x",
    b"RETR -1",
    b"TOP 1",
    b"TOP 1 -5",
    b"DELE",
    b"USER",
    b"PASS",
    b"PASS ",
    b"LIST abc",
    b"AUTH PLAIN a b",
    b"\xff\xfe",
    b"USER \xff",
    b"RETR \xd9\xa3",  # Arabic-Indic digit three: not an ASCII digit
]


@pytest.mark.parametrize(("line", "expected"), ROWS)
def test_parse_ok(line: bytes, expected: p.Command) -> None:
    assert p.parse_command(line) == expected


@pytest.mark.parametrize("line", BAD)
def test_parse_bad(line: bytes) -> None:
    with pytest.raises(p.CommandSyntaxError):
        p.parse_command(line)


def test_pass_repr_redacts() -> None:
    assert "secret" not in repr(p.Pass("secret"))
    assert "AHVz" not in repr(p.Auth("PLAIN", "AHVzZXIAcGFzcw=="))


def _lines(receiver: p.LineReceiver) -> list[bytes | p.LineTooLong]:
    out: list[bytes | p.LineTooLong] = []
    while (item := receiver.next_line()) is not None:
        out.append(item)
    return out


STREAM = b"USER a\r\nPASS b c\r\nSTAT\nLIST 1\r\n"
STREAM_LINES = [b"USER a", b"PASS b c", b"STAT", b"LIST 1"]


def test_receiver_whole_and_every_split() -> None:
    r = p.LineReceiver(100)
    r.feed(STREAM)
    assert _lines(r) == STREAM_LINES
    for i in range(len(STREAM) + 1):
        r = p.LineReceiver(100)
        got: list[bytes | p.LineTooLong] = []
        r.feed(STREAM[:i])
        got += _lines(r)
        r.feed(STREAM[i:])
        got += _lines(r)
        assert got == STREAM_LINES, i


def test_receiver_byte_at_a_time_with_trailing_data() -> None:
    r = p.LineReceiver(100)
    got: list[bytes | p.LineTooLong] = []
    for b in STREAM + b"NOO":
        r.feed(bytes([b]))
        got += _lines(r)
    assert got == STREAM_LINES
    assert r.buffered == 3


def test_receiver_too_long_then_resync() -> None:
    r = p.LineReceiver(10)
    r.feed(b"X" * 50)
    assert _lines(r) == [p.LineTooLong(10)]
    r.feed(b"Y" * 50)
    assert _lines(r) == []
    r.feed(b"ZZ\r\nNOOP\r\n")
    assert _lines(r) == [b"NOOP"]
    r.feed(b"A" * 11 + b"\r\nQUIT\r\n")  # over-long but complete in one feed
    assert _lines(r) == [p.LineTooLong(10), b"QUIT"]


def test_receiver_reset_drops_pipelined() -> None:
    r = p.LineReceiver(100)
    r.feed(b"STLS\r\nUSER evil\r\n")
    assert r.next_line() == b"STLS"
    assert r.buffered > 0
    r.reset()
    assert r.buffered == 0
    assert r.next_line() is None


@given(st.binary(max_size=300))
@example(b"\x00\r\n")
@example(b"TOP 1 " + b"9" * 200)
@example(b"RETR " + "\u0663".encode())
def test_fuzz_parse_never_crashes(data: bytes) -> None:
    r = p.LineReceiver(64)
    r.feed(data + b"\r\n")
    while (line := r.next_line()) is not None:
        if isinstance(line, p.LineTooLong):
            continue
        try:
            cmd = p.parse_command(line)
        except p.CommandSyntaxError as e:
            assert e.message
        else:
            assert type(cmd).__name__ in {
                "User", "Pass", "Apop", "Auth", "Capa", "Stls", "Stat", "List", "Uidl", "Retr",
                "Dele", "Top", "Noop", "Rset", "Quit",
            }


@given(st.lists(st.binary(max_size=40), max_size=8), st.binary(max_size=200))
def test_fuzz_receiver_split_invariance(splits: list[bytes], data: bytes) -> None:
    whole = p.LineReceiver(32)
    whole.feed(data)
    expected = _lines(whole)
    r = p.LineReceiver(32)
    got: list[bytes | p.LineTooLong] = []
    # feed data in pieces whose sizes come from `splits`
    pos = 0
    for s in splits:
        n = len(s)
        r.feed(data[pos : pos + n])
        got += _lines(r)
        pos += n
    r.feed(data[pos:])
    got += _lines(r)
    # splitting may only change *when* an over-long line is detected, never the good lines
    assert [x for x in got if isinstance(x, bytes)] == [x for x in expected if isinstance(x, bytes)]


def test_sans_io_modules_do_not_import_asyncio() -> None:
    root = pathlib.Path(p.__file__).parent
    for name in ("parser.py", "responses.py"):
        text = (root / name).read_text()
        assert "import asyncio" not in text and "from asyncio" not in text, name
