"""MULTISEARCH (RFC 7377): the ESEARCH command, searching several mailboxes at once.

Each mailbox is searched with the session's one matcher, ``Session._search_matches(key, sel)``,
over a read-only view of that mailbox (the process-wide ``MailboxView`` cache, as SELECT uses);
the selected mailbox is searched as the client sees it. Answers are ESEARCH responses by UID with
the TAG, MAILBOX and UIDVALIDITY correlators, one per mailbox with matches (§2.1).

Mailboxes named in the source options that do not exist are skipped without an error: §2.2 and §5
ask not to tell missing mailboxes from inaccessible ones, and the answer is the same — nothing
matched there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from postfach.errors import NotFound
from postfach.imap import commands as c
from postfach.imap import responses as r
from postfach.imap.selected import MailboxView, SelectedMailbox, ViewCache
from postfach.store.base import HIERARCHY_DELIMITER, Mailbox

if TYPE_CHECKING:
    from postfach.imap.session import Session

#: Mailboxes one ESEARCH may search (§2.4 allows a limit: NO [LIMIT] beyond it).
MAX_MAILBOXES = 1000


def _uses_saved(key: c.SearchKey) -> bool:
    if key.op == "SAVED" or (key.op in ("SEQ", "UID") and isinstance(key.args[0], c.SeqSet) and key.args[0].saved):
        return True
    return any(isinstance(a, c.SearchKey) and _uses_saved(a) for a in key.args)


def _norm(name: str) -> str:
    return "INBOX" if name.upper() == "INBOX" else name


def resolve(sources: tuple[tuple[str, tuple[str, ...]], ...], boxes: list[Mailbox],
            selected_id: int | None) -> list[Mailbox]:
    """The mailboxes the source options name (§2.2, RFC 5465 §6), in LIST order, each once."""
    want: set[int] = set()
    for filt, names in sources:
        targets = [_norm(n) for n in names]
        for mb in boxes:
            n = mb.name
            if ((filt == "SELECTED" and mb.id == selected_id)
                    or filt == "PERSONAL"
                    or (filt == "INBOXES" and n == "INBOX")
                    or (filt == "SUBSCRIBED" and mb.subscribed)
                    or (filt == "MAILBOXES" and n in targets)
                    or (filt == "SUBTREE" and any(n == t or n.startswith(t + HIERARCHY_DELIMITER) for t in targets))
                    or (filt == "SUBTREE-ONE" and any(
                        n == t or (n.startswith(t + HIERARCHY_DELIMITER)
                                   and HIERARCHY_DELIMITER not in n[len(t) + 1:]) for t in targets))):
                want.add(mb.id)
    return [mb for mb in boxes if mb.id in want]


async def _view_of(session: Session, mb: Mailbox) -> SelectedMailbox:
    """A read-only picture of a (not selected) mailbox, from the shared view cache."""
    from postfach.imap.session import VIEW_CACHE_KEY

    views: ViewCache = session.ctx.services.setdefault(VIEW_CACHE_KEY, ViewCache())
    view = views.get(mb.id)
    if view is not None and view.uidvalidity == mb.uidvalidity:
        mb = await session._catch_up(view, mb.id)
    else:
        metas = await session.store.list_messages(session.account_id, mb.id)
        view = MailboxView(mb.uidvalidity, mb.highestmodseq, metas)
        views.put(mb.id, view)
    return SelectedMailbox(mb.id, mb.name, mb.uidvalidity, mb.uidnext, view.modseq, (), True, set(), view)


async def esearch(session: Session, cmd: c.ESearch) -> None:
    from postfach.imap.session import CommandBad, CommandRefused, _partial, _uses

    sources = cmd.sources or (("SELECTED", ()),)
    only_selected = all(f == "SELECTED" for f, _ in sources)
    if any(f == "SELECTED" for f, _ in sources) and session.selected is None:
        raise CommandBad("No mailbox selected (RFC 7377 §2.2)")
    opts = cmd.return_opts or ("ALL",)  # §2.1: no result option means ALL
    if "SAVE" in opts and not only_selected:
        raise CommandBad("SAVE needs the selected mailbox as the only source (RFC 7377 §2.2)")
    if _uses_saved(cmd.key) and not only_selected:
        raise CommandBad("$ refers to the selected mailbox only (RFC 5182)")
    if cmd.charset is not None and cmd.charset not in ("UTF-8", "US-ASCII"):
        raise CommandRefused("Unsupported charset", "BADCHARSET (UTF-8 US-ASCII)")
    if session.selected is not None:
        await session._refresh(allow_expunge=True)  # UIDs only, so expunges may be told now
    sel_now = session.selected
    boxes = await session.store.list_mailboxes(session.account_id)
    targets = resolve(sources, boxes, sel_now.mailbox_id if sel_now is not None else None)
    if len(targets) > MAX_MAILBOXES:
        raise CommandRefused(f"At most {MAX_MAILBOXES} mailboxes per ESEARCH", "LIMIT")
    key = session._bind_saved(cmd.key)
    if "SAVE" in opts:
        session._saved = []  # RFC 5182 §2.1: emptied first, set when the search succeeds
    modseq_key = _uses(cmd.key, "MODSEQ")
    if modseq_key:
        session._enable_condstore()
    for mb in targets:
        if sel_now is not None and mb.id == sel_now.mailbox_id:
            sel = sel_now
        else:
            try:
                sel = await _view_of(session, mb)
            except NotFound:
                continue  # deleted meanwhile
        matches = await session._search_matches(key, sel)
        uids = [u for _, u in matches]
        if "SAVE" in opts:
            if ("MIN" in opts or "MAX" in opts) and not ({"ALL", "COUNT"} & set(opts)):
                uids_saved = sorted({*(uids[:1] if "MIN" in opts else []), *(uids[-1:] if "MAX" in opts else [])})
            else:
                uids_saved = uids
            session._saved = list(uids_saved)
            if set(opts) <= {"SAVE"}:
                continue
        if not uids:
            continue  # §2.1: no ESEARCH response for a mailbox without matches
        out = (f'* ESEARCH (TAG "{cmd.tag}" MAILBOX ').encode() + session._wire_name(sel.name)
        out += f" UIDVALIDITY {sel.uidvalidity}) UID".encode()
        if "MIN" in opts:
            out += b" MIN %d" % uids[0]
        if "MAX" in opts:
            out += b" MAX %d" % uids[-1]
        if "ALL" in opts:
            out += b" ALL " + r.uid_set(uids).encode()
        if "COUNT" in opts:
            out += b" COUNT %d" % len(uids)
        if "PARTIAL" in opts and cmd.partial is not None:
            out += b" PARTIAL " + _partial(uids, cmd.partial, ordered=False).encode()
        if modseq_key:
            # RFC 7162 §3.1.5: the highest mod-sequence of the matches.
            out += b" MODSEQ %d" % max(sel.metas[u].modseq for u in uids)
        await session._send(out + b"\r\n")
    await session._ok(cmd.tag, "ESEARCH completed")
