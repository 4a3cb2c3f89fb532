"""Serialisers for IMAP responses (RFC 9051 §7). Pure functions from values to bytes; no asyncio."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime

from postfach.imap.utf7 import encode as utf7_encode
from postfach.mail.imap import string_bytes

CRLF = b"\r\n"
_SAFE_ATOM = re.compile(r"[^\x00-\x20\x7f-\U0010ffff(){%*\"\\\]]+\Z")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def tagged(tag: str, status: str, text: str, code: str | None = None) -> bytes:
    """``<tag> OK|NO|BAD [code] text``."""
    mid = f"[{code}] " if code else ""
    return f"{tag} {status} {mid}{text}\r\n".encode("utf-8", "replace")


def untagged(text: str) -> bytes:
    return f"* {text}\r\n".encode("utf-8", "replace")


def untagged_status(status: str, text: str, code: str | None = None) -> bytes:
    return tagged("*", status, text, code)


def continuation(text: str = "") -> bytes:
    return f"+ {text}\r\n".encode("ascii", "replace")


def quoted(s: str) -> bytes:
    """A string for the wire: quoted where possible, else a literal (RFC 9051 §4.3)."""
    return string_bytes(s.encode("utf-8"))


def astring(s: str) -> bytes:
    if s and _SAFE_ATOM.match(s) and s.upper() != "NIL":
        return s.encode("ascii")
    return quoted(s)


def mailbox_name(name: str, utf8: bool) -> bytes:
    """A store name for the wire: modified UTF-7 for IMAP4rev1 (RFC 3501 §5.1.3), UTF-8 as a
    quoted string for IMAP4rev2 (RFC 9051 §5.1)."""
    wire = name if utf8 else utf7_encode(name)
    raw = wire.encode("utf-8")
    if b'"' in raw or b"\\" in raw:
        raw = raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    return b'"' + raw + b'"'


def flag_list(flags: Iterable[str]) -> bytes:
    return ("(" + " ".join(sorted(flags, key=_flag_order)) + ")").encode("utf-8", "replace")


_SYSTEM_ORDER = {"\\Answered": 0, "\\Flagged": 1, "\\Deleted": 2, "\\Seen": 3, "\\Draft": 4, "\\Recent": 5}


def _flag_order(f: str) -> tuple[int, str]:
    return (_SYSTEM_ORDER.get(f, 6), f)


def internaldate(dt: datetime) -> bytes:
    """``"17-Jul-1996 02:44:25 -0700"`` (RFC 9051 §9 date-time)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    off = dt.utcoffset()
    minutes = int(off.total_seconds() // 60) if off is not None else 0
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    return (
        f'"{dt.day:02d}-{_MONTHS[dt.month - 1]}-{dt.year:04d} {dt.hour:02d}:{dt.minute:02d}:'
        f'{dt.second:02d} {sign}{minutes // 60:02d}{minutes % 60:02d}"'
    ).encode("ascii")


def literal_header(size: int, binary: bool = False) -> bytes:
    return b"%s{%d}\r\n" % (b"~" if binary else b"", size)


def literal(data: bytes) -> bytes:
    return b"{%d}\r\n" % len(data) + data


def uid_set(uids: Iterable[int]) -> str:
    """Compact uid-set/sequence-set: 1:3,5,7:9 (input in any order, duplicates allowed)."""
    out: list[str] = []
    start = prev = -2
    for u in sorted(set(uids)):
        if u == prev + 1:
            prev = u
            continue
        if start >= 0:
            out.append(str(start) if start == prev else f"{start}:{prev}")
        start = prev = u
    if start >= 0:
        out.append(str(start) if start == prev else f"{start}:{prev}")
    return ",".join(out)
