"""The Store interface: the only door to accounts, mailboxes, messages and the queue.

Nothing above ``store/`` sees SQL, a file path or a connection. Every method that writes returns only
after the write is durable (ARCHITECTURE.md invariant 1). Every method that touches mail takes the
owning ``AccountId`` (invariant 5): a mailbox id alone is never enough.

Mailbox names are UTF-8 with ``/`` as the hierarchy delimiter; ``INBOX`` is always spelled ``INBOX``.
Flags are kept as one set of strings: system flags with their backslash (``\\Seen``) and keywords
(``$Forwarded``, ``Junk``) side by side, compared case-insensitively for system flags.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

from postfach.mail.search import SortRow
from postfach.types import AccountId, BlobId, MailboxId, ModSeq, QueueId, Uid, UidValidity

HIERARCHY_DELIMITER = "/"

#: ``subscribe(ALL_ACCOUNTS)`` receives the changes *this process* makes to any account (never
#: another node's), for services that watch every account, such as the quota warnings.
ALL_ACCOUNTS = AccountId(0)

#: Folders every new account gets, with their RFC 6154 special-use attribute.
DEFAULT_MAILBOXES: tuple[tuple[str, str | None], ...] = (
    ("INBOX", None),
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Trash", "\\Trash"),
    ("Junk", "\\Junk"),
    ("Archive", "\\Archive"),
)

SYSTEM_FLAGS = ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")

#: ``MailboxChanges.history_floor`` of a mailbox whose expunge history was never trimmed.
NO_FLOOR = ModSeq(0)

#: ``BlobReader.wire`` bits, learned at ingest: every LF of the message follows a CR ...
WIRE_CRLF_ONLY = 1
#: ... and no line starts with "." — with both, the bytes go out as a POP3 multi-line body as they are.
WIRE_NO_DOT_LINES = 2


# --------------------------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class Domain:
    name: str  # lower-case, IDNA A-label form
    created: datetime
    quota_bytes: int | None = None  # default for new accounts of the domain


@dataclass(frozen=True, slots=True)
class Account:
    id: AccountId
    address: str  # lower-case local@domain
    password_hash: str  # argon2id encoded hash
    quota_bytes: int | None  # None: unlimited
    quota_messages: int | None
    used_bytes: int
    used_messages: int
    created: datetime
    disabled: bool = False

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]


@dataclass(frozen=True, slots=True)
class Alias:
    source: str  # "local@domain", or "@domain" for a catch-all
    target: str  # a local account address or an outside address


@dataclass(frozen=True, slots=True)
class Mailbox:
    id: MailboxId
    account_id: AccountId
    name: str  # UTF-8, "/"-delimited, INBOX spelled "INBOX"
    special_use: str | None  # "\\Sent", "\\Drafts", "\\Trash", "\\Junk", "\\Archive", "\\All", "\\Flagged"
    uidvalidity: UidValidity
    uidnext: Uid
    highestmodseq: ModSeq
    subscribed: bool


@dataclass(frozen=True, slots=True)
class MailboxStatus:
    """Counters for STATUS / SELECT, computed consistently in one read."""

    mailbox: Mailbox
    messages: int
    unseen: int
    size: int  # sum of RFC822.SIZE (STATUS=SIZE)
    deleted: int  # messages with \\Deleted
    first_unseen_uid: Uid | None


@dataclass(frozen=True, slots=True)
class MessageMeta:
    """One message in one mailbox: what a session keeps in its view."""

    uid: Uid
    modseq: ModSeq
    flags: frozenset[str]
    size: int
    internaldate: datetime  # tz-aware
    blob_id: BlobId
    savedate: datetime | None = None


@dataclass(frozen=True, slots=True)
class AppendResult:
    mailbox_id: MailboxId
    uidvalidity: UidValidity
    uid: Uid
    modseq: ModSeq


@dataclass(frozen=True, slots=True)
class CopyResult:
    """COPY/MOVE outcome: source UIDs and the UIDs they got in the destination (same order)."""

    uidvalidity: UidValidity  # of the destination
    source_uids: tuple[Uid, ...]
    dest_uids: tuple[Uid, ...]


class FlagOp(enum.Enum):
    ADD = "+"
    REMOVE = "-"
    REPLACE = ""


@dataclass(frozen=True, slots=True)
class StoreFlagsResult:
    updated: tuple[MessageMeta, ...]  # messages whose flags actually changed (new modseq)
    unchanged: tuple[MessageMeta, ...]  # matched but flags already as asked (modseq unchanged)
    modified: tuple[Uid, ...]  # failed the UNCHANGEDSINCE test (RFC 7162 §3.1.3)


@dataclass(frozen=True, slots=True)
class MailboxChanges:
    """Everything that changed in a mailbox after ``since`` (modseq), for NOOP/IDLE/QRESYNC."""

    mailbox: Mailbox
    changed: tuple[MessageMeta, ...]  # appended or flag-changed with modseq > since, by uid
    expunged: tuple[Uid, ...]  # expunged with modseq > since, ascending
    #: The mailbox's expunge-history floor (``expunge_history_floor``). When ``since`` is below it,
    #: ``expunged`` lacks the trimmed records: the caller compares what it knows with the mailbox.
    history_floor: ModSeq = NO_FLOOR


class ChangeKind(enum.Enum):
    APPEND = "append"
    FLAGS = "flags"
    EXPUNGE = "expunge"
    MAILBOX_CREATE = "mailbox-create"
    MAILBOX_DELETE = "mailbox-delete"
    MAILBOX_RENAME = "mailbox-rename"
    ACCOUNT = "account"  # quota, password or deletion


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the change feed. Subscribers use it as a wake-up and read details with
    ``mailbox_changes``; the uids are a hint, the change log in the store is the truth."""

    account_id: AccountId
    kind: ChangeKind
    mailbox_id: MailboxId | None = None
    modseq: ModSeq | None = None
    uids: tuple[Uid, ...] = ()
    name: str | None = None  # mailbox name (new name for a rename)


