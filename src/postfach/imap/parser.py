"""IMAP command parser: one complete ``Request.raw`` -> a command dataclass. Pure; no asyncio.

Grammar: RFC 9051 §9 (and RFC 3501 §9 where rev1 differs), RFC 4466 (collected ABNF), RFC 5258
(LIST-EXTENDED), RFC 4731 (ESEARCH), RFC 3516 (BINARY), RFC 6154 (CREATE-SPECIAL-USE), RFC 2971 (ID).
Every syntax problem raises ``ParseError`` carrying the tag (``*`` when there is none) and a reason
for the ``BAD`` reply.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime, timedelta, timezone

from postfach.imap import commands as c
from postfach.imap.utf7 import Utf7Error
from postfach.imap.utf7 import decode as utf7_decode

MAX_DEPTH = 64  # nested parentheses in SEARCH
MAX_RANGES = 10000  # ranges in one sequence-set
MAX_MODSEQ = 2**63 - 1  # RFC 7162 §7 mod-sequence-value: a positive unsigned 63-bit integer


class ParseError(Exception):
    """A malformed command: answer ``<tag> BAD <text>``."""

    def __init__(self, tag: str, text: str, code: str | None = "CLIENTBUG") -> None:
        super().__init__(text)
        self.tag = tag
        self.text = text
        self.code = code


class _SyntaxError(Exception):
    pass


# Characters that end an atom (RFC 9051 §9: atom-specials).
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0x00, 0x20)) | {0x7F}
_ASTRING_SPECIALS = _ATOM_SPECIALS - {ord("]")}
_LIST_SPECIALS = _ASTRING_SPECIALS - {ord("%"), ord("*")}
_TAG_SPECIALS = _ASTRING_SPECIALS | {ord("+")}
_FETCH_WORD_SPECIALS = _ATOM_SPECIALS | {ord("["), ord("<")}  # BODY.PEEK[, RFC822.SIZE ...
_SECTION_TEXT_SPECIALS = _ATOM_SPECIALS | {ord("[")}
# P._run: one compiled "run of bytes outside the set" per set (a C loop, not a Python one).
_RUNS: dict[frozenset[int], re.Pattern[bytes]] = {}


def _run_pattern(specials: frozenset[int]) -> re.Pattern[bytes]:
    rx = _RUNS.get(specials)
    if rx is None:
        rx = _RUNS[specials] = re.compile(b"[^" + b"".join(re.escape(bytes([x])) for x in sorted(specials)) + b"]*")
    return rx
_MONTHS = {m: i + 1 for i, m in enumerate(
    ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"))}
_DATE_TIME = re.compile(
    rb'"([ \d]\d)-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)"')
_LITERAL = re.compile(rb"(~?)\{(\d{1,20})(\+?)\}\r?\n")

STATUS_ITEMS = frozenset(
    {"MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "DELETED", "SIZE", "RECENT", "HIGHESTMODSEQ",
     "APPENDLIMIT", "MAILBOXID"})

_SIMPLE_FETCH = frozenset(
    {"FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE", "UID", "RFC822",
     "RFC822.HEADER", "RFC822.TEXT", "MODSEQ", "SAVEDATE", "EMAILID", "THREADID", "PREVIEW"})
_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}

# Search keys without arguments, and those with one argument of a given kind.
_SEARCH_FLAG_KEYS = {
    "ANSWERED": ("FLAG", "\\Answered"), "DELETED": ("FLAG", "\\Deleted"),
    "DRAFT": ("FLAG", "\\Draft"), "FLAGGED": ("FLAG", "\\Flagged"), "SEEN": ("FLAG", "\\Seen"),
    "UNANSWERED": ("UNFLAG", "\\Answered"), "UNDELETED": ("UNFLAG", "\\Deleted"),
    "UNDRAFT": ("UNFLAG", "\\Draft"), "UNFLAGGED": ("UNFLAG", "\\Flagged"),
    "UNSEEN": ("UNFLAG", "\\Seen"),
}
_SEARCH_STRING_HEADERS = {"BCC": "Bcc", "CC": "Cc", "FROM": "From", "SUBJECT": "Subject", "TO": "To"}
_SEARCH_DATE_KEYS = frozenset({"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"})


class _P:
    """A cursor over one command."""

    __slots__ = ("data", "depth", "pos", "tag")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.tag = "*"
        self.depth = 0

    # --- low level --------------------------------------------------------------------------------
    def fail(self, text: str) -> _SyntaxError:
        return _SyntaxError(text)

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def peek(self) -> int:
        return self.data[self.pos] if self.pos < len(self.data) else -1

    def expect(self, b: bytes) -> None:
        if not self.data.startswith(b, self.pos):
            raise self.fail(f"expected {b.decode()!r}")
        self.pos += len(b)

    def try_(self, b: bytes) -> bool:
        if self.data.startswith(b, self.pos):
            self.pos += len(b)
            return True
        return False

    def try_ci(self, word: bytes) -> bool:
        end = self.pos + len(word)
        if self.data[self.pos : end].upper() == word:
            self.pos = end
            return True
        return False

    def sp(self) -> None:
        if self.peek() != 0x20:
            raise self.fail("expected a space")
        self.pos += 1

    def end(self) -> None:
        if not self.at_end():
            raise self.fail("unexpected characters at the end of the command")

    def _run(self, specials: frozenset[int]) -> bytes:
        m = _run_pattern(specials).match(self.data, self.pos)
        assert m is not None  # "[^...]*" always matches
        self.pos = m.end()
        return m.group()

    def atom(self, what: str = "an atom") -> str:
        raw = self._run(_ATOM_SPECIALS)
        if not raw:
            raise self.fail(f"expected {what}")
        return raw.decode("utf-8", "replace")

    def tag_(self) -> str:
        raw = self._run(_TAG_SPECIALS)
        if not raw:
            raise self.fail("missing tag")
        return raw.decode("utf-8", "replace")

    def number(self, nz: bool = False, limit: int = c.MAX_NUMBER) -> int:
        start = self.pos
        while self.pos < len(self.data) and 0x30 <= self.data[self.pos] <= 0x39:
            self.pos += 1
        digits = self.data[start : self.pos]
        if not digits or len(digits) > 20:
            raise self.fail("expected a number")
        v = int(digits)
        if v > limit or (nz and v == 0):
            raise self.fail("number out of range")
        return v

    def literal(self) -> bytes | None:
        m = _LITERAL.match(self.data, self.pos)
        if m is None:
            return None
        n = int(m.group(2))
        start = m.end()
        if start + n > len(self.data):
            raise self.fail("literal shorter than announced")
        self.pos = start + n
        return self.data[start : start + n]

    def quoted(self) -> bytes:
        self.expect(b'"')
        out = bytearray()
        data = self.data
        while True:
            if self.pos >= len(data):
                raise self.fail("unterminated quoted string")
            ch = data[self.pos]
            self.pos += 1
            if ch == 0x22:
                return bytes(out)
            if ch == 0x5C:
                if self.pos >= len(data) or data[self.pos] not in (0x22, 0x5C):
                    raise self.fail("bad escape in quoted string")
                out.append(data[self.pos])
                self.pos += 1
            elif ch in (0x0D, 0x0A, 0x00):
                raise self.fail("CR, LF or NUL in quoted string")
            else:
                out.append(ch)

    def string(self) -> bytes:
        if self.peek() == 0x22:
            return self.quoted()
        lit = self.literal()
        if lit is None:
            raise self.fail("expected a string")
        return lit

    def astring_bytes(self) -> bytes:
        ch = self.peek()
        if ch == 0x22:
            return self.quoted()
        if ch in (0x7B, 0x7E):
            lit = self.literal()
            if lit is not None:
                return lit
        raw = self._run(_ASTRING_SPECIALS)
        if not raw:
            raise self.fail("expected a string or atom")
        return raw

    def astring(self) -> str:
        raw = self.astring_bytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("string is not UTF-8") from None

    def nstring_or_nil(self) -> str | None:
        if self.try_ci(b"NIL"):
            return None
        return self.string().decode("utf-8", "replace")

    def mailbox(self) -> str:
        raw = self.astring()
        return decode_mailbox(raw, self)

    def one_or_more_mailbox(self) -> list[str]:
        """RFC 5465 §8 ``one-or-more-mailbox = mailbox / many-mailboxes`` (also ESEARCH IN,
        RFC 7377 §2): one mailbox, or a parenthesized list of them."""
        if self.peek() != 0x28:
            return [self.mailbox()]
        self.open_paren()
        boxes: list[str] = []
        while True:
            boxes.append(self.mailbox())
            if self.try_(b")"):
                break
            self.sp()
        self.depth -= 1
        return boxes

    def list_mailbox(self) -> str:
        ch = self.peek()
        if ch == 0x22 or ch == 0x7B:
            raw = self.string()
        else:
            raw = self._run(_LIST_SPECIALS)
            if not raw:
                raise self.fail("expected a mailbox pattern")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("mailbox pattern is not UTF-8") from None
        return decode_mailbox(text, self)

    def open_paren(self) -> None:
        self.expect(b"(")
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail("too deeply nested")

    def close_paren(self) -> None:
        self.expect(b")")
        self.depth -= 1

    # --- compound ---------------------------------------------------------------------------------
    def seqset(self) -> c.SeqSet:
        if self.try_(b"$"):  # RFC 5182 §2.1
            return c.SeqSet((), saved=True)
        ranges: list[tuple[int | None, int | None]] = []
        while True:
            a = self.seq_number()
            b = a
            if self.try_(b":"):
                b = self.seq_number()
            ranges.append((a, b))
            if len(ranges) > MAX_RANGES:
                raise self.fail("sequence set too long")
            if not self.try_(b","):
                return c.SeqSet(tuple(ranges))

    def seq_number(self) -> int | None:
        if self.try_(b"*"):
            return None
        return self.number(nz=True)

    def flag(self) -> str:
        if self.try_(b"\\"):
            if self.try_(b"*"):
                return "\\*"
            name = self.atom("a flag name")
            return "\\" + normalise_system_flag(name)
        return self.atom("a flag")

    def flag_list(self) -> frozenset[str]:
        self.open_paren()
        flags: set[str] = set()
        if not self.try_(b")"):
            while True:
                flags.add(self.flag())
                if self.try_(b")"):
                    break
                self.sp()
        self.depth -= 1
        return frozenset(flags)

    def date(self) -> datetime:
        quoted = self.try_(b'"')
        start = self.pos
        m = re.compile(rb"(\d{1,2})-([A-Za-z]{3})-(\d{4})").match(self.data, self.pos)
        if m is None:
            raise self.fail("expected a date like 1-Feb-2024")
        self.pos = m.end()
        if quoted:
            self.expect(b'"')
        month = _MONTHS.get(m.group(2).decode().upper())
        if month is None:
            raise self.fail("bad month name in date")
        try:
            return datetime(int(m.group(3)), month, int(m.group(1)))
        except ValueError:
            self.pos = start
            raise self.fail("invalid date") from None

    def date_time(self) -> datetime | None:
        m = _DATE_TIME.match(self.data, self.pos)
        if m is None:
            return None
        self.pos = m.end()
        day, mon, year, hh, mm, ss, sign, zh, zm = (g.decode() for g in m.groups())
        month = _MONTHS.get(mon.upper())
        if month is None:
            raise self.fail("bad month name in date-time")
        offset = timedelta(hours=int(zh), minutes=int(zm))
        try:
            return datetime(int(year), month, int(day.strip()), int(hh), int(mm), int(ss),
                            tzinfo=timezone(offset if sign == "+" else -offset))
        except ValueError:
            raise self.fail("invalid date-time") from None


def normalise_system_flag(name: str) -> str:
    """\\seen -> Seen etc.; other backslash names keep their spelling (RFC 9051 §2.3.2)."""
    for f in ("Seen", "Answered", "Flagged", "Deleted", "Draft", "Recent"):
        if name.lower() == f.lower():
            return f
    return name


def decode_mailbox(text: str, p: _P | None = None) -> str:
    """Wire name -> store name: INBOX in any case is INBOX; modified UTF-7 is decoded (RFC 3501
    §5.1.3); 8-bit UTF-8 (UTF8=ACCEPT-style clients) is taken as is."""
    if text.upper() == "INBOX":
        return "INBOX"
    if text.isascii() and "&" in text:
        try:
            text = utf7_decode(text)
        except Utf7Error as e:
            raise _SyntaxError(f"bad mailbox name: {e}") from None
    if text.upper().startswith("INBOX/"):
        text = "INBOX" + text[5:]
    return text


# ------------------------------------------------------------------------------------- commands


def parse(raw: bytes) -> c.Command:
    """Parse one command. Raises ``ParseError``."""
    p = _P(raw)
    try:
        p.tag = p.tag_()
        p.sp()
        name = p.atom("a command name").upper()
        cmd = _dispatch(p, name)
        p.end()
        return cmd
    except _SyntaxError as e:
        raise ParseError(p.tag, f"{e} (at byte {p.pos})") from None
    except RecursionError:
        raise ParseError(p.tag, "too deeply nested") from None


def _dispatch(p: _P, name: str) -> c.Command:
    tag = p.tag
    match name:
        case "CAPABILITY":
            return c.Capability(tag)
        case "NOOP":
            return c.Noop(tag)
        case "LOGOUT":
            return c.Logout(tag)
        case "STARTTLS":
            return c.StartTls(tag)
        case "ID":
            return _id(p)
        case "AUTHENTICATE":
            return _authenticate(p)
        case "LOGIN":
            p.sp()
            user = p.astring()
            p.sp()
            pw = p.astring()
            return c.Login(tag, user, pw)
        case "ENABLE":
            caps: list[str] = []
            while not p.at_end():
                p.sp()
                caps.append(p.atom("a capability").upper())
            if not caps:
                raise p.fail("ENABLE needs at least one capability")
            return c.Enable(tag, tuple(caps))
        case "SELECT" | "EXAMINE":
            p.sp()
            mbox = p.mailbox()
            condstore = False
            qresync: c.Qresync | None = None
            if not p.at_end():
                p.sp()
                p.open_paren()
                while True:
                    param = p.atom("a select parameter").upper()
                    if param == "CONDSTORE":
                        condstore = True
                    elif param == "QRESYNC" and qresync is None:
                        p.sp()
                        qresync = _qresync(p)
                    else:
                        raise p.fail(f"unknown select parameter {param}")
                    if p.try_(b")"):
                        break
                    p.sp()
                p.depth -= 1
            return c.Select(tag, mbox, readonly=name == "EXAMINE", condstore=condstore,
                            qresync=qresync)
        case "CREATE":
            p.sp()
            mbox = p.mailbox()
            uses: list[str] = []
            if not p.at_end():
                p.sp()
                p.open_paren()
                if not p.try_ci(b"USE"):
                    raise p.fail("expected USE (RFC 6154 §3)")
                p.sp()
                p.open_paren()
                while not p.try_(b")"):
                    if uses:
                        p.sp()
                    uses.append(p.flag())
                p.close_paren()
            return c.Create(tag, mbox, tuple(uses))
        case "DELETE":
            p.sp()
            return c.Delete(tag, p.mailbox())
        case "RENAME":
            p.sp()
            old = p.mailbox()
            p.sp()
            return c.Rename(tag, old, p.mailbox())
        case "SUBSCRIBE":
            p.sp()
            return c.Subscribe(tag, p.mailbox())
        case "UNSUBSCRIBE":
            p.sp()
            return c.Unsubscribe(tag, p.mailbox())
        case "LIST":
            return _list(p)
        case "LSUB":
            p.sp()
            ref = p.mailbox()
            p.sp()
            pat = p.list_mailbox()
            return c.List(tag, ref, (pat,), lsub=True)
        case "NAMESPACE":
            return c.Namespace(tag)
        case "STATUS":
            p.sp()
            mbox = p.mailbox()
            p.sp()
            p.open_paren()
            items: list[str] = []
            while True:
                item = p.atom("a status item").upper()
                if item not in STATUS_ITEMS:
                    raise p.fail(f"unknown status item {item}")
                items.append(item)
                if p.try_(b")"):
                    break
                p.sp()
            return c.Status(tag, mbox, tuple(items))
        case "APPEND":
            return _append(p)
        case "IDLE":
            return c.Idle(tag)
        case "NOTIFY":
            return _notify(p)
        case "COMPRESS":
            p.sp()
            return c.Compress(tag, p.atom("a compression mechanism").upper())
        case "UNAUTHENTICATE":
            return c.Unauthenticate(tag)
        case "CHECK":
            return c.Check(tag)
        case "CLOSE":
            return c.Close(tag)
        case "UNSELECT":
            return c.Unselect(tag)
        case "EXPUNGE":
            return c.Expunge(tag)
        case "SEARCH":
            return _search(p, uid=False)
        case "SORT":
            return _sort(p, uid=False)
        case "THREAD":
            return _thread(p, uid=False)
        case "GETMETADATA":
            return _getmetadata(p)
        case "SETMETADATA":
            return _setmetadata(p)
        case "ESEARCH":
            return _esearch(p)
        case "GETQUOTA":
            p.sp()
            return c.GetQuota(tag, p.astring())
        case "GETQUOTAROOT":
            p.sp()
            return c.GetQuotaRoot(tag, p.mailbox())
        case "SETQUOTA":
            return _setquota(p)
        case "FETCH":
            return _fetch(p, uid=False)
        case "STORE":
            return _store(p, uid=False)
        case "COPY":
            p.sp()
            s = p.seqset()
            p.sp()
            return c.Copy(tag, s, p.mailbox())
        case "MOVE":
            p.sp()
            s = p.seqset()
            p.sp()
            return c.Move(tag, s, p.mailbox())
        case "REPLACE":
            return _replace(p, uid=False)
        case "UID":
            p.sp()
            sub = p.atom("a UID command").upper()
            match sub:
                case "FETCH":
                    return _fetch(p, uid=True)
                case "SEARCH":
                    return _search(p, uid=True)
                case "SORT":
                    return _sort(p, uid=True)
                case "THREAD":
                    return _thread(p, uid=True)
                case "STORE":
                    return _store(p, uid=True)
                case "COPY":
                    p.sp()
                    s = p.seqset()
                    p.sp()
                    return c.Copy(tag, s, p.mailbox(), uid=True)
                case "MOVE":
                    p.sp()
                    s = p.seqset()
                    p.sp()
                    return c.Move(tag, s, p.mailbox(), uid=True)
                case "EXPUNGE":
                    p.sp()
                    return c.Expunge(tag, p.seqset())
                case "REPLACE":
                    return _replace(p, uid=True)
            raise p.fail(f"unknown UID command {sub}")
    raise _SyntaxError(f"unknown command {name[:40]}")


def _id(p: _P) -> c.Id:
    p.sp()
    if p.try_ci(b"NIL"):
        return c.Id(p.tag, None)
    p.open_paren()
    params: list[tuple[str, str | None]] = []
    while not p.try_(b")"):
        if params:
            p.sp()
        key = p.string().decode("utf-8", "replace")
        p.sp()
        params.append((key, p.nstring_or_nil()))
        if len(params) > 30:
            raise p.fail("too many ID fields (RFC 2971 §3.3 allows 30)")
    p.depth -= 1
    return c.Id(p.tag, tuple(params))


def _authenticate(p: _P) -> c.Authenticate:
    p.sp()
    mech = p.atom("a mechanism name").upper()
    initial: bytes | None = None
    if not p.at_end():
        p.sp()
        raw = p._run(_ATOM_SPECIALS)  # base64 or "="
        if raw == b"=":
            initial = b""
        else:
            try:
                initial = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                raise p.fail("initial response is not base64") from None
    return c.Authenticate(p.tag, mech, initial)


def _list(p: _P) -> c.List:
    p.sp()
    select_opts: list[str] = []
    extended = False
    if p.peek() == 0x28:  # RFC 5258 list-select-opts
        extended = True
        p.open_paren()
        while not p.try_(b")"):
            if select_opts:
                p.sp()
            select_opts.append(p.atom("a selection option").upper())
        p.depth -= 1
        p.sp()
    ref = p.mailbox()
    p.sp()
    patterns: list[str] = []
    if p.peek() == 0x28:
        extended = True
        p.open_paren()
        while not p.try_(b")"):
            if patterns:
                p.sp()
            patterns.append(p.list_mailbox())
        p.depth -= 1
    else:
        patterns.append(p.list_mailbox())
    return_opts: list[str] = []
    status_items: list[str] = []
    if not p.at_end():
        p.sp()
        if not p.try_ci(b"RETURN"):
            raise p.fail("expected RETURN")
        extended = True
        p.sp()
        p.open_paren()
        while not p.try_(b")"):
            if return_opts:
                p.sp()
            opt = p.atom("a return option").upper()
            return_opts.append(opt)
            if opt == "STATUS":  # RFC 5819
                p.sp()
                p.open_paren()
                while True:
                    item = p.atom("a status item").upper()
                    if item not in STATUS_ITEMS:
                        raise p.fail(f"unknown status item {item}")
                    status_items.append(item)
                    if p.try_(b")"):
                        break
                    p.sp()
                p.depth -= 1
        p.depth -= 1
    for opt in select_opts:
        if opt not in ("SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"):
            raise p.fail(f"unknown LIST selection option {opt}")
    if "RECURSIVEMATCH" in select_opts and len(select_opts) == 1:
        raise p.fail("RECURSIVEMATCH needs another selection option (RFC 5258 §3)")
    return c.List(p.tag, ref, tuple(patterns), tuple(select_opts), tuple(return_opts),
                  tuple(status_items), extended=extended)


def _replace(p: _P, uid: bool) -> c.Replace:
    """REPLACE <seq|uid> <mailbox> [flags] [date-time] literal (RFC 8508 §5)."""
    p.sp()
    target = p.number(nz=True)
    p.sp()
    mbox = p.mailbox()
    p.sp()
    return c.Replace(p.tag, target, mbox, _append_message(p), uid=uid)


def _append_message(p: _P) -> c.AppendMessage:
    """[flag-list SP] [date-time SP] (literal / "UTF8 (" literal8 ")") — APPEND and REPLACE."""
    flags: frozenset[str] = frozenset()
    when: datetime | None = None
    if p.peek() == 0x28:
        flags = p.flag_list()
        p.sp()
    if p.peek() == 0x22:
        when = p.date_time()
        if when is None:
            raise p.fail("bad date-time")
        p.sp()
    lit = p.literal()
    if lit is None:
        if p.try_ci(b"UTF8"):  # RFC 6855 UTF8 (literal8)
            p.sp()
            p.expect(b"(")
            lit = p.literal()
            p.expect(b")")
        if lit is None:
            raise p.fail("expected the message as a literal")
    return c.AppendMessage(lit, flags, when)


def _append(p: _P) -> c.Append:
    p.sp()
    mbox = p.mailbox()
    messages: list[c.AppendMessage] = []
    while not p.at_end():
        p.sp()
        messages.append(_append_message(p))
    if not messages:
        raise p.fail("APPEND needs a message")
    return c.Append(p.tag, mbox, tuple(messages))


def _fetch(p: _P, uid: bool) -> c.Fetch:
    p.sp()
    seqset = p.seqset()
    p.sp()
    items: list[c.FetchAtt] = []
    if p.peek() == 0x28:
        p.open_paren()
        while True:
            items.append(_fetch_att(p))
            if p.try_(b")"):
                break
            p.sp()
        p.depth -= 1
    else:
        save = p.pos
        word = p._run(_FETCH_WORD_SPECIALS).decode("ascii", "replace").upper()
        if word in _MACROS:
            items.extend(c.FetchAtt(n) for n in _MACROS[word])
        else:
            p.pos = save
            items.append(_fetch_att(p))
    changedsince: int | None = None
    vanished = False
    if not p.at_end():  # RFC 7162 §3.1.4.1 fetch modifiers, §3.2.6 VANISHED
        p.sp()
        p.open_paren()
        while True:
            mod = p.atom("a FETCH modifier").upper()
            if mod == "CHANGEDSINCE" and changedsince is None:
                p.sp()
                changedsince = p.number(limit=MAX_MODSEQ)
            elif mod == "VANISHED" and not vanished:
                vanished = True
            else:
                raise p.fail(f"unknown FETCH modifier {mod[:40]}")
            if p.try_(b")"):
                break
            p.sp()
        p.depth -= 1
        if vanished and (changedsince is None or not uid):
            # RFC 7162 §3.2.6: VANISHED needs UID FETCH and CHANGEDSINCE.
            raise p.fail("VANISHED needs UID FETCH with CHANGEDSINCE")
    if changedsince is not None and not any(i.name == "MODSEQ" for i in items):
        items.append(c.FetchAtt("MODSEQ"))  # RFC 7162 §3.1.4.1
    if uid and not any(i.name == "UID" for i in items):
        items.insert(0, c.FetchAtt("UID"))  # RFC 9051 §6.4.9: UID FETCH always answers UID
    return c.Fetch(p.tag, seqset, tuple(items), uid=uid, changedsince=changedsince, vanished=vanished)


def _fetch_att(p: _P) -> c.FetchAtt:
    word = p._run(_FETCH_WORD_SPECIALS).decode("ascii", "replace").upper()
    if not word:
        raise p.fail("expected a fetch attribute")
    if word in ("BODY", "BODY.PEEK", "BINARY", "BINARY.PEEK", "BINARY.SIZE"):
        if p.peek() != 0x5B:
            if word == "BODY":
                return c.FetchAtt("BODY")
            raise p.fail(f"{word} needs a section")
        p.pos += 1
        binary = word.startswith("BINARY")
        section = _section(p, binary)
        p.expect(b"]")
        partial: tuple[int, int] | None = None
        if p.peek() == 0x3C and word != "BINARY.SIZE":
            p.pos += 1
            start = p.number()
            p.expect(b".")
            length = p.number(nz=True)
            p.expect(b">")
            partial = (start, length)
        name = "BINARY.SIZE" if word == "BINARY.SIZE" else ("BINARY" if binary else "BODY[]")
        return c.FetchAtt(name, section, partial, peek=word.endswith(".PEEK"))
    if word == "PREVIEW" and p.try_ci(b" (LAZY)"):  # RFC 8970 §3.1: we always compute it
        return c.FetchAtt(word)
    if word in _SIMPLE_FETCH:
        return c.FetchAtt(word)
    if word in _MACROS:
        raise p.fail(f"{word} is a macro and cannot be in a list")
    raise p.fail(f"unknown fetch attribute {word[:40]}")


def _section(p: _P, binary: bool) -> c.Section:
    part: list[int] = []
    while 0x30 <= p.peek() <= 0x39:
        part.append(p.number(nz=True))
        if len(part) > 100:
            raise p.fail("section part too deep")
        if not p.try_(b"."):
            return c.Section(tuple(part))
    if p.peek() == 0x5D:
        if part:
            raise p.fail("section ends with a dot")
        return c.Section(())
    if binary:
        raise p.fail("BINARY sections are part numbers only (RFC 3516 §4.1)")
    text = p._run(_SECTION_TEXT_SPECIALS).decode("ascii", "replace").upper()
    if text in ("HEADER", "TEXT"):
        return c.Section(tuple(part), text)
    if text == "MIME":
        if not part:
            raise p.fail("MIME needs a part number")
        return c.Section(tuple(part), text)
    if text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        p.sp()
        p.open_paren()
        fields: list[str] = []
        while True:
            fields.append(p.astring())
            if p.try_(b")"):
                break
            p.sp()
        p.depth -= 1
        return c.Section(tuple(part), text, tuple(fields))
    raise p.fail(f"unknown section text {text[:40]}")


def _store(p: _P, uid: bool) -> c.Store:
    p.sp()
    seqset = p.seqset()
    p.sp()
    unchangedsince: int | None = None
    if p.peek() == 0x28:  # RFC 7162 §3.1.3 store modifiers
        p.open_paren()
        if not p.try_ci(b"UNCHANGEDSINCE"):
            raise p.fail("unknown STORE modifier")
        p.sp()
        unchangedsince = p.number(limit=MAX_MODSEQ)
        p.close_paren()
        p.sp()
    op = ""
    if p.try_(b"+"):
        op = "+"
    elif p.try_(b"-"):
        op = "-"
    if not p.try_ci(b"FLAGS"):
        raise p.fail("expected FLAGS, +FLAGS or -FLAGS")
    silent = p.try_ci(b".SILENT")
    p.sp()
    if p.peek() == 0x28:
        flags = p.flag_list()
    else:
        fl: set[str] = set()
        while True:
            fl.add(p.flag())
            if p.at_end():
                break
            p.sp()
        flags = frozenset(fl)
    if "\\Recent" in flags:
        raise p.fail("\\Recent cannot be stored")
    return c.Store(p.tag, seqset, op, silent, flags, uid=uid, unchangedsince=unchangedsince)



def _return_opts(p: _P) -> tuple[tuple[str, ...] | None, tuple[int, int] | None]:
    """An optional ``RETURN (opt ...) `` (RFC 4731 §3, RFC 5267, RFC 9394 PARTIAL): the options
    (None when absent) and the PARTIAL range, if any. Consumes the space after it."""
    if not p.try_ci(b"RETURN "):
        return None, None
    p.open_paren()
    opts: list[str] = []
    partial: tuple[int, int] | None = None
    while not p.try_(b")"):
        if opts:
            p.sp()
        opt, rng = _return_opt(p)
        if rng is not None:
            partial = rng
        opts.append(opt)
    p.depth -= 1
    p.sp()
    return tuple(opts), partial

def _search(p: _P, uid: bool) -> c.Search:
    charset: str | None = None
    p.sp()
    return_opts, partial = _return_opts(p)  # RFC 4731 §3
    if p.try_ci(b"CHARSET "):
        charset = p.astring().upper()
        p.sp()
    key = _search_program(p)
    return c.Search(p.tag, key, uid=uid, charset=charset, return_opts=return_opts, partial=partial)


_ESEARCH_FILTERS = frozenset({"SELECTED", "INBOXES", "PERSONAL", "SUBSCRIBED", "SUBTREE", "SUBTREE-ONE",
                              "MAILBOXES"})


def _esearch(p: _P) -> c.ESearch:
    """ESEARCH [IN (source-mbox)] [RETURN (...)] [CHARSET x] search-program (RFC 7377 §4)."""
    sources: list[tuple[str, tuple[str, ...]]] = []
    p.sp()
    if p.try_ci(b"IN "):
        p.open_paren()
        while True:
            filt = p.atom("a mailbox filter").upper()
            if filt not in _ESEARCH_FILTERS:  # §2.2: SELECTED-DELAYED is not valid here
                raise p.fail(f"unknown source option {filt[:40]}")
            boxes: list[str] = []
            if filt in ("SUBTREE", "SUBTREE-ONE", "MAILBOXES"):
                p.sp()
                boxes = p.one_or_more_mailbox()
            sources.append((filt, tuple(boxes)))
            if p.try_(b")"):
                break
            p.sp()
            if p.peek() == 0x28:
                raise p.fail("unknown scope option")  # §4: none are defined
        p.depth -= 1
        p.sp()
    return_opts, partial = _return_opts(p)
    charset: str | None = None
    if p.try_ci(b"CHARSET "):
        charset = p.astring().upper()
        p.sp()
    key = _search_program(p)
    return c.ESearch(p.tag, key, tuple(sources), charset, return_opts, partial)


def _metadata_entry(p: _P) -> str:
    raw = p.astring_bytes()
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise p.fail("entry names are ASCII (RFC 5464 §3.2)") from None


def _getmetadata(p: _P) -> c.GetMetadata:
    """GETMETADATA [(options)] mailbox entries (RFC 5464 §5); the options are also taken after
    the mailbox, as in the RFC's own examples (§4.2.1) and as Dovecot does."""
    maxsize: int | None = None
    depth = "0"
    seen: set[str] = set()

    def options() -> None:
        nonlocal maxsize, depth
        p.open_paren()
        while True:
            opt = p.atom("a GETMETADATA option").upper()
            if opt in seen:
                raise p.fail(f"{opt} given twice")
            seen.add(opt)
            p.sp()
            if opt == "MAXSIZE":
                maxsize = p.number()
            elif opt == "DEPTH":
                d = p.atom("0, 1 or infinity").upper()
                if d not in ("0", "1", "INFINITY"):
                    raise p.fail("DEPTH is 0, 1 or infinity")
                depth = d
            else:
                raise p.fail(f"unknown GETMETADATA option {opt[:40]}")
            if p.try_(b")"):
                break
            p.sp()
        p.depth -= 1

    p.sp()
    if p.peek() == 0x28:
        options()
        p.sp()
    mbox = p.mailbox()
    p.sp()
    if p.peek() == 0x28 and not seen and re.match(rb"\((?i:MAXSIZE|DEPTH) ", p.data[p.pos : p.pos + 10]):
        options()
        p.sp()
    entries: list[str] = []
    if p.peek() == 0x28:
        p.open_paren()
        while True:
            entries.append(_metadata_entry(p))
            if p.try_(b")"):
                break
            p.sp()
        p.depth -= 1
    else:
        entries.append(_metadata_entry(p))
        while not p.at_end():  # §4.4.1's examples list several entries without parentheses
            p.sp()
            entries.append(_metadata_entry(p))
    return c.GetMetadata(p.tag, mbox, tuple(entries), maxsize, depth)


