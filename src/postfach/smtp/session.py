"""The SMTP server state machine, one for submission and MX (the differences live in policy.py).

States: greeting → HELO/EHLO → [STARTTLS → EHLO] → [AUTH] → MAIL → RCPT* → DATA | BDAT* → … QUIT.
The session awaits the store (through ``LocalDelivery``) and the authenticator but never sees a
reader or writer. ``Conversation`` glues the sans-I/O ``Receiver`` to the session: bytes in,
reply bytes out, plus the two things only the driver can do (start TLS, close).
"""

from __future__ import annotations

import base64
import binascii
import enum
import logging
import secrets
from dataclasses import dataclass, field
from typing import assert_never

from postfach.auth import AuthOutcome, sasl
from postfach.context import ServerContext
from postfach.errors import StoreUnavailable
from postfach.smtp import codes
from postfach.smtp.codes import Reply
from postfach.smtp.delivery import DeliveryError, LocalDelivery, LocalRecipient, normalize
from postfach.smtp.parser import (
    Auth,
    Bdat,
    BdatSyntaxError,
    Body,
    ChunkComplete,
    CommandError,
    Data,
    DataComplete,
    Ehlo,
    Expn,
    Helo,
    Help,
    Line,
    LineTooLong,
    MailFrom,
    MailParams,
    Noop,
    Quit,
    RcptParams,
    RcptTo,
    Receiver,
    Rset,
    StartTls,
    Vrfy,
    bare_line_end,
    is_bdat,
    parse_bdat,
    parse_command,
)
from postfach.smtp.policy import InboundPolicy, MessageContext, Policy, SubmissionPolicy, header_fields
from postfach.store.base import Account, QueueRecipient

log = logging.getLogger("postfach.smtp")

MAX_HOPS = 50  # Postfix hopcount_limit


class Action(enum.Enum):
    NONE = "none"
    READ_DATA = "read-data"
    READ_CHUNK = "read-chunk"
    STARTTLS = "starttls"
    CLOSE = "close"


@dataclass
class Result:
    replies: list[Reply]
    action: Action = Action.NONE
    chunk_size: int = 0
    discard_chunk: bool = False


@dataclass
class Recipient:
    address: str  # as the client gave it
    params: RcptParams
    local: tuple[LocalRecipient, ...] = ()
    remote: tuple[str, ...] = ()
    forwarded: bool = False  # remote targets of an alias of ours (SRS applies), not relay


@dataclass
class Transaction:
    sender: str
    params: MailParams
    recipients: list[Recipient] = field(default_factory=list)
    chunks: bytearray = field(default_factory=bytearray)
    bdat_started: bool = False


@dataclass
class Peer:
    remote_ip: str
    listener_tls: str  # "starttls", "implicit" or "none"
    tls_active: bool
    tls_info: str | None = None


