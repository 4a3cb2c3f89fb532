"""SRS end to end: mail from the world to an alias of A that points at B leaves A with an SRS0
envelope sender in A's domain, so SPF at B passes; a bounce to that address comes back to the
original sender; forged or expired SRS addresses are refused at RCPT."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import authres
import pytest
from queuehelpers import DnsTestServer, Sink
from test_e2e_mx import _start_pair, _wait_inbox

from postfach.smtp.srs import Srs
from postfach.store.base import Store

pytestmark = pytest.mark.timeout(120)

SENDER_IP = "127.0.0.23"  # the original sender's MX (a sink), for the bounce


@pytest.fixture
def pair(tmp_path: Path, dns_server: DnsTestServer) -> Iterator[tuple[Any, Any, Any]]:
    gen = _start_pair(tmp_path, dns_server, None)
    root, live_a, live_b = next(gen)

    async def alias(store: Store) -> None:
        await store.add_alias("fwd@example.org", "bob@b.test")
        await store.add_alias("both@example.org", "bob@b.test")
        await store.add_alias("both@example.org", root.USER)
        await store.add_alias("gone@example.org", "nobody@b.test")  # B refuses it: 550 5.1.1

    live_a.call(alias)
    # The original sender's domain allows only its own server: forwarded without SRS, SPF at B fails.
    dns_server.set("sender.test", "TXT", "v=spf1 ip4:192.0.2.1 -all")
    dns_server.set("sender.test", "MX", "10 mx.sender.test.")
    dns_server.set("mx.sender.test", "A", SENDER_IP)
    try:
        yield root, live_a, live_b
    finally:
        gen.close()


def _mx(live: Any) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", live.port("mx", "starttls"), timeout=30)
    s.ehlo("mx.sender.test")
    return s


def _head_fields(data: bytes, name: str) -> list[str]:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    lines = head.replace("\r\n\t", " ").replace("\r\n ", " ").split("\r\n")
    return [h for h in lines if h.lower().startswith(name.lower() + ":")]


def _srs_of(tmp_path: Path) -> Srs:
    return Srs.from_file(tmp_path / "a" / "srs.secret")


def test_forward_with_srs_passes_spf_and_bounce_returns(
    pair: tuple[Any, Any, Any], tmp_path: Path
) -> None:
    _root, live_a, live_b = pair
    msg = (b"From: Alice <alice@sender.test>\r\nTo: fwd@example.org\r\nSubject: forwarded\r\n\r\n"
           b"Through the alias.\r\n")
    with _mx(live_a) as s:
        assert s.sendmail("alice@sender.test", ["fwd@example.org"], msg) == {}
    got = _wait_inbox(live_b, "bob@b.test")
    assert len(got) == 1 and b"Through the alias." in got[0]
    (return_path,) = _head_fields(got[0], "Return-Path")
    srs_sender = return_path.split("<", 1)[1].rstrip(">")
    assert srs_sender.startswith("SRS0=") and srs_sender.endswith("=sender.test=alice@example.org")
    results = {}
    for line in _head_fields(got[0], "Authentication-Results"):
        ar = authres.AuthenticationResultsHeader.parse(line)
        results[ar.authserv_id] = {r.method: r.result for r in ar.results}
    # A's MX saw alice's own domain from an address it does not allow ...
    assert results["localhost"]["spf"] == "fail"
    # ... B sees A forwarding for example.org, which allows A: the forward passes SPF
    assert results["mx.b.test"]["spf"] == "pass"
    assert _srs_of(tmp_path).reverse(srs_sender) == "alice@sender.test"

    # B (or any MX on the way) bounces: null sender to the SRS address, back at A's MX
    sink = Sink(SENDER_IP, live_a.config.smtp.relay_port).start()
    try:
        bounce = (b"From: MAILER-DAEMON@mx.b.test\r\nTo: " + srs_sender.encode() +
                  b"\r\nSubject: Undelivered Mail Returned to Sender\r\n\r\nbob is gone.\r\n")
        with _mx(live_a) as s:
            assert s.sendmail("", [srs_sender], bounce) == {}
        deadline = time.monotonic() + 60
        while not sink.received and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(sink.received) == 1
        r = sink.received[0]
        assert r.rcpts == ["alice@sender.test"] and r.mail_from in ("", "<>")  # the null sender stays null
        assert b"bob is gone." in r.data
    finally:
        sink.stop()


def test_local_copies_and_local_senders_are_not_rewritten(pair: tuple[Any, Any, Any]) -> None:
    root, live_a, live_b = pair
    # our own user through submission, to an alias that both forwards and keeps a local copy
    ctx = live_a.client_context()
    msg = f"From: <{root.USER}>\r\nTo: both@example.org\r\nSubject: ours\r\n\r\nOwn domain.\r\n".encode()
    with smtplib.SMTP("127.0.0.1", live_a.port("submission", "starttls"), timeout=30) as s:
        s.starttls(context=ctx)
        s.login(root.USER, root.PASSWORD)
        assert s.sendmail(root.USER, ["both@example.org"], msg) == {}
    got = _wait_inbox(live_b, "bob@b.test")
    assert len(got) == 1
    assert _head_fields(got[0], "Return-Path") == [f"Return-Path: <{root.USER}>"]
    local = _wait_inbox(live_a, root.USER)
    assert len(local) == 1 and local[0].startswith(f"Return-Path: <{root.USER}>\r\n".encode())


def test_forged_and_expired_srs_refused_at_rcpt(pair: tuple[Any, Any, Any], tmp_path: Path) -> None:
    _root, live_a, _live_b = pair
    srs = _srs_of(tmp_path)
    good = srs.forward("alice@sender.test", "example.org")
    forged = "SRS0=AAAA" + good[9:]
    expired = srs.forward("alice@sender.test", "example.org", now=time.time() - 22 * 86400)
    other_secret = Srs([b"not ours"]).forward("alice@sender.test", "example.org")
    with _mx(live_a) as s:
        for addr in (forged, expired, other_secret, "SRS0=xx@example.org"):
            s.mail("")
            code, text = s.rcpt(addr)
            assert code == 550 and text.startswith(b"5.1.1"), (addr, code, text)
            s.rset()
        s.mail("")
        code, _ = s.rcpt(good)  # the genuine one is accepted
        assert code == 250


def test_our_own_bounce_of_a_forward_goes_to_the_original_sender(pair: tuple[Any, Any, Any]) -> None:
    _root, live_a, _live_b = pair
    sink = Sink(SENDER_IP, live_a.config.smtp.relay_port).start()
    try:
        msg = b"From: <alice@sender.test>\r\nTo: gone@example.org\r\nSubject: to nobody\r\n\r\nHello?\r\n"
        with _mx(live_a) as s:
            assert s.sendmail("alice@sender.test", ["gone@example.org"], msg) == {}
        # A's queue forwards with the SRS sender, B refuses, A's DSN goes to the SRS address,
        # which A itself turns back into alice's
        deadline = time.monotonic() + 60
        while not sink.received and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(sink.received) == 1
        r = sink.received[0]
        assert r.rcpts == ["alice@sender.test"] and r.mail_from in ("", "<>")
        assert b"nobody@b.test" in r.data and b"multipart/report" in r.data
    finally:
        sink.stop()
