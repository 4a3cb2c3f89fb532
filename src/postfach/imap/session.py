"""The IMAP session: state machine and command semantics (RFC 9051, RFC 3501 and extensions).

It awaits the Store and writes responses to a ``Sink`` (the connection, or a list in tests); it
never sees a socket. Commands that need the wire (STARTTLS, IDLE, AUTHENTICATE continuations,
LOGOUT) return a ``Next`` telling the driver what to do.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import gc
import logging
import re
from bisect import bisect_left, bisect_right
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

from postfach import mail
from postfach.auth import AuthOutcome
from postfach.auth import sasl as sasl_mod
from postfach.context import ConnectionInfo, ServerContext
from postfach.errors import (
    AlreadyExists,
    NotFound,
    NotPermitted,
    QuotaExceeded,
    StorageFull,
    StoreError,
    StoreUnavailable,
)
from postfach.imap import commands as c
from postfach.imap import metadata as md
from postfach.imap import multisearch as multi
from postfach.imap import responses as r
from postfach.imap import sortthread as st
from postfach.imap.cache import (
    BLOB_CACHE_KEY,
    INFO_CACHE_KEY,
    SEARCH_CACHE_KEY,
    SECTION_CACHE_KEY,
    SMALL_BLOB_BYTES,
    LruCache,
    blob_cache,
    info_cache,
    search_cache,
    section_cache,
)
from postfach.imap.counts import AccountCounts
from postfach.imap.parser import ParseError, parse
from postfach.imap.selected import BadSequence, MailboxView, SelectedMailbox, ViewCache
from postfach.mail import search as msearch
from postfach.mail.headers import field_spans, header_end
from postfach.mail.model import MessageInfo
from postfach.mail.search import sort_row
from postfach.store.base import (
    HIERARCHY_DELIMITER,
    SYSTEM_FLAGS,
    Account,
    Change,
    ChangeKind,
    FlagOp,
    Mailbox,
    MailboxChanges,
    MessageMeta,
    Subscription,
)
from postfach.types import AccountId, BlobId, MailboxId, ModSeq, Uid, UidValidity

log = logging.getLogger("postfach.imap")

SERVER_NAME = "postfach"
SERVER_VERSION = "0.1.0"
STREAM_MIN_BYTES = 256 * 1024  # FETCH answers larger than this are streamed from the blob
STREAM_CHUNK = 64 * 1024
WRITE_BATCH = 64 * 1024
PREFETCH_MESSAGES = 16  # FETCH loads this many small messages at once
PREFETCH_BYTES = 2 * 1024 * 1024
SPECIAL_USES = ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash")
IDLE_RETRY_SECONDS = 2  # an IDLE refresh that met an unavailable store is retried after this
PERMANENT_FLAGS = b"(\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)"
BASE_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
MAX_NAME_BYTES = 255
VIEW_CACHE_KEY = "imap.views"
SORT_CACHE_KEY = "imap.sort_keys"


class Sink(Protocol):
    async def write(self, data: bytes) -> None: ...


class State(enum.Enum):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


class Next(enum.Enum):
    CONTINUE = "continue"
    STARTTLS = "starttls"  # tagged OK sent; start TLS now
    IDLE = "idle"  # "+ idling" sent; wait for changes and DONE
    SASL = "sasl"  # a "+ ..." challenge was sent; read one line for sasl_line()
    LOGOUT = "logout"  # close the connection
    COMPRESS = "compress"  # RFC 4978: send the tagged OK with compress_ready(), then deflate


class CommandRefused(Exception):
    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.code = code


class CommandBad(Exception):
    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.code = code


class MailboxGone(Exception):
    """The selected mailbox was deleted by someone else."""


def _store_refusal(e: StoreError) -> CommandRefused:
    if isinstance(e, QuotaExceeded):
        return CommandRefused("Quota exceeded", "OVERQUOTA")
    if isinstance(e, NotFound):
        return CommandRefused("No such mailbox", "NONEXISTENT")
    if isinstance(e, AlreadyExists):
        return CommandRefused("Mailbox already exists", "ALREADYEXISTS")
    if isinstance(e, NotPermitted):
        return CommandRefused(str(e) or "Not permitted", "CANNOT")
    if isinstance(e, StorageFull | StoreUnavailable):
        return CommandRefused("Temporary storage problem, try again later", "UNAVAILABLE")
    return CommandRefused("Internal error", "SERVERBUG")


def validate_name(name: str) -> str | None:
    """Why a new mailbox name is refused (issue 3 §6), or None."""
    if not name:
        return "Empty mailbox name"
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return "Mailbox name too long"
    if any(ch in "*%" for ch in name):
        return "Mailbox names must not contain * or %"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F or 0x80 <= ord(ch) < 0xA0 for ch in name):
        return "Mailbox names must not contain control characters"
    if any(level == "" for level in name.split(HIERARCHY_DELIMITER)):
        return "Mailbox names must not have empty hierarchy levels"
    return None


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """LIST pattern -> regex: ``*`` matches anything, ``%`` anything but the delimiter; INBOX is
    case-insensitive (RFC 9051 §6.3.9)."""
    out = []
    for ch in pattern:
        if ch == "*":
            out.append(".*")
        elif ch == "%":
            out.append("[^/]*")
        else:
            out.append(re.escape(ch))
    rx = "".join(out)
    if pattern[:5].upper() == "INBOX" and (len(pattern) == 5 or pattern[5] in "/*%"):
        rx = "(?i:INBOX)" + "".join(out[5:])
    return re.compile(rx + r"\Z", re.DOTALL)


_fold = msearch.fold
_addresses_text = msearch.addresses_text


class Session:
    def __init__(
        self,
        ctx: ServerContext,
        conn: ConnectionInfo,
        sink: Sink,
        *,
        account_connections: AccountCounts | None = None,
    ) -> None:
        self.ctx = ctx
        self.conn = conn
        self.out = sink
        self.store = ctx.store
        self.config = ctx.config
        self.state = State.NOT_AUTHENTICATED
        self.account: Account | None = None
        self.selected: SelectedMailbox | None = None
        self.rev2 = False
        self.condstore = False  # RFC 7162 §3.1: a CONDSTORE enabling command was seen
        self.qresync = False  # ENABLE QRESYNC (RFC 7162 §3.2.3)
        self.bad_commands = 0
        self._account_connections = account_connections
        self._counted = False
        self._sub: Subscription | None = None
        self._dirty = False
        self._view: MailboxView | None = None
        self._mailbox_ids: dict[str, MailboxId] = {}
        self._spec_keys: dict[int, tuple[c.Section, str]] = {}
        self._plan: _FetchPlan | None = None  # the current FETCH's, see _fetch_plan
        self._flag_lists: dict[frozenset[str], bytes] = {}  # the current FETCH's, see _flag_list
        self._blobs: LruCache[str, bytes] = ctx.services.setdefault(BLOB_CACHE_KEY, blob_cache())
        self._infos: LruCache[str, object] = ctx.services.setdefault(INFO_CACHE_KEY, info_cache())
        self._sections: LruCache[tuple[str, str], bytes] = ctx.services.setdefault(
            SECTION_CACHE_KEY, section_cache())
        self._search_fields: LruCache[str, tuple[str, ...]] = ctx.services.setdefault(
            SEARCH_CACHE_KEY, search_cache())
        self._sort_keys: LruCache[str, st.SortKeys] = ctx.services.setdefault(
            SORT_CACHE_KEY, LruCache(max_items=500_000, max_cost=500_000))
        # Recent SORT/THREAD answers (see _result_key), process-wide: a few big mailboxes' worth.
        self._st_results: LruCache[tuple[object, ...], object] = ctx.services.setdefault(
            "imap.sortthread_results", LruCache(max_items=16, max_cost=16 * 8))
        self._sasl: sasl_mod.Mechanism | None = None
        self._sasl_tag = ""
        self._idle_tag = ""
        self._starttls_tag = ""
        self._compress_tag = ""
        self.compressed = False
        self.utf8 = False  # ENABLE UTF8=ACCEPT (RFC 6855)
        self._saved: list[Uid] = []  # SEARCHRES "$" (RFC 5182), ascending UIDs
        self._qr_changes: tuple[ModSeq, MailboxChanges] | None = None
        self._notify: tuple[c.NotifyGroup, ...] | None = None  # NOTIFY SET (RFC 5465)
        self._notify_pending: list[Change] = []
        self._backlog: list[Change] = []  # feed entries taken by wait_change
        self._refresh_failed = False  # an IDLE refresh met an unavailable store: retry it soon
        self._wbuf = bytearray()

    # ------------------------------------------------------------------------------ output helpers
    async def _send(self, data: bytes) -> None:
        self._wbuf += data
        if len(self._wbuf) >= WRITE_BATCH:
            await self._flush()

    async def _flush(self) -> None:
        if self._wbuf:
            data = bytes(self._wbuf)
            self._wbuf.clear()
            await self.out.write(data)

    async def _ok(self, tag: str, text: str, code: str | None = None) -> None:
        await self._send(r.tagged(tag, "OK", text, code))

    # ---------------------------------------------------------------------------- capabilities
    @property
    def tls(self) -> bool:
        return self.conn.tls_active

    def _cleartext_ok(self) -> bool:
        return self.tls or self.ctx.auth.cleartext_allowed(self.conn.remote_ip)

    def capabilities(self) -> list[str]:
        caps = ["IMAP4rev1", "IMAP4rev2", "SASL-IR", "LITERAL+", "ID", "ENABLE", "IDLE"]
        if self.state is State.NOT_AUTHENTICATED:
            if not self.tls and self.conn.listener.tls != "none":
                caps.append("STARTTLS")
            if self._cleartext_ok():
                caps += ["AUTH=PLAIN", "AUTH=LOGIN"]
            else:
                caps.append("LOGINDISABLED")
            return caps
        caps += [
            "NAMESPACE", "UNSELECT", "UIDPLUS", "MOVE", "CHILDREN", "SPECIAL-USE",
            "CREATE-SPECIAL-USE", "LIST-EXTENDED", "LIST-STATUS", "ESEARCH", "STATUS=SIZE",
            f"APPENDLIMIT={self.config.imap.max_append_bytes}", "UNAUTHENTICATE", "MULTIAPPEND",
            "BINARY", "WITHIN", "CONDSTORE", "QRESYNC", "QUOTA", "QUOTA=RES-STORAGE",
            "QUOTA=RES-MESSAGE", "SORT", "SORT=DISPLAY", "ESORT", "THREAD=ORDEREDSUBJECT",
            "THREAD=REFERENCES", "SEARCHRES", "PARTIAL", "OBJECTID", "PREVIEW", "SAVEDATE",
            "UTF8=ACCEPT", "REPLACE", "NOTIFY", "METADATA", "METADATA-SERVER", "MULTISEARCH",
        ]
        if not self.compressed:
            caps.append("COMPRESS=DEFLATE")
        return caps

    def greeting(self) -> bytes:
        return r.untagged(f"OK [CAPABILITY {' '.join(self.capabilities())}] {SERVER_NAME} ready.")

    # ------------------------------------------------------------------------------- dispatch
    async def execute(self, raw: bytes) -> Next:
        """Run one complete command (``Request.raw``); responses go to the sink."""
        try:
            cmd = parse(raw)
        except ParseError as e:
            await self._bad(e.tag, e.text, None)
            return await self._after_bad()
        if self.utf8 and not isinstance(cmd, c.Append | c.Replace):
            # RFC 6855 §3: with UTF8=ACCEPT every string is UTF-8 (message literals aside).
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                await self._bad(cmd.tag, "Malformed UTF-8 in command", None)
                return await self._after_bad()
        nxt = await self.run(cmd)
        if self._notify is not None and nxt is Next.CONTINUE:
            with contextlib.suppress(StoreError):
                await self._send_notifications()
        await self._flush()
        return nxt

    async def _bad(self, tag: str, text: str, code: str | None) -> None:
        self.bad_commands += 1
        await self._send(r.tagged(tag, "BAD", text, code))
        await self._flush()

    async def _after_bad(self) -> Next:
        if self.bad_commands > self.config.limits.max_bad_commands:
            await self.out.write(r.untagged("BYE Too many invalid commands"))
            self.state = State.LOGOUT
            return Next.LOGOUT
        return Next.CONTINUE

    async def rejected(self, tag: str, code: str, text: str, no: bool) -> Next:
        """A command dropped by the receiver's size caps."""
        if no:
            await self._send(r.tagged(tag, "NO", text, code))
            await self._flush()
            return Next.CONTINUE
        await self._bad(tag, text, code)
        return await self._after_bad()

    def _state_ok(self, cmd: c.Command) -> str | None:
        if isinstance(cmd, c.AnyState):
            return None
        if isinstance(cmd, c.NotAuthenticated):
            return None if self.state is State.NOT_AUTHENTICATED else "Already authenticated"
        if isinstance(cmd, c.Authenticated):
            return None if self.state in (State.AUTHENTICATED, State.SELECTED) else "Not authenticated"
        if isinstance(cmd, c.Selected):
            if self.state is State.SELECTED:
                return None
            return "Not authenticated" if self.state is State.NOT_AUTHENTICATED else "No mailbox selected"
        return "Unknown command"

    async def run(self, cmd: c.Command) -> Next:
        problem = self._state_ok(cmd)
        if problem is not None:
            await self._bad(cmd.tag, problem, None)
            return await self._after_bad()
        handler = _HANDLERS[type(cmd)]
        try:
            return await self._run(cmd, handler)
        except MailboxGone:
            return Next.LOGOUT

    async def _run(self, cmd: c.Command,
                   handler: Callable[[Session, Any], Awaitable[Next | None]]) -> Next:
        try:
            if isinstance(cmd, c.Fetch | c.Store | c.Search | c.Copy | c.Move | c.Expunge | c.Sort
                          | c.Thread | c.Replace):
                # Bring the view up to date first; by sequence number only with changes that do
                # not renumber (RFC 9051 §7.5.1), so the numbers mean what the client meant.
                by_uid = isinstance(cmd, c.Expunge) or cmd.uid
                await self._refresh(allow_expunge=by_uid)
            nxt = await handler(self, cmd)
        except CommandRefused as e:
            await self._send(r.tagged(cmd.tag, "NO", e.text, e.code))
            return Next.CONTINUE
        except CommandBad as e:
            await self._bad(cmd.tag, e.text, e.code)
            return await self._after_bad()
        except BadSequence as e:
            await self._bad(cmd.tag, str(e), "CLIENTBUG")
            return await self._after_bad()
        except StoreError as e:
            refusal = _store_refusal(e)
            if refusal.code == "SERVERBUG":
                log.exception("store error in %s", type(cmd).__name__)
            await self._send(r.tagged(cmd.tag, "NO", refusal.text, refusal.code))
            return Next.CONTINUE
        except (OSError, EOFError, MailboxGone):
            raise  # the connection is gone (the driver's business), not a command failure
        except Exception:
            log.exception("internal error in %s", type(cmd).__name__)
            await self._send(r.tagged(cmd.tag, "NO", "Internal server error", "SERVERBUG"))
            return Next.CONTINUE
        return nxt if nxt is not None else Next.CONTINUE

    # ----------------------------------------------------------------------------- any state
    async def _capability(self, cmd: c.Capability) -> None:
        await self._send(r.untagged("CAPABILITY " + " ".join(self.capabilities())))
        await self._refresh(allow_expunge=True)
        await self._ok(cmd.tag, "CAPABILITY completed")

    async def _noop(self, cmd: c.Noop) -> None:
        # The change feed marks the view dirty; NOOP reads the store only when something changed.
        await self._refresh(allow_expunge=True)
        await self._ok(cmd.tag, "NOOP completed")

    async def _logout(self, cmd: c.Logout) -> Next:
        await self._send(r.untagged("BYE Logging out"))
        await self._ok(cmd.tag, "LOGOUT completed")
        await self._flush()
        self.state = State.LOGOUT
        return Next.LOGOUT

    async def _id(self, cmd: c.Id) -> None:
        # RFC 2971 §3.1: the server answers with its own ID.
        await self._send(b'* ID ("name" "%s" "version" "%s")\r\n'
                         % (SERVER_NAME.encode(), SERVER_VERSION.encode()))
        await self._ok(cmd.tag, "ID completed")

    # --------------------------------------------------------------------- not authenticated
    async def _starttls(self, cmd: c.StartTls) -> Next:
        if self.tls:
            raise CommandBad("TLS is already active")
        if self.conn.listener.tls == "none":
            raise CommandBad("STARTTLS is not offered here")
        # The driver stops reading from the socket, then calls starttls_ready() to send the OK:
        # so no byte of the client's TLS handshake can end up in the plaintext buffers.
        self._starttls_tag = cmd.tag
        return Next.STARTTLS

    async def starttls_ready(self) -> None:
        await self._ok(self._starttls_tag, "Begin TLS negotiation now")
        await self._flush()

    def tls_started(self) -> None:
        self.conn.tls_active = True

    async def _login(self, cmd: c.Login) -> None:
        if not self._cleartext_ok():
            # RFC 9051 §6.2.3 LOGINDISABLED; RFC 5530 PRIVACYREQUIRED
            raise CommandRefused("Plaintext authentication disallowed without TLS", "PRIVACYREQUIRED")
        res = await self.ctx.auth.authenticate(cmd.user, cmd.password, remote_ip=self.conn.remote_ip,
                                               protocol="imap")
        await self._auth_result(cmd.tag, res.outcome, res.account)

    async def _auth_result(self, tag: str, outcome: AuthOutcome, account: Account | None) -> None:
        if outcome is AuthOutcome.LOCKED:
            raise CommandRefused("Too many failed logins, try again later", "UNAVAILABLE")
        if outcome is not AuthOutcome.OK or account is None:
            raise CommandRefused("Authentication failed", "AUTHENTICATIONFAILED")
        limit = self.config.limits.max_connections_per_account
        if self._account_connections is not None:
            if self._account_connections.total(account.id) >= limit:  # over all workers
                raise CommandRefused("Too many connections for this account", "LIMIT")
            self._account_connections.add(account.id, 1)
            self._counted = True
        self.account = account
        self.state = State.AUTHENTICATED
        self._sub = self.store.subscribe(account.id)
        await self._ok(tag, "Logged in", "CAPABILITY " + " ".join(self.capabilities()))

    async def _authenticate(self, cmd: c.Authenticate) -> Next | None:
        if not self._cleartext_ok():
            raise CommandRefused("Authentication disallowed without TLS", "PRIVACYREQUIRED")
        mech = sasl_mod.start(cmd.mechanism)
        if mech is None:
            raise CommandRefused("Unsupported authentication mechanism", "CANNOT")
        self._sasl = mech
        self._sasl_tag = cmd.tag
        return await self._sasl_step(cmd.initial)

    async def _sasl_step(self, data: bytes | None) -> Next | None:
        mech = self._sasl
        assert mech is not None
        try:
            res = mech.step(data)
        except sasl_mod.SaslError as e:
            self._sasl = None
            raise CommandBad(f"Invalid SASL data: {e}") from None
        if isinstance(res, sasl_mod.Challenge):
            await self._send(b"+ " + base64.b64encode(res.data) + b"\r\n")
            await self._flush()
            return Next.SASL
        self._sasl = None
        auth = await self.ctx.auth.authenticate_credentials(res, remote_ip=self.conn.remote_ip,
                                                            protocol="imap")
        await self._auth_result(self._sasl_tag, auth.outcome, auth.account)
        return None

    async def sasl_line(self, line: bytes) -> Next:
        """A client line during AUTHENTICATE (RFC 9051 §6.2.2)."""
        tag = self._sasl_tag
        if line.strip() == b"*":
            self._sasl = None
            await self._bad(tag, "Authentication cancelled", None)
            return await self._after_bad()
        try:
            data = base64.b64decode(line.strip(), validate=True)
        except (binascii.Error, ValueError):
            self._sasl = None
            await self._bad(tag, "Invalid base64 data", None)
            return await self._after_bad()
        try:
            nxt = await self._sasl_step(data)
        except CommandRefused as e:
            await self._send(r.tagged(tag, "NO", e.text, e.code))
            nxt = None
        except StoreError as e:  # the account lookup behind the credentials (RFC 5530 UNAVAILABLE)
            refusal = _store_refusal(e)
            log.warning("AUTHENTICATE failed on the store: %s", e)
            await self._send(r.tagged(tag, "NO", refusal.text, refusal.code))
            nxt = None
        except CommandBad as e:
            await self._bad(tag, e.text, e.code)
            return await self._after_bad()
        await self._flush()
        return nxt if nxt is not None else Next.CONTINUE

    # ---------------------------------------------------------------------------- authenticated
    @property
    def account_id(self) -> AccountId:
        assert self.account is not None
        return self.account.id

    def _wire_name(self, name: str) -> bytes:
        return r.mailbox_name(name, self.rev2 or self.utf8)

    async def _enable(self, cmd: c.Enable) -> None:
        enabled = []
        for cap in cmd.capabilities:
            if cap == "IMAP4REV2" and not self.rev2:
                self.rev2 = True
                enabled.append("IMAP4rev2")
            elif cap == "UTF8=ACCEPT" and not self.utf8:
                # RFC 6855 §3: UTF-8 names and strings from now on; malformed UTF-8 is BAD.
                self.utf8 = True
                enabled.append("UTF8=ACCEPT")
            elif cap == "CONDSTORE" and not self.condstore:
                self._enable_condstore()
                enabled.append("CONDSTORE")
            elif cap == "QRESYNC" and not self.qresync:
                # RFC 7162 §3.2.3: QRESYNC implies CONDSTORE (which is not listed unless asked).
                self._enable_condstore()
                self.qresync = True
                if self.selected is not None:
                    self.selected.qresync = True
                enabled.append("QRESYNC")
        # RFC 5161 §3.1: unknown capabilities are ignored (neomutt sends UTF8=ACCEPT regardless).
        await self._send(r.untagged("ENABLED" + "".join(" " + e for e in enabled)))
        await self._ok(cmd.tag, "ENABLE completed")

    def _enable_condstore(self) -> None:
        self.condstore = True
        if self.selected is not None:
            self.selected.condstore = True

    async def _unauthenticate(self, cmd: c.Unauthenticate) -> None:
        # RFC 8437 §2
        self._deselect()
        self._logout_account()
        self.state = State.NOT_AUTHENTICATED
        self.rev2 = self.condstore = self.qresync = False
        await self._ok(cmd.tag, "Unauthenticated")

    def _logout_account(self) -> None:
        if self._counted and self.account is not None and self._account_connections is not None:
            self._account_connections.add(self.account.id, -1)
        self._counted = False
        if self._sub is not None:
            self._sub.close()
            self._sub = None
        self.account = None

    async def close(self) -> None:
        """The connection is gone: release what the session holds."""
        self._deselect()
        self._logout_account()
        self.state = State.LOGOUT

    async def _mailbox(self, name: str) -> Mailbox:
        mb = await self.store.get_mailbox(self.account_id, name)
        if mb is None:
            raise CommandRefused("Mailbox does not exist", "NONEXISTENT")
        return mb

    async def _target_mailbox(self, name: str) -> Mailbox:
        """COPY/MOVE/APPEND destination (RFC 9051 §6.3.12: NO [TRYCREATE] when missing)."""
        mb = await self.store.get_mailbox(self.account_id, name)
        if mb is None:
            raise CommandRefused("Mailbox does not exist", "TRYCREATE")
        return mb

    def _deselect(self) -> None:
        self._saved = []
        self.selected = None
        self._view = None
        if self.state is State.SELECTED:
            self.state = State.AUTHENTICATED

    async def _select(self, cmd: c.Select) -> None:
        if cmd.qresync is not None and not self.qresync:
            raise CommandBad("QRESYNC is not enabled (RFC 7162 §3.2.5)")
        if self.selected is not None:
            # RFC 9051 §6.3.2: the previous mailbox is closed (no expunge) and CLOSED is sent.
            self._deselect()
            await self._send(untagged_ok("Previous mailbox closed", "CLOSED"))
        views: ViewCache = self.ctx.services.setdefault(VIEW_CACHE_KEY, ViewCache())
        # A re-SELECT (clients do it all the time) goes straight to the change log: the record it
        # returns tells whether the id still has this name and UIDVALIDITY.
        mb: Mailbox | None = None
        view: MailboxView | None = None
        known = self._mailbox_ids.get(cmd.mailbox)
        if known is not None and (cached := views.get(known)) is not None:
            try:
                mb = await self._catch_up(cached, known, cmd.qresync)
                view = cached
            except NotFound:
                mb = None
            if mb is not None and (mb.name != cmd.mailbox or mb.uidvalidity != cached.uidvalidity):
                mb = view = None
        if mb is None:
            mb = await self._mailbox(cmd.mailbox)
            view = views.get(mb.id)
            if view is not None and view.uidvalidity == mb.uidvalidity:
                mb = await self._catch_up(view, mb.id, cmd.qresync)
            else:
                view = None
        self._mailbox_ids[cmd.mailbox] = mb.id
        if view is None:
            metas = await self.store.list_messages(self.account_id, mb.id)
            view = MailboxView(mb.uidvalidity, mb.highestmodseq, metas)
            views.put(mb.id, view)
        recent: set[Uid] = set()
        if not self.rev2 and not cmd.readonly and view.claimed_upto < mb.uidnext:
            first = await self.store.claim_recent(self.account_id, mb.id)
            recent = {u for u in view.uids if u >= first}
            view.claimed_upto = max(view.claimed_upto, mb.uidnext)
        sel = SelectedMailbox(mb.id, mb.name, mb.uidvalidity, mb.uidnext, view.modseq, (),
                              cmd.readonly, recent, view)
        if sel.uids and sel.uids[-1] >= sel.uidnext:
            sel.uidnext = Uid(sel.uids[-1] + 1)
        keywords = view.keywords
        flags = list(BASE_FLAGS) + sorted(keywords)
        await self._send(b"* %d EXISTS\r\n" % sel.exists)
        if not self.rev2:
            await self._send(b"* %d RECENT\r\n" % sel.recent_count())
        await self._send(b"* FLAGS " + r.flag_list(flags) + b"\r\n")
        if cmd.readonly:
            await self._send(b"* OK [PERMANENTFLAGS ()] Read-only mailbox\r\n")
        else:
            pf = PERMANENT_FLAGS if not keywords else (
                r.flag_list(flags)[:-1] + b" \\*)")
            await self._send(b"* OK [PERMANENTFLAGS " + pf + b"] Flags permitted\r\n")
        if not self.rev2:
            first_unseen = next((i + 1 for i, u in enumerate(sel.uids)
                                 if "\\Seen" not in sel.metas[u].flags), None)
            if first_unseen is not None:
                await self._send(b"* OK [UNSEEN %d] First unseen\r\n" % first_unseen)
        await self._send(b"* OK [UIDVALIDITY %d] UIDs valid\r\n" % sel.uidvalidity)
        await self._send(b"* OK [UIDNEXT %d] Predicted next UID\r\n" % sel.uidnext)
        if cmd.condstore or cmd.qresync is not None:
            self._enable_condstore()
        sel.condstore = self.condstore
        sel.qresync = self.qresync
        if self.condstore:
            await self._send(b"* OK [HIGHESTMODSEQ %d] Highest\r\n" % sel.modseq)
        await self._send(untagged_ok("Ok", f"MAILBOXID ({mailbox_id(mb.id, mb.uidvalidity)})"))
        if self.rev2:
            # RFC 9051 §6.3.2: the LIST response tells the canonical name.
            await self._send(b"* LIST () \"/\" " + self._wire_name(mb.name) + b"\r\n")
        self.selected = sel
        self._view = view
        self.state = State.SELECTED
        self._dirty = False
        if cmd.qresync is not None and cmd.qresync.uidvalidity == sel.uidvalidity:
            await self._resync(sel, cmd.qresync)
        mode = "READ-ONLY" if cmd.readonly else "READ-WRITE"
        await self._ok(cmd.tag, f"{'EXAMINE' if cmd.readonly else 'SELECT'} completed", mode)

    async def _catch_up(self, view: MailboxView, mailbox_id: MailboxId,
                        q: c.Qresync | None = None) -> Mailbox:
        """Bring the shared view up to date. For a QRESYNC SELECT one read serves both: the
        changes since the client's older modseq also bring the view up to date (kept for
        _resync in ``_qr_changes``)."""
        self._qr_changes = None
        while True:
            since = view.modseq
            ask = min(since, ModSeq(q.modseq)) if q is not None and q.uidvalidity == view.uidvalidity else since
            changes = await self.store.mailbox_changes(self.account_id, mailbox_id, ask)
            full = await self._trimmed_history(changes, since, view.uids)
            if view.modseq == since:  # nobody applied a newer state meanwhile
                if full is not changes:
                    view.apply(full)
                    return changes.mailbox
                view.apply(changes)
                if ask != since:
                    self._qr_changes = (ask, changes)
                return changes.mailbox

    async def _create(self, cmd: c.Create) -> None:
        name = cmd.mailbox
        if name.endswith(HIERARCHY_DELIMITER):  # RFC 9051 §6.3.4: a trailing delimiter is intent
            name = name[:-1]
        problem = validate_name(name)
        if problem:
            raise CommandRefused(problem, "CANNOT")
        if name.upper() == "INBOX":
            raise CommandRefused("INBOX already exists", "ALREADYEXISTS")
        use: str | None = None
        if cmd.special_use:
            if len(cmd.special_use) > 1:
                raise CommandRefused("Only one special-use attribute per mailbox", "USEATTR")
            want = cmd.special_use[0].lower()
            match_ = [s for s in SPECIAL_USES if s.lower() == want]
            if not match_:
                raise CommandRefused("Unsupported special-use attribute", "USEATTR")
            use = match_[0]
        existing = {m.name for m in await self.store.list_mailboxes(self.account_id)}
        if name in existing:
            raise CommandRefused("Mailbox already exists", "ALREADYEXISTS")
        # Dovecot creates missing parents; so do we (RFC 9051 §6.3.4 allows it).
        levels = name.split(HIERARCHY_DELIMITER)
        for i in range(1, len(levels)):
            parent = HIERARCHY_DELIMITER.join(levels[:i])
            if parent.upper() == "INBOX":
                parent = "INBOX"
            if parent not in existing:
                with contextlib.suppress(AlreadyExists):
                    await self.store.create_mailbox(self.account_id, parent)
        try:
            made = await self.store.create_mailbox(self.account_id, name, use)
        except AlreadyExists:
            raise CommandRefused("Mailbox already exists", "ALREADYEXISTS") from None
        # RFC 8474 §4.1: CREATE tells the new MAILBOXID.
        await self._ok(cmd.tag, "CREATE completed", f"MAILBOXID ({mailbox_id(made.id, made.uidvalidity)})")

    async def _delete(self, cmd: c.Delete) -> None:
        if cmd.mailbox == "INBOX":
            raise CommandRefused("INBOX cannot be deleted", "CANNOT")
        mb = await self._mailbox(cmd.mailbox)
        prefix = mb.name + HIERARCHY_DELIMITER
        if any(m.name.startswith(prefix) for m in await self.store.list_mailboxes(self.account_id)):
            # RFC 9051 §6.3.5: SHOULD refuse with HASCHILDREN rather than keep a \Noselect name.
            raise CommandRefused("Mailbox has children, delete them first", "HASCHILDREN")
        if self.selected is not None and self.selected.mailbox_id == mb.id:
            self._deselect()
            await self._send(untagged_ok("Mailbox deleted", "CLOSED"))
        await self.store.delete_mailbox(self.account_id, mb.id)
        await self._ok(cmd.tag, "DELETE completed")

    async def _rename(self, cmd: c.Rename) -> None:
        new = cmd.new.rstrip(HIERARCHY_DELIMITER) if cmd.new != HIERARCHY_DELIMITER else cmd.new
        problem = validate_name(new)
        if problem:
            raise CommandRefused(problem, "CANNOT")
        mb = await self._mailbox(cmd.old)
        boxes = await self.store.list_mailboxes(self.account_id)
        names = {m.name for m in boxes}
        if new in names or new.upper() == "INBOX":
            raise CommandRefused("Target mailbox already exists", "ALREADYEXISTS")
        if new.startswith(mb.name + HIERARCHY_DELIMITER):
            raise CommandRefused("Cannot rename a mailbox into itself", "CANNOT")
        levels = new.split(HIERARCHY_DELIMITER)
        for i in range(1, len(levels)):
            parent = HIERARCHY_DELIMITER.join(levels[:i])
            if parent not in names and parent != mb.name:
                with contextlib.suppress(AlreadyExists):
                    await self.store.create_mailbox(self.account_id, parent)
        try:
            await self.store.rename_mailbox(self.account_id, mb.id, new)
        except AlreadyExists:
            raise CommandRefused("Target mailbox already exists", "ALREADYEXISTS") from None
        if self.selected is not None and self.selected.mailbox_id == mb.id and mb.name != "INBOX":
            self.selected.name = new
        await self._ok(cmd.tag, "RENAME completed")

    async def _subscribe(self, cmd: c.Subscribe) -> None:
        await self._mailbox(cmd.mailbox)
        await self.store.set_subscribed(self.account_id, cmd.mailbox, True)
        await self._ok(cmd.tag, "SUBSCRIBE completed")

    async def _unsubscribe(self, cmd: c.Unsubscribe) -> None:
        subs = await self.store.list_subscriptions(self.account_id)
        if cmd.mailbox not in subs:
            mb = await self.store.get_mailbox(self.account_id, cmd.mailbox)
            if mb is None or not mb.subscribed:
                raise CommandRefused("Not subscribed", "NONEXISTENT")
        await self.store.set_subscribed(self.account_id, cmd.mailbox, False)
        await self._ok(cmd.tag, "UNSUBSCRIBE completed")

    async def _namespace(self, cmd: c.Namespace) -> None:
        await self._send(b'* NAMESPACE (("" "/")) NIL NIL\r\n')
        await self._ok(cmd.tag, "NAMESPACE completed")

    async def _list(self, cmd: c.List) -> None:
        # The delimiter query (RFC 9051 §6.3.9): LIST "" "" (basic syntax only).
        if not cmd.extended and cmd.patterns == ("",):
            await self._send(b'* ' + (b"LSUB" if cmd.lsub else b"LIST") + b' (\\Noselect) "/" ""\r\n')
            await self._ok(cmd.tag, f"{'LSUB' if cmd.lsub else 'LIST'} completed")
            return
        boxes = await self.store.list_mailboxes(self.account_id)
        by_name = {m.name: m for m in boxes}
        subscribed = set(await self.store.list_subscriptions(self.account_id))
        subscribed |= {m.name for m in boxes if m.subscribed}
        sel_subscribed = cmd.lsub or "SUBSCRIBED" in cmd.select_opts
        sel_special = "SPECIAL-USE" in cmd.select_opts
        recursive = "RECURSIVEMATCH" in cmd.select_opts
        ret_subscribed = "SUBSCRIBED" in cmd.return_opts or (sel_subscribed and not cmd.lsub)
        ret_special = True  # Dovecot and RFC 6154 §2: special-use attributes are always shown
        status_items = cmd.status_items if "STATUS" in cmd.return_opts else ()
        # Every name: existing mailboxes, their (maybe missing) parents, subscribed names.
        all_names: set[str] = set(by_name)
        for name in list(by_name) + list(subscribed):
            levels = name.split(HIERARCHY_DELIMITER)
            for i in range(1, len(levels)):
                all_names.add(HIERARCHY_DELIMITER.join(levels[:i]))
        if sel_subscribed:
            all_names |= subscribed
        children: dict[str, bool] = {}
        for name in all_names:
            parent = name.rpartition(HIERARCHY_DELIMITER)[0]
            while parent:
                if parent in by_name or parent in children:
                    children[parent] = True
                parent = parent.rpartition(HIERARCHY_DELIMITER)[0]
        regexes = [pattern_regex(cmd.reference + p) for p in cmd.patterns if p]
        word = "LSUB" if cmd.lsub else "LIST"
        found: list[tuple[str, list[str], bytes]] = []
        for name in sorted(all_names, key=lambda n: (n != "INBOX", n)):
            if not any(rx.match(name) for rx in regexes):
                continue
            mb = by_name.get(name)
            exists = mb is not None
            attrs: list[str] = []
            extra = b""
            if sel_subscribed and name not in subscribed:
                if not recursive:
                    if not cmd.lsub:
                        continue
                    # LSUB (RFC 3501 §6.3.9): a parent of a subscribed name shows as \Noselect
                    # when "%" stops at it.
                    if not any(s.startswith(name + HIERARCHY_DELIMITER) for s in subscribed):
                        continue
                    attrs.append("\\Noselect")
                else:
                    subs_below = [s for s in subscribed if s.startswith(name + HIERARCHY_DELIMITER)]
                    if not subs_below or all(any(rx.match(s) for rx in regexes) for s in subs_below):
                        continue
                    extra = b' ("CHILDINFO" ("SUBSCRIBED"))'
            if sel_special and (mb is None or mb.special_use is None):
                continue
            if not exists and not attrs:
                if sel_subscribed and not cmd.lsub:
                    attrs.append("\\NonExistent")
                elif cmd.lsub:
                    attrs.append("\\Noselect")
                else:
                    attrs.append("\\NonExistent" if (self.rev2 or cmd.extended) else "\\Noselect")
            if not cmd.lsub:
                attrs.append("\\HasChildren" if children.get(name) else "\\HasNoChildren")
            if ret_subscribed and name in subscribed and not cmd.lsub:
                attrs.append("\\Subscribed")
            if ret_special and mb is not None and mb.special_use and not cmd.lsub:
                attrs.append(mb.special_use)
            found.append((name, attrs, extra))
        for name, attrs, extra in found:
            line = (f"* {word} (" + " ".join(attrs) + ') "/" ').encode() + self._wire_name(name) + extra
            await self._send(line + b"\r\n")
            mb = by_name.get(name)
            if status_items and mb is not None:
                # RFC 5819 §2: STATUS after the LIST of each selectable mailbox.
                await self._send(await self._status_line(mb, status_items))
        await self._ok(cmd.tag, f"{word} completed")

    async def _status_line(self, mb: Mailbox, items: tuple[str, ...]) -> bytes:
        st = await self.store.mailbox_status(self.account_id, mb.id)
        vals: list[str] = []
        for item in items:
            match item:
                case "MESSAGES":
                    v = st.messages
                case "UIDNEXT":
                    v = st.mailbox.uidnext
                case "UIDVALIDITY":
                    v = st.mailbox.uidvalidity
                case "UNSEEN":
                    v = st.unseen
                case "DELETED":
                    v = st.deleted
                case "SIZE":
                    v = st.size
                case "RECENT":
                    v = 0
                case "HIGHESTMODSEQ":
                    v = st.mailbox.highestmodseq
                case "APPENDLIMIT":
                    v = self.config.imap.max_append_bytes
                case "MAILBOXID":
                    vals.append(f"MAILBOXID ({mailbox_id(mb.id, mb.uidvalidity)})")
                    continue
                case _:
                    continue
            vals.append(f"{item} {v}")
        return b"* STATUS " + self._wire_name(mb.name) + (" (" + " ".join(vals) + ")\r\n").encode()

    async def _status(self, cmd: c.Status) -> None:
        mb = await self._mailbox(cmd.mailbox)
        if "HIGHESTMODSEQ" in cmd.items:
            self._enable_condstore()  # RFC 7162 §3.1
        await self._send(await self._status_line(mb, cmd.items))
        await self._ok(cmd.tag, "STATUS completed")

    async def _append(self, cmd: c.Append) -> None:
        mb = await self._target_mailbox(cmd.mailbox)
        limit = self.config.imap.max_append_bytes
        items: list[tuple[bytes, frozenset[str], datetime | None]] = []
        for m in cmd.messages:
            if len(m.data) > limit:
                raise CommandRefused("Message too large", "TOOBIG")  # RFC 7889
            if not m.data:
                raise CommandRefused("Cannot store an empty message", "CANNOT")
            flags = frozenset(f for f in m.flags if f != "\\Recent")
            if any(f.startswith("\\") and f not in SYSTEM_FLAGS for f in flags):
                raise CommandBad("Unknown system flag")
            items.append((m.data, flags, m.internaldate))
        if len(items) == 1:
            res = [await self.store.append(self.account_id, mb.id, items[0][0], items[0][1],
                                           items[0][2])]
        else:
            res = await self.store.append_many(self.account_id, mb.id, items)
        self._dirty = True
        await self._refresh(allow_expunge=True)
        uids = r.uid_set(x.uid for x in res)
        await self._ok(cmd.tag, "APPEND completed", f"APPENDUID {res[0].uidvalidity} {uids}")

    async def _compress(self, cmd: c.Compress) -> Next:
        # RFC 4978 §3: one mechanism, DEFLATE; a second COMPRESS is refused.
        if self.compressed:
            raise CommandRefused("Compression is already active", "COMPRESSIONACTIVE")
        if cmd.mechanism != "DEFLATE":
            raise CommandBad("Unknown compression mechanism")
        self._compress_tag = cmd.tag
        return Next.COMPRESS

    async def compress_ready(self) -> None:
        """The driver stopped reading; the OK goes out uncompressed, all after it deflated."""
        await self._ok(self._compress_tag, "DEFLATE active")
        await self._flush()
        self.compressed = True

    async def _idle(self, cmd: c.Idle) -> Next:
        self._idle_tag = cmd.tag
        await self._refresh(allow_expunge=True, force=True)
        await self._send(r.continuation("idling"))
        await self._flush()
        return Next.IDLE

    async def wait_change(self) -> None:
        """Wait until the account's change feed says something (IDLE)."""
        if self._sub is None:
            await _forever()
            return
        if self._refresh_failed:
            # The store was away when we last looked (a database restart): look again soon even
            # if nothing new is announced, so the IDLE client is not left behind.
            self._refresh_failed = False
            self._dirty = True
            with contextlib.suppress(TimeoutError):
                self._backlog.append(await asyncio.wait_for(self._sub.get(), IDLE_RETRY_SECONDS))
            return
        self._backlog.append(await self._sub.get())
        self._dirty = True

    async def idle_update(self) -> Next:
        """The change feed spoke during IDLE: send what changed (RFC 2177)."""
        try:
            await self._refresh(allow_expunge=True)
            await self._send_notifications()
        except MailboxGone:
            return Next.LOGOUT
        except StoreUnavailable as e:
            log.warning("refresh during IDLE failed (retrying in %ds): %s", IDLE_RETRY_SECONDS, e)
            self._refresh_failed = True
        except StoreError:
            log.exception("refresh during IDLE failed")
        await self._flush()
        return Next.IDLE

    # ------------------------------------------------------------------------ NOTIFY (RFC 5465)
    @property
    def notify_active(self) -> bool:
        return self._notify is not None

    def _selected_group(self) -> c.NotifyGroup | None:
        for g in self._notify or ():
            if g.filter in ("SELECTED", "SELECTED-DELAYED"):
                return g
        return None

    def _group_for(self, mb: Mailbox) -> c.NotifyGroup | None:
        """The first event group whose filter takes this (not selected) mailbox (§6)."""
        for g in self._notify or ():
            f = g.filter
            if (f == "PERSONAL" or (f == "INBOXES" and mb.name == "INBOX")
                    or (f == "SUBSCRIBED" and mb.subscribed)
                    or (f == "MAILBOXES" and mb.name in g.mailboxes)
                    or (f == "SUBTREE" and any(mb.name == t or mb.name.startswith(t + HIERARCHY_DELIMITER)
                                               for t in g.mailboxes))):
                return g
        return None

    async def notify_update(self) -> Next:
        """The change feed spoke while the client was not in a command (NOTIFY is on): tell
        the selected mailbox's changes (if asked) and the other mailboxes' STATUS/LIST."""
        try:
            g = self._selected_group()
            if self.selected is not None and g is not None and g.events:
                await self._refresh(allow_expunge=g.filter == "SELECTED")
            else:
                self._drain_feed()
            await self._send_notifications()
        except MailboxGone:
            return Next.LOGOUT
        except StoreError:
            log.exception("NOTIFY update failed")
        await self._flush()
        return Next.CONTINUE

    async def _send_notifications(self) -> None:
        if self._notify is None:
            self._notify_pending.clear()
            return
        self._drain_feed()
        pending, self._notify_pending = self._notify_pending, []
        status_for: dict[MailboxId, Mailbox] = {}
        for ch in pending:
            if ch.mailbox_id is None:
                continue
            if ch.kind in (ChangeKind.MAILBOX_CREATE, ChangeKind.MAILBOX_DELETE, ChangeKind.MAILBOX_RENAME):
                mb = await self.store.get_mailbox_by_id(self.account_id, ch.mailbox_id)
                name = mb.name if mb is not None else ch.name
                if name is None:
                    continue
                probe = mb or Mailbox(ch.mailbox_id, self.account_id, name, None, UidValidity(0), Uid(1),
                                      ModSeq(0), False)
                g = self._group_for(probe)
                if g is not None and "MAILBOXNAME" in g.events:
                    attrs = "\\NonExistent" if mb is None else ""
                    await self._send(f"* LIST ({attrs}) \"/\" ".encode() + self._wire_name(name) + b"\r\n")
                continue
            if self.selected is not None and ch.mailbox_id == self.selected.mailbox_id:
                continue
            want = {ChangeKind.APPEND: "MESSAGENEW", ChangeKind.EXPUNGE: "MESSAGEEXPUNGE",
                    ChangeKind.FLAGS: "FLAGCHANGE"}.get(ch.kind)
            if want is None or ch.mailbox_id in status_for:
                continue
            mb = await self.store.get_mailbox_by_id(self.account_id, ch.mailbox_id)
            if mb is None:
                continue
            g = self._group_for(mb)
            if g is not None and want in g.events:
                status_for[mb.id] = mb
        for mb in status_for.values():
            # §5.2: STATUS with what changed: MESSAGES, UIDNEXT, and UNSEEN for flag changes.
            await self._send(await self._status_line(mb, ("MESSAGES", "UIDNEXT", "UNSEEN")))

    async def _notify_cmd(self, cmd: c.Notify) -> None:
        if cmd.groups is None:
            self._notify = None
            self._notify_pending.clear()
            await self._ok(cmd.tag, "NOTIFY completed")
            return
        supported = {"MESSAGENEW", "MESSAGEEXPUNGE", "FLAGCHANGE", "MAILBOXNAME"}
        sel_groups = 0
        for g in cmd.groups:
            bad = [e for e in g.events if e not in supported]
            if bad:
                raise CommandRefused("Unsupported event", "BADEVENT (MessageNew MessageExpunge FlagChange "
                                     "MailboxName)")
            ev = set(g.events)
            if ("MESSAGENEW" in ev) != ("MESSAGEEXPUNGE" in ev) or ("FLAGCHANGE" in ev and "MESSAGENEW" not in ev):
                # RFC 5465 §5: MessageNew and MessageExpunge go together; FlagChange needs both.
                raise CommandBad("MessageNew and MessageExpunge go together; FlagChange needs them")
            if g.filter in ("SELECTED", "SELECTED-DELAYED"):
                sel_groups += 1
            for name in g.mailboxes:
                if await self.store.get_mailbox(self.account_id, name) is None:
                    raise CommandRefused(f"No such mailbox: {name}", "NONEXISTENT")
        if sel_groups > 1:
            raise CommandBad("SELECTED given twice")
        self._notify = cmd.groups
        self._notify_pending.clear()
        if cmd.status:
            # §3.1 STATUS: the current state of every mailbox the message events cover.
            for mb in await self.store.list_mailboxes(self.account_id):
                if self.selected is not None and mb.id == self.selected.mailbox_id:
                    continue
                grp = self._group_for(mb)
                if grp is not None and "MESSAGENEW" in grp.events:
                    await self._send(await self._status_line(mb, ("MESSAGES", "UIDNEXT", "UNSEEN")))
        await self._ok(cmd.tag, "NOTIFY completed")

    async def idle_done(self, line: bytes) -> Next:
        """The client's line ending IDLE (RFC 2177 §3: DONE)."""
        if line.strip().upper() != b"DONE":
            await self._bad(self._idle_tag, "Expected DONE", None)
            return await self._after_bad()
        try:
            await self._refresh(allow_expunge=True)
        except MailboxGone:
            return Next.LOGOUT
        await self._ok(self._idle_tag, "IDLE terminated")
        await self._flush()
        return Next.CONTINUE

    # ------------------------------------------------------------------------------- refresh
    def _drain_feed(self) -> None:
        sub = self._sub
        if sub is None:
            return
        backlog, self._backlog = self._backlog, []
        while (ch := sub.get_nowait()) is not None:
            backlog.append(ch)
        mid = self.selected.mailbox_id if self.selected is not None else None
        for ch in backlog:
            if mid is not None and (ch.mailbox_id is None or ch.mailbox_id == mid):
                self._dirty = True
            if self._notify is not None:
                self._notify_pending.append(ch)

    async def _refresh(self, *, allow_expunge: bool, force: bool = False,
                       silent: frozenset[Uid] = frozenset()) -> None:
        if self._notify is not None:
            await self._send_notifications()
        sel = self.selected
        if sel is None:
            return
        self._drain_feed()
        if not (self._dirty or force or (allow_expunge and sel.pending_expunge)):
            return
        self._dirty = False
        try:
            changes = await self.store.mailbox_changes(self.account_id, sel.mailbox_id, sel.modseq)
        except NotFound:
            # Another session deleted the selected mailbox; like Dovecot, end the session.
            await self._send(r.untagged("BYE Selected mailbox was deleted, have to disconnect"))
            await self._flush()
            self._deselect()
            self.state = State.LOGOUT
            raise MailboxGone() from None
        changes = await self._trimmed_history(changes, sel.modseq, sel.uids)
        res = sel.apply(changes, allow_expunge=allow_expunge, rev1=not self.rev2, silent_uids=silent)
        view = self._view
        if res.new and not self.rev2 and not sel.readonly and view is not None:
            # \Recent for messages arriving while selected (RFC 3501 §2.3.2): the first session of
            # this process to see them claims them, in memory (no durable write per arrival).
            # With `serve --workers N` a session of another process may see them too: the claim
            # is then the store's (one write, exact across processes).
            floor = view.claimed_upto
            if self.config.server.workers != 1 and any(u >= floor for u in res.new_uids):
                floor = max(floor, await self.store.claim_recent(self.account_id, sel.mailbox_id))
            mine = [u for u in res.new_uids if u >= floor]
            if mine:
                sel.recent.update(mine)
                view.claimed_upto = Uid(max(mine) + 1)
        for line in res.lines:
            await self._send(line)
        if res.new and not self.rev2:
            await self._send(b"* %d RECENT\r\n" % sel.recent_count())

    # ------------------------------------------------------------------------ QRESYNC (RFC 7162)
    async def _trimmed_history(self, changes: MailboxChanges, since: ModSeq,
                               known: Sequence[Uid]) -> MailboxChanges:
        """``changes`` itself, or, when the expunge history after ``since`` was trimmed
        (store/history.py), the same with the expunges worked out from the mailbox's contents:
        every UID of ``known`` that is no longer there."""
        if since >= changes.history_floor:
            return changes
        metas = await self.store.list_messages(self.account_id, changes.mailbox.id)
        present = {m.uid for m in metas}
        top = changes.mailbox.highestmodseq
        return MailboxChanges(changes.mailbox, tuple(m for m in metas if since < m.modseq <= top),
                              tuple(u for u in known if u not in present), changes.history_floor)

    async def _history_complete(self, mailbox_id: MailboxId, since: ModSeq) -> bool:
        """Whether the store still has every expunge after ``since``. A store that trims its
        expunge history (config.imap.expunge_history_days) says up to which modseq it dropped
        records with the optional ``expunge_history_floor(account, mailbox) -> ModSeq``; one
        without it never trims."""
        floor = getattr(self.store, "expunge_history_floor", None)
        if floor is None:
            return True
        return since >= int(await floor(self.account_id, mailbox_id))

    async def _vanished_since(self, sel: SelectedMailbox, since: ModSeq,
                              ranges: list[tuple[int, int]], after_uid: int = 0,
                              changes: MailboxChanges | None = None) -> str:
        """The uid-set of messages in ``ranges`` expunged after ``since`` (VANISHED (EARLIER)).
        With trimmed history: every UID of the ranges below UIDNEXT that is not in the mailbox
        (RFC 7162 §3.2.5.1 lets us name UIDs the client never saw, never ones that exist)."""
        if await self._history_complete(sel.mailbox_id, since):
            if changes is None:
                changes = await self.store.mailbox_changes(self.account_id, sel.mailbox_id, since)
            los = [a for a, _ in ranges]
            gone = []
            for u in changes.expunged:
                if u <= after_uid or u in sel.metas:
                    continue
                i = bisect_right(los, u) - 1
                if i >= 0 and u <= ranges[i][1]:
                    gone.append(u)
            return r.uid_set(gone)
        top = int(sel.uidnext) - 1
        uids = sel.uids
        out: list[tuple[int, int]] = []
        for lo, hi in ranges:
            lo, hi = max(lo, after_uid + 1), min(hi, top)
            if lo > hi:
                continue
            i = bisect_left(uids, lo)
            cur = lo
            while i < len(uids) and uids[i] <= hi:
                if uids[i] > cur:
                    out.append((cur, uids[i] - 1))
                cur = uids[i] + 1
                i += 1
            if cur <= hi:
                out.append((cur, hi))
        return _ranges_text(out)

    async def _resync(self, sel: SelectedMailbox, q: c.Qresync) -> None:
        """SELECT/EXAMINE (QRESYNC ...) with a matching UIDVALIDITY (RFC 7162 §3.2.5): what
        vanished since the client's modseq, then FETCH (UID FLAGS MODSEQ) of what changed."""
        since = ModSeq(q.modseq)
        top = max(int(sel.uidnext) - 1, 0)
        ranges = _ranges(q.known_uids, top) if q.known_uids is not None else [(1, top)]
        after = 0
        if q.seq_match is not None:
            # §3.2.5.2: pairs that still match tell us the client knows every expunge up to them.
            seqs, muids = (_expand(x) for x in q.seq_match)
            for sq, u in zip(seqs, muids, strict=False):
                if 1 <= sq <= sel.exists and sel.uids[sq - 1] == u:
                    after = u
                else:
                    break
        changes: MailboxChanges | None = None
        if since < sel.modseq:
            kept = self._qr_changes
            if (kept is not None and kept[0] == since and kept[1].mailbox.id == sel.mailbox_id
                    and kept[1].mailbox.uidvalidity == sel.uidvalidity
                    and kept[1].mailbox.highestmodseq >= sel.modseq):
                changes = kept[1]  # read by _catch_up already
            else:
                changes = await self.store.mailbox_changes(self.account_id, sel.mailbox_id, since)
        self._qr_changes = None
        if changes is not None or not await self._history_complete(sel.mailbox_id, since):
            gone = await self._vanished_since(sel, since, ranges, after, changes)
            if gone:
                await self._send(b"* VANISHED (EARLIER) " + gone.encode() + b"\r\n")
        if changes is None:
            return
        los = [a for a, _ in ranges]
        rev1 = not self.rev2
        out: list[bytes] = []
        for m in changes.changed:
            meta = sel.metas.get(m.uid)
            if meta is None or meta.modseq <= since:
                continue  # not in this view yet (a later refresh tells), or not newer
            i = bisect_right(los, m.uid) - 1
            if i < 0 or m.uid > ranges[i][1]:
                continue
            seq = sel.seq_of(m.uid)
            if seq is not None:
                out.append(sel.flags_line(seq, m.uid, rev1))
        for line in out:
            await self._send(line)

    # ------------------------------------------------------------------------- QUOTA (RFC 9208)
    async def _quota_resources(self) -> list[str]:
        acct = await self.store.get_account_by_id(self.account_id) or self.account
        assert acct is not None
        out = []
        if acct.quota_bytes is not None:
            # §5.1.1: STORAGE is in units of 1024 octets.
            out.append(f"STORAGE {acct.used_bytes // 1024} {acct.quota_bytes // 1024}")
        if acct.quota_messages is not None:
            out.append(f"MESSAGE {acct.used_messages} {acct.quota_messages}")
        return out

    async def _getquota(self, cmd: c.GetQuota) -> None:
        res = await self._quota_resources()
        if cmd.root != "" or not res:
            raise CommandRefused("No such quota root", "NONEXISTENT")
        await self._send(b'* QUOTA "" (' + " ".join(res).encode() + b")\r\n")
        await self._ok(cmd.tag, "GETQUOTA completed")

    async def _getquotaroot(self, cmd: c.GetQuotaRoot) -> None:
        mb = await self._mailbox(cmd.mailbox)
        res = await self._quota_resources()
        # One root, "", for every mailbox of the account (Dovecot's "User quota" in spirit).
        await self._send(b"* QUOTAROOT " + self._wire_name(mb.name) + (b' ""' if res else b"")
                         + b"\r\n")
        if res:
            await self._send(b'* QUOTA "" (' + " ".join(res).encode() + b")\r\n")
        await self._ok(cmd.tag, "GETQUOTAROOT completed")

    async def _setquota(self, cmd: c.SetQuota) -> None:
        # RFC 9208 §4.1.3: users may not set their own limits; the admin CLI does.
        raise CommandRefused("Quota limits are set by the administrator", "NOPERM")

    # ------------------------------------------------------------------------------ selected
    @property
    def sel(self) -> SelectedMailbox:
        assert self.selected is not None
        return self.selected

    def _resolve(self, seqset: c.SeqSet, uid: bool) -> list[Uid]:
        if seqset.saved:
            # RFC 5182 §2.1: "$" is the saved result, minus what was expunged since.
            return [u for u in self._saved if u in self.sel.metas]
        return self.sel.resolve_uid(seqset) if uid else self.sel.resolve_seq(seqset)

    async def _check(self, cmd: c.Check) -> None:
        await self._refresh(allow_expunge=True)
        await self._ok(cmd.tag, "CHECK completed")

    async def _close(self, cmd: c.Close) -> None:
        sel = self.sel
        if not sel.readonly:
            # RFC 9051 §6.4.1: expunge silently (mbsync relies on it); EXAMINE: nothing.
            await self.store.expunge(self.account_id, sel.mailbox_id)
        self._deselect()
        await self._ok(cmd.tag, "CLOSE completed")

    async def _unselect(self, cmd: c.Unselect) -> None:
        self._deselect()
        await self._ok(cmd.tag, "UNSELECT completed")

    async def _expunge(self, cmd: c.Expunge) -> None:
        sel = self.sel
        if sel.readonly:
            raise CommandRefused("Mailbox is read-only", "READ-ONLY")
        uids: list[Uid] | None = None
        if cmd.uids is not None:
            uids = self._resolve(cmd.uids, True)
            if not uids:
                await self._refresh(allow_expunge=True)
                await self._ok(cmd.tag, "EXPUNGE completed")
                return
        gone = await self.store.expunge(self.account_id, sel.mailbox_id, uids)
        for line in sel.remove_now(gone):
            await self._send(line)
        self._dirty = True
        await self._refresh(allow_expunge=True)
        await self._ok(cmd.tag, "EXPUNGE completed")

    async def _replace(self, cmd: c.Replace) -> None:
        """RFC 8508: APPEND the new version, then expunge the old one, in that order."""
        sel = self.sel
        if sel.readonly:
            raise CommandRefused("Mailbox is read-only", "READ-ONLY")
        found = self._resolve(c.SeqSet(((cmd.target, cmd.target),)), cmd.uid)
        found = [u for u in found if u not in sel.pending_expunge]
        if not found:
            raise CommandRefused("No such message", "NONEXISTENT")
        old = found[0]
        dest = await self._target_mailbox(cmd.mailbox)
        m = cmd.message
        if len(m.data) > self.config.imap.max_append_bytes:
            raise CommandRefused("Message too large", "TOOBIG")
        if not m.data:
            raise CommandRefused("Cannot store an empty message", "CANNOT")
        flags = frozenset(f for f in m.flags if f != "\\Recent")
        if any(f.startswith("\\") and f not in SYSTEM_FLAGS for f in flags):
            raise CommandBad("Unknown system flag")
        res = await self.store.append(self.account_id, dest.id, m.data, flags, m.internaldate)
        await self.store.delete_messages(self.account_id, sel.mailbox_id, [old])
        await self._send(untagged_ok("Replacement message added", f"APPENDUID {res.uidvalidity} {res.uid}"))
        for line in sel.remove_now([old]):
            await self._send(line)
        self._dirty = True
        await self._refresh(allow_expunge=True)
        await self._ok(cmd.tag, "REPLACE completed")

    async def _copy(self, cmd: c.Copy) -> None:
        await self._copy_or_move(cmd.tag, cmd.seqset, cmd.mailbox, cmd.uid, move=False)

    async def _move(self, cmd: c.Move) -> None:
        await self._copy_or_move(cmd.tag, cmd.seqset, cmd.mailbox, cmd.uid, move=True)

    async def _copy_or_move(self, tag: str, seqset: c.SeqSet, mailbox: str, uid: bool,
                            move: bool) -> None:
        sel = self.sel
        uids = self._resolve(seqset, uid)
        if move and sel.readonly:
            raise CommandRefused("Mailbox is read-only", "READ-ONLY")
        dest = await self._target_mailbox(mailbox)
        uids = [u for u in uids if u not in sel.pending_expunge]
        word = "MOVE" if move else "COPY"
        if not uids:
            await self._refresh(allow_expunge=uid)
            await self._ok(tag, f"{word} completed")
            return
        if move and dest.id == sel.mailbox_id:
            raise CommandRefused("Source and destination are the same mailbox", "CANNOT")
        if move:
            res = await self.store.move_messages(self.account_id, sel.mailbox_id, uids, dest.id)
        else:
            res = await self.store.copy_messages(self.account_id, sel.mailbox_id, uids, dest.id)
        pairs = sorted(zip(res.source_uids, res.dest_uids, strict=False))
        code = (f"COPYUID {res.uidvalidity} {r.uid_set(p[0] for p in pairs)} "
                f"{r.uid_set(p[1] for p in pairs)}") if pairs else None
        if move:
            # RFC 6851 §4.3: COPYUID goes in an untagged OK before the EXPUNGEs.
            if code:
                await self._send(untagged_ok("Moved UIDs", code))
            for line in sel.remove_now(res.source_uids):
                await self._send(line)
            self._dirty = True
            await self._refresh(allow_expunge=True)
            await self._ok(tag, f"{word} completed")
        else:
            self._dirty = True
            await self._refresh(allow_expunge=uid)
            await self._ok(tag, f"{word} completed", code)

    async def _store(self, cmd: c.Store) -> None:
        sel = self.sel
        uids = self._resolve(cmd.seqset, cmd.uid)
        if sel.readonly:
            raise CommandRefused("Mailbox is read-only", "READ-ONLY")
        if any(f.startswith("\\") and f not in SYSTEM_FLAGS for f in cmd.flags):
            raise CommandBad("Unknown system flag")
        uids = [u for u in uids if u not in sel.pending_expunge]
        op = {"+": FlagOp.ADD, "-": FlagOp.REMOVE, "": FlagOp.REPLACE}[cmd.op]
        if cmd.unchangedsince is not None:
            self._enable_condstore()
        silent: frozenset[Uid] = frozenset()
        modified: list[Uid] = []
        if uids:
            res = await self.store.store_flags(self.account_id, sel.mailbox_id, uids, op, cmd.flags,
                                               None if cmd.unchangedsince is None
                                               else ModSeq(cmd.unchangedsince))
            sel.update_metas(res.updated)
            sel.update_metas(res.unchanged)
            modified = sorted(res.modified)
            updated = {m.uid for m in res.updated}
            touched = sorted(updated | {m.uid for m in res.unchanged})
            rev1 = not self.rev2
            for u in touched:
                seq = sel.seq_of(u)
                if seq is None:
                    continue
                uid_part = b"UID %d " % u if cmd.uid else b""
                # RFC 7162 §3.1.3: with CONDSTORE on, a changed message is told with its MODSEQ
                # even for .SILENT.
                mod = b"MODSEQ (%d)" % sel.metas[u].modseq if self.condstore else b""
                if not cmd.silent:
                    await self._send(b"* %d FETCH (%sFLAGS %s%s)\r\n"
                                     % (seq, uid_part, r.flag_list(sel.flags_of(u, rev1)),
                                        b" " + mod if mod else b""))
                elif mod and u in updated:
                    await self._send(b"* %d FETCH (%s%s)\r\n" % (seq, uid_part, mod))
            silent = frozenset(touched)
        self._dirty = True
        await self._refresh(allow_expunge=cmd.uid, silent=silent)
        if modified:
            if cmd.uid:
                nums = r.uid_set(modified)
            else:
                nums = r.uid_set(s for u in modified if (s := sel.seq_of(u)) is not None)
            await self._ok(cmd.tag, "Conditional STORE failed", f"MODIFIED {nums}")
            return
        await self._ok(cmd.tag, "STORE completed")

    # ------------------------------------------------------------------------------- messages
    async def _info(self, meta: MessageMeta) -> MessageInfo:
        hit = self._infos.get(meta.blob_id)
        if isinstance(hit, MessageInfo):
            return hit
        try:
            info = MessageInfo.from_json(await self.store.message_info(meta.blob_id))
        except (ValueError, KeyError, TypeError, IndexError):
            info = mail.parse_message(await self.store.read_blob(meta.blob_id))
        self._infos.put(meta.blob_id, info)
        return info

    async def _data(self, meta: MessageMeta) -> bytes:
        """The message bytes; small ones come from the process-wide cache."""
        if meta.size > SMALL_BLOB_BYTES:
            return await self.store.read_blob(meta.blob_id)
        data = self._blobs.get(meta.blob_id)
        if data is None:
            data = await self.store.read_blob(meta.blob_id)
            self._blobs.put(meta.blob_id, data, len(data))
        return data

    async def _fetch(self, cmd: c.Fetch) -> None:
        sel = self.sel
        uids = self._resolve(cmd.seqset, cmd.uid)
        items = cmd.items
        self._spec_keys.clear()
        self._plan = None
        self._flag_lists.clear()
        if cmd.vanished and not self.qresync:
            raise CommandBad("VANISHED needs ENABLE QRESYNC (RFC 7162 §3.2.6)")
        if cmd.changedsince is not None or any(i.name == "MODSEQ" for i in items):
            self._enable_condstore()
        if cmd.changedsince is not None:
            since = cmd.changedsince
            if cmd.vanished:
                gone = await self._vanished_since(sel, ModSeq(since), _ranges(cmd.seqset, sel.uidnext - 1))
                if gone:
                    await self._send(b"* VANISHED (EARLIER) " + gone.encode() + b"\r\n")
            uids = [u for u in uids if u in sel.metas and sel.metas[u].modseq > since]
        sets_seen = not sel.readonly and any(
            (i.name in ("BODY[]", "BINARY") and not i.peek) or i.name in ("RFC822", "RFC822.TEXT")
            for i in items)
        seen_now: set[Uid] = set()
        if sets_seen:
            to_mark = [u for u in uids if u in sel.metas and "\\Seen" not in sel.metas[u].flags
                       and u not in sel.pending_expunge]
            if to_mark:
                res = await self.store.store_flags(self.account_id, sel.mailbox_id, to_mark,
                                                   FlagOp.ADD, frozenset({"\\Seen"}))
                sel.update_metas(res.updated)
                seen_now = {m.uid for m in res.updated}
        add_flags = bool(seen_now) and not any(i.name == "FLAGS" for i in items)
        needs_info = any(_att_needs_info(i) for i in items)
        needs_data = any(_needs_data(i) for i in items)
        simple = not needs_info and not needs_data
        rev1 = not self.rev2
        missing = False
        if simple and not add_flags:
            await self._fetch_fast(uids, items, rev1)
            uids = []
        all_uids = sel.uids
        pos = bisect_left(all_uids, uids[0]) if uids else 0
        batch: list[tuple[int, MessageMeta]] = []
        batch_bytes = 0
        for uid in uids:
            meta = sel.metas.get(uid)
            # Both lists ascend: walk instead of a bisect per message.
            while pos < len(all_uids) and all_uids[pos] < uid:
                pos += 1
            if meta is None or pos >= len(all_uids) or all_uids[pos] != uid:
                continue
            seq = pos + 1
            if simple:
                await self._send(self._fetch_simple(seq, meta, items, rev1, uid in seen_now and add_flags))
                continue
            batch.append((seq, meta))
            batch_bytes += meta.size
            if len(batch) >= PREFETCH_MESSAGES or batch_bytes >= PREFETCH_BYTES:
                missing = await self._fetch_batch(batch, items, rev1, seen_now if add_flags else set(),
                                                  needs_info, needs_data) or missing
                batch, batch_bytes = [], 0
        if batch:
            missing = await self._fetch_batch(batch, items, rev1, seen_now if add_flags else set(),
                                              needs_info, needs_data) or missing
        self._dirty = self._dirty or bool(seen_now)
        await self._refresh(allow_expunge=cmd.uid, silent=frozenset(seen_now))
        if missing:
            await self._send(r.tagged(cmd.tag, "NO", "Some messages were expunged", "EXPUNGEISSUED"))
            return
        await self._ok(cmd.tag, "FETCH completed")

    def _simple_att(self, att: c.FetchAtt, meta: MessageMeta, rev1: bool) -> bytes:
        name = att.name
        if name == "UID":
            return b"UID %d" % meta.uid
        if name == "FLAGS":
            return b"FLAGS " + r.flag_list(self.sel.flags_of(meta.uid, rev1))
        if name == "INTERNALDATE":
            return b"INTERNALDATE " + r.internaldate(meta.internaldate)
        if name == "RFC822.SIZE":
            return b"RFC822.SIZE %d" % meta.size
        if name == "MODSEQ":
            return b"MODSEQ (%d)" % meta.modseq
        if name == "SAVEDATE":
            return b"SAVEDATE " + (r.internaldate(meta.savedate) if meta.savedate else b"NIL")
        if name == "EMAILID":
            return b"EMAILID (" + email_id(meta).encode() + b")"
        if name == "THREADID":
            return b"THREADID NIL"
        raise AssertionError(name)

    async def _fetch_fast(self, uids: list[Uid], items: tuple[c.FetchAtt, ...], rev1: bool) -> None:
        """Metadata-only FETCH (mbsync's ``UID FETCH 1:* (UID FLAGS)``): one pass, cached flag
        lists, output in 64 KiB batches."""
        sel = self.sel
        metas = sel.metas
        all_uids = sel.uids
        recent = sel.recent if rev1 else set()
        flag_cache: dict[frozenset[str], bytes] = {}
        names = [a.name for a in items]
        uid_flags = names in (["UID", "FLAGS"], ["FLAGS", "UID"])
        out: list[bytes] = []
        size = 0
        pos = bisect_left(all_uids, uids[0]) if uids else 0
        n = len(all_uids)
        for uid in uids:
            while pos < n and all_uids[pos] < uid:
                pos += 1
            if pos >= n or all_uids[pos] != uid:
                continue
            meta = metas[uid]
            flags = meta.flags | {"\\Recent"} if uid in recent else meta.flags
            fl = flag_cache.get(flags)
            if fl is None:
                fl = flag_cache[flags] = r.flag_list(flags)
            if uid_flags:
                if names[0] == "UID":
                    line = b"* %d FETCH (UID %d FLAGS %s)\r\n" % (pos + 1, uid, fl)
                else:
                    line = b"* %d FETCH (FLAGS %s UID %d)\r\n" % (pos + 1, fl, uid)
            else:
                parts = [b"FLAGS " + fl if a.name == "FLAGS" else self._simple_att(a, meta, rev1)
                         for a in items]
                line = b"* %d FETCH (%s)\r\n" % (pos + 1, b" ".join(parts))
            out.append(line)
            size += len(line)
            if size >= WRITE_BATCH:
                await self._send(b"".join(out))
                out.clear()
                size = 0
        if out:
            await self._send(b"".join(out))

    def _fetch_simple(self, seq: int, meta: MessageMeta, items: tuple[c.FetchAtt, ...], rev1: bool,
                      add_flags: bool) -> bytes:
        parts = [self._simple_att(a, meta, rev1) for a in items]
        if add_flags:
            parts.append(b"FLAGS " + r.flag_list(self.sel.flags_of(meta.uid, rev1)))
        return b"* %d FETCH (%s)\r\n" % (seq, b" ".join(parts))

    async def _fetch_batch(self, batch: list[tuple[int, MessageMeta]], items: tuple[c.FetchAtt, ...],
                           rev1: bool, seen_now: set[Uid], needs_info: bool, needs_data: bool) -> bool:
        """Load a few messages at once (the store reads in parallel threads), then answer in
        order. Returns True when some message had gone meanwhile."""
        plan = self._fetch_plan(items)
        loads: list[tuple[MessageInfo | None, bytes | None, bool] | BaseException | None] = [
            self._load_nowait(meta, plan, needs_info, needs_data) for _, meta in batch]
        todo = [i for i, x in enumerate(loads) if x is None]
        if todo:
            got = await asyncio.gather(*(self._load(batch[i][1], items, needs_info, needs_data)
                                         for i in todo), return_exceptions=True)
            for i, x in zip(todo, got, strict=True):
                loads[i] = x
        missing = False
        for (seq, meta), loaded in zip(batch, loads, strict=True):
            if isinstance(loaded, NotFound):
                missing = True
                continue
            if isinstance(loaded, BaseException):
                raise loaded
            assert loaded is not None
            info, data, stream = loaded
            await self._fetch_full(seq, meta, plan, rev1, meta.uid in seen_now, info, data, stream)
        return missing

    def _fetch_plan(self, items: tuple[c.FetchAtt, ...]) -> _FetchPlan:
        """What each attribute of a FETCH needs, worked out once per command instead of once per
        message (labels, section cache keys)."""
        if self._plan is not None and self._plan.items is items:
            return self._plan
        steps: list[tuple[c.FetchAtt, int, bytes, str]] = []
        field_keys: list[str] = []
        other_data = False
        for att in items:
            name = att.name
            sec = att.section
            if name == "UID":
                steps.append((att, _K_UID, b"", ""))
            elif name == "FLAGS":
                steps.append((att, _K_FLAGS, b"", ""))
            elif name == "RFC822.SIZE":
                steps.append((att, _K_SIZE, b"", ""))
            elif name in ("ENVELOPE", "BODY", "BODYSTRUCTURE"):
                steps.append((att, _K_INFO, name.encode() + b" ", ""))
            elif not _needs_data(att):
                steps.append((att, _K_SIMPLE, b"", ""))
            elif name == "BODY[]" and sec is not None and sec.fields and not sec.part:
                # what _cached_fields finds; the label is _section_answer's for a cache hit
                label = b"BODY[" + sec.spec().encode("utf-8") + b"]"
                if att.partial is not None:
                    label += b"<%d>" % att.partial[0]
                key = self._spec_key(sec)
                steps.append((att, _K_FIELDS, label + b" ", key))
                field_keys.append(key)
            else:
                steps.append((att, _K_OTHER, b"", ""))
                other_data = True
        self._plan = _FetchPlan(items, tuple(steps), tuple(field_keys), other_data)
        return self._plan

    def _cached_fields(self, att: c.FetchAtt, meta: MessageMeta) -> bytes | None:
        sec = att.section
        if att.name != "BODY[]" or sec is None or not sec.fields or sec.part:
            return None
        return self._sections.get((meta.blob_id, self._spec_key(sec)))

    def _spec_key(self, sec: c.Section) -> str:
        """The cache key of a section: computed once per command, not once per message."""
        key = self._spec_keys.get(id(sec))
        if key is None or key[0] is not sec:
            key = (sec, sec.spec().lower())
            self._spec_keys[id(sec)] = key
        return key[1]

    def _load_nowait(self, meta: MessageMeta, plan: _FetchPlan, needs_info: bool,
                     needs_data: bool) -> tuple[MessageInfo | None, bytes | None, bool] | None:
        """What _load would give, from the caches alone; None when the store must be asked."""
        if meta.size > STREAM_MIN_BYTES:
            return None
        info: MessageInfo | None = None
        if needs_info:
            hit = self._infos.get(meta.blob_id)
            if not isinstance(hit, MessageInfo):
                return None
            info = hit
        data: bytes | None = None
        peek = self._sections.peek
        blob_id = meta.blob_id
        if needs_data and (plan.other_data or any(peek((blob_id, k)) is None for k in plan.field_keys)):
            data = self._blobs.get(meta.blob_id)
            if data is None:
                return None
        return info, data, False

    async def _load(self, meta: MessageMeta, items: tuple[c.FetchAtt, ...], needs_info: bool,
                    needs_data: bool) -> tuple[MessageInfo | None, bytes | None, bool]:
        if needs_data and all(self._cached_fields(i, meta) is not None for i in items if _needs_data(i)):
            needs_data = False
        # Stream whole-message answers of big messages straight from the blob (issue 3 §9).
        stream = meta.size > STREAM_MIN_BYTES and all(
            (i.name in ("RFC822", "BODY[]") and i.section is not None and i.section.spec() == "")
            or i.name == "RFC822" or not _needs_data(i) for i in items)
        data: bytes | None = None
        if needs_data and not stream:
            if needs_info:
                both = await asyncio.gather(self._info(meta), self._data(meta))
                return both[0], both[1], stream
            data = await self._data(meta)
        info = await self._info(meta) if needs_info else None
        return info, data, stream

    async def _fetch_full(self, seq: int, meta: MessageMeta, plan: _FetchPlan, rev1: bool,
                          add_flags: bool, info: MessageInfo | None, data: bytes | None,
                          stream: bool) -> None:
        put = self._wbuf.extend  # small pieces go straight into the batch; big ones are flushed
        put(b"* %d FETCH (" % seq)
        sections = self._sections
        first = True
        for att, kind, label, key in plan.steps:
            if not first:
                put(b" ")
            first = False
            if kind == _K_UID:
                put(b"UID %d" % meta.uid)
                continue
            if kind == _K_FLAGS:
                put(b"FLAGS " + self._flag_list(self.sel.flags_of(meta.uid, rev1)))
                continue
            if kind == _K_SIZE:
                put(b"RFC822.SIZE %d" % meta.size)
                continue
            if kind == _K_FIELDS:
                cached = sections.get((meta.blob_id, key))
                if cached is not None:
                    if att.partial is not None:
                        cached = cached[att.partial[0] : att.partial[0] + att.partial[1]]
                    put(label + b"{%d}\r\n" % len(cached))
                    put(cached)
                    if len(self._wbuf) >= WRITE_BATCH:
                        await self._flush()
                    continue
            elif kind == _K_INFO:
                assert info is not None
                name = att.name
                ikey = (meta.blob_id, name)
                value = sections.get(ikey)
                if value is None:
                    if name == "ENVELOPE":
                        value = mail.imap_envelope(info)
                    else:
                        value = mail.imap_bodystructure(info, name == "BODYSTRUCTURE")
                    sections.put(ikey, value, len(value) + 100)
                put(label)
                put(value)
                continue
            elif kind == _K_SIMPLE:
                put(self._simple_att(att, meta, rev1))
                continue
            name = att.name
            if name == "PREVIEW":
                assert info is not None
                if data is None:
                    data = await self._data(meta)
                put(b"PREVIEW " + r.quoted(preview_text(data, info)))
                continue
            label, payload, binary = self._section_answer(att, data, info, meta)
            if payload is None:
                # whole message, streamed
                start, length = 0, meta.size
                if att.partial is not None:
                    start = min(att.partial[0], meta.size)
                    length = max(0, min(att.partial[1], meta.size - start))
                put(label + b" " + r.literal_header(length))
                await self._stream_blob(meta.blob_id, start, length)
                continue
            if isinstance(payload, int):
                put(label + b" %d" % payload)
                continue
            put(label + b" " + r.literal_header(len(payload), binary))
            if len(payload) > WRITE_BATCH:
                await self._flush()
                await self.out.write(payload)
            else:
                put(payload)
        if add_flags:
            put(b" FLAGS " + self._flag_list(self.sel.flags_of(meta.uid, rev1)))
        put(b")\r\n")
        if len(self._wbuf) >= WRITE_BATCH:
            await self._flush()

    def _flag_list(self, flags: frozenset[str]) -> bytes:
        """r.flag_list, remembered for the command (a mailbox has few distinct flag sets)."""
        fl = self._flag_lists.get(flags)
        if fl is None:
            fl = self._flag_lists[flags] = r.flag_list(flags)
        return fl

    async def _stream_blob(self, blob_id: BlobId, start: int, length: int) -> None:
        await self._flush()
        reader = await self.store.open_blob(blob_id)
        try:
            pos = start
            end = start + length
            while pos < end:
                chunk = await reader.read(pos, min(STREAM_CHUNK, end - pos))
                if not chunk:
                    raise NotFound("blob shorter than recorded")
                await self.out.write(chunk)
                pos += len(chunk)
        finally:
            await reader.close()

    def _section_answer(self, att: c.FetchAtt, data: bytes | None, info: MessageInfo | None,
                        meta: MessageMeta) -> tuple[bytes, bytes | int | None, bool]:
        """(label, payload, binary): payload None means "stream the whole message"."""
        name = att.name
        if name == "RFC822":
            return b"RFC822", (data if data is not None else None), False
        cached = self._cached_fields(att, meta)
        if cached is not None:
            label = b"BODY[" + att.section.spec().encode("utf-8") + b"]"  # type: ignore[union-attr]
            if att.partial is not None:
                cached = cached[att.partial[0] : att.partial[0] + att.partial[1]]
                label += b"<%d>" % att.partial[0]
            return label, cached, False
        if data is None:
            # streaming case: BODY[] / BODY[]<partial>
            sec = att.section
            label = b"BODY[]"
            if att.partial is not None:
                label += b"<%d>" % att.partial[0]
            assert sec is not None
            return label, None, False
        if name == "RFC822.HEADER":
            return b"RFC822.HEADER", data[: header_end(data, 0, len(data))[1]], False
        if name == "RFC822.TEXT":
            return b"RFC822.TEXT", data[header_end(data, 0, len(data))[1] :], False
        sec = att.section or c.Section()
        part = ".".join(str(p) for p in sec.part)
        if info is None:
            # top-level sections need only the bytes (RFC 9051 §6.4.5)
            label = (b"BINARY[]" if name == "BINARY" else b"BODY[" + sec.spec().encode("utf-8") + b"]")
            if name == "BINARY.SIZE":
                return b"BINARY.SIZE[]", len(data), False
            if sec.fields:
                key = (meta.blob_id, self._spec_key(sec))
                cached = self._sections.get(key)
                if cached is None:
                    cached = _top_section(data, sec)
                    self._sections.put(key, cached, len(cached) + 100)
                payload = cached
            else:
                payload = _top_section(data, sec)
        elif name in ("BINARY", "BINARY.SIZE"):
            decoded = mail.decoded_part_bytes(data, info, part)
            if decoded is None:
                raise CommandRefused("Unknown Content-Transfer-Encoding", "UNKNOWN-CTE")
            if name == "BINARY.SIZE":
                return b"BINARY.SIZE[" + part.encode() + b"]", len(decoded), False
            label = b"BINARY[" + part.encode() + b"]"
            payload = decoded
        else:
            label = b"BODY[" + sec.spec().encode("utf-8") + b"]"
            if sec.text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
                payload = mail.header_fields(data, info, part, list(sec.fields),
                                             sec.text == "HEADER.FIELDS.NOT")
            else:
                spec = part + ("." + sec.text if part and sec.text else sec.text)
                payload = mail.section_bytes(data, info, spec)
        if att.partial is not None:
            start, length = att.partial
            payload = payload[start : start + length]
            label += b"<%d>" % start
        return label, payload, name == "BINARY" and b"\x00" in payload

    # --------------------------------------------------------------------------------- search
    # ---------------------------------------------------------------- SORT / THREAD (RFC 5256)
    async def _sort_keys_of(self, metas: list[MessageMeta]) -> list[st.SortKeys | None]:
        """Sort keys per message (None: expunged meanwhile): from the process-wide cache (blobs
        never change), else from the keys the store made at ingest (the whole mailbox in one
        query), else from each message's cached MessageInfo, loaded 64 at a time."""
        cache = self._sort_keys
        keys = cache.peek_many([m.blob_id for m in metas])
        if None not in keys:
            return keys
        todo = [i for i, k in enumerate(keys) if k is None]
        if len(todo) > 64:
            rows = await self.store.sort_rows(self.account_id, self.sel.mailbox_id)
            if rows:
                by_uid = dict(rows)
                fresh: list[tuple[str, st.SortKeys]] = []
                for i in todo:
                    m = metas[i]
                    got_keys = by_uid.get(m.uid)
                    if got_keys is not None:
                        keys[i] = got_keys
                        fresh.append((m.blob_id, got_keys))
                cache.put_many(fresh)
                todo = [i for i in todo if keys[i] is None]
        if not todo:
            return keys
        missing = list({metas[i].blob_id: metas[i] for i in todo}.values())
        for k in range(0, len(missing), 64):
            chunk = missing[k : k + 64]
            got = await asyncio.gather(*(self._info(m) for m in chunk), return_exceptions=True)
            for m, inf in zip(chunk, got, strict=True):
                if isinstance(inf, MessageInfo):
                    cache.put(m.blob_id, st.keys_from_row(sort_row(inf)))
                elif not isinstance(inf, NotFound):
                    raise inf
        peek = cache.peek
        for i in todo:
            keys[i] = peek(metas[i].blob_id)
        return keys

    def _result_key(self, what: tuple[object, ...], matches: list[tuple[int, Uid]], uid: bool) -> tuple[object, ...]:
        """Key of a SORT/THREAD answer: the same messages (uids, and seqs when those are the
        answer) of the same mailbox give the same answer, since sort keys come from blobs that
        never change. A client refreshing its threaded view asks again and again."""
        sel = self.sel
        return (sel.mailbox_id, sel.uidvalidity, what, uid, tuple([u for _, u in matches]),
                None if uid else tuple([q for q, _ in matches]))

    async def _sort_items(self, matches: list[tuple[int, Uid]]) -> list[st.Item]:
        all_metas = self.sel.metas
        keys = await self._sort_keys_of([all_metas[u] for _, u in matches])
        return self._items_of(matches, keys)

    def _items_of(self, matches: list[tuple[int, Uid]], keys: list[st.SortKeys | None]) -> list[st.Item]:
        all_metas = self.sel.metas
        make = st.item
        out = []
        for (seq, uid), k in zip(matches, keys, strict=True):
            if k is not None:  # else expunged meanwhile
                meta = all_metas[uid]
                out.append(make(seq, uid, meta.size, meta.internaldate.timestamp(), k))
        return out

    async def _sort_one(self, matches: list[tuple[int, Uid]], name: str, reverse: bool,
                        uid: bool) -> list[int]:
        """One sort criterion (what clients send): keys straight into a list and one stable
        sort of positions, without an Item per message. With the keys not cached yet (the
        first SORT after a start), only the one key is loaded, for the whole mailbox at once."""
        all_metas = self.sel.metas
        metas = [all_metas[u] for _, u in matches]
        attr = "date" if name == "DATE" else st.KEY_ATTRS.get(name)
        keys: list[Any] = self._sort_keys.peek_many([m.blob_id for m in metas])
        if attr is not None and keys.count(None) > 64:
            column = await self.store.sort_column(self.account_id, self.sel.mailbox_id, attr)
            if column is not None:
                got = [column.get(m.uid, _NO_KEY) for m in metas]
                if _NO_KEY not in got:  # else some are not indexed: the full keys below
                    keys = got
                    attr = None if name == "DATE" else ""
        if attr is not None:
            keys = await self._sort_keys_of(metas)
        vals: list[Any]
        if name == "ARRIVAL":
            vals = [m.internaldate for m in metas]
        elif name == "SIZE":
            vals = [m.size for m in metas]
        elif attr is None:  # DATE from the one column: (sent date or None) per message
            vals = [k if k is not None else m.internaldate.timestamp() for m, k in zip(metas, keys, strict=True)]
            keys = metas  # every message has its value
        elif attr == "":  # another key from the one column
            vals = keys
        elif name == "DATE":
            vals = [k.date if k is not None and k.date is not None else m.internaldate.timestamp()
                    for m, k in zip(metas, keys, strict=True)]
        else:
            vals = [getattr(k, attr) if k is not None else "" for k in keys]
        order = sorted(range(len(vals)), key=vals.__getitem__, reverse=reverse)
        col = 1 if uid else 0
        return [matches[i][col] for i in order if keys[i] is not None]

    async def _sort(self, cmd: c.Sort) -> None:
        if cmd.charset not in ("UTF-8", "US-ASCII"):
            raise CommandRefused("Unsupported charset", "BADCHARSET (UTF-8 US-ASCII)")
        matches = await self._search_matches(self._bind_saved(cmd.key))
        values: list[int]
        memo = self._result_key(("SORT", *cmd.criteria), matches, cmd.uid)
        hit = self._st_results.get(memo)
        if isinstance(hit, list):
            values = hit
        elif len(cmd.criteria) == 1:
            values = await self._sort_one(matches, cmd.criteria[0][0], cmd.criteria[0][1], cmd.uid)
        else:
            ordered = st.sort_order(await self._sort_items(matches), cmd.criteria)
            values = [it.uid if cmd.uid else it.seq for it in ordered]
        if len(values) == len(matches):  # nothing expunged meanwhile: the answer is the answer
            self._st_results.put(memo, values)
        if cmd.return_opts is None:
            await self._send(b"* SORT" + b"".join(b" %d" % v for v in values) + b"\r\n")
        else:
            # RFC 5267 §3.2 ESORT: MIN/MAX are the first/last in sort order; ALL keeps the order.
            opts = cmd.return_opts or ("ALL",)
            out = f'* ESEARCH (TAG "{cmd.tag}")' + (" UID" if cmd.uid else "")
            if "MIN" in opts and values:
                out += f" MIN {values[0]}"
            if "MAX" in opts and values:
                out += f" MAX {values[-1]}"
            if "ALL" in opts and values:
                out += f" ALL {_ordered_set(values)}"
            if "COUNT" in opts:
                out += f" COUNT {len(values)}"
            if "PARTIAL" in opts and cmd.partial is not None:
                out += " PARTIAL " + _partial(values, cmd.partial, ordered=True)
            await self._send(out.encode() + b"\r\n")
        await self._refresh(allow_expunge=cmd.uid)
        await self._ok(cmd.tag, "SORT completed")

    async def _thread(self, cmd: c.Thread) -> None:
        if cmd.charset not in ("UTF-8", "US-ASCII"):
            raise CommandRefused("Unsupported charset", "BADCHARSET (UTF-8 US-ASCII)")
        if cmd.algorithm not in ("ORDEREDSUBJECT", "REFERENCES"):
            raise CommandBad("Unknown threading algorithm")
        matches = await self._search_matches(self._bind_saved(cmd.key))
        memo = self._result_key(("THREAD", cmd.algorithm), matches, cmd.uid)
        text = self._st_results.get(memo)
        if not isinstance(text, str):
            algo = st.thread_references if cmd.algorithm == "REFERENCES" else st.thread_orderedsubject
            keys = await self._sort_keys_of([self.sel.metas[u] for _, u in matches])
            with _no_gc():  # 2 objects per message, all garbage in a moment: no collector passes
                items = self._items_of(matches, keys)
                text = st.format_threads(algo(items), cmd.uid)
                del items
            if None not in keys:
                self._st_results.put(memo, text)
        await self._send(b"* THREAD " + text.encode() + b"\r\n" if text else b"* THREAD\r\n")
        await self._refresh(allow_expunge=cmd.uid)
        await self._ok(cmd.tag, "THREAD completed")

    def _bind_saved(self, key: c.SearchKey) -> c.SearchKey:
        """``$`` (RFC 5182) in a search program: the saved UIDs."""
        if key.op == "SAVED" or (key.op in ("SEQ", "UID") and isinstance(key.args[0], c.SeqSet)
                                 and key.args[0].saved):
            return c.SearchKey("UIDIN", (frozenset(self._saved),))
        if any(isinstance(a, c.SearchKey) for a in key.args):
            return c.SearchKey(key.op, tuple(self._bind_saved(a) if isinstance(a, c.SearchKey) else a
                                             for a in key.args))
        return key

    async def _search_matches(self, key: c.SearchKey,
                              sel: SelectedMailbox | None = None) -> list[tuple[int, Uid]]:
        """(seq, uid) of the messages matching ``key``, ascending: of the selected mailbox, or of
        ``sel`` (another mailbox's read-only view, for MULTISEARCH in imap/multisearch.py)."""
        sel = self.sel if sel is None else sel
        if key.op == "ALL":
            return [(i, u) for i, u in enumerate(sel.uids, 1)]
        needs = _search_needs(key)
        now = datetime.now(UTC)
        matches: list[tuple[int, Uid]] = []
        rev1 = not self.rev2
        cache = self._search_fields
        # (position, uid) of the messages to look at: all, or what the full-text index leaves.
        todo: Sequence[tuple[int, Uid]] = list(enumerate(sel.uids))
        terms = _index_terms(key) if needs else []
        if terms:
            hits = await self.store.search_index(self.account_id, sel.mailbox_id, terms)
            if hits is not None:
                meta_pred = _compile_meta(_meta_part(key), sel, rev1, now) if _index_answers(key) else None
                if meta_pred is not None:
                    # Every part of the key is a text key the index answered exactly (a substring
                    # of the same folded text the matcher compares with) or a metadata key: the
                    # matcher need only see the messages not indexed yet.
                    found, rest = hits.uids, hits.unindexed
                    metas = sel.metas
                    matches = [(i + 1, u) for i, u in todo if u in found and meta_pred(metas[u], i + 1)]
                    todo = [(i, u) for i, u in todo if u in rest]
                    if not todo:
                        return matches
                else:
                    cand = hits.uids | hits.unindexed
                    todo = [(i, u) for i, u in todo if u in cand]
        if needs == 1:
            # Header keys: decoded fields per blob, loaded in parallel once and cached.
            metas = sel.metas
            missing = [metas[u] for _, u in todo if cache.get(metas[u].blob_id) is None]
            for k in range(0, len(missing), 64):
                chunk = missing[k : k + 64]
                got = await asyncio.gather(*(self._info(m) for m in chunk), return_exceptions=True)
                for m, inf in zip(chunk, got, strict=True):
                    if isinstance(inf, MessageInfo):
                        cache.put(m.blob_id, _search_fields(inf))
                    elif not isinstance(inf, NotFound):
                        raise inf
        fast = needs == 1 and key.op == "HEADER" and str(key.args[0]).lower() in _FIELD_INDEX
        if fast:
            # The common client search (SUBJECT/FROM/TO/CC/BCC "text"): one tight loop.
            idx = _FIELD_INDEX[str(key.args[0]).lower()]
            needle = _fold(str(key.args[1]))
            metas = sel.metas
            for i, uid in todo:
                f = cache.get(metas[uid].blob_id)
                if f is not None and f[idx] != "\0" and needle in f[idx]:
                    matches.append((i + 1, uid))
        pred = _compile_meta(key, sel, not self.rev2, now) if needs == 0 else None
        if pred is not None:
            # Metadata-only keys (flags, sizes, dates, sets): a compiled predicate, no context.
            metas = sel.metas
            matches.extend((i + 1, uid) for i, uid in todo if pred(metas[uid], i + 1))
            fast = True
        for i, uid in () if fast else todo:
            meta = sel.metas[uid]
            info: MessageInfo | None = None
            data: bytes | None = None
            fields: tuple[str, ...] | None = None
            try:
                if needs == 1:
                    fields = cache.get(meta.blob_id)
                    if fields is None:
                        continue
                elif needs >= 2:
                    info = await self._info(meta)
                    data = await self._data(meta)
            except NotFound:
                continue
            ctx = _MatchCtx(i + 1, meta, info, data, sel, rev1, now, fields)
            if _match(key, ctx):
                matches.append((i + 1, uid))
        if terms:
            matches.sort()
        return matches

    async def _search(self, cmd: c.Search) -> None:
        sel = self.sel
        if cmd.charset is not None and cmd.charset not in ("UTF-8", "US-ASCII"):
            raise CommandRefused("Unsupported charset", "BADCHARSET (UTF-8 US-ASCII)")
        opts = cmd.return_opts or ("ALL",)
        key = self._bind_saved(cmd.key)
        if "SAVE" in opts:
            self._saved = []  # RFC 5182 §2.1: a failing SEARCH ... RETURN (SAVE) leaves $ empty
        matches = await self._search_matches(key)
        values = [u for _, u in matches] if cmd.uid else [s for s, _ in matches]
        esearch = cmd.return_opts is not None or self.rev2
        if "SAVE" in opts:
            # §2.4: with MIN and/or MAX, only those are saved.
            uids = [u for _, u in matches]
            if ("MIN" in opts or "MAX" in opts) and not ({"ALL", "COUNT"} & set(opts)):
                uids = sorted({x for x in (uids[:1] if "MIN" in opts else [])
                               + (uids[-1:] if "MAX" in opts else [])})
            self._saved = uids
            if set(opts) <= {"SAVE"}:
                esearch = False  # §2.1: SAVE alone gives no ESEARCH response
                values = []
        # RFC 7162 §3.1.5: a MODSEQ search answers with the highest mod-sequence of the matches.
        modseq = b""
        if _uses(cmd.key, "MODSEQ"):
            self._enable_condstore()
            if matches:
                modseq = b"%d" % max(sel.metas[u].modseq for _, u in matches)
        if cmd.return_opts is not None and set(opts) <= {"SAVE"}:
            pass
        elif not esearch:
            await self._send(b"* SEARCH" + b"".join(b" %d" % v for v in values)
                             + (b" (MODSEQ " + modseq + b")" if modseq else b"") + b"\r\n")
        else:
            out = f'* ESEARCH (TAG "{cmd.tag}")'
            if cmd.uid:
                out += " UID"
            if "MIN" in opts and values:
                out += f" MIN {values[0]}"
            if "MAX" in opts and values:
                out += f" MAX {values[-1]}"
            if "ALL" in opts and values:
                out += f" ALL {r.uid_set(values)}"
            if "COUNT" in opts:
                out += f" COUNT {len(values)}"
            if "PARTIAL" in opts and cmd.partial is not None:
                out += " PARTIAL " + _partial(values, cmd.partial, ordered=False)
            if modseq:
                out += " MODSEQ " + modseq.decode()
            await self._send(out.encode() + b"\r\n")
        await self._refresh(allow_expunge=cmd.uid)
        await self._ok(cmd.tag, "SEARCH completed")