def _setmetadata(p: _P) -> c.SetMetadata:
    """SETMETADATA mailbox (entry value ...) with value = nstring / literal8 (RFC 5464 §5)."""
    p.sp()
    mbox = p.mailbox()
    p.sp()
    p.open_paren()
    entries: list[tuple[str, bytes | None]] = []
    while True:
        name = _metadata_entry(p)
        p.sp()
        value = None if p.try_ci(b"NIL") else p.string()
        entries.append((name, value))
        if p.try_(b")"):
            break
        p.sp()
    p.depth -= 1
    return c.SetMetadata(p.tag, mbox, tuple(entries))


def _return_opt(p: _P) -> tuple[str, tuple[int, int] | None]:
    """One ESEARCH/ESORT return option; PARTIAL (RFC 9394 §3) carries its range."""
    opt = p.atom("a search return option").upper()
    if opt not in ("MIN", "MAX", "ALL", "COUNT", "SAVE", "PARTIAL"):
        raise p.fail(f"unknown search return option {opt[:40]}")
    if opt != "PARTIAL":
        return opt, None
    p.sp()
    neg = p.try_(b"-")
    lo = p.number(nz=True)
    p.expect(b":")
    if neg:
        p.expect(b"-")
    hi = p.number(nz=True)
    if lo > hi:
        lo, hi = hi, lo
    return opt, ((-lo, -hi) if neg else (lo, hi))


