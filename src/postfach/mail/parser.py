"""parse_message: one linear pass over the raw bytes into a MessageInfo.

Design (see the package docstring): the scanner works on the original bytes with
``bytes.find`` so that every offset indexes the message exactly as received. Outer multipart
boundaries win over inner ones (a part is scanned only inside its parent's range), so the
total work is bounded by size x nesting depth; nesting is capped at MAX_DEPTH and the number
of parts at MAX_PARTS.
"""

from __future__ import annotations

import email.utils
import re
from datetime import UTC, datetime, timedelta, timezone

from postfach.mail.address import first_mailbox, parse_address_list
from postfach.mail.headers import (
    DEFAULT_TEXT_PARAMS,
    collect_fields,
    decode_2047,
    decode_bytes,
    header_end,
    parse_content_type,
    parse_disposition,
    parse_language,
)
from postfach.mail.model import Address, BodyPart, Envelope, MessageInfo, Params

MAX_DEPTH = 100
# Total MIME parts per message (Dovecot's default too); past it the rest of a multipart is
# the body of its last part, so a flood of delimiters cannot cost memory or time.
MAX_PARTS = 10000

_MIME_FIELDS = frozenset(
    {
        b"content-type",
        b"content-transfer-encoding",
        b"content-id",
        b"content-description",
        b"content-md5",
        b"content-disposition",
        b"content-language",
        b"content-location",
    }
)
_MESSAGE_FIELDS = _MIME_FIELDS | frozenset(
    {
        b"date",
        b"subject",
        b"from",
        b"sender",
        b"reply-to",
        b"to",
        b"cc",
        b"bcc",
        b"in-reply-to",
        b"message-id",
        b"references",
    }
)


def parse_message(data: bytes) -> MessageInfo:
    """Parse a whole message. Never raises on any input (bytes or bytes-like)."""
    data = bytes(data)
    try:
        return _parse_message(data, 0, len(data), 0, [MAX_PARTS])
    except RecursionError:  # pragma: no cover - MAX_DEPTH keeps us well below the limit
        return _fallback(data)


def _fallback(data: bytes) -> MessageInfo:
    _, body = header_end(data, 0, len(data))
    root = BodyPart(
        content_type="text",
        subtype="plain",
        raw_type="TEXT",
        raw_subtype="PLAIN",
        params=DEFAULT_TEXT_PARAMS,
        id=None,
        description=None,
        encoding="7BIT",
        md5=None,
        disposition=None,
        language=None,
        location=None,
        header_start=0,
        header_end=body,
        body_end=len(data),
        lines=_count_lines(data, body, len(data)),
        size=len(data) - body,
    )
    return MessageInfo(size=len(data), root=root, envelope=Envelope())


def _count_lines(data: bytes, start: int, end: int) -> int:
    """Lines in data[start:end]: line ends, plus a final unterminated line."""
    if end <= start:
        return 0
    n = data.count(b"\n", start, end)
    if data[end - 1] != 10:
        n += 1
    return n


def _text(fields: dict[bytes, bytes], name: bytes) -> str | None:
    raw = fields.get(name)
    return None if raw is None else decode_bytes(raw)