# One dispatch table for all sessions (explicit, visible to mypy; STYLE.md "Dispatch explicitly").
_HANDLERS: dict[type[c.Command], Callable[[Session, Any], Awaitable[Next | None]]] = {
    c.Capability: Session._capability,
    c.Noop: Session._noop,
    c.Logout: Session._logout,
    c.Id: Session._id,
    c.StartTls: Session._starttls,
    c.Authenticate: Session._authenticate,
    c.Login: Session._login,
    c.Enable: Session._enable,
    c.Select: Session._select,
    c.Create: Session._create,
    c.Delete: Session._delete,
    c.Rename: Session._rename,
    c.Subscribe: Session._subscribe,
    c.Unsubscribe: Session._unsubscribe,
    c.List: Session._list,
    c.Namespace: Session._namespace,
    c.Status: Session._status,
    c.Append: Session._append,
    c.Idle: Session._idle,
    c.Compress: Session._compress,
    c.Notify: Session._notify_cmd,
    c.Unauthenticate: Session._unauthenticate,
    c.Check: Session._check,
    c.Close: Session._close,
    c.Unselect: Session._unselect,
    c.Expunge: Session._expunge,
    c.Search: Session._search,
    c.Fetch: Session._fetch,
    c.Store: Session._store,
    c.Copy: Session._copy,
    c.Move: Session._move,
    c.Replace: Session._replace,
    c.Sort: Session._sort,
    c.Thread: Session._thread,
    c.GetQuota: Session._getquota,
    c.GetQuotaRoot: Session._getquotaroot,
    c.SetQuota: Session._setquota,
    c.GetMetadata: md.getmetadata,
    c.SetMetadata: md.setmetadata,
    c.ESearch: multi.esearch,
}


