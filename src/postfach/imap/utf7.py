"""Modified UTF-7 for mailbox names on the wire (RFC 3501 §5.1.3; RFC 9051 keeps it for rev1 clients)."""

from __future__ import annotations

import base64


class Utf7Error(ValueError):
    """The name is not valid modified UTF-7."""


def encode(name: str) -> str:
    """UTF-8 (str) -> modified UTF-7."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def decode(wire: str) -> str:
    """Modified UTF-7 -> str. Raises Utf7Error on malformed input (RFC 3501 §5.1.3 rules)."""
    out: list[str] = []
    i = 0
    n = len(wire)
    while i < n:
        ch = wire[i]
        if ord(ch) > 0x7E or ord(ch) < 0x20:
            raise Utf7Error("mailbox name has characters outside printable US-ASCII")
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        end = wire.find("-", i + 1)
        if end < 0:
            raise Utf7Error("unterminated &...- sequence")
        chunk = wire[i + 1 : end]
        i = end + 1
        if not chunk:
            out.append("&")
            continue
        b64 = chunk.replace(",", "/")
        b64 += "=" * (-len(b64) % 4)
        try:
            raw = base64.b64decode(b64, validate=True)
            text = raw.decode("utf-16-be")
        except (ValueError, UnicodeDecodeError):
            raise Utf7Error("bad modified UTF-7 sequence") from None
        if any(0x20 <= ord(c) <= 0x7E for c in text):
            raise Utf7Error("printable ASCII must not be base64-encoded")
        out.append(text)
    return "".join(out)


def decode_lenient(wire: str) -> str:
    """Decode when the name is valid modified UTF-7, else take it as given (UTF-8 clients)."""
    try:
        return decode(wire)
    except Utf7Error:
        return wire
