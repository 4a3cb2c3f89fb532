"""PROXY protocol v1/v2 parser: tables fed whole, byte by byte and with trailing data; bad input
raises ProxyProtocolError; arbitrary bytes never raise anything else."""

from __future__ import annotations

import contextlib
import re
import struct
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from postfach.net import proxy
from postfach.net.proxy import (
    NEED_DATA,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    ProxyReceiver,
    build_v1,
    build_v2,
    crc32c,
    is_trusted,
    parse,
)

V4 = ProxyHeader(1, False, "tcp4", ("192.0.2.10", 56324), ("198.51.100.1", 993))

VALID: list[tuple[bytes, ProxyHeader]] = [
    (b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 993\r\n", V4),
    (
        b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 0\r\n",
        ProxyHeader(1, False, "tcp6", ("2001:db8::1", 65535), ("2001:db8::2", 0)),
    ),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, False, "unknown")),
    (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", ProxyHeader(1, False, "unknown")),
    (build_v2(("192.0.2.10", 56324), ("198.51.100.1", 993)), ProxyHeader(2, False, "tcp4", V4.source, V4.destination)),
    (
        build_v2(("2001:db8::1", 1), ("2001:db8::2", 25)),
        ProxyHeader(2, False, "tcp6", ("2001:db8::1", 1), ("2001:db8::2", 25)),
    ),
    (build_v2(None, None), ProxyHeader(2, True, "unknown")),
    (
        build_v2(("192.0.2.10", 5), ("198.51.100.1", 6), ((PP2_TYPE_ALPN, b"imap"), (PP2_TYPE_AUTHORITY, b"mx"))),
        ProxyHeader(
            2,
            False,
            "tcp4",
            ("192.0.2.10", 5),
            ("198.51.100.1", 6),
            ((PP2_TYPE_ALPN, b"imap"), (PP2_TYPE_AUTHORITY, b"mx")),
        ),
    ),
    # UNSPEC family with PROXY command: no address, the peer's counts
    (V2_SIGNATURE + b"\x21\x00\x00\x00", ProxyHeader(2, False, "unknown")),
    # AF_UNIX stream
    (
        V2_SIGNATURE + b"\x21\x31" + struct.pack("!H", 216) + b"/run/a".ljust(108, b"\0") + b"/run/b".ljust(108, b"\0"),
        ProxyHeader(2, False, "unix", ("/run/a", 0), ("/run/b", 0)),
    ),
]

INVALID: list[bytes] = [
    b"GET / HTTP/1.1\r\n",
    b"a1 LOGIN user pass\r\n",
    b"PROXY TCP4 192.0.2.10 198.51.100.1 56324\r\n",  # a field short
    b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 993 extra\r\n",
    b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n",  # v6 address under TCP4
    b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n",
    b"PROXY TCP4 192.0.2.010 198.51.100.1 1 2\r\n",  # leading zero: ambiguous, refused
    b"PROXY TCP4 192.0.2.10 198.51.100.1 65536 2\r\n",
    b"PROXY TCP4 192.0.2.10 198.51.100.1 01 2\r\n",
    b"PROXY TCP4 192.0.2.10 198.51.100.1 -1 2\r\n",
    b"PROXY TCP4  192.0.2.10 198.51.100.1 1 2\r\n",
    b"PROXY UDP4 192.0.2.10 198.51.100.1 1 2\r\n",
    b"PROXY TCP4 192.0.2.10 198.51.100.1 1 2\n",  # bare LF
    b"PROXY " + b"x" * 120,  # no CRLF within 107 bytes
    V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 in a v2 header
    V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # unknown command
    V2_SIGNATURE + b"\x21\x11\x00\x08" + bytes(8),  # INET block too short
    V2_SIGNATURE + b"\x21\x41\x00\x00",  # unknown family
    V2_SIGNATURE + b"\x21\x11\x00\x0e" + bytes(12) + b"\x01\x00",  # truncated TLV
    V2_SIGNATURE + b"\x21\x11\x00\x10" + bytes(12) + b"\x01\x00\x05x",  # TLV past the end
    V2_SIGNATURE + b"\x21\x11\xff\xff",  # too long to accept
]


