"""Delivery status notifications (RFC 3464) as multipart/report (RFC 6522), pure functions.

``compose_dsn`` builds the whole message a sender gets back: a human-readable part in Postfix's
tone, the ``message/delivery-status`` part with one block per recipient (ORCPT, ENVID, Remote-MTA,
Diagnostic-Code …), and the original headers (``text/rfc822-headers``) or, with ``RET=FULL``, the
whole message (``message/rfc822``). Internationalised messages (SMTPUTF8, RFC 6533) use the
``message/global-*`` types. ``wants_dsn`` decides from NOTIFY (RFC 3461 §4.1) whether a recipient
gets one at all; the caller never sends a DSN to the null sender (RFC 5321 §4.5.5).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

# Bigger originals are returned as headers only, as Postfix does (bounce_size_limit).
MAX_RETURNED_MESSAGE_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class RecipientReport:
    address: str
    action: str  # "failed", "delayed", "delivered", "relayed", "expanded" (RFC 3464 §2.3.3)
    status: str  # "5.1.1"
    diagnostic: str = ""  # the remote reply, e.g. "550 5.1.1 <x@y>: user unknown"
    remote_mta: str = ""  # the host that answered
    orcpt: str | None = None  # as given with RCPT (xtext "rfc822;addr")
    last_attempt: datetime | None = None
    will_retry_until: datetime | None = None


def xtext_decode(value: str) -> str:
    """RFC 3461 §4: ``+XX`` hex escapes."""
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


def xtext_encode(value: str) -> str:
    out = []
    for ch in value:
        o = ord(ch)
        if 33 <= o <= 126 and ch not in "+=":
            out.append(ch)
        elif o < 128:
            out.append(f"+{o:02X}")
        else:  # RFC 6533 §3: UTF-8 as is where SMTPUTF8 allows it
            out.append(ch)
    return "".join(out)


def wants_dsn(notify: str | None, event: str) -> bool:
    """RFC 3461 §4.1: may we report ``event`` ("failure", "delay", "success") for this recipient?
    Absent NOTIFY means FAILURE (and DELAY at the MTA's discretion: we send it)."""
    if notify is None or not notify.strip():
        return event in ("failure", "delay")
    words = {w.strip().upper() for w in notify.split(",")}
    if "NEVER" in words:
        return False
    return event.upper() in words


def status_of(reply: str, *, permanent: bool) -> str:
    """The enhanced status code in a reply ("550 5.1.1 ..."), else one derived from its class."""
    m = re.match(r"^\s*([245])\d\d[ -]([245])\.(\d{1,3})\.(\d{1,3})\b", reply)
    if m:
        return f"{m.group(2)}.{m.group(3)}.{m.group(4)}"
    m = re.match(r"^\s*([245])\d\d", reply)
    if m:
        return f"{m.group(1)}.0.0"
    return "5.0.0" if permanent else "4.0.0"


def split_headers(data: bytes) -> bytes:
    """The header section of a message, ending in CRLF (tolerating bare LF)."""
    m = re.search(rb"\r?\n\r?\n", data)
    head = data[: m.start()] if m else data
    head = re.sub(rb"\r?\n", b"\r\n", head)
    return head + b"\r\n" if head else b""


def _needs_global(data: bytes, reports: Sequence[RecipientReport], smtputf8: bool) -> bool:
    if smtputf8:
        return True
    if any(not r.address.isascii() or (r.orcpt and not r.orcpt.isascii()) for r in reports):
        return True
    return not split_headers(data).isascii()


def _orcpt_field(orcpt: str) -> str:
    kind, sep, addr = orcpt.partition(";")
    if not sep:
        return f"rfc822; {xtext_decode(orcpt)}"
    if kind.strip().lower() == "utf-8":
        return f"utf-8; {addr}"
    return f"{kind.strip()}; {xtext_decode(addr)}"


def _clean(s: str) -> str:
    return re.sub(r"[\r\n]+\s*", " ", s).strip()


_INTRO = {
    "failed": (
        "Undelivered Mail Returned to Sender",
        "I'm sorry to have to inform you that your message could not\n"
        "be delivered to one or more recipients. It's attached below.\n\n"
        "For further assistance, please send mail to postmaster.\n\n"
        "If you do so, please include this problem report. You can\n"
        "delete your own text from the attached returned message.",
    ),
    "delayed": (
        "Delayed Mail (still being retried)",
        "####################################################################\n"
        "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\n"
        "####################################################################\n\n"
        "Your message could not be delivered for {hours} hours.\n"
        "It will be retried until it is {days} days old.",
    ),
    "delivered": (
        "Successful Mail Delivery Report",
        "Your message was successfully delivered to the destination(s)\n"
        "listed below. If the message was delivered to mailbox you will\n"
        "receive no further notifications. Otherwise you may still receive\n"
        "notifications of mail delivery errors from other systems.",
    ),
}
_INTRO["relayed"] = _INTRO["delivered"]
_INTRO["expired"] = _INTRO["failed"]


def compose_dsn(
    *,
    reporting_mta: str,
    sender: str,
    original: bytes,
    reports: Sequence[RecipientReport],
    arrival_date: datetime,
    envid: str | None = None,
    ret: str | None = None,
    smtputf8: bool = False,
    delay_hours: float = 0.0,
    max_age_days: float = 5.0,
    now: datetime | None = None,
) -> bytes:
    """The complete DSN message (CRLF line ends), addressed from MAILER-DAEMON to ``sender``."""
    if not reports:
        raise ValueError("a DSN needs at least one recipient report")
    now = now or datetime.now(UTC)
    action = reports[0].action
    subject, intro = _INTRO.get(action, _INTRO["failed"])
    intro = intro.format(hours=f"{delay_hours:.0f}", days=f"{max_age_days:g}")
    boundary = f"postfach-{secrets.token_hex(12)}"
    glob = _needs_global(original, reports, smtputf8)
    msgid = f"<{secrets.token_hex(12)}.dsn@{reporting_mta}>"

    lines: list[str] = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        f"Subject: {subject}",
        f"Date: {format_datetime(now)}",
        f"Message-ID: {msgid}",
        "Auto-Submitted: auto-replied",  # RFC 3834 §5: no auto-replies to this
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"This is the mail system at host {reporting_mta}.",
        "",
        *intro.split("\n"),
        "",
        "                   The mail system",
        "",
    ]
    for r in reports:
        where = f" (host {r.remote_mta} said: {_clean(r.diagnostic)})" if r.remote_mta and r.diagnostic \
            else (f": {_clean(r.diagnostic)}" if r.diagnostic else "")
        lines.append(f"<{r.address}>{where}")
        lines.append("")

    # RFC 3464 §2.1: the machine-readable part
    status_type = "message/global-delivery-status" if glob else "message/delivery-status"
    lines += [f"--{boundary}", "Content-Description: Delivery report", f"Content-Type: {status_type}", ""]
    if envid is not None:
        lines.append(f"Original-Envelope-Id: {xtext_decode(envid)}")
    lines.append(f"Reporting-MTA: dns; {reporting_mta}")
    lines.append(f"Arrival-Date: {format_datetime(arrival_date)}")
    for r in reports:
        lines.append("")
        addr_type = "utf-8" if not r.address.isascii() else "rfc822"
        lines.append(f"Final-Recipient: {addr_type}; {r.address}")
        if r.orcpt:
            lines.append(f"Original-Recipient: {_orcpt_field(r.orcpt)}")
        lines.append(f"Action: {r.action}")
        lines.append(f"Status: {r.status}")
        if r.remote_mta:
            lines.append(f"Remote-MTA: dns; {r.remote_mta}")
        if r.diagnostic:
            diag = _clean(r.diagnostic)
            kind = "smtp" if re.match(r"^[245]\d\d\b", diag) else "X-Postfach"
            lines.append(f"Diagnostic-Code: {kind}; {diag}")
        if r.last_attempt is not None:
            lines.append(f"Last-Attempt-Date: {format_datetime(r.last_attempt)}")
        if r.will_retry_until is not None:
            lines.append(f"Will-Retry-Until: {format_datetime(r.will_retry_until)}")
    lines.append("")

    # RFC 3461 §4.3: RET=FULL returns the message, RET=HDRS (and the default here) the headers
    full = (ret or "").upper() == "FULL" and len(original) <= MAX_RETURNED_MESSAGE_BYTES \
        and action in ("failed", "expired")
    if full:
        ctype = "message/global" if glob else "message/rfc822"
        lines += [f"--{boundary}", "Content-Description: Undelivered Message", f"Content-Type: {ctype}",
                  "Content-Transfer-Encoding: 8bit", ""]
        head = "\r\n".join(lines).encode("utf-8") + b"\r\n"
        body = re.sub(rb"(?<!\r)\n", b"\r\n", original)
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        tail = f"\r\n--{boundary}--\r\n".encode()
        return head + body + tail
    ctype = "message/global-headers" if glob else "text/rfc822-headers"
    desc = "Undelivered Message Headers" if action in ("failed", "expired") else "Message Headers"
    lines += [f"--{boundary}", f"Content-Description: {desc}", f"Content-Type: {ctype}", ""]
    head = "\r\n".join(lines).encode("utf-8") + b"\r\n"
    return head + split_headers(original) + f"\r\n--{boundary}--\r\n".encode()
