"""Tolerant RFC 5322 address-list parsing into IMAP address structures, plus a strict
addr-spec check for SMTP paths."""

from __future__ import annotations

import re

from postfach.mail.model import Address

_TOKEN = re.compile(
    r"""
     (?P<ws>[ \t\r\n]+)
    |(?P<qs>"(?:[^"\\]|\\.)*(?:"|\\?\Z))
    |(?P<angle><[^>]*(?:>|\Z))
    |(?P<dlit>\[[^\]]*(?:\]|\Z))
    |(?P<sp>[,;:@.])
    |(?P<atom>[^ \t\r\n"()<>\[\],;:@.\\]+)
    |(?P<other>.)
    """,
    re.X | re.S,
)
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)

# token: (kind, text, space before)
_Tok = tuple[str, str, bool]


def _skip_comment(s: str, pos: int) -> tuple[int, str]:
    """``s[pos] == "("``: return (position after the comment, its text)."""
    depth = 0
    n = len(s)
    i = pos
    out: list[str] = []
    while i < n:
        c = s[i]
        if c == "\\":
            out.append(s[i + 1 : i + 2])
            i += 2
            continue
        if c == "(":
            depth += 1
            if depth > 1:
                out.append(c)
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i + 1, "".join(out)
            out.append(c)
        else:
            out.append(c)
        i += 1
    return n, "".join(out)


