"""A 25 MB attachment (generated here, never committed): parsing stays a linear scan."""

from __future__ import annotations

import base64
import time

import pytest

from postfach.mail import (
    MessageInfo,
    decoded_part_bytes,
    imap_bodystructure,
    parse_message,
    search_text,
    section_bytes,
)
from postfach.mail.parser import MAX_PARTS


@pytest.fixture(scope="module")
def big() -> tuple[bytes, bytes]:
    payload = bytes(range(256)) * (19 * 1024 * 1024 // 256)  # ~19 MiB -> ~25 MiB of base64
    b64 = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    data = (
        b"From: big@example.com\r\nSubject: large\r\n"
        b"Content-Type: multipart/mixed; boundary=BIG\r\n\r\n"
        b"--BIG\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n"
        b"--BIG\r\nContent-Type: application/octet-stream; name=big.bin\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + b64 + b"--BIG--\r\n"
    )
    return data, payload


def test_big_attachment(big: tuple[bytes, bytes]) -> None:
    data, payload = big
    assert len(data) > 25_000_000
    start = time.perf_counter()
    info = parse_message(data)
    parse_seconds = time.perf_counter() - start
    start = time.perf_counter()
    data.count(b"\n")  # one linear C scan, for scale
    scan_seconds = time.perf_counter() - start
    # generous bound for a shared CI machine: a few linear scans, never seconds
    assert parse_seconds < max(1.0, 20 * scan_seconds)
    att = info.root.children[1]
    assert att.size == len(data) - att.header_end - len(b"\r\n--BIG--\r\n")
    assert imap_bodystructure(info, extended=False) == (
        b'(("text" "plain" NIL NIL NIL "7BIT" 14 1)'
        b'("application" "octet-stream" ("name" "big.bin") NIL NIL "base64" %d) "mixed")' % att.size
    )
    assert section_bytes(data, info, "1") == b"see attachment"
    assert decoded_part_bytes(data, info, "2") == payload
    assert search_text(data, info) == "see attachment"


def test_delimiter_flood_is_capped() -> None:
    """200k empty parts: at most MAX_PARTS are made; the rest is the last part's body."""
    data = b"Content-Type: multipart/mixed; boundary=f\r\n\r\n" + b"--f\r\n" * 200_000 + b"--f--\r\n"
    start = time.perf_counter()
    info = parse_message(data)
    assert time.perf_counter() - start < 5
    children = info.root.children
    assert MAX_PARTS <= len(children) <= MAX_PARTS + 1
    assert children[-1].body_end == len(data)
    assert all(c.size == 0 for c in children[:-1])
    assert MessageInfo.from_json(info.to_json()) == info
