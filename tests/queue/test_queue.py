"""The outbound queue against aiosmtpd sinks found through a loopback DNS server."""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path

import pytest
import trustme
from queuehelpers import ALICE, QueueEnv, make_queue_config, open_env, wait_for

from postfach.queue.scheduler import QueueRunner
from postfach.store.base import QueueRecipient

MESSAGE = (
    b"From: Alice <alice@postfach.test>\r\nTo: Bob <bob@remote.test>\r\nSubject: queue test\r\n"
    b"Message-ID: <q1@postfach.test>\r\nDate: Fri, 27 Nov 2026 09:00:00 +0000\r\n\r\n"
    b"Hello Bob.\r\n.leading dot\r\n"
)


def setup_domain(env: QueueEnv, domain: str, *mx: tuple[int, str, str]) -> None:
    for pref, host, ip in mx:
        env.dns.add(domain, "MX", f"{pref} {host}.")
        if ip:
            env.dns.add(host, "A", ip)


async def queue(env: QueueEnv, rcpts: list[str] | list[QueueRecipient], sender: str = ALICE,
                data: bytes = MESSAGE, **kw: object) -> int:
    recipients = [r if isinstance(r, QueueRecipient) else QueueRecipient(r) for r in rcpts]
    item = await env.store.queue_add(sender, recipients, data, **kw)  # type: ignore[arg-type]
    return int(item.id)


async def queue_empty(env: QueueEnv) -> bool:
    return not await env.store.queue_list()


def parse_report(raw: bytes) -> tuple[Message, list[Message]]:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert isinstance(parts, list)
    return msg, [p for p in parts if isinstance(p, Message)]


def status_blocks(part: Message) -> list[Message]:
    assert part.get_content_type() == "message/delivery-status"
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return [b for b in blocks if isinstance(b, Message)]


