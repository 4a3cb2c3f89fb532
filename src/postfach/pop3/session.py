"""The POP3 state machine (RFC 1939, RFC 2449, RFC 2595, RFC 5034) over the Store interface.

The session sees command lines and returns responses; it never touches a socket. The connection
asks it ``want_tls`` / ``want_close`` after each answer and streams ``MessageBody`` responses.

The maildrop is INBOX. At login the session takes the maildrop lock (RFC 1939 §8: exclusive access)
and a snapshot of INBOX; message numbers stay fixed for the session. UIDL values are derived from
the mailbox's UIDVALIDITY and the message's UID, so they survive restarts and restores.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from postfach.auth import AuthOutcome, sasl
from postfach.context import ConnectionInfo, ServerContext
from postfach.errors import MailboxInUse, NotFound, NotPermitted, StoreError
from postfach.pop3 import parser as p
from postfach.pop3.responses import (
    AUTH,
    IN_USE,
    LOGIN_DELAY,
    SYS_PERM,
    SYS_TEMP,
    Continue,
    Err,
    MessageBody,
    MultiLine,
    Ok,
    Response,
)
from postfach.store.base import FlagOp, Mailbox, MaildropLock
from postfach.types import AccountId, Uid, UidValidity

log = logging.getLogger("postfach.pop3")

#: Keyword that hides a message from POP3 when ``[pop3] dele_mode = "hide"`` (Dovecot's
#: ``pop3_deleted_flag``); IMAP clients still see the message.
HIDDEN_KEYWORD = "$POP3Deleted"
IMPLEMENTATION = "postfach"
SASL_MECHANISMS = ("PLAIN", "LOGIN")
_LAST_LOGIN_KEY = "pop3.last_login"


class State(enum.Enum):
    AUTHORIZATION = "authorization"
    TRANSACTION = "transaction"
    CLOSED = "closed"  # after QUIT (UPDATE done) or a fatal error


def uidl_for(uidvalidity: UidValidity, uid: Uid) -> str:
    """The unique-id listing of a message: stable for its whole life (RFC 1939 §7 UIDL).
    Like Dovecot's ``%08Xv%08Xu``, from values the store keeps across restarts and restores."""
    return f"{uidvalidity:08x}{uid:08x}"


@dataclass(slots=True)
class _Entry:
    uid: Uid
    size: int
    deleted: bool = False


