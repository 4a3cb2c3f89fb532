"""Header-level pieces: RFC 2047 words, RFC 2231 parameters, addresses, base subject, dates,
IMAP string syntax, and the parser's tolerance rules on small hand-made messages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postfach.mail import (
    Address,
    MessageInfo,
    address,
    base_subject,
    decode_2047,
    decoded_part_bytes,
    header_values,
    imap_bodystructure,
    imap_envelope,
    parse_addr_spec,
    parse_address_list,
    parse_date,
    parse_message,
    section_bytes,
)
from postfach.mail.headers import decode_params, parse_content_type
from postfach.mail.imap import string_bytes
from postfach.mail.parser import MAX_DEPTH

# --- RFC 2047 ---


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        ("plain", "plain"),
        ("=?ISO-8859-1?Q?a?=", "a"),
        ("=?ISO-8859-1?Q?a?= b", "a b"),
        # RFC 2047 §8: whitespace between adjacent encoded words is dropped
        ("=?ISO-8859-1?Q?a?= =?ISO-8859-1?Q?b?=", "ab"),
        ("=?ISO-8859-1?Q?a?=  \r\n  =?ISO-8859-1?Q?b?=", "ab"),
        ("=?ISO-8859-1?Q?a_b?=", "a b"),
        ("=?ISO-8859-1?Q?a?= =?ISO-8859-2?Q?_b?=", "a b"),
        ("=?utf-8?b?w6TDtsO8?=", "äöü"),
        ("=?utf-8?B?w6TDtsO8?=", "äöü"),  # missing padding tolerated below
        ("=?utf-8?b?w6TDtsO8?", "=?utf-8?b?w6TDtsO8?"),  # unterminated: left alone
        ("=?x-unknown?q?abc?=", "abc"),
        ("=?utf-8*en?q?abc?=", "abc"),  # RFC 2231 §5 language
        ("=?utf-8?q?caf=E9?=", "caf\ufffd"),  # bad UTF-8 replaced, never raises
    ],
)
def test_decode_2047(raw: str, decoded: str) -> None:
    assert decode_2047(raw) == decoded


def test_decode_2047_bad_base64_padding() -> None:
    assert decode_2047("=?utf-8?b?w6TDtsO?=").startswith("äö")


# --- RFC 2045 / 2231 parameters ---


def test_content_type_basic() -> None:
    assert parse_content_type('Text/HTML; Charset="UTF-8"; format=flowed') == (
        "Text",
        "HTML",
        (("Charset", "UTF-8"), ("format", "flowed")),
    )
    assert parse_content_type("text/plain (comment); charset=us-ascii (more)") == (
        "text",
        "plain",
        (("charset", "us-ascii"),),
    )
    assert parse_content_type('multipart/mixed; boundary="a;b=c\\"d"') == (
        "multipart",
        "mixed",
        (("boundary", 'a;b=c"d'),),
    )


@pytest.mark.parametrize("bad", ["", "text", "text/", "/plain", "te xt/plain", "this is not; a=b", "t\u00e9xt/plain"])
def test_content_type_invalid(bad: str) -> None:
    assert parse_content_type(bad) is None


def test_rfc2231_examples() -> None:
    # RFC 2231 §3 and §4 examples
    assert decode_params(' URL*0="ftp://";\r\n URL*1="cs.utk.edu/pub/moore/bulk-mailer/bulk-mailer.tar"') == (
        ("URL", "ftp://cs.utk.edu/pub/moore/bulk-mailer/bulk-mailer.tar"),
    )
    assert decode_params(" title*=us-ascii'en-us'This%20is%20%2A%2A%2Afun%2A%2A%2A") == (
        ("title", "This is ***fun***"),
    )
    assert decode_params(
        " title*0*=us-ascii'en'This%20is%20even%20more%20;\r\n"
        " title*1*=%2A%2A%2Afun%2A%2A%2A%20;\r\n"
        ' title*2="isn\'t it!"'
    ) == (("title", "This is even more ***fun*** isn't it!"),)


def test_rfc2231_charset_order_and_precedence() -> None:
    # sections out of order, latin-1 charset, and the 2231 value wins over a plain one
    assert decode_params(" name=fallback.txt; name*1*=%E9.txt; name*0*=iso-8859-1''caf; x=1") == (
        ("name", "café.txt"),
        ("x", "1"),
    )
    # broken percent escapes and an unknown charset never raise
    assert decode_params(" a*=bogus''%zz%4") == (("a", "%zz%4"),)


def test_params_first_occurrence_wins_case_insensitively() -> None:
    assert decode_params(" charset=a; CHARSET=b") == (("charset", "a"),)


# --- addresses ---


def test_address_forms() -> None:
    assert parse_address_list('"Last, First" <first.last@example.com>, plain@example.org') == [
        Address("Last, First", None, "first.last", "example.com"),
        Address(None, None, "plain", "example.org"),
    ]
    assert parse_address_list("Pete(A nice \\) chap) <pete(his account)@silly.test(his host)>") == [
        Address("Pete", None, "pete", "silly.test")
    ]
    assert parse_address_list("=?utf-8?q?J=C3=B6rg?= <j@example.de>") == [
        Address("=?utf-8?q?J=C3=B6rg?=", None, "j", "example.de")
    ]
    assert parse_address_list("<>") == [Address(None, None, "", "")]
    assert parse_address_list("") == []
    assert parse_address_list(" , ,") == []
    # no domain: host is "" (never NIL, which would be a group marker)
    assert parse_address_list("localuser") == [Address(None, None, "localuser", "")]
    assert parse_address_list("a@[192.0.2.1]") == [Address(None, None, "a", "[192.0.2.1]")]


def test_address_groups() -> None:
    # RFC 5322 A.1.3
    assert parse_address_list(
        "A Group:Ed Jones <c@a.test>,joe@where.test,John <jdoe@one.test>;, Undisclosed recipients:;"
    ) == [
        Address(None, None, "A Group", None),
        Address("Ed Jones", None, "c", "a.test"),
        Address(None, None, "joe", "where.test"),
        Address("John", None, "jdoe", "one.test"),
        Address(None, None, None, None),
        Address(None, None, "Undisclosed recipients", None),
        Address(None, None, None, None),
    ]
    # an unterminated group is closed at the end
    assert parse_address_list("g: a@b.c") == [
        Address(None, None, "g", None),
        Address(None, None, "a", "b.c"),
        Address(None, None, None, None),
    ]


@pytest.mark.parametrize(
    "garbage",
    ['"unterminated <a@b', "<<<>>>", "@@@", ":;:;", "(((", "a@b@c", '\\"', "a <b@c> d <e@f>", "\x00\x01"],
)
def test_address_garbage_never_raises(garbage: str) -> None:
    for a in parse_address_list(garbage):
        assert isinstance(a, Address)


@pytest.mark.parametrize(
    ("s", "expected"),
    [
        ("user@example.com", ("user", "example.com")),
        ("<user@example.com>", ("user", "example.com")),
        ("first.last+tag@sub.example.co.uk", ("first.last+tag", "sub.example.co.uk")),
        ('"john doe"@example.com', ('"john doe"', "example.com")),
        ("user@[192.0.2.1]", ("user", "[192.0.2.1]")),
        ("jörg@bücher.example", ("jörg", "bücher.example")),  # RFC 6531
        ("", None),
        ("<>", None),
        ("user", None),
        ("user@", None),
        ("@example.com", None),
        ("us er@example.com", None),
        ("user@exa mple.com", None),
        ("user@-example.com", None),
        ("user@example..com", None),
        (".user@example.com", None),
        ("a@b@c", None),
    ],
)
def test_parse_addr_spec(s: str, expected: tuple[str, str] | None) -> None:
    assert parse_addr_spec(s) == expected


# --- RFC 5256 §2.1 base subject ---


@pytest.mark.parametrize(
    ("subject", "base"),
    [
        ("Re: hello", "hello"),
        ("RE: Re: re:hello", "hello"),
        ("Fwd: hello", "hello"),
        ("Fw: hello", "hello"),
        ("re [foo]: hello", "hello"),
        ("[list] Re: hello", "hello"),
        ("[list] [other] Re: hello", "hello"),
        ("hello (fwd)", "hello"),
        ("hello (Fwd) (fwd)  ", "hello"),
        ("[Fwd: Re: hello]", "hello"),
        ("[fwd: [list] hello (fwd)]", "hello"),
        ("[list]", "[list]"),  # a blob is kept when nothing else would be left
        ("  spaced \t  out  ", "spaced out"),
        ("Re:", ""),
        ("", ""),
        ("Reply: hello", "Reply: hello"),
    ],
)
def test_base_subject(subject: str, base: str) -> None:
    assert base_subject(subject) == base


def test_base_subject_is_linear() -> None:
    assert base_subject("Re: " * 20000 + "x") == "x"
    assert base_subject("x" + " (fwd)" * 20000) == "x"
    assert base_subject("[" * 20000) == "[" * 20000


# --- dates ---


def test_parse_date() -> None:
    assert parse_date("Fri, 21 Nov 1997 09:55:06 -0600") == datetime(
        1997, 11, 21, 9, 55, 6, tzinfo=timezone(timedelta(hours=-6))
    )
    assert parse_date("21 Nov 97 09:55:06 GMT") == datetime(1997, 11, 21, 9, 55, 6, tzinfo=UTC)
    assert parse_date("Thu, 13 Feb 1969 23:32 -0330 (Newfoundland Time)") == datetime(
        1969, 2, 13, 23, 32, tzinfo=timezone(timedelta(hours=-3, minutes=-30))
    )
    for bad in ("", "yesterday", "32 Foo 2020 99:99:99 +9999", "Mon, 1 Jan 2020 25:00:00 +0000"):
        assert parse_date(bad) is None
    # RFC 5322 §4.3 obsolete two-digit years
    assert parse_date("1 Jan 0 00:00:00 +0000") == datetime(2000, 1, 1, tzinfo=UTC)
    d = parse_date("1 Jan 2024 00:00:00 +0000")
    assert d is not None and d.tzinfo is not None


# --- IMAP string syntax (RFC 3501 §4.3, §9) ---


@pytest.mark.parametrize(
    ("raw", "wire"),
    [
        (b"", b'""'),
        (b"abc", b'"abc"'),
        (b'a"b\\c', b'"a\\"b\\\\c"'),
        (b"tab\there", b'"tab\there"'),
        (b"caf\xc3\xa9", b"{5}\r\ncaf\xc3\xa9"),
        (b"two\r\nlines", b"{10}\r\ntwo\r\nlines"),
        (b"nul\x00byte", b'"nulbyte"'),
    ],
)
def test_string_bytes(raw: bytes, wire: bytes) -> None:
    assert string_bytes(raw) == wire


# --- tolerance rules on small messages ---


def test_empty_and_tiny_inputs() -> None:
    for data in (b"", b"\n", b"\r\n", b"x", b":", b"\r", b"Subject: only a header"):
        info = parse_message(data)
        assert info.size == len(data)
        assert info.root.body_end == len(data)
        imap_envelope(info)
        imap_bodystructure(info, extended=True)
    info = parse_message(b"Subject: only a header")
    assert info.subject == "only a header" and info.root.size == 0


def test_folded_header_unfolding_in_envelope() -> None:
    data = b"Subject: a\r\n  folded\r\n\tsubject\r\nTo: x@y.z\r\n\r\n"
    info = parse_message(data)
    assert imap_envelope(info).startswith(b'(NIL "a  folded\tsubject" ')
    assert header_values(data, info, "subject") == ["a  folded\tsubject"]


def test_sender_and_reply_to_default_to_from() -> None:
    data = b"From: a@b.c\r\nSender:\r\nReply-To: r@b.c\r\n\r\n"
    assert imap_envelope(parse_message(data)) == (
        b'(NIL NIL ((NIL NIL "a" "b.c")) ((NIL NIL "a" "b.c")) ((NIL NIL "r" "b.c")) NIL NIL NIL NIL NIL)'
    )


def test_non_multipart_part_numbers() -> None:
    data = b"Content-Type: text/plain\r\n\r\nhello\r\n"
    info = parse_message(data)
    assert section_bytes(data, info, "1") == b"hello\r\n"
    assert section_bytes(data, info, "1.MIME") == b"Content-Type: text/plain\r\n\r\n"
    assert section_bytes(data, info, "2") == b""
    assert section_bytes(data, info, "TEXT") == b"hello\r\n"


def test_message_rfc822_non_multipart_inside() -> None:
    inner = b"Subject: inner\r\n\r\ninner body\r\n"
    data = b"Content-Type: message/rfc822\r\n\r\n" + inner
    info = parse_message(data)
    assert section_bytes(data, info, "1") == inner
    assert section_bytes(data, info, "1.1") == b"inner body\r\n"
    assert section_bytes(data, info, "1.HEADER") == b"Subject: inner\r\n\r\n"
    assert section_bytes(data, info, "1.TEXT") == b"inner body\r\n"
    assert imap_bodystructure(info, extended=False) == (
        b'("message" "rfc822" NIL NIL NIL "7BIT" %d (NIL "inner" NIL NIL NIL NIL NIL NIL NIL NIL) '
        b'("TEXT" "PLAIN" ("charset" "us-ascii") NIL NIL "7BIT" 12 1) 3)' % len(inner)
    )


def test_message_global_is_a_message() -> None:
    inner = "Subject: ünïcode\r\n\r\nbody\r\n".encode()
    data = b"Content-Type: message/global\r\n\r\n" + inner
    bs = imap_bodystructure(parse_message(data), extended=False)
    assert bs.startswith(
        b'("message" "global" NIL NIL NIL "7BIT" %d (NIL {9}\r\n\xc3\xbcn\xc3\xafcode NIL' % len(inner)
    )


def test_boundary_prefix_of_inner_boundary() -> None:
    """An inner boundary that extends the outer one must not end the outer part."""
    data = (
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\n"
        b'Content-Type: multipart/mixed; boundary="bb"\r\n\r\n'
        b"--bb\r\n\r\ninner\r\n--bb--\r\n"
        b"--b \t\r\n"  # transport padding after the delimiter
        b"\r\nsecond\r\n"
        b"--b--\r\n"
    )
    info = parse_message(data)
    assert len(info.root.children) == 2
    assert section_bytes(data, info, "1.1") == b"inner"
    assert section_bytes(data, info, "2") == b"second"


def test_empty_parts_and_adjacent_delimiters() -> None:
    data = b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n--x\r\n\r\nb\r\n--x--"
    info = parse_message(data)
    assert [section_bytes(data, info, s) for s in ("1", "2")] == [b"", b"b"]
    first = info.root.children[0]
    assert first.header_start == first.header_end == first.body_end


def test_close_delimiter_only() -> None:
    data = b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x--\r\n"
    info = parse_message(data)
    assert info.root.children == ()
    assert imap_bodystructure(info, extended=False) == (
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0) "mixed")'
    )


def test_deep_nesting_is_capped() -> None:
    depth = MAX_DEPTH + 50
    head = b"".join(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1) for i in range(depth))
    data = b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n" + head + b"leaf\r\n"
    info = parse_message(data)
    levels = 0
    part = info.root
    while part.children:
        part = part.children[0]
        levels += 1
    assert levels == MAX_DEPTH
    assert part.content_type == "multipart" and part.children == ()
    bs = imap_bodystructure(info, extended=True)
    assert bs.count(b"(") == bs.count(b")")
    assert MessageInfo.from_json(info.to_json()) == info
    # the same through message/rfc822
    msg = b"Content-Type: message/rfc822\r\n\r\n" * depth + b"x"
    info = parse_message(msg)
    bs = imap_bodystructure(info, extended=False)
    assert bs.count(b"(") == bs.count(b")")
    assert MessageInfo.from_json(info.to_json()) == info


def test_encoded_message_rfc822_and_binary_of_multipart() -> None:
    data = (
        b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\nContent-Type: text/plain\r\n\r\n"
        b"a=3Db=\r\nc\r\n--q--\r\n"
    )
    info = parse_message(data)
    assert decoded_part_bytes(data, info, "1") == b"a=bc"
    assert decoded_part_bytes(data, info, "1.2") == b""


def test_8bit_header_fallback_latin1() -> None:
    data = b"Subject: caf\xe9 \xff\r\n\r\n"
    info = parse_message(data)
    assert info.subject == "café ÿ"
    assert imap_envelope(info).startswith(b"(NIL {8}\r\ncaf\xc3\xa9 \xc3\xbf NIL")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=list("ab.- \t\r\n<>@,\xa0é"), max_size=40))
def test_address_fast_path_agrees_with_full_parser(value: str) -> None:
    simple = address._parse_simple(value)
    if simple is not None:
        assert simple == address._parse_full(value)


@pytest.mark.parametrize(
    "bad", [b"", b"[]", b'{"v": 0}', b'{"v": 1}', b'{"v": 1, "size": 1, "root": [], "env": []}', b"\xff"]
)
def test_from_json_rejects_foreign_input(bad: bytes) -> None:
    with pytest.raises(ValueError):
        MessageInfo.from_json(bad)
