"""poplib against the whole server (postfach.server.Server via tests/conftest.py's live_server):
POP3 listeners from config, STLS on the starttls port and implicit TLS on the other."""

from __future__ import annotations

import poplib

import pytest

pytestmark = pytest.mark.timeout(120)

# The account tests/conftest.py's live_server creates.
USER = "user@example.org"
PASSWORD = "secret-pass-1"


def test_poplib_live_server_stls_and_tls(live_server) -> None:  # type: ignore[no-untyped-def]
    async def deliver(store):  # type: ignore[no-untyped-def]
        account = await store.get_account(USER)
        inbox = await store.get_mailbox(account.id, "INBOX")
        for i in range(3):
            await store.append(account.id, inbox.id, b"Subject: live %d\r\n\r\n.body\r\n" % i)

    live_server.call(deliver)
    ctx = live_server.client_context()

    c = poplib.POP3("localhost", live_server.port("pop3", "starttls"), timeout=30)
    try:
        c.stls(ctx)
        c.user(USER)
        c.pass_(PASSWORD)
        assert c.stat()[0] == 3
        _, uidl_stls, _ = c.uidl()
        _, lines, _ = c.retr(1)
        assert lines == [b"Subject: live 0", b"", b".body"]
        c.dele(3)
        assert c.quit().startswith(b"+OK")
    finally:
        c.close()

    s = poplib.POP3_SSL("localhost", live_server.port("pop3", "implicit"), context=ctx, timeout=30)
    try:
        s.user(USER)
        s.pass_(PASSWORD)
        assert s.stat()[0] == 2
        _, uidl_tls, _ = s.uidl()
        assert uidl_tls == uidl_stls[:2]
        s.quit()
    finally:
        s.close()


def test_imap_idle_sees_pop3_expunge_and_imap_delete_stays_gone(live_server) -> None:  # type: ignore[no-untyped-def]
    """Issue 4 concurrency: an IMAP session in IDLE on INBOX sees the EXPUNGE when a POP3 session
    deletes a message and QUITs; a message deleted through IMAP never reappears in POP3."""
    from imapclient import IMAPClient  # type: ignore[import-untyped]

    async def deliver(store):  # type: ignore[no-untyped-def]
        account = await store.get_account(USER)
        inbox = await store.get_mailbox(account.id, "INBOX")
        for i in range(3):
            await store.append(account.id, inbox.id, b"Subject: idle %d\r\n\r\nbody\r\n" % i)

    live_server.call(deliver)
    ctx = live_server.client_context()

    pop = poplib.POP3_SSL("localhost", live_server.port("pop3", "implicit"), context=ctx, timeout=30)
    pop.user(USER)
    pop.pass_(PASSWORD)
    _, uidls_before, _ = pop.uidl()
    pop.quit()

    watcher = IMAPClient("localhost", port=live_server.port("imap", "implicit"), ssl_context=ctx, timeout=30)
    try:
        watcher.login(USER, PASSWORD)
        watcher.select_folder("INBOX")
        watcher.idle()
        pop = poplib.POP3_SSL("localhost", live_server.port("pop3", "implicit"), context=ctx, timeout=30)
        pop.user(USER)
        pop.pass_(PASSWORD)
        pop.dele(2)
        assert pop.quit().startswith(b"+OK")
        responses = []
        for _ in range(10):  # wait (bounded) for the untagged EXPUNGE
            responses += watcher.idle_check(timeout=1.0)
            if (2, b"EXPUNGE") in responses:
                break
        watcher.idle_done()
        assert (2, b"EXPUNGE") in responses, responses
        # Now delete message 1 through IMAP.
        watcher.delete_messages([1])
        watcher.expunge()
    finally:
        watcher.logout()

    pop = poplib.POP3_SSL("localhost", live_server.port("pop3", "implicit"), context=ctx, timeout=30)
    try:
        pop.user(USER)
        pop.pass_(PASSWORD)
        _, uidls_after, _ = pop.uidl()
        pop.quit()
    finally:
        pop.close()
    before = [u.split()[1] for u in uidls_before]
    after = [u.split()[1] for u in uidls_after]
    assert after == [before[2]]  # 2 gone via POP3, 1 via IMAP; the third keeps its UIDL
