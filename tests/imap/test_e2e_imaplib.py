"""imaplib and imapclient against the live server over real TLS (issue 3: end-to-end)."""

from __future__ import annotations

import email
import imaplib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import PASSWORD, USER, LiveServer

CORPUS = sorted((Path(__file__).resolve().parent.parent / "corpus").glob("*.eml"))


def connect(live: LiveServer) -> imaplib.IMAP4_SSL:
    return imaplib.IMAP4_SSL("localhost", live.port("imap", "implicit"), ssl_context=live.client_context(),
                             timeout=30)


def test_starttls_login_and_capabilities(live_server: LiveServer) -> None:
    imap = imaplib.IMAP4("127.0.0.1", live_server.port("imap", "starttls"), timeout=30)
    try:
        assert "STARTTLS" in imap.capabilities
        imap.starttls(ssl_context=live_server.client_context())
        assert "AUTH=PLAIN" in imap.capabilities
        typ, _ = imap.login(USER, PASSWORD)
        assert typ == "OK"
        typ, data = imap.capability()
        caps = data[0].split()
        for cap in (b"IMAP4rev2", b"UIDPLUS", b"MOVE", b"IDLE", b"ESEARCH", b"SPECIAL-USE"):
            assert cap in caps
    finally:
        imap.logout()


def test_corpus_roundtrip(live_server: LiveServer) -> None:
    imap = connect(live_server)
    try:
        imap.login(USER, PASSWORD)
        imap.create("Corpus")
        originals = []
        for path in CORPUS:
            data = path.read_bytes()
            typ, resp = imap.append("Corpus", "(\\Flagged)", None, data)
            assert typ == "OK", resp
            assert b"APPENDUID" in resp[0]
            originals.append(imaplib.MapCRLF.sub(b"\r\n", data))  # imaplib sends CRLF
        typ, data = imap.select("Corpus")
        assert typ == "OK" and int(data[0]) == len(CORPUS)
        for i, original in enumerate(originals, 1):
            typ, fetched = imap.fetch(str(i), "(RFC822.SIZE FLAGS BODY.PEEK[])")
            assert typ == "OK"
            assert fetched[0][1] == original
            assert b"RFC822.SIZE %d" % len(original) in fetched[0][0]
            assert b"\\Flagged" in fetched[0][0]
        typ, data = imap.search(None, "ALL")
        assert data[0].split() == [str(i).encode() for i in range(1, len(CORPUS) + 1)]
        typ, data = imap.fetch("1:*", "(ENVELOPE BODYSTRUCTURE)")
        assert typ == "OK"
        typ, data = imap.store("1", "+FLAGS", "(\\Deleted)")
        assert typ == "OK" and b"\\Deleted" in data[0]
        typ, data = imap.expunge()
        assert data == [b"1"]
        typ, data = imap.uid("SEARCH", "ALL")
        assert len(data[0].split()) == len(CORPUS) - 1
    finally:
        imap.logout()


def test_fetch_sections_against_messages(live_server: LiveServer) -> None:
    imap = connect(live_server)
    try:
        imap.login(USER, PASSWORD)
        msg = (b"From: A <a@example.com>\r\nTo: b@example.org\r\nSubject: Hello there\r\n"
               b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
               b"--XX\r\nContent-Type: text/plain\r\n\r\nfirst part\r\n"
               b"--XX\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
               b"AAECAwQ=\r\n--XX--\r\n")
        imap.append("INBOX", None, None, msg)
        imap.select("INBOX")
        typ, data = imap.fetch("1", "(BODY.PEEK[1] BODY.PEEK[HEADER.FIELDS (SUBJECT)] BINARY.PEEK[2] "
                                    "BINARY.SIZE[2])")
        assert typ == "OK"
        flat = [x for x in data if isinstance(x, tuple)]
        assert flat[0][1] == b"first part"
        assert flat[1][1] == b"Subject: Hello there\r\n\r\n"
        assert flat[2][1] == b"\x00\x01\x02\x03\x04"
        assert b"BINARY.SIZE[2] 5" in data[-1]
        parsed = email.message_from_bytes(msg)
        assert parsed["Subject"] == "Hello there"
        typ, data = imap.search(None, "SUBJECT", "hello")
        assert data[0] == b"1"
        typ, data = imap.search(None, "BODY", '"FIRST PART"')
        assert data[0] == b"1"
        typ, data = imap.fetch("1", "(FLAGS)")
        assert b"\\Seen" not in data[0]
        imap.fetch("1", "(BODY[TEXT])")
        typ, data = imap.fetch("1", "(FLAGS)")
        assert b"\\Seen" in data[0]
    finally:
        imap.logout()


