"""``postfach queue list|show|retry|delete``, ``postfach dkim keygen`` and ``postfach dns``, called
through argparse like the CLI does, with a real store in tmp_path."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest
from tests import backends

from postfach import dkim
from postfach.config import Config, ListenerConfig
from postfach.errors import UsageError
from postfach.queue import admin
from postfach.store import open_store
from postfach.store.base import QueueRecipient


def run(config: Config, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="postfach")
    sub = parser.add_subparsers(dest="command", required=True)
    admin.add_parsers(sub)
    dkim.add_parsers(sub)
    args = parser.parse_args(list(argv))
    rc: int = args.func(args, config)
    return rc


def seed(config: Config) -> list[int]:
    async def go() -> list[int]:
        store = open_store(config)
        await store.open()
        try:
            a = await store.queue_add("alice@postfach.test", [QueueRecipient("bob@remote.test"),
                                                              QueueRecipient("carol@remote.test")],
                                      b"Subject: one\r\n\r\n" + b"x" * 5000, envid="E1", ret="HDRS")
            b = await store.queue_add("", [QueueRecipient("dave@remote.test")], b"Subject: two\r\n\r\nbody\r\n")
            return [int(a.id), int(b.id)]
        finally:
            await store.close()

    return asyncio.run(go())


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(hostname="mail.postfach.test", data_dir=tmp_path, store=backends.store_config(tmp_path), listeners=(
        ListenerConfig("imap", 993, "::", "implicit"), ListenerConfig("submission", 587, "::", "starttls"),
        ListenerConfig("submission", 465, "::", "implicit"), ListenerConfig("mx", 25, "::", "starttls"),
    ))


def test_queue_list_show_retry_delete(config: Config, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(config, "queue", "list") == 0
    assert "The queue is empty." in capsys.readouterr().out
    a, b = seed(config)
    assert run(config, "queue", "list") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "AGE", "SIZE", "TRIES"]
    assert "4.9 KiB" in out and "bob@remote.test, carol@remote.test" in out and "<>" in out
    assert lines[-1].startswith("-- 2 messages")
    assert run(config, "queue", "list", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in data] == [a, b]
    assert data[0]["envid"] == "E1"
    assert [r["address"] for r in data[0]["recipients"]] == ["bob@remote.test", "carol@remote.test"]
    assert run(config, "queue", "show", str(a)) == 0
    out = capsys.readouterr().out
    assert "Sender:        <alice@postfach.test>" in out and "ENVID=E1" in out and "pending" in out
    assert run(config, "queue", "retry") == 0
    assert "2 messages scheduled" in capsys.readouterr().out
    assert run(config, "queue", "retry", str(b)) == 0
    assert run(config, "queue", "delete", str(b)) == 0
    capsys.readouterr()
    assert run(config, "queue", "list", "--json") == 0
    assert [d["id"] for d in json.loads(capsys.readouterr().out)] == [a]
    for bad in (("queue", "show", "999"), ("queue", "delete", "999"), ("queue", "show", "abc"),
                ("queue", "retry", "0")):
        with pytest.raises(UsageError):
            run(config, *bad)


def test_dkim_keygen_and_dns(config: Config, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(config, "dns", "example.com") == 0
    out = capsys.readouterr().out
    assert "postfach dkim keygen example.com" in out  # no key yet: told how to make one
    assert run(config, "dkim", "keygen", "Example.com") == 0
    out = capsys.readouterr().out
    assert "postfach-ed25519._domainkey.example.com. 3600 IN TXT" in out
    assert (config.data_dir / "dkim" / "example.com" / "postfach-rsa.rsa.key").stat().st_mode & 0o077 == 0
    with pytest.raises(UsageError):
        run(config, "dkim", "keygen", "example.com", "--algorithm", "rsa")  # would overwrite
    with pytest.raises(UsageError):
        run(config, "dkim", "keygen", "not a domain")
    assert run(config, "dns", "example.com") == 0
    out = capsys.readouterr().out
    records = {(ln.split()[0], ln.split()[3]) for ln in out.splitlines() if not ln.startswith(";")}
    assert ("example.com.", "MX") in records
    assert "10 mail.postfach.test." in out
    assert '"v=spf1 mx -all"' in out
    assert ("postfach-ed25519._domainkey.example.com.", "TXT") in records
    assert ("postfach-rsa._domainkey.example.com.", "TXT") in records
    assert '"v=DMARC1; p=quarantine; rua=mailto:postmaster@example.com"' in out
    srv = {ln.split()[0]: " ".join(ln.split()[4:8]) for ln in out.splitlines() if " SRV " in ln}
    assert srv["_imaps._tcp.example.com."] == "0 1 993 mail.postfach.test."
    assert srv["_submission._tcp.example.com."] == "0 1 587 mail.postfach.test."
    assert srv["_submissions._tcp.example.com."] == "0 1 465 mail.postfach.test."
    assert srv["_pop3._tcp.example.com."] == "0 0 0 ."  # RFC 6186 §4: not offered
    # the RSA key is longer than one TXT string: split into 255-byte strings
    rsa_line = next(ln for ln in out.splitlines() if ln.startswith("postfach-rsa._domainkey"))
    assert rsa_line.count('" "') >= 1
