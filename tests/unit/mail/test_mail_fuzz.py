"""Hypothesis: parse_message never raises, every offset lies inside the data, the JSON cache
round-trips, and ENVELOPE / BODYSTRUCTURE are always well-formed IMAP (checked by a small
independent reader of the RFC 3501 §9 syntax)."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

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

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- a minimal reader for IMAP s-expressions: NIL, numbers, quoted strings, literals, lists ---

_ATOM = re.compile(rb"NIL|[0-9]+")


def _read(b: bytes, pos: int) -> int:
    """Read one value at ``pos``; return the position after it (raise ValueError if invalid)."""
    c = b[pos : pos + 1]
    if c == b"(":
        pos += 1
        first = True
        while b[pos : pos + 1] != b")":
            if not first and b[pos : pos + 1] == b" ":
                pos += 1
            pos = _read(b, pos)
            first = False
        return pos + 1
    if c == b'"':
        pos += 1
        while True:
            ch = b[pos : pos + 1]
            if ch in (b"", b"\r", b"\n") or ch[0] > 127 or ch == b"\x00":
                raise ValueError("bad quoted char")
            if ch == b"\\":
                if b[pos + 1 : pos + 2] not in (b"\\", b'"'):
                    raise ValueError("bad escape")
                pos += 2
                continue
            pos += 1
            if ch == b'"':
                return pos
    if c == b"{":
        end = b.index(b"}\r\n", pos)
        n = int(b[pos + 1 : end])
        data = b[end + 3 : end + 3 + n]
        if len(data) != n or b"\x00" in data:
            raise ValueError("bad literal")
        return end + 3 + n
    m = _ATOM.match(b, pos)
    if m is None:
        raise ValueError(f"unexpected {b[pos : pos + 20]!r}")
    return m.end()


def well_formed(b: bytes) -> bool:
    return b.startswith(b"(") and _read(b, 0) == len(b)


def walk(part: BodyPart, path: str = "") -> list[tuple[str, BodyPart]]:
    out = [(path, part)]
    for i, c in enumerate(part.children, 1):
        out.extend(walk(c, f"{path}.{i}" if path else str(i)))
    if part.message is not None:
        out.extend(walk(part.message.root, path))
    return out


def check(data: bytes) -> MessageInfo:
    info = parse_message(data)
    n = len(data)
    assert info.size == n
    assert info.root.header_start == 0 and info.root.body_end == n
    for _, p in walk(info.root):
        assert 0 <= p.header_start <= p.header_end <= p.body_end <= n
        assert p.size == p.body_end - p.header_end
        assert p.lines >= 0
        for c in p.children:
            assert p.header_end <= c.header_start <= c.body_end <= p.body_end
        if p.message is not None:
            assert p.message.root.header_start == p.header_end
            assert p.message.root.body_end == p.body_end
    assert MessageInfo.from_json(info.to_json()) == info
    assert well_formed(imap_envelope(info))
    assert well_formed(imap_bodystructure(info, extended=True))
    assert well_formed(imap_bodystructure(info, extended=False))
    for path, _ in walk(info.root)[:20]:
        for suffix in ("", ".MIME", ".HEADER", ".TEXT"):
            section_bytes(data, info, path + suffix if path else suffix.lstrip("."))
        decoded_part_bytes(data, info, path)
        header_fields(data, info, path, ["subject", "from"], negate=True)
    header_values(data, info, "subject")
    search_text(data, info)
    return info


@SETTINGS
@given(st.binary(max_size=2000))
@example(b"")
@example(b"\r\n\r\n")
@example(b"Content-Type: multipart/mixed; boundary=\r\n\r\n--\r\n")
@example(b'Content-Type: multipart/mixed; boundary="a"\r\n\r\n--a')
@example(b"Content-Type: message/rfc822\r\n\r\nContent-Type: message/rfc822\r\n\r\n")
@example(b'To: (((((\r\nFrom: "\\\r\nSubject: =?x?b?===?=\r\n\r\n')
def test_arbitrary_bytes(data: bytes) -> None:
    check(data)


_FRAGMENTS = [
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\t",
    b"--b",
    b"--b--",
    b"--c",
    b"--c--",
    b"Content-Type: multipart/mixed; boundary=b",
    b'Content-Type: multipart/alternative; boundary="c"',
    b"Content-Type: multipart/digest; boundary=c",
    b"Content-Type: message/rfc822",
    b"Content-Type: text/plain; charset=utf-8",
    b"Content-Type: text/html; charset*=utf-8''%E2%82%AC; name*0=a; name*1*=%FF",
    b"Content-Transfer-Encoding: base64",
    b"Content-Transfer-Encoding: quoted-printable",
    b'Content-Disposition: attachment; filename="x\\"y"',
    b"Content-Language: en, de",
    b'From: "A" <a@b.c>, g: x@y;',
    b"To: =?utf-8?q?=C3=A4?= <@r:a@b>",
    b"Subject: Re: [x] \xc3\xa4 (fwd)",
    b"Date: Fri, 21 Nov 1997 09:55:06 -0600",
    b"dGV4dA==",
    b"=3D=\r\n",
    b"<p>&amp;</p>",
    b"\xff\xfe\x00",
    b"hello",
]


@SETTINGS
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=60))
def test_mime_shaped_input(pieces: list[bytes]) -> None:
    check(b"".join(pieces))


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"text/plain", b"text/html", b"application/pdf", b"message/rfc822", b"image/png"]),
            st.binary(max_size=60).map(lambda b: b.replace(b"--", b"- -")),
        ),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from([b"\r\n", b"\n"]),
)
def test_generated_multipart_parts_found(parts: list[tuple[bytes, bytes]], nl: bytes) -> None:
    """Well-formed multiparts: every part is found, with exactly the body that was put in."""
    out = [b"Content-Type: multipart/mixed; boundary=ZZ" + nl + nl]
    for ctype, body in parts:
        out += [b"--ZZ", nl, b"Content-Type: ", ctype, nl, nl, body, nl]
    out += [b"--ZZ--", nl]
    data = b"".join(out)
    info = check(data)
    assert len(info.root.children) == len(parts)
    for i, (_, body) in enumerate(parts, 1):
        # a body ending in CR before an LF delimiter line reads as CRLF + delimiter
        expected = body[:-1] if nl == b"\n" and body.endswith(b"\r") else body
        assert section_bytes(data, info, str(i)) == expected
