"""NOTIFY (RFC 5465) over real TLS: with NOTIFY on, a quiet client (no command, no IDLE) is told
of other mailboxes' new mail with STATUS and of the selected mailbox's with EXISTS."""

from __future__ import annotations

import imaplib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from imap_helpers import message
from test_compress import Wire

from conftest import PASSWORD, USER, LiveServer


def test_notify_speaks_without_a_command(live_server: LiveServer) -> None:
    w = Wire(live_server)
    w.line()
    w.send(f"a LOGIN {USER} {PASSWORD}\r\n".encode())
    w.until(b"a")
    w.send(b"b SELECT INBOX\r\n")
    w.until(b"b")
    w.send(b"c NOTIFY SET (SELECTED (MessageNew MessageExpunge)) (PERSONAL (MessageNew MessageExpunge))\r\n")
    assert w.until(b"c")[-1] == b"c OK NOTIFY completed"
    other = imaplib.IMAP4_SSL("localhost", live_server.port("imap", "implicit"),
                              ssl_context=live_server.client_context(), timeout=30)
    other.login(USER, PASSWORD)
    assert other.append("Sent", None, None, message(1))[0] == "OK"
    assert w.line() == b'* STATUS "Sent" (MESSAGES 1 UIDNEXT 2 UNSEEN 1)'
    assert other.append("INBOX", None, None, message(2))[0] == "OK"
    assert w.line() == b"* 1 EXISTS"
    assert w.line() == b"* 1 RECENT"
    other.logout()
    w.send(b"d LOGOUT\r\n")
    assert w.until(b"d")[-1].startswith(b"d OK")