def _search_program(p: _P) -> c.SearchKey:
    keys = [_search_key(p)]
    while not p.at_end():
        p.sp()
        keys.append(_search_key(p))
    return keys[0] if len(keys) == 1 else c.SearchKey("AND", tuple(keys))


_SORT_KEYS = frozenset({"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO", "DISPLAYFROM",
                        "DISPLAYTO"})


def _sort(p: _P, uid: bool) -> c.Sort:
    """RFC 5256 §3: SORT [RETURN (...)] (criteria) charset search-key... (RFC 5267 ESORT)."""
    p.sp()
    return_opts, partial = _return_opts(p)
    p.open_paren()
    criteria: list[tuple[str, bool]] = []
    reverse = False
    while True:
        word = p.atom("a sort criterion").upper()
        if word == "REVERSE":
            if reverse:
                raise p.fail("REVERSE REVERSE")
            reverse = True
        else:
            if word not in _SORT_KEYS:
                raise p.fail(f"unknown sort criterion {word[:40]}")
            criteria.append((word, reverse))
            reverse = False
        if p.try_(b")"):
            break
        p.sp()
    p.depth -= 1
    if reverse or not criteria:
        raise p.fail("REVERSE must precede a sort key")
    p.sp()
    charset = p.astring().upper()
    p.sp()
    return c.Sort(p.tag, tuple(criteria), _search_program(p), uid=uid, charset=charset,
                  return_opts=return_opts, partial=partial)


