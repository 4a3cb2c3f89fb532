"""What differs between submission (ports 587/465 and any extra) and inbound MX (port 25).

``SubmissionPolicy``: AUTH required and offered only under TLS (unless the client's network is in
``[auth] cleartext_networks``); envelope sender and ``From:`` must be addresses the account owns;
``Bcc``/``Return-Path`` removed, missing ``Message-ID``/``Date`` added, ``Received`` prepended
(without the client's address with ``[smtp] received_privacy``), DKIM-signed through
``ctx.services["dkim_signer"]``; recipients outside our domains go to the outbound queue.

``InboundPolicy``: no AUTH; only our domains and aliases (anything else ``554 5.7.1 Relay access
denied``); ``Received`` and the ``Authentication-Results`` of ``ctx.services["inbound_checks"]``
prepended; "reject" → ``550 5.7.1``, "quarantine" → the Junk folder.
"""

from __future__ import annotations

import email.utils
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from postfach.mail.address import parse_address_list
from postfach.smtp import codes
from postfach.smtp.codes import Reply
from postfach.smtp.delivery import LocalDelivery, normalize, split_address
from postfach.smtp.inbound_checks import remove_forged_results
from postfach.store.base import Account

log = logging.getLogger("postfach.smtp")


# ------------------------------------------------------------------------------------ header tools


def header_end(data: bytes) -> int:
    """Offset of the empty line ending the header section (``len(data)`` when there is none)."""
    if data.startswith(b"\r\n"):
        return 0
    i = data.find(b"\r\n\r\n")
    return len(data) if i < 0 else i + 2


_FIELD_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def header_fields(data: bytes) -> list[tuple[str, bytes, int, int]]:
    """(lower-case name, unfolded value, start, end) for each field of the header section."""
    end = header_end(data)
    out: list[tuple[str, bytes, int, int]] = []
    pos = 0
    while pos < end:
        nl = data.find(b"\r\n", pos, end)
        line_end = end if nl < 0 else nl + 2
        # continuation lines start with WSP
        while line_end < end and data[line_end : line_end + 1] in (b" ", b"\t"):
            nl = data.find(b"\r\n", line_end, end)
            line_end = end if nl < 0 else nl + 2
        raw = data[pos:line_end]
        m = _FIELD_NAME.match(raw)
        if m:
            value = raw[m.end() :].replace(b"\r\n", b"").strip()
            out.append((m.group(1).decode("ascii").lower(), value, pos, line_end))
        pos = line_end
    return out


def remove_fields(data: bytes, names: set[str]) -> bytes:
    fields = [f for f in header_fields(data) if f[0] in names]
    if not fields:
        return data
    parts: list[bytes] = []
    pos = 0
    for _, _, start, end in fields:
        parts.append(data[pos:start])
        pos = end
    parts.append(data[pos:])
    return b"".join(parts)


def header_addresses(value: bytes) -> list[str] | None:
    """Addresses of a From-like field value; None when one of them has no domain (unusable)."""
    addrs = []
    for a in parse_address_list(value.decode("utf-8", "replace")):
        if a.is_group_marker:
            continue
        if not a.mailbox or not a.host:
            return None
        addrs.append(f"{a.mailbox}@{a.host}")
    return addrs


def rfc5322_date(now: datetime | None = None) -> str:
    return email.utils.format_datetime(now or datetime.now(UTC))


# ----------------------------------------------------------------------------------- the messages


@dataclass
class MessageContext:
    """What a policy sees of one finished transaction."""

    data: bytes
    sender: str
    recipients: list[str]
    account: Account | None
    helo: str
    esmtp: bool
    remote_ip: str
    tls_info: str | None  # "TLSv1.3 with cipher ..." or None without TLS
    smtputf8: bool
    queue_id: str
    hostname: str


@dataclass
class Prepared:
    data: bytes = b""
    junk: bool = False
    reply: Reply | None = None  # an error reply: the message is not accepted


def protocol_keyword(ctx: MessageContext) -> str:
    """RFC 3848 / RFC 6531 §3.7.3 ``with`` keyword: ESMTP[S][A], UTF8SMTP[S][A], or SMTP."""
    if not ctx.esmtp:
        return "SMTP"
    word = "UTF8SMTP" if ctx.smtputf8 else "ESMTP"
    return word + ("S" if ctx.tls_info else "") + ("A" if ctx.account is not None else "")


def received_header(ctx: MessageContext, *, private: bool) -> bytes:
    """RFC 5321 §4.4 trace field, Postfix layout."""
    lines: list[str] = []
    if not private:
        helo = ctx.helo.replace("(", "").replace(")", "")[:255]
        lines.append(f"Received: from {helo} ([{ctx.remote_ip}])")
        if ctx.tls_info:
            lines.append(f"\t(using {ctx.tls_info})")
        lines.append(f"\tby {ctx.hostname} (postfach) with {protocol_keyword(ctx)} id {ctx.queue_id}")
    else:
        lines.append(f"Received: by {ctx.hostname} (postfach) with {protocol_keyword(ctx)} id {ctx.queue_id}")
    tail = f"; {rfc5322_date()}"
    if len(ctx.recipients) == 1:
        lines.append(f"\tfor <{ctx.recipients[0]}>{tail}")
    else:
        lines[-1] += tail
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


