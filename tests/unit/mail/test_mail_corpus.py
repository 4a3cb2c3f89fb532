"""The corpus in tests/corpus: ENVELOPE / BODYSTRUCTURE written by hand from RFC 3501 §7.4.2
(sizes come from the literal part texts below, not from our output), sections, search text."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from postfach.mail import (
    BodyPart,
    MessageInfo,
    decoded_part_bytes,
    header_fields,
    header_values,
    imap_bodystructure,
    imap_envelope,
    parse_message,
    search_text,
    section_bytes,
)

CORPUS = Path(__file__).resolve().parents[2] / "corpus"
NAMES = sorted(p.name for p in CORPUS.glob("*.eml"))


def load(name: str) -> tuple[bytes, MessageInfo]:
    data = (CORPUS / name).read_bytes()
    return data, parse_message(data)


def walk(part: BodyPart) -> list[BodyPart]:
    out = [part]
    for c in part.children:
        out.extend(walk(c))
    if part.message is not None:
        out.extend(walk(part.message.root))
    return out


# --- properties every corpus message must have ---


def test_corpus_present() -> None:
    assert len(NAMES) >= 12


@pytest.mark.parametrize("name", NAMES)
def test_json_round_trip(name: str) -> None:
    _, info = load(name)
    again = MessageInfo.from_json(info.to_json())
    assert again == info
    assert again.to_json() == info.to_json()


@pytest.mark.parametrize("name", NAMES)
def test_offsets_consistent(name: str) -> None:
    data, info = load(name)
    assert info.size == len(data)
    assert info.root.header_start == 0 and info.root.body_end == len(data)
    for p in walk(info.root):
        assert 0 <= p.header_start <= p.header_end <= p.body_end <= len(data)
        assert p.size == p.body_end - p.header_end
        for c in p.children:
            assert p.header_end <= c.header_start and c.body_end <= p.body_end
        if p.message is not None:
            assert p.message.root.header_start == p.header_end
            assert p.message.root.body_end == p.body_end


# --- the RFC 3501 §6.4.5 part-numbering example, as a real message ---

PART3 = (
    b"From: carol@example.com\r\n"
    b"Subject: part 3\r\n"
    b'Content-Type: multipart/mixed; boundary="m3"\r\n'
    b"\r\n"
    b"--m3\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"part 3.1\r\n"
    b"--m3\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"\r\n"
    b"part 3.2\r\n"
    b"--m3--"  # the CRLF after it belongs to the next outer delimiter (RFC 2046 §5.1.1)
)
PART42 = (
    b"From: dave@example.com\r\n"
    b"Subject: part 4.2\r\n"
    b'Content-Type: multipart/mixed; boundary="m42"\r\n'
    b"\r\n"
    b"--m42\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"part 4.2.1\r\n"
    b"--m42\r\n"
    b'Content-Type: multipart/alternative; boundary="m422"\r\n'
    b"\r\n"
    b"--m422\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"part 4.2.2.1\r\n"
    b"--m422\r\n"
    b"Content-Type: text/richtext\r\n"
    b"\r\n"
    b"part 4.2.2.2\r\n"
    b"--m422--\r\n"
    b"\r\n"
    b"--m42--\r\n"
)


def _lines(b: bytes) -> int:
    return b.count(b"\n") + (0 if b.endswith(b"\n") else 1)


def test_nested_sections_body() -> None:
    _, info = load("nested_sections.eml")
    env3 = (
        b'(NIL "part 3" ((NIL NIL "carol" "example.com")) ((NIL NIL "carol" "example.com")) '
        b'((NIL NIL "carol" "example.com")) NIL NIL NIL NIL NIL)'
    )
    env42 = (
        b'(NIL "part 4.2" ((NIL NIL "dave" "example.com")) ((NIL NIL "dave" "example.com")) '
        b'((NIL NIL "dave" "example.com")) NIL NIL NIL NIL NIL)'
    )
    expected = (
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 6 1)'
        b'("application" "octet-stream" NIL NIL NIL "base64" 8)'
        b'("message" "rfc822" NIL NIL NIL "7BIT" %d ' % len(PART3) + env3 + b" "
        b'(("text" "plain" NIL NIL NIL "7BIT" 8 1)'
        b'("application" "octet-stream" NIL NIL NIL "7BIT" 8) "mixed") %d)'
        % _lines(PART3)
        + b'(("image" "gif" NIL NIL NIL "base64" 20)'
        b'("message" "rfc822" NIL NIL NIL "7BIT" %d ' % len(PART42) + env42 + b" "
        b'(("text" "plain" NIL NIL NIL "7BIT" 10 1)'
        b'(("text" "plain" NIL NIL NIL "7BIT" 12 1)("text" "richtext" NIL NIL NIL "7BIT" 12 1)'
        b' "alternative") "mixed") %d) "mixed") "mixed")' % _lines(PART42)
    )
    assert imap_bodystructure(info, extended=False) == expected
    assert imap_envelope(info) == (
        b'("Mon, 7 Feb 1994 21:52:25 -0800" "sections" (("Alice" NIL "alice" "example.com")) '
        b'(("Alice" NIL "alice" "example.com")) (("Alice" NIL "alice" "example.com")) '
        b'((NIL NIL "bob" "example.com")) NIL NIL NIL "<outer@example.com>")'
    )


def test_nested_sections_bodystructure_extension_data() -> None:
    _, info = load("nested_sections.eml")
    bs = imap_bodystructure(info, extended=True)
    assert bs.startswith(b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 6 1 NIL NIL NIL NIL)')
    assert bs.endswith(b' "mixed" ("boundary" "m4") NIL NIL NIL) "mixed" ("boundary" "outer") NIL NIL NIL)')
    assert b'"alternative" ("boundary" "m422") NIL NIL NIL)' in bs


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("1", b"part 1"),
        ("2", b"cGFydCAy"),
        ("3", PART3),
        ("3.1", b"part 3.1"),
        ("3.2", b"part 3.2"),
        ("3.1.MIME", b"Content-Type: text/plain\r\n\r\n"),
        ("3.HEADER", PART3[: PART3.index(b"\r\n\r\n") + 4]),
        ("3.TEXT", PART3[PART3.index(b"\r\n\r\n") + 4 :]),
        ("4.1", b"R0lGODlhAQABAAAAACw="),
        ("4.1.MIME", b"Content-Type: image/gif\r\nContent-Transfer-Encoding: base64\r\n\r\n"),
        ("4.2", PART42),
        ("4.2.HEADER", PART42[: PART42.index(b"\r\n\r\n") + 4]),
        ("4.2.TEXT", PART42[PART42.index(b"\r\n\r\n") + 4 :]),
        ("4.2.1", b"part 4.2.1"),
        ("4.2.2.1", b"part 4.2.2.1"),
        ("4.2.2.2", b"part 4.2.2.2"),
        ("4.2.2.2.MIME", b"Content-Type: text/richtext\r\n\r\n"),
        ("2.MIME", b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"),
        ("4.MIME", b'Content-Type: multipart/mixed; boundary="m4"\r\n\r\n'),
        # nonexistent parts and sections that only a message/rfc822 part has
        ("5", b""),
        ("0", b""),
        ("1.1", b""),
        ("3.3", b""),
        ("4.2.2.3", b""),
        ("1.HEADER", b""),
        ("2.TEXT", b""),
    ],
)
def test_nested_sections(section: str, expected: bytes) -> None:
    data, info = load("nested_sections.eml")
    assert section_bytes(data, info, section) == expected


def test_nested_top_level_sections() -> None:
    data, info = load("nested_sections.eml")
    header = section_bytes(data, info, "HEADER")
    assert header.startswith(b"From: Alice") and header.endswith(b'boundary="outer"\r\n\r\n')
    assert section_bytes(data, info, "TEXT") == data[len(header) :]
    assert section_bytes(data, info, "TEXT").startswith(b"This is the preamble.\r\n--outer\r\n")
    assert section_bytes(data, info, "") == data


def test_nested_header_fields() -> None:
    data, info = load("nested_sections.eml")
    assert header_fields(data, info, "", ["subject", "TO"], negate=False) == (
        b"To: bob@example.com\r\nSubject: sections\r\n\r\n"
    )
    assert header_fields(data, info, "3", ["Subject"], negate=False) == b"Subject: part 3\r\n\r\n"
    assert header_fields(data, info, "4.2", ["from"], negate=False) == b"From: dave@example.com\r\n\r\n"
    assert header_fields(data, info, "4.2", ["from", "subject"], negate=True) == (
        b'Content-Type: multipart/mixed; boundary="m42"\r\n\r\n'
    )
    assert header_fields(data, info, "", ["X-Missing"], negate=False) == b"\r\n"
    assert header_fields(data, info, "1", ["subject"], negate=False) == b""  # not a message
    assert header_fields(data, info, "9", ["subject"], negate=False) == b""
    # the same through section_bytes' convenience form
    assert section_bytes(data, info, "3.HEADER.FIELDS (SUBJECT)") == b"Subject: part 3\r\n\r\n"
    assert section_bytes(data, info, "HEADER.FIELDS.NOT (From To Subject Date Message-ID)") == (
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="outer"\r\n\r\n'
    )


def test_nested_binary() -> None:
    data, info = load("nested_sections.eml")
    assert decoded_part_bytes(data, info, "2") == b"part 2"
    assert decoded_part_bytes(data, info, "4.1") == b"GIF89a\x01\x00\x01\x00\x00\x00\x00,"
    assert decoded_part_bytes(data, info, "3.1") == b"part 3.1"
    assert decoded_part_bytes(data, info, "7") == b""
    assert decoded_part_bytes(data, info, "") == data


def test_nested_search_text() -> None:
    data, info = load("nested_sections.eml")
    text = search_text(data, info)
    for marker in ("part 1", "part 3.1", "part 4.2.1", "part 4.2.2.1", "part 4.2.2.2"):
        assert marker in text
    assert "part 3.2" not in text  # application/octet-stream is not text


# --- one test per corpus shape ---

PLAIN_QP = b"Hallo Bob,\r\nGr=C3=BC=C3=9Fe aus K=C3=B6ln, dies ist eine sehr lange Zeile die umbroch=\r\nen wird."
HTML_QP = b"<html><head><style>p {color: red}</style></head><body><p>Hallo <b>Bob</b>=\r\n &amp; Team</p></body></html>"


def test_alternative_qp() -> None:
    data, info = load("alternative_qp.eml")
    joerg = b'(("=?UTF-8?Q?J=C3=B6rg_M=C3=BCller?=" NIL "joerg" "shop.example"))'
    assert imap_envelope(info) == (
        b'("Tue, 02 Jan 2024 11:00:00 +0100" "=?UTF-8?Q?Gr=C3=BC=C3=9Fe?= =?UTF-8?Q?_aus_K=C3=B6ln?=" '
        + joerg
        + b" "
        + joerg
        + b" "
        + joerg
        + b" "
        b'(("Bob Example" NIL "bob" "example.com")) NIL NIL "<prev@example.com>" "<20240102.1@shop.example>")'
    )
    assert imap_bodystructure(info, extended=True) == (
        b'(("text" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" %d 3 NIL NIL NIL NIL)'
        b'("text" "html" ("charset" "utf-8") NIL NIL "quoted-printable" %d 2 NIL NIL NIL NIL)'
        b' "alternative" ("boundary" "=_alt_1") NIL NIL NIL)' % (len(PLAIN_QP), len(HTML_QP))
    )
    assert section_bytes(data, info, "1") == PLAIN_QP
    assert section_bytes(data, info, "2") == HTML_QP
    assert decoded_part_bytes(data, info, "1") == (
        "Hallo Bob,\r\nGrüße aus Köln, dies ist eine sehr lange Zeile die umbrochen wird.".encode()
    )
    # sort keys are decoded
    assert info.subject == "Grüße aus Köln"
    assert info.base_subject == "Grüße aus Köln"
    assert info.date == datetime(2024, 1, 2, 11, 0, tzinfo=timezone(timedelta(hours=1)))
    assert info.from_addr == "joerg" and info.to_addr == "bob" and info.cc_addr == ""
    assert info.display_from == "Jörg Müller"
    assert info.message_id == "<20240102.1@shop.example>"
    assert info.in_reply_to == "<prev@example.com>"
    assert list(info.references) == ["<root@example.com>", "<prev@example.com>"]
    assert header_values(data, info, "SUBJECT") == ["Grüße aus Köln"]
    assert header_values(data, info, "received") == [
        "from mx.shop.example (mx.shop.example [192.0.2.7])\tby mail.example.com with ESMTPS id 4Xy1;"
        "\tTue, 02 Jan 2024 10:00:00 +0000"
    ]
    text = search_text(data, info)
    assert "Grüße aus Köln, dies ist eine sehr lange Zeile die umbrochen wird." in text
    assert "& Team" in text and "Bob" in text
    assert "color" not in text and "<p>" not in text


def test_rfc2231_attachment() -> None:
    data, info = load("rfc2231_attachment.eml")
    assert imap_bodystructure(info, extended=True) == (
        b'(("text" "plain" ("charset" "iso-8859-1") NIL NIL "8bit" 6 1 NIL NIL NIL NIL)'
        b'("application" "pdf" ("name" "=?UTF-8?B?4oKsIHJhdGVzLnBkZg==?=") "<pdf1@example.org>" '
        b'"Rates (Q3)" "base64" 12 "Q2hlY2sgSW50ZWdyaXR5IQ==" '
        b'("attachment" ("filename*" "utf-8\'\'%E2%82%AC%20rates.pdf" "size" "12")) '
        b'("en" "de") "http://example.org/rates.pdf")'
        b' "mixed" ("boundary" "----=_Part_0_12345") NIL NIL NIL)'
    )
    pdf = info.root.children[1]
    assert pdf.disposition == ("attachment", (("filename", "€ rates.pdf"), ("size", "12")))
    assert pdf.language == ("en", "de")
    assert pdf.param("NAME") == "=?UTF-8?B?4oKsIHJhdGVzLnBkZg==?="
    assert decoded_part_bytes(data, info, "2") == b"%PDF-1.4\n"
    assert "Prévu." in search_text(data, info)  # latin-1 body decoded by its charset


def test_utf8_and_latin1_headers() -> None:
    data, info = load("utf8_headers.eml")
    joerg = b'(({5}\r\nJ\xc3\xb6rg NIL "joerg" "example.de"))'
    assert imap_envelope(info) == (
        b'("1 Mar 2024 12:00:00 -0000" {17}\r\nGr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln '
        + joerg
        + b" "
        + joerg
        + b" "
        + joerg
        + b" "
        # quoted-string escapes (RFC 3501 §4.3)
        b'(("Hans \\"the boss\\" Meier" NIL "hans" "example.de")) '
        # a latin-1 header is decoded as latin-1 and sent as UTF-8
        b'(({5}\r\nRen\xc3\xa9 NIL "rene" "example.fr")) NIL NIL "<utf8@example.de>")'
    )
    assert info.subject == "Grüße aus Köln"
    assert info.date == datetime(2024, 3, 1, 12, 0, tzinfo=UTC)  # -0000: UTC
    assert info.cc_addr == "rene"
    assert info.display_from == "Jörg"
    assert header_values(data, info, "cc") == ["René <rene@example.fr>"]
    assert search_text(data, info).strip() == "Köln ist schön."


def test_missing_and_duplicate_headers() -> None:
    data, info = load("missing_and_duplicate_headers.eml")
    # first occurrence wins; absent fields are NIL
    first = b'((NIL NIL "first" "example.com"))'
    assert imap_envelope(info) == (
        b'(NIL "first subject" ' + first + b" " + first + b" " + first + b" NIL NIL NIL NIL NIL)"
    )
    body = b"just a body\r\nwithout content type\r\n"
    assert imap_bodystructure(info, extended=False) == (
        b'("TEXT" "PLAIN" ("charset" "us-ascii") NIL NIL "7BIT" %d 2)' % len(body)
    )
    assert section_bytes(data, info, "1") == body
    assert section_bytes(data, info, "TEXT") == body
    assert header_values(data, info, "Subject") == ["first subject", "second subject"]
    assert info.date is None and info.subject == "first subject" and info.to_addr == ""


def test_bare_lf() -> None:
    data, info = load("bare_lf.eml")
    assert imap_bodystructure(info, extended=False) == (
        b'(("text" "plain" NIL NIL NIL "7BIT" 14 2)("text" "html" NIL NIL NIL "7BIT" 11 1) "alternative")'
    )
    assert section_bytes(data, info, "1") == b"plain\nline two"
    assert section_bytes(data, info, "2") == b"<p>html</p>"
    assert section_bytes(data, info, "1.MIME") == b"Content-Type: text/plain\n\n"
    assert section_bytes(data, info, "HEADER").endswith(b"boundary=lfb\n\n")
    assert header_fields(data, info, "", ["subject"], negate=False) == b"Subject: bare LF\n\r\n"


def test_no_final_newline() -> None:
    data, info = load("no_final_newline.eml")
    assert not data.endswith(b"\n")
    assert imap_bodystructure(info, extended=False) == (
        b'(("text" "plain" NIL NIL NIL "7BIT" 5 1)("text" "plain" NIL NIL NIL "7BIT" 25 1) "mixed")'
    )
    assert section_bytes(data, info, "2") == b"last line without newline"
    assert info.root.children[1].body_end == len(data)


def test_groups_and_routes() -> None:
    _, info = load("groups_and_routes.eml")
    joe = b'(("Joe Q. Public" NIL "john.q.public" "example.com"))'
    assert imap_envelope(info) == (
        b'("Fri, 21 Nov 1997 09:55:06 -0600" "Re: Fwd: [list] groups (fwd)" ' + joe + b" "
        # a comment is the only name this Sender has
        b'(("Joe Q" NIL "joe" "example.com")) '
        # source route -> adl
        b'((NIL "@relay1.example,@relay2.example" "joe" "example.com")) '
        # RFC 3501 §7.4.2 group syntax: (NIL NIL "group" NIL) ... (NIL NIL NIL NIL)
        b'((NIL NIL "A Group" NIL)(NIL NIL "alice" "example.com")("Bob B" NIL "bob" "example.com")'
        b'(NIL NIL NIL NIL)(NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL)) '
        # quoted local part loses its quoting
        b'((NIL NIL "john doe" "example.com")("Mary Smith" NIL "mary" "x.test")(NIL NIL "jdoe" "example.org")) '
        # empty Bcc is NIL
        b'NIL "<1234@local.machine.example>" "<5678.21-Nov-1997@example.com>")'
    )
    assert info.base_subject == "groups"  # RFC 5256 §2.1
    assert info.to_addr == "alice"  # first mailbox, past the group marker
    assert info.cc_addr == "john doe"
    assert info.date == datetime(1997, 11, 21, 9, 55, 6, tzinfo=timezone(timedelta(hours=-6)))


def test_broken_boundary() -> None:
    data, info = load("broken_boundary.eml")
    one = b"one\r\n--bbX not a delimiter"
    two = b"two runs to the end\r\n"
    assert imap_bodystructure(info, extended=False) == (
        b'(("text" "plain" NIL NIL NIL "7BIT" %d 2)("text" "plain" NIL NIL NIL "7BIT" %d 1) "mixed")'
        % (len(one), len(two))
    )
    assert section_bytes(data, info, "1") == one
    assert section_bytes(data, info, "2") == two


def test_multipart_without_boundary() -> None:
    """Like Dovecot: multipart/* without a boundary is a single part of that type."""
    data, info = load("multipart_without_boundary.eml")
    body = b"--whatever\r\nContent-Type: text/plain\r\n\r\ntext\r\n"
    assert imap_bodystructure(info, extended=False) == b'("multipart" "mixed" NIL NIL NIL "7BIT" %d)' % len(body)
    assert imap_bodystructure(info, extended=True) == (
        b'("multipart" "mixed" NIL NIL NIL "7BIT" %d NIL NIL NIL NIL)' % len(body)
    )
    assert not info.root.is_multipart
    assert section_bytes(data, info, "1") == body
    assert section_bytes(data, info, "TEXT") == body
    assert decoded_part_bytes(data, info, "1") == body


def test_garbage_content_type_and_unknown_cte() -> None:
    data, info = load("garbage_content_type.eml")
    # RFC 2045 §5.2: a syntactically invalid Content-Type means text/plain; charset=us-ascii
    assert imap_bodystructure(info, extended=False) == (
        b'("TEXT" "PLAIN" ("charset" "us-ascii") NIL NIL "x-unknown-cte" 6 1)'
    )
    assert section_bytes(data, info, "1") == b"body\r\n"
    assert decoded_part_bytes(data, info, "1") is None  # RFC 3516 UNKNOWN-CTE


def test_digest_default_type() -> None:
    data, info = load("digest.eml")
    inner = b"From: one@example.com\r\nSubject: first\r\n\r\none"
    one = b'((NIL NIL "one" "example.com"))'
    assert imap_bodystructure(info, extended=False) == (
        # RFC 2046 §5.1.5: parts of a digest default to message/rfc822
        b'(("MESSAGE" "RFC822" NIL NIL NIL "7BIT" %d (NIL "first" ' % len(inner)
        + one
        + b" "
        + one
        + b" "
        + one
        + b" NIL NIL NIL NIL NIL) "
        b'("TEXT" "PLAIN" ("charset" "us-ascii") NIL NIL "7BIT" 3 1) 4)'
        b'("text" "plain" NIL NIL NIL "7BIT" 13 1) "digest")'
    )
    assert section_bytes(data, info, "1") == inner
    assert section_bytes(data, info, "1.1") == b"one"
    assert section_bytes(data, info, "1.HEADER") == b"From: one@example.com\r\nSubject: first\r\n\r\n"
