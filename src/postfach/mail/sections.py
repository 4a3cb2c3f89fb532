"""FETCH body sections (RFC 3501 §6.4.5, RFC 9051 §6.4.5), BINARY (RFC 3516), header
lookups and the text SEARCH looks at. All work on the original bytes plus a MessageInfo."""

from __future__ import annotations

import binascii
import html
import re
from collections.abc import Iterator

from postfach.mail.headers import (
    b64decode_tolerant,
    decode_2047,
    decode_bytes,
    decode_with_charset,
    field_spans,
    header_end,
    strip_comments,
    unfold,
)
from postfach.mail.model import BodyPart, MessageInfo

_PART_NUMBER = re.compile(r"([1-9][0-9]{0,8})(?:\.|$)")


def split_section(section: str) -> tuple[list[int], str]:
    """``"1.2.MIME"`` -> ([1, 2], "MIME"); ``"HEADER"`` -> ([], "HEADER")."""
    path: list[int] = []
    pos = 0
    s = section.strip()
    while True:
        m = _PART_NUMBER.match(s, pos)
        if m is None:
            break
        path.append(int(m.group(1)))
        pos = m.end()
    return path, s[pos:]


def _child(root: BodyPart, n: int) -> BodyPart | None:
    """Part ``n`` of a message whose top-level entity is ``root`` (RFC 3501 §6.4.5: every
    message has at least part 1; for a non-multipart message it is the body)."""
    if root.is_multipart:
        return root.children[n - 1] if 1 <= n <= len(root.children) else None
    return root if n == 1 else None


def find_part(info: MessageInfo, path: list[int]) -> BodyPart | None:
    """Resolve a part number path; None if it does not exist."""
    if not path:
        return None
    part = _child(info.root, path[0])
    for n in path[1:]:
        if part is None:
            return None
        if part.is_multipart:
            part = part.children[n - 1] if 1 <= n <= len(part.children) else None
        elif part.message is not None:
            # RFC 3501 §6.4.5: parts of a message/rfc822 are those of the embedded message
            part = _child(part.message.root, n)
        else:
            return None
    return part


def _message_at(info: MessageInfo, path: list[int]) -> MessageInfo | None:
    """The message whose HEADER/TEXT a section names: the top level, or an embedded one."""
    if not path:
        return info
    part = find_part(info, path)
    return None if part is None else part.message


_FIELD_LIST = re.compile(r"\(([^)]*)\)")


def section_bytes(data: bytes, info: MessageInfo, section: str) -> bytes:
    """The content of ``BODY[section]``; b"" for a section that does not exist.

    Accepts "", "HEADER", "TEXT", "MIME", part paths ("1.2"), "<path>.MIME",
    "<path>.HEADER", "<path>.TEXT" and, for convenience, "[<path>.]HEADER.FIELDS[.NOT] (A B)".
    """
    path, rest = split_section(section)
    keyword = rest.upper()
    if keyword.startswith("HEADER.FIELDS"):
        negate = keyword.startswith("HEADER.FIELDS.NOT")
        m = _FIELD_LIST.search(rest)
        names = m.group(1).replace('"', " ").split() if m else []
        return header_fields(data, info, ".".join(map(str, path)), names, negate)
    if not path:
        root = info.root
        if keyword == "":
            return data
        if keyword == "HEADER":
            return data[root.header_start : root.header_end]
        if keyword == "TEXT":
            return data[root.header_end : root.body_end]
        return b""
    part = find_part(info, path)
    if part is None:
        return b""
    if keyword == "":
        return data[part.header_end : part.body_end]
    if keyword == "MIME":
        return data[part.header_start : part.header_end]
    if keyword in ("HEADER", "TEXT"):
        msg = part.message
        if msg is None:
            return b""
        if keyword == "HEADER":
            return data[msg.root.header_start : msg.root.header_end]
        return data[msg.root.header_end : msg.root.body_end]
    return b""