class Policy(Protocol):
    name: str
    offers_auth: bool
    requires_auth: bool

    def relay_allowed(self, account: Account | None) -> bool: ...

    async def check_sender(self, account: Account | None, sender: str) -> Reply | None: ...

    async def prepare(self, msg: MessageContext) -> Prepared: ...


async def owns(delivery: LocalDelivery, account: Account, address: str) -> bool:
    """The account may send as ``address``: its own, ``own+tag``, an alias whose target is the
    account, or an address of a catch-all pointing to it that no account or alias claims."""
    addr = normalize(address)
    mine = account.address.lower()
    if addr == mine:
        return True
    local, domain = split_address(addr)
    candidates = [addr]
    if "+" in local:
        candidates.append(f"{local.split('+', 1)[0]}@{domain}")
    store = delivery.store
    for cand in candidates:
        if cand == mine:
            return True
        aliases = await store.aliases_for(cand)
        if any(normalize(a.target) == mine for a in aliases):
            return True
        if aliases or await store.get_account(cand) is not None:
            return False
    catch_all = await store.aliases_for("@" + domain)
    return any(normalize(a.target) == mine for a in catch_all)


class SubmissionPolicy:
    name = "submission"
    offers_auth = True
    requires_auth = True

    def __init__(self, delivery: LocalDelivery, services: dict[str, Any], *, received_privacy: bool) -> None:
        self.delivery = delivery
        self.services = services
        self.received_privacy = received_privacy

    def relay_allowed(self, account: Account | None) -> bool:
        return account is not None

    async def check_sender(self, account: Account | None, sender: str) -> Reply | None:
        if account is None:
            return codes.R530_AUTH_REQUIRED
        if sender == "":  # the null sender (e.g. a client's read receipt); From: is still checked
            return None
        if not await owns(self.delivery, account, sender):
            log.info("submission: %s may not send as %s", account.address, sender)
            return codes.R553_SENDER_NOT_OWNED.with_text(
                f"<{sender}>: Sender address rejected: not owned by user {account.address}"
            )
        return None

    async def prepare(self, msg: MessageContext) -> Prepared:
        account = msg.account
        assert account is not None
        data = remove_fields(msg.data, {"bcc", "resent-bcc", "return-path"})
        fields = header_fields(data)
        names = {f[0] for f in fields}
        from_values = [f[1] for f in fields if f[0] == "from"]
        added: list[bytes] = []
        from_domain = account.domain
        if not from_values:
            added.append(f"From: <{account.address}>\r\n".encode())
        else:
            for value in from_values:
                addrs = header_addresses(value)
                if not addrs:
                    return Prepared(reply=codes.R553_FROM_NOT_OWNED.with_text("Error: bad From: header"))
                for a in addrs:
                    if not await owns(self.delivery, account, a):
                        log.info("submission: %s may not use From: %s", account.address, a)
                        return Prepared(
                            reply=codes.R553_FROM_NOT_OWNED.with_text(
                                f"<{a}>: From: address not owned by user {account.address}"
                            )
                        )
                from_domain = split_address(addrs[0])[1].lower()
        if "date" not in names:
            added.append(f"Date: {rfc5322_date()}\r\n".encode())
        if "message-id" not in names:
            added.append(f"Message-ID: <{uuid.uuid4().hex}@{msg.hostname}>\r\n".encode())
        body = b"".join(added) + data
        out = received_header(msg, private=self.received_privacy) + body
        signer = self.services.get("dkim_signer")
        if signer is not None:
            try:
                out = signer.sign(out, from_domain) + out
            except Exception:  # an unsigned message beats a lost one; the operator sees the log
                log.exception("DKIM signing for %s failed; sending unsigned", from_domain)
        return Prepared(out)


class InboundPolicy:
    name = "mx"
    offers_auth = False
    requires_auth = False

    def __init__(self, delivery: LocalDelivery, services: dict[str, Any]) -> None:
        self.delivery = delivery
        self.services = services

    def relay_allowed(self, account: Account | None) -> bool:
        return False

    async def check_sender(self, account: Account | None, sender: str) -> Reply | None:
        return None

    async def prepare(self, msg: MessageContext) -> Prepared:
        prefix = received_header(msg, private=False)
        junk = False
        checks = self.services.get("inbound_checks")
        if checks is not None:
            try:
                result = await checks.check(msg.remote_ip, msg.helo, msg.sender, msg.data)
            except Exception:  # Postfix milter_default_action = tempfail
                log.exception("inbound checks failed")
                return Prepared(reply=codes.R451_LOCAL_ERROR)
            action = getattr(result, "action", "accept")
            header = getattr(result, "header", b"") or b""
            if action == "reject":
                return Prepared(reply=codes.R550_POLICY_REJECTED.with_text("Message rejected by DMARC policy"))
            if action == "quarantine":
                junk = True
            prefix = header + prefix
            data = _without_forged_results(msg.data, header)
            return Prepared(prefix + data, junk)
        return Prepared(prefix + msg.data, junk)


def _without_forged_results(data: bytes, our_header: bytes) -> bytes:
    """RFC 8601 §5: before adding ours, drop Authentication-Results fields that claim our
    authserv-id (a sender could otherwise forge "dkim=pass" in our name)."""
    _name, colon, value = our_header.partition(b":")
    authserv_id = value.split(b";", 1)[0].strip().decode("ascii", "replace") if colon else ""
    return remove_forged_results(data, authserv_id) if authserv_id else data
