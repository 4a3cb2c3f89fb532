"""Export and import in standard formats: Maildir++ (Dovecot), mboxrd (Thunderbird, mutt, Dovecot) and
IMAP from another server.

Export (``postfach export ADDRESS --format maildir|mbox DIR``):

* Maildir++ as Dovecot keeps it: INBOX is ``DIR/{cur,new,tmp}``, other folders ``DIR/.Sent``,
  ``DIR/.Archive.2024`` (names in modified UTF-7, a literal ``.`` escaped as ``~2e`` and ``~`` as
  ``~7e``); flags in file names (``:2,DFPRST``, sorted), keywords as letters ``a``-``z`` with the
  ``dovecot-keywords`` table, ``dovecot-uidlist`` with UIDVALIDITY and UIDs, file mtime = INTERNALDATE.
* mboxrd: one file per folder (``DIR/INBOX``, ``DIR/Archive.sbd/2024`` as Thunderbird lays out
  subfolders), ``From `` lines quoted by one more ``>``, flags in ``Status``/``X-Status``/
  ``X-Keywords`` header lines put in front of the message (read back and removed on import).

Import reads both, plus Thunderbird's ``X-Mozilla-Status``/``X-Mozilla-Keys`` and messages marked
expunged-but-not-compacted (skipped). Message bytes are kept exactly (mbox only adds a final line end
to a message that lacks one: the format cannot tell it apart); a message with bare LF line
ends only (Dovecot and Thunderbird files) gets CRLF, the wire form. Export -> import is therefore
byte-identical for every message stored with CRLF (all mail received by SMTP), with flags,
keywords, INTERNALDATE (to the second) and folders.

Every import is idempotent: a message whose exact bytes are already in the target folder is
skipped, so a second run adds nothing. IMAP imports also remember, per source folder, its
UIDVALIDITY and the UIDs already copied (``<data>/import-state/<address>.json``), so an interrupted
run resumes without downloading again.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import email.utils
import hashlib
import imaplib
import json
import logging
import os
import re
import socket
import ssl
import sys
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from postfach.backup import Progress
from postfach.config import Config, ImapConfig
from postfach.errors import AlreadyExists, NotFound, PostfachError, QuotaExceeded, TooManyEntries, UsageError
from postfach.imap import utf7
from postfach.store.base import Mailbox, Store
from postfach.types import AccountId, MailboxId

log = logging.getLogger("postfach.transfer")

ProgressFn = Callable[[int, int], None]
AppendItem = tuple[bytes, frozenset[str], datetime | None]

# Maildir info letters (cr.yp.to/proto/maildir.html; Dovecot: P = $Forwarded).
MAILDIR_FLAGS = {"\\Draft": "D", "\\Flagged": "F", "$Forwarded": "P", "\\Answered": "R", "\\Seen": "S",
                 "\\Deleted": "T"}
MAILDIR_LETTERS = {v: k for k, v in MAILDIR_FLAGS.items()}
MBOX_BOOKKEEPING = (b"status", b"x-status", b"x-keywords", b"x-uid", b"x-imap", b"x-imapbase",
                    b"x-mozilla-status", b"x-mozilla-status2", b"x-mozilla-keys")
FROM_LINE_RE = re.compile(rb"^From (\S*) +(.*?)\r?\n?$")
ASCTIME_RE = re.compile(
    rb"(?:[A-Z][a-z]{2} +)?([A-Z][a-z]{2}) +(\d{1,2}) +(\d{1,2}):(\d{2})(?::(\d{2}))?"
    rb"(?: +[A-Z]{3,4}| +[+-]\d{4})? +(\d{4})"
)
_QUOTED_FROM_RE = re.compile(rb"^>*From ")
_MONTHS = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
                                       "Dec"), start=1)}


class TransferError(PostfachError):
    """An export or import could not go on; one line for the operator (the CLI exits 1)."""


@dataclass
class Report:
    folders: list[str] = field(default_factory=list)
    imported: int = 0
    skipped: int = 0  # already present
    problems: list[str] = field(default_factory=list)  # "file:line: what" for unreadable input
    notes: list[str] = field(default_factory=list)  # decisions worth telling (virtual folders skipped)


_ATOM_RE = re.compile(r'^[^\x00-\x20(){%*"\\\]\x7f-\U0010ffff]+$')
_SYSTEM_FLAGS = {f.lower(): f for f in ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")}


def clean_flags(flags: Iterable[str]) -> frozenset[str]:
    """System flags in their spelling, keywords that are IMAP atoms (RFC 9051 §9 flag-keyword); the
    rest (\\Recent, junk from mbox headers) is dropped."""
    out: set[str] = set()
    for f in flags:
        if f.startswith("\\"):
            if f.lower() in _SYSTEM_FLAGS:
                out.add(_SYSTEM_FLAGS[f.lower()])
        elif _ATOM_RE.match(f):
            out.add(f)
    return frozenset(out)


def to_crlf(data: bytes) -> bytes:
    """Bare-LF files (Dovecot, Thunderbird) get CRLF; anything with a CRLF already is kept as is."""
    if b"\n" in data and b"\r\n" not in data:
        return data.replace(b"\n", b"\r\n")
    return data


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------- store-side helpers


class _Target:
    """Appends into one account's folders, creating them (and parents) on first use, skipping
    messages whose bytes are already in the folder, in batches."""

    def __init__(self, store: Store, account_id: AccountId, report: Report) -> None:
        self.store = store
        self.account_id = account_id
        self.report = report
        self._boxes: dict[str, tuple[MailboxId, set[str]]] = {}  # folder -> (id, sha256 of its messages)

    async def special(self, use: str) -> str | None:
        for mb in await self.store.list_mailboxes(self.account_id):
            if (mb.special_use or "").lower() == use.lower():
                return mb.name
        return None

    async def folder(self, name: str) -> tuple[MailboxId, set[str]]:
        if name in self._boxes:
            return self._boxes[name]
        parts = name.split("/")
        mb: Mailbox | None = None
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            mb = await self.store.get_mailbox(self.account_id, sub)
            if mb is None:
                try:
                    mb = await self.store.create_mailbox(self.account_id, sub)
                    await self.store.set_subscribed(self.account_id, sub, True)
                except AlreadyExists:
                    mb = await self.store.get_mailbox(self.account_id, sub)
                    assert mb is not None
        assert mb is not None
        present: set[str] = {str(m.blob_id) for m in await self.store.list_messages(self.account_id, MailboxId(mb.id))}
        self._boxes[name] = (MailboxId(mb.id), present)
        if mb.name not in self.report.folders:
            self.report.folders.append(mb.name)
        return self._boxes[name]

    async def add(self, name: str, items: Sequence[AppendItem]) -> list[bool]:
        """Append what is new; returns per item whether it was appended (False: already there)."""
        mid, present = await self.folder(name)
        fresh: list[AppendItem] = []
        added: list[bool] = []
        for data, flags, idate in items:
            h = _sha(data)
            if h in present:
                added.append(False)
                continue
            present.add(h)
            fresh.append((data, clean_flags(flags), idate))
            added.append(True)
        if fresh:
            try:
                await self.store.append_many(self.account_id, mid, fresh)
            except QuotaExceeded as exc:
                raise TransferError(
                    f"import stopped at folder {name!r}: {exc} - raise the quota with `postfach user quota`"
                ) from None
        self.report.imported += len(fresh)
        self.report.skipped += len(items) - len(fresh)
        return added


class _Batcher:
    def __init__(self, target: _Target, name: str, limit: int = 100, max_bytes: int = 16 << 20) -> None:
        self.target, self.name, self.limit, self.max_bytes = target, name, limit, max_bytes
        self.items: list[AppendItem] = []
        self.size = 0

    async def put(self, item: AppendItem) -> None:
        self.items.append(item)
        self.size += len(item[0])
        if len(self.items) >= self.limit or self.size >= self.max_bytes:
            await self.flush()

    async def flush(self) -> None:
        if self.items:
            await self.target.add(self.name, self.items)
            self.items, self.size = [], 0


# ---------------------------------------------------------------------------------------- Maildir


def maildir_dirname(name: str) -> str:
    """Folder name -> Maildir++ folder (``.A.B``); INBOX is the root (``""``)."""
    if name == "INBOX":
        return ""
    comps = [utf7.encode(c).replace("~", "~7e").replace(".", "~2e") for c in name.split("/")]
    return "." + ".".join(comps)


def maildir_foldername(dirname: str) -> str:
    """Maildir++ folder (``.A.B``) -> folder name."""
    comps = dirname[1:].split(".")
    out = []
    for c in comps:
        c = c.replace("~2e", ".").replace("~2E", ".").replace("~7e", "~").replace("~7E", "~")
        out.append(utf7.decode_lenient(c))
    name = "/".join(out)
    return "INBOX" if name.upper() == "INBOX" else name


def _maildir_info(flags: frozenset[str], keywords: list[str]) -> str:
    letters = [MAILDIR_FLAGS[f] for f in flags if f in MAILDIR_FLAGS]
    for f in flags:
        if f not in MAILDIR_FLAGS and not f.startswith("\\") and f in keywords:
            letters.append(chr(ord("a") + keywords.index(f)))
    return "".join(sorted(letters))


async def export_maildir(
    store: Store, account_id: AccountId, dest: Path, *, hostname: str = "", progress: ProgressFn | None = None
) -> Report:
    report = Report()
    host = (hostname or socket.gethostname()).replace("/", "\\057").replace(":", "\\072")
    boxes = await store.list_mailboxes(account_id)
    total = sum([(await store.mailbox_status(account_id, MailboxId(mb.id))).messages for mb in boxes])
    done = 0
    subs = await store.list_subscriptions(account_id)
    for mb in sorted(boxes, key=lambda b: b.name):
        folder = dest / maildir_dirname(mb.name)
        for sub in ("cur", "new", "tmp"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        if mb.name != "INBOX":
            (folder / "maildirfolder").touch()
        metas = await store.list_messages(account_id, MailboxId(mb.id))
        keywords = sorted({f for m in metas for f in m.flags if not f.startswith("\\") and f not in MAILDIR_FLAGS})
        if len(keywords) > 26:
            report.problems.append(f"{mb.name}: {len(keywords) - 26} keywords beyond the 26 Maildir letters dropped")
            keywords = keywords[:26]
        if keywords:
            (folder / "dovecot-keywords").write_text("".join(f"{i} {k}\n" for i, k in enumerate(keywords)), "utf-8")
        uidlist = [f"3 V{mb.uidvalidity} N{mb.uidnext}\n"]
        for meta in metas:
            data = await store.read_message(account_id, MailboxId(mb.id), meta.uid)
            ts = int(meta.internaldate.timestamp())
            base = f"{ts}.M{int(meta.uid)}P{os.getpid()}V{mb.uidvalidity:x}.{host},S={len(data)}"
            fname = f"{base}:2,{_maildir_info(meta.flags, keywords)}"
            tmp = folder / "tmp" / base
            tmp.write_bytes(data)
            os.utime(tmp, (ts, ts))
            os.replace(tmp, folder / "cur" / fname)
            uidlist.append(f"{int(meta.uid)} :{base}\n")
            done += 1
            if progress is not None:
                progress(done, total)
        (folder / "dovecot-uidlist").write_text("".join(uidlist), "utf-8")
        report.folders.append(mb.name)
        report.imported += len(metas)
    (dest / "subscriptions").write_text(
        "".join(maildir_dirname(s)[1:] + "\n" for s in subs if s != "INBOX"), "utf-8"
    )
    await _export_metadata(store, account_id, boxes, dest)
    return report


METADATA_FILE = "postfach-metadata.json"


async def _export_metadata(store: Store, account_id: AccountId, boxes: Sequence[Mailbox], dest: Path) -> None:
    """IMAP METADATA entries (RFC 5464) beside the Maildir, for ``import`` to put back: a JSON
    list of {"mailbox": name ("" = server), "entry": name, "value" or "base64": the octets}."""
    out: list[dict[str, str]] = []
    for name, mid in [("", None)] + [(mb.name, MailboxId(mb.id)) for mb in sorted(boxes, key=lambda b: b.name)]:
        for entry, value in sorted((await store.get_metadata(account_id, mid)).items()):
            item = {"mailbox": name, "entry": entry}
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            if text is not None and "\x00" not in text:
                item["value"] = text
            else:
                item["base64"] = base64.b64encode(value).decode("ascii")
            out.append(item)
    if out:
        (dest / METADATA_FILE).write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", "utf-8")


async def _import_metadata(target: _Target, root: Path, folder: str | None) -> None:
    path = root / METADATA_FILE
    if not path.is_file():
        return
    report = target.report
    try:
        items = json.loads(path.read_text("utf-8"))
        if not isinstance(items, list):
            raise ValueError("not a list")
        entries: dict[str, dict[str, bytes]] = {}
        for it in items:
            raw = it["value"].encode("utf-8") if "value" in it else base64.b64decode(it["base64"], validate=True)
            entries.setdefault(str(it["mailbox"]), {})[str(it["entry"]).lower()] = raw
    except (OSError, ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        report.problems.append(f"{path}: unreadable METADATA entries ({exc}), skipped")
        return
    lim = ImapConfig()
    for name, values in entries.items():
        mid: MailboxId | None = None
        if name:
            dest = name if folder is None else (folder if name == "INBOX" else f"{folder}/{name}")
            mid, _ = await target.folder(dest)
        try:
            await target.store.set_metadata(
                target.account_id, mid, values,
                max_mailbox_entries=lim.metadata_max_mailbox_entries,
                max_account_entries=lim.metadata_max_account_entries,
            )
        except (TooManyEntries, NotFound) as exc:
            report.problems.append(f"METADATA of {name or 'the server'}: not imported ({exc})")


def _maildir_folders(root: Path) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    if (root / "cur").is_dir() or (root / "new").is_dir():
        out.append(("INBOX", root))
    for p in sorted(root.iterdir()):
        if p.is_dir() and p.name.startswith(".") and p.name not in (".", "..") and (
            (p / "cur").is_dir() or (p / "new").is_dir()
        ):
            out.append((maildir_foldername(p.name), p))
    return out


def _read_keywords(folder: Path) -> dict[str, str]:
    path = folder / "dovecot-keywords"
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text("utf-8", errors="replace").splitlines():
            idx, _, kw = line.partition(" ")
            if idx.isdigit() and kw and int(idx) < 26:
                out[chr(ord("a") + int(idx))] = kw.strip()
    return out


def _uid_order(folder: Path) -> dict[str, int]:
    path = folder / "dovecot-uidlist"
    order: dict[str, int] = {}
    if path.is_file():
        for line in path.read_text("utf-8", errors="replace").splitlines()[1:]:
            uid, _, rest = line.partition(" ")
            base = rest.rpartition(":")[2] if ":" in rest else rest
            if uid.isdigit():
                order[base.strip()] = int(uid)
    return order


def maildir_flags(filename: str, keywords: dict[str, str], *, in_new: bool) -> frozenset[str]:
    _, sep, info = filename.rpartition(":2,")
    flags: set[str] = set()
    if sep:
        for ch in info:
            if ch in MAILDIR_LETTERS:
                flags.add(MAILDIR_LETTERS[ch])
            elif ch in keywords:
                flags.add(keywords[ch])
    del in_new
    return frozenset(flags)


async def import_maildir(
    store: Store, account_id: AccountId, root: Path, *, folder: str | None = None,
    max_bytes: int = 0, progress: ProgressFn | None = None,
) -> Report:
    report = Report()
    target = _Target(store, account_id, report)
    folders = _maildir_folders(root)
    if not folders:
        raise TransferError(f"{root}: not a Maildir (no cur/ or new/ folder, no .Folder subfolders)")
    files: list[tuple[str, Path, bool, dict[str, str]]] = []
    for name, path in folders:
        kw = _read_keywords(path)
        order = _uid_order(path)
        entries: list[tuple[int, float, str, Path, bool]] = []
        for sub, in_new in (("cur", False), ("new", True)):
            d = path / sub
            if not d.is_dir():
                continue
            for f in d.iterdir():
                if not f.is_file() or f.name.startswith("."):
                    continue
                base = f.name.partition(":")[0]
                entries.append((order.get(base, 1 << 62), f.stat().st_mtime, f.name, f, in_new))
        entries.sort()
        dest = name if folder is None else (folder if name == "INBOX" else f"{folder}/{name}")
        files.extend((dest, f, in_new, kw) for _, _, _, f, in_new in entries)
    batchers: dict[str, _Batcher] = {}
    for i, (dest, f, in_new, kw) in enumerate(files):
        try:
            data = f.read_bytes()
        except OSError as exc:
            report.problems.append(f"{f}: unreadable ({exc.strerror}), skipped")
            continue
        if max_bytes and len(data) > max_bytes:
            report.problems.append(f"{f}: {len(data)} bytes is over the message size limit, skipped")
            continue
        if not data.strip():
            report.problems.append(f"{f}: empty file, skipped")
            continue
        idate = datetime.fromtimestamp(int(f.stat().st_mtime), UTC)
        b = batchers.setdefault(dest, _Batcher(target, dest))
        await b.put((to_crlf(data), maildir_flags(f.name, kw, in_new=in_new), idate))
        if progress is not None:
            progress(i + 1, len(files))
    for b in batchers.values():
        await b.flush()
    await _import_metadata(target, root, folder)
    return report


# ------------------------------------------------------------------------------------------- mbox


def mbox_path(dest: Path, name: str) -> Path:
    """Folder name -> mbox file, Thunderbird style: ``Archive/2024`` -> ``Archive.sbd/2024``."""
    parts = name.split("/")
    return dest.joinpath(*[p + ".sbd" for p in parts[:-1]], parts[-1])


def _line_end(data: bytes) -> bytes:
    i = data.find(b"\n")
    return b"\r\n" if i > 0 and data[i - 1 : i] == b"\r" else b"\n"


def mbox_entry(data: bytes, flags: frozenset[str], internaldate: datetime, sender: str = "MAILER-DAEMON") -> bytes:
    """One mboxrd entry: From_ line, flag headers in front, quoted body, a blank line after."""
    eol = _line_end(data)
    status = "RO" if "\\Seen" in flags else "O"
    xstatus = "".join(c for f, c in (("\\Answered", "A"), ("\\Flagged", "F"), ("\\Draft", "T"), ("\\Deleted", "D"))
                      if f in flags)
    keywords = sorted(f for f in flags if not f.startswith("\\"))
    head = [f"Status: {status}"]
    if xstatus:
        head.append(f"X-Status: {xstatus}")
    if keywords:
        head.append("X-Keywords: " + " ".join(keywords))
    when = internaldate.astimezone(UTC).strftime("%a %b %d %H:%M:%S %Y")
    out = [f"From {sender} {when}\n".encode()]
    out += [h.encode("utf-8") + eol for h in head]
    for line in _lines(data):
        out.append(b">" + line if _QUOTED_FROM_RE.match(line) else line)
    if not data.endswith(b"\n"):
        out.append(eol)  # mbox cannot keep a missing final line end: the one thing not byte-exact
    out.append(b"\n")
    return b"".join(out)


async def export_mbox(
    store: Store, account_id: AccountId, dest: Path, *, progress: ProgressFn | None = None
) -> Report:
    report = Report()
    boxes = await store.list_mailboxes(account_id)
    total = sum([(await store.mailbox_status(account_id, MailboxId(mb.id))).messages for mb in boxes])
    done = 0
    for mb in sorted(boxes, key=lambda b: b.name):
        path = mbox_path(dest, mb.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        metas = await store.list_messages(account_id, MailboxId(mb.id))
        with path.open("ab") as f:
            for meta in metas:
                data = await store.read_message(account_id, MailboxId(mb.id), meta.uid)
                f.write(mbox_entry(data, meta.flags, meta.internaldate))
                done += 1
                if progress is not None:
                    progress(done, total)
        report.folders.append(mb.name)
        report.imported += len(metas)
    return report


def _lines(data: bytes) -> list[bytes]:
    """Split after each LF only (a lone CR is not a line end in mbox), ends kept."""
    parts = data.split(b"\n")
    out = [p + b"\n" for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


def _from_line_date(rest: bytes) -> datetime | None:
    m = ASCTIME_RE.search(rest)
    if not m or m.group(1).decode() not in _MONTHS:
        return None
    try:
        return datetime(int(m.group(6)), _MONTHS[m.group(1).decode()], int(m.group(2)), int(m.group(3)),
                        int(m.group(4)), int(m.group(5) or 0), tzinfo=UTC)
    except ValueError:
        return None


def is_from_line(line: bytes) -> bool:
    m = FROM_LINE_RE.match(line)
    return bool(m) and _from_line_date(m.group(2) if m else b"") is not None


@dataclass
class MboxMessage:
    line: int  # line number of its From_ line
    data: bytes
    flags: frozenset[str]
    internaldate: datetime | None
    expunged: bool = False


def _split_headers(data: bytes) -> tuple[list[bytes], bytes]:
    """Header lines (with their folded continuations joined into one entry) and the rest."""
    lines = data.splitlines(keepends=True)
    fields: list[bytes] = []
    i = 0
    for i, line in enumerate(lines):  # noqa: B007 - i is used after the loop
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    else:
        i = len(lines)
    return fields, b"".join(lines[i:])


def mbox_flags(data: bytes) -> tuple[bytes, frozenset[str], bool]:
    """Read and remove the mbox bookkeeping headers; returns (message, flags, expunged)."""
    fields, rest = _split_headers(data)
    flags: set[str] = set()
    expunged = False
    kept: list[bytes] = []
    for fld in fields:
        name, colon, value = fld.partition(b":")
        key = name.strip().lower()
        if not colon or key not in MBOX_BOOKKEEPING:
            kept.append(fld)
            continue
        v = value.strip().decode("latin-1")
        if key == b"status":
            if "R" in v:
                flags.add("\\Seen")
        elif key == b"x-status":
            for ch, f in (("A", "\\Answered"), ("F", "\\Flagged"), ("T", "\\Draft"), ("D", "\\Deleted")):
                if ch in v:
                    flags.add(f)
        elif key in (b"x-keywords", b"x-mozilla-keys"):
            flags.update(k for k in re.split(r"[\s,]+", v) if k)
        elif key == b"x-mozilla-status":
            try:
                bits = int(v, 16)
            except ValueError:
                continue
            for bit, f in ((0x1, "\\Seen"), (0x2, "\\Answered"), (0x4, "\\Flagged"), (0x1000, "$Forwarded")):
                if bits & bit:
                    flags.add(f)
            expunged = bool(bits & 0x8)
    return b"".join(kept) + rest, frozenset(flags), expunged


def _header_date(data: bytes) -> datetime | None:
    fields, _ = _split_headers(data)
    for fld in fields:
        name, _, value = fld.partition(b":")
        if name.strip().lower() == b"date":
            try:
                dt = email.utils.parsedate_to_datetime(value.decode("latin-1").strip())
            except (TypeError, ValueError, IndexError):
                return None
            return dt if dt.tzinfo else dt.replace(tzinfo=UTC)
    return None


def parse_mbox(lines: Iterable[bytes], where: str, problems: list[str]) -> Iterator[MboxMessage]:
    """mboxrd/mboxo reader over lines (LF-terminated, e.g. a binary file): tolerant; what it cannot
    read goes to ``problems`` with line numbers. Holds one message in memory at a time."""
    n = 0
    current: list[bytes] | None = None
    start = 0
    date: datetime | None = None
    stray_from: int | None = None

    def finish(end_line: int) -> MboxMessage | None:
        assert current is not None
        body = list(current)
        if body and body[-1] in (b"\n", b"\r\n"):
            body.pop()  # the blank line that separates entries
        data = b"".join(body)
        if not data.strip():
            problems.append(f"{where}:{start}: empty message, skipped")
            return None
        first = data.split(b"\n", 1)[0]
        if b":" not in first or first[:1] in (b" ", b"\t") or not re.match(rb"^[!-9;-~]+:", first):
            problems.append(f"{where}:{start}-{end_line}: no header at the start of the message, skipped")
            return None
        msg, flags, expunged = mbox_flags(data)
        return MboxMessage(start, msg, flags, date or _header_date(msg), expunged)

    for n, line in enumerate(lines, start=1):
        # A From_ line separates entries when it looks like one (sender and asctime date) and
        # starts the file or follows a blank line (RFC 4155 §2); anything else is body text.
        if (
            line.startswith(b"From ")
            and (current is None or not current or current[-1] in (b"\n", b"\r\n"))
            and is_from_line(line)
        ):
            if current is not None:
                m = finish(n - 1)
                if m is not None:
                    yield m
            elif stray_from is not None:
                problems.append(f"{where}:{stray_from}-{n - 1}: text before the first 'From ' line, skipped")
            current, start = [], n
            m2 = FROM_LINE_RE.match(line)
            date = _from_line_date(m2.group(2)) if m2 else None
            continue
        if current is None:
            if stray_from is None:
                stray_from = n
            continue
        if line.startswith(b">") and _QUOTED_FROM_RE.match(line):
            line = line[1:]
        current.append(line)
    if current is not None:
        m = finish(n)
        if m is not None:
            yield m
    elif stray_from is not None:
        problems.append(f"{where}:{stray_from}-{n}: no 'From ' line at all: not an mbox file, skipped")


def _mbox_files(root: Path) -> list[tuple[str, Path]]:
    if root.is_file():
        name = root.name
        return [("INBOX" if name.lower() in ("inbox", "inbox.mbox") else name.removesuffix(".mbox"), root)]
    out: list[tuple[str, Path]] = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name.startswith(".") or p.suffix in (".msf", ".dat", ".json", ".sqlite"):
            continue
        if p.name in ("dovecot-uidlist", "dovecot-keywords", "subscriptions", "msgFilterRules.dat"):
            continue
        rel = p.relative_to(root)
        parts = [q.removesuffix(".sbd") for q in rel.parts]
        parts[-1] = parts[-1].removesuffix(".mbox")
        name = "/".join(parts)
        out.append(("INBOX" if name.upper() == "INBOX" else name, p))
    return out


async def import_mbox(
    store: Store, account_id: AccountId, root: Path, *, folder: str | None = None,
    max_bytes: int = 0, progress: ProgressFn | None = None,
) -> Report:
    report = Report()
    target = _Target(store, account_id, report)
    files = _mbox_files(root)
    if not files:
        raise TransferError(f"{root}: no mbox files found")
    for fi, (name, path) in enumerate(files):
        dest = name if folder is None else (folder if len(files) == 1 or name == "INBOX" else f"{folder}/{name}")
        try:
            f = path.open("rb")
        except OSError as exc:
            report.problems.append(f"{path}: unreadable ({exc.strerror}), skipped")
            continue
        if path.stat().st_size == 0:
            f.close()
            continue
        batch = _Batcher(target, dest)
        with f:  # streamed: one message in memory at a time, appended in batches
            for msg in parse_mbox(f, str(path), report.problems):
                if msg.expunged:
                    continue  # Thunderbird: deleted, not yet compacted away
                if max_bytes and len(msg.data) > max_bytes:
                    report.problems.append(f"{path}:{msg.line}: {len(msg.data)} bytes is over the size limit, skipped")
                    continue
                await batch.put((to_crlf(msg.data), msg.flags, msg.internaldate))
        await batch.flush()
        if progress is not None:
            progress(fi + 1, len(files))
    return report


# ------------------------------------------------------------------------------------------- IMAP


@dataclass(frozen=True)
class ImapSource:
    scheme: str  # "imaps" (implicit TLS) or "imap" (STARTTLS)
    user: str
    host: str
    port: int

    @property
    def key(self) -> str:
        return f"{self.scheme}://{self.user}@{self.host}:{self.port}"


def parse_imap_url(url: str) -> ImapSource:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("imaps", "imap"):
        raise UsageError(f"{url!r}: use imaps://USER@HOST[:PORT] (or imap:// for STARTTLS)")
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if not at or not userinfo or not hostport:
        raise UsageError(f"{url!r}: the URL needs a user name: imaps://USER@HOST[:PORT]")
    if hostport.startswith("["):  # [IPv6]:port
        host, _, rest = hostport[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif hostport.count(":") == 1:
        host, _, port_s = hostport.partition(":")
    else:
        host, port_s = hostport, ""
    if port_s and not port_s.isdigit():
        raise UsageError(f"{url!r}: bad port {port_s!r}")
    port = int(port_s) if port_s else (993 if parts.scheme == "imaps" else 143)
    return ImapSource(parts.scheme, urllib.parse.unquote(userinfo), host, port)


_LIST_RE = re.compile(rb'^\((?P<flags>[^)]*)\) (?P<delim>"(?:[^"\\]|\\.)*"|NIL) (?P<name>.*)$')
_FETCH_UID_RE = re.compile(rb"UID (\d+)")
_FETCH_FLAGS_RE = re.compile(rb"FLAGS \(([^)]*)\)")
_FETCH_DATE_RE = re.compile(rb'INTERNALDATE "([^"]+)"')
SPECIAL_USES = ("\\Sent", "\\Drafts", "\\Trash", "\\Junk", "\\Archive", "\\All", "\\Flagged")
VIRTUAL_USES = ("\\All", "\\Flagged")  # views of other folders (Gmail "All Mail"): copying them doubles mail


def _unquote(tok: bytes) -> str:
    if tok.startswith(b'"') and tok.endswith(b'"'):
        tok = re.sub(rb"\\(.)", rb"\1", tok[1:-1])
    return tok.decode("utf-8", errors="replace")


def _imap_folders(conn: imaplib.IMAP4) -> list[tuple[str, str, str | None]]:
    """(wire name, our name, special use) for every selectable folder."""
    typ, data = conn.list()
    if typ != "OK":
        raise TransferError(f"LIST failed: {data!r}")
    out: list[tuple[str, str, str | None]] = []
    for item in data:
        if item is None:
            continue
        if isinstance(item, tuple):
            head, name_b = item[0], item[1]
            m = _LIST_RE.match(head.rsplit(b" ", 1)[0] + b" x")
            wire = name_b.decode("utf-8", errors="replace")
        else:
            m = _LIST_RE.match(item)
            wire = _unquote(m.group("name")) if m else ""
        if not m:
            continue
        flags = m.group("flags").decode().split()
        if any(f.lower() in ("\\noselect", "\\nonexistent") for f in flags):
            continue
        delim = _unquote(m.group("delim")) if m.group("delim") != b"NIL" else ""
        name = utf7.decode_lenient(wire)
        if delim and delim != "/":
            name = name.replace("/", "_").replace(delim, "/")
        if name.upper() == "INBOX":
            name = "INBOX"
        use = next((u for u in SPECIAL_USES if u.lower() in (f.lower() for f in flags)), None)
        out.append((wire, name, use))
    return out


def _quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


class ImportState:
    """Per source folder: UIDVALIDITY and the UIDs already copied (JSON, replaced atomically)."""

    def __init__(self, path: Path, source: str) -> None:
        self.path = path
        self.source = source
        self.data: dict[str, Any] = {}
        if path.is_file():
            try:
                self.data = json.loads(path.read_text("utf-8"))
            except (OSError, json.JSONDecodeError):
                log.warning("import state %s unreadable: starting over (duplicates are still skipped)", path)
                self.data = {}

    def folder(self, name: str, uidvalidity: int) -> set[int]:
        entry = self.data.setdefault(self.source, {}).get(name)
        if not entry or entry.get("uidvalidity") != uidvalidity:
            entry = {"uidvalidity": uidvalidity, "uids": []}
            self.data[self.source][name] = entry
        return set(entry["uids"])

    def mark(self, name: str, uids: set[int]) -> None:
        self.data[self.source][name]["uids"] = sorted(uids)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(self.data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _imap_connect(src: ImapSource, insecure: bool, cafile: str | None, timeout: float) -> imaplib.IMAP4:
    ctx = ssl.create_default_context(cafile=cafile)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    try:
        if src.scheme == "imaps":
            return imaplib.IMAP4_SSL(src.host, src.port, ssl_context=ctx, timeout=timeout)
        conn = imaplib.IMAP4(src.host, src.port, timeout=timeout)
        conn.starttls(ssl_context=ctx)
        return conn
    except ssl.SSLCertVerificationError as exc:
        raise TransferError(
            f"{src.host}: certificate not trusted ({exc.verify_message}); use --insecure only if you know why"
        ) from None
    except (OSError, imaplib.IMAP4.error) as exc:
        raise TransferError(f"cannot connect to {src.host}:{src.port}: {exc}") from None


def _fetch_batch(conn: imaplib.IMAP4, uids: list[int]) -> list[tuple[int, bytes, frozenset[str], datetime | None]]:
    typ, data = conn.uid("FETCH", ",".join(map(str, uids)), "(UID FLAGS INTERNALDATE BODY.PEEK[])")
    if typ != "OK":
        raise TransferError(f"UID FETCH failed: {data!r}")
    # imaplib gives (text before the literal, literal) and then the text after it as plain bytes;
    # servers may put FLAGS or INTERNALDATE after BODY[] (RFC 9051 §7.5.2 fixes no order).
    entries: list[list[bytes]] = []
    for item in data:
        if isinstance(item, tuple):
            entries.append([item[0], item[1], b""])
        elif isinstance(item, bytes) and entries:
            entries[-1][2] += item
    out = []
    for head_part, body, tail in entries:
        head = head_part + b" " + tail
        m_uid = _FETCH_UID_RE.search(head)
        if m_uid is None:
            continue
        m_flags = _FETCH_FLAGS_RE.search(head)
        flags = frozenset(m_flags.group(1).decode().split()) if m_flags else frozenset()
        m_date = _FETCH_DATE_RE.search(head)
        idate = None
        if m_date:
            try:
                idate = datetime.strptime(m_date.group(1).decode().strip(), "%d-%b-%Y %H:%M:%S %z")
            except ValueError:
                idate = None
        out.append((int(m_uid.group(1)), body, flags, idate))
    return out


def _uidvalidity(conn: imaplib.IMAP4) -> int:
    data = conn.untagged_responses.get("UIDVALIDITY") or [b"0"]
    last = data[-1]
    try:
        return int(last if isinstance(last, bytes) else last[0])
    except (TypeError, ValueError):
        return 0


async def import_imap(
    store: Store, account_id: AccountId, src: ImapSource, password: str, state_path: Path, *,
    insecure: bool = False, cafile: str | None = None, timeout: float = 60, batch: int = 50,
    progress: ProgressFn | None = None,
) -> Report:
    """Copy every selectable folder of ``src`` with flags and INTERNALDATE. Resumable: UIDs copied are
    recorded after each batch is durable in our store."""
    report = Report()
    target = _Target(store, account_id, report)
    state = ImportState(state_path, src.key)
    conn = await asyncio.to_thread(_imap_connect, src, insecure, cafile, timeout)
    try:
        try:
            await asyncio.to_thread(conn.login, src.user, password)
        except imaplib.IMAP4.error as exc:
            raise TransferError(f"login as {src.user} at {src.host} failed: {exc}") from None
        folders = await asyncio.to_thread(_imap_folders, conn)
        for wire, name, use in folders:
            if use in VIRTUAL_USES:
                report.notes.append(f"{name}: a virtual {use} folder (a view of the others), not copied")
                continue
            dest = name
            if use is not None and name != "INBOX":
                ours = await target.special(use)
                if ours is not None:
                    dest = ours
            typ, data = await asyncio.to_thread(conn.select, _quote(wire), True)
            if typ != "OK":
                report.problems.append(f"{name}: cannot select ({data!r}), skipped")
                continue
            uidvalidity = _uidvalidity(conn)
            done = state.folder(name, uidvalidity)
            typ, data = await asyncio.to_thread(conn.uid, "SEARCH", "ALL")
            if typ != "OK":
                report.problems.append(f"{name}: UID SEARCH failed, skipped")
                continue
            uids = sorted(int(x) for x in (data[0] or b"").split())
            todo = [u for u in uids if u not in done]
            await target.folder(dest)
            report.skipped += len(uids) - len(todo)
            for i in range(0, len(todo), batch):
                chunk = todo[i : i + batch]
                got = await asyncio.to_thread(_fetch_batch, conn, chunk)
                await target.add(dest, [(to_crlf(b), f, d) for _, b, f, d in got])
                done.update(u for u, _, _, _ in got)
                state.mark(name, done)
                if progress is not None:
                    progress(min(i + batch, len(todo)), len(todo))
            state.mark(name, done)
        with_logout = True
    finally:
        try:
            await asyncio.to_thread(conn.logout)
        except (OSError, imaplib.IMAP4.error):
            with_logout = False
    del with_logout
    return report


# -------------------------------------------------------------------------------------------- CLI


def _run(config: Config, address: str, fn: Callable[[Store, AccountId], Any]) -> Any:
    from postfach.store import open_store

    async def run() -> Any:
        store = open_store(config)
        await store.open()
        try:
            acct = await store.get_account(address)
            if acct is None:
                raise UsageError(f"no account {address}")
            return await fn(store, AccountId(acct.id))
        finally:
            await store.close()

    return asyncio.run(run())


def _print_report(verb: str, address: str, rep: Report) -> int:
    for note in rep.notes:
        print(f"note: {note}", file=sys.stderr)
    for p in rep.problems:
        print(f"warning: {p}", file=sys.stderr)
    more = f", {rep.skipped} already there" if rep.skipped else ""
    print(f"{verb} {rep.imported} messages in {len(rep.folders)} folders for {address}{more}")
    if rep.problems:
        print(f"{len(rep.problems)} part(s) of the input could not be read (listed above)", file=sys.stderr)
        return 1
    return 0


def cmd_export(args: argparse.Namespace, config: Config) -> int:
    from postfach.cli import normalize_address

    address = normalize_address(args.address)
    dest = Path(args.dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UsageError(f"{dest} exists and is not an empty folder")
    dest.mkdir(parents=True, exist_ok=True)
    bar = Progress("export")

    async def run(store: Store, account_id: AccountId) -> Report:
        if args.format == "maildir":
            return await export_maildir(store, account_id, dest, hostname=config.hostname, progress=bar)
        return await export_mbox(store, account_id, dest, progress=bar)

    try:
        rep: Report = _run(config, address, run)
    except OSError as exc:
        bar.close()
        print(f"postfach: export failed: {exc.strerror or exc} ({exc.filename or dest})", file=sys.stderr)
        return 1
    bar.close()
    return _print_report("Exported", address, rep)


def cmd_import(args: argparse.Namespace, config: Config) -> int:
    from postfach.cli import normalize_address

    address = normalize_address(args.address)
    if bool(args.imap) == bool(args.format):
        raise UsageError("import needs either --format maildir|mbox PATH or --imap imaps://USER@HOST")
    bar = Progress("import")
    limit = config.limits.max_message_bytes
    if args.imap:
        if args.path:
            raise UsageError("--imap takes no PATH")
        src = parse_imap_url(args.imap)
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        elif sys.stdin.isatty():
            import getpass

            password = getpass.getpass(f"Password of {src.user} at {src.host}: ")
        else:
            raise UsageError("no terminal to ask for the password: use --password-stdin")
        state = config.data_dir / "import-state" / f"{address}.json"

        async def run_imap(store: Store, account_id: AccountId) -> Report:
            return await import_imap(store, account_id, src, password, state, insecure=args.insecure,
                                     cafile=args.cafile, progress=bar)

        fn: Callable[[Store, AccountId], Any] = run_imap
    else:
        if not args.path:
            raise UsageError(f"--format {args.format} needs a PATH to import from")
        path = Path(args.path)
        if not path.exists():
            raise UsageError(f"{path}: no such file or folder")

        async def run_files(store: Store, account_id: AccountId) -> Report:
            if args.format == "maildir":
                return await import_maildir(store, account_id, path, folder=args.folder, max_bytes=limit,
                                            progress=bar)
            return await import_mbox(store, account_id, path, folder=args.folder, max_bytes=limit, progress=bar)

        fn = run_files
    try:
        rep: Report = _run(config, address, fn)
    except TransferError as exc:
        bar.close()
        print(f"postfach: {exc}", file=sys.stderr)
        return 1
    bar.close()
    return _print_report("Imported", address, rep)


class _FormatAction(argparse.Action):
    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        vals = list(values)
        if vals[0] not in ("maildir", "mbox"):
            parser.error(f"--format: {vals[0]!r} is not maildir or mbox")
        if len(vals) > 2:
            parser.error(f"--format: one PATH only, got {' '.join(vals[1:])}")
        setattr(namespace, self.dest, vals[0])
        if len(vals) == 2:
            if getattr(namespace, "path", None):
                parser.error("two PATHs given")
            namespace.path = vals[1]


def add_parsers(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser | None = None) -> None:
    parents = [common] if common is not None else []
    s = sub.add_parser("export", parents=parents, help="write an account's mail as Maildir++ or mbox")
    s.add_argument("address", metavar="ADDRESS")
    s.add_argument("--format", choices=("maildir", "mbox"), required=True)
    s.add_argument("dir", metavar="DIR", help="a new or empty folder")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser(
        "import", parents=parents, help="import mail from Maildir/mbox files or another IMAP server",
        description="Import into an existing account. Messages already in the target folder (same bytes) "
        "are skipped, so a second run adds nothing; --imap runs resume where they stopped.",
    )
    s.add_argument("address", metavar="ADDRESS")
    s.add_argument("path", metavar="PATH", nargs="?", help="Maildir folder, mbox file or folder of mbox files")
    # `import ADDRESS --format mbox PATH` must work: argparse would not give PATH to an optional
    # positional after an option, so --format takes the path along when it follows.
    s.add_argument("--format", nargs="+", action=_FormatAction, metavar=("FORMAT", "PATH"),
                   help="maildir or mbox, then the PATH")
    s.add_argument("--folder", metavar="NAME", help="import below this folder instead of the original names")
    s.add_argument("--imap", metavar="URL", help="imaps://USER@HOST[:PORT] (or imap:// with STARTTLS)")
    s.add_argument("--password-stdin", action="store_true", help="read the source password from standard input")
    s.add_argument("--insecure", action="store_true", help="do not verify the source server's certificate")
    s.add_argument("--cafile", metavar="PEM", help="trust this CA for the source server")
    s.set_defaults(func=cmd_import)


__all__ = [
    "ImapSource",
    "Report",
    "TransferError",
    "add_parsers",
    "export_maildir",
    "export_mbox",
    "import_imap",
    "import_maildir",
    "import_mbox",
    "parse_imap_url",
    "parse_mbox",
]
