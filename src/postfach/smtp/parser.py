"""Sans-I/O SMTP server input: the byte receiver (command lines, DATA, BDAT chunks) and the
command-line parser (RFC 5321 §4.1 plus the ESMTP parameters we offer).

No asyncio, no sockets: ``Receiver.feed(bytes)`` then ``Receiver.next_event()`` until it returns
``None`` ("need more data"), as in h11.

DATA and smuggling (RFC 5321 §4.1.1.4, §2.3.8; SMTP smuggling, CVE-2023-51764 and friends):
only ``<CR><LF>.<CR><LF>`` ends DATA. ``<LF>.<LF>``, ``<CR>.<CR>``, ``<LF>.<CR><LF>`` and
``<CR><LF>.<LF>`` never do. A message that contains a bare ``<LF>`` or bare ``<CR>`` anywhere is read
to its real end and then rejected with ``550 5.5.2`` — this is Postfix ≥ 3.9's
``smtpd_forbid_bare_newline = reject`` behaviour (reply code 550, session continues), chosen over
"normalize" because postfach stores messages byte-exact and never rewrites line ends. Command lines
may end in a bare ``<LF>`` (tolerated like Postfix; a command line cannot smuggle anything).

NUL: RFC 5321 §4.5.2 / RFC 2045 §2.7-2.8 forbid NUL in 7bit and 8bit data; a message with NUL that
was not declared ``BODY=BINARYMIME`` is rejected ``550 5.6.0``; a NUL in a command line is a syntax
error (``500 5.5.2``).
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from dataclasses import dataclass, field

from postfach.smtp import codes
from postfach.smtp.codes import Reply

# ------------------------------------------------------------------------------------------ errors


class CommandError(Exception):
    """The client's command is wrong; carries the reply to send (mox's user error)."""

    def __init__(self, reply: Reply, detail: str | None = None) -> None:
        super().__init__(detail or reply.text)
        self.reply = reply if detail is None else reply.with_text(detail)


# ----------------------------------------------------------------------------------------- receiver


@dataclass(frozen=True, slots=True)
class Line:
    """One command line, without its line end."""

    data: bytes


@dataclass(frozen=True, slots=True)
class LineTooLong:
    """A command line exceeded the cap; its bytes up to the next LF were discarded."""


@dataclass(frozen=True, slots=True)
class DataComplete:
    """End of DATA seen. ``data`` is the unstuffed message (empty when ``too_big``)."""

    data: bytes
    too_big: bool
    size: int  # unstuffed size as far as it was counted


@dataclass(frozen=True, slots=True)
class ChunkComplete:
    """A whole BDAT chunk (exactly the announced count). ``data`` is empty when discarded."""

    data: bytes
    size: int
    discarded: bool


Event = Line | LineTooLong | DataComplete | ChunkComplete


class _Mode(enum.Enum):
    COMMAND = "command"
    DATA = "data"
    CHUNK = "chunk"


_END = b"\r\n.\r\n"


class Receiver:
    """Splits the client's byte stream into events. The session tells it when DATA or a BDAT
    chunk starts (``start_data`` / ``start_chunk``); everything else is command lines."""

    def __init__(self, max_line_bytes: int, max_message_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self.max_message_bytes = max_message_bytes
        self._buf = bytearray()
        self._mode = _Mode.COMMAND
        self._skipping_line = False  # discarding the rest of an over-long line
        # DATA state: raw (still dot-stuffed) bytes, preceded by a virtual CRLF.
        self._raw = bytearray()
        self._scan = 0
        self._data_too_big = False
        self._data_count = 0
        # CHUNK state
        self._chunk_left = 0
        self._chunk = bytearray()
        self._chunk_size = 0
        self._chunk_discard = False

    # --- control -------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._mode.value

    def start_data(self) -> None:
        assert self._mode is _Mode.COMMAND
        self._mode = _Mode.DATA
        self._raw = bytearray(b"\r\n")
        self._scan = 0
        self._data_too_big = False
        self._data_count = 0

    def start_chunk(self, size: int, *, discard: bool) -> None:
        """Read exactly ``size`` bytes next (RFC 3030 §2); keep them unless ``discard``."""
        assert self._mode is _Mode.COMMAND
        self._mode = _Mode.CHUNK
        self._chunk_left = size
        self._chunk_size = size
        self._chunk = bytearray()
        self._chunk_discard = discard

    def buffered(self) -> int:
        """Bytes received and not yet consumed (pipelined input)."""
        return len(self._buf)

    def reset(self) -> bytes:
        """Drop everything buffered (STARTTLS, RFC 3207 §4: no plaintext survives the handshake)."""
        dropped = bytes(self._buf)
        self._buf.clear()
        self._skipping_line = False
        return dropped

    def feed(self, data: bytes) -> None:
        self._buf += data

    # --- events --------------------------------------------------------------------------------
    def next_event(self) -> Event | None:
        if self._mode is _Mode.COMMAND:
            return self._next_line()
        if self._mode is _Mode.DATA:
            return self._next_data()
        return self._next_chunk()

    def _next_line(self) -> Line | LineTooLong | None:
        while True:
            nl = self._buf.find(b"\n")
            if self._skipping_line:
                if nl < 0:
                    self._buf.clear()
                    return None
                del self._buf[: nl + 1]
                self._skipping_line = False
                return LineTooLong()
            if nl < 0:
                if len(self._buf) > self.max_line_bytes + 1:  # + 1: room for the CR of a full line
                    self._buf.clear()
                    self._skipping_line = True
                    continue
                return None
            end = nl - 1 if nl > 0 and self._buf[nl - 1] == 0x0D else nl
            if end > self.max_line_bytes:
                del self._buf[: nl + 1]
                return LineTooLong()
            line = bytes(self._buf[:end])
            del self._buf[: nl + 1]
            return Line(line)

    def _next_data(self) -> DataComplete | None:
        if self._buf:
            self._raw += self._buf
            self._buf.clear()
        idx = self._raw.find(_END, self._scan)
        if idx < 0:
            if self._data_too_big or len(self._raw) - 2 > self.max_message_bytes + 4096:
                # Over the limit (with room for dot-stuffing): stop keeping the message, count it,
                # keep the last 4 bytes so that a terminator split across reads is still found.
                self._data_too_big = True
                drop = len(self._raw) - 4
                if drop > 0:
                    self._data_count += drop
                    del self._raw[:drop]
                self._scan = 0
            else:
                self._scan = max(len(self._raw) - 4, 0)
            return None
        rest = bytes(self._raw[idx + len(_END) :])
        body_raw = bytes(self._raw[: idx + 2])  # still begins with the virtual CRLF
        self._raw = bytearray()
        self._mode = _Mode.COMMAND
        self._buf[:0] = rest
        # RFC 5321 §4.5.2: a line starting with "." loses that first ".".
        body = body_raw.replace(b"\r\n.", b"\r\n")[2:]
        if self._data_too_big or len(body) > self.max_message_bytes:
            return DataComplete(b"", True, self._data_count + len(body))
        return DataComplete(body, False, len(body))

    def _next_chunk(self) -> ChunkComplete | None:
        if self._chunk_left:
            take = min(self._chunk_left, len(self._buf))
            if take:
                if not self._chunk_discard:
                    self._chunk += self._buf[:take]
                del self._buf[:take]
                self._chunk_left -= take
        if self._chunk_left:
            return None
        self._mode = _Mode.COMMAND
        data = b"" if self._chunk_discard else bytes(self._chunk)
        self._chunk = bytearray()
        return ChunkComplete(data, self._chunk_size, self._chunk_discard)


def bare_line_end(data: bytes) -> Reply | None:
    """The 550 reply for a message with a bare LF or CR (see module doc), or None."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf:
        return codes.R550_BARE_LF
    if data.count(b"\r") != crlf:
        return codes.R550_BARE_CR
    return None


