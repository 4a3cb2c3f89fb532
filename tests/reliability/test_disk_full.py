"""Disk full (issue 7, item 6): the data dir on a 20 MiB tmpfs that the test fills up.

While the disk is full, deliveries get temporary failures (SMTP ``452 4.3.1``, IMAP APPEND ``NO``),
reading still works, and nothing half-written stays behind; once space returns, the same clients
deliver again. Afterwards every acknowledged message is there and byte-intact and
``postfach check`` is clean.
"""

from __future__ import annotations

import contextlib
import errno
import imaplib
import os
import random
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench.load.clients import (
    CONNECT_TIMEOUT,
    Ledger,
    Target,
    connect,
    imap_connect,
    make_message,
    read_inbox,
    verify,
)
from bench.load.server import ServerProcess

PASSWORD = "diskfull-pass-1"
SENDER = "sender@example.org"
RCPT = "rcpt@example.org"
IMAPUSER = "imap@example.org"


pytestmark = pytest.mark.sqlite_only("fills the data dir's filesystem; PostgreSQL's disk is the database server's")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m,mode=0755", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem says ENOSPC (down to single pages)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 16, 4096, 512):
            block = b"\0" * chunk
            while True:
                try:
                    f.write(block)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
        with contextlib.suppress(OSError):
            os.fsync(f.fileno())
    return filler


def smtp_send(target: Target, ledger: Ledger, tag: str, rng: random.Random) -> tuple[int, bytes]:
    data = make_message(tag, SENDER, RCPT, rng, max_kib=8)
    ledger.attempt(tag, data, RCPT, "smtp")
    port = target.ports[("submission", "implicit")]
    with connect(lambda: smtplib.SMTP_SSL(target.host, port, context=target.ctx(), timeout=CONNECT_TIMEOUT)) as s:
        s.login(SENDER, PASSWORD)
        try:
            s.sendmail(SENDER, [RCPT], data)
        except smtplib.SMTPResponseException as e:
            text: bytes | str = e.smtp_error
            return e.smtp_code, text.encode() if isinstance(text, str) else text
        except smtplib.SMTPRecipientsRefused as e:
            code, msg = e.recipients[RCPT]
            return code, bytes(msg)
    ledger.ack("smtp", tag)
    return 250, b""


def imap_append(imap: imaplib.IMAP4, ledger: Ledger, tag: str, rng: random.Random) -> tuple[str, bytes]:
    data = make_message(tag, SENDER, IMAPUSER, rng, max_kib=8)
    ledger.attempt(tag, data, IMAPUSER, "append")
    typ, resp = imap.append("INBOX", None, None, data)
    if typ == "OK":
        ledger.ack("append", tag)
    return typ, resp[0] if resp and isinstance(resp[0], bytes) else b""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_full_disk_gives_temporary_failures_and_recovers(small_fs: Path, tmp_path: Path) -> None:
    rng = random.Random(7)
    srv = ServerProcess(small_fs / "var", log_dir=tmp_path, limits={"tls_handshake_timeout_seconds": 3})
    srv.init()
    srv.provision([SENDER, RCPT, IMAPUSER], PASSWORD)
    ledger = Ledger()
    try:
        srv.start()
        target = Target("localhost", dict(srv.ports), srv.cafile, PASSWORD)
        imap = imap_connect(target)
        assert imap.login(IMAPUSER, PASSWORD)[0] == "OK"
        assert imap.select("INBOX")[0] == "OK"

        # space left: both work
        assert smtp_send(target, ledger, "before-smtp", rng) == (250, b"")
        assert imap_append(imap, ledger, "before-append", rng)[0] == "OK"

        filler = fill(small_fs)
        for i in range(3):
            code, text = smtp_send(target, ledger, f"full-smtp-{i}", rng)
            assert code == 452, (code, text)  # RFC 3463: 4.3.1 mail system full
            assert text.startswith(b"4.3.1"), text
            typ, text = imap_append(imap, ledger, f"full-append-{i}", rng)
            assert typ == "NO", (typ, text)
        # reading goes on while the disk is full, on the same connection
        typ, data = imap.uid("FETCH", "1:*", "(UID FLAGS RFC822.SIZE)")
        assert typ == "OK", data
        assert imap.noop()[0] == "OK"

        filler.unlink()  # space returns: the same server and connection deliver again
        assert smtp_send(target, ledger, "after-smtp", rng) == (250, b"")
        assert imap_append(imap, ledger, "after-append", rng)[0] == "OK"
        imap.logout()

        boxes = {a: read_inbox(target, a) for a in (RCPT, IMAPUSER)}
        problems = verify(ledger, boxes)
        assert not problems, "\n".join(problems)
        stored = {t for b in boxes.values() for _f, d in b.messages.values() if (t := _tag(d))}
        assert stored == {"before-smtp", "before-append", "after-smtp", "after-append"}
        assert srv.stop() == 0
        rc, out = srv.check()
        assert rc == 0, out
        assert not srv.tracebacks(), "\n".join(srv.tracebacks())
    finally:
        srv.kill()


def _tag(data: bytes) -> str | None:
    from bench.load.clients import tag_of

    return tag_of(data)
