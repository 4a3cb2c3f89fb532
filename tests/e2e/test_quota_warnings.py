"""Quota warnings: one message in INBOX per crossing of 80 % and 95 %, whatever protocol wrote."""

from __future__ import annotations

import imaplib
import smtplib
import time

from tests.conftest import PASSWORD, USER, LiveServer

from postfach.quota import crossed
from postfach.store.base import Store

QUOTA = 100_000


def _message(n: int, size: int) -> bytes:
    head = f"From: <{USER}>\r\nTo: <{USER}>\r\nSubject: filler {n}\r\n\r\n".encode()
    return head + b"x" * (size - len(head) - 2) + b"\r\n"


def _warnings(imap: imaplib.IMAP4_SSL) -> list[str]:
    imap.select("INBOX")
    typ, data = imap.search(None, "SUBJECT", "full")
    assert typ == "OK"
    subjects = []
    for num in data[0].split():
        typ, msg = imap.fetch(num, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK" and isinstance(msg[0], tuple)
        subjects.append(msg[0][1].decode().strip())
    return subjects


def _wait_for(imap: imaplib.IMAP4_SSL, count: int) -> list[str]:
    for _ in range(100):
        got = _warnings(imap)
        if len(got) >= count:
            return got
        time.sleep(0.1)
    return _warnings(imap)


def test_crossed_levels() -> None:
    assert crossed(70, 85, 100, (80, 95)) == [80]
    assert crossed(70, 96, 100, (80, 95)) == [80, 95]
    assert crossed(80, 90, 100, (80, 95)) == []  # already at 80 %: no new crossing
    assert crossed(79, 80, 100, (80, 95)) == [80]
    assert crossed(90, 80, 100, (80, 95)) == []
    assert crossed(0, 10**9, None, (80, 95)) == []


def test_one_warning_per_crossing(live_server: LiveServer) -> None:
    async def set_quota(store: Store) -> None:
        acct = await store.get_account(USER)
        assert acct is not None
        await store.set_quota(acct.id, QUOTA, None)

    live_server.call(set_quota)
    port = live_server.port("imap", "implicit")
    imap = imaplib.IMAP4_SSL("localhost", port, ssl_context=live_server.client_context())
    imap.login(USER, PASSWORD)
    try:
        # 70 % through IMAP APPEND: no warning yet
        for n in range(7):
            assert imap.append("INBOX", None, None, _message(n, 10_000))[0] == "OK"
        assert _warnings(imap) == []
        # crossing 80 % by SMTP submission
        with smtplib.SMTP_SSL("localhost", live_server.port("submission", "implicit"),
                              context=live_server.client_context()) as smtp:
            smtp.login(USER, PASSWORD)
            smtp.sendmail(USER, [USER], _message(7, 12_000))
        assert _wait_for(imap, 1) == ["Subject: Your mailbox is 80% full"]
        # still between 80 % and 95 %: nothing new
        assert imap.append("INBOX", None, None, _message(8, 2_000))[0] == "OK"
        time.sleep(0.5)
        assert len(_warnings(imap)) == 1
        # crossing 95 %
        assert imap.append("INBOX", None, None, _message(9, 12_000))[0] == "OK"
        assert sorted(_wait_for(imap, 2)) == ["Subject: Your mailbox is 80% full", "Subject: Your mailbox is 95% full"]
        # over quota: refused, and no further warning
        typ, data = imap.append("INBOX", None, None, _message(10, 20_000))
        assert typ == "NO" and b"OVERQUOTA" in data[0]
        # expunging always works; dropping below 80 % and crossing again warns again
        imap.select("INBOX")
        typ, data = imap.search(None, "SUBJECT", "filler")
        for num in data[0].split()[:4]:
            imap.store(num, "+FLAGS", "\\Deleted")
        assert imap.expunge()[0] == "OK"
        assert imap.append("INBOX", None, None, _message(11, 30_000))[0] == "OK"
        assert len(_wait_for(imap, 3)) == 3
    finally:
        imap.logout()
