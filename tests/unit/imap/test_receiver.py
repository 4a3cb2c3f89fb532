"""The sans-I/O receiver: whole commands out of any byte split (STYLE.md: h11 test_io style)."""

from __future__ import annotations

import pathlib

import pytest

from postfach.imap.receiver import (
    NeedContinuation,
    NeedData,
    Receiver,
    Rejected,
    Request,
)

ROWS: list[tuple[bytes, list[object]]] = [
    (b"a1 NOOP\r\n", [Request(b"a1 NOOP")]),
    (b"a1 NOOP\n", [Request(b"a1 NOOP")]),  # bare LF, as Dovecot tolerates
    (b"a1 NOOP\r\na2 CAPABILITY\r\n", [Request(b"a1 NOOP"), Request(b"a2 CAPABILITY")]),
    (b"a1 LOGIN {4+}\r\nuser {4+}\r\npass\r\n", [Request(b"a1 LOGIN {4+}\r\nuser {4+}\r\npass")]),
    (b"a1 APPEND INBOX ~{3+}\r\n\x00\r\n\r\n", [Request(b"a1 APPEND INBOX ~{3+}\r\n\x00\r\n")]),
    (b"a1 APPEND x {6+}\r\na\r\nb\r\n\r\n", [Request(b"a1 APPEND x {6+}\r\na\r\nb\r\n")]),
]


def drain(rx: Receiver) -> list[object]:
    out: list[object] = []
    while True:
        ev = rx.next_event()
        if isinstance(ev, NeedData):
            return out
        out.append(ev)


@pytest.mark.parametrize(("data", "expected"), ROWS)
def test_rows_whole_and_split_everywhere(data: bytes, expected: list[object]) -> None:
    rx = Receiver()
    rx.feed(data)
    assert drain(rx) == expected
    for cut in range(1, len(data)):
        rx = Receiver()
        rx.feed(data[:cut])
        got = drain(rx)
        rx.feed(data[cut:])
        got += drain(rx)
        assert [g for g in got if not isinstance(g, NeedContinuation)] == expected, cut


def test_byte_at_a_time() -> None:
    data = b"a1 LOGIN {4}\r\nuser {4}\r\npass\r\na2 NOOP\r\n"
    rx = Receiver()
    got: list[object] = []
    for i in range(len(data)):
        rx.feed(data[i : i + 1])
        got += drain(rx)
    assert got == [NeedContinuation(4), NeedContinuation(4),
                   Request(b"a1 LOGIN {4}\r\nuser {4}\r\npass"), Request(b"a2 NOOP")]


def test_sync_literal_asks_for_continuation_once() -> None:
    rx = Receiver()
    rx.feed(b"a1 LOGIN {4}\r\n")
    assert rx.next_event() == NeedContinuation(4)
    assert isinstance(rx.next_event(), NeedData)
    rx.feed(b"us")
    assert isinstance(rx.next_event(), NeedData)
    rx.feed(b"er pw\r\n")
    assert rx.next_event() == Request(b"a1 LOGIN {4}\r\nuser pw")


def test_line_too_long_resyncs() -> None:
    rx = Receiver(max_line_bytes=50)
    rx.feed(b"a1 NOOP " + b"x" * 100)
    ev = rx.next_event()
    assert ev == Rejected("a1", "TOOBIG", "Command line too long")
    rx.feed(b"y" * 100 + b"\r\na2 NOOP\r\n")
    assert drain(rx) == [Request(b"a2 NOOP")]


def test_sync_literal_too_big_is_refused_without_continuation() -> None:
    rx = Receiver(max_literal_bytes=10)
    rx.feed(b"a1 APPEND INBOX {11}\r\na2 NOOP\r\n")
    assert drain(rx) == [Rejected("a1", "TOOBIG", "Literal too big", no=True), Request(b"a2 NOOP")]


def test_nonsync_literal_too_big_is_skipped() -> None:
    rx = Receiver(max_literal_bytes=10)
    rx.feed(b"a1 APPEND INBOX {20+}\r\n0123456789")
    assert drain(rx) == [Rejected("a1", "TOOBIG", "Literal too big")]
    rx.feed(b"0123456789 more\r\na2 NOOP\r\n")
    assert drain(rx) == [Request(b"a2 NOOP")]


def test_reset_drops_pipelined_plaintext() -> None:
    rx = Receiver()
    rx.feed(b"a1 STARTTLS\r\na2 LOGIN evil injected\r\n")
    assert rx.next_event() == Request(b"a1 STARTTLS")
    assert rx.reset() > 0
    assert isinstance(rx.next_event(), NeedData)


def test_read_line_for_idle_and_sasl() -> None:
    rx = Receiver()
    rx.feed(b"DON")
    assert rx.read_line() is None
    rx.feed(b"E\r\na2 NOOP\r\n")
    assert rx.read_line() == b"DONE"
    assert rx.next_event() == Request(b"a2 NOOP")


def test_wire_layers_do_not_import_asyncio() -> None:
    root = pathlib.Path(__file__).resolve().parents[3] / "src" / "postfach" / "imap"
    for name in ("receiver.py", "parser.py", "responses.py", "commands.py", "selected.py", "utf7.py"):
        text = (root / name).read_text()
        assert "import asyncio" not in text, name
