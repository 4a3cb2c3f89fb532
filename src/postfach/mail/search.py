"""What the full-text index and the SORT/THREAD key table store per message (made at ingest).

Both are pure functions of the message bytes and its :class:`MessageInfo`, so the store computes
them once in its ingest threads and the IMAP matcher computes the very same strings when it
confirms a candidate: the index can only ever narrow, never change, an answer.

Text is case-folded with :meth:`str.casefold` (what the IMAP matcher compares with: SEARCH is a
case-insensitive substring match, RFC 9051 §6.4.4), so a substring of the folded text is a match.
"""

from __future__ import annotations

from typing import NamedTuple

from postfach.mail.headers import decode_2047
from postfach.mail.model import Address, BodyPart, MessageInfo
from postfach.mail.sections import search_text

#: Absent header field (SEARCH SUBJECT "" must not match a message without Subject).
ABSENT = "\0"

#: Shortest needle the trigram index can narrow; shorter ones are answered by a scan.
MIN_NEEDLE = 3


def indexable(needle: str) -> bool:
    """Whether the index can answer a folded needle: three characters or more (trigrams) and no
    line break (the index keeps each distinct body line once, see ``index_text``) or NUL."""
    return len(needle) >= MIN_NEEDLE and "\n" not in needle and "\0" not in needle


def fold(s: str) -> str:
    return s.casefold()


def addresses_text(addrs: tuple[Address, ...] | None) -> str:
    """An address list as SEARCH FROM/TO/CC/BCC match it: display names decoded, ``<a@b>``."""
    if not addrs:
        return ""
    out = []
    for a in addrs:
        if a.host is None:
            if a.mailbox:
                out.append(a.mailbox + ":")
            continue
        name = decode_2047(a.name) + " " if a.name else ""
        out.append(f"{name}<{a.mailbox}@{a.host}>")
    return ", ".join(out)


def header_fields(info: MessageInfo) -> tuple[str, str, str, str, str, str]:
    """(subject, from, to, cc, bcc, sent date ISO): the first five folded, ``ABSENT`` for a
    missing field; the date is "" when there is none."""
    env = info.envelope
    vals = [fold(info.subject) if env.subject is not None else ABSENT]
    for addrs in (env.from_, env.to, env.cc, env.bcc):
        vals.append(ABSENT if addrs is None else fold(addresses_text(addrs)))
    vals.append(info.date.isoformat() if info.date is not None else "")
    return vals[0], vals[1], vals[2], vals[3], vals[4], vals[5]


def header_text(data: bytes, info: MessageInfo) -> str:
    """The top-level header, RFC 2047-decoded and folded (the header half of SEARCH TEXT)."""
    head = data[info.root.header_start : info.root.header_end]
    return fold(decode_2047(head.decode("utf-8", "replace")))


def body_text(data: bytes, info: MessageInfo) -> str:
    """Decoded, folded text of every text part (the body half of SEARCH TEXT, all of BODY)."""
    return fold(search_text(data, info))


def attachment_names(info: MessageInfo) -> str:
    """File names of the parts (Content-Disposition filename, else Content-Type name), folded,
    one per line: indexed so that a later search key can find attachments by name."""
    names: list[str] = []
    stack: list[BodyPart] = [info.root]
    while stack:
        part = stack.pop()
        stack.extend(part.children)
        if part.message is not None:
            stack.append(part.message.root)
        name = None
        if part.disposition is not None:
            name = next((v for k, v in part.disposition[1] if k.lower() == "filename"), None)
        name = name or part.param("name")
        if name:
            names.append(fold(decode_2047(name)))
    return "\n".join(names)


class IndexText(NamedTuple):
    """The index columns of one message (all folded; ``ABSENT`` marks a missing header)."""

    subject: str
    from_: str
    to: str
    cc: str
    bcc: str
    header: str
    body: str
    names: str


def index_text(data: bytes, info: MessageInfo) -> IndexText:
    """The index columns. An absent field is stored as "": no ``indexable`` needle matches it
    either. The body keeps each distinct line once, in order of first appearance: a needle
    without a line break is a substring of the text exactly when it is a substring of one of its
    lines, so the answer stays exact while quoted replies, repeated HTML rows and signatures
    cost the index (built in the store's single writer) nothing. A NUL becomes a line break
    (PostgreSQL text cannot hold it; no ``indexable`` needle spans either)."""
    s, f, t, c, b = (v.replace("\0", "\n") if v != ABSENT else "" for v in header_fields(info)[:5])
    body = "\n".join(dict.fromkeys(body_text(data, info).replace("\0", "\n").split("\n")))
    return IndexText(s, f, t, c, b, header_text(data, info).replace("\0", "\n"), body,
                     attachment_names(info).replace("\0", "\n"))


class SortRow(NamedTuple):
    """The SORT/THREAD keys of one message (RFC 5256 / RFC 5957), as stored per blob."""

    date: float | None  # sent date as a UTC timestamp; None when absent or unparsable
    from_: str  # folded addr-mailbox of the first From address
    to: str
    cc: str
    subject: str  # folded base subject (RFC 5256 §2.1)
    display_from: str
    display_to: str
    message_id: str
    references: str  # References (or In-Reply-To when there are none), one id per line
    reply: bool  # the subject had a reply/forward marker stripped (§3 subject grouping)


def sort_row(info: MessageInfo) -> SortRow:
    base = info.base_subject.casefold()
    refs = tuple(r for r in info.references if r) or ((info.in_reply_to,) if info.in_reply_to else ())
    stripped = info.subject.strip().casefold()
    return SortRow(
        date=info.date.timestamp() if info.date is not None else None,
        from_=info.from_addr.casefold(), to=info.to_addr.casefold(), cc=info.cc_addr.casefold(),
        subject=base, display_from=info.display_from.casefold(), display_to=info.display_to.casefold(),
        message_id=info.message_id, references="\n".join(refs),
        # The base subject drops "Re:", "Fwd:", "[list]" and "(fwd)"; a leading reply marker is
        # what makes a message a reply for subject grouping.
        reply=stripped != base and stripped[:3] in ("re:", "re ", "fw:", "fwd", "re["),
    )
