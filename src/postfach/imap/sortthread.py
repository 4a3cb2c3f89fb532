"""SORT and THREAD (RFC 5256, RFC 5957 SORT=DISPLAY) over per-message sort keys. Pure; no asyncio.

The session builds one ``SortKeys`` per blob from the keys the store keeps per blob since ingest
(``Store.sort_rows``, one query per mailbox; else from the cached ``MessageInfo``) and keeps them
in a process-wide cache, since blobs never change, then calls ``sort_order`` or ``thread_*`` with the
matching messages in sequence order; ties always fall back to sequence order (RFC 5256 §3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from operator import attrgetter
from typing import Any, NamedTuple

from postfach.mail.model import BodyPart, Envelope, MessageInfo
from postfach.mail.search import SortRow, sort_row


class SortKeys(NamedTuple):
    """What SORT/THREAD need of one message (per blob; no per-mailbox data). A named tuple: the
    first SORT of a 100,000-message mailbox builds one per message from the store's key table."""

    date: float | None  # sent date (Date:), as a UTC timestamp; None when absent/unparsable
    from_: str  # addr-mailbox of the first From address, case-folded (RFC 5256 §3 FROM)
    to: str
    cc: str
    subject: str  # base subject (RFC 5256 §2.1), case-folded
    display_from: str  # RFC 5957 §2
    display_to: str
    message_id: str
    references: tuple[str, ...]  # References, or In-Reply-To when there are none (§3 REFERENCES)
    reply: bool  # the subject had Re:/Fwd: stripped (subject grouping, §3 step 5)


_new = tuple.__new__


def keys_from_row(row: SortRow) -> SortKeys:
    """SortKeys from the row the store keeps per blob (postfach.mail.search.sort_row)."""
    refs = row[8]
    return _new(SortKeys, (row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                           tuple(refs.split("\n")) if refs else (), bool(row[9])))


@dataclass(frozen=True, slots=True)
class Item:
    seq: int
    uid: int
    size: int
    arrival: float  # INTERNALDATE as a timestamp
    keys: SortKeys
    sent: float  # RFC 5256 §2.2: the sent date, or the internal date when there is none


def item(seq: int, uid: int, size: int, arrival: float, keys: SortKeys) -> Item:
    return Item(seq, uid, size, arrival, keys, keys.date if keys.date is not None else arrival)


def make_keys(subject: str, base_subject: str, date: datetime | None, from_addr: str, to_addr: str,
              cc_addr: str, display_from: str, display_to: str, message_id: str, in_reply_to: str,
              references: Sequence[str]) -> SortKeys:
    info = MessageInfo(0, _NO_PART, Envelope(), subject=subject, base_subject=base_subject, date=date,
                       from_addr=from_addr, to_addr=to_addr, cc_addr=cc_addr, display_from=display_from,
                       display_to=display_to, message_id=message_id, in_reply_to=in_reply_to,
                       references=tuple(references))
    return keys_from_row(sort_row(info))


_NO_PART = BodyPart("text", "plain", (), None, None, "7bit", None, None, None, None, 0, 0, 0, 0, 0)


#: SortKeys attribute per string sort key (the session's one-criterion fast path).
KEY_ATTRS = {"FROM": "from_", "TO": "to", "CC": "cc", "SUBJECT": "subject",
             "DISPLAYFROM": "display_from", "DISPLAYTO": "display_to"}

_KEYS: dict[str, Callable[[Item], Any]] = {
    "ARRIVAL": attrgetter("arrival"),
    "DATE": attrgetter("sent"),
    "SIZE": attrgetter("size"),
    "FROM": attrgetter("keys.from_"),
    "TO": attrgetter("keys.to"),
    "CC": attrgetter("keys.cc"),
    "SUBJECT": attrgetter("keys.subject"),
    "DISPLAYFROM": attrgetter("keys.display_from"),
    "DISPLAYTO": attrgetter("keys.display_to"),
}


def sort_order(items: Sequence[Item], criteria: Sequence[tuple[str, bool]]) -> list[Item]:
    """Items (in sequence order) sorted by the criteria; a stable sort per criterion, last first,
    so equal keys keep sequence order (also under REVERSE, as Dovecot does)."""
    out = list(items)
    for name, reverse in reversed(criteria):
        out.sort(key=_KEYS[name], reverse=reverse)
    return out


# ----------------------------------------------------------------------------------- THREAD


@dataclass(eq=False, slots=True)
class Node:
    item: Item | None = None
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    when: tuple[float, int] = (0.0, 0)  # (sent, seq); a dummy's is its first child's (_sort_tree)

    def date(self) -> tuple[float, int]:
        if self.item is not None:
            return (self.item.sent, self.item.seq)
        return self.children[0].date() if self.children else (0.0, 0)

    def subject_item(self) -> Item | None:
        if self.item is not None:
            return self.item
        return self.children[0].item if self.children else None


def thread_orderedsubject(items: Sequence[Item]) -> list[Node]:
    """RFC 5256 §3 ORDEREDSUBJECT: group by base subject, each sorted by sent date; the first
    message is the parent of all others; threads sorted by their first message's date."""
    groups: dict[str, list[Item]] = {}
    for it in sorted(items, key=lambda i: (i.sent, i.seq)):
        groups.setdefault(it.keys.subject, []).append(it)
    roots = []
    for members in groups.values():
        root = Node(members[0], when=(members[0].sent, members[0].seq))
        root.children = [Node(m, root) for m in members[1:]]
        roots.append(root)
    roots.sort(key=_WHEN)
    return roots