def feed_all(chunks: list[bytes]) -> ProxyReceiver:
    rx = ProxyReceiver()
    for c in chunks:
        rx.feed(c)
    return rx


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_valid_whole_split_and_trailing(data: bytes, expected: ProxyHeader) -> None:
    assert parse(data) == (expected, len(data))
    trailing = b"* OK later protocol data\r\n"
    assert parse(data + trailing) == (expected, len(data))
    # every byte boundary: NEED_DATA until the last byte, then the header, then the rest
    rx = ProxyReceiver()
    for i in range(len(data) - 1):
        rx.feed(data[i : i + 1])
        assert rx.next_event() is NEED_DATA, i
    rx.feed(data[-1:] + trailing[:5])
    assert rx.next_event() == expected
    rx.feed(trailing[5:])
    assert rx.trailing == trailing
    assert rx.next_event() is NEED_DATA  # the header comes once


@pytest.mark.parametrize("data", INVALID)
def test_invalid(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(data)
    rx = ProxyReceiver()
    with pytest.raises(ProxyProtocolError):
        for i in range(len(data)):
            rx.feed(data[i : i + 1])
            rx.next_event()


def test_client_ip_and_tlv() -> None:
    (h, _) = parse(build_v2(("203.0.113.7", 4000), ("198.51.100.1", 25), ((PP2_TYPE_ALPN, b"smtp"),)))  # type: ignore[misc]
    assert h.client_ip == "203.0.113.7" and h.tlv(PP2_TYPE_ALPN) == b"smtp" and h.tlv(0x99) is None
    (local, _) = parse(build_v2(None, None))  # type: ignore[misc]
    assert local.local and local.client_ip is None
    (unk, _) = parse(b"PROXY UNKNOWN\r\n")  # type: ignore[misc]
    assert unk.client_ip is None


def test_builders_round_trip() -> None:
    for src, dst in ((("192.0.2.1", 1), ("192.0.2.2", 2)), (("2001:db8::5", 7), ("2001:db8::6", 8))):
        h1, _ = parse(build_v1(src, dst))  # type: ignore[misc]
        h2, _ = parse(build_v2(src, dst))  # type: ignore[misc]
        assert h1.source == h2.source == src and h1.destination == h2.destination == dst


def test_crc32c_checked() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value
    good = build_v2(("192.0.2.1", 1), ("192.0.2.2", 2), ((PP2_TYPE_ALPN, b"pop3"),), with_crc=True)
    h, n = parse(good)  # type: ignore[misc]
    assert n == len(good) and h.tlv(proxy.PP2_TYPE_CRC32C) is not None
    bad = bytearray(good)
    bad[20] ^= 0x01  # a flipped address bit
    with pytest.raises(ProxyProtocolError, match="CRC32C"):
        parse(bytes(bad))


def test_prefixes_need_data_not_errors() -> None:
    for whole in (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", build_v2(("192.0.2.1", 1), ("192.0.2.2", 2))):
        for i in range(len(whole)):
            assert parse(whole[:i]) is None


@given(st.binary(max_size=300))
@example(V2_SIGNATURE + b"\x21\x11\x00\x0c")
@example(b"PROXY TCP4 \xff\xfe 1.2.3.4 1 2\r\n")
@example(b"PROXY TCP6 ::1 ::1 1 2\r\n")
def test_arbitrary_bytes_parse_or_raise_protocol_error(data: bytes) -> None:
    try:
        got = parse(data)
    except ProxyProtocolError:
        return
    if got is not None:
        header, used = got
        assert 0 < used <= len(data) and header.version in (1, 2)


@given(st.binary(max_size=64))
def test_anything_after_a_v2_signature(rest: bytes) -> None:
    with contextlib.suppress(ProxyProtocolError):
        parse(V2_SIGNATURE + rest)


def test_sans_io_module_never_imports_asyncio() -> None:
    text = Path(proxy.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+asyncio", text, re.M)


def test_trusted_proxies() -> None:
    nets = ("10.0.0.0/8", "2001:db8::/32")
    assert is_trusted("10.1.2.3", nets) and is_trusted("::ffff:10.1.2.3", nets) and is_trusted("2001:db8::9", nets)
    assert not is_trusted("192.0.2.1", nets) and not is_trusted("not an ip", nets)
    assert not is_trusted("10.1.2.3", ()) and not is_trusted("10.1.2.3", ("garbage",))