def header_fields(data: bytes, info: MessageInfo, part: str, fields: list[str], negate: bool) -> bytes:
    """HEADER.FIELDS / HEADER.FIELDS.NOT (RFC 3501 §6.4.5) of the top-level header (part "")
    or of the message embedded in a message/rfc822 part ("2", "1.3"). The fields come as they
    are in the message (folding kept), followed by the blank line CRLF. b"" when the part does
    not exist or is not a message."""
    path, rest = split_section(part)
    if rest:
        return b""
    msg = _message_at(info, path)
    if msg is None:
        return b""
    wanted = {f.strip().lower().encode("utf-8", errors="replace") for f in fields}
    start = msg.root.header_start
    fields_end, _ = header_end(data, start, msg.root.body_end)
    out: list[bytes] = []
    for name, fs, _vs, fe in field_spans(data, start, fields_end):
        if not name or (name in wanted) == negate:
            continue
        chunk = data[fs:fe]
        out.append(chunk)
        if not chunk.endswith(b"\n"):
            out.append(b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def _cte(encoding: str) -> str:
    enc = strip_comments(encoding)
    semi = enc.find(";")
    if semi >= 0:
        enc = enc[:semi]
    return enc.strip(' \t\r\n"').lower()


def decode_body(data: bytes, part: BodyPart) -> bytes | None:
    """The content-transfer-decoded body of a part; None for an unknown encoding."""
    raw = data[part.header_end : part.body_end]
    enc = _cte(part.encoding)
    if enc in ("", "7bit", "8bit", "binary"):
        return raw
    if enc == "base64":
        return b64decode_tolerant(raw)
    if enc == "quoted-printable":
        return binascii.a2b_qp(raw)
    return None


def decoded_part_bytes(data: bytes, info: MessageInfo, part: str) -> bytes | None:
    """``BINARY[part]`` (RFC 3516 §4.2): the decoded body; b"" for a part that does not exist,
    None when the encoding is unknown (the server answers ``NO [UNKNOWN-CTE]``). Part ""
    is the whole message, unchanged."""
    path, rest = split_section(part)
    if rest:
        return b""
    if not path:
        return data
    p = find_part(info, path)
    if p is None:
        return b""
    if p.is_multipart:
        return data[p.header_end : p.body_end]
    return decode_body(data, p)


def header_values(data: bytes, info: MessageInfo, name: str) -> list[str]:
    """Every value of a top-level header field (case-insensitive name), unfolded and
    RFC 2047-decoded, in message order."""
    key = name.strip().lower().encode("utf-8", errors="replace")
    start = info.root.header_start
    fields_end, _ = header_end(data, start, info.root.body_end)
    return [
        decode_2047(decode_bytes(unfold(data[vs:fe])))
        for n, _fs, vs, fe in field_spans(data, start, fields_end)
        if n == key
    ]


# --- text for SEARCH BODY / TEXT ---

_TAG = re.compile(r"<[^<>]*>")
_HIDDEN = ("<script", "<style")


def html_to_text(s: str) -> str:
    """Rough HTML to text: drop script/style blocks and tags, resolve entities."""
    low = s.lower()
    if "<script" in low or "<style" in low:
        out: list[str] = []
        pos = 0
        n = len(s)
        nexts = [low.find(t) for t in _HIDDEN]
        while True:
            for k, t in enumerate(_HIDDEN):
                if 0 <= nexts[k] < pos:
                    nexts[k] = low.find(t, pos)
            found = [(i, k) for k, i in enumerate(nexts) if i >= 0]
            if not found:
                break
            i, k = min(found)
            out.append(s[pos:i])
            close = low.find("</" + _HIDDEN[k][1:], i)
            if close < 0:
                pos = n
                break
            gt = low.find(">", close)
            pos = n if gt < 0 else gt + 1
        out.append(s[pos:])
        s = "".join(out)
    return html.unescape(_TAG.sub(" ", s))


def _text_parts(info: MessageInfo) -> Iterator[BodyPart]:
    stack = [info.root]
    while stack:
        part = stack.pop()
        if part.children:
            stack.extend(reversed(part.children))
        elif part.message is not None:
            stack.append(part.message.root)
        elif part.content_type == "text":
            yield part


def part_text(data: bytes, part: BodyPart) -> str:
    """Decoded text of one text/* part (charset errors replaced; HTML reduced to text)."""
    body = decode_body(data, part)
    if body is None:
        body = data[part.header_end : part.body_end]
    charset = (part.param("charset") or "").strip().lower()
    if charset in ("", "us-ascii", "ascii", "us_ascii"):
        text = decode_bytes(body)
    else:
        text = decode_with_charset(body, charset)
    if part.subtype in ("html", "xhtml"):
        text = html_to_text(text)
    return text


def search_text(data: bytes, info: MessageInfo) -> str:
    """Decoded text of every text/* part (including those of embedded messages), joined by
    newlines, for SEARCH BODY / TEXT."""
    return "\n".join(part_text(data, p) for p in _text_parts(info))