def _is_ancestor(a: Node, b: Node) -> bool:
    """Whether ``a`` is ``b`` or one of its ancestors."""
    n: Node | None = b
    while n is not None:
        if n is a:
            return True
        n = n.parent
    return False


def _unlink(n: Node) -> None:
    if n.parent is not None:
        n.parent.children.remove(n)
        n.parent = None


def _link(parent: Node, child: Node) -> None:
    child.parent = parent
    parent.children.append(child)


def thread_references(items: Sequence[Item]) -> list[Node]:
    """RFC 5256 §3 REFERENCES (the Zawinski algorithm), steps 1-6."""
    table: dict[str, Node] = {}
    for it in items:
        mid = it.keys.message_id
        node = table.get(mid) if mid else None
        if node is None or node.item is not None:
            # §3 step 1: no or duplicate Message-ID: a unique id of its own.
            node = Node()
            table[mid if mid and mid not in table else f"\0{it.seq}"] = node
        node.item = it
        # (A) link the References chain, never overwriting links nor making loops.
        prev: Node | None = None
        for ref in it.keys.references:
            cur = table.get(ref)
            if cur is None:
                cur = table[ref] = Node()
            if prev is not None and cur.parent is None and not _is_ancestor(cur, prev):
                _link(prev, cur)
            prev = cur
        # (B) the last reference is the message's parent (breaking an old link, no loops).
        if prev is not None and prev is not node and not _is_ancestor(node, prev):
            _unlink(node)
            _link(prev, node)
        elif prev is None:
            _unlink(node)
    # Step 2: the root set. Step 4: prune dummies.
    roots = _prune([n for n in table.values() if n.parent is None])
    _sort_tree(roots)
    roots.sort(key=_WHEN)
    # Step 5: merge roots with the same base subject.
    subjects: dict[str, Node] = {}
    for n in roots:
        si = n.subject_item()
        if si is None or not si.keys.subject:
            continue
        old = subjects.get(si.keys.subject)
        if old is None:
            subjects[si.keys.subject] = n
            continue
        old_it = old.subject_item()
        if (n.item is None and old.item is not None) or (
                old.item is not None and n.item is not None and old_it is not None
                and old_it.keys.reply and not si.keys.reply):
            subjects[si.keys.subject] = n
    out: list[Node | None] = list(roots)
    where = {id(n): i for i, n in enumerate(roots)}
    for i, n in enumerate(roots):
        if out[i] is not n or n.parent is not None:
            continue
        si = n.subject_item()
        if si is None or not si.keys.subject:
            continue
        subj = si.keys.subject
        c = subjects[subj]
        if c is n:
            continue
        ci = where[id(c)]
        out[i] = None
        if c.item is None and n.item is None:
            for ch in list(n.children):
                _link(c, ch)
            n.children = []
        elif c.item is None:
            _link(c, n)
        elif n.item is None:
            # The dummy takes the other root as one more child, and its place.
            _link(n, c)
            out[ci] = n
            where[id(n)] = ci
            subjects[subj] = n
        elif not c.item.keys.reply and n.item.keys.reply:
            _link(c, n)
        else:
            dummy = Node()
            _link(dummy, c)
            _link(dummy, n)
            out[ci] = dummy
            where[id(dummy)] = ci
            subjects[subj] = dummy
    # Step 6: sort every level by sent date.
    result = [n for n in out if n is not None]
    _sort_tree(result)
    result.sort(key=_WHEN)
    return result


def _preorder(nodes: Sequence[Node]) -> list[Node]:
    order: list[Node] = []
    stack = list(nodes)
    while stack:
        n = stack.pop()
        order.append(n)
        stack.extend(n.children)
    return order


def _prune(roots: list[Node]) -> list[Node]:
    """§3 step 4, without recursion (reply chains can be thousands deep): empty dummies go;
    a dummy's children move up to its parent, at the root only when it has a single child."""
    for n in reversed(_preorder(roots)):  # children before their parents
        kids: list[Node] = []
        for ch in n.children:
            if ch.item is None:
                kids.extend(ch.children)
            else:
                kids.append(ch)
        for ch in kids:
            ch.parent = n
        n.children = kids
    out: list[Node] = []
    for n in roots:
        if n.item is None and len(n.children) <= 1:
            out.extend(n.children)
        else:
            out.append(n)
    for n in out:
        n.parent = None
    return out


_WHEN = attrgetter("when")


def _sort_tree(roots: Sequence[Node]) -> None:
    # Children first, so a dummy's date (its first child's) is right when its level is sorted.
    for n in reversed(_preorder(roots)):
        kids = n.children
        if len(kids) > 1:
            kids.sort(key=_WHEN)
        if n.item is not None:
            n.when = (n.item.sent, n.item.seq)
        elif kids:
            n.when = kids[0].when


def format_threads(roots: Sequence[Node], uid: bool) -> str:
    """RFC 5256 §4 thread-list syntax: a chain of single children is a space-separated run;
    siblings are parenthesised lists."""
    def one(n: Node) -> str:
        parts: list[str] = []
        cur = n
        while True:
            if cur.item is not None:
                parts.append(str(cur.item.uid if uid else cur.item.seq))
            if len(cur.children) == 1:
                cur = cur.children[0]
                continue
            break
        text = " ".join(parts)
        if cur.children:
            nested = "".join("(" + one(ch) + ")" for ch in cur.children)
            text = f"{text} {nested}" if text else nested
        return text

    # Recursion happens only at branches (a thread nests as deep as it branches).
    return "".join("(" + one(r) + ")" for r in roots)
