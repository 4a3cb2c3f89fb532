"""The examples of RFC 3501 itself: the expected strings are copied from the RFC text."""

from __future__ import annotations

from postfach.mail import (
    imap_bodystructure,
    imap_envelope,
    parse_message,
    section_bytes,
)

# RFC 3501 §8 sample session, message 12 (header as shown for BODY[HEADER])
RFC3501_HEADER = (
    b"Date: Wed, 17 Jul 1996 02:23:25 -0700 (PDT)\r\n"
    b"From: Terry Gray <gray@cac.washington.edu>\r\n"
    b"Subject: IMAP4rev1 WG mtg summary and minutes\r\n"
    b"To: imap@cac.washington.edu\r\n"
    b"cc: minutes@CNRI.Reston.VA.US, John Klensin <KLENSIN@MIT.EDU>\r\n"
    b"Message-Id: <B27397-0100000@cac.washington.edu>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n"
    b"\r\n"
)

RFC3501_ENVELOPE = (
    b'("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)" '
    b'"IMAP4rev1 WG mtg summary and minutes" '
    b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
    b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
    b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
    b'((NIL NIL "imap" "cac.washington.edu")) '
    b'((NIL NIL "minutes" "CNRI.Reston.VA.US")'
    b'("John Klensin" NIL "KLENSIN" "MIT.EDU")) NIL NIL '
    b'"<B27397-0100000@cac.washington.edu>")'
)


def _lines(count: int, total: int) -> bytes:
    """``count`` CRLF-terminated lines of exactly ``total`` octets."""
    width = total // count
    lines = [b"x" * (width - 2) + b"\r\n" for _ in range(count - 1)]
    last = total - width * (count - 1)
    lines.append(b"y" * (last - 2) + b"\r\n")
    body = b"".join(lines)
    assert len(body) == total and body.count(b"\n") == count
    return body


def test_fetch_full_example() -> None:
    """§8: ENVELOPE and BODY ("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 3028 92)."""
    data = RFC3501_HEADER + _lines(92, 3028)
    info = parse_message(data)
    assert imap_envelope(info) == RFC3501_ENVELOPE
    assert imap_bodystructure(info, extended=False) == (
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 3028 92)'
    )
    # body-ext-1part: md5, disposition, language, location
    assert imap_bodystructure(info, extended=True) == (
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 3028 92 NIL NIL NIL NIL)'
    )
    assert section_bytes(data, info, "HEADER") == RFC3501_HEADER
    assert section_bytes(data, info, "") == data
    assert info.size == len(data)


def test_two_part_example_of_7_4_2() -> None:
    """§7.4.2: a text part and a BASE64-encoded text attachment."""
    text = _lines(23, 1152)
    # 73 lines, 4554 octets of base64: 14 lines of 62 characters and 59 of 60
    b64 = b"".join([b"A" * 62 + b"\r\n"] * 14 + [b"A" * 60 + b"\r\n"] * 59)
    assert len(b64) == 4554
    data = (
        b"From: Terry Gray <gray@cac.washington.edu>\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: MULTIPART/MIXED; BOUNDARY="0-1"\r\n'
        b"\r\n"
        b"--0-1\r\n"
        b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n"
        b"\r\n" + text + b"\r\n"
        b"--0-1\r\n"
        b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII; NAME=cc.diff\r\n"
        b"Content-ID: <960723163407.20117h@cac.washington.edu>\r\n"
        b"Content-Description: Compiler diff\r\n"
        b"Content-Transfer-Encoding: BASE64\r\n"
        b"\r\n" + b64 + b"\r\n"
        b"--0-1--\r\n"
    )
    info = parse_message(data)
    assert imap_bodystructure(info, extended=False) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1152 23)'
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII" "NAME" "cc.diff") '
        b'"<960723163407.20117h@cac.washington.edu>" "Compiler diff" '
        b'"BASE64" 4554 73) "MIXED")'
    )
    # body-ext-mpart: parameters, disposition, language, location follow the subtype
    assert imap_bodystructure(info, extended=True) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1152 23 NIL NIL NIL NIL)'
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII" "NAME" "cc.diff") '
        b'"<960723163407.20117h@cac.washington.edu>" "Compiler diff" '
        b'"BASE64" 4554 73 NIL NIL NIL NIL) "MIXED" ("BOUNDARY" "0-1") NIL NIL NIL)'
    )
    assert section_bytes(data, info, "1") == text
    assert section_bytes(data, info, "2") == b64


def test_envelope_of_message_without_headers() -> None:
    info = parse_message(b"\r\nbody only\r\n")
    assert imap_envelope(info) == b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"
    # RFC 2045 §5.2 default type; "7BIT" default encoding
    assert imap_bodystructure(info, extended=False) == (b'("TEXT" "PLAIN" ("charset" "us-ascii") NIL NIL "7BIT" 11 1)')