def _build_part(
    data: bytes,
    start: int,
    end: int,
    depth: int,
    budget: list[int],
    fields: dict[bytes, bytes],
    body_start: int,
    default_message: bool,
) -> BodyPart:
    ct = parse_content_type(_text(fields, b"content-type"))
    params: Params
    if ct is None:
        if default_message and b"content-type" not in fields:
            # RFC 2046 §5.1.5: in multipart/digest the default is message/rfc822
            raw_type, raw_subtype, params = "MESSAGE", "RFC822", ()
        else:
            # RFC 2045 §5.2: missing or invalid -> text/plain; charset=us-ascii
            raw_type, raw_subtype, params = "TEXT", "PLAIN", DEFAULT_TEXT_PARAMS
    else:
        raw_type, raw_subtype, params = ct
    ctype = raw_type.lower()
    subtype = raw_subtype.lower()
    enc_raw = fields.get(b"content-transfer-encoding")
    encoding = decode_bytes(enc_raw) if enc_raw else "7BIT"

    children: tuple[BodyPart, ...] = ()
    message: MessageInfo | None = None
    if depth < MAX_DEPTH and budget[0] > 0:
        if ctype == "multipart":
            boundary: str | None = None
            for key, value in params:
                if key.lower() == "boundary":
                    boundary = value
                    break
            if boundary:
                children = _split_multipart(
                    data,
                    body_start,
                    end,
                    boundary.encode("utf-8", errors="replace"),
                    depth + 1,
                    budget,
                    subtype == "digest",
                )
        elif ctype == "message" and subtype in ("rfc822", "global"):
            budget[0] -= 1
            message = _parse_message(data, body_start, end, depth + 1, budget)

    lines = 0
    if ctype == "text" or (ctype == "message" and subtype in ("rfc822", "global")):
        lines = _count_lines(data, body_start, end)
    disp = _text(fields, b"content-disposition")
    return BodyPart(
        content_type=ctype,
        subtype=subtype,
        raw_type=raw_type,
        raw_subtype=raw_subtype,
        params=params,
        id=_text(fields, b"content-id"),
        description=_text(fields, b"content-description"),
        encoding=encoding,
        md5=_text(fields, b"content-md5"),
        disposition=parse_disposition(disp),
        language=parse_language(_text(fields, b"content-language")),
        location=_text(fields, b"content-location"),
        header_start=start,
        header_end=body_start,
        body_end=end,
        lines=lines,
        size=end - body_start,
        children=children,
        message=message,
    )


def _parse_part(data: bytes, start: int, end: int, depth: int, budget: list[int], in_digest: bool) -> BodyPart:
    budget[0] -= 1
    fields_end, body_start = header_end(data, start, end)
    fields = collect_fields(data, start, fields_end, _MIME_FIELDS)
    return _build_part(data, start, end, depth, budget, fields, body_start, in_digest)


def _delimiter_after(data: bytes, after: int, end: int) -> tuple[bool, int] | None:
    """Check what follows ``--boundary`` at ``after``; return (is_close, line end) or None
    when this is not a delimiter line (e.g. a longer boundary sharing the prefix)."""
    close = data.startswith(b"--", after, end)
    pos = after + 2 if close else after
    nl = data.find(b"\n", pos, end)
    line_end = end if nl < 0 else nl + 1
    if not close:
        # RFC 2046 §5.1.1: only transport padding (LWSP) may follow the boundary
        rest = data[pos : line_end if nl < 0 else nl]
        if rest.strip(b" \t\r"):
            return None
    return close, line_end


def _split_multipart(
    data: bytes, start: int, end: int, boundary: bytes, depth: int, budget: list[int], in_digest: bool
) -> tuple[BodyPart, ...]:
    delim = b"--" + boundary
    needle = b"\n" + delim
    dlen = len(delim)
    parts: list[BodyPart] = []
    part_start = -1  # -1: still in the preamble
    search = start
    first = True
    while True:
        if first and data.startswith(delim, start, end):
            idx = start
            prev_end = start
        else:
            i = data.find(needle, search, end)
            if i < 0:
                break
            idx = i + 1
            # RFC 2046 §5.1.1: the CRLF before the delimiter belongs to the delimiter
            prev_end = i - 1 if i > start and data[i - 1] == 13 else i
        first = False
        found = _delimiter_after(data, idx + dlen, end)
        if found is None:
            search = idx
            continue
        is_close, line_end = found
        if part_start >= 0:
            if budget[0] <= 0:
                break  # MAX_PARTS: this part runs to the end
            parts.append(_parse_part(data, part_start, max(prev_end, part_start), depth, budget, in_digest))
        if is_close:
            return tuple(parts)
        part_start = line_end
        # the LF ending this delimiter line may also start the next delimiter
        search = line_end - 1 if line_end > idx + dlen and data[line_end - 1] == 10 else line_end
    if part_start >= 0:
        # missing close delimiter: the last part runs to the end
        parts.append(_parse_part(data, part_start, end, depth, budget, in_digest))
    return tuple(parts)


