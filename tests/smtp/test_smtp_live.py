"""The whole server (``postfach.server.Server`` from tests/conftest.py): submit with smtplib over
implicit TLS and STARTTLS, read the message back over IMAP; an IDLE-ing IMAP session hears of
new mail delivered through MX at once."""

from __future__ import annotations

import imaplib
import smtplib
from email.message import EmailMessage

import pytest
from tests.conftest import OTHER, PASSWORD, USER, LiveServer


def _msg(subject: str) -> EmailMessage:
    m = EmailMessage()
    m["From"] = USER
    m["To"] = OTHER
    m["Subject"] = subject
    m.set_content("Hello over the live server.\n")
    return m


def _imap_fetch_all(live: LiveServer) -> list[bytes]:
    with imaplib.IMAP4_SSL("localhost", live.port("imap", "implicit"), ssl_context=live.client_context()) as im:
        im.login(OTHER, PASSWORD)
        im.select("INBOX")
        _typ, data = im.search(None, "ALL")
        out = []
        for num in data[0].split():
            _typ, parts = im.fetch(num, "(BODY.PEEK[])")
            item = parts[0]
            assert isinstance(item, tuple)
            out.append(item[1])
        return out


@pytest.mark.timeout(120)
def test_submit_implicit_tls_and_starttls_then_read_over_imap(live_server: LiveServer) -> None:
    pytest.importorskip("postfach.imap.connection")
    with smtplib.SMTP_SSL("localhost", live_server.port("submission", "implicit"),
                          context=live_server.client_context(), timeout=20) as s:
        s.login(USER, PASSWORD)
        s.send_message(_msg("via 465"))
    with smtplib.SMTP("localhost", live_server.port("submission", "starttls"), timeout=20) as s:
        s.starttls(context=live_server.client_context())
        s.login(USER, PASSWORD)
        s.send_message(_msg("via 587"))
    msgs = _imap_fetch_all(live_server)
    assert len(msgs) == 2
    assert b"Subject: via 465" in msgs[0] and b"Subject: via 587" in msgs[1]
    assert b"Delivered-To: other@example.org" in msgs[0]
    assert b"with ESMTPSA" in msgs[0]


@pytest.mark.timeout(120)
def test_mx_delivery_wakes_idle(live_server: LiveServer) -> None:
    pytest.importorskip("postfach.imap.connection")
    im = imaplib.IMAP4_SSL("localhost", live_server.port("imap", "implicit"), ssl_context=live_server.client_context())
    try:
        im.login(OTHER, PASSWORD)
        im.select("INBOX")
        tag = im._new_tag().decode()
        im.send(f"{tag} IDLE\r\n".encode())
        assert im.readline().startswith(b"+")
        with smtplib.SMTP("localhost", live_server.port("mx", "starttls"), timeout=20) as s:
            s.sendmail("someone@remote.example", [OTHER], b"Subject: wake up\r\n\r\nidle test\r\n")
        im.sock.settimeout(20)
        line = im.readline()
        assert line.startswith(b"* 1 EXISTS"), line
        im.send(b"DONE\r\n")
        while not im.readline().startswith(tag.encode()):
            pass
    finally:
        im.logout()
