"""Header scanning over raw bytes, unfolding, RFC 2047 words, and MIME parameters (RFC 2045/2231).

Everything here is tolerant: it never raises on malformed input.
"""

from __future__ import annotations

import binascii
import codecs
import re
from functools import lru_cache

from postfach.mail.model import Params

_STRIP = " \t\r\n"


def decode_bytes(b: bytes) -> str:
    """Header bytes to str: UTF-8 (RFC 6532) when valid, else latin-1 (never fails)."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b.decode("latin-1")


def header_end(data: bytes, start: int, limit: int) -> tuple[int, int]:
    """Find the end of the header block that starts at ``start`` (bounded by ``limit``).

    Returns ``(fields_end, body_start)``: ``fields_end`` is just after the last header line's
    line ending, ``body_start`` just after the empty line. Both LF and CRLF are line ends.
    Without an empty line the header runs to ``limit`` and the body is empty.
    """
    if start >= limit:
        return limit, limit
    c = data[start]
    if c == 10:
        return start, start + 1
    if c == 13 and start + 1 < limit and data[start + 1] == 10:
        return start, start + 2
    a = data.find(b"\n\r\n", start, limit)
    b = data.find(b"\n\n", start, limit if a < 0 else a + 1)
    if b >= 0:
        return b + 1, b + 2
    if a >= 0:
        return a + 1, a + 3
    return limit, limit


# A field span: [lowercase name, field start, value start, field end (after its line ending)]
FieldSpan = tuple[bytes, int, int, int]


def field_spans(data: bytes, start: int, end: int) -> list[FieldSpan]:
    """Split the header block ``data[start:end]`` into fields (folded lines joined).

    A line without a colon becomes a field with an empty name (kept so that HEADER.FIELDS.NOT
    still returns every byte it should); a leading continuation line is treated the same way.
    """
    spans: list[FieldSpan] = []
    pos = start
    find = data.find
    while pos < end:
        nl = find(b"\n", pos, end)
        line_end = end if nl < 0 else nl + 1
        c = data[pos]
        if (c == 32 or c == 9) and spans:
            name, fs, vs, _ = spans[-1]
            spans[-1] = (name, fs, vs, line_end)
        else:
            colon = find(b":", pos, line_end)
            if colon < 0:
                spans.append((b"", pos, line_end, line_end))
            else:
                spans.append((data[pos:colon].strip().lower(), pos, colon + 1, line_end))
        pos = line_end
    return spans


def unfold(raw: bytes) -> bytes:
    """RFC 5322 §2.2.3 unfolding: drop the line breaks, keep the whitespace; strip the ends."""
    if b"\n" in raw:
        raw = raw.replace(b"\r\n", b"").replace(b"\n", b"")
    return raw.strip(b" \t\r\n")


def collect_fields(data: bytes, start: int, end: int, wanted: frozenset[bytes]) -> dict[bytes, bytes]:
    """First occurrence (RFC 5322 says "first wins" for us) of each wanted field, unfolded."""
    out: dict[bytes, bytes] = {}
    for name, _fs, vs, fe in field_spans(data, start, end):
        if name in wanted and name not in out:
            out[name] = unfold(data[vs:fe])
    return out


# --- RFC 2047 encoded words ---

_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([QqBb])\?([^?\s]*)\?=")


@lru_cache(maxsize=256)
def _codec(charset: str) -> str:
    charset = charset.strip().strip('"').lower()
    star = charset.find("*")  # RFC 2231 §5 language suffix: utf-8*en
    if star >= 0:
        charset = charset[:star]
    if charset in ("", "unknown-8bit", "x-unknown", "unknown", "default"):
        return "latin-1"
    try:
        name = codecs.lookup(charset).name
        # quadratic or non-text decoders have no place on untrusted mail
        return "utf-8" if name in ("punycode", "idna") else name
    except (LookupError, ValueError):  # unknown, or not even a name (NUL inside)
        return "utf-8"


def decode_with_charset(b: bytes, charset: str) -> str:
    codec = _codec(charset)
    if codec == "ascii":  # mislabelled 8-bit text is common: read it as UTF-8 / latin-1
        return decode_bytes(b)
    try:
        return b.decode(codec, errors="replace")
    except Exception:  # exotic codecs may fail in odd ways; never raise
        return b.decode("latin-1")


def b64decode_tolerant(b: bytes) -> bytes:
    """Base64 decoding that skips garbage and fixes missing or misplaced padding."""
    try:
        return binascii.a2b_base64(b)
    except (binascii.Error, ValueError):
        pass
    clean = b.translate(None, _B64_DELETE)
    rem = len(clean) % 4
    if rem == 1:
        clean = clean[:-1]
    elif rem:
        clean += b"=" * (4 - rem)
    try:
        return binascii.a2b_base64(clean)
    except (binascii.Error, ValueError):
        return b""


_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_DELETE = bytes(c for c in range(256) if c not in _B64_ALPHABET)


def _decode_word(m: re.Match[str]) -> str:
    charset, enc, text = m.group(1), m.group(2), m.group(3)
    raw = text.encode("ascii", errors="replace")
    data = binascii.a2b_qp(raw, header=True) if enc in "Qq" else b64decode_tolerant(raw)
    return decode_with_charset(data, charset)


def decode_2047(value: str) -> str:
    """Decode RFC 2047 encoded words; whitespace between adjacent encoded words is dropped
    (RFC 2047 §6.2). Malformed words stay as they are."""
    if "=?" not in value:
        return value
    out: list[str] = []
    pos = 0
    last_was_word = False
    for m in _ENCODED_WORD.finditer(value):
        between = value[pos : m.start()]
        if not (last_was_word and between.strip(" \t\r\n") == ""):
            out.append(between)
        out.append(_decode_word(m))
        pos = m.end()
        last_was_word = True
    out.append(value[pos:])
    return "".join(out)


# --- MIME parameters (RFC 2045 §5.1, RFC 2231) ---

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`{|}~0-9A-Za-z]+")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)("?)', re.S)
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)
_SECTION = re.compile(r"^(.*?)\*(\d+)$")


def strip_comments(s: str) -> str:
    """Remove RFC 822 comments outside quoted strings (nested parentheses allowed)."""
    if "(" not in s:
        return s
    out: list[str] = []
    depth = 0
    in_quote = False
    i = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\" and (in_quote or depth):
            if depth == 0:
                out.append(s[i : i + 2])
            i += 2
            continue
        if in_quote:
            if c == '"':
                in_quote = False
            out.append(c)
        elif depth:
            if c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
        elif c == "(":
            depth = 1
        elif c == '"':
            in_quote = True
            out.append(c)
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _raw_params(s: str) -> list[tuple[str, str]]:
    """``; a=b; c="d"`` -> [("a", "b"), ("c", "d")]; names as written, quoting removed."""
    out: list[tuple[str, str]] = []
    pos = 0
    n = len(s)
    while pos < n:
        semi = s.find(";", pos)
        eq = s.find("=", pos)
        if eq < 0 or (0 <= semi < eq):
            # no value for this one: skip to the next separator
            if semi < 0:
                break
            pos = semi + 1
            continue
        name = s[pos:eq].strip(" \t\r\n;")
        pos = eq + 1
        while pos < n and s[pos] in " \t\r\n":
            pos += 1
        if pos < n and s[pos] == '"':
            m = _QUOTED.match(s, pos)
            if m is None:  # pragma: no cover - the pattern always matches at a quote
                break
            value = m.group(1)
            if "\\" in value:
                value = _QUOTED_PAIR.sub(r"\1", value)
            pos = m.end()
            semi = s.find(";", pos)
            pos = n if semi < 0 else semi + 1
        else:
            semi = s.find(";", pos)
            end = n if semi < 0 else semi
            value = s[pos:end].strip(" \t\r\n")
            pos = end + 1
        if name:
            out.append((name, value))
    return out


def _pct_decode(s: str) -> bytes:
    if "%" not in s:
        return s.encode("utf-8", errors="replace")
    out = bytearray()
    b = s.encode("utf-8", errors="replace")
    i = 0
    n = len(b)
    while i < n:
        c = b[i]
        if c == 37 and i + 2 < n:
            try:
                out.append(int(b[i + 1 : i + 3], 16))
                i += 3
                continue
            except ValueError:
                pass
        out.append(c)
        i += 1
    return bytes(out)


def decode_params(s: str) -> Params:
    """Parse and RFC 2231-decode (continuations, charsets) a parameter list.

    Names keep their spelling (matching is case-insensitive); the first occurrence of a name
    wins, except that an RFC 2231 value (``name*`` / ``name*0``...) wins over a plain ``name``.
    """
    raw = _raw_params(s)
    if not any("*" in name for name, _ in raw):
        return _dedupe(raw)
    entries: list[tuple[str, str, bool]] = []  # (key, spelling, is RFC 2231 group)
    plain: dict[str, str] = {}
    groups: dict[str, list[tuple[int, bool, str]]] = {}
    for name, value in raw:
        extended = name.endswith("*")
        base = name[:-1] if extended else name
        section = -1
        m = _SECTION.match(base)
        if m is not None:
            base = m.group(1)
            digits = m.group(2)
            section = int(digits) if len(digits) < 6 else 99999
        elif not extended:
            key = name.lower()
            if key not in plain:
                plain[key] = value
                entries.append((key, name, False))
            continue
        key = base.lower()
        if key not in groups:
            groups[key] = []
            entries.append((key, base, True))
        groups[key].append((section, extended, value))
    decoded: dict[str, str] = {}
    for key, pieces in groups.items():
        pieces.sort(key=lambda t: t[0])
        charset = ""
        chunks: list[bytes] = []
        for i, (_sec, extended, value) in enumerate(pieces):
            if extended:
                if i == 0:
                    first = value.find("'")
                    second = value.find("'", first + 1) if first >= 0 else -1
                    if second >= 0:
                        charset = value[:first]
                        value = value[second + 1 :]
                chunks.append(_pct_decode(value))
            else:
                chunks.append(value.encode("utf-8", errors="replace"))
        joined = b"".join(chunks)
        decoded[key] = decode_with_charset(joined, charset) if charset else decode_bytes(joined)
    out: list[tuple[str, str]] = []
    for key, spelling, is_group in entries:
        if is_group:
            out.append((spelling, decoded[key]))
        elif key not in groups:
            out.append((spelling, plain[key]))
    return tuple(out)


def _dedupe(raw: list[tuple[str, str]]) -> Params:
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for n, v in raw:
        key = n.lower()
        if key not in seen:
            seen.add(key)
            out.append((n, v))
    return tuple(out)


DEFAULT_TEXT_PARAMS: Params = (("charset", "us-ascii"),)


def parse_content_type(value: str | None) -> tuple[str, str, Params] | None:
    """``type/subtype; params`` -> (raw type, raw subtype, params); None if missing or invalid
    (the caller then applies the RFC 2045 §5.2 default)."""
    if value is None:
        return None
    value = strip_comments(value)
    semi = value.find(";")
    main = value if semi < 0 else value[:semi]
    slash = main.find("/")
    if slash < 0:
        return None
    ctype = main[:slash].strip(_STRIP)
    subtype = main[slash + 1 :].strip(_STRIP)
    if _TOKEN.fullmatch(ctype) is None or _TOKEN.fullmatch(subtype) is None:
        return None
    params = decode_params(value[semi + 1 :]) if semi >= 0 else ()
    return ctype, subtype, params


def parse_disposition(value: str | None) -> tuple[str, Params] | None:
    if value is None:
        return None
    value = strip_comments(value)
    semi = value.find(";")
    main = (value if semi < 0 else value[:semi]).strip(_STRIP)
    if not main:
        return None
    params = decode_params(value[semi + 1 :]) if semi >= 0 else ()
    return main, params


def parse_language(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    tags = tuple(t.strip(_STRIP) for t in strip_comments(value).split(","))
    tags = tuple(t for t in tags if t)
    return tags or None