def _parse_message(data: bytes, start: int, end: int, depth: int, budget: list[int]) -> MessageInfo:
    fields_end, body_start = header_end(data, start, end)
    fields = collect_fields(data, start, fields_end, _MESSAGE_FIELDS)
    root = _build_part(data, start, end, depth, budget, fields, body_start, False)
    envelope = Envelope(
        date=_text(fields, b"date"),
        subject=_text(fields, b"subject"),
        from_=_addresses(fields, b"from"),
        sender=_addresses(fields, b"sender"),
        reply_to=_addresses(fields, b"reply-to"),
        to=_addresses(fields, b"to"),
        cc=_addresses(fields, b"cc"),
        bcc=_addresses(fields, b"bcc"),
        in_reply_to=_text(fields, b"in-reply-to"),
        message_id=_text(fields, b"message-id"),
    )
    subject = decode_2047(envelope.subject) if envelope.subject else ""
    refs = _text(fields, b"references")
    return MessageInfo(
        size=end - start,
        root=root,
        envelope=envelope,
        subject=subject,
        base_subject=base_subject(subject),
        date=parse_date(envelope.date),
        from_addr=_sort_mailbox(envelope.from_),
        to_addr=_sort_mailbox(envelope.to),
        cc_addr=_sort_mailbox(envelope.cc),
        message_id=_first_msg_id(envelope.message_id),
        in_reply_to=_first_msg_id(envelope.in_reply_to),
        references=tuple(_MSG_ID.findall(refs)) if refs else (),
        display_from=_display(envelope.from_),
        display_to=_display(envelope.to),
    )


def _addresses(fields: dict[bytes, bytes], name: bytes) -> tuple[Address, ...] | None:
    raw = fields.get(name)
    if raw is None:
        return None
    addrs = parse_address_list(decode_bytes(raw))
    return tuple(addrs) if addrs else None


def _sort_mailbox(addrs: tuple[Address, ...] | None) -> str:
    """RFC 5256 §3 SORT FROM/TO/CC key: the addr-mailbox of the first address."""
    a = first_mailbox(addrs)
    return "" if a is None or a.mailbox is None else a.mailbox


def _display(addrs: tuple[Address, ...] | None) -> str:
    """RFC 5957 DISPLAYFROM/DISPLAYTO key: decoded display name, else the address."""
    a = first_mailbox(addrs)
    if a is None:
        return ""
    if a.name:
        return decode_2047(a.name)
    return f"{a.mailbox}@{a.host}" if a.host else (a.mailbox or "")


_MSG_ID = re.compile(r"<[^<>\s]*>")


def _first_msg_id(value: str | None) -> str:
    if not value:
        return ""
    m = _MSG_ID.search(value)
    return m.group() if m else value.strip()


def parse_date(value: str | None) -> datetime | None:
    """RFC 5322 Date -> aware datetime (``-0000`` and missing zones become UTC); None if bad."""
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        offset = parsed[9]
        tz = timezone(timedelta(seconds=offset)) if offset else UTC
        return datetime(*parsed[:6], tzinfo=tz)
    except Exception:  # any malformed date simply has no date
        return None


# --- RFC 5256 §2.1 base subject ---

_WS_RUN = re.compile(r"[ \t\r\n]+")
_BLOB = r"\[[^\[\]]*\][ \t]*"
_LEADER = re.compile(rf"(?:{_BLOB})*(?:re|fwd?)[ \t]*(?:{_BLOB})?:|[ \t]+", re.I)
_BLOB_RE = re.compile(_BLOB)


def _strip_trailers(s: str) -> str:
    """Step 2: remove trailing WSP and "(fwd)" (subj-trailer), repeatedly."""
    end = len(s)
    while end:
        if s[end - 1] in " \t":
            end -= 1
        elif end >= 5 and s[end - 5 : end].lower() == "(fwd)":
            end -= 5
        else:
            break
    return s[:end]


def base_subject(subject: str) -> str:
    """RFC 5256 §2.1 base subject of an already RFC 2047-decoded subject (case kept)."""
    s = _WS_RUN.sub(" ", subject)  # step 1
    while True:
        s = _strip_trailers(s)
        pos = 0
        while True:  # steps 3 and 4, repeated until nothing changes
            before = pos
            while True:
                m = _LEADER.match(s, pos)
                if m is None or m.end() == pos:
                    break
                pos = m.end()
            m = _BLOB_RE.match(s, pos)
            if m is not None and m.end() < len(s):
                pos = m.end()
            if pos == before:
                break
        s = s[pos:]
        # step 5: subj-fwd-hdr "[fwd:" ... subj-fwd-trl "]"
        if len(s) >= 6 and s[:5].lower() == "[fwd:" and s.endswith("]"):
            s = s[5:-1]
            continue
        return s