def _thread(p: _P, uid: bool) -> c.Thread:
    p.sp()
    algo = p.atom("a thread algorithm").upper()
    p.sp()
    charset = p.astring().upper()
    p.sp()
    return c.Thread(p.tag, algo, _search_program(p), uid=uid, charset=charset)


def _qresync(p: _P) -> c.Qresync:
    """(uidvalidity mod-sequence-value [known-uids [seq-match-data]]) (RFC 7162 §7)."""
    p.open_paren()
    uidvalidity = p.number(nz=True)
    p.sp()
    modseq = p.number(limit=MAX_MODSEQ)
    known: c.SeqSet | None = None
    match: tuple[c.SeqSet, c.SeqSet] | None = None
    if p.try_(b" "):
        known = p.seqset()
        if any(a is None or b is None for a, b in known.ranges):
            raise p.fail("known-uids must not contain *")
        if p.try_(b" "):
            p.open_paren()
            seqs = p.seqset()
            p.sp()
            uids = p.seqset()
            p.close_paren()
            if any(a is None or b is None for a, b in seqs.ranges + uids.ranges):
                raise p.fail("seq-match-data must not contain *")
            if len(_expand(seqs)) != len(_expand(uids)):
                raise p.fail("seq-match-data sets differ in size")
            match = (seqs, uids)
    p.close_paren()
    return c.Qresync(uidvalidity, modseq, known, match)