# ----------------------------------------------------------------------------------------- commands


class Body(enum.Enum):
    SEVEN_BIT = "7BIT"
    EIGHT_BIT = "8BITMIME"
    BINARY = "BINARYMIME"


@dataclass(frozen=True, slots=True)
class MailParams:
    size: int | None = None
    body: Body | None = None
    smtputf8: bool = False
    ret: str | None = None  # RFC 3461 §4.3: FULL | HDRS
    envid: str | None = None  # decoded xtext
    requiretls: bool = False
    auth: str | None = None  # RFC 4954 §5 AUTH= (decoded xtext; "<>" for none)


@dataclass(frozen=True, slots=True)
class RcptParams:
    notify: str | None = None  # "NEVER" or comma list of SUCCESS, FAILURE, DELAY (upper case)
    orcpt: str | None = None  # "rfc822;addr" with the address part xtext-decoded


@dataclass(frozen=True, slots=True)
class Helo:
    domain: str


@dataclass(frozen=True, slots=True)
class Ehlo:
    domain: str


@dataclass(frozen=True, slots=True)
class MailFrom:
    address: str  # "" for the null reverse-path
    params: MailParams = field(default_factory=MailParams)


@dataclass(frozen=True, slots=True)
class RcptTo:
    address: str
    params: RcptParams = field(default_factory=RcptParams)