class Session:
    def __init__(self, ctx: ServerContext, peer: Peer, policy: Policy, delivery: LocalDelivery) -> None:
        self.ctx = ctx
        self.peer = peer
        self.policy = policy
        self.delivery = delivery
        self.limits = ctx.config.limits
        self.hostname = ctx.config.hostname
        self.helo: str | None = None
        self.esmtp = False
        self.account: Account | None = None
        self.txn: Transaction | None = None
        self.errors = 0
        self._sasl: sasl.Mechanism | None = None
        self._bdat: tuple[Bdat, Reply | None] | None = None

    # --- public helpers --------------------------------------------------------------------------
    @property
    def in_transaction(self) -> bool:
        return self.txn is not None or self._sasl is not None

    @property
    def awaiting_auth_response(self) -> bool:
        return self._sasl is not None

    def greeting(self) -> Reply:
        return codes.R220_GREETING.with_text(f"{self.hostname} ESMTP postfach")

    def tls_started(self, tls_info: str | None) -> None:
        """RFC 3207 §4.2: after the handshake the session starts over (no EHLO, no AUTH)."""
        self.peer.tls_active = True
        self.peer.tls_info = tls_info
        self.helo = None
        self.esmtp = False
        self.account = None
        self.txn = None
        self._sasl = None

    def _auth_allowed_here(self) -> bool:
        return self.peer.tls_active or self.ctx.auth.cleartext_allowed(self.peer.remote_ip)

    def _starttls_offered(self) -> bool:
        return self.peer.listener_tls == "starttls" and not self.peer.tls_active

    # --- errors and budgets ----------------------------------------------------------------------
    def _error(self, reply: Reply) -> Result:
        """An error reply to a command; too many of them end the session (Postfix hard_error_limit)."""
        self.errors += 1
        if self.errors > self.limits.max_bad_commands:
            log.info("smtp %s: too many errors, closing", self.peer.remote_ip)
            return Result([reply, codes.R421_TOO_MANY_ERRORS], Action.CLOSE)
        return Result([reply])

    def line_too_long(self) -> Result:
        if self._sasl is not None:
            self._sasl = None
        return self._error(codes.R500_LINE_TOO_LONG)

    # --- commands --------------------------------------------------------------------------------
    async def command(self, line: bytes) -> Result:
        if self._sasl is not None:
            return await self._auth_response(line)
        if is_bdat(line):
            return self._bdat_command(parse_bdat(line))
        try:
            cmd = parse_command(line)
        except CommandError as e:
            return self._error(e.reply)
        match cmd:
            case Ehlo() | Helo():
                return self._hello(cmd)
            case MailFrom():
                return await self._mail(cmd)
            case RcptTo():
                return await self._rcpt(cmd)
            case Data():
                return self._data()
            case Rset():
                self.txn = None
                return Result([codes.R250_OK])
            case Noop():
                return Result([codes.R250_OK])
            case Quit():
                return Result([codes.R221_BYE], Action.CLOSE)
            case Vrfy():
                # RFC 5321 §3.5.3: 252 rather than telling who exists
                return Result([codes.R252_CANNOT_VRFY])
            case Expn():
                return self._error(codes.R502_NOT_IMPLEMENTED)
            case Help():
                return Result([codes.R214_HELP])
            case StartTls():
                return self._starttls()
            case Auth():
                return await self._auth(cmd)
            case Bdat():  # pragma: no cover - BDAT lines are routed above
                raise AssertionError("unreachable")
            case _:
                assert_never(cmd)

    def _hello(self, cmd: Ehlo | Helo) -> Result:
        # RFC 5321 §4.1.4: EHLO/HELO resets any transaction.
        self.txn = None
        self._bdat = None
        self.helo = cmd.domain
        if isinstance(cmd, Helo):
            self.esmtp = False
            return Result([Reply(250, None, (self.hostname,))])
        self.esmtp = True
        lines = [
            self.hostname,
            "PIPELINING",
            f"SIZE {self.limits.max_message_bytes}",
        ]
        if self._starttls_offered():
            lines.append("STARTTLS")
        if self.policy.offers_auth and self.account is None and self._auth_allowed_here():
            lines.append("AUTH PLAIN LOGIN")
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "BINARYMIME", "CHUNKING", "DSN", "SMTPUTF8"]
        if self.peer.tls_active:  # RFC 8689 §4: advertised once TLS is up
            lines.append("REQUIRETLS")
        return Result([Reply(250, None, tuple(lines))])

    def _starttls(self) -> Result:
        if self.peer.tls_active:
            return self._error(codes.R503_BAD_SEQUENCE.with_text("Error: TLS already active"))
        if self.peer.listener_tls != "starttls":
            return self._error(codes.R502_NOT_IMPLEMENTED)
        if self.helo is None:
            return self._error(codes.R503_BAD_SEQUENCE.with_text("Error: send HELO/EHLO first"))
        if self.txn is not None:
            return self._error(codes.R503_BAD_SEQUENCE.with_text("Error: MAIL transaction in progress"))
        return Result([codes.R220_READY_TLS], Action.STARTTLS)

    # --- AUTH (RFC 4954) -------------------------------------------------------------------------
    async def _auth(self, cmd: Auth) -> Result:
        if not self.policy.offers_auth:
            return self._error(codes.R503_BAD_SEQUENCE.with_text("Error: authentication not enabled"))
        if self.helo is None:
            return self._error(codes.R503_BAD_SEQUENCE.with_text("Error: send HELO/EHLO first"))
        if self.account is not None:
            return self._error(codes.R503_BAD_SEQUENCE.with_text("Error: already authenticated"))
        if self.txn is not None:
            return self._error(codes.R503_BAD_SEQUENCE.with_text("Error: MAIL transaction in progress"))
        if not self._auth_allowed_here():
            return self._error(codes.R538_ENCRYPTION_REQUIRED)  # RFC 4954 §6
        mech = sasl.start(cmd.mechanism)
        if mech is None:
            return self._error(codes.R504_AUTH_MECHANISM)
        return await self._sasl_step(mech, cmd.initial)

    async def _auth_response(self, line: bytes) -> Result:
        mech = self._sasl
        assert mech is not None
        self._sasl = None
        if line.strip() == b"*":  # RFC 4954 §4: the client cancels
            return self._error(codes.R501_AUTH_ABORTED)
        try:
            data = base64.b64decode(line.strip(), validate=True)
        except (binascii.Error, ValueError):
            return self._error(codes.R501_AUTH_BAD_DATA)
        return await self._sasl_step(mech, data)

    async def _sasl_step(self, mech: sasl.Mechanism, data: bytes | None) -> Result:
        try:
            step = mech.step(data)
        except sasl.SaslError:
            return self._error(codes.R501_AUTH_BAD_DATA)
        if isinstance(step, sasl.Challenge):
            self._sasl = mech
            return Result([Reply(334, None, (base64.b64encode(step.data).decode("ascii"),))])
        result = await self.ctx.auth.authenticate_credentials(
            step, remote_ip=self.peer.remote_ip, protocol="smtp"
        )
        if result.ok and result.account is not None:
            self.account = result.account
            return Result([codes.R235_AUTH_OK])
        if result.outcome is AuthOutcome.LOCKED:
            return self._error(codes.R454_AUTH_TEMPORARY)
        return self._error(codes.R535_AUTH_FAILED)

    # --- the envelope ----------------------------------------------------------------------------
    async def _mail(self, cmd: MailFrom) -> Result:
        if self.helo is None:
            return self._error(codes.R503_BAD_SEQUENCE.with_text("Error: send HELO/EHLO first"))
        if self.txn is not None:
            return self._error(codes.R503_BAD_SEQUENCE.with_text("Error: nested MAIL command"))
        if self.policy.requires_auth and self.account is None:
            if not self._auth_allowed_here() and self._starttls_offered():
                return self._error(codes.R530_STARTTLS_FIRST)
            return self._error(codes.R530_AUTH_REQUIRED)
        p = cmd.params
        if not self.esmtp and p != MailParams():
            return self._error(codes.R555_UNSUPPORTED_PARAMETER.with_text("Error: parameters need EHLO"))
        if p.size is not None and p.size > self.limits.max_message_bytes:
            return self._error(
                codes.R552_MESSAGE_TOO_BIG.with_text("Message size exceeds fixed maximum message size")
            )
        if not cmd.address.isascii() and not p.smtputf8:
            return self._error(codes.R553_NEEDS_SMTPUTF8)
        if p.requiretls and not self.peer.tls_active:
            return self._error(codes.R530_REQUIRETLS_NEEDS_TLS)
        refused = await self.policy.check_sender(self.account, cmd.address)
        if refused is not None:
            return self._error(refused)
        self.txn = Transaction(cmd.address, p)
        return Result([codes.R250_SENDER_OK])

    async def _rcpt(self, cmd: RcptTo) -> Result:
        txn = self.txn
        if txn is None:
            return self._error(codes.R503_BAD_SEQUENCE.with_text("Error: need MAIL command"))
        if txn.bdat_started:
            return self._error(codes.R503_BAD_SEQUENCE.with_text("Error: BDAT in progress"))
        if len(txn.recipients) >= self.limits.max_recipients:
            return self._error(codes.R452_TOO_MANY_RECIPIENTS)
        if not self.esmtp and cmd.params != RcptParams():
            return self._error(codes.R555_UNSUPPORTED_PARAMETER.with_text("Error: parameters need EHLO"))
        address = cmd.address
        if address == "postmaster":
            address = await self.delivery.postmaster()
        if not address.isascii() and not txn.params.smtputf8:
            return self._error(codes.R553_NEEDS_SMTPUTF8)
        if await self.delivery.is_local_address(address):
            resolution = await self.delivery.resolve(address)
            if resolution is None:
                return self._error(codes.R550_NO_SUCH_USER.with_text(
                    f"<{address}>: Recipient address rejected: User unknown"
                ))
            problem = await self.delivery.quota_problem(resolution, txn.params.size or 0)
            if problem is not None:
                return self._error(problem.with_text(f"<{address}>: {problem.text}"))
            txn.recipients.append(Recipient(address, cmd.params, resolution.local, resolution.remote, True))
            return Result([codes.R250_RECIPIENT_OK])
        if not self.policy.relay_allowed(self.account):
            log.info("smtp %s: relay to %s refused", self.peer.remote_ip, address)
            return self._error(codes.R554_RELAY_DENIED.with_text(f"<{address}>: Relay access denied"))
        txn.recipients.append(Recipient(address, cmd.params, (), (address,)))
        return Result([codes.R250_RECIPIENT_OK])

    # --- DATA (RFC 5321 §4.1.1.4) ----------------------------------------------------------------
    def _data(self) -> Result:
        txn = self.txn
        if txn is None:
            return self._error(codes.R503_BAD_SEQUENCE.with_text("Error: need RCPT command"))
        if not txn.recipients:
            return self._error(codes.R554_NO_VALID_RECIPIENTS)
        if txn.bdat_started:
            return self._error(codes.R503_BAD_SEQUENCE.with_text("Error: BDAT in progress"))
        if txn.params.body is Body.BINARY:  # RFC 3030 §3: BINARYMIME only with BDAT
            return self._error(codes.R503_BAD_SEQUENCE.with_text("Error: BINARYMIME requires BDAT"))
        return Result([codes.R354_START_DATA], Action.READ_DATA)

    async def data_complete(self, ev: DataComplete) -> Result:
        txn = self.txn
        self.txn = None
        assert txn is not None
        if ev.too_big:
            return Result([codes.R552_MESSAGE_TOO_BIG])
        return Result([await self._finish(txn, ev.data)])

    # --- BDAT (RFC 3030) ------------------------------------------------------------------------
    def _bdat_command(self, cmd: Bdat | BdatSyntaxError) -> Result:
        if isinstance(cmd, BdatSyntaxError):
            # The byte count is unknown, so the chunk cannot be skipped: close (smuggling-safe).
            return Result([cmd.reply, codes.R421_TOO_MANY_ERRORS.with_text("Error: cannot resynchronise")],
                          Action.CLOSE)
        txn = self.txn
        error: Reply | None = None
        if self.helo is None:
            error = codes.R503_BAD_SEQUENCE.with_text("Error: send HELO/EHLO first")
        elif txn is None:
            error = codes.R503_BAD_SEQUENCE.with_text("Error: need MAIL command")
        elif not txn.recipients:
            error = codes.R554_NO_VALID_RECIPIENTS
        elif len(txn.chunks) + cmd.size > self.limits.max_message_bytes:
            error = codes.R552_MESSAGE_TOO_BIG
        if txn is not None and error is None:
            txn.bdat_started = True
        self._bdat = (cmd, error)
        return Result([], Action.READ_CHUNK, chunk_size=cmd.size, discard_chunk=error is not None)

    async def chunk_complete(self, ev: ChunkComplete) -> Result:
        assert self._bdat is not None
        cmd, error = self._bdat
        self._bdat = None
        txn = self.txn
        if error is not None:
            if error.code == 552:
                self.txn = None  # RFC 3030 §2: the transaction has failed
            return self._error(error)
        assert txn is not None
        txn.chunks += ev.data
        if not cmd.last:
            return Result([codes.R250_CHUNK_OK.with_text(f"Ok: {ev.size} octets received")])
        self.txn = None
        data = bytes(txn.chunks)
        return Result([await self._finish(txn, data)])

    # --- the message -----------------------------------------------------------------------------
    async def _finish(self, txn: Transaction, data: bytes) -> Reply:
        binary = txn.params.body is Body.BINARY
        if not binary:
            problem = bare_line_end(data)
            if problem is not None:
                log.info("smtp %s: message refused: %s", self.peer.remote_ip, problem.text)
                return problem
            if b"\x00" in data:
                return codes.R550_NUL
        local = [lr for r in txn.recipients for lr in r.local]
        fields = header_fields(data)
        # RFC 5321 §6.3 loop detection: Postfix hopcount_limit (50) and Delivered-To loops.
        if sum(1 for f in fields if f[0] == "received") >= MAX_HOPS:
            return codes.R554_TOO_MANY_HOPS
        seen_delivered = {f[1].decode("utf-8", "replace").strip().lower() for f in fields if f[0] == "delivered-to"}
        for lr in local:
            if lr.delivered_to.lower() in seen_delivered:
                return codes.R554_MAIL_LOOP.with_text(f"Mail forwarding loop for {lr.delivered_to}")
        queue_id = secrets.token_hex(5).upper()
        msg = MessageContext(
            data=data,
            sender=txn.sender,
            recipients=[r.address for r in txn.recipients],
            account=self.account,
            helo=self.helo or "unknown",
            esmtp=self.esmtp,
            remote_ip=self.peer.remote_ip,
            tls_info=self.peer.tls_info if self.peer.tls_active else None,
            smtputf8=txn.params.smtputf8,
            queue_id=queue_id,
            hostname=self.hostname,
        )
        prepared = await self.policy.prepare(msg)
        if prepared.reply is not None:
            return prepared.reply
        final = prepared.data
        try:
            await self.delivery.deliver(final, txn.sender, local, junk=prepared.junk)
        except DeliveryError as e:
            return e.reply
        if txn.sender:
            await self._success_dsn(txn, final)
        # Remote copies, one queue item per envelope sender: aliases of ours that forward get
        # the SRS sender (srs.py), relayed mail keeps the client's.
        remote: dict[str, QueueRecipient] = {}
        senders: dict[str, dict[str, QueueRecipient]] = {}
        for r in txn.recipients:
            if not r.remote:
                continue
            sender = await self.delivery.forward_sender(txn.sender, r.address) if r.forwarded else txn.sender
            for addr in r.remote:
                key = normalize(addr)
                if key not in remote:  # the same outside address twice is sent once
                    remote[key] = QueueRecipient(addr, notify=r.params.notify, orcpt=r.params.orcpt)
                    senders.setdefault(sender, {})[key] = remote[key]
        for sender, rcpts in senders.items():
            try:
                await self.ctx.store.queue_add(
                    sender,
                    list(rcpts.values()),
                    final,
                    ret=txn.params.ret,
                    envid=txn.params.envid,
                    requiretls=txn.params.requiretls,
                    smtputf8=txn.params.smtputf8,
                )
            except Exception:
                log.exception("smtp: queueing %s failed", queue_id)
                return codes.R451_LOCAL_ERROR
        if remote:
            self._wake_queue()
        log.info(
            "smtp %s: %s from=<%s> rcpts=%d size=%d local=%d remote=%d",
            self.peer.remote_ip, queue_id, txn.sender, len(txn.recipients), len(final), len(local), len(remote),
        )
        return codes.R250_QUEUED.with_text(f"Ok: queued as {queue_id}")


    def _wake_queue(self) -> None:
        """The item is durable already; a wake-up that fails only delays it to the next scan."""
        queue = self.ctx.services.get("queue")
        if queue is not None:
            try:
                queue.wake()
            except Exception:
                log.exception("smtp: waking the queue failed")

    async def _success_dsn(self, txn: Transaction, final: bytes) -> None:
        """RFC 3461 §5.2.2: a "delivered" DSN for local recipients that asked NOTIFY=SUCCESS.
        Best effort: the message is already durable, a failure here only gets logged."""
        wanted = [
            r for r in txn.recipients
            if r.local and r.params.notify and "SUCCESS" in r.params.notify.split(",")
        ]
        if not wanted:
            return
        try:
            from datetime import UTC, datetime

            from postfach.queue.dsn import RecipientReport, compose_dsn

            now = datetime.now(UTC)
            reports = [
                RecipientReport(r.address, "delivered", "2.0.0", "250 2.0.0 delivered to mailbox",
                                self.hostname, r.params.orcpt, now)
                for r in wanted
            ]
            dsn = compose_dsn(
                reporting_mta=self.hostname, sender=txn.sender, original=final, reports=reports,
                arrival_date=now, envid=txn.params.envid, ret=txn.params.ret or "HDRS",
                smtputf8=txn.params.smtputf8, now=now,
            )
            await self._notify_sender(txn.sender, dsn, smtputf8=txn.params.smtputf8)
        except Exception:
            log.exception("smtp: success DSN to <%s> failed", txn.sender)

    async def _notify_sender(self, sender: str, message: bytes, *, smtputf8: bool) -> None:
        """A notification from the null sender: straight into a local mailbox, else queued."""
        if await self.delivery.is_local_address(sender):
            resolution = await self.delivery.resolve(sender)
            if resolution is not None and resolution.local:
                try:
                    await self.delivery.deliver(message, "", resolution.local)
                except DeliveryError as e:
                    log.info("smtp: DSN to <%s> not delivered: %s", sender, e.reply.text)
            return
        await self.ctx.store.queue_add("", [QueueRecipient(sender)], message, smtputf8=smtputf8)
        self._wake_queue()


