"""The selected mailbox as one session sees it: the SeqNum <-> Uid map, the flags it has told the
client, and the diff of the store's changes into EXPUNGE / EXISTS / FETCH responses.

RFC 9051 §7.5.1 (and §5.5): EXPUNGE must not be sent while a FETCH, STORE or SEARCH by sequence
number runs, so expunges learnt then are kept pending and their sequence numbers stay valid until
a command that allows them. No asyncio here; the session feeds ``MailboxChanges`` in.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from postfach.imap.commands import SeqSet
from postfach.imap.responses import flag_list, uid_set
from postfach.store.base import MailboxChanges, MessageMeta
from postfach.types import MailboxId, ModSeq, SeqNum, Uid, UidValidity


class BadSequence(Exception):
    """A message sequence number beyond the mailbox (RFC 9051 §6.4.5: BAD)."""


@dataclass
class Refresh:
    """What a refresh found: untagged lines to send, in order."""

    lines: list[bytes]
    new: int = 0
    new_uids: list[Uid] = field(default_factory=list)


class SelectedMailbox:
    def __init__(
        self,
        mailbox_id: MailboxId,
        name: str,
        uidvalidity: UidValidity,
        uidnext: Uid,
        modseq: ModSeq,
        messages: Sequence[MessageMeta],
        readonly: bool,
        recent: set[Uid] | None = None,
        view: MailboxView | None = None,
    ) -> None:
        self.mailbox_id = mailbox_id
        self.name = name
        self.uidvalidity = uidvalidity
        self.uidnext = uidnext
        self.modseq = modseq
        self.readonly = readonly
        # Copy-on-write: an idle session shares the view's list and dict (views never mutate
        # them in place) and copies them only when its own picture starts to differ.
        self._shared = view is not None
        if view is not None:
            self.uids: list[Uid] = view.uids
            self.metas: dict[Uid, MessageMeta] = view.metas
        else:
            self.uids = [m.uid for m in messages]
            self.metas = {m.uid: m for m in messages}
        self.pending_expunge: set[Uid] = set()
        # RFC 7162: after a CONDSTORE enabling command flag FETCHes carry MODSEQ (§3.1.4.2);
        # after ENABLE QRESYNC expunges are told as VANISHED <uids> (§3.2.10).
        self.condstore = False
        self.qresync = False
        # \Recent (IMAP4rev1 only): the UIDs this session was first to see (store.claim_recent).
        self.recent: set[Uid] = recent or set()

    # --- lookups ----------------------------------------------------------------------------------
    @property
    def exists(self) -> int:
        return len(self.uids)

    def seq_of(self, uid: Uid) -> SeqNum | None:
        i = bisect_left(self.uids, uid)
        if i < len(self.uids) and self.uids[i] == uid:
            return SeqNum(i + 1)
        return None

    def uid_at(self, seq: SeqNum) -> Uid:
        return self.uids[seq - 1]

    def is_recent(self, uid: Uid) -> bool:
        return uid in self.recent

    def recent_count(self) -> int:
        return len(self.recent)

    def flags_of(self, uid: Uid, rev1: bool) -> frozenset[str]:
        flags = self.metas[uid].flags
        if rev1 and self.is_recent(uid):
            return flags | {"\\Recent"}
        return flags

    def resolve_seq(self, seqset: SeqSet) -> list[Uid]:
        """UIDs named by a sequence set, ascending. ``*`` is the last message. A range that runs
        past the end is cut there (clients send ``1:4294967295`` for "all"); a number or range
        entirely beyond the mailbox is a client error (BAD)."""
        n = len(self.uids)
        if n == 0:
            if all(a is None or b is None for a, b in seqset.ranges):
                return []
            raise BadSequence("No messages in the mailbox")
        ranges = seqset.bounds(n)
        for lo, _hi in ranges:
            if lo > n:
                raise BadSequence("Message sequence number out of range")
        if len(ranges) == 1:
            lo, hi = ranges[0]
            return self.uids[lo - 1 : min(hi, n)]
        picked: set[int] = set()
        for lo, hi in ranges:
            picked.update(range(lo - 1, min(hi, n)))
        return [self.uids[i] for i in sorted(picked)]

    def resolve_uid(self, seqset: SeqSet) -> list[Uid]:
        """UIDs of existing messages in a UID set, ascending (RFC 9051 §6.4.9: non-existent UIDs
        are ignored; ``*`` is the largest UID in use, or matches nothing in an empty mailbox)."""
        if not self.uids:
            return []
        largest = self.uids[-1]
        ranges = seqset.bounds(largest)
        if len(ranges) == 1:
            lo, hi = ranges[0]
            return self.uids[bisect_left(self.uids, lo) : bisect_left(self.uids, hi + 1)]
        picked: set[Uid] = set()
        for lo, hi in ranges:
            picked.update(self.uids[bisect_left(self.uids, lo) : bisect_left(self.uids, hi + 1)])
        return sorted(picked)

    def _own(self) -> None:
        if self._shared:
            self.uids = list(self.uids)
            self.metas = dict(self.metas)
            self._shared = False

    # --- local updates (our own commands) -------------------------------------------------------
    def update_metas(self, metas: Iterable[MessageMeta]) -> None:
        self._own()
        for m in metas:
            if m.uid in self.metas:
                self.metas[m.uid] = m

    def remove_now(self, uids: Iterable[Uid]) -> list[bytes]:
        """Expunge ``uids`` from the view at once (a command where EXPUNGE may be sent)."""
        gone = set(uids) | self.pending_expunge
        return self._expunge(gone)

    def _expunge(self, gone: set[Uid]) -> list[bytes]:
        seqs = sorted(i for i, u in enumerate(self.uids) if u in gone) if gone else []
        if not seqs:
            self.pending_expunge.clear()
            return []
        if self.qresync:
            lines = [b"* VANISHED " + uid_set(self.uids[s] for s in seqs).encode() + b"\r\n"]
        else:
            # RFC 9051 §7.5.1: each EXPUNGE renumbers the following messages at once.
            lines = [b"* %d EXPUNGE\r\n" % (s + 1 - k) for k, s in enumerate(seqs)]
        self._own()
        self.uids = [u for u in self.uids if u not in gone]
        for u in gone:
            self.metas.pop(u, None)
            self.recent.discard(u)
        self.pending_expunge.clear()
        return lines

    # --- the store's changes ----------------------------------------------------------------------
    def apply(self, changes: MailboxChanges, *, allow_expunge: bool, rev1: bool,
              silent_uids: frozenset[Uid] = frozenset()) -> Refresh:
        lines: list[bytes] = []
        for uid in changes.expunged:
            if uid in self.metas:
                self.pending_expunge.add(uid)
        if allow_expunge and self.pending_expunge:
            lines.extend(self._expunge(set(self.pending_expunge)))
        last = self.uids[-1] if self.uids else Uid(0)
        new: list[MessageMeta] = []
        flag_lines: list[Uid] = []
        for m in changes.changed:
            if m.uid in self.pending_expunge:
                continue
            old = self.metas.get(m.uid)
            if old is None:
                if m.uid > last:
                    new.append(m)
                continue
            if old.flags != m.flags:
                flag_lines.append(m.uid)
            if old != m:
                self._own()
                self.metas[m.uid] = m
        for uid in flag_lines:
            if uid in silent_uids:
                continue
            seq = self.seq_of(uid)
            if seq is not None:
                lines.append(self.flags_line(seq, uid, rev1))
        if new:
            new.sort(key=lambda m: m.uid)
            self._own()
            for m in new:
                self.uids.append(m.uid)
                self.metas[m.uid] = m
            lines.append(b"* %d EXISTS\r\n" % len(self.uids))
        mb = changes.mailbox
        if mb.highestmodseq > self.modseq:
            self.modseq = mb.highestmodseq
        if mb.uidnext > self.uidnext:
            self.uidnext = mb.uidnext
        return Refresh(lines, len(new), [m.uid for m in new])

    def flags_line(self, seq: int, uid: Uid, rev1: bool, with_flags: bool = True) -> bytes:
        """``* seq FETCH (UID u FLAGS (..) [MODSEQ (m)])`` for a flag change."""
        mod = b" MODSEQ (%d)" % self.metas[uid].modseq if self.condstore else b""
        fl = b" FLAGS " + flag_list(self.flags_of(uid, rev1)) if with_flags else b""
        return b"* %d FETCH (UID %d%s%s)\r\n" % (seq, uid, fl, mod)

    def with_flags(self, uid: Uid, flags: frozenset[str]) -> None:
        m = self.metas.get(uid)
        if m is not None:
            self._own()
            self.metas[uid] = replace(m, flags=flags)


class MailboxView:
    """A process-wide snapshot of one mailbox (uids, metas, keywords) shared by SELECTs: a new
    SELECT brings it up to date with ``mailbox_changes`` instead of reading every message again
    (Dovecot keeps an index for the same reason). Sessions copy it; they never mutate it."""

    __slots__ = ("claimed_upto", "keywords", "metas", "modseq", "uids", "uidvalidity")

    def __init__(self, uidvalidity: UidValidity, modseq: ModSeq, messages: Sequence[MessageMeta]) -> None:
        self.uidvalidity = uidvalidity
        self.modseq = modseq
        self.uids: list[Uid] = [m.uid for m in messages]
        self.metas: dict[Uid, MessageMeta] = {m.uid: m for m in messages}
        self.keywords: set[str] = set()
        for fs in {m.flags for m in messages}:
            self.keywords.update(f for f in fs if not f.startswith("\\"))
        self.claimed_upto: Uid = Uid(0)  # \Recent already claimed below this UID

    def apply(self, changes: MailboxChanges) -> None:
        """Never in place: sessions may share the current list and dict."""
        if not changes.expunged and not changes.changed:
            return
        self.uids = list(self.uids)
        self.metas = dict(self.metas)
        gone = {u for u in changes.expunged if u in self.metas}
        if gone:
            self.uids = [u for u in self.uids if u not in gone]
            for u in gone:
                del self.metas[u]
        last = self.uids[-1] if self.uids else 0
        unsorted = False
        for m in changes.changed:
            if m.uid not in self.metas:
                if m.uid in changes.expunged:
                    continue
                unsorted = unsorted or m.uid < last
                self.uids.append(m.uid)
                last = max(last, m.uid)
            self.metas[m.uid] = m
            self.keywords.update(f for f in m.flags if not f.startswith("\\"))
        if unsorted:
            self.uids.sort()
        if changes.mailbox.highestmodseq > self.modseq:
            self.modseq = changes.mailbox.highestmodseq


class ViewCache:
    """LRU of MailboxViews keyed by mailbox id (ids are unique across accounts), bounded by the
    number of views and by the messages they hold together."""

    def __init__(self, size: int = 256, max_messages: int = 1_000_000) -> None:
        self.size = size
        self.max_messages = max_messages
        self._views: dict[MailboxId, MailboxView] = {}

    def get(self, mailbox_id: MailboxId) -> MailboxView | None:
        view = self._views.pop(mailbox_id, None)
        if view is not None:
            self._views[mailbox_id] = view
        return view

    def put(self, mailbox_id: MailboxId, view: MailboxView) -> None:
        self._views.pop(mailbox_id, None)
        self._views[mailbox_id] = view
        total = sum(len(v.uids) for v in self._views.values())
        while len(self._views) > 1 and (len(self._views) > self.size or total > self.max_messages):
            oldest = next(iter(self._views))
            total -= len(self._views.pop(oldest).uids)

    def drop(self, mailbox_id: MailboxId) -> None:
        self._views.pop(mailbox_id, None)