@dataclass(frozen=True, slots=True)
class DeliveryTarget:
    """One local recipient of ``deliver``: into ``mailbox`` (a name; falls back to INBOX when absent)."""

    account_id: AccountId
    mailbox: str = "INBOX"
    flags: frozenset[str] = frozenset()
    prepend: bytes = b""  # per-recipient header lines (Delivered-To, Return-Path) put before the data


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding of ``check``."""

    kind: str  # "missing-blob", "bad-hash", "counter", "refcount", "orphan-blob", ...
    detail: str


@dataclass(frozen=True, slots=True)
class SearchHits:
    """Answer of ``search_index``: ``uids`` are the indexed messages whose folded text contains
    every needle (checked exactly against the stored text); ``unindexed`` the messages whose
    blob is not indexed (yet): the caller scans those."""

    uids: frozenset[Uid]
    unindexed: frozenset[Uid]


# ----------------------------------------------------------------------------------------- the queue


class RecipientState(enum.Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # permanent failure; a bounce was or will be made
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class QueueRecipient:
    address: str
    state: RecipientState = RecipientState.PENDING
    attempts: int = 0
    last_error: str | None = None
    notify: str | None = None  # RFC 3461 NOTIFY value, e.g. "FAILURE,DELAY"
    orcpt: str | None = None  # RFC 3461 ORCPT value


@dataclass(frozen=True, slots=True)
class QueueItem:
    id: QueueId
    sender: str  # "" for the null sender (bounces)
    recipients: tuple[QueueRecipient, ...]
    blob_id: BlobId
    size: int
    created: datetime
    next_attempt: datetime
    attempts: int
    last_error: str | None = None
    ret: str | None = None  # RFC 3461 RET: "FULL" or "HDRS"
    envid: str | None = None
    requiretls: bool = False
    smtputf8: bool = False
    delay_warned: bool = False
    extra: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- the interface


class BlobReader(Protocol):
    """Random access to one stored message's bytes, for streaming large FETCH/RETR answers."""

    @property
    def size(self) -> int: ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def close(self) -> None: ...

    # Optional (added for POP3 RETR speed; a reader without it is scanned as before): ``wire``,
    # the WIRE_* bits of the blob, or None when not known. Read it with getattr(r, "wire", None).


class Subscription(Protocol):
    """A per-account feed of ``Change``s. ``get`` waits for the next one."""

    async def get(self) -> Change: ...

    def get_nowait(self) -> Change | None: ...

    def close(self) -> None: ...


