"""The session with the services of the other rooms: the real DKIM signer (keys from
``postfach.dkim.keygen``, verified with dkimpy), and small stand-ins for the inbound checks and the
queue runner that follow their documented interfaces."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from tests.smtp.smtp_helpers import OTHER, USER, Env, make_env

from postfach.smtp.session import Conversation, Peer

AUTH = b"AUTH PLAIN AHVzZXJAZXhhbXBsZS5vcmcAc2VjcmV0LXBhc3M=\r\n"


async def talk(env: Env, protocol: str, stream: bytes, remote: str = "127.0.0.1") -> list[str]:
    conv = Conversation.create(env.ctx, Peer(remote, "starttls", True, "TLSv1.3 test"), protocol)
    out = await conv.feed_all(stream)
    return [line for line in out.decode().split("\r\n") if line and not line.startswith("250-")]


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = await make_env(tmp_path, {"data_dir": tmp_path / "data"})
    try:
        yield e
    finally:
        await e.store.close()


@pytest.mark.asyncio
async def test_submission_is_dkim_signed_for_the_from_domain(env: Env) -> None:
    from postfach import dkim

    keys = dkim.keygen(env.ctx.config, "example.org", "both")
    env.ctx.services["dkim_signer"] = dkim.DkimSigner(env.ctx.config)
    replies = await talk(
        env, "submission",
        b"EHLO c\r\n" + AUTH + b"MAIL FROM:<sales@example.org>\r\nRCPT TO:<other@example.org>\r\nDATA\r\n"
        b"From: <sales@example.org>\r\nTo: <other@example.org>\r\nSubject: signed\r\n\r\nbody\r\n.\r\n",
    )
    assert replies[-1].startswith("250 2.0.0 Ok: queued as"), replies
    msg = (await env.messages(OTHER))[0]
    assert b"DKIM-Signature:" in msg
    records: dict[bytes, bytes | None] = {k.dns_name.encode(): k.dns_txt.encode() for k in keys}
    sigs = dkim.signature_tags(msg)
    assert {s[b"d"] for s in sigs} == {b"example.org"}
    for i in range(len(sigs)):
        ok, why = dkim.verify_with_records(msg, records, i)
        assert ok, why


@dataclass
class Verdict:
    header: bytes
    action: str


class Checks:
    def __init__(self, action: str) -> None:
        self.action = action
        self.calls: list[tuple[str, str, str, bytes]] = []

    async def check(self, remote_ip: str, helo: str, mail_from: str, data: bytes) -> Verdict:
        self.calls.append((remote_ip, helo, mail_from, data))
        return Verdict(b"Authentication-Results: mail.example.org; spf=pass\r\n", self.action)


MX_MAIL = (b"EHLO relay.example\r\nMAIL FROM:<x@sender.example>\r\nRCPT TO:<user@example.org>\r\nDATA\r\n"
           b"From: x@sender.example\r\nSubject: in\r\n\r\nhi\r\n.\r\n")


@pytest.mark.asyncio
async def test_inbound_checks_accept_prepends_authentication_results(env: Env) -> None:
    checks = Checks("accept")
    env.ctx.services["inbound_checks"] = checks
    replies = await talk(env, "mx", MX_MAIL, "192.0.2.1")
    assert replies[-1].startswith("250 2.0.0")
    assert checks.calls[0][:3] == ("192.0.2.1", "relay.example", "x@sender.example")
    assert checks.calls[0][3].startswith(b"From: x@sender.example\r\n")
    msg = (await env.messages(USER))[0]
    assert msg.split(b"\r\n")[2].startswith(b"Authentication-Results: mail.example.org; spf=pass")
    assert msg.split(b"\r\n")[3].startswith(b"Received: from relay.example ([192.0.2.1])")


@pytest.mark.asyncio
async def test_forged_authentication_results_in_our_name_are_removed(env: Env) -> None:
    env.ctx.services["inbound_checks"] = Checks("accept")
    forged = (b"EHLO relay.example\r\nMAIL FROM:<x@sender.example>\r\nRCPT TO:<user@example.org>\r\nDATA\r\n"
              b"Authentication-Results: mail.example.org; dkim=pass header.d=bank.example\r\n"
              b"Authentication-Results: other.example; spf=fail\r\n"
              b"From: x@sender.example\r\nSubject: in\r\n\r\nhi\r\n.\r\n")
    replies = await talk(env, "mx", forged, "192.0.2.1")
    assert replies[-1].startswith("250 2.0.0")
    msg = (await env.messages(USER))[0]
    results = [ln for ln in msg.split(b"\r\n") if ln.lower().startswith(b"authentication-results:")]
    assert results == [b"Authentication-Results: mail.example.org; spf=pass",
                       b"Authentication-Results: other.example; spf=fail"]


@pytest.mark.asyncio
async def test_inbound_checks_reject_is_550(env: Env) -> None:
    env.ctx.services["inbound_checks"] = Checks("reject")
    replies = await talk(env, "mx", MX_MAIL)
    assert replies[-1] == "550 5.7.1 Message rejected by DMARC policy"
    assert await env.messages(USER) == []


@pytest.mark.asyncio
async def test_inbound_checks_quarantine_goes_to_junk(env: Env) -> None:
    env.ctx.services["inbound_checks"] = Checks("quarantine")
    replies = await talk(env, "mx", MX_MAIL)
    assert replies[-1].startswith("250 2.0.0")
    assert await env.messages(USER) == []
    assert len(await env.messages(USER, "Junk")) == 1


class Queue:
    def __init__(self) -> None:
        self.woken = 0

    def wake(self) -> None:
        self.woken += 1


@pytest.mark.asyncio
async def test_remote_recipients_queued_once_with_dsn_options_and_queue_woken(env: Env) -> None:
    queue = Queue()
    env.ctx.services["queue"] = queue
    replies = await talk(
        env, "submission",
        b"EHLO c\r\n" + AUTH + b"MAIL FROM:<user@example.org> RET=HDRS ENVID=e+2B1 SMTPUTF8\r\n"
        b"RCPT TO:<a@remote.example> NOTIFY=SUCCESS ORCPT=rfc822;a+40remote.example\r\n"
        b"RCPT TO:<A@Remote.Example>\r\nRCPT TO:<team@example.org>\r\nDATA\r\n"
        b"From: user@example.org\r\n\r\nx\r\n.\r\n",
    )
    assert replies[-1].startswith("250 2.0.0"), replies
    items = await env.store.queue_list()
    assert len(items) == 1
    item = items[0]
    assert item.sender == USER and item.ret == "HDRS" and item.envid == "e+1" and item.smtputf8
    rcpts = {r.address.lower(): r for r in item.recipients}
    assert set(rcpts) == {"a@remote.example", "friend@remote.example"}
    assert rcpts["a@remote.example"].notify == "SUCCESS"
    assert rcpts["a@remote.example"].orcpt == "rfc822;a@remote.example"
    assert queue.woken == 1
    assert len(await env.messages(USER)) == 1 and len(await env.messages(OTHER)) == 1


@pytest.mark.asyncio
async def test_notify_success_gives_a_delivered_dsn(env: Env) -> None:
    # Local sender: the report lands in the sender's INBOX.
    replies = await talk(
        env, "submission",
        b"EHLO c\r\n" + AUTH + b"MAIL FROM:<user@example.org> ENVID=env-1\r\n"
        b"RCPT TO:<other@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;other+40example.org\r\n"
        b"DATA\r\nFrom: user@example.org\r\nSubject: please confirm\r\n\r\nx\r\n.\r\n",
    )
    assert replies[-1].startswith("250 2.0.0"), replies
    dsn = (await env.messages(USER))[0]
    assert dsn.startswith(b"Return-Path: <>\r\n")
    assert b"report-type=delivery-status" in dsn
    assert b"Action: delivered" in dsn and b"Status: 2.0.0" in dsn
    assert b"Original-Envelope-Id: env-1" in dsn
    # Remote sender over MX: the report is queued from the null sender; no NOTIFY, no report.
    replies = await talk(
        env, "mx",
        b"EHLO relay.example\r\nMAIL FROM:<x@sender.example>\r\nRCPT TO:<user@example.org> NOTIFY=SUCCESS\r\n"
        b"RCPT TO:<other@example.org>\r\nDATA\r\nSubject: in\r\n\r\nhi\r\n.\r\n",
    )
    assert replies[-1].startswith("250 2.0.0")
    items = await env.store.queue_list()
    assert len(items) == 1 and items[0].sender == ""
    assert [r.address for r in items[0].recipients] == ["x@sender.example"]


@pytest.mark.asyncio
async def test_store_failure_is_451_and_the_session_goes_on(tmp_path: Path) -> None:
    env = await make_env(tmp_path)
    conv = Conversation.create(env.ctx, Peer("192.0.2.9", "starttls", False), "mx")
    out = await conv.feed_all(b"EHLO x.example\r\nMAIL FROM:<a@b.example>\r\n")
    assert out.endswith(b"250 2.1.0 Ok\r\n")
    await env.store.close()  # the store goes away under the session
    out = await conv.feed_all(b"RCPT TO:<user@example.org>\r\nNOOP\r\nRSET\r\n")
    assert out.split(b"\r\n")[:3] == [b"451 4.3.0 Error: local error in processing, try again later",
                                      b"250 2.0.0 Ok", b"250 2.0.0 Ok"]