def _ranges(seqset: c.SeqSet, largest: int) -> list[tuple[int, int]]:
    """A UID set as sorted, merged (lo, hi) ranges (``*`` = ``largest``)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(seqset.bounds(largest)):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _ranges_text(ranges: list[tuple[int, int]]) -> str:
    return ",".join(str(a) if a == b else f"{a}:{b}" for a, b in ranges)


def _expand(s: c.SeqSet) -> list[int]:
    out: list[int] = []
    for a, b in s.ranges:
        if a is None or b is None:
            continue
        step = 1 if b >= a else -1
        out.extend(range(a, b + step, step))
    return out


def _ordered_set(values: Sequence[int]) -> str:
    """Numbers in a given order; only ascending consecutive runs become ranges (RFC 5267 §3.2)."""
    out: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}:{values[j]}")
        i = j + 1
    return ",".join(out)


def _partial(values: Sequence[int], rng: tuple[int, int], ordered: bool) -> str:
    """RFC 9394 §3: ``(lo:hi set)`` of the 1-based positions lo..hi of the result; negative
    positions count from the end. An empty window gives NIL."""
    lo, hi = rng
    if lo < 0:
        n = len(values)
        window = list(values[max(n + hi, 0) : max(n + lo + 1, 0)])  # -1 is the last
    else:
        window = list(values[lo - 1 : hi])
    text = (_ordered_set(window) if ordered else r.uid_set(window)) if window else "NIL"
    spec = f"{lo}:{hi}"
    return f"({spec} {text})"


def untagged_ok(text: str, code: str | None = None) -> bytes:
    return r.untagged_status("OK", text, code)


async def _forever() -> None:
    import asyncio  # the session stays socket-free; this only parks a task

    await asyncio.Event().wait()


# What _fetch_full does with an attribute (see Session._fetch_plan).
_K_UID, _K_FLAGS, _K_SIZE, _K_INFO, _K_SIMPLE, _K_FIELDS, _K_OTHER = range(7)


@dataclass(frozen=True, slots=True)
class _FetchPlan:
    items: tuple[c.FetchAtt, ...]
    steps: tuple[tuple[c.FetchAtt, int, bytes, str], ...]  # (att, kind, label + b" ", cache key)
    field_keys: tuple[str, ...]  # section cache keys of the _K_FIELDS steps
    other_data: bool  # some attribute needs the message bytes whatever the caches hold


def _att_needs_info(att: c.FetchAtt) -> bool:
    if att.name in ("ENVELOPE", "BODY", "BODYSTRUCTURE", "PREVIEW"):
        return True
    if att.name in ("BODY[]", "BINARY", "BINARY.SIZE"):
        return att.section is None or bool(att.section.part)
    return False


def _top_section(data: bytes, sec: c.Section) -> bytes:
    """BODY[], BODY[HEADER], BODY[TEXT], BODY[HEADER.FIELDS (..)] of the message itself."""
    if not sec.text:
        return data
    fields_end, body_start = header_end(data, 0, len(data))
    if sec.text == "HEADER":
        return data[:body_start]
    if sec.text == "TEXT":
        return data[body_start:]
    wanted = {f.strip().lower().encode("utf-8", "replace") for f in sec.fields}
    negate = sec.text == "HEADER.FIELDS.NOT"
    out: list[bytes] = []
    for fname, fs, _vs, fe in field_spans(data, 0, fields_end):
        if not fname or (fname in wanted) == negate:
            continue
        chunk = data[fs:fe]
        out.append(chunk)
        if not chunk.endswith(b"\n"):
            out.append(b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def _needs_data(att: c.FetchAtt) -> bool:
    return att.name in ("BODY[]", "BINARY", "BINARY.SIZE", "RFC822", "RFC822.HEADER", "RFC822.TEXT",
                        "PREVIEW")


PREVIEW_CHARS = 256  # RFC 8970 §3.1: at most 256 characters


def preview_text(data: bytes, info: MessageInfo) -> str:
    """RFC 8970 preview: the start of the decoded text, whitespace collapsed (HTML parts come
    already reduced to text by postfach.mail)."""
    text = " ".join(mail.search_text(data, info).split())
    return text[:PREVIEW_CHARS]


# ------------------------------------------------------------------------------- search engine


_FIELD_INDEX = {"subject": 0, "from": 1, "to": 2, "cc": 3, "bcc": 4}


def _search_fields(info: MessageInfo) -> tuple[str, ...]:
    """(subject, from, to, cc, bcc, sent date ISO) folded for matching; "\0" marks absence.
    The same strings the store's full-text index holds (postfach.mail.search)."""
    return msearch.header_fields(info)