@pytest.mark.asyncio
async def test_success_byte_exact_and_starttls(env: QueueEnv) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("mx.ok.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    setup_domain(env, "ok.test", (10, "mx.ok.test", "127.0.0.2"))
    sink = env.sink("127.0.0.2", tls_context=server_ctx)
    await queue(env, ["bob@ok.test", "carol@ok.test"])
    runner = QueueRunner(env.ctx)
    await runner.start()
    try:
        await wait_for(lambda: queue_empty(env))
    finally:
        await runner.stop()
    assert len(sink.received) == 1
    got = sink.received[0]
    assert got.mail_from == ALICE
    assert sorted(got.rcpts) == ["bob@ok.test", "carol@ok.test"]
    assert got.data == MESSAGE  # dot-stuffing undone by the sink: the exact bytes arrived
    assert got.tls  # opportunistic STARTTLS
    assert await env.inbox() == []  # no bounce


@pytest.mark.asyncio
async def test_temporary_failure_then_one_delivery(env: QueueEnv) -> None:
    setup_domain(env, "later.test", (10, "mx.later.test", "127.0.0.3"))
    sink = env.sink("127.0.0.3")
    calls: list[str] = []

    def data_reply() -> str:
        calls.append("data")
        return "451 4.3.0 try again later" if len(calls) == 1 else "250 2.0.0 ok"

    sink.handler.data_reply = data_reply
    qid = await queue(env, ["bob@later.test"])
    runner = QueueRunner(env.ctx)
    await runner.start()
    try:
        async def deferred() -> bool:
            item = await env.store.queue_get(qid)  # type: ignore[arg-type]
            return item is not None and item.attempts == 1

        await wait_for(deferred)
        item = await env.store.queue_get(qid)  # type: ignore[arg-type]
        assert item is not None
        assert item.recipients[0].last_error is not None
        assert "451 4.3.0" in item.recipients[0].last_error
        await wait_for(lambda: queue_empty(env))
    finally:
        await runner.stop()
    assert calls == ["data", "data"]
    assert len(sink.received) == 1
    assert await env.inbox() == []


@pytest.mark.asyncio
async def test_permanent_failure_bounces_to_local_sender(env: QueueEnv) -> None:
    setup_domain(env, "hard.test", (10, "mx.hard.test", "127.0.0.4"))
    sink = env.sink("127.0.0.4")
    sink.handler.rcpt_reply = lambda a: "550 5.1.1 no such user" if a.startswith("nobody") else "250 OK"
    await queue(env, [QueueRecipient("nobody@hard.test", orcpt="rfc822;nobody+2Bx@hard.test"),
                      QueueRecipient("bob@hard.test")], envid="ENV-42", ret="HDRS")
    runner = QueueRunner(env.ctx)
    await runner.start()
    try:
        await wait_for(lambda: queue_empty(env))
    finally:
        await runner.stop()
    assert [r.rcpts for r in sink.received] == [["bob@hard.test"]]
    inbox = await env.inbox()
    assert len(inbox) == 1
    assert inbox[0].startswith(b"Return-Path: <>\r\n")
    msg, parts = parse_report(inbox[0])
    assert msg["To"] == f"<{ALICE}>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert parts[0].get_content_type() == "text/plain"
    assert "nobody@hard.test" in str(parts[0].get_payload())
    per_msg, *per_rcpt = status_blocks(parts[1])
    assert per_msg["Reporting-MTA"] == "dns; mail.postfach.test"
    assert per_msg["Original-Envelope-Id"] == "ENV-42"
    assert len(per_rcpt) == 1  # only the failed recipient
    r = per_rcpt[0]
    assert r["Final-Recipient"] == "rfc822; nobody@hard.test"
    assert r["Original-Recipient"] == "rfc822; nobody+x@hard.test"
    assert r["Action"] == "failed"
    assert r["Status"] == "5.1.1"
    assert r["Remote-MTA"] == "dns; mx.hard.test"
    assert r["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    assert parts[2].get_content_type() == "text/rfc822-headers"
    returned = parts[2].get_payload()
    assert "Subject: queue test" in str(returned)
    assert "Hello Bob" not in str(returned)


@pytest.mark.asyncio
async def test_null_mx_bounces_with_full_message(env: QueueEnv) -> None:
    env.dns.add("nullmx.queue.test", "MX", "0 .")
    await queue(env, ["x@nullmx.queue.test"], ret="FULL")
    runner = QueueRunner(env.ctx)
    await runner.start()
    try:
        await wait_for(lambda: queue_empty(env))
    finally:
        await runner.stop()
    (bounce,) = await env.inbox()
    _, parts = parse_report(bounce)
    (_, rcpt) = status_blocks(parts[1])
    assert rcpt["Status"] == "5.1.10"
    assert parts[2].get_content_type() == "message/rfc822"
    payload = parts[2].get_payload()
    assert isinstance(payload, list)
    inner = payload[0]
    assert isinstance(inner, Message)
    assert inner["Subject"] == "queue test"
    assert "Hello Bob." in str(inner.get_payload())


@pytest.mark.asyncio
async def test_null_sender_and_notify_never_get_no_bounce(env: QueueEnv) -> None:
    setup_domain(env, "never.test", (10, "mx.never.test", "127.0.0.5"))
    sink = env.sink("127.0.0.5")
    sink.handler.rcpt_reply = lambda a: "550 5.1.1 no such user"
    await queue(env, ["a@never.test"], sender="")
    await queue(env, [QueueRecipient("b@never.test", notify="NEVER")])
    runner = QueueRunner(env.ctx)
    await runner.start()
    try:
        await wait_for(lambda: queue_empty(env))
    finally:
        await runner.stop()
    assert runner.bounced == 2
    assert await env.inbox() == []
    assert await env.store.queue_list() == []  # and no bounce queued for anyone


@pytest.mark.asyncio
async def test_mx_preference_first_down(env: QueueEnv) -> None:
    # 127.0.0.6 has nothing listening: connection refused, then the next MX by preference
    setup_domain(env, "pref.test", (20, "b.pref.test", "127.0.0.7"), (10, "a.pref.test", "127.0.0.6"))
    sink = env.sink("127.0.0.7")
    await queue(env, ["bob@pref.test"])
    runner = QueueRunner(env.ctx)
    await runner.start()
    try:
        await wait_for(lambda: queue_empty(env))
    finally:
        await runner.stop()
    assert [r.local_ip for r in sink.received] == ["127.0.0.7"]


@pytest.mark.asyncio
async def test_implicit_mx_and_connection_reuse(env: QueueEnv) -> None:
    env.dns.add("reuse.test", "A", "127.0.0.8")  # no MX: the domain's address (RFC 5321 §5.1)
    sink = env.sink("127.0.0.8")
    await queue(env, ["one@reuse.test"])
    await queue(env, ["two@reuse.test"], data=MESSAGE.replace(b"q1@", b"q2@"))
    runner = QueueRunner(env.ctx)
    await runner.start()
    try:
        await wait_for(lambda: queue_empty(env))
    finally:
        await runner.stop()
    assert len(sink.received) == 2
    assert sink.received[0].peer == sink.received[1].peer  # one SMTP session carried both


@pytest.mark.asyncio
async def test_restart_resumes_queue(tmp_path: Path, env: QueueEnv) -> None:
    setup_domain(env, "restart.test", (10, "mx.restart.test", "127.0.0.9"))
    qid = await queue(env, ["bob@restart.test"])
    runner = QueueRunner(env.ctx)
    await runner.start()

    async def attempted() -> bool:
        item = await env.store.queue_get(qid)  # type: ignore[arg-type]
        return item is not None and item.attempts >= 1

    await wait_for(attempted)  # connection refused: deferred
    await runner.stop()
    await env.store.close()
    # a new process: new store object on the same files, a new runner
    env2 = await open_env(tmp_path, env.dns, env.config)
    env.store = env2.store  # the fixture closes this one
    sink = env.sink("127.0.0.9")
    item = await env2.store.queue_get(qid)  # type: ignore[arg-type]
    assert item is not None and item.recipients[0].last_error
    runner2 = QueueRunner(env2.ctx)
    await runner2.start()
    try:
        await wait_for(lambda: queue_empty(env2))
    finally:
        await runner2.stop()
    assert len(sink.received) == 1


@pytest.mark.asyncio
async def test_expiry_bounces(tmp_path: Path, env: QueueEnv) -> None:
    config = make_queue_config(tmp_path, env.dns, env.config.smtp.relay_port, max_age_seconds=0)
    env.ctx.config = config
    setup_domain(env, "expire.test", (10, "mx.expire.test", "127.0.0.10"))
    sink = env.sink("127.0.0.10")
    sink.handler.rcpt_reply = lambda a: "450 4.2.1 mailbox busy"
    await queue(env, ["bob@expire.test"])
    runner = QueueRunner(env.ctx)
    await runner.start()
    try:
        await wait_for(lambda: queue_empty(env))
    finally:
        await runner.stop()
    (bounce,) = await env.inbox()
    _, parts = parse_report(bounce)
    (_, rcpt) = status_blocks(parts[1])
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "4.4.7"
    assert "450 4.2.1" in rcpt["Diagnostic-Code"]


@pytest.mark.asyncio
async def test_delay_warning_once_honouring_notify(tmp_path: Path, env: QueueEnv) -> None:
    config = make_queue_config(tmp_path, env.dns, env.config.smtp.relay_port, delay_warning_seconds=3600,
                               max_age_seconds=5 * 86400)
    env.ctx.config = config
    setup_domain(env, "slow.test", (10, "mx.slow.test", "127.0.0.11"))
    sink = env.sink("127.0.0.11")
    sink.handler.rcpt_reply = lambda a: "451 4.4.0 slow down"
    qid = await queue(env, [QueueRecipient("a@slow.test", notify="DELAY,FAILURE"),
                            QueueRecipient("b@slow.test", notify="FAILURE")])
    later = lambda: datetime.now(UTC) + timedelta(hours=2)  # noqa: E731
    runner = QueueRunner(env.ctx, clock=later)
    await runner.start()
    try:
        async def tried_twice() -> bool:
            item = await env.store.queue_get(qid)  # type: ignore[arg-type]
            return item is not None and item.attempts >= 2

        await wait_for(tried_twice)
    finally:
        await runner.stop()
    inbox = await env.inbox()
    assert len(inbox) == 1  # one warning, not one per attempt
    msg, parts = parse_report(inbox[0])
    assert "Delayed" in msg["Subject"]
    blocks = status_blocks(parts[1])[1:]
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; a@slow.test"]
    assert blocks[0]["Action"] == "delayed"
    assert blocks[0]["Status"].startswith("4.")
    assert blocks[0]["Will-Retry-Until"]
    item = await env.store.queue_get(qid)  # type: ignore[arg-type]
    assert item is not None and item.delay_warned


@pytest.mark.asyncio
async def test_bounce_to_remote_sender_is_queued_with_null_sender(env: QueueEnv) -> None:
    setup_domain(env, "fails.test", (10, "mx.fails.test", "127.0.0.12"))
    setup_domain(env, "sender.test", (10, "mx.sender.test", "127.0.0.13"))
    bad = env.sink("127.0.0.12")
    bad.handler.data_reply = lambda: "554 5.7.1 rejected as spam"
    home = env.sink("127.0.0.13")
    await queue(env, ["x@fails.test"], sender="bob@sender.test")
    runner = QueueRunner(env.ctx)
    await runner.start()
    try:
        async def bounced() -> bool:
            return len(home.received) == 1 and await queue_empty(env)

        await wait_for(bounced)
    finally:
        await runner.stop()
    got = home.received[0]
    assert got.mail_from in ("", "<>")  # aiosmtpd spells the null reverse-path "<>"
    assert got.rcpts == ["bob@sender.test"]
    _msg, parts = parse_report(got.data)
    (_, rcpt) = status_blocks(parts[1])
    assert rcpt["Status"] == "5.7.1"


@pytest.mark.asyncio
async def test_requiretls_without_support_fails(env: QueueEnv) -> None:
    setup_domain(env, "plain.test", (10, "mx.plain.test", "127.0.0.14"))
    sink = env.sink("127.0.0.14")  # no STARTTLS, no REQUIRETLS
    await queue(env, ["bob@plain.test"], requiretls=True)
    runner = QueueRunner(env.ctx)
    env.dns.set_authenticated(True)  # the MX answer is DNSSEC-validated: only TLS is missing
    await runner.start()
    try:
        await wait_for(lambda: queue_empty(env))
    finally:
        await runner.stop()
        env.dns.set_authenticated(False)
    assert sink.received == []  # never sent in the clear
    (bounce,) = await env.inbox()
    _, parts = parse_report(bounce)
    (_, rcpt) = status_blocks(parts[1])
    assert rcpt["Status"] == "5.7.10"  # RFC 8689 §4.2.1: unable to establish TLS
    assert "REQUIRETLS" in rcpt["Diagnostic-Code"]


@pytest.mark.asyncio
async def test_requiretls_verified_tls_without_requiretls_support(env: QueueEnv) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.tlsonly.test").configure_cert(server_ctx)
    setup_domain(env, "tlsonly.test", (10, "mx.tlsonly.test", "127.0.0.25"))
    sink = env.sink("127.0.0.25", tls_context=server_ctx)  # STARTTLS yes, REQUIRETLS no

    def trusting() -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        return ctx

    await queue(env, ["bob@tlsonly.test"], requiretls=True)
    runner = QueueRunner(env.ctx, tls_verify_context=trusting)
    env.dns.set_authenticated(True)
    await runner.start()
    try:
        await wait_for(lambda: queue_empty(env))
    finally:
        await runner.stop()
        env.dns.set_authenticated(False)
    assert sink.received == []
    (bounce,) = await env.inbox()
    assert b"Status: 5.7.30" in bounce  # TLS was fine and verified; REQUIRETLS was not offered


@pytest.mark.asyncio
async def test_requiretls_needs_dnssec_validated_mx(env: QueueEnv) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.unsigned.test").configure_cert(server_ctx)
    setup_domain(env, "unsigned.test", (10, "mx.unsigned.test", "127.0.0.24"))
    sink = env.sink("127.0.0.24", tls_context=server_ctx)
    await queue(env, ["bob@unsigned.test"], requiretls=True)
    runner = QueueRunner(env.ctx)  # AD flag absent: RFC 8689 §4.2.1 forbids using this MX
    await runner.start()
    try:
        await wait_for(lambda: queue_empty(env))
    finally:
        await runner.stop()
    assert sink.received == []
    (bounce,) = await env.inbox()
    assert b"Status: 5.7.30" in bounce and b"DNSSEC" in bounce


@pytest.mark.asyncio
async def test_unknown_domain_bounces(env: QueueEnv) -> None:
    await queue(env, ["bob@does-not-exist.test"])
    runner = QueueRunner(env.ctx)
    await runner.start()
    try:
        await wait_for(lambda: queue_empty(env))
    finally:
        await runner.stop()
    (bounce,) = await env.inbox()
    _, parts = parse_report(bounce)
    (_, rcpt) = status_blocks(parts[1])
    assert rcpt["Status"] == "5.1.2"


@pytest.mark.asyncio
async def test_dns_failure_defers_never_bounces(env: QueueEnv) -> None:
    env.dns.fail("broken.test")
    qid = await queue(env, ["bob@broken.test"])
    runner = QueueRunner(env.ctx)
    await runner.start()
    try:
        async def attempted() -> bool:
            item = await env.store.queue_get(qid)  # type: ignore[arg-type]
            return item is not None and item.attempts >= 1

        await wait_for(attempted)
        item = await env.store.queue_get(qid)  # type: ignore[arg-type]
        assert item is not None
        assert item.recipients[0].state.value == "pending"
        assert item.last_error is not None and "DNS" in item.last_error
        assert await env.inbox() == []
        # the DNS server recovers: the next attempt delivers
        env.dns.fail("broken.test", False)
        setup_domain(env, "broken.test", (10, "mx.broken.test", "127.0.0.15"))
        sink = env.sink("127.0.0.15")
        await wait_for(lambda: queue_empty(env))
    finally:
        await runner.stop()
    assert len(sink.received) == 1


@pytest.mark.asyncio
async def test_notify_success_to_server_without_dsn_gets_relayed_report(env: QueueEnv) -> None:
    setup_domain(env, "nodsn.test", (10, "mx.nodsn.test", "127.0.0.16"))
    sink = env.sink("127.0.0.16")  # aiosmtpd does not offer DSN
    await queue(env, [QueueRecipient("bob@nodsn.test", notify="SUCCESS,FAILURE")])
    runner = QueueRunner(env.ctx)
    await runner.start()
    try:
        await wait_for(lambda: queue_empty(env))
    finally:
        await runner.stop()
    assert len(sink.received) == 1
    (report,) = await env.inbox()
    _, parts = parse_report(report)
    (_, rcpt) = status_blocks(parts[1])
    assert rcpt["Action"] == "relayed"  # RFC 3461 §5.2.2: the DSN chain ends here
    assert rcpt["Status"].startswith("2.")


@pytest.mark.asyncio
async def test_session_cached_for_the_next_message(env: QueueEnv) -> None:
    setup_domain(env, "cache.test", (10, "mx.cache.test", "127.0.0.17"))
    sink = env.sink("127.0.0.17")
    runner = QueueRunner(env.ctx)
    await runner.start()
    try:
        await queue(env, ["one@cache.test"])
        runner.wake()
        await wait_for(lambda: queue_empty(env))
        await queue(env, ["two@cache.test"], data=MESSAGE.replace(b"q1@", b"q3@"))
        runner.wake()
        await wait_for(lambda: queue_empty(env))
    finally:
        await runner.stop()
    assert len(sink.received) == 2
    assert sink.received[0].peer == sink.received[1].peer  # the idle session was reused


@pytest.mark.asyncio
async def test_failed_tls_handshake_falls_back_to_plaintext(env: QueueEnv) -> None:
    # a server whose TLS demands a client certificate we do not have: the handshake fails, and
    # opportunistic TLS (RFC 7435) delivers in plaintext on a second connection
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.picky.test").configure_cert(server_ctx)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(server_ctx)
    setup_domain(env, "picky.test", (10, "mx.picky.test", "127.0.0.18"))
    sink = env.sink("127.0.0.18", tls_context=server_ctx)
    await queue(env, ["bob@picky.test"])
    runner = QueueRunner(env.ctx)
    await runner.start()
    try:
        await wait_for(lambda: queue_empty(env))
    finally:
        await runner.stop()
    assert len(sink.received) == 1
    assert not sink.received[0].tls


@pytest.mark.asyncio
async def test_recipient_limit_and_452_split_into_transactions(env: QueueEnv) -> None:
    setup_domain(env, "many.test", (10, "mx.many.test", "127.0.0.19"))
    sink = env.sink("127.0.0.19")
    per_txn: list[int] = [0]

    def rcpt_reply(addr: str) -> str:
        # a server that takes 30 recipients per transaction, then says 452 4.5.3
        per_txn[0] += 1
        return "452 4.5.3 too many recipients" if per_txn[0] > 30 else "250 OK"

    def data_reply() -> str:
        per_txn[0] = 0
        return "250 2.0.0 ok"

    sink.handler.rcpt_reply = rcpt_reply
    sink.handler.data_reply = data_reply
    rcpts = [f"r{i}@many.test" for i in range(75)]
    await queue(env, rcpts)
    runner = QueueRunner(env.ctx)
    await runner.start()
    try:
        await wait_for(lambda: queue_empty(env))
    finally:
        await runner.stop()
    # 75 recipients in transactions of at most 30 (our own limit is 50), all in one session
    sizes = [len(r.rcpts) for r in sink.received]
    assert sum(sizes) == 75 and max(sizes) <= 30
    assert sorted(a for r in sink.received for a in r.rcpts) == sorted(rcpts)
    assert len({r.peer for r in sink.received}) == 1
    assert await env.inbox() == []


@pytest.mark.asyncio
async def test_mx_pointing_to_ourselves_bounces(env: QueueEnv) -> None:
    env.dns.add("loop.test", "MX", f"10 {env.config.hostname}.")
    await queue(env, ["bob@loop.test"])
    runner = QueueRunner(env.ctx)
    await runner.start()
    try:
        await wait_for(lambda: queue_empty(env))
    finally:
        await runner.stop()
    (bounce,) = await env.inbox()
    _, parts = parse_report(bounce)
    (_, rcpt) = status_blocks(parts[1])
    assert rcpt["Status"] == "5.4.6"


@pytest.mark.asyncio
async def test_smtputf8_delivery_and_refusal(env: QueueEnv) -> None:
    setup_domain(env, "utf8.test", (10, "mx.utf8.test", "127.0.0.20"))
    setup_domain(env, "ascii.test", (10, "mx.ascii.test", "127.0.0.22"))
    good = env.sink("127.0.0.20", smtputf8=True)
    old = env.sink("127.0.0.22")  # no SMTPUTF8
    data = "From: <alice@postfach.test>\r\nTo: <jörg@utf8.test>\r\nSubject: grüße\r\n\r\nhallo\r\n".encode()
    await queue(env, ["jörg@utf8.test"], data=data, smtputf8=True)
    await queue(env, ["zoë@ascii.test"], data=data, smtputf8=True)
    runner = QueueRunner(env.ctx)
    await runner.start()
    try:
        await wait_for(lambda: queue_empty(env))
    finally:
        await runner.stop()
    assert [r.rcpts for r in good.received] == [["jörg@utf8.test"]]
    assert "SMTPUTF8" in good.received[0].mail_options
    assert good.received[0].data == data
    assert old.received == []
    (bounce,) = await env.inbox()
    assert b"Content-Type: message/global-delivery-status" in bounce
    assert b"Status: 5.6.7" in bounce


@pytest.mark.asyncio
async def test_cached_session_closed_by_server_is_replaced(env: QueueEnv) -> None:
    setup_domain(env, "idle.test", (10, "mx.idle.test", "127.0.0.23"))
    sink = env.sink("127.0.0.23", idle_timeout=0.2)  # drops idle sessions fast
    runner = QueueRunner(env.ctx)
    await runner.start()
    try:
        await queue(env, ["one@idle.test"])
        runner.wake()
        await wait_for(lambda: queue_empty(env))
        await asyncio.sleep(0.8)  # let the server time the cached session out
        await queue(env, ["two@idle.test"], data=MESSAGE.replace(b"q1@", b"q4@"))
        runner.wake()
        await wait_for(lambda: queue_empty(env))
    finally:
        await runner.stop()
    assert len(sink.received) == 2
    assert sink.received[0].peer != sink.received[1].peer  # a fresh session, not an error
    assert runner.deferred == 0
