"""Pieces every store backend shares: flag and name normalisation, the parse cache, the change feed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence

from postfach.mail import parse_message
from postfach.mail.search import IndexText, SortRow, index_text, indexable, sort_row
from postfach.store.base import HIERARCHY_DELIMITER, SYSTEM_FLAGS, Change, FlagOp
from postfach.types import AccountId

log = logging.getLogger("postfach.store")

SUBSCRIPTION_QUEUE_SIZE = 1024

_SYSTEM = {f.lower(): f for f in SYSTEM_FLAGS}


def normalize_flags(flags: Iterable[str]) -> frozenset[str]:
    """System flags in their canonical spelling; keywords kept as given, deduplicated
    case-insensitively (RFC 9051 §2.3.2). \\Recent is a session property and never stored."""
    out: dict[str, str] = {}
    for f in flags:
        if not f:
            continue
        low = f.lower()
        if low == "\\recent":
            continue
        out.setdefault(low, _SYSTEM.get(low, f))
    return frozenset(out.values())


def apply_flag_op(cur: frozenset[str], op: FlagOp, flags: frozenset[str]) -> frozenset[str]:
    if op is FlagOp.REPLACE:
        return flags
    lows = {f.lower() for f in flags}
    if op is FlagOp.ADD:
        have = {f.lower() for f in cur}
        return cur | {f for f in flags if f.lower() not in have}
    return frozenset(f for f in cur if f.lower() not in lows)


def norm_address(address: str) -> str:
    return address.strip().lower()


def norm_mailbox_name(name: str) -> str:
    """INBOX is case-insensitive (RFC 9051 §5.1), also as the first level of a hierarchy."""
    if name.upper() == "INBOX":
        return "INBOX"
    if name[:6].upper() == "INBOX" + HIERARCHY_DELIMITER:
        return "INBOX" + name[5:]
    return name


#: Search field -> index columns (SEARCH TEXT is the header or the body, RFC 9051 §6.4.4).
INDEX_FIELDS: dict[str, tuple[str, ...]] = {
    "subject": ("subject",), "from": ("sender",), "to": ("rcpt_to",), "cc": ("cc",), "bcc": ("bcc",),
    "body": ("body",), "text": ("header", "body"),
}


#: SortRow field -> its column in the key tables (message_key / blob_index), for Store.sort_column.
SORT_COLUMNS: dict[str, str] = {
    "date": "date", "from_": "from_addr", "to": "to_addr", "cc": "cc_addr", "subject": "subject",
    "display_from": "display_from", "display_to": "display_to",
}


def trigrams(needle: str) -> list[str]:
    """The distinct trigrams of a folded needle, in order of first appearance."""
    return list(dict.fromkeys(needle[i : i + 3] for i in range(len(needle) - 2)))


def fts_query(terms: Sequence[tuple[str, str]]) -> str | None:
    """An FTS5 query (trigram tokenizer, detail=column: no phrases) for messages whose columns
    hold every trigram of every needle: a superset of the substring matches, which the caller
    then checks exactly. None when no needle can narrow anything (see ``indexable``)."""
    parts = []
    for field, needle in terms:
        if not indexable(needle):
            continue
        grams = " AND ".join('"' + g.replace('"', '""') + '"' for g in trigrams(needle))
        parts.append("{" + " ".join(INDEX_FIELDS[field]) + "} : (" + grams + ")")
    return " AND ".join(parts) if parts else None


def parse_info(data: bytes) -> bytes | None:
    """The cached parse result for a new blob; None when postfach.mail cannot parse it (then
    ``message_info`` tries again on demand and reports the failure)."""
    try:
        return parse_message(data).to_json()
    except Exception:  # malformed mail is stored as it is (invariant 7)
        log.exception("parsing a message for the cache failed; it will be parsed on demand")
        return None


def parse_for_ingest(data: bytes) -> tuple[bytes | None, tuple[SortRow, IndexText] | None]:
    """Everything ingest learns from one parse (in an ingest thread, not the writer): the cached
    MessageInfo JSON and the blob's SORT/THREAD keys and full-text index columns. (None, None)
    when postfach.mail cannot parse the message: it is stored as it is, parsed on demand and
    searched by a scan."""
    try:
        info = parse_message(data)
        return info.to_json(), (sort_row(info), index_text(data, info))
    except Exception:  # malformed mail is stored as it is (invariant 7)
        log.exception("parsing a message for the cache failed; it will be parsed on demand")
        return None, None


class Subscription:
    """A bounded per-subscriber queue of changes; when full the oldest is dropped (subscribers
    re-read with ``mailbox_changes`` anyway: what matters is that they wake up)."""

    def __init__(self, account_id: AccountId, unsubscribe: Callable[[Subscription], None]) -> None:
        self.account_id = account_id
        self._unsubscribe = unsubscribe
        self._q: asyncio.Queue[Change] = asyncio.Queue(SUBSCRIPTION_QUEUE_SIZE)
        self._closed = False

    def _put(self, change: Change) -> None:
        if self._closed:
            return
        if self._q.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self._q.get_nowait()
        self._q.put_nowait(change)

    async def get(self) -> Change:
        return await self._q.get()

    def get_nowait(self) -> Change | None:
        try:
            return self._q.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._unsubscribe(self)


async def in_mailbox_chunks(step: Callable[[int], Awaitable[tuple[int | None, int]]]) -> int:
    """Run ``step(after)`` (one transaction over the next mailboxes with ids above ``after``; it
    returns the last id it took, None when there were none, and a count) until the mailboxes run
    out; the sum of the counts."""
    total, after = 0, 0
    while True:
        last, n = await step(after)
        total += n
        if last is None:
            return total
        after = last