class _MatchCtx:
    __slots__ = ("_text", "data", "fields", "info", "meta", "now", "rev1", "sel", "seq")

    def __init__(self, seq: int, meta: MessageMeta, info: MessageInfo | None, data: bytes | None,
                 sel: SelectedMailbox, rev1: bool, now: datetime,
                 fields: tuple[str, ...] | None = None) -> None:
        self.fields = fields
        self.seq = seq
        self.meta = meta
        self.info = info
        self.data = data
        self.sel = sel
        self.rev1 = rev1
        self.now = now
        self._text: str | None = None

    def body_text(self) -> str:
        if self._text is None:
            assert self.data is not None and self.info is not None
            self._text = msearch.body_text(self.data, self.info)
        return self._text


_NO_KEY = object()  # a message missing from Store.sort_column


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """No cyclic garbage collection inside (synchronous code only: the event loop does not run
    meanwhile). THREAD over 100,000 messages makes 200,000 short-lived objects; with a big heap
    (the process-wide caches) each collector pass walks all of it."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()

_INDEX_HEADERS = frozenset({"subject", "from", "to", "cc", "bcc"})


def _index_term(key: c.SearchKey) -> tuple[str, str] | None:
    """(field, folded needle) of a text key the full-text index can answer, else None."""
    if key.op in ("BODY", "TEXT"):
        needle = _fold(str(key.args[0]))
        field = key.op.lower()
    elif key.op == "HEADER" and str(key.args[0]).lower() in _INDEX_HEADERS:
        needle = _fold(str(key.args[1]))
        field = str(key.args[0]).lower()
    else:
        return None
    return (field, needle) if msearch.indexable(needle) else None


def _conjuncts(key: c.SearchKey) -> list[c.SearchKey]:
    """The parts of a top-level AND (nested ANDs flattened), or the key itself."""
    if key.op != "AND":
        return [key]
    out: list[c.SearchKey] = []
    for a in key.args:
        if isinstance(a, c.SearchKey):
            out.extend(_conjuncts(a))
    return out


def _index_terms(key: c.SearchKey) -> list[tuple[str, str]]:
    """The text keys of the top-level AND the index can narrow by (OR and NOT are not looked
    into: the index only ever narrows where every match must hold the needle)."""
    return [t for k in _conjuncts(key) if (t := _index_term(k)) is not None]


def _index_answers(key: c.SearchKey) -> bool:
    """Whether the index answer is the whole answer: every conjunct is a text key the index
    answers or needs no message data."""
    return all(_index_term(k) is not None or _search_needs(k) == 0 for k in _conjuncts(key))


def _meta_part(key: c.SearchKey) -> c.SearchKey:
    """The conjuncts of ``key`` that are not index terms (ALL when none)."""
    rest = tuple(k for k in _conjuncts(key) if _index_term(k) is None)
    return c.SearchKey("AND", rest) if rest else c.SearchKey("ALL", ())


def _uses(key: c.SearchKey, op: str) -> bool:
    if key.op == op:
        return True
    return any(isinstance(a, c.SearchKey) and _uses(a, op) for a in key.args)


def _search_needs(key: c.SearchKey) -> int:
    """0: metadata only, 1: MessageInfo, 2: the message bytes."""
    op = key.op
    if op in ("BODY", "TEXT"):
        return 2
    if op == "HEADER":
        name = str(key.args[0]).lower()
        return 1 if name in ("subject", "from", "to", "cc", "bcc") else 2
    if op in ("SENTBEFORE", "SENTON", "SENTSINCE"):
        return 1
    return max((_search_needs(a) for a in key.args if isinstance(a, c.SearchKey)), default=0)


def _header_text(ctx: _MatchCtx, name: str) -> list[str] | None:
    info = ctx.info
    n = name.lower()
    if ctx.fields is not None and n in _FIELD_INDEX:
        v = ctx.fields[_FIELD_INDEX[n]]
        return None if v == "\0" else [v]
    if info is not None:
        env = info.envelope
        if n == "subject":
            return None if env.subject is None else [info.subject]
        if n in ("from", "to", "cc", "bcc"):
            addrs = {"from": env.from_, "to": env.to, "cc": env.cc, "bcc": env.bcc}[n]
            return None if addrs is None else [_addresses_text(addrs)]
    if ctx.data is None or info is None:
        return None
    return mail.header_values(ctx.data, info, name)


def _match(key: c.SearchKey, ctx: _MatchCtx) -> bool:
    op = key.op
    a = key.args
    meta = ctx.meta
    match op:
        case "ALL":
            return True
        case "AND":
            return all(_match(k, ctx) for k in a if isinstance(k, c.SearchKey))
        case "OR":
            x, y = a
            assert isinstance(x, c.SearchKey) and isinstance(y, c.SearchKey)
            return _match(x, ctx) or _match(y, ctx)
        case "NOT":
            k = a[0]
            assert isinstance(k, c.SearchKey)
            return not _match(k, ctx)
        case "FLAG":
            return _has_flag(meta.flags, str(a[0]), ctx)
        case "UNFLAG":
            return not _has_flag(meta.flags, str(a[0]), ctx)
        case "SEQ":
            s = a[0]
            assert isinstance(s, c.SeqSet)
            return any(lo <= ctx.seq <= hi for lo, hi in s.bounds(ctx.sel.exists))
        case "UID":
            s = a[0]
            assert isinstance(s, c.SeqSet)
            largest = ctx.sel.uids[-1] if ctx.sel.uids else 0
            return any(lo <= meta.uid <= hi for lo, hi in s.bounds(largest))
        case "NEW":
            return ctx.rev1 and ctx.sel.is_recent(meta.uid) and "\\Seen" not in meta.flags
        case "OLD":
            return not (ctx.rev1 and ctx.sel.is_recent(meta.uid))
        case "RECENT":
            return ctx.rev1 and ctx.sel.is_recent(meta.uid)
        case "LARGER":
            return meta.size > int(str(a[0]))
        case "SMALLER":
            return meta.size < int(str(a[0]))
        case "BEFORE" | "ON" | "SINCE":
            d = a[0]
            assert isinstance(d, date)
            return _date_cmp(op, meta.internaldate.date(), d)
        case "SENTBEFORE" | "SENTON" | "SENTSINCE":
            d = a[0]
            assert isinstance(d, date)
            sent = ctx.info.date if ctx.info is not None else None
            if sent is None and ctx.fields is not None and ctx.fields[5]:
                sent = datetime.fromisoformat(ctx.fields[5])
            if sent is None:
                sent = meta.internaldate  # Dovecot falls back to the internal date
            return _date_cmp(op[4:], sent.date(), d)
        case "OLDER":
            return meta.internaldate <= ctx.now - timedelta(seconds=int(str(a[0])))
        case "YOUNGER":
            return meta.internaldate > ctx.now - timedelta(seconds=int(str(a[0])))
        case "MODSEQ":
            return meta.modseq >= int(str(a[0]))
        case "UIDIN" | "SAVEDBEFORE" | "SAVEDON" | "SAVEDSINCE" | "EMAILID" | "THREADID":
            pred = _compile_meta(key, ctx.sel, ctx.rev1, ctx.now)
            assert pred is not None
            return pred(meta, ctx.seq)
        case "HEADER":
            name, value = str(a[0]), _fold(str(a[1]))
            values = _header_text(ctx, name)
            if not values:
                return False
            return any(value in _fold(v) for v in values)
        case "BODY":
            return _fold(str(a[0])) in ctx.body_text()
        case "TEXT":
            needle = _fold(str(a[0]))
            if needle in ctx.body_text():
                return True
            assert ctx.data is not None and ctx.info is not None
            return needle in msearch.header_text(ctx.data, ctx.info)
    return False


MetaPred = Callable[[MessageMeta, int], bool]


def _compile_meta(key: c.SearchKey, sel: SelectedMailbox, rev1: bool, now: datetime) -> MetaPred | None:
    """A predicate over (meta, seq) for keys that need no message data; None if it cannot."""
    op, a = key.op, key.args
    if op == "ALL":
        return lambda m, s: True
    if op in ("AND", "OR", "NOT"):
        subs = [_compile_meta(k, sel, rev1, now) for k in a if isinstance(k, c.SearchKey)]
        if any(p is None for p in subs):
            return None
        preds = [p for p in subs if p is not None]
        if op == "AND":
            return lambda m, s: all(p(m, s) for p in preds)
        if op == "OR":
            p1, p2 = preds
            return lambda m, s: p1(m, s) or p2(m, s)
        p0 = preds[0]
        return lambda m, s: not p0(m, s)
    if op in ("FLAG", "UNFLAG"):
        flag = str(a[0])
        want = op == "FLAG"
        if flag == "\\Recent":
            recent = sel.recent if rev1 else set()
            return lambda m, s: (m.uid in recent) == want
        if flag.startswith("\\"):
            return lambda m, s: (flag in m.flags) == want
        low = flag.lower()
        return lambda m, s: any(f.lower() == low for f in m.flags) == want
    if op in ("SEQ", "UID"):
        ss = a[0]
        assert isinstance(ss, c.SeqSet)
        if op == "SEQ":
            bounds = ss.bounds(sel.exists)
            return lambda m, s: any(lo <= s <= hi for lo, hi in bounds)
        ubounds = ss.bounds(sel.uids[-1] if sel.uids else 0)
        return lambda m, s: any(lo <= m.uid <= hi for lo, hi in ubounds)
    if op in ("LARGER", "SMALLER"):
        n = int(str(a[0]))
        return (lambda m, s: m.size > n) if op == "LARGER" else (lambda m, s: m.size < n)
    if op in ("BEFORE", "ON", "SINCE"):
        d = a[0]
        assert isinstance(d, date)
        return lambda m, s: _date_cmp(op, m.internaldate.date(), d)
    if op in ("NEW", "OLD", "RECENT"):
        recent = sel.recent if rev1 else set()
        if op == "RECENT":
            return lambda m, s: m.uid in recent
        if op == "OLD":
            return lambda m, s: m.uid not in recent
        return lambda m, s: m.uid in recent and "\\Seen" not in m.flags
    if op in ("OLDER", "YOUNGER"):
        edge = now - timedelta(seconds=int(str(a[0])))
        return (lambda m, s: m.internaldate <= edge) if op == "OLDER" else (lambda m, s: m.internaldate > edge)
    if op == "MODSEQ":
        ms = int(str(a[0]))
        return lambda m, s: m.modseq >= ms
    if op == "UIDIN":
        wanted = a[0]
        assert isinstance(wanted, frozenset)
        return lambda m, s: m.uid in wanted
    if op in ("SAVEDBEFORE", "SAVEDON", "SAVEDSINCE"):
        sd = a[0]
        assert isinstance(sd, date)
        saved_day: date = sd
        return lambda m, s: _date_cmp(op[5:], (m.savedate or m.internaldate).date(), saved_day)
    if op == "EMAILID":
        wanted_id = str(a[0])
        return lambda m, s: email_id(m) == wanted_id
    if op == "THREADID":
        return lambda m, s: False  # THREADID is NIL: no message has one
    return None


def email_id(meta: MessageMeta) -> str:
    """RFC 8474 EMAILID: the same for every copy of the same stored message (the blob)."""
    return "M" + "".join(ch for ch in str(meta.blob_id) if ch.isalnum() or ch in "-_")[:40]


def mailbox_id(mb_id: int, uidvalidity: int) -> str:
    """RFC 8474 MAILBOXID: stable across renames, new when the mailbox is recreated."""
    return f"F{mb_id}-{uidvalidity}"


def _has_flag(flags: frozenset[str], flag: str, ctx: _MatchCtx) -> bool:
    if flag.startswith("\\"):
        if flag == "\\Recent":
            return ctx.rev1 and ctx.sel.is_recent(ctx.meta.uid)
        return flag in flags
    low = flag.lower()
    return any(f.lower() == low for f in flags)


def _date_cmp(op: str, have: date, want: date) -> bool:
    if op == "BEFORE":
        return have < want
    if op == "ON":
        return have == want
    return have >= want  # SINCE
