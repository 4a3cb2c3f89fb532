"""IMAP ENVELOPE and BODY/BODYSTRUCTURE serialisation (RFC 3501 §7.4.2, RFC 9051 §7.5.2).

Strings are quoted when they are printable ASCII, and sent as literals ``{n}\\r\\n...`` when
they hold 8-bit bytes or CR/LF (valid in IMAP4rev1 and IMAP4rev2). NUL bytes, which no IMAP
string may hold, are dropped.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from postfach.mail.model import Address, BodyPart, Envelope, MessageInfo, Params

NIL = b"NIL"


def nstring(value: str | None) -> bytes:
    """An IMAP nstring: NIL, a quoted string, or a literal."""
    if value is None:
        return NIL
    return string_bytes(value.encode("utf-8", errors="replace"))


_NOT_QUOTABLE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f-\xff]")


def string_bytes(raw: bytes) -> bytes:
    """An IMAP string for raw bytes: quoted (RFC 3501 §9 quoted, with \\ and \" escaped) when
    printable ASCII, else a literal. NUL is never allowed in a string and is dropped."""
    if b"\x00" in raw:
        raw = raw.replace(b"\x00", b"")
    if _NOT_QUOTABLE.search(raw) is None:
        if b"\\" in raw or b'"' in raw:
            raw = raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
        return b'"' + raw + b'"'
    return b"{%d}\r\n" % len(raw) + raw


# --- ENVELOPE ---


def _address_list(addrs: tuple[Address, ...] | None) -> bytes:
    if not addrs:
        return NIL
    out = [b"("]
    for a in addrs:
        out.append(
            b"(" + nstring(a.name) + b" " + nstring(a.adl) + b" " + nstring(a.mailbox) + b" " + nstring(a.host) + b")"
        )
    out.append(b")")
    return b"".join(out)


def envelope_bytes(env: Envelope) -> bytes:
    """The parenthesised ENVELOPE for an Envelope (RFC 3501 §7.4.2)."""
    from_ = _address_list(env.from_)
    # RFC 3501 §7.4.2: absent or empty Sender / Reply-To take the From value
    sender = _address_list(env.sender) if env.sender else from_
    reply_to = _address_list(env.reply_to) if env.reply_to else from_
    return b" ".join(
        (
            b"(" + nstring(env.date),
            nstring(env.subject),
            from_,
            sender,
            reply_to,
            _address_list(env.to),
            _address_list(env.cc),
            _address_list(env.bcc),
            nstring(env.in_reply_to),
            nstring(env.message_id) + b")",
        )
    )


def imap_envelope(info: MessageInfo) -> bytes:
    return envelope_bytes(info.envelope)


# --- BODY / BODYSTRUCTURE ---

# Dovecot's answer for a multipart without parts (the grammar needs at least one body)
_EMPTY_BODY = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0)'
_EMPTY_BODYSTRUCTURE = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL)'
_EMPTY_ENVELOPE = b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"


def _param_value(name: str, value: str) -> tuple[str, str]:
    """Params are stored RFC 2231-decoded; non-ASCII values go back on the wire as an
    RFC 2231 extended value (``name*=utf-8''...``), which every MIME client decodes."""
    if value.isascii() and _NOT_QUOTABLE.search(value.encode("ascii")) is None:
        return name, value
    return name + "*", "utf-8''" + quote(value.encode("utf-8", errors="replace"), safe="")


def _params(params: Params) -> bytes:
    if not params:
        return NIL
    items: list[bytes] = []
    for name, value in params:
        n, v = _param_value(name, value)
        items.append(nstring(n) + b" " + nstring(v))
    return b"(" + b" ".join(items) + b")"


def _disposition(disp: tuple[str, Params] | None) -> bytes:
    if disp is None:
        return NIL
    return b"(" + nstring(disp[0]) + b" " + _params(disp[1]) + b")"


def _language(lang: tuple[str, ...] | None) -> bytes:
    if not lang:
        return NIL
    if len(lang) == 1:
        return nstring(lang[0])
    return b"(" + b" ".join(nstring(t) for t in lang) + b")"


def _write(part: BodyPart, extended: bool, out: list[bytes]) -> None:
    if part.is_multipart:
        # body-type-mpart = 1*body SP media-subtype [SP body-ext-mpart]
        out.append(b"(")
        if part.children:
            for child in part.children:
                _write(child, extended, out)
        else:
            out.append(_EMPTY_BODYSTRUCTURE if extended else _EMPTY_BODY)
        out.append(b" ")
        out.append(nstring(part.raw_subtype or part.subtype))
        if extended:
            # body-ext-mpart = body-fld-param [SP body-fld-dsp [SP body-fld-lang [SP body-fld-loc]]]
            out.append(b" ")
            out.append(_params(part.params))
            out.append(b" ")
            out.append(_disposition(part.disposition))
            out.append(b" ")
            out.append(_language(part.language))
            out.append(b" ")
            out.append(nstring(part.location))
        out.append(b")")
        return
    # body-fields = body-fld-param SP body-fld-id SP body-fld-desc SP body-fld-enc SP body-fld-octets
    out.append(b"(")
    out.append(nstring(part.raw_type or part.content_type))
    out.append(b" ")
    out.append(nstring(part.raw_subtype or part.subtype))
    out.append(b" ")
    out.append(_params(part.params))
    out.append(b" ")
    out.append(nstring(part.id))
    out.append(b" ")
    out.append(nstring(part.description))
    out.append(b" ")
    out.append(nstring(part.encoding))
    out.append(b" %d" % part.size)
    if part.is_message:
        # body-type-msg = media-message SP body-fields SP envelope SP body SP body-fld-lines
        out.append(b" ")
        if part.message is not None:
            out.append(envelope_bytes(part.message.envelope))
            out.append(b" ")
            _write(part.message.root, extended, out)
        else:  # nesting limit reached
            out.append(_EMPTY_ENVELOPE)
            out.append(b" ")
            out.append(_EMPTY_BODYSTRUCTURE if extended else _EMPTY_BODY)
        out.append(b" %d" % part.lines)
    elif part.content_type == "text":
        # body-type-text = media-text SP body-fields SP body-fld-lines
        out.append(b" %d" % part.lines)
    if extended:
        # body-ext-1part = body-fld-md5 [SP body-fld-dsp [SP body-fld-lang [SP body-fld-loc]]]
        out.append(b" ")
        out.append(nstring(part.md5))
        out.append(b" ")
        out.append(_disposition(part.disposition))
        out.append(b" ")
        out.append(_language(part.language))
        out.append(b" ")
        out.append(nstring(part.location))
    out.append(b")")


def imap_bodystructure(info: MessageInfo, extended: bool) -> bytes:
    """BODYSTRUCTURE (``extended=True``) or BODY (``extended=False``) of a message."""
    out: list[bytes] = []
    _write(info.root, extended, out)
    return b"".join(out)
