"""Sans-I/O POP3 output: response objects, their bytes, and the streaming filters for RETR/TOP.

RFC 1939 §3: a response is a status indicator (``+OK``/``-ERR``), text, CRLF; a multi-line response
ends with a line holding a single ``.``, and lines starting with ``.`` are byte-stuffed.
RFC 2449 §8: extended response codes go in brackets right after the status indicator.
No I/O and no asyncio here.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass

from postfach.store.base import WIRE_CRLF_ONLY, WIRE_NO_DOT_LINES, BlobReader
from postfach.types import Uid

# RFC 2449 §4: a response line is at most 512 octets including CRLF.
MAX_RESPONSE_LINE = 512

# Extended response codes (RFC 2449 §8, RFC 3206).
IN_USE = "IN-USE"
LOGIN_DELAY = "LOGIN-DELAY"
SYS_TEMP = "SYS/TEMP"
SYS_PERM = "SYS/PERM"
AUTH = "AUTH"


@dataclass(frozen=True, slots=True)
class Ok:
    text: str = ""
    code: str | None = None


@dataclass(frozen=True, slots=True)
class Err:
    text: str
    code: str | None = None


@dataclass(frozen=True, slots=True)
class MultiLine:
    """``+OK`` followed by lines (without CRLF, not yet dot-stuffed) and the terminating ``.``."""

    status: Ok
    lines: Sequence[bytes]


@dataclass(frozen=True, slots=True)
class Continue:
    """A SASL challenge (RFC 5034 §4): ``+ <base64>``; the raw bytes are encoded here."""

    data: bytes


@dataclass(frozen=True, slots=True)
class MessageBody:
    """``+OK`` then a stored message (whole, or headers + ``top_lines`` body lines), streamed by the
    connection from ``blob`` through ``TopFilter`` / ``DotStuffer``; then ``.``."""

    status: Ok
    blob: BlobReader
    uid: Uid
    top_lines: int | None = None  # None: RETR (the whole message)
    mark_seen: bool = False


Response = Ok | Err | MultiLine | Continue | MessageBody


def status_line(ok: bool, text: str, code: str | None = None) -> bytes:
    head = b"+OK" if ok else b"-ERR"
    parts = [head]
    if code:
        parts.append(b"[" + code.encode("ascii") + b"]")
    if text:
        # No CR/LF may leak into a response line; keep within RFC 2449's 512 octets.
        clean = text.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace")
        parts.append(clean)
    line = b" ".join(parts)
    if len(line) > MAX_RESPONSE_LINE - 2:
        line = line[: MAX_RESPONSE_LINE - 2]
    return line + b"\r\n"


def _stuff_lines(lines: Sequence[bytes]) -> bytes:
    if not lines:
        return b".\r\n"
    body = b"\r\n".join(lines)
    if body.startswith(b"."):
        body = b"." + body
    body = body.replace(b"\r\n.", b"\r\n..")
    return body + b"\r\n.\r\n"


def serialise(response: Ok | Err | MultiLine | Continue) -> bytes:
    match response:
        case Ok(text, code):
            return status_line(True, text, code)
        case Err(text, code):
            return status_line(False, text, code)
        case MultiLine(status, lines):
            return status_line(True, status.text, status.code) + _stuff_lines(lines)
        case Continue(data):
            return b"+ " + base64.b64encode(data) + b"\r\n"
    raise AssertionError(f"not a serialisable response: {response!r}")  # pragma: no cover


# --------------------------------------------------------------------------- streaming filters

_BARE_LF = re.compile(rb"(?<!\r)\n")


class DotStuffer:
    """Turns a message, fed in chunks of any size, into the body of a multi-line response:
    line ends normalised to CRLF (a bare LF becomes CRLF, RFC 1939 §11), lines starting with ``.``
    stuffed, and ``finish()`` ends the last line and adds the terminating ``.``.

    Chunk boundaries may fall anywhere, including between CR and LF."""

    def __init__(self, wire: int | None = None) -> None:
        self._at_bol = True  # the last byte emitted ended a line (or nothing was emitted)
        self._last_cr = False  # the last byte emitted was a CR
        # What the store learned at ingest (WIRE_* bits): skip the scans that cannot find anything.
        wire = wire or 0
        self._crlf_only = bool(wire & WIRE_CRLF_ONLY)
        self._no_dots = self._crlf_only and bool(wire & WIRE_NO_DOT_LINES)

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        prefix = b""
        if self._last_cr and data[0] == 0x0A:  # LF completing a CRLF split across chunks
            prefix = b"\n"
            data = data[1:]
            self._at_bol, self._last_cr = True, False
            if not data:
                return prefix
        # Two cheap C-level passes decide whether any LF lacks its CR (the regex is ~20x slower);
        # none when the store knows the message has CRLF line ends only.
        if not self._crlf_only and data.count(b"\n") != data.count(b"\r\n"):
            data = _BARE_LF.sub(b"\r\n", data)
        if not self._no_dots:
            if self._at_bol and data[0] == 0x2E:  # "."
                data = b"." + data
            data = data.replace(b"\r\n.", b"\r\n..")  # returns `data` itself when there is no match
        last = data[-1]
        self._at_bol = last == 0x0A
        self._last_cr = last == 0x0D
        return prefix + data if prefix else data

    def finish(self) -> bytes:
        if self._at_bol:
            tail = b""
        elif self._last_cr:
            tail = b"\n"
        else:
            tail = b"\r\n"
        self._at_bol, self._last_cr = True, False
        return tail + b".\r\n"


class TopFilter:
    """Passes a message's header, the blank line after it, and then at most ``body_lines`` lines
    of the body (RFC 1939 §7 TOP). Works on the raw stored bytes (CRLF or LF), fed in chunks.
    A message without a blank line is all header and is passed whole."""

    def __init__(self, body_lines: int) -> None:
        self._left = body_lines
        self._in_header = True
        self._line_empty_so_far = True  # the current (unfinished) line holds nothing but maybe CR
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if self.done or not data:
            return b""
        pos = 0
        if self._in_header:
            n = len(data)
            while pos < n:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    rest = data[pos:]
                    self._line_empty_so_far = self._line_empty_so_far and rest in (b"", b"\r")
                    return data
                line = data[pos:nl]
                empty = self._line_empty_so_far and line in (b"", b"\r")
                pos = nl + 1
                self._line_empty_so_far = True
                if empty:
                    self._in_header = False
                    break
            else:
                return data
        # In the body: pass up to self._left more lines.
        if self._left <= 0:
            self.done = True
            return data[:pos]
        body = data[pos:]
        count = body.count(b"\n")
        if count < self._left:
            self._left -= count
            return data
        end = pos
        for _ in range(self._left):
            end = data.find(b"\n", end) + 1
        self._left = 0
        self.done = True
        return data[:end]
