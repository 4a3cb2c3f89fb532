"""Real clients from Debian against the live server: isync (mbsync) both ways, and curl imaps://."""

from __future__ import annotations

import imaplib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import PASSWORD, USER, LiveServer

pytestmark = pytest.mark.interop

MBSYNC = shutil.which("mbsync")
CURL = shutil.which("curl")


def _imap(live: LiveServer) -> imaplib.IMAP4_SSL:
    imap = imaplib.IMAP4_SSL("localhost", live.port("imap", "implicit"), ssl_context=live.client_context(),
                             timeout=30)
    imap.login(USER, PASSWORD)
    return imap


def _mbsync(rc: Path) -> None:
    proc = subprocess.run([MBSYNC or "mbsync", "-c", str(rc), "-a"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _maildir_files(root: Path, box: str) -> list[Path]:
    return sorted(p for sub in ("cur", "new") for p in (root / box / sub).glob("*") if p.is_file())


@pytest.mark.skipif(MBSYNC is None, reason="mbsync (Debian package isync) is not installed")
def test_mbsync_syncs_both_ways(live_server: LiveServer, tmp_path: Path) -> None:
    imap = _imap(live_server)
    for i in range(3):
        imap.append("INBOX", "(\\Seen)" if i == 0 else None, None,
                    b"From: a@example.com\r\nSubject: pull %d\r\nMessage-ID: <p%d@x>\r\n\r\nbody %d\r\n"
                    % (i, i, i))
    imap.logout()
    local = tmp_path / "mail"
    local.mkdir()
    rc = tmp_path / "mbsyncrc"
    rc.write_text(f"""
IMAPAccount test
Host localhost
Port {live_server.port("imap", "implicit")}
User {USER}
Pass {PASSWORD}
SSLType IMAPS
CertificateFile {live_server.cafile}

IMAPStore remote
Account test

MaildirStore local
Path {local}/
Inbox {local}/INBOX
SubFolders Verbatim

Channel test
Far :remote:
Near :local:
Patterns INBOX
Create Both
Expunge Both
SyncState *
Sync All
""")
    # 1. pull
    _mbsync(rc)
    files = _maildir_files(local, "INBOX")
    assert len(files) == 3
    seen = [f for f in files if ",S" in f.name or f.name.endswith("S")]
    assert len(seen) == 1
    # 2. local flag change and a new local message are pushed
    target = next(f for f in files if f not in seen)
    if ":2," in target.name:
        target.rename(target.with_name(target.name + "F"))
    else:
        target.rename(local / "INBOX" / "cur" / (target.name + ":2,F"))
    (local / "INBOX" / "new" / "1700000000.local.host").write_bytes(
        b"From: me@example.org\r\nSubject: pushed\r\nMessage-ID: <push@x>\r\n\r\nfrom mbsync\r\n")
    _mbsync(rc)
    imap = _imap(live_server)
    imap.select("INBOX")
    _typ, data = imap.search(None, "FLAGGED")
    assert len(data[0].split()) == 1
    _typ, data = imap.search(None, "SUBJECT", "pushed")
    assert len(data[0].split()) == 1
    # 3. a server-side change is pulled: flag a message and delete another
    _typ, data = imap.search(None, "SUBJECT", '"pull 0"')
    imap.store(data[0].decode(), "+FLAGS", "(\\Answered)")
    _typ, data = imap.search(None, "SUBJECT", '"pull 2"')
    imap.store(data[0].decode(), "+FLAGS", "(\\Deleted)")
    imap.expunge()
    imap.logout()
    _mbsync(rc)
    files = _maildir_files(local, "INBOX")
    assert len(files) == 3
    texts = {re.search(rb"Subject: ([^\r\n]*)", f.read_bytes()).group(1): f.name  # type: ignore[union-attr]
             for f in files}
    assert b"pull 2" not in texts
    assert "R" in texts[b"pull 0"].rsplit(",", 1)[1]


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_curl_imaps_fetches_a_message(live_server: LiveServer, tmp_path: Path) -> None:
    imap = _imap(live_server)
    body = b"From: a@example.com\r\nSubject: for curl\r\n\r\nhello curl\r\n"
    imap.append("INBOX", None, None, body)
    imap.logout()
    port = live_server.port("imap", "implicit")
    proc = subprocess.run(
        [CURL or "curl", "-sS", "--cacert", str(live_server.cafile), "--user", f"{USER}:{PASSWORD}",
         f"imaps://localhost:{port}/INBOX;UID=1"],
        capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == body
    proc = subprocess.run(
        [CURL or "curl", "-sS", "--cacert", str(live_server.cafile), "--user", f"{USER}:{PASSWORD}",
         f"imaps://localhost:{port}/"],
        capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert b"INBOX" in proc.stdout
