"""RFC 3464 DSN composition and the NOTIFY/status helpers (pure, no sockets)."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from email.message import Message

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postfach.queue.dsn import (
    RecipientReport,
    compose_dsn,
    split_headers,
    status_of,
    wants_dsn,
    xtext_decode,
    xtext_encode,
)


def parts_of(msg: Message) -> list[Message]:
    parts = msg.get_payload()
    assert isinstance(parts, list)
    return [p for p in parts if isinstance(p, Message)]


ORIGINAL = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: hi\r\n\r\nbody line\r\n"
WHEN = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("notify", "event", "expected"),
    [
        (None, "failure", True), (None, "delay", True), (None, "success", False),
        ("NEVER", "failure", False), ("SUCCESS", "failure", False), ("SUCCESS", "success", True),
        ("failure,delay", "delay", True), ("FAILURE", "delay", False),
    ],
)
def test_wants_dsn(notify: str | None, event: str, expected: bool) -> None:
    assert wants_dsn(notify, event) is expected


@pytest.mark.parametrize(
    ("reply", "permanent", "expected"),
    [
        ("550 5.1.1 user unknown", True, "5.1.1"), ("451 4.7.1 greylisted", False, "4.7.1"),
        ("554 no enhanced code", True, "5.0.0"), ("connection refused", False, "4.0.0"),
        ("550-5.7.26 multi-line", True, "5.7.26"),
    ],
)
def test_status_of(reply: str, permanent: bool, expected: str) -> None:
    assert status_of(reply, permanent=permanent) == expected


def test_xtext_round_trip() -> None:
    assert xtext_encode("a+b=c@d") == "a+2Bb+3Dc@d"
    assert xtext_decode("a+2Bb+3Dc@d") == "a+b=c@d"


def test_split_headers_tolerates_bare_lf() -> None:
    assert split_headers(b"A: 1\nB: 2\n\nbody") == b"A: 1\r\nB: 2\r\n"
    assert split_headers(b"") == b""


def test_failed_dsn_structure() -> None:
    raw = compose_dsn(
        reporting_mta="mail.x.test", sender="a@x.test", original=ORIGINAL, arrival_date=WHEN, now=WHEN,
        envid="ENV+2B1", ret="HDRS",
        reports=[RecipientReport("b@y.test", "failed", "5.1.1", "550 5.1.1 unknown", "mx.y.test",
                                 "rfc822;b+2Bz@y.test", WHEN)],
    )
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mail.x.test>"
    text, status, headers = parts_of(msg)
    assert "<b@y.test> (host mx.y.test said: 550 5.1.1 unknown)" in str(text.get_payload())
    per_msg, rcpt = parts_of(status)
    assert per_msg["Original-Envelope-Id"] == "ENV+1"
    assert per_msg["Arrival-Date"] == "Fri, 27 Nov 2026 09:00:00 +0000"
    assert rcpt["Original-Recipient"] == "rfc822; b+z@y.test"
    assert rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 unknown"
    assert rcpt["Last-Attempt-Date"] == "Fri, 27 Nov 2026 09:00:00 +0000"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert str(headers.get_payload()).strip().endswith("Subject: hi")


def test_international_dsn_uses_global_types() -> None:
    original = "From: jörg@x.test\r\nSubject: grüße\r\n\r\nbody\r\n".encode()
    raw = compose_dsn(
        reporting_mta="mail.x.test", sender="jörg@x.test", original=original, arrival_date=WHEN,
        smtputf8=True, ret="FULL",
        reports=[RecipientReport("zoë@y.test", "failed", "5.1.1", "550 5.1.1 unknown")],
    )
    assert b"Content-Type: message/global-delivery-status" in raw
    assert b"Final-Recipient: utf-8; zo\xc3\xab@y.test" in raw
    assert b"Content-Type: message/global\r\n" in raw
    assert original in raw


def test_delay_dsn_has_no_original_body() -> None:
    raw = compose_dsn(
        reporting_mta="m.test", sender="a@x.test", original=ORIGINAL, arrival_date=WHEN, ret="FULL",
        reports=[RecipientReport("b@y.test", "delayed", "4.4.1", "connect refused", will_retry_until=WHEN)],
        delay_hours=4, max_age_days=5,
    )
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert b"body line" not in raw
    assert b"Will-Retry-Until: Fri, 27 Nov 2026 09:00:00 +0000" in raw
    assert b"Diagnostic-Code: X-Postfach; connect refused" in raw
    with pytest.raises(ValueError):
        compose_dsn(reporting_mta="m", sender="a@x", original=b"", arrival_date=WHEN, reports=[])


_addr = st.from_regex(r"[a-zA-Z0-9._+\-]{1,20}@[a-z0-9\-]{1,15}\.test", fullmatch=True)


@settings(max_examples=40, deadline=None)
@given(
    rcpts=st.lists(_addr, min_size=1, max_size=4),
    diag=st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=127), max_size=200),
    original=st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=127), max_size=300).map(str.encode),
    ret=st.sampled_from([None, "FULL", "HDRS"]),
    action=st.sampled_from(["failed", "delayed", "relayed"]),
)
def test_dsn_always_well_formed(rcpts: list[str], diag: str, original: bytes, ret: str | None,
                                action: str) -> None:
    reports = [RecipientReport(a, action, "5.0.0" if action == "failed" else "4.0.0", diag) for a in rcpts]
    raw = compose_dsn(reporting_mta="m.test", sender="s@x.test", original=original, reports=reports,
                      arrival_date=WHEN, ret=ret)
    head, _, _ = raw.partition(b"\r\n\r\n")
    assert b"\n" not in head.replace(b"\r\n", b"")  # our own header section is clean CRLF
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report"
    parts = parts_of(msg)
    assert [p.get_content_type() for p in parts][:2] == ["text/plain", "message/delivery-status"]
    blocks = parts_of(parts[1])
    assert [b["Final-Recipient"] for b in blocks[1:]] == [f"rfc822; {a}" for a in rcpts]
    assert all(b["Action"] == action for b in blocks[1:])
