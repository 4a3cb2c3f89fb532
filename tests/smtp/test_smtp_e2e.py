"""SMTP over real loopback sockets and real TLS (trustme): smtplib, aiosmtplib, raw sockets, swaks."""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import ssl
import subprocess
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest
import pytest_asyncio
from tests.smtp.smtp_helpers import OTHER, PASSWORD, USER, Env, make_env, message, serve


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = await make_env(tmp_path)
    try:
        yield e
    finally:
        await e.store.close()


def _email(sender: str = USER, to: str = OTHER, subject: str = "hello") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content("Hi there.\n.dot line\n")
    return msg


async def _lines(reader: asyncio.StreamReader) -> list[str]:
    """One complete (possibly multi-line) reply."""
    out = []
    while True:
        line = (await asyncio.wait_for(reader.readline(), 10)).decode()
        assert line, "connection closed"
        out.append(line.rstrip("\r\n"))
        if len(line) < 4 or line[3] != "-":
            return out


@pytest.mark.asyncio
async def test_smtplib_starttls_auth_submit_local(env: Env) -> None:
    async with serve(env, "submission", "starttls") as port:

        def client() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.ehlo("client.example")
                assert s.has_extn("starttls")
                s.starttls(context=env.client_tls)
                s.ehlo("client.example")
                assert s.has_extn("auth") and s.has_extn("chunking") and s.has_extn("pipelining")
                s.login(USER, PASSWORD)
                s.send_message(_email())

        await asyncio.to_thread(client)
    msgs = await env.messages(OTHER)
    assert len(msgs) == 1
    assert b"with ESMTPSA" in msgs[0] and b"\r\n.dot line\r\n" in msgs[0]
    assert msgs[0].startswith(b"Return-Path: <user@example.org>\r\nDelivered-To: other@example.org\r\n")


@pytest.mark.asyncio
async def test_aiosmtplib_implicit_tls_submit_and_remote_queue(env: Env) -> None:
    async with serve(env, "submission", "implicit") as port:
        errors, _ = await aiosmtplib.send(
            _email(to=f"{OTHER}, friend@remote.example"),
            hostname="127.0.0.1",
            port=port,
            use_tls=True,
            tls_context=env.client_tls,
            username=USER,
            password=PASSWORD,
            timeout=10,
        )
        assert errors == {}
    assert len(await env.messages(OTHER)) == 1
    items = await env.store.queue_list()
    assert [r.address for r in items[0].recipients] == ["friend@remote.example"]
    data = await env.store.read_blob(items[0].blob_id)
    assert b"Message-ID: <" in data or b"Message-Id: <" in data or b"Message-ID:" in data


@pytest.mark.asyncio
async def test_aiosmtplib_starttls_wrong_password_and_spoofed_from(env: Env) -> None:
    async with serve(env, "submission", "starttls", remote_ip="203.0.113.5") as port:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, tls_context=env.client_tls, timeout=10)
        await client.connect()  # aiosmtplib upgrades with STARTTLS on its own when offered
        assert client.is_ehlo_or_helo_needed or client.supports_extension("auth")
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as exc:
            await client.login(USER, "wrong-password")
        assert exc.value.code == 535
        await client.login(USER, PASSWORD)
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await client.sendmail(OTHER, [USER], message(1, sender=OTHER, to=USER))
        assert refused.value.code == 553 and "5.7.1" in refused.value.message
        with pytest.raises(aiosmtplib.SMTPDataError) as data_err:
            await client.sendmail(USER, [OTHER], message(2, sender="ceo@bank.example", to=OTHER))
        assert data_err.value.code == 553 and "5.7.1" in data_err.value.message
        await client.quit()
    assert await env.messages(OTHER) == []


@pytest.mark.asyncio
async def test_mx_relay_refused_and_local_accepted(env: Env) -> None:
    async with serve(env, "mx", "starttls", remote_ip="198.51.100.1") as port:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, tls_context=env.client_tls, timeout=10)
        await client.connect()
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as exc:
            await client.sendmail("a@remote.example", ["victim@elsewhere.example"], message(1))
        assert exc.value.recipients[0].code == 554
        assert "Relay access denied" in exc.value.recipients[0].message
        await client.sendmail("a@remote.example", ["sales@example.org"], message(2))
        await client.quit()
    assert len(await env.messages(USER)) == 1
    assert await env.store.queue_list() == []