class Session:
    def __init__(self, ctx: ServerContext, conn: ConnectionInfo) -> None:
        self.ctx = ctx
        self.conn = conn
        self.state = State.AUTHORIZATION
        self.want_tls = False
        self.want_close = False
        self._user: str | None = None
        self._sasl: sasl.Mechanism | None = None
        self._bad_commands = 0
        self._locks = contextlib.AsyncExitStack()
        self._lock: MaildropLock | None = None  # the maildrop lock while in TRANSACTION
        self._account_id: AccountId | None = None
        self._address = ""
        self._mailbox: Mailbox | None = None
        self._entries: list[_Entry] = []
        self._seen_pending: set[Uid] = set()

    # ------------------------------------------------------------------------------ helpers
    @property
    def account_id(self) -> AccountId | None:
        return self._account_id

    @property
    def in_sasl(self) -> bool:
        return self._sasl is not None

    def greeting(self) -> Ok:
        return Ok(f"{IMPLEMENTATION} POP3 server ready")

    def _auth_allowed(self) -> bool:
        return self.conn.tls_active or self.ctx.auth.cleartext_allowed(self.conn.remote_ip)

    def _tls_offered(self) -> bool:
        return not self.conn.tls_active and self.state is State.AUTHORIZATION

    def _bad(self, text: str) -> Err:
        self._bad_commands += 1
        if self._bad_commands > self.ctx.config.limits.max_bad_commands:
            self.want_close = True
            self.state = State.CLOSED
            return Err("Too many invalid commands, closing connection")
        return Err(text)

    def line_too_long(self, limit: int) -> Err:
        self._sasl = None  # an over-long SASL response ends the exchange
        return self._bad(f"Line too long (limit {limit} octets)")

    def capabilities(self) -> list[bytes]:
        cfg = self.ctx.config.pop3
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state is State.AUTHORIZATION and self._auth_allowed():
            # Advertise only what works right now (CLIENT-QUIRKS: mpop picks what we list).
            caps.append("USER")
            caps.append("SASL " + " ".join(SASL_MECHANISMS))
        if self._tls_offered():
            caps.append("STLS")
        caps.append(f"EXPIRE {cfg.expire}")
        if cfg.login_delay_seconds:
            caps.append(f"LOGIN-DELAY {cfg.login_delay_seconds}")
        caps.append(f"IMPLEMENTATION {IMPLEMENTATION}")
        return [c.encode("ascii") for c in caps]

    # ------------------------------------------------------------------------------ entry point
    async def handle_line(self, line: bytes) -> Response:
        if self.state is State.CLOSED:
            return Err("Session is closed")
        try:
            if self._sasl is not None:
                return await self._sasl_continue(line)
            try:
                cmd = p.parse_command(line)
            except p.CommandSyntaxError as e:
                return self._bad(e.message)
            if self.state is State.AUTHORIZATION:
                return await self._authorization(cmd)
            return await self._transaction(cmd)
        except (StoreError, OSError) as e:
            log.warning("pop3 store failure user=%s: %s", self._address, e)
            return Err("Temporary server failure, try again later", SYS_TEMP)

    # ------------------------------------------------------------------------- AUTHORIZATION
    async def _authorization(self, cmd: p.Command) -> Response:
        match cmd:
            case p.Capa():
                return MultiLine(Ok("Capability list follows"), self.capabilities())
            case p.Quit():
                self.want_close = True
                self.state = State.CLOSED
                return Ok(f"{IMPLEMENTATION} POP3 server signing off")
            case p.Noop():
                return Ok()
            case p.Stls():
                # RFC 2595 §4: STLS only in AUTHORIZATION state, only once.
                if self.conn.tls_active:
                    return self._bad("TLS is already active")
                self.want_tls = True
                return Ok("Begin TLS negotiation now")
            case p.Apop():
                # APOP needs the cleartext password on the server; we keep only argon2 hashes.
                return self._bad("APOP is not supported; use USER/PASS or AUTH over TLS")
            case p.User(name):
                if not self._auth_allowed():
                    return Err(self._plaintext_refusal(), AUTH)
                self._user = name
                return Ok("Send your password")
            case p.Pass(password):
                if not self._auth_allowed():
                    return Err(self._plaintext_refusal(), AUTH)
                if self._user is None:
                    return self._bad("Send USER first")
                user, self._user = self._user, None  # RFC 1939 §7: after -ERR, start again with USER
                return await self._login(user, password)
            case p.Auth(None, _):
                if not self._auth_allowed():  # list only what works right now, as CAPA does
                    return Err(self._plaintext_refusal(), AUTH)
                return MultiLine(Ok("Mechanisms follow"), [m.encode("ascii") for m in SASL_MECHANISMS])
            case p.Auth(str(mechanism), initial):
                return await self._auth_start(mechanism, initial)
            case p.Stat() | p.List() | p.Uidl() | p.Retr() | p.Dele() | p.Top() | p.Rset():
                return self._bad("Not logged in yet (use USER/PASS or AUTH)")
        raise AssertionError(f"unhandled command {cmd!r}")  # pragma: no cover

    def _plaintext_refusal(self) -> str:
        return "Plaintext authentication disallowed on non-secure connections; use STLS first"

    async def _auth_start(self, mechanism: str, initial: str | None) -> Response:
        if not self._auth_allowed():
            return Err(self._plaintext_refusal(), AUTH)
        mech = sasl.start(mechanism) if mechanism in SASL_MECHANISMS else None
        if mech is None:
            return self._bad(f"Unsupported authentication mechanism {mechanism[:20]}")
        self._sasl = mech
        data: bytes | None = None
        if initial is not None:
            # RFC 5034 §4: "=" is an initial response of zero length.
            decoded = _b64(initial)
            if decoded is None:
                self._sasl = None
                return self._bad("Invalid base64 in initial response")
            data = decoded
        return await self._sasl_step(data)

    async def _sasl_continue(self, line: bytes) -> Response:
        if line.strip() == b"*":  # RFC 5034 §4: the client cancels
            self._sasl = None
            return Err("Authentication cancelled")
        data = _b64(line.decode("ascii", "replace").strip(), allow_equals=False)
        if data is None:
            self._sasl = None
            return self._bad("Invalid base64 in SASL response")
        return await self._sasl_step(data)

    async def _sasl_step(self, data: bytes | None) -> Response:
        assert self._sasl is not None
        try:
            result = self._sasl.step(data)
        except sasl.SaslError as e:
            self._sasl = None
            return self._bad(f"Authentication failed: {e}")
        if isinstance(result, sasl.Challenge):
            return Continue(result.data)
        self._sasl = None
        if result.authzid and result.authzid.lower() != result.authcid.lower():
            # Proxy authorisation is not offered; the authenticator also refuses and counts it.
            res = await self.ctx.auth.authenticate_credentials(result, remote_ip=self.conn.remote_ip, protocol="pop3")
            return self._auth_refusal(res.outcome)
        return await self._login(result.authcid, result.password)

    def _auth_refusal(self, outcome: AuthOutcome) -> Err:
        match outcome:
            case AuthOutcome.LOCKED:
                return Err("Too many failed logins; try again later", SYS_TEMP)
            case AuthOutcome.DISABLED:
                return Err("Account is disabled", SYS_PERM)
            case _:
                return Err("Authentication failed", AUTH)

    async def _login(self, user: str, password: str) -> Response:
        res = await self.ctx.auth.authenticate(user, password, remote_ip=self.conn.remote_ip, protocol="pop3")
        if not res.ok or res.account is None:
            return self._auth_refusal(res.outcome)
        account = res.account
        # RFC 2449 §6.5 / §8.1.1: enforce LOGIN-DELAY when configured.
        delay = self.ctx.config.pop3.login_delay_seconds
        now = time.monotonic()
        last_logins: dict[AccountId, float] = self.ctx.services.setdefault(_LAST_LOGIN_KEY, {})
        if delay:
            last = last_logins.get(account.id)
            if last is not None and now - last < delay:
                return Err(f"Minimum time between logins is {delay} seconds", LOGIN_DELAY)
        store = self.ctx.store
        mailbox = await store.get_mailbox(account.id, "INBOX")
        if mailbox is None:
            return Err("The account has no INBOX", SYS_PERM)
        lock = store.lock_maildrop(account.id)
        try:
            await self._locks.enter_async_context(lock)
        except MailboxInUse:
            # RFC 2449 §8.1.2
            return Err("Mailbox is locked by another POP3 session", IN_USE)
        try:
            # The lean listing (no MessageMeta per message): login on a 100,000-message maildrop
            # costs one query. A backend without it is asked for the full records.
            rows = await store.list_uids_sizes(account.id, mailbox.id)
        except BaseException:
            await self._locks.aclose()
            raise
        hidden = HIDDEN_KEYWORD.lower()
        is_hidden: dict[frozenset[str], bool] = {}  # flag sets are shared: decide once per set
        entries: list[_Entry] = []
        for uid, size, flags in rows:
            if flags:
                h = is_hidden.get(flags)
                if h is None:
                    h = is_hidden[flags] = any(f.lower() == hidden for f in flags)
                if h:
                    continue
            entries.append(_Entry(uid, size))
        self._entries = entries
        self._lock = lock
        self._account_id = account.id
        self._address = account.address
        self._mailbox = mailbox
        self.state = State.TRANSACTION
        last_logins[account.id] = now
        count, size = self._totals()
        log.info(
            "pop3 %s login user=%s ip=%s tls=%s messages=%d octets=%d",
            self.conn.id,
            account.address,
            self.conn.remote_ip,
            self.conn.tls_active,
            count,
            size,
        )
        return Ok(f"Logged in, {count} messages ({size} octets)")

    # --------------------------------------------------------------------------- TRANSACTION
    def _totals(self) -> tuple[int, int]:
        count = size = 0
        for e in self._entries:
            if not e.deleted:
                count += 1
                size += e.size
        return count, size

    def _entry(self, msg: int) -> _Entry | Err:
        if msg < 1 or msg > len(self._entries):
            return Err(f"No such message {msg}")
        e = self._entries[msg - 1]
        if e.deleted:
            return Err(f"Message {msg} is already deleted")
        return e

    async def _transaction(self, cmd: p.Command) -> Response:
        match cmd:
            case p.Capa():
                return MultiLine(Ok("Capability list follows"), self.capabilities())
            case p.Stat():
                count, size = self._totals()
                return Ok(f"{count} {size}")
            case p.List(None):
                count, size = self._totals()
                lines = [b"%d %d" % (i, e.size) for i, e in enumerate(self._entries, 1) if not e.deleted]
                return MultiLine(Ok(f"{count} messages ({size} octets)"), lines)
            case p.List(int(msg)):
                e = self._entry(msg)
                return e if isinstance(e, Err) else Ok(f"{msg} {e.size}")
            case p.Uidl(None):
                assert self._mailbox is not None
                prefix = b"%08x" % self._mailbox.uidvalidity
                lines = [b"%d %s%08x" % (i, prefix, e.uid) for i, e in enumerate(self._entries, 1) if not e.deleted]
                return MultiLine(Ok("Unique-ID listing follows"), lines)
            case p.Uidl(int(msg)):
                assert self._mailbox is not None
                e = self._entry(msg)
                if isinstance(e, Err):
                    return e
                return Ok(f"{msg} {uidl_for(self._mailbox.uidvalidity, e.uid)}")
            case p.Retr(msg):
                return await self._retrieve(msg, None)
            case p.Top(msg, lines_wanted):
                return await self._retrieve(msg, lines_wanted)
            case p.Dele(msg):
                # RFC 1939 §6: marked only; removed in the UPDATE state. A message expunged via
                # IMAP meanwhile is harmless here: the store simply has nothing left to remove.
                e = self._entry(msg)
                if isinstance(e, Err):
                    return e
                e.deleted = True
                return Ok(f"Message {msg} deleted")
            case p.Noop():
                return Ok()
            case p.Rset():
                for e in self._entries:
                    e.deleted = False
                count, size = self._totals()
                return Ok(f"Maildrop has {count} messages ({size} octets)")
            case p.Quit():
                return await self._update()
            case p.Stls():
                return self._bad("STLS is only allowed before logging in")
            case p.User() | p.Pass() | p.Apop() | p.Auth():
                return self._bad("Already logged in")
        raise AssertionError(f"unhandled command {cmd!r}")  # pragma: no cover

    async def _retrieve(self, msg: int, top_lines: int | None) -> Response:
        e = self._entry(msg)
        if isinstance(e, Err):
            return e
        assert self._account_id is not None and self._mailbox is not None
        store = self.ctx.store
        # The snapshot may be stale: IMAP may have expunged the message meanwhile.
        still = await store.get_messages(self._account_id, self._mailbox.id, [e.uid])
        if not still:
            return Err(f"Message {msg} was deleted by another session (e.g. IMAP)")
        meta = still[0]
        try:
            blob = await store.open_blob(meta.blob_id)
        except NotFound:
            return Err(f"Message {msg} was deleted by another session (e.g. IMAP)")
        if top_lines is not None:
            return MessageBody(Ok("Top of message follows"), blob, e.uid, top_lines)
        # RETR marks the message \Seen (when configured) so that IMAP devices show it as read.
        mark_seen = self.ctx.config.pop3.retr_sets_seen and not any(f.lower() == "\\seen" for f in meta.flags)
        return MessageBody(Ok(f"{e.size} octets"), blob, e.uid, None, mark_seen)

    def message_sent(self, body: MessageBody) -> None:
        """The connection calls this after a RETR was streamed completely."""
        if body.mark_seen:
            self._seen_pending.add(body.uid)

    async def _flush_seen(self, exclude: Sequence[Uid] = ()) -> None:
        uids = sorted(self._seen_pending.difference(exclude))
        self._seen_pending.clear()
        if uids and self._account_id is not None and self._mailbox is not None:
            await self.ctx.store.store_flags(
                self._account_id, self._mailbox.id, uids, FlagOp.ADD, frozenset({"\\Seen"})
            )

    async def _update(self) -> Response:
        """RFC 1939 §6: QUIT in TRANSACTION enters UPDATE and removes the marked messages, and
        only then answers +OK (ARCHITECTURE invariant 1: durable before acknowledged)."""
        assert self._account_id is not None and self._mailbox is not None
        self.want_close = True
        self.state = State.CLOSED
        deleted = [e.uid for e in self._entries if e.deleted]
        if deleted and self._lock is not None and self._lock.lost:
            # The lock was not held all along (the database connection was lost meanwhile):
            # another session may have had the maildrop. Delete nothing; the client tries again.
            log.warning("pop3 %s update refused user=%s: the maildrop lock was lost", self.conn.id, self._address)
            await self.close()
            return Err("The maildrop lock was lost meanwhile; no messages were deleted", IN_USE)
        hide = self.ctx.config.pop3.dele_mode == "hide"
        try:
            await self._flush_seen(exclude=() if hide else deleted)
            removed = 0
            if deleted:
                if hide:
                    res = await self.ctx.store.store_flags(
                        self._account_id,
                        self._mailbox.id,
                        deleted,
                        FlagOp.ADD,
                        frozenset({HIDDEN_KEYWORD}),
                    )
                    removed = len(res.updated) + len(res.unchanged)
                else:
                    removed = len(await self.ctx.store.delete_messages(self._account_id, self._mailbox.id, deleted))
        except (StoreError, OSError) as e:
            log.warning("pop3 update failed user=%s: %s", self._address, e)
            code = SYS_PERM if isinstance(e, NotPermitted) else SYS_TEMP
            await self.close()
            return Err("Some deleted messages were not removed", code)
        await self.close()
        log.info("pop3 %s logout user=%s deleted=%d", self.conn.id, self._address, removed)
        return Ok(f"{IMPLEMENTATION} POP3 server signing off ({removed} messages deleted)")

    # ------------------------------------------------------------------------------ lifecycle
    def tls_started(self) -> None:
        """RFC 2595 §4: after TLS the client starts afresh; forget anything learned before."""
        self.want_tls = False
        self.conn.tls_active = True
        self._user = None
        self._sasl = None

    async def close(self) -> None:
        """End of the session for whatever reason: marks of a dropped connection are forgotten
        (nothing is deleted), messages already retrieved become \\Seen, the lock is released."""
        try:
            if self._seen_pending:
                await self._flush_seen()
        except (StoreError, OSError) as e:
            log.warning("pop3: could not set \\Seen for user=%s: %s", self._address, e)
        finally:
            await self._locks.aclose()


def _b64(text: str, *, allow_equals: bool = True) -> bytes | None:
    if text == "=" and allow_equals:
        return b""
    if text == "":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
