"""Sans-I/O POP3 input: a CRLF line receiver with a length cap, and command lines → dataclasses.

RFC 1939 §3: commands are a case-insensitive keyword, possibly followed by arguments separated by
single spaces, ended by CRLF. We also accept a bare LF (as Dovecot does) and runs of spaces.
No I/O and no asyncio here (STYLE.md: parsers are pure).
"""

from __future__ import annotations

from dataclasses import dataclass

# Message numbers and TOP line counts larger than this are clamped: no maildrop gets this big,
# and a client asking `TOP 1 99999999999999999999` (fetchmail uses 99999999) wants everything.
MAX_NUMBER = 2**31 - 1


class RemoteProtocolError(Exception):
    """The peer broke the wire protocol (e.g. a line over the limit). Carries the reply text."""


class CommandSyntaxError(Exception):
    """A command line that does not parse; the session answers ``-ERR <message>``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownCommandError(CommandSyntaxError):
    pass


# --------------------------------------------------------------------------------------- receiver


@dataclass(frozen=True, slots=True)
class LineTooLong:
    """Marker returned by ``LineReceiver.next_line`` in place of a line that exceeded the cap."""

    limit: int


class LineReceiver:
    """Buffers bytes and hands out complete lines (without the line ending).

    A line longer than ``max_line_bytes`` is reported once as ``LineTooLong`` and the rest of it is
    discarded up to its LF, so that the session resynchronises at the next line (h11 style).
    """

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no LF
        self._discarding = False

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet handed out (pipelined input)."""
        return len(self._buf)

    def reset(self) -> None:
        """Drop everything buffered (STLS: pipelined plaintext must not survive, RFC 2595 §4)."""
        self._buf.clear()
        self._scanned = 0
        self._discarding = False

    def next_line(self) -> bytes | LineTooLong | None:
        while True:
            idx = self._buf.find(b"\n", self._scanned)
            if idx < 0:
                self._scanned = len(self._buf)
                if self._discarding:
                    self._buf.clear()
                    self._scanned = 0
                    return None
                if len(self._buf) > self.max_line_bytes:
                    self._buf.clear()
                    self._scanned = 0
                    self._discarding = True
                    return LineTooLong(self.max_line_bytes)
                return None
            line = bytes(self._buf[:idx])
            del self._buf[: idx + 1]
            self._scanned = 0
            if self._discarding:  # the tail of an over-long line: already reported
                self._discarding = False
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self.max_line_bytes:
                return LineTooLong(self.max_line_bytes)
            return line


# --------------------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class User:
    name: str


@dataclass(frozen=True, slots=True)
class Pass:
    password: str

    def __repr__(self) -> str:  # never log secrets
        return "Pass(password=<redacted>)"


@dataclass(frozen=True, slots=True)
class Apop:
    pass


@dataclass(frozen=True, slots=True)
class Auth:
    mechanism: str | None  # None: "AUTH" alone lists the mechanisms (RFC 1734 habit, Dovecot too)
    initial_response: str | None = None  # base64 text as sent; "=" is an empty response (RFC 5034 §4)

    def __repr__(self) -> str:
        ir = None if self.initial_response is None else "<redacted>"
        return f"Auth(mechanism={self.mechanism!r}, initial_response={ir})"


@dataclass(frozen=True, slots=True)
class Capa:
    pass


@dataclass(frozen=True, slots=True)
class Stls:
    pass


@dataclass(frozen=True, slots=True)
class Stat:
    pass


@dataclass(frozen=True, slots=True)
class List:
    msg: int | None = None


@dataclass(frozen=True, slots=True)
class Uidl:
    msg: int | None = None


@dataclass(frozen=True, slots=True)
class Retr:
    msg: int


@dataclass(frozen=True, slots=True)
class Dele:
    msg: int


@dataclass(frozen=True, slots=True)
class Top:
    msg: int
    lines: int


@dataclass(frozen=True, slots=True)
class Noop:
    pass


@dataclass(frozen=True, slots=True)
class Rset:
    pass


@dataclass(frozen=True, slots=True)
class Quit:
    pass


Command = (
    User | Pass | Apop | Auth | Capa | Stls | Stat | List | Uidl | Retr | Dele | Top | Noop | Rset | Quit
)

_NO_ARGS: dict[str, Command] = {
    "CAPA": Capa(),
    "STLS": Stls(),
    "STAT": Stat(),
    "NOOP": Noop(),
    "RSET": Rset(),
    "QUIT": Quit(),
}


def _number(token: str, what: str) -> int:
    if not token.isascii() or not token.isdigit():
        raise CommandSyntaxError(f"Invalid {what}: {token[:20]!r}")
    if len(token) > 12:  # no need to build a huge int
        return MAX_NUMBER
    return min(int(token), MAX_NUMBER)


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandSyntaxError("Command line is not valid UTF-8") from None


def verb_of(line: bytes) -> str:
    """The upper-cased keyword of a line, for logs (never the arguments: they may be secrets)."""
    return line.split(b" ", 1)[0][:8].decode("ascii", "replace").upper()


def parse_command(line: bytes) -> Command:
    """One command line (without CRLF) → a command. Raises ``CommandSyntaxError``."""
    keyword_raw, sep, rest_raw = line.lstrip(b" ").partition(b" ")
    if not keyword_raw:
        raise UnknownCommandError("Empty command line")
    if not keyword_raw.isascii() or not keyword_raw.isalpha() or len(keyword_raw) > 8:
        raise UnknownCommandError("Unknown command")
    keyword = keyword_raw.decode("ascii").upper()

    if keyword == "PASS":
        # RFC 1939 §7: the password is the rest of the line; it may contain spaces.
        if not sep or rest_raw == b"":
            raise CommandSyntaxError("PASS needs a password")
        return Pass(_decode(rest_raw))

    rest = _decode(rest_raw)
    args = rest.split()

    if keyword in _NO_ARGS:
        # Like Dovecot, ignore whatever follows an argument-less command.
        return _NO_ARGS[keyword]
    if keyword == "USER":
        name = rest.strip()
        if not name:
            raise CommandSyntaxError("USER needs a user name")
        return User(name)
    if keyword == "APOP":
        return Apop()
    if keyword == "AUTH":
        if not args:
            return Auth(None)
        if len(args) > 2:
            raise CommandSyntaxError("AUTH takes a mechanism and at most one initial response")
        return Auth(args[0].upper(), args[1] if len(args) == 2 else None)
    if keyword in ("LIST", "UIDL"):
        msg = _number(args[0], "message number") if args else None
        return List(msg) if keyword == "LIST" else Uidl(msg)
    if keyword in ("RETR", "DELE"):
        if not args:
            raise CommandSyntaxError(f"{keyword} needs a message number")
        n = _number(args[0], "message number")
        return Retr(n) if keyword == "RETR" else Dele(n)
    if keyword == "TOP":
        # RFC 1939 §7: TOP msg n, both required, n non-negative.
        if len(args) < 2:
            raise CommandSyntaxError("TOP needs a message number and a line count")
        return Top(_number(args[0], "message number"), _number(args[1], "line count"))
    raise UnknownCommandError("Unknown command")
