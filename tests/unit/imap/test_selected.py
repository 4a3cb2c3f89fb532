"""selected.py against a naive model: sequence numbers, UID sets, deferred EXPUNGE."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from postfach.imap.commands import SeqSet
from postfach.imap.selected import BadSequence, MailboxView, SelectedMailbox
from postfach.store.base import Mailbox, MailboxChanges, MessageMeta
from postfach.types import AccountId, BlobId, MailboxId, ModSeq, Uid, UidValidity

WHEN = datetime(2024, 1, 1, tzinfo=UTC)


def meta(uid: int, flags: frozenset[str] = frozenset(), modseq: int = 1) -> MessageMeta:
    return MessageMeta(Uid(uid), ModSeq(modseq), flags, 10, WHEN, BlobId(f"b{uid}"))


def mailbox(modseq: int, uidnext: int = 100) -> Mailbox:
    return Mailbox(MailboxId(1), AccountId(1), "INBOX", None, UidValidity(7), Uid(uidnext), ModSeq(modseq), True)


def sel_of(uids: list[int]) -> SelectedMailbox:
    return SelectedMailbox(MailboxId(1), "INBOX", UidValidity(7), Uid(100), ModSeq(1),
                           [meta(u) for u in uids], readonly=False)


def test_resolve_seq_and_uid() -> None:
    s = sel_of([3, 5, 9, 12])
    assert s.resolve_seq(SeqSet(((2, 3),))) == [5, 9]
    assert s.resolve_seq(SeqSet(((None, None),))) == [12]
    assert s.resolve_seq(SeqSet(((1, 4294967295),))) == [3, 5, 9, 12]  # cut at the end
    for beyond in (SeqSet(((5, 5),)), SeqSet(((5, 4294967295),))):
        with pytest.raises(BadSequence):  # entirely past the mailbox: BAD
            s.resolve_seq(beyond)
    assert s.resolve_uid(SeqSet(((1, 4294967295),))) == [3, 5, 9, 12]
    assert s.resolve_uid(SeqSet(((13, None),))) == [12]  # "13:*" includes the largest UID
    assert s.resolve_uid(SeqSet(((4, 4), (9, 10)))) == [9]
    assert sel_of([]).resolve_uid(SeqSet(((1, None),))) == []


def test_expunge_is_deferred_until_allowed() -> None:
    s = sel_of([1, 2, 3, 4])
    ch = MailboxChanges(mailbox(5), changed=(meta(5, modseq=5),), expunged=(Uid(2), Uid(3)))
    res = s.apply(ch, allow_expunge=False, rev1=False)
    assert res.lines == [b"* 5 EXISTS\r\n"]
    assert s.seq_of(Uid(4)) == 4  # numbers unchanged while expunges are pending
    res = s.apply(MailboxChanges(mailbox(5), (), ()), allow_expunge=True, rev1=False)
    assert res.lines == [b"* 2 EXPUNGE\r\n", b"* 2 EXPUNGE\r\n"]
    assert s.uids == [1, 4, 5]


def test_view_is_never_changed_under_a_session() -> None:
    view = MailboxView(UidValidity(7), ModSeq(1), [meta(1), meta(2)])
    s = SelectedMailbox(MailboxId(1), "INBOX", UidValidity(7), Uid(3), ModSeq(1), (), False, None, view)
    view.apply(MailboxChanges(mailbox(3), changed=(meta(3, modseq=3),), expunged=(Uid(1),)))
    assert s.uids == [1, 2] and view.uids == [2, 3]
    s.apply(MailboxChanges(mailbox(3), changed=(meta(3, modseq=3),), expunged=(Uid(1),)),
            allow_expunge=True, rev1=False)
    assert s.uids == [2, 3]


class SelectedModel(RuleBasedStateMachine):
    """The store's truth, a client's view built from responses, and SelectedMailbox."""

    def __init__(self) -> None:
        super().__init__()
        self.truth: list[int] = [1, 2, 3]
        self.next_uid = 4
        self.modseq = 1
        self.sel = sel_of(list(self.truth))
        self.client: list[int] = list(self.truth)
        self.expunged: list[int] = []
        self.changed: list[MessageMeta] = []

    @rule()
    def append(self) -> None:
        self.modseq += 1
        self.truth.append(self.next_uid)
        self.changed.append(meta(self.next_uid, modseq=self.modseq))
        self.next_uid += 1

    @rule(i=st.integers(0, 50))
    def expunge(self, i: int) -> None:
        if self.truth:
            uid = self.truth.pop(i % len(self.truth))
            self.modseq += 1
            self.expunged.append(uid)
            self.changed = [m for m in self.changed if m.uid != uid]

    @rule(allow=st.booleans())
    def refresh(self, allow: bool) -> None:
        ch = MailboxChanges(mailbox(self.modseq), tuple(self.changed), tuple(Uid(u) for u in self.expunged))
        self.changed, self.expunged = [], []
        for line in self.sel.apply(ch, allow_expunge=allow, rev1=False).lines:
            n, kind = line.split()[1:3]
            if kind == b"EXPUNGE":
                del self.client[int(n) - 1]
            elif kind == b"EXISTS":
                have = set(self.client)
                self.client += [u for u in self.sel.uids if u not in have][: int(n) - len(self.client)]

    @invariant()
    def client_matches_session(self) -> None:
        assert self.client == self.sel.uids
        if not self.sel.pending_expunge and not self.changed and not self.expunged:
            assert self.sel.uids == self.truth


TestSelectedModel = SelectedModel.TestCase
TestSelectedModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
