"""IMAP METADATA (RFC 5464): GETMETADATA and SETMETADATA for server and mailbox entries.

Entries live in the store's ``metadata`` table, per account (``store.get_metadata`` /
``set_metadata``): mailbox entries by the mailbox's id, so they follow RENAME and go with DELETE
(§4.1); server entries (mailbox "") per account as well, since no mailbox is shared between
accounts. /private and /shared are both supported everywhere, so ``[METADATA NOPRIVATE]`` never
arises. ``/shared/admin`` of the server is read-only and comes from ``imap.metadata_server_admin``.

No unsolicited METADATA responses: §4.4 requires them only after ``ENABLE METADATA``, which this
server does not enable (RFC 5161 §3.1: an unknown capability is ignored), so clients poll.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from postfach.errors import TooManyEntries
from postfach.imap import commands as c
from postfach.mail.imap import string_bytes
from postfach.types import MailboxId

if TYPE_CHECKING:
    from postfach.imap.session import Session

ADMIN_ENTRY = "/shared/admin"


def entry_problem(name: str, *, for_set: bool) -> str | None:
    """Why an entry name is invalid (§3.2: BAD in any command), or None. Names are compared in
    lower case. GETMETADATA also takes the bare scopes "/private" and "/shared" (to ask for a
    whole tree with DEPTH, as Dovecot does); SETMETADATA needs two components at least, four
    under /shared/vendor/ and /private/vendor/."""
    if not name.startswith("/"):
        return "Entry names start with /"
    if "//" in name:
        return "Entry names must not contain //"
    if name.endswith("/") and name != "/":
        return "Entry names must not end with /"
    if any(ch in "*%" for ch in name):
        return "Entry names must not contain * or %"
    if any(ord(ch) < 0x20 or ord(ch) >= 0x7F for ch in name):
        return "Entry names must be printable ASCII"
    parts = name.lower().split("/")[1:]
    if parts[0] not in ("private", "shared"):
        return "Entry names start with /private or /shared"
    if for_set:
        if len(parts) < 2:
            return "Entry names have two components at least"
        if parts[1] == "vendor" and len(parts) < 4:
            return "Vendor entry names are /private|shared/vendor/<vendor-token>/..."
    return None


def _value_bytes(value: bytes) -> bytes:
    """A value for the wire: quoted or a literal; literal8 when it holds NUL (§5 value)."""
    if b"\x00" in value:
        return b"~{%d}\r\n" % len(value) + value
    return string_bytes(value)


async def _target(session: Session, mailbox: str) -> tuple[MailboxId | None, bytes]:
    """The mailbox id (None: server entries) and the name as the response spells it."""
    if mailbox == "":
        return None, b'""'
    mb = await session._mailbox(mailbox)  # NO [NONEXISTENT] when missing
    return mb.id, session._wire_name(mb.name)


async def getmetadata(session: Session, cmd: c.GetMetadata) -> None:
    from postfach.imap.session import CommandBad

    names = []
    for e in cmd.entries:
        problem = entry_problem(e, for_set=False)
        if problem:
            raise CommandBad(f"{problem}: {e[:80]}")
        names.append(e.lower())
    mid, wire = await _target(session, cmd.mailbox)
    have = await session.store.get_metadata(session.account_id, mid)
    admin = session.config.imap.metadata_server_admin
    if mid is None and admin:
        have[ADMIN_ENTRY] = admin.encode("utf-8")
    found: dict[str, bytes | None] = {}
    for name in names:
        if name in have:
            found[name] = have[name]
        elif cmd.depth == "0":
            found.setdefault(name, None)  # asked for and absent: NIL, as Dovecot answers
        if cmd.depth != "0":
            prefix = name + "/"
            for k, v in have.items():
                if k.startswith(prefix) and (cmd.depth == "INFINITY" or "/" not in k[len(prefix):]):
                    found[k] = v
    longest = 0
    parts: list[bytes] = []
    for k in sorted(found):
        val = found[k]
        if val is not None and cmd.maxsize is not None and len(val) > cmd.maxsize:
            longest = max(longest, len(val))  # §4.2.1: left out, the biggest one reported
            continue
        parts.append(k.encode("ascii") + b" " + (b"NIL" if val is None else _value_bytes(val)))
    if parts:
        await session._send(b"* METADATA " + wire + b" (" + b" ".join(parts) + b")\r\n")
    code = f"METADATA LONGENTRIES {longest}" if longest else None
    await session._ok(cmd.tag, "GETMETADATA completed", code)


async def setmetadata(session: Session, cmd: c.SetMetadata) -> None:
    from postfach.imap.session import CommandBad, CommandRefused

    limit = session.config.imap.metadata_max_entry_bytes
    entries: dict[str, bytes | None] = {}
    for name, value in cmd.entries:
        problem = entry_problem(name, for_set=True)
        if problem:
            raise CommandBad(f"{problem}: {name[:80]}")
        entries[name.lower()] = value
    mid, _ = await _target(session, cmd.mailbox)
    # §4.3: when one entry fails nothing changes, so every check comes before the write.
    if mid is None and ADMIN_ENTRY in entries:
        raise CommandRefused("/shared/admin is read-only", "PERMISSIONDENIED")
    if any(v is not None and len(v) > limit for v in entries.values()):
        raise CommandRefused("Entry value too large", f"METADATA MAXSIZE {limit}")
    im = session.config.imap
    try:
        await session.store.set_metadata(
            session.account_id, mid, entries,
            max_mailbox_entries=im.metadata_max_mailbox_entries,
            max_account_entries=im.metadata_max_account_entries,
        )
    except TooManyEntries:
        raise CommandRefused("Too many entries", "METADATA TOOMANY") from None
    await session._ok(cmd.tag, "SETMETADATA completed")