def _tokenize(s: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    n = len(s)
    space = False
    match = _TOKEN.match
    while pos < n:
        if s[pos] == "(":
            pos, text = _skip_comment(s, pos)
            toks.append(("cmt", text.strip(), space))
            space = True
            continue
        m = match(s, pos)
        if m is None:  # pragma: no cover - "other" matches any character
            break
        kind = m.lastgroup or "other"
        pos = m.end()
        if kind == "ws":
            space = True
            continue
        text = m.group()
        if kind == "qs":
            body = text[1:-1] if len(text) > 1 and text.endswith('"') else text[1:]
            if "\\" in body:
                body = _QUOTED_PAIR.sub(r"\1", body)
            text = body
        toks.append((kind, text, space))
        space = False
    return toks


def _phrase(toks: list[_Tok]) -> str:
    out: list[str] = []
    for kind, text, space in toks:
        if kind == "cmt":
            continue
        if out and space:
            out.append(" ")
        out.append(text)
    return "".join(out).strip()


def _compact(toks: list[_Tok]) -> str:
    return "".join(text for kind, text, _ in toks if kind != "cmt")


def _addr_spec(toks: list[_Tok]) -> tuple[str, str]:
    """Tokens of ``local@domain`` -> (mailbox, host); host "" when the domain is missing."""
    at = -1
    for i in range(len(toks) - 1, -1, -1):
        if toks[i][0] == "sp" and toks[i][1] == "@":
            at = i
            break
    if at < 0:
        return _phrase(toks), ""
    return _compact(toks[:at]), _compact(toks[at + 1 :])


def _from_angle(name: str | None, angle: str) -> Address:
    inner = angle[1:-1] if angle.endswith(">") else angle[1:]
    inner = inner.strip()
    adl: str | None = None
    if inner.startswith("@"):
        colon = inner.find(":")
        if colon >= 0:
            adl = inner[:colon].strip() or None
            inner = inner[colon + 1 :]
    mailbox, host = _addr_spec(_tokenize(inner))
    return Address(name or None, adl, mailbox, host)


def _flush(cur: list[_Tok], angle: str | None, comment: str | None) -> Address | None:
    if angle is not None:
        return _from_angle(_phrase(cur), angle)
    if not any(kind != "cmt" for kind, _, _ in cur):
        return None
    mailbox, host = _addr_spec(cur)
    return Address(comment or None, None, mailbox, host)


# Fast path for the common shapes (``Name <a@b>``, ``a@b``, comma-separated) that the full
# tokenizer below would parse identically; anything with quotes, comments, groups, routes,
# backslashes or domain literals takes the full path. Patterns are linear (no overlapping
# repeats), so long inputs cannot make them backtrack.
_COMPLEX = re.compile(r'["(\\:;\[\]]')
_SIMPLE_ANGLE = re.compile(r"([^<>@]*)<([^<>@ \t\r\n]+)@([^<>@ \t\r\n]+)>[ \t\r\n]*")
_SIMPLE_SPEC = re.compile(r"[ \t\r\n]*([^<>@ \t\r\n]+)@([^<>@ \t\r\n]+)[ \t\r\n]*")
_WS = re.compile(r"[ \t\r\n]+")


def _parse_simple(value: str) -> list[Address] | None:
    if _COMPLEX.search(value) is not None:
        return None
    out: list[Address] = []
    for piece in value.split(","):
        if "<" in piece:
            m = _SIMPLE_ANGLE.fullmatch(piece)
            if m is None:
                return None
            name = _WS.sub(" ", m.group(1)).strip(" ")
            out.append(Address(name or None, None, m.group(2), m.group(3)))
        elif piece.strip(" \t\r\n"):
            m = _SIMPLE_SPEC.fullmatch(piece)
            if m is None:
                return None
            out.append(Address(None, None, m.group(1), m.group(2)))
    return out


def parse_address_list(value: str) -> list[Address]:
    """Parse an address-list header value (RFC 5322 §3.4) tolerantly.

    Groups become IMAP group markers: ``(NIL NIL "name" NIL)`` ... ``(NIL NIL NIL NIL)``
    (RFC 3501 §7.4.2). Display names keep RFC 2047 words encoded (ENVELOPE sends them raw)
    with quoting removed. A mailbox without a domain gets host ``""`` (never NIL, which would
    mean a group marker).
    """
    simple = _parse_simple(value)
    if simple is not None:
        return simple
    return _parse_full(value)


def _parse_full(value: str) -> list[Address]:
    out: list[Address] = []
    cur: list[_Tok] = []
    angle: str | None = None
    comment: str | None = None
    in_group = False
    for tok in _tokenize(value):
        kind, text, _space = tok
        if kind == "sp" and text == ",":
            addr = _flush(cur, angle, comment)
            if addr is not None:
                out.append(addr)
            cur, angle, comment = [], None, None
        elif kind == "sp" and text == ";":
            addr = _flush(cur, angle, comment)
            if addr is not None:
                out.append(addr)
            cur, angle, comment = [], None, None
            if in_group:
                out.append(Address(None, None, None, None))
                in_group = False
        elif (
            kind == "sp"
            and text == ":"
            and not in_group
            and angle is None
            and not any(k == "sp" and t == "@" for k, t, _ in cur)
        ):
            out.append(Address(None, None, _phrase(cur), None))
            in_group = True
            cur, angle, comment = [], None, None
        elif kind == "angle":
            if angle is None:
                angle = text
        elif kind == "cmt":
            comment = text or comment
            cur.append(tok)
        elif angle is None:
            cur.append(tok)
    addr = _flush(cur, angle, comment)
    if addr is not None:
        out.append(addr)
    if in_group:
        out.append(Address(None, None, None, None))
    return out


def first_mailbox(addrs: tuple[Address, ...] | None) -> Address | None:
    """The first real mailbox (skipping group markers)."""
    if addrs:
        for a in addrs:
            if a.host is not None and a.mailbox is not None:
                return a
    return None


# --- strict addr-spec for SMTP (RFC 5321 §4.1.2, RFC 6531 for UTF-8) ---

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_ATOM_LOCAL = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED_LOCAL = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"')
_LET_DIG = r"[A-Za-z0-9\u0080-\U0010ffff]"
_LABEL = rf"{_LET_DIG}(?:[A-Za-z0-9\-\u0080-\U0010ffff]*{_LET_DIG})?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_ADDR_LITERAL = re.compile(r"\[[\x21-\x5a\x5e-\x7e]+\]")


def parse_addr_spec(s: str) -> tuple[str, str] | None:
    """``local@domain`` (optionally in angle brackets) -> (local, domain), else None.

    The local part is returned as written (a quoted local part keeps its quotes, as SMTP
    must relay it unchanged); the domain is returned as written.
    """
    s = s.strip()
    if s.startswith("<") and s.endswith(">"):
        s = s[1:-1]
    at = s.rfind("@")
    if at <= 0 or at == len(s) - 1:
        return None
    local, domain = s[:at], s[at + 1 :]
    if len(local) > 64 * 4 or len(domain) > 255:
        return None
    if _DOT_ATOM_LOCAL.fullmatch(local) is None and _QUOTED_LOCAL.fullmatch(local) is None:
        return None
    if _DOMAIN.fullmatch(domain) is None and _ADDR_LITERAL.fullmatch(domain) is None:
        return None
    return local, domain