@pytest.mark.asyncio
async def test_pipelining_replies_in_order_raw_socket(env: Env) -> None:
    async with serve(env, "mx", "starttls") as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await _lines(reader))[0].startswith("220 ")
        writer.write(b"EHLO p.example\r\n")
        await _lines(reader)
        # RFC 2920: the whole group in one write, every answer in order.
        writer.write(
            b"MAIL FROM:<a@remote.example>\r\nRCPT TO:<user@example.org>\r\nRCPT TO:<nobody@example.org>\r\n"
            b"RCPT TO:<other@example.org>\r\nDATA\r\n"
        )
        replies = [(await _lines(reader))[0][:3] for _ in range(5)]
        assert replies == ["250", "250", "550", "250", "354"]
        writer.write(
            b"Subject: pipelined\r\n\r\nbody\r\n.\r\n"
            b"MAIL FROM:<b@remote.example>\r\nRCPT TO:<user@example.org>\r\n"
            b"BDAT 12 LAST\r\nSubject: b\r\n"
        )
        replies = [(await _lines(reader))[0][:3] for _ in range(4)]
        assert replies == ["250", "250", "250", "250"]
        writer.write(b"QUIT\r\n")
        assert (await _lines(reader))[0].startswith("221 2.0.0")
        writer.close()
    assert len(await env.messages(USER)) == 2
    assert len(await env.messages(OTHER)) == 1


