"""SORT and THREAD (RFC 5256, RFC 5957 SORT=DISPLAY) over per-message sort keys. Pure; no asyncio.

The session builds one ``SortKeys`` per blob from the keys the store keeps per blob since ingest
(``Store.sort_rows``, one query per mailbox; else from the cached ``MessageInfo``) and keeps them
in a process-wide cache, since blobs never change, then calls ``sort_order`` or ``thread_*`` with the
matching messages in sequence order; ties always fall back to sequence order (RFC 5256 §3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from operator import attrgetter
from typing import Any, NamedTuple

from postfach.mail.model import BodyPart, Envelope, MessageInfo
from postfach.mail.search import SortRow, sort_row

#: What SORT/THREAD need of one message (per blob; no per-mailbox data): the row the store keeps
#: per blob since ingest, as it comes (the first SORT of a 100,000-message mailbox takes 100,000
#: of them in one query). ``references`` is one message id per line: References, or In-Reply-To
#: when there are none (RFC 5256 §3 REFERENCES); ``reply`` is truthy when the subject had a
#: Re:/Fwd: marker stripped (subject grouping, §3 step 5).
SortKeys = SortRow


def keys_from_row(row: SortRow) -> SortKeys:
    return row


def _refs(keys: SortKeys) -> list[str]:
    return keys.references.split("\n") if keys.references else []


class Item(NamedTuple):
    """One message to sort or thread (a named tuple: 100,000 of them are made per command)."""

    seq: int
    uid: int
    size: int
    arrival: float  # INTERNALDATE as a timestamp
    keys: SortKeys
    sent: float  # RFC 5256 §2.2: the sent date, or the internal date when there is none


_new = tuple.__new__


def item(seq: int, uid: int, size: int, arrival: float, keys: SortKeys) -> Item:
    d = keys[0]
    return _new(Item, (seq, uid, size, arrival, keys, d if d is not None else arrival))


def make_keys(subject: str, base_subject: str, date: datetime | None, from_addr: str, to_addr: str,
              cc_addr: str, display_from: str, display_to: str, message_id: str, in_reply_to: str,
              references: Sequence[str]) -> SortKeys:
    info = MessageInfo(0, _NO_PART, Envelope(), subject=subject, base_subject=base_subject, date=date,
                       from_addr=from_addr, to_addr=to_addr, cc_addr=cc_addr, display_from=display_from,
                       display_to=display_to, message_id=message_id, in_reply_to=in_reply_to,
                       references=tuple(references))
    return sort_row(info)


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


class Node:
    """A thread tree node; ``when`` is (sent, seq) of its message, a dummy's that of its first
    child (set by ``_sort_tree``)."""

    __slots__ = ("children", "item", "parent", "when")

    def __init__(self, item: Item | None = None, parent: Node | None = None,
                 when: tuple[float, int] = (0.0, 0)) -> None:
        self.item = item
        self.parent = parent
        self.children: list[Node] = []
        self.when = when

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
        root.children = [Node(m, root, (m.sent, m.seq)) for m in members[1:]]
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
    get = table.get
    for it in items:
        keys = it.keys
        mid = keys.message_id
        node = get(mid) if mid else None
        if node is None or node.item is not None:
            # §3 step 1: no or duplicate Message-ID: a unique id of its own.
            node = Node(it, None, (it.sent, it.seq))
            table[mid if mid and mid not in table else f"\0{it.seq}"] = node
        else:
            node.item = it
            node.when = (it.sent, it.seq)
        if not keys.references:
            if node.parent is not None:
                _unlink(node)
            continue
        # (A) link the References chain, never overwriting links nor making loops.
        prev: Node | None = None
        for ref in keys.references.split("\n"):
            cur = get(ref)
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
    # Step 2: the root set. Step 4: prune dummies. After pruning only a root can be a dummy, and
    # its children are messages: ordering those is all step 5 needs (its first child is the
    # one whose subject counts); step 6 sorts every level at the end.
    roots = _prune([n for n in table.values() if n.parent is None])
    for n in roots:
        if n.item is None and n.children:
            n.children.sort(key=_WHEN)
            n.when = n.children[0].when
    roots.sort(key=_WHEN)
    # Step 5: merge roots with the same base subject. Only subjects shared by several roots need
    # the work; the others stay as they are.
    subj_of: list[str] = []
    seen: dict[str, int] = {}
    for n in roots:
        si = n.item if n.item is not None else (n.children[0].item if n.children else None)
        subj = si.keys.subject if si is not None else ""
        subj_of.append(subj)
        if subj:
            seen[subj] = seen.get(subj, 0) + 1
    shared = [i for i, subj in enumerate(subj_of) if subj and seen[subj] > 1]
    if not shared:
        _sort_tree(roots)
        return roots
    subjects: dict[str, Node] = {}
    for i in shared:
        n = roots[i]
        subj = subj_of[i]
        old = subjects.get(subj)
        if old is None:
            subjects[subj] = n
            continue
        si = n.subject_item()
        old_it = old.subject_item()
        if (n.item is None and old.item is not None) or (
                old.item is not None and n.item is not None and old_it is not None and si is not None
                and old_it.keys.reply and not si.keys.reply):
            subjects[subj] = n
    out: list[Node | None] = list(roots)
    where = {roots[i]: i for i in shared}
    for i in shared:
        n = roots[i]
        if out[i] is not n or n.parent is not None:
            continue
        subj = subj_of[i]
        c = subjects[subj]
        if c is n:
            continue
        ci = where[c]
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
            where[n] = ci
            subjects[subj] = n
        elif not c.item.keys.reply and n.item.keys.reply:
            _link(c, n)
        else:
            dummy = Node()
            _link(dummy, c)
            _link(dummy, n)
            out[ci] = dummy
            where[dummy] = ci
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
    # Leaves are skipped: a message node got its ``when`` when its message was attached.
    inner: list[Node] = []
    stack = [n for n in roots if n.children]
    while stack:
        n = stack.pop()
        inner.append(n)
        stack.extend([ch for ch in n.children if ch.children])
    for n in reversed(inner):
        kids = n.children
        if len(kids) > 1:
            kids.sort(key=_WHEN)
        if n.item is None:
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

    # Recursion happens only at branches (a thread nests as deep as it branches). A message
    # alone in its thread (most of a big mailbox) is just "(n)".
    col = 1 if uid else 0
    return "".join(f"({r.item[col]})" if r.item is not None and not r.children else "(" + one(r) + ")"
                   for r in roots)