def _search_string(p: _P) -> str:
    raw = p.astring_bytes()
    return raw.decode("utf-8", "replace")


def _search_key(p: _P) -> c.SearchKey:
    ch = p.peek()
    if ch == 0x28:
        p.open_paren()
        keys = [_search_key(p)]
        while not p.try_(b")"):
            p.sp()
            keys.append(_search_key(p))
        p.depth -= 1
        return keys[0] if len(keys) == 1 else c.SearchKey("AND", tuple(keys))
    if ch == 0x2A or 0x30 <= ch <= 0x39:
        return c.SearchKey("SEQ", (p.seqset(),))
    if ch == 0x24:  # "$" (SEARCHRES, RFC 5182)
        p.pos += 1
        return c.SearchKey("SAVED")
    word = p.atom("a search key").upper()
    if word in ("ALL", "NEW", "OLD", "RECENT"):
        return c.SearchKey(word)
    if word in _SEARCH_FLAG_KEYS:
        op, flag = _SEARCH_FLAG_KEYS[word]
        return c.SearchKey(op, (flag,))
    if word in ("KEYWORD", "UNKEYWORD"):
        p.sp()
        flag = p.flag()
        return c.SearchKey("FLAG" if word == "KEYWORD" else "UNFLAG", (flag,))
    if word in _SEARCH_STRING_HEADERS:
        p.sp()
        return c.SearchKey("HEADER", (_SEARCH_STRING_HEADERS[word], _search_string(p)))
    if word == "HEADER":
        p.sp()
        name = p.astring()
        p.sp()
        return c.SearchKey("HEADER", (name, _search_string(p)))
    if word in ("BODY", "TEXT"):
        p.sp()
        return c.SearchKey(word, (_search_string(p),))
    if word in _SEARCH_DATE_KEYS:
        p.sp()
        return c.SearchKey(word, (p.date().date(),))
    if word in ("LARGER", "SMALLER"):
        p.sp()
        return c.SearchKey(word, (p.number(limit=2**63 - 1),))
    if word in ("OLDER", "YOUNGER"):  # RFC 5032 WITHIN
        p.sp()
        return c.SearchKey(word, (p.number(nz=True),))
    if word == "NOT":
        p.sp()
        return c.SearchKey("NOT", (_search_key(p),))
    if word == "OR":
        p.sp()
        a = _search_key(p)
        p.sp()
        return c.SearchKey("OR", (a, _search_key(p)))
    if word == "UID":
        p.sp()
        return c.SearchKey("UID", (p.seqset(),))
    if word == "MODSEQ":  # RFC 7162 §3.1.5
        p.sp()
        if p.peek() == 0x22:
            entry = p.quoted().decode("utf-8", "replace")
            if not entry.lower().startswith("/flags/"):
                raise p.fail("MODSEQ entry name must be /flags/<flag>")
            p.sp()
            kind = p.atom("an entry type").lower()
            if kind not in ("priv", "shared", "all"):
                raise p.fail("MODSEQ entry type must be priv, shared or all")
            p.sp()
        return c.SearchKey("MODSEQ", (p.number(limit=MAX_MODSEQ),))
    if word == "SAVEDBEFORE" or word == "SAVEDON" or word == "SAVEDSINCE":  # RFC 8514
        p.sp()
        return c.SearchKey(word, (p.date().date(),))
    if word == "SAVEDATESUPPORTED":
        return c.SearchKey("ALL")
    if word in ("EMAILID", "THREADID"):  # RFC 8474 §5
        p.sp()
        return c.SearchKey(word, (p.atom("an object id"),))
    raise p.fail(f"unknown search key {word[:40]}")


