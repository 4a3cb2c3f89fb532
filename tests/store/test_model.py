"""The store against a naive in-memory model (Hypothesis state machine): appends, flags, copies,
moves, expunges and deletes of two mailboxes, checking UIDs, flags, bytes, usage and modseqs."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from tests import backends
from tests.store.storehelpers import account_with_inbox, msg

from postfach.errors import QuotaExceeded
from postfach.store.base import FlagOp
from postfach.types import AccountId, MailboxId, ModSeq, Uid

T = TypeVar("T")
FLAGS = st.frozensets(st.sampled_from(["\\Seen", "\\Deleted", "\\Flagged", "$Label"]), max_size=3)
QUOTA_MESSAGES = 12


@dataclass
class Box:
    id: MailboxId
    uidnext: int = 1
    msgs: dict[int, tuple[bytes, frozenset[str]]] = field(default_factory=dict)
    modseq: int = 0  # last highestmodseq seen


class StoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="postfach-model-"))
        self.store = backends.new_store(self.dir, group_commit_max=8)
        self.run(self.store.open())
        aid, inbox = self.run(account_with_inbox(self.store, quota_messages=QUOTA_MESSAGES))
        self.aid: AccountId = aid
        arch = self.run(self.store.get_mailbox(aid, "Archive"))
        assert arch is not None
        self.boxes = [Box(inbox, modseq=1), Box(arch.id, modseq=1)]
        self.n = 0

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            assert self.run(self.store.check()) == []
            self.run(self.store.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def total(self) -> int:
        return sum(len(b.msgs) for b in self.boxes)

    @rule(box=st.integers(0, 1), flags=FLAGS, count=st.integers(1, 3), dup=st.booleans())
    def append(self, box: int, flags: frozenset[str], count: int, dup: bool) -> None:
        b = self.boxes[box]
        datas = []
        for _ in range(count):
            self.n += 1
            datas.append(msg(0 if dup else self.n))
        try:
            res = self.run(self.store.append_many(self.aid, b.id, [(d, flags, None) for d in datas]))
        except QuotaExceeded:
            assert self.total() + count > QUOTA_MESSAGES
            return
        assert self.total() + count <= QUOTA_MESSAGES
        assert [r.uid for r in res] == list(range(b.uidnext, b.uidnext + count))
        for r, d in zip(res, datas, strict=True):
            b.msgs[r.uid] = (d, flags)
        b.uidnext += count

    @precondition(lambda self: self.total() > 0)
    @rule(box=st.integers(0, 1), data=st.data(), op=st.sampled_from(list(FlagOp)), flags=FLAGS)
    def store_flags(self, box: int, data: st.DataObject, op: FlagOp, flags: frozenset[str]) -> None:
        b = self.boxes[box]
        if not b.msgs:
            return
        uids = data.draw(st.lists(st.sampled_from(sorted(b.msgs)), min_size=1, max_size=4))
        res = self.run(self.store.store_flags(self.aid, b.id, [Uid(u) for u in uids], op, flags))
        changed = set()
        for u in set(uids):
            d, cur = b.msgs[u]
            new = flags if op is FlagOp.REPLACE else (cur | flags if op is FlagOp.ADD else cur - flags)
            if new != cur:
                changed.add(u)
            b.msgs[u] = (d, new)
        assert {m.uid for m in res.updated} == changed
        for m in res.updated:
            assert m.flags == b.msgs[m.uid][1] and m.modseq > b.modseq

    @precondition(lambda self: self.total() > 0)
    @rule(src=st.integers(0, 1), dst=st.integers(0, 1), data=st.data(), move=st.booleans())
    def copy_or_move(self, src: int, dst: int, data: st.DataObject, move: bool) -> None:
        s, d = self.boxes[src], self.boxes[dst]
        if not s.msgs:
            return
        uids = sorted(set(data.draw(st.lists(st.sampled_from(sorted(s.msgs)), min_size=1, max_size=3))))
        fn = self.store.move_messages if move else self.store.copy_messages
        try:
            res = self.run(fn(self.aid, s.id, [Uid(u) for u in uids], d.id))
        except QuotaExceeded:
            assert not move and self.total() + len(uids) > QUOTA_MESSAGES
            return
        assert list(res.source_uids) == uids
        assert list(res.dest_uids) == list(range(d.uidnext, d.uidnext + len(uids)))
        items = [s.msgs[u] for u in uids]
        if move:
            for u in uids:
                del s.msgs[u]
        for nu, item in zip(res.dest_uids, items, strict=True):
            d.msgs[nu] = item
        d.uidnext += len(uids)

    @rule(box=st.integers(0, 1))
    def expunge(self, box: int) -> None:
        b = self.boxes[box]
        gone = self.run(self.store.expunge(self.aid, b.id))
        want = sorted(u for u, (_, f) in b.msgs.items() if "\\Deleted" in f)
        assert gone == want
        for u in want:
            del b.msgs[u]

    @precondition(lambda self: self.total() > 0)
    @rule(box=st.integers(0, 1), data=st.data())
    def delete(self, box: int, data: st.DataObject) -> None:
        b = self.boxes[box]
        if not b.msgs:
            return
        uids = sorted(set(data.draw(st.lists(st.sampled_from(sorted(b.msgs)), min_size=1, max_size=3))))
        assert self.run(self.store.delete_messages(self.aid, b.id, [Uid(u) for u in uids])) == uids
        for u in uids:
            del b.msgs[u]

    @invariant()
    def matches_model(self) -> None:
        size = 0
        for b in self.boxes:
            metas = self.run(self.store.list_messages(self.aid, b.id))
            assert [m.uid for m in metas] == sorted(b.msgs)
            for m in metas:
                assert m.flags == b.msgs[m.uid][1]
                size += m.size
            mb = self.run(self.store.get_mailbox_by_id(self.aid, b.id))
            assert mb is not None and mb.uidnext == b.uidnext
            assert mb.highestmodseq >= b.modseq  # modseqs only grow
            changes = self.run(self.store.mailbox_changes(self.aid, b.id, ModSeq(b.modseq)))
            assert all(m.modseq > b.modseq for m in changes.changed)
            b.modseq = mb.highestmodseq
        for b in self.boxes[:1]:
            for u, (d, _) in list(b.msgs.items())[:2]:
                assert self.run(self.store.read_message(self.aid, b.id, Uid(u))) == d
        acct = self.run(self.store.get_account_by_id(self.aid))
        assert acct is not None and (acct.used_messages, acct.used_bytes) == (self.total(), size)


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(
    max_examples=8,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
pytestmark = pytest.mark.timeout(120)