@pytest.mark.asyncio
async def test_starttls_discards_pipelined_plaintext(env: Env) -> None:
    async with serve(env, "mx", "starttls") as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _lines(reader)
        writer.write(b"EHLO p.example\r\n")
        await _lines(reader)
        writer.write(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n")
        assert (await _lines(reader))[0].startswith("220 2.0.0")
        await writer.start_tls(env.client_tls, server_hostname="localhost")
        writer.write(b"RCPT TO:<user@example.org>\r\n")
        assert (await _lines(reader))[0].startswith("503 5.5.1")  # the injected MAIL never happened
        writer.write(b"EHLO p.example\r\n")
        ehlo = await _lines(reader)
        assert "250-STARTTLS" not in ehlo and "250 REQUIRETLS" in ehlo
        writer.write(b"QUIT\r\n")
        await _lines(reader)
        writer.close()


@pytest.mark.asyncio
async def test_oversized_message_discarded_and_session_continues(tmp_path: Path) -> None:
    env = await make_env(tmp_path, {"limits.max_message_bytes": 10_000})
    try:
        async with serve(env, "mx", "starttls") as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await _lines(reader)
            writer.write(b"EHLO p.example\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<user@example.org>\r\nDATA\r\n")
            for _ in range(4):
                await _lines(reader)
            writer.write(b"Subject: big\r\n\r\n" + b"x" * 78 + b"\r\n" * 1 + (b"y" * 998 + b"\r\n") * 300 + b".\r\n")
            assert (await _lines(reader))[0].startswith("552 5.3.4")
            writer.write(b"NOOP\r\n")
            assert (await _lines(reader))[0].startswith("250 2.0.0")
            writer.close()
        assert await env.messages(USER) == []
    finally:
        await env.store.close()


@pytest.mark.asyncio
async def test_idle_timeout_gives_421(tmp_path: Path) -> None:
    env = await make_env(tmp_path, {"limits.smtp_idle_timeout_seconds": 1})
    try:
        async with serve(env, "mx", "starttls") as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await _lines(reader)
            assert (await _lines(reader))[0].startswith("421 4.4.2")
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
    finally:
        await env.store.close()


@pytest.mark.asyncio
async def test_shutdown_says_421_to_idle_sessions(env: Env) -> None:
    async with serve(env, "mx", "starttls") as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _lines(reader)
        writer.write(b"EHLO p.example\r\n")
        await _lines(reader)
        env.ctx.shutdown.set()
        assert (await _lines(reader))[0].startswith("421 4.3.2")
        writer.close()


@pytest.mark.asyncio
async def test_shutdown_waits_for_open_transaction(env: Env) -> None:
    async with serve(env, "mx", "starttls") as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _lines(reader)
        writer.write(b"EHLO p.example\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<user@example.org>\r\n")
        for _ in range(3):
            await _lines(reader)
        env.ctx.shutdown.set()
        writer.write(b"DATA\r\n")
        assert (await _lines(reader))[0].startswith("354")
        writer.write(b"Subject: last one\r\n\r\n.\r\n")
        assert (await _lines(reader))[0].startswith("250 2.0.0")
        assert (await _lines(reader))[0].startswith("421 4.3.2")
        writer.close()
    assert len(await env.messages(USER)) == 1


def _swaks(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["swaks", *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
@pytest.mark.asyncio
async def test_swaks_starttls_auth_and_pipelining(env: Env, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    env.ca.cert_pem.write_to_path(str(ca))
    async with serve(env, "submission", "starttls", remote_ip="203.0.113.7") as port:
        common = ["--server", "127.0.0.1", "--port", str(port), "--from", USER, "--to", OTHER,
                  "--helo", "swaks.example", "--tls", "--tls-verify", "--tls-ca-path", str(ca),
                  "--tls-sni", "localhost"]
        r = await asyncio.to_thread(
            _swaks, *common, "--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD,
            "--header", "Subject: swaks plain",
        )
        assert r.returncode == 0, r.stdout + r.stderr
        r = await asyncio.to_thread(
            _swaks, *common, "--auth", "LOGIN", "--auth-user", USER, "--auth-password", PASSWORD,
            "--pipeline", "--header", "Subject: swaks pipelined",
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "<** " not in r.stdout
        r = await asyncio.to_thread(
            _swaks, *common, "--auth", "PLAIN", "--auth-user", USER, "--auth-password", "wrong-one",
        )
        assert r.returncode != 0 and "535 5.7.8" in r.stdout
    msgs = await env.messages(OTHER)
    assert len(msgs) == 2
    assert b"Subject: swaks pipelined" in msgs[1]


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
@pytest.mark.asyncio
async def test_swaks_mx_relay_refused(env: Env) -> None:
    async with serve(env, "mx", "starttls", remote_ip="198.51.100.9") as port:
        r = await asyncio.to_thread(
            _swaks, "--server", "127.0.0.1", "--port", str(port), "--from", "x@remote.example",
            "--to", "victim@elsewhere.example", "--pipeline",
        )
        assert r.returncode != 0 and "554 5.7.1" in r.stdout


@pytest.mark.asyncio
async def test_smtplib_bdat_is_not_used_but_binary_bdat_raw(env: Env) -> None:
    """BDAT with BINARYMIME over TLS through a raw socket (no stdlib client speaks CHUNKING)."""
    ctx = env.client_tls
    async with serve(env, "mx", "starttls") as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _lines(reader)
        writer.write(b"EHLO p.example\r\nSTARTTLS\r\n")
        await _lines(reader)
        await _lines(reader)
        await writer.start_tls(ctx, server_hostname="localhost")
        body = b"Subject: bin\r\nContent-Transfer-Encoding: binary\r\n\r\n\x00\x01\xff\n\r"
        writer.write(b"EHLO p.example\r\nMAIL FROM:<a@remote.example> BODY=BINARYMIME\r\nRCPT TO:<user@example.org>\r\n"
                     + b"BDAT %d LAST\r\n" % len(body) + body)
        replies = [(await _lines(reader))[-1][:3] for _ in range(4)]
        assert replies == ["250", "250", "250", "250"]
        writer.close()
    msgs = await env.messages(USER)
    assert msgs[0].endswith(body)
    assert b"with ESMTPS" in msgs[0]



@pytest.mark.asyncio
async def test_starttls_without_certificate_is_454(env: Env) -> None:
    def broken() -> ssl.SSLContext:
        raise FileNotFoundError("tls/cert.pem")

    env.ctx.tls_context = broken
    async with serve(env, "mx", "starttls") as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _lines(reader)
        writer.write(b"EHLO p.example\r\nSTARTTLS\r\nNOOP\r\n")
        await _lines(reader)
        assert (await _lines(reader))[0].startswith("454 4.7.0")
        assert (await _lines(reader))[0].startswith("250 2.0.0")
        writer.close()


@pytest.mark.asyncio
async def test_auth_secrets_never_logged(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    import base64
    import logging

    caplog.set_level(logging.DEBUG)
    plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    login_pw = base64.b64encode(PASSWORD.encode()).decode()
    async with serve(env, "submission", "starttls") as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _lines(reader)
        writer.write(f"EHLO p.example\r\nAUTH PLAIN {plain}\r\n".encode())
        await _lines(reader)
        assert (await _lines(reader))[0].startswith("235")
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _lines(reader)
        writer.write(b"EHLO p.example\r\nAUTH LOGIN\r\n")
        await _lines(reader)
        await _lines(reader)
        writer.write(base64.b64encode(USER.encode()) + b"\r\n")
        await _lines(reader)
        writer.write(login_pw.encode() + b"\r\n")
        assert (await _lines(reader))[0].startswith("235")
        writer.close()
    text = caplog.text
    assert plain not in text and login_pw not in text and PASSWORD not in text