_NOTIFY_FILTERS = frozenset({"SELECTED", "SELECTED-DELAYED", "INBOXES", "PERSONAL", "SUBSCRIBED",
                             "SUBTREE", "MAILBOXES"})


def _notify(p: _P) -> c.Notify:
    """NOTIFY NONE | NOTIFY SET [STATUS] event-group... (RFC 5465 §8)."""
    p.sp()
    if p.try_ci(b"NONE"):
        return c.Notify(p.tag, None)
    if not p.try_ci(b"SET"):
        raise p.fail("expected NONE or SET")
    p.sp()
    status = p.try_ci(b"STATUS ")
    groups: list[c.NotifyGroup] = []
    while True:
        p.open_paren()
        filt = p.atom("a mailbox filter").upper()
        if filt not in _NOTIFY_FILTERS:
            raise p.fail(f"unknown NOTIFY filter {filt[:40]}")
        boxes: list[str] = []
        if filt in ("SUBTREE", "MAILBOXES"):
            p.sp()
            boxes = p.one_or_more_mailbox()
        p.sp()
        events: list[str] = []
        if not p.try_ci(b"NONE"):
            p.open_paren()
            while True:
                ev = p.atom("an event").upper()
                events.append(ev)
                if ev == "MESSAGENEW" and p.try_(b" ("):  # fetch attributes: we send none
                    depth = 1
                    while depth:
                        ch = p.peek()
                        if ch < 0:
                            raise p.fail("unterminated MessageNew attributes")
                        depth += (ch == 0x28) - (ch == 0x29)
                        p.pos += 1
                if p.try_(b")"):
                    break
                p.sp()
            p.depth -= 1
        p.close_paren()
        groups.append(c.NotifyGroup(filt, tuple(boxes), tuple(events)))
        if p.at_end():
            break
        p.sp()
    return c.Notify(p.tag, tuple(groups), status)


def _setquota(p: _P) -> c.SetQuota:
    """SETQUOTA root (resource limit ...) (RFC 9208 §4.1.3)."""
    p.sp()
    root = p.astring()
    p.sp()
    p.open_paren()
    limits: list[tuple[str, int]] = []
    while not p.try_(b")"):
        if limits:
            p.sp()
        res = p.atom("a resource name").upper()
        p.sp()
        limits.append((res, p.number(limit=2**63 - 1)))
    p.depth -= 1
    return c.SetQuota(p.tag, root, tuple(limits))


def _expand(s: c.SeqSet, cap: int = 100_000) -> list[int]:
    """The numbers of a set without ``*``, in the client's order (seq-match-data), capped."""
    out: list[int] = []
    for a, b in s.ranges:
        assert a is not None and b is not None
        step = 1 if b >= a else -1
        out.extend(range(a, b + step, step))
        if len(out) > cap:
            raise _SyntaxError("seq-match-data too long")
    return out
