"""Sans-I/O IMAP command receiver: bytes in, whole commands (with their literals) out.

``feed(data)`` then ``next_event()`` until it says ``NeedData``. A command is complete at the CRLF
that is not followed by a literal; literals are ``{n}`` (synchronizing: the driver sends ``+ ``
when the receiver answers ``NeedContinuation``), ``{n+}`` (LITERAL+, RFC 7888) and ``~{n}``
(literal8, RFC 3516). Size caps (RFC 9051 §4.3 lets servers limit lines and literals) give a
``Rejected`` event carrying the tag and the reply, and the receiver resynchronises by itself.
No asyncio here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LITERAL_END = re.compile(rb"~?\{(\d{1,20})(\+?)\}\r?\n\Z")
_TAG = re.compile(rb"[^\x00-\x20\x7f(){%*\"\\\]+]{1,64}")


@dataclass(frozen=True, slots=True)
class Request:
    """One complete command: the line(s) without the final CRLF, literals inline as received."""

    raw: bytes


@dataclass(frozen=True, slots=True)
class NeedData:
    pass


@dataclass(frozen=True, slots=True)
class NeedContinuation:
    """A synchronizing literal of ``size`` bytes was announced: send ``+ `` and read on."""

    size: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """The command was dropped by a size cap; answer ``BAD``/``NO`` with ``code`` to ``tag``."""

    tag: str
    code: str
    text: str
    no: bool = False  # True: NO (a literal the client had not yet sent), False: BAD


Event = Request | NeedData | NeedContinuation | Rejected

NEED_DATA = NeedData()


class Receiver:
    def __init__(self, max_line_bytes: int = 65536, max_literal_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_line_bytes = max_line_bytes
        self.max_literal_bytes = max_literal_bytes
        self._buf = bytearray()
        self._scan = 0  # where to look for the next line end of the current command
        self._line_bytes = 0  # command bytes outside literals so far
        self._acked = -1  # scan position of the literal already answered with NeedContinuation
        self._discard = 0  # bytes of an oversized literal still to drop
        self._skip_line = False  # drop everything up to the next LF (resync after a rejection)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        if self._discard and not self._buf:
            take = min(self._discard, len(data))
            self._discard -= take
            data = data[take:]
        self._buf += data

    def reset(self) -> int:
        """Drop everything buffered (STARTTLS: plaintext pipelined after the command must not
        survive into the TLS session, RFC 3207 §4 / RFC 9051 §6.2.1). Returns the bytes dropped."""
        dropped = len(self._buf)
        self._buf.clear()
        self._scan = 0
        self._line_bytes = 0
        self._acked = -1
        self._discard = 0
        self._skip_line = False
        return dropped

    def take_buffered(self) -> bytes:
        """Everything buffered, removed (COMPRESS: bytes after the command are compressed)."""
        data = bytes(self._buf)
        self.reset()
        return data

    def read_line(self) -> bytes | None:
        """A raw line (AUTHENTICATE responses, IDLE's DONE) without its CRLF, or None for more data.
        Over-long lines are cut at the cap (the caller then sees garbage and answers BAD)."""
        idx = self._buf.find(b"\n")
        if idx < 0:
            if len(self._buf) > self.max_line_bytes:
                line = bytes(self._buf)
                self._buf.clear()
                self._skip_line = True
                return line
            return None
        line = bytes(self._buf[:idx])
        del self._buf[: idx + 1]
        if self._skip_line:
            self._skip_line = False
            return self.read_line()
        return line[:-1] if line.endswith(b"\r") else line

    def _tag(self) -> str:
        m = _TAG.match(self._buf)
        return m.group(0).decode("ascii", "replace") if m else "*"

    def _finish(self, upto: int) -> None:
        del self._buf[:upto]
        self._scan = 0
        self._line_bytes = 0
        self._acked = -1

    def next_event(self) -> Event:
        while True:
            if self._discard:
                take = min(self._discard, len(self._buf))
                del self._buf[:take]
                self._discard -= take
                if self._discard:
                    return NEED_DATA
            if self._skip_line:
                idx = self._buf.find(b"\n")
                if idx < 0:
                    self._buf.clear()
                    return NEED_DATA
                del self._buf[: idx + 1]
                self._skip_line = False
                continue
            idx = self._buf.find(b"\n", self._scan)
            if idx < 0:
                if self._line_bytes + len(self._buf) - self._scan > self.max_line_bytes:
                    tag = self._tag()
                    self._finish(len(self._buf))
                    self._skip_line = True
                    return Rejected(tag, "TOOBIG", "Command line too long")
                return NEED_DATA
            self._line_bytes += idx + 1 - self._scan
            if self._line_bytes > self.max_line_bytes:
                tag = self._tag()
                self._finish(idx + 1)
                return Rejected(tag, "TOOBIG", "Command line too long")
            m = _LITERAL_END.search(self._buf, max(self._scan, idx - 30), idx + 1)
            if m is None:
                end = idx - 1 if idx > 0 and self._buf[idx - 1] == 0x0D else idx
                raw = bytes(self._buf[:end])
                self._finish(idx + 1)
                return Request(raw)
            size = int(m.group(1))
            sync = not m.group(2)
            if size > self.max_literal_bytes:
                tag = self._tag()
                self._finish(idx + 1)
                if sync:
                    # The client waits for "+ " and gives the command up on our tagged reply.
                    return Rejected(tag, "TOOBIG", "Literal too big", no=True)
                # RFC 7888 §4: a non-synchronizing literal arrives anyway; drop it and the line.
                self._discard = size
                self._skip_line = True
                return Rejected(tag, "TOOBIG", "Literal too big")
            if len(self._buf) >= idx + 1 + size:
                self._scan = idx + 1 + size
                continue
            if sync and self._acked != idx:
                self._acked = idx
                return NeedContinuation(size)
            return NEED_DATA