def test_copy_move_and_trycreate(live_server: LiveServer) -> None:
    imap = connect(live_server)
    try:
        imap.login(USER, PASSWORD)
        for i in range(3):
            imap.append("INBOX", None, None, b"Subject: m%d\r\n\r\nbody\r\n" % i)
        imap.select("INBOX")
        typ, data = imap.copy("1:2", "Nowhere")
        assert typ == "NO" and b"TRYCREATE" in data[0]
        typ, data = imap.copy("1:2", "Archive")
        assert typ == "OK" and b"COPYUID" in data[0]
        typ, data = imap._simple_command("MOVE", "3", "Trash")  # type: ignore[attr-defined]
        assert typ == "OK"
        typ, data = imap.select("INBOX")
        assert int(data[0]) == 2
        typ, data = imap.select("Archive")
        assert int(data[0]) == 2
        typ, data = imap.select("Trash")
        assert int(data[0]) == 1
    finally:
        imap.logout()


def test_big_message_streams(live_server: LiveServer) -> None:
    imap = connect(live_server)
    try:
        imap.login(USER, PASSWORD)
        line = b"x" * 998 + b"\r\n"
        big = b"Subject: big\r\n\r\n" + line * 3000  # ~3 MB
        typ, _ = imap.append("INBOX", None, None, big)
        assert typ == "OK"
        imap.select("INBOX", readonly=True)
        typ, data = imap.fetch("1", "(BODY.PEEK[])")
        assert data[0][1] == big
        typ, data = imap.fetch("1", "(BODY.PEEK[]<100.50>)")
        assert data[0][1] == big[100:150]
    finally:
        imap.logout()


def test_idle_sees_append_from_other_session(live_server: LiveServer) -> None:
    from imapclient import IMAPClient

    watcher = IMAPClient("localhost", port=live_server.port("imap", "implicit"),
                         ssl_context=live_server.client_context(), timeout=30)
    other = connect(live_server)
    try:
        watcher.login(USER, PASSWORD)
        watcher.select_folder("INBOX")
        other.login(USER, PASSWORD)
        watcher.idle()
        start = time.monotonic()
        other.append("INBOX", None, None, b"Subject: wake up\r\n\r\nhi\r\n")
        responses = watcher.idle_check(timeout=1.0)
        elapsed = time.monotonic() - start
        watcher.idle_done()
        assert (1, b"EXISTS") in responses, responses
        assert elapsed < 1.5
    finally:
        other.logout()
        watcher.logout()


def test_imapclient_flow(live_server: LiveServer) -> None:
    from imapclient import IMAPClient

    client = IMAPClient("localhost", port=live_server.port("imap", "implicit"),
                        ssl_context=live_server.client_context(), timeout=30)
    try:
        client.login(USER, PASSWORD)
        folders = {f[2] for f in client.list_folders()}
        assert {"INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive"} <= folders
        client.create_folder("Projekte/Zürich")
        assert "Projekte/Zürich" in {f[2] for f in client.list_folders()}
        special = {f[2]: f[0] for f in client.list_folders()}
        assert b"\\Sent" in special["Sent"]
        client.append("Projekte/Zürich", b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nGr\xc3\xbcezi\r\n")
        client.select_folder("Projekte/Zürich")
        uids = client.search(["ALL"])
        assert len(uids) == 1
        client.add_flags(uids, [b"$Label1"])
        assert b"$Label1" in client.get_flags(uids)[uids[0]]
        status = client.folder_status("INBOX", ["MESSAGES", "UIDNEXT", "UNSEEN"])
        assert b"MESSAGES" in status
        client.rename_folder("Projekte/Zürich", "Projekte/Bern")
        assert "Projekte/Bern" in {f[2] for f in client.list_folders()}
    finally:
        client.logout()