@dataclass(frozen=True, slots=True)
class Data:
    pass


@dataclass(frozen=True, slots=True)
class Bdat:
    size: int
    last: bool


@dataclass(frozen=True, slots=True)
class Rset:
    pass


@dataclass(frozen=True, slots=True)
class Noop:
    pass


@dataclass(frozen=True, slots=True)
class Quit:
    pass


@dataclass(frozen=True, slots=True)
class Vrfy:
    argument: str


@dataclass(frozen=True, slots=True)
class Expn:
    argument: str


@dataclass(frozen=True, slots=True)
class Help:
    argument: str


@dataclass(frozen=True, slots=True)
class StartTls:
    pass


@dataclass(frozen=True, slots=True)
class Auth:
    mechanism: str
    initial: bytes | None  # decoded initial response; b"" for "="; None when absent


@dataclass(frozen=True, slots=True)
class BdatSyntaxError:
    """A BDAT line whose byte count cannot be read: the stream cannot be resynchronised."""

    reply: Reply


Command = (
    Helo | Ehlo | MailFrom | RcptTo | Data | Bdat | Rset | Noop | Quit | Vrfy | Expn | Help | StartTls | Auth
)

_DOMAIN_RE = re.compile(r"^(?:\[[^\]\s]+\]|[^\s\[\]<>@]+)$")
_KEYWORD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_VALUE_RE = re.compile(r"^[\x21-\x3c\x3e-\x7e\x80-\U0010ffff]+$")
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_DOT_ATOM_RE = re.compile(rf"^[{_ATEXT}\x80-\U0010ffff]+(?:\.[{_ATEXT}\x80-\U0010ffff]+)*$")
_QUOTED_RE = re.compile(r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]|\\[\x20-\x7e])*"$')
_LDH = "A-Za-z0-9\x80-\U0010ffff"
_LABEL_RE = re.compile(rf"^[{_LDH}](?:[{_LDH}-]*[{_LDH}])?$")
_HEX_UPPER = "0123456789ABCDEF"
_MAX_BDAT = 10**12


def xtext_decode(value: str) -> str:
    """RFC 3461 §4: ``+XX`` (upper-case hex) encodes an octet; anything else is literal."""
    out = bytearray()
    i = 0
    raw = value.encode("utf-8")
    while i < len(raw):
        c = raw[i]
        if c == 0x2B:  # "+"
            hx = raw[i + 1 : i + 3].decode("ascii", "replace")
            if len(hx) != 2 or any(h not in _HEX_UPPER for h in hx):
                raise CommandError(codes.R501_SYNTAX, "Error: bad xtext encoding")
            out.append(int(hx, 16))
            i += 3
        else:
            out.append(c)
            i += 1
    return out.decode("utf-8", "replace")


def valid_domain(domain: str) -> bool:
    if domain.startswith("[") and domain.endswith("]"):
        return len(domain) > 2 and " " not in domain
    if not domain or len(domain) > 255:
        return False
    return all(_LABEL_RE.match(label) for label in domain.rstrip(".").split("."))