@runtime_checkable
class Store(Protocol):
    # --- lifecycle -------------------------------------------------------------------------------
    async def open(self) -> None:
        """Create or migrate the schema (never losing data), start writer threads."""

    async def close(self) -> None: ...

    # --- domains ----------------------------------------------------------------------------------
    async def add_domain(self, name: str, quota_bytes: int | None = None) -> Domain: ...
    async def list_domains(self) -> list[Domain]: ...
    async def get_domain(self, name: str) -> Domain | None: ...
    async def delete_domain(self, name: str) -> None:
        """Refused with NotPermitted while accounts of the domain exist."""

    # --- accounts ---------------------------------------------------------------------------------
    async def create_account(
        self,
        address: str,
        password_hash: str,
        quota_bytes: int | None = None,
        quota_messages: int | None = None,
    ) -> Account:
        """Creates the account with DEFAULT_MAILBOXES. AlreadyExists / NotFound (domain)."""

    async def get_account(self, address: str) -> Account | None: ...
    async def get_account_by_id(self, account_id: AccountId) -> Account | None: ...
    async def list_accounts(self, domain: str | None = None) -> list[Account]: ...
    async def set_password(self, account_id: AccountId, password_hash: str) -> None: ...
    async def set_quota(self, account_id: AccountId, quota_bytes: int | None, quota_messages: int | None) -> None: ...
    async def delete_account(self, account_id: AccountId) -> None: ...

    # --- aliases ----------------------------------------------------------------------------------
    async def add_alias(self, source: str, target: str) -> Alias: ...
    async def list_aliases(self, domain: str | None = None) -> list[Alias]: ...
    async def delete_alias(self, source: str, target: str) -> None: ...
    async def aliases_for(self, source: str) -> list[Alias]:
        """Exact source matches only (the caller handles +tags and catch-alls)."""

    # --- mailboxes --------------------------------------------------------------------------------
    async def list_mailboxes(self, account_id: AccountId) -> list[Mailbox]: ...
    async def get_mailbox(self, account_id: AccountId, name: str) -> Mailbox | None:
        """Name lookup; "inbox" in any case finds INBOX."""

    async def get_mailbox_by_id(self, account_id: AccountId, mailbox_id: MailboxId) -> Mailbox | None: ...
    async def create_mailbox(self, account_id: AccountId, name: str, special_use: str | None = None) -> Mailbox:
        """AlreadyExists. Does not create parents (the IMAP layer decides about those)."""

    async def delete_mailbox(self, account_id: AccountId, mailbox_id: MailboxId) -> None:
        """Deletes the mailbox and its messages (blob refcounts drop). INBOX: NotPermitted."""

    async def rename_mailbox(self, account_id: AccountId, mailbox_id: MailboxId, new_name: str) -> None:
        """Renames it and every child ("a/b" moves with "a"). Renaming INBOX moves its messages
        to a new mailbox of the new name and leaves INBOX empty (RFC 9051 §6.3.6)."""

    async def set_subscribed(self, account_id: AccountId, name: str, subscribed: bool) -> None:
        """Subscriptions may name mailboxes that do not exist (RFC 9051 §6.3.7)."""

    async def list_subscriptions(self, account_id: AccountId) -> list[str]: ...
    async def mailbox_status(self, account_id: AccountId, mailbox_id: MailboxId) -> MailboxStatus: ...
    async def claim_recent(self, account_id: AccountId, mailbox_id: MailboxId) -> Uid:
        """IMAP4rev1 \\Recent: returns the first UID that is recent for the caller and marks
        everything up to uidnext as no longer recent for later callers."""

    # --- messages ---------------------------------------------------------------------------------
    async def append(
        self,
        account_id: AccountId,
        mailbox_id: MailboxId,
        data: bytes,
        flags: frozenset[str] = frozenset(),
        internaldate: datetime | None = None,
    ) -> AppendResult:
        """Durable before it returns. QuotaExceeded, NotFound, StorageFull."""

    async def append_many(
        self,
        account_id: AccountId,
        mailbox_id: MailboxId,
        items: Sequence[tuple[bytes, frozenset[str], datetime | None]],
    ) -> list[AppendResult]:
        """MULTIAPPEND: all or nothing, consecutive UIDs."""

    async def deliver(self, data: bytes, targets: Sequence[DeliveryTarget]) -> list[AppendResult]:
        """Local delivery to many accounts: one blob, one commit; durable before it returns.
        Raises QuotaExceeded if any target is over quota (callers check quota at RCPT first)."""

    async def list_messages(self, account_id: AccountId, mailbox_id: MailboxId) -> list[MessageMeta]:
        """All messages, ascending by UID."""

    async def list_uids_sizes(
        self, account_id: AccountId, mailbox_id: MailboxId
    ) -> list[tuple[Uid, int, frozenset[str]]]:
        """(uid, size, flags) of every message, ascending by UID: the lean form of
        ``list_messages`` for POP3 login and first views of very large mailboxes. NotFound."""

    async def get_messages(
        self, account_id: AccountId, mailbox_id: MailboxId, uids: Sequence[Uid]
    ) -> list[MessageMeta]:
        """The named messages that still exist, ascending by UID."""

    async def mailbox_changes(self, account_id: AccountId, mailbox_id: MailboxId, since: ModSeq) -> MailboxChanges: ...

    async def store_flags(
        self,
        account_id: AccountId,
        mailbox_id: MailboxId,
        uids: Sequence[Uid],
        op: FlagOp,
        flags: frozenset[str],
        unchangedsince: ModSeq | None = None,
    ) -> StoreFlagsResult: ...

    async def expunge(
        self, account_id: AccountId, mailbox_id: MailboxId, uids: Sequence[Uid] | None = None
    ) -> list[Uid]:
        """Removes messages flagged \\Deleted (only among ``uids`` when given). Returns what went."""

    async def delete_messages(self, account_id: AccountId, mailbox_id: MailboxId, uids: Sequence[Uid]) -> list[Uid]:
        """Removes the named messages whatever their flags (POP3 DELE+QUIT)."""

    async def copy_messages(
        self, account_id: AccountId, source_id: MailboxId, uids: Sequence[Uid], dest_id: MailboxId
    ) -> CopyResult:
        """Flags and internaldate travel along; QuotaExceeded leaves nothing copied."""

    async def move_messages(
        self, account_id: AccountId, source_id: MailboxId, uids: Sequence[Uid], dest_id: MailboxId
    ) -> CopyResult:
        """Atomic copy + expunge of the source messages (RFC 6851)."""

    async def read_message(self, account_id: AccountId, mailbox_id: MailboxId, uid: Uid) -> bytes:
        """The exact stored bytes. NotFound if expunged."""

    async def open_blob(self, blob_id: BlobId) -> BlobReader:
        """Streaming access; the blob id comes from a MessageMeta the caller read with its account."""

    async def read_blob(self, blob_id: BlobId) -> bytes: ...

    async def message_info(self, blob_id: BlobId) -> bytes:
        """The cached parse result (``postfach.mail.MessageInfo.to_json()``) made at ingest."""

    # --- full-text index and sort keys (made per blob at ingest) -------------------------------
    async def search_index(
        self, account_id: AccountId, mailbox_id: MailboxId, terms: Sequence[tuple[str, str]]
    ) -> SearchHits | None:
        """Messages of the mailbox whose text holds every ``(field, needle)`` of ``terms``.

        ``field`` is one of ``subject from to cc bcc body text`` (``text``: the decoded top-level
        header or the body, as SEARCH TEXT); needles are case-folded (``str.casefold``) by the
        caller and compared as substrings of the text ``postfach.mail.search.index_text`` makes.
        Needles the index cannot answer (``postfach.mail.search.indexable``: shorter than three
        characters, or with a line break) do not narrow (they are ignored). None when the index
        cannot help (no usable needle, or a store without one).
        NotFound for a mailbox not of the account."""

    async def sort_rows(self, account_id: AccountId, mailbox_id: MailboxId) -> list[tuple[Uid, SortRow]] | None:
        """(uid, SORT/THREAD keys) of the mailbox's messages whose blob has stored keys,
        in no particular order, in one query; messages missing from it need their MessageInfo.
        None for a store without stored keys. NotFound for a mailbox not of the account."""

    async def sort_column(self, account_id: AccountId, mailbox_id: MailboxId, field: str) -> dict[Uid, object] | None:
        """One field of ``SortRow`` (``date``, ``from_``, ``subject`` ...) per uid, for the
        mailbox's messages with stored keys: the lean form of ``sort_rows`` for a SORT by one
        key. None for a store without stored keys. NotFound as ``sort_rows``."""

    # --- change feed ------------------------------------------------------------------------------
    def subscribe(self, account_id: AccountId) -> Subscription:
        """In-process feed of every change to the account's mail (IMAP IDLE, POP3)."""

    # --- POP3 maildrop lock (RFC 1939 §8 exclusive access) ----------------------------------------
    def lock_maildrop(self, account_id: AccountId) -> MaildropLock:
        """``async with store.lock_maildrop(a):`` — MailboxInUse if another session holds it.
        The lock dies with its holder (process exit, or the context's end); ``lost`` tells
        whether it was held without a gap."""

    # --- outbound queue ---------------------------------------------------------------------------
    async def queue_add(
        self,
        sender: str,
        recipients: Sequence[QueueRecipient],
        data: bytes,
        *,
        ret: str | None = None,
        envid: str | None = None,
        requiretls: bool = False,
        smtputf8: bool = False,
    ) -> QueueItem:
        """Durable before it returns."""

    async def queue_due(self, now: datetime, limit: int = 100) -> list[QueueItem]:
        """Items with pending recipients whose next attempt is due, claimed for this worker."""

    async def queue_get(self, queue_id: QueueId) -> QueueItem | None: ...
    async def queue_list(self) -> list[QueueItem]: ...
    async def queue_update(
        self,
        queue_id: QueueId,
        recipients: Sequence[QueueRecipient],
        next_attempt: datetime,
        last_error: str | None,
        delay_warned: bool | None = None,
    ) -> None:
        """Records an attempt. When no recipient is PENDING any more the item is removed."""

    async def queue_retry(self, queue_id: QueueId | None = None) -> int:
        """Makes one item (or all) due now; returns how many."""

    async def queue_delete(self, queue_id: QueueId) -> None: ...

    # --- IMAP METADATA (RFC 5464) ------------------------------------------------------------------
    async def get_metadata(self, account_id: AccountId, mailbox_id: MailboxId | None) -> dict[str, bytes]:
        """Every entry of the mailbox (``None``: the account's server entries), name -> value.
        Names are stored in lower case (§3.2: entry names are case-insensitive). Entries are kept
        per account, /shared ones too (no mailbox is shared between accounts). NotFound when the
        mailbox does not exist."""

    async def set_metadata(
        self,
        account_id: AccountId,
        mailbox_id: MailboxId | None,
        entries: Mapping[str, bytes | None],
        *,
        max_mailbox_entries: int,
        max_account_entries: int,
    ) -> None:
        """Sets (bytes) and removes (``None``) entries of a mailbox (``None``: server entries) in
        one transaction, all or nothing (§4.3). TooManyEntries when afterwards the mailbox (or the
        server entries) would hold more than ``max_mailbox_entries`` or the account more than
        ``max_account_entries`` entries; a write that does not add entries never fails so.
        NotFound when the mailbox is gone. Entries follow RENAME (by mailbox id; renaming INBOX
        copies them, §4.1) and go with DELETE and with the account."""

    # --- expunge history (RFC 7162 §3.2.5.2) -------------------------------------------------------
    async def expunge_history_floor(self, account_id: AccountId, mailbox_id: MailboxId) -> ModSeq:
        """The highest modseq up to which expunge records of the mailbox were trimmed (0: none);
        ``mailbox_changes(since)`` is complete only for ``since >= floor``."""

    async def trim_expunge_history(self, keep: timedelta, mark_every: timedelta, *, chunk: int = 500) -> int:
        """One sweep of every mailbox: expunge records older than ``keep`` are dropped (the
        mailbox's floor rises to their highest modseq) and a checkpoint (HIGHESTMODSEQ, now) is
        taken where the last one is older than ``mark_every`` (the sweep's time resolution: a
        record lives between ``keep`` and ``keep + mark_every``). ``chunk`` mailboxes (in id
        order) per transaction, so that a sweep of a big store never holds the writer long.
        Returns the records dropped."""

    # --- maintenance ------------------------------------------------------------------------------
    async def check(self) -> list[Problem]:
        """Verifies every blob (present, hash right), refcounts and counters. Changes nothing."""

    async def recount_usage(self, account_id: AccountId) -> tuple[int, int]:
        """Recomputes (bytes, messages) from the messages themselves and stores it."""


class MaildropLock(Protocol):
    async def __aenter__(self) -> None: ...

    async def __aexit__(self, *exc: object) -> None: ...

    @property
    def lost(self) -> bool:
        """True once the lock may not have been held all along (PostgreSQL: the database session
        holding it was lost and re-established): another session may have opened the maildrop
        meanwhile, so this one must not delete anything (POP3 QUIT answers -ERR)."""
        ...


async def iterate_changes(sub: Subscription) -> AsyncIterator[Change]:
    """Convenience: ``async for change in iterate_changes(store.subscribe(a))``."""
    try:
        while True:
            yield await sub.get()
    finally:
        sub.close()