def make_session(ctx: ServerContext, peer: Peer, protocol: str) -> Session:
    delivery = LocalDelivery(ctx.store, ctx.config, ctx.services.get("srs"))
    policy: Policy
    if protocol == "mx":
        policy = InboundPolicy(delivery, ctx.services)
    else:
        policy = SubmissionPolicy(delivery, ctx.services, received_privacy=ctx.config.smtp.received_privacy)
    return Session(ctx, peer, policy, delivery)


# ------------------------------------------------------------------------------------- conversation


@dataclass
class Output:
    data: bytes
    starttls: bool = False
    close: bool = False


class Conversation:
    """Receiver + session: ``feed`` bytes, then ``await next()`` until it returns None (need data).
    Each Output carries the reply bytes for one input event."""

    def __init__(self, session: Session, receiver: Receiver) -> None:
        self.session = session
        self.receiver = receiver

    @classmethod
    def create(cls, ctx: ServerContext, peer: Peer, protocol: str) -> Conversation:
        limits = ctx.config.limits
        return cls(
            make_session(ctx, peer, protocol),
            Receiver(limits.smtp_max_line_bytes, limits.max_message_bytes),
        )

    def greeting(self) -> bytes:
        return self.session.greeting().to_bytes()

    def feed(self, data: bytes) -> None:
        self.receiver.feed(data)

    async def next(self) -> Output | None:
        ev = self.receiver.next_event()
        if ev is None:
            return None
        try:
            result = await self._dispatch(ev)
        except StoreUnavailable as e:
            # The database is restarting or unreachable (any lookup: AUTH, RCPT, DATA): a
            # temporary failure the client retries (451 4.3.0, RFC 3463), not a bug to trace.
            # Handlers change state only after their awaits, as below.
            log.warning("smtp %s: store unavailable: %s", self.session.peer.remote_ip, e)
            result = Result([codes.R451_LOCAL_ERROR])
        except Exception:
            # ServerFault: log with traceback, answer 451, keep the session. Handlers change state
            # only after their awaits, so a failed RCPT leaves the transaction as it was; after
            # DATA/BDAT LAST the transaction is already gone.
            log.exception("smtp %s: internal error", self.session.peer.remote_ip)
            result = Result([codes.R451_LOCAL_ERROR])
        if result.action is Action.READ_DATA:
            self.receiver.start_data()
        elif result.action is Action.READ_CHUNK:
            self.receiver.start_chunk(result.chunk_size, discard=result.discard_chunk)
        data = b"".join(r.to_bytes() for r in result.replies)
        return Output(data, starttls=result.action is Action.STARTTLS, close=result.action is Action.CLOSE)

    async def _dispatch(self, ev: Line | LineTooLong | DataComplete | ChunkComplete) -> Result:
        match ev:
            case Line():
                if log.isEnabledFor(logging.DEBUG):
                    shown = b"<auth data>" if self.session.awaiting_auth_response else ev.data[:200]
                    if shown[:4].upper() == b"AUTH":
                        shown = shown[:10] + b" <redacted>"
                    log.debug("smtp %s < %r", self.session.peer.remote_ip, shown)
                return await self.session.command(ev.data)
            case LineTooLong():
                return self.session.line_too_long()
            case DataComplete():
                return await self.session.data_complete(ev)
            case ChunkComplete():
                return await self.session.chunk_complete(ev)
            case _:
                assert_never(ev)

    async def feed_all(self, data: bytes) -> bytes:
        """Test helper: feed bytes and collect every reply until more data is needed."""
        self.feed(data)
        out = bytearray()
        while True:
            step = await self.next()
            if step is None:
                return bytes(out)
            out += step.data
            if step.close:
                return bytes(out)