def valid_mailbox(address: str) -> bool:
    """RFC 5321 §4.1.2 Mailbox (RFC 6531 §3.3 allows UTF-8 in both parts)."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or len(local.encode()) > 256:
        return False
    if not (_DOT_ATOM_RE.match(local) or _QUOTED_RE.match(local)):
        return False
    return valid_domain(domain)


def _split_path(rest: str) -> tuple[str, str]:
    """``<path> params`` → (address inside the brackets, params text)."""
    rest = rest.lstrip(" ")  # Postfix accepts "MAIL FROM: <a@b>"
    if rest.startswith("<"):
        # Find the closing ">" outside a quoted local part.
        in_quote = False
        escaped = False
        for i, ch in enumerate(rest):
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_quote = not in_quote
            elif ch == ">" and not in_quote:
                return rest[1:i], rest[i + 1 :]
        raise CommandError(codes.R501_SYNTAX, "Syntax error: missing '>' in address")
    # Postfix (strict_rfc821_envelopes = no) takes a bare address too.
    addr, _, params = rest.partition(" ")
    return addr, params


def _strip_source_route(path: str) -> str:
    # RFC 5321 §4.1.2 / Appendix C: "@a,@b:user@c" — MUST be accepted, SHOULD be ignored.
    if path.startswith("@"):
        colon = path.find(":")
        if colon < 0:
            raise CommandError(codes.R501_SYNTAX, "Syntax error: bad source route")
        return path[colon + 1 :]
    return path


def _params(text: str) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _KEYWORD_RE.match(key) or (eq and not _VALUE_RE.match(value)):
            raise CommandError(codes.R501_SYNTAX, f"Syntax error in parameter {item[:40]!r}")
        ukey = key.upper()
        if ukey in seen:
            raise CommandError(codes.R501_SYNTAX, f"Error: duplicate parameter {ukey}")
        seen.add(ukey)
        out.append((ukey, value if eq else None))
    return out


def _need_value(key: str, value: str | None) -> str:
    if value is None or value == "":
        raise CommandError(codes.R501_SYNTAX, f"Error: {key} needs a value")
    return value


def _no_value(key: str, value: str | None) -> None:
    if value is not None:
        raise CommandError(codes.R501_SYNTAX, f"Error: {key} takes no value")


def parse_mail_params(text: str) -> MailParams:
    size: int | None = None
    body: Body | None = None
    smtputf8 = requiretls = False
    ret = envid = auth = None
    for key, value in _params(text):
        match key:
            case "SIZE":  # RFC 1870 §3
                v = _need_value(key, value)
                if not v.isdigit() or len(v) > 20:
                    raise CommandError(codes.R501_SYNTAX, "Error: bad SIZE value")
                size = int(v)
            case "BODY":  # RFC 1652, RFC 3030 §3
                v = _need_value(key, value).upper()
                try:
                    body = Body(v)
                except ValueError:
                    raise CommandError(
                        codes.R501_SYNTAX, "Error: BODY must be 7BIT, 8BITMIME or BINARYMIME"
                    ) from None
            case "SMTPUTF8":  # RFC 6531 §3.4
                _no_value(key, value)
                smtputf8 = True
            case "RET":  # RFC 3461 §4.3
                v = _need_value(key, value).upper()
                if v not in ("FULL", "HDRS"):
                    raise CommandError(codes.R501_SYNTAX, "Error: RET must be FULL or HDRS")
                ret = v
            case "ENVID":  # RFC 3461 §4.4
                envid = xtext_decode(_need_value(key, value))
                if len(envid) > 100:
                    raise CommandError(codes.R501_SYNTAX, "Error: ENVID too long")
            case "REQUIRETLS":  # RFC 8689 §4
                _no_value(key, value)
                requiretls = True
            case "AUTH":  # RFC 4954 §5
                auth = xtext_decode(_need_value(key, value))
            case _:
                raise CommandError(codes.R555_UNSUPPORTED_PARAMETER, f"Unsupported option: {key}")
    return MailParams(size, body, smtputf8, ret, envid, requiretls, auth)


_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def parse_rcpt_params(text: str) -> RcptParams:
    notify = orcpt = None
    for key, value in _params(text):
        match key:
            case "NOTIFY":  # RFC 3461 §4.1
                words = _need_value(key, value).upper().split(",")
                if words == ["NEVER"]:
                    notify = "NEVER"
                elif not words or not all(w in _NOTIFY_WORDS for w in words) or len(set(words)) != len(words):
                    raise CommandError(codes.R501_SYNTAX, "Error: bad NOTIFY value")
                else:
                    notify = ",".join(words)
            case "ORCPT":  # RFC 3461 §4.2: addr-type ";" xtext
                v = _need_value(key, value)
                addr_type, semi, xaddr = v.partition(";")
                if not semi or not addr_type or not xaddr or not _KEYWORD_RE.match(addr_type):
                    raise CommandError(codes.R501_SYNTAX, "Error: bad ORCPT value")
                orcpt = f"{addr_type};{xtext_decode(xaddr)}"
            case _:
                raise CommandError(codes.R555_UNSUPPORTED_PARAMETER, f"Unsupported option: {key}")
    return RcptParams(notify, orcpt)


def _address(path: str, *, allow_null: bool) -> str:
    path = _strip_source_route(path)
    if path == "":
        if allow_null:
            return ""
        raise CommandError(codes.R501_SYNTAX, "Syntax error: empty address")
    if not valid_mailbox(path):
        raise CommandError(codes.R553_BAD_ADDRESS, f"<{path[:200]}>: bad address syntax")
    return path


def parse_command(line: bytes) -> Command:
    """One command line (no line end) → a command; ``CommandError`` carries the reply otherwise."""
    if b"\x00" in line:
        raise CommandError(codes.R500_BAD_SYNTAX, "Error: NUL character in command")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError(codes.R500_BAD_SYNTAX, "Error: bad UTF-8 syntax") from None
    verb, _, arg = text.partition(" ")
    verb = verb.upper()
    match verb:
        case "EHLO" | "HELO":
            domain = arg.strip()
            # Submission clients send anything (curl: a file name); demand one word only.
            if not domain or " " in domain or not _DOMAIN_RE.match(domain):
                raise CommandError(codes.R501_SYNTAX, f"Syntax: {verb} hostname")
            return Ehlo(domain) if verb == "EHLO" else Helo(domain)
        case "MAIL":
            if not arg[:5].upper() == "FROM:":
                raise CommandError(codes.R501_SYNTAX, "Syntax: MAIL FROM:<address>")
            path, params = _split_path(arg[5:])
            return MailFrom(_address(path, allow_null=True), parse_mail_params(params))
        case "RCPT":
            if not arg[:3].upper() == "TO:":
                raise CommandError(codes.R501_SYNTAX, "Syntax: RCPT TO:<address>")
            path, params = _split_path(arg[3:])
            # RFC 5321 §4.1.1.3: "<Postmaster>" without a domain MUST be accepted.
            if path.lower() == "postmaster":
                return RcptTo("postmaster", parse_rcpt_params(params))
            return RcptTo(_address(path, allow_null=False), parse_rcpt_params(params))
        case "DATA":
            if arg.strip():
                raise CommandError(codes.R501_SYNTAX, "Syntax: DATA")
            return Data()
        case "BDAT":  # the session routes BDAT lines to parse_bdat first (it must close on bad counts)
            bdat = parse_bdat(line)
            if isinstance(bdat, BdatSyntaxError):
                raise CommandError(bdat.reply)
            return bdat
        case "RSET" | "NOOP" | "QUIT" | "STARTTLS":
            if verb != "NOOP" and arg.strip():  # RFC 5321 §4.1.1.9: NOOP may carry a string
                raise CommandError(codes.R501_SYNTAX, f"Syntax: {verb}")
            if verb == "RSET":
                return Rset()
            if verb == "NOOP":
                return Noop()
            return Quit() if verb == "QUIT" else StartTls()
        case "VRFY":
            if not arg.strip():
                raise CommandError(codes.R501_SYNTAX, "Syntax: VRFY address")
            return Vrfy(arg.strip())
        case "EXPN":
            return Expn(arg.strip())
        case "HELP":
            return Help(arg.strip())
        case "AUTH":
            return _parse_auth(arg)
    raise CommandError(codes.R500_UNKNOWN_COMMAND)


def _parse_auth(arg: str) -> Auth:
    parts = arg.split()
    if not parts or len(parts) > 2:
        raise CommandError(codes.R501_SYNTAX, "Syntax: AUTH mechanism [initial-response]")
    initial: bytes | None = None
    if len(parts) == 2:
        if parts[1] == "=":  # RFC 4954 §4: an empty initial response
            initial = b""
        else:
            try:
                initial = base64.b64decode(parts[1], validate=True)
            except (binascii.Error, ValueError):
                raise CommandError(codes.R501_AUTH_BAD_DATA) from None
    return Auth(parts[0].upper(), initial)


def is_bdat(line: bytes) -> bool:
    return line[:5].upper() in (b"BDAT", b"BDAT ")


def parse_bdat(line: bytes) -> Bdat | BdatSyntaxError:
    """RFC 3030 §2: ``BDAT <chunk-size> [LAST]``. A count we cannot read leaves the stream
    unsynchronised: the caller answers and closes the connection."""
    parts = line.decode("ascii", "replace").split()
    if len(parts) in (2, 3) and parts[1].isdigit() and len(parts[1]) <= 13:
        size = int(parts[1])
        if size <= _MAX_BDAT:
            if len(parts) == 2:
                return Bdat(size, False)
            if parts[2].upper() == "LAST":
                return Bdat(size, True)
    return BdatSyntaxError(codes.R501_SYNTAX.with_text("Syntax: BDAT count [LAST]"))
