"""One frozen dataclass per IMAP command (RFC 9051 §6, RFC 3501 §6, and the extensions we offer).

The bases say in which state a command is valid (RFC 9051 §3): ``AnyState``, ``NotAuthenticated``,
``Authenticated`` (also valid when a mailbox is selected) and ``Selected``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

MAX_NUMBER = 4294967295  # nz-number / uniqueid upper bound (RFC 9051 §9)


@dataclass(frozen=True, slots=True)
class SeqSet:
    """A sequence-set; ``None`` in a range stands for ``*`` (RFC 9051 §9 seq-number)."""

    ranges: tuple[tuple[int | None, int | None], ...]
    saved: bool = False  # "$": the saved search result (RFC 5182 SEARCHRES)

    def bounds(self, largest: int) -> list[tuple[int, int]]:
        """Ranges as (low, high) with ``*`` = ``largest`` (RFC 9051 §9 seq-range: order is free)."""
        out = []
        for a, b in self.ranges:
            x = largest if a is None else a
            y = largest if b is None else b
            out.append((x, y) if x <= y else (y, x))
        return out

    def __str__(self) -> str:
        def one(v: int | None) -> str:
            return "*" if v is None else str(v)

        if self.saved:
            return "$"
        return ",".join(one(a) if a == b else f"{one(a)}:{one(b)}" for a, b in self.ranges)


@dataclass(frozen=True, slots=True)
class Section:
    """``BODY[<part>.<text> (<fields>)]``; ``text`` is "", HEADER, HEADER.FIELDS, HEADER.FIELDS.NOT,
    TEXT or MIME."""

    part: tuple[int, ...] = ()
    text: str = ""
    fields: tuple[str, ...] = ()

    def spec(self) -> str:
        bits = ".".join(str(p) for p in self.part)
        if self.text:
            bits = f"{bits}.{self.text}" if bits else self.text
        if self.fields:
            bits += " (" + " ".join(self.fields) + ")"
        return bits


@dataclass(frozen=True, slots=True)
class FetchAtt:
    """One fetch attribute. ``name`` is FLAGS, INTERNALDATE, RFC822.SIZE, ENVELOPE, BODY,
    BODYSTRUCTURE, UID, RFC822, RFC822.HEADER, RFC822.TEXT, BODY[] (``section`` set), BINARY,
    BINARY.SIZE, MODSEQ, SAVEDATE."""

    name: str
    section: Section | None = None
    partial: tuple[int, int] | None = None  # (offset, length)
    peek: bool = False


@dataclass(frozen=True, slots=True)
class SearchKey:
    """A search key: ``op`` in upper case (ALL, AND, OR, NOT, SEQ, UID, FLAG, UNFLAG, HEADER, BODY,
    TEXT, BEFORE, ON, SINCE, SENTBEFORE, SENTON, SENTSINCE, LARGER, SMALLER, NEW, OLD, RECENT,
    MODSEQ, SAVED) with its arguments."""

    op: str
    args: tuple[object, ...] = ()


@dataclass(frozen=True, slots=True)
class AppendMessage:
    data: bytes
    flags: frozenset[str] = frozenset()
    internaldate: datetime | None = None


# ------------------------------------------------------------------------------------------ bases


@dataclass(frozen=True, slots=True)
class Command:
    tag: str


@dataclass(frozen=True, slots=True)
class AnyState(Command):
    pass


@dataclass(frozen=True, slots=True)
class NotAuthenticated(Command):
    pass


@dataclass(frozen=True, slots=True)
class Authenticated(Command):
    pass


@dataclass(frozen=True, slots=True)
class Selected(Command):
    pass


# ------------------------------------------------------------------------------------ any state


@dataclass(frozen=True, slots=True)
class Capability(AnyState):
    pass


@dataclass(frozen=True, slots=True)
class Noop(AnyState):
    pass


@dataclass(frozen=True, slots=True)
class Logout(AnyState):
    pass


@dataclass(frozen=True, slots=True)
class Id(AnyState):
    params: tuple[tuple[str, str | None], ...] | None = None


# --------------------------------------------------------------------------- not authenticated


@dataclass(frozen=True, slots=True)
class StartTls(NotAuthenticated):
    pass


@dataclass(frozen=True, slots=True)
class Authenticate(NotAuthenticated):
    mechanism: str
    initial: bytes | None = None  # SASL-IR, already base64-decoded ("=" gives b"")


@dataclass(frozen=True, slots=True)
class Login(NotAuthenticated):
    user: str
    password: str = field(repr=False)


# ------------------------------------------------------------------------------- authenticated


@dataclass(frozen=True, slots=True)
class Enable(Authenticated):
    capabilities: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Qresync:
    """SELECT/EXAMINE (QRESYNC (uidvalidity modseq [known-uids [seq-match]])) (RFC 7162 §3.2.5)."""

    uidvalidity: int
    modseq: int
    known_uids: SeqSet | None = None
    seq_match: tuple[SeqSet, SeqSet] | None = None  # (known sequence set, known uid set)


@dataclass(frozen=True, slots=True)
class Select(Authenticated):
    mailbox: str
    readonly: bool = False  # EXAMINE
    condstore: bool = False
    qresync: Qresync | None = None


@dataclass(frozen=True, slots=True)
class Create(Authenticated):
    mailbox: str
    special_use: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Delete(Authenticated):
    mailbox: str


@dataclass(frozen=True, slots=True)
class Rename(Authenticated):
    old: str
    new: str


@dataclass(frozen=True, slots=True)
class Subscribe(Authenticated):
    mailbox: str


@dataclass(frozen=True, slots=True)
class Unsubscribe(Authenticated):
    mailbox: str


@dataclass(frozen=True, slots=True)
class List(Authenticated):
    reference: str
    patterns: tuple[str, ...]
    select_opts: tuple[str, ...] = ()  # SUBSCRIBED REMOTE RECURSIVEMATCH SPECIAL-USE
    return_opts: tuple[str, ...] = ()  # SUBSCRIBED CHILDREN SPECIAL-USE STATUS
    status_items: tuple[str, ...] = ()
    lsub: bool = False
    extended: bool = False  # any LIST-EXTENDED syntax was used


@dataclass(frozen=True, slots=True)
class Namespace(Authenticated):
    pass


@dataclass(frozen=True, slots=True)
class Status(Authenticated):
    mailbox: str
    items: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Append(Authenticated):
    mailbox: str
    messages: tuple[AppendMessage, ...]


@dataclass(frozen=True, slots=True)
class NotifyGroup:
    """One RFC 5465 event group: a filter (SELECTED, SELECTED-DELAYED, INBOXES, PERSONAL,
    SUBSCRIBED, SUBTREE, MAILBOXES) with its mailboxes, and its events (() for NONE)."""

    filter: str
    mailboxes: tuple[str, ...]
    events: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Notify(Authenticated):
    groups: tuple[NotifyGroup, ...] | None  # None: NOTIFY NONE
    status: bool = False


@dataclass(frozen=True, slots=True)
class Compress(Authenticated):
    mechanism: str  # RFC 4978: DEFLATE


@dataclass(frozen=True, slots=True)
class Idle(Authenticated):
    pass


@dataclass(frozen=True, slots=True)
class Unauthenticate(Authenticated):
    pass


# ------------------------------------------------------------------------------------ selected


@dataclass(frozen=True, slots=True)
class Check(Selected):
    pass


@dataclass(frozen=True, slots=True)
class Close(Selected):
    pass


@dataclass(frozen=True, slots=True)
class Unselect(Selected):
    pass


@dataclass(frozen=True, slots=True)
class Expunge(Selected):
    uids: SeqSet | None = None  # UID EXPUNGE


@dataclass(frozen=True, slots=True)
class Search(Selected):
    key: SearchKey
    uid: bool = False
    charset: str | None = None
    return_opts: tuple[str, ...] | None = None  # None: no RETURN (plain SEARCH), () = RETURN ()
    partial: tuple[int, int] | None = None  # RFC 9394 RETURN (PARTIAL lo:hi); negative: from the end


@dataclass(frozen=True, slots=True)
class Sort(Selected):
    """RFC 5256 SORT; ``criteria`` are (key, reverse) with key ARRIVAL, CC, DATE, FROM, SIZE,
    SUBJECT, TO, DISPLAYFROM, DISPLAYTO (RFC 5957)."""

    criteria: tuple[tuple[str, bool], ...]
    key: SearchKey
    uid: bool = False
    charset: str = "UTF-8"
    return_opts: tuple[str, ...] | None = None  # ESORT (RFC 5267)
    partial: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Thread(Selected):
    algorithm: str  # ORDEREDSUBJECT or REFERENCES
    key: SearchKey
    uid: bool = False
    charset: str = "UTF-8"


@dataclass(frozen=True, slots=True)
class GetMetadata(Authenticated):
    """GETMETADATA [options] mailbox entries (RFC 5464 §4.2); mailbox "" = server entries.
    ``depth``: "0", "1" or "INFINITY". Entry names as sent (checked by imap/metadata.py)."""

    mailbox: str
    entries: tuple[str, ...]
    maxsize: int | None = None
    depth: str = "0"


@dataclass(frozen=True, slots=True)
class SetMetadata(Authenticated):
    """SETMETADATA mailbox (entry value ...) (RFC 5464 §4.3); value None (NIL) removes."""

    mailbox: str
    entries: tuple[tuple[str, bytes | None], ...]


@dataclass(frozen=True, slots=True)
class ESearch(Authenticated):
    """ESEARCH [IN (source-mbox)] [RETURN (...)] [CHARSET x] program (RFC 7377 §2). ``sources``:
    (filter, mailboxes) pairs with filter SELECTED, INBOXES, PERSONAL, SUBSCRIBED, SUBTREE,
    SUBTREE-ONE or MAILBOXES; empty = SELECTED (§2.2). Always by UID (§2.1)."""

    key: SearchKey
    sources: tuple[tuple[str, tuple[str, ...]], ...] = ()
    charset: str | None = None
    return_opts: tuple[str, ...] | None = None
    partial: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class GetQuota(Authenticated):
    root: str


@dataclass(frozen=True, slots=True)
class GetQuotaRoot(Authenticated):
    mailbox: str


@dataclass(frozen=True, slots=True)
class SetQuota(Authenticated):
    root: str
    limits: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Fetch(Selected):
    seqset: SeqSet
    items: tuple[FetchAtt, ...]
    uid: bool = False
    changedsince: int | None = None
    vanished: bool = False  # RFC 7162 §3.2.6 UID FETCH (CHANGEDSINCE n VANISHED)


@dataclass(frozen=True, slots=True)
class Store(Selected):
    seqset: SeqSet
    op: str  # "+", "-" or ""
    silent: bool
    flags: frozenset[str]
    uid: bool = False
    unchangedsince: int | None = None


@dataclass(frozen=True, slots=True)
class Replace(Selected):
    """RFC 8508 REPLACE / UID REPLACE."""

    target: int
    mailbox: str
    message: AppendMessage
    uid: bool = False


@dataclass(frozen=True, slots=True)
class Copy(Selected):
    seqset: SeqSet
    mailbox: str
    uid: bool = False


@dataclass(frozen=True, slots=True)
class Move(Selected):
    seqset: SeqSet
    mailbox: str
    uid: bool = False
