"""Export / import: Maildir++ and mbox round trips (byte-identical, flags, folders), Dovecot and
Thunderbird files, a malformed mbox, idempotent re-runs, IMAP import from a second postfach."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from postfach import transfer
from postfach.types import AccountId, MailboxId

from .conftest import Env, message

USER = "user@example.org"
COPY = "copy@example.org"


def folder_state(env: Env, address: str) -> dict[str, list[tuple[str, frozenset[str], int]]]:
    """Per folder: (sha256 of the bytes, flags, INTERNALDATE in seconds) in UID order."""

    async def run() -> dict[str, list[tuple[str, frozenset[str], int]]]:
        s = env.store()
        await s.open()
        try:
            acct = await s.get_account(address)
            assert acct is not None
            out = {}
            for mb in await s.list_mailboxes(AccountId(acct.id)):
                metas = await s.list_messages(AccountId(acct.id), MailboxId(mb.id))
                rows = []
                for m in metas:
                    data = await s.read_message(AccountId(acct.id), MailboxId(mb.id), m.uid)
                    rows.append((hashlib.sha256(data).hexdigest(), m.flags, int(m.internaldate.timestamp())))
                out[mb.name] = rows
            return out
        finally:
            await s.close()

    return asyncio.run(run())


def add_account(env: Env, address: str) -> None:
    async def run() -> None:
        s = env.store()
        await s.open()
        try:
            await s.create_account(address, "$argon2id$fake")
        finally:
            await s.close()

    asyncio.run(run())


@pytest.mark.parametrize("fmt", ["maildir", "mbox"])
def test_export_import_round_trip(env: Env, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "export"
    assert env.run("export", USER, "--format", fmt, str(out)) == 0
    add_account(env, COPY)
    assert env.run("import", COPY, "--format", fmt, str(out)) == 0
    original = folder_state(env, USER)
    copied = folder_state(env, COPY)
    if fmt == "mbox":
        # mbox cannot represent a message without a final line end: it gets one (CRLF here).
        old = original["Archive/2025"][0]
        data = message(1, size=3000, tag="old")
        assert not data.endswith(b"\n") and old[0] == hashlib.sha256(data).hexdigest()
        original["Archive/2025"][0] = (hashlib.sha256(data + b"\r\n").hexdigest(), old[1], old[2])
    assert copied == original  # same folders, bytes, flags (keywords too) and dates, in order
    assert any(any("$Label1" in f for _, f, _ in rows) for rows in original.values())
    # A second run adds nothing.
    assert env.run("import", COPY, "--format", fmt, str(out)) == 0
    assert folder_state(env, COPY) == original
    assert env.run("check") == 0


def test_maildir_layout_is_dovecot_like(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "md"
    assert env.run("export", USER, "--format", "maildir", str(out)) == 0
    assert (out / "cur").is_dir() and (out / ".Sent" / "cur").is_dir()
    assert (out / ".Archive.2025" / "maildirfolder").is_file()
    names = sorted(p.name for p in (out / ".Sent" / "cur").iterdir())
    assert all(n.endswith(":2,RS") for n in names)
    assert (out / "dovecot-keywords").read_text().strip() == "0 $Label1"
    inbox = sorted((out / "cur").iterdir())
    assert any(p.name.endswith(":2,a") for p in inbox)  # keyword letter
    # mtime carries INTERNALDATE (what Dovecot reads back).
    assert {int(p.stat().st_mtime) for p in inbox} >= {int(datetime(2026, 11, 1, 8, 30, tzinfo=UTC).timestamp())}
    assert env.run("export", USER, "--format", "maildir", str(out)) == 2  # not empty


def test_mbox_quotes_from_lines(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "mb"
    assert env.run("export", USER, "--format", "mbox", str(out)) == 0
    inbox = (out / "INBOX").read_bytes()
    assert inbox.startswith(b"From MAILER-DAEMON ")
    assert b"\r\n>From here on" in inbox
    assert (out / "Archive.sbd" / "2025").is_file()


def test_import_dovecot_maildir(env: Env, tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (md / sub).mkdir(parents=True)
        (md / ".Lists.python" / sub).mkdir(parents=True)
    (md / "dovecot-keywords").write_text("0 Junk\n1 $Important\n")
    (md / "cur" / "1700000000.M1P1.host,S=50,W=52:2,SRb").write_bytes(b"Subject: one\n\nfirst\n")
    (md / "new" / "1700000100.M2P1.host").write_bytes(b"Subject: two\n\nsecond\n")
    (md / ".Lists.python" / "cur" / "1700000200.M3P1.host:2,F").write_bytes(b"Subject: three\r\n\r\nthird\r\n")
    os.utime(md / "cur" / "1700000000.M1P1.host,S=50,W=52:2,SRb", (1700000000, 1700000000))
    add_account(env, COPY)
    assert env.run("import", COPY, "--format", "maildir", str(md)) == 0
    state = folder_state(env, COPY)
    inbox = state["INBOX"]
    assert [f for _, f, _ in inbox] == [frozenset({"\\Seen", "\\Answered", "$Important"}), frozenset()]
    assert inbox[0][0] == hashlib.sha256(b"Subject: one\r\n\r\nfirst\r\n").hexdigest()  # LF -> CRLF
    assert inbox[0][2] == 1700000000
    assert state["Lists/python"][0][1] == frozenset({"\\Flagged"})


THUNDERBIRD = (
    b"From - Mon Jan 06 10:00:00 2025\n"
    b"X-Mozilla-Status: 0001\n"
    b"X-Mozilla-Status2: 00000000\n"
    b"X-Mozilla-Keys: $label1\n"
    b"Subject: read\n"
    b"\n"
    b">From the archive\n"
    b"\n"
    b"From - Mon Jan 06 11:00:00 2025\n"
    b"X-Mozilla-Status: 0008\n"
    b"Subject: deleted but not compacted\n"
    b"\n"
    b"gone\n"
    b"\n"
    b"From - Tue Jan 07 12:00:00 2025\n"
    b"X-Mozilla-Status: 0005\n"
    b"Subject: flagged\n"
    b"\n"
    b"hi\n"
)


def test_import_thunderbird_mbox(env: Env, tmp_path: Path) -> None:
    root = tmp_path / "Local Folders"
    (root / "Archives.sbd").mkdir(parents=True)
    (root / "Inbox").write_bytes(THUNDERBIRD)
    (root / "Inbox.msf").write_bytes(b"// mork index, not mail")
    (root / "Archives.sbd" / "2024").write_bytes(THUNDERBIRD)
    add_account(env, COPY)
    assert env.run("import", COPY, "--format", "mbox", str(root)) == 0
    state = folder_state(env, COPY)
    inbox = state["INBOX"]
    assert len(inbox) == 2
    assert inbox[0][1] == frozenset({"\\Seen", "$label1"})
    assert inbox[0][0] == hashlib.sha256(b"Subject: read\r\n\r\nFrom the archive\r\n").hexdigest()
    assert inbox[0][2] == int(datetime(2025, 1, 6, 10, 0, tzinfo=UTC).timestamp())
    assert inbox[1][1] == frozenset({"\\Seen", "\\Flagged"})
    assert len(state["Archives/2024"]) == 2


def test_malformed_mbox_imports_what_is_readable(
    env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = (
        b"this is not an mbox line\n"  # 1
        b"neither is this\n"  # 2
        b"From alice@example.net Thu Nov 26 10:00:00 2026\n"  # 3
        b"Subject: good one\n"
        b"\n"
        b"body\n"
        b"\n"
        b"From bob@example.net Thu Nov 26 11:00:00 2026\n"  # 8
        b"\n"  # 9
        b"From carol@example.net Thu Nov 26 12:00:00 2026\n"  # 10
        b"no header here, just text\n"
        b"\n"
        b"From dave@example.net Thu Nov 26 13:00:00 2026\n"  # 13
        b"Subject: good two\n"
        b"\n"
        b"From the body, unquoted (mboxo) but not after a blank line? it is.\n"
    )
    path = tmp_path / "broken.mbox"
    path.write_bytes(raw)
    add_account(env, COPY)
    assert env.run("import", COPY, "--format", "mbox", str(path), "--folder", "Imported") == 1
    captured = capsys.readouterr()
    assert "Imported 2 messages" in captured.out
    assert f"{path}:1-2: text before the first 'From ' line" in captured.err
    assert f"{path}:8: empty message" in captured.err
    assert f"{path}:10-12: no header" in captured.err
    subjects = folder_state(env, COPY)["Imported"]
    assert len(subjects) == 2
    garbage = tmp_path / "garbage.mbox"
    garbage.write_bytes(os.urandom(2000).replace(b"\n", b"x") + b"\n")
    assert env.run("import", COPY, "--format", "mbox", str(garbage)) == 1
    assert "not an mbox file" in capsys.readouterr().err


def test_parse_imap_url() -> None:
    src = transfer.parse_imap_url("imaps://user@example.org@mail.example.net")
    assert (src.user, src.host, src.port) == ("user@example.org", "mail.example.net", 993)
    src = transfer.parse_imap_url("imap://bob%40x.org@[::1]:1143")
    assert (src.scheme, src.user, src.host, src.port) == ("imap", "bob@x.org", "::1", 1143)
    with pytest.raises(Exception, match="user name"):
        transfer.parse_imap_url("imaps://host")
    with pytest.raises(Exception, match="imaps://"):
        transfer.parse_imap_url("http://u@host")


def test_import_usage_errors(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert env.run("import", USER, str(tmp_path)) == 2
    assert env.run("import", USER, "--format", "mbox", str(tmp_path / "nope")) == 2
    assert env.run("import", "nobody@example.org", "--format", "mbox", str(tmp_path)) == 2
    assert "no account" in capsys.readouterr().err


def test_imap_import_from_second_postfach(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import postfach.imap.connection  # noqa: F401
    except ImportError:
        pytest.skip("IMAP server not available yet")
    from tests.conftest import PASSWORD, start_live_server, stop_live_server

    live, thread = start_live_server(tmp_path / "source")
    try:
        async def fill(store: Any) -> None:
            acct = await store.get_account(USER)
            aid = AccountId(acct.id)
            inbox = await store.get_mailbox(aid, "INBOX")
            sent = await store.get_mailbox(aid, "Sent")
            deep = await store.create_mailbox(aid, "Projekte/Übersicht")
            when = datetime(2026, 10, 1, 12, 0, tzinfo=UTC)
            for i in range(7):
                await store.append(aid, MailboxId(inbox.id), f"Subject: in {i}\r\n\r\nx{i}\r\n".encode(),
                                   frozenset({"\\Seen"}) if i % 2 else frozenset(), when)
            await store.append(aid, MailboxId(sent.id), b"Subject: sent\r\n\r\ns\r\n",
                               frozenset({"\\Seen", "\\Answered", "$Forwarded"}), when)
            await store.append(aid, MailboxId(deep.id), b"Subject: deep\r\n\r\nd\r\n", frozenset({"\\Flagged"}), when)

        live.call(fill)
        port = live.port("imap", "implicit")
        add_account(env, COPY)
        url = f"imaps://{USER}@localhost:{port}"
        monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
        assert env.run("import", COPY, "--imap", url, "--password-stdin", "--cafile", str(live.cafile)) == 0
        state = folder_state(env, COPY)
        assert len(state["INBOX"]) == 7
        assert [f for _, f, _ in state["INBOX"]][:2] == [frozenset(), frozenset({"\\Seen"})]
        assert state["Sent"][0][1] == frozenset({"\\Seen", "\\Answered", "$Forwarded"})
        assert state["Projekte/Übersicht"][0][1] == frozenset({"\\Flagged"})
        assert state["INBOX"][0][2] == int(datetime(2026, 10, 1, 12, 0, tzinfo=UTC).timestamp())
        state_file = env.data / "import-state" / f"{COPY}.json"
        assert state_file.is_file()
        # Second run: nothing fetched again, no duplicates.
        monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
        assert env.run("import", COPY, "--imap", url, "--password-stdin", "--cafile", str(live.cafile)) == 0
        assert folder_state(env, COPY) == state
        # Interrupted run: forget part of the progress; only the rest is fetched, nothing doubles.
        import json

        data = json.loads(state_file.read_text())
        for folder in data.values():
            folder["INBOX"]["uids"] = folder["INBOX"]["uids"][:3]
        state_file.write_text(json.dumps(data))

        async def resume() -> transfer.Report:
            s = env.store()
            await s.open()
            try:
                acct = await s.get_account(COPY)
                assert acct is not None
                return await transfer.import_imap(
                    s, AccountId(acct.id), transfer.parse_imap_url(url), PASSWORD, state_file,
                    cafile=str(live.cafile), batch=2,
                )
            finally:
                await s.close()

        rep = asyncio.run(resume())
        assert rep.imported == 0 and rep.skipped >= 4
        assert folder_state(env, COPY) == state
        # Wrong password: a clear error, exit 1.
        monkeypatch.setattr("sys.stdin", io.StringIO("wrong-password\n"))
        assert env.run("import", COPY, "--imap", url, "--password-stdin", "--cafile", str(live.cafile)) == 1
    finally:
        stop_live_server(live, thread)


def _metadata(env: Env, address: str,
              entries: dict[str, dict[str, bytes]] | None = None) -> dict[str, dict[str, bytes]]:
    """Set (when given) and read every METADATA entry of the account: mailbox ("" = server) -> entries."""

    async def run() -> dict[str, dict[str, bytes]]:
        s = env.store()
        await s.open()
        try:
            acct = await s.get_account(address)
            assert acct is not None
            aid = AccountId(acct.id)
            boxes = {mb.name: MailboxId(mb.id) for mb in await s.list_mailboxes(aid)}
            for name, values in (entries or {}).items():
                await s.set_metadata(aid, boxes[name] if name else None, values,
                                     max_mailbox_entries=10, max_account_entries=10)
            out = {"": await s.get_metadata(aid, None)}
            for name, mid in boxes.items():
                out[name] = await s.get_metadata(aid, mid)
            return {k: v for k, v in out.items() if v}
        finally:
            await s.close()

    return asyncio.run(run())


def test_maildir_export_import_carries_metadata(env: Env, tmp_path: Path) -> None:
    """IMAP METADATA entries (RFC 5464) travel in postfach-metadata.json beside the Maildir."""
    want = {"": {"/shared/comment": "Server ü".encode()},
            "Archive/2025": {"/private/comment": b"old mail", "/private/vendor/x.example/bin": b"\x00\xff"}}
    have = _metadata(env, USER, want)
    assert all(have[k].items() >= v.items() for k, v in want.items())
    out = tmp_path / "md"
    assert env.run("export", USER, "--format", "maildir", str(out)) == 0
    assert (out / transfer.METADATA_FILE).is_file()
    add_account(env, COPY)
    assert env.run("import", COPY, "--format", "maildir", str(out)) == 0
    assert _metadata(env, COPY) == have
    (out / transfer.METADATA_FILE).write_text("[{\"mailbox\": 1}]")
    assert env.run("import", COPY, "--format", "maildir", str(out)) == 1  # a problem reported, not a crash
