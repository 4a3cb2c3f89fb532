"""Two real `postfach serve` processes on one PostgreSQL database (issue 9, "Done when"): IDLE on
node A sees a delivery through node B; concurrent APPENDs through both nodes get distinct, ascending
UIDs; killing node B leaves A serving and frees B's POP3 lock."""

from __future__ import annotations

import contextlib
import imaplib
import io
import os
import poplib
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.store.storehelpers import fresh_pg_database

from postfach import cli

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.slow,
    pytest.mark.postgres_only("several nodes share one PostgreSQL database"),
]

USER = "user@example.org"
PASSWORD = "multi-node-pass-1"


@dataclass
class Node:
    data: Path
    proc: subprocess.Popen[str]
    ports: dict[tuple[str, str], int]
    output: list[str]

    def port(self, protocol: str, tls: str = "starttls") -> int:
        return self.ports[(protocol, tls)]


@pytest.fixture
def database() -> Iterator[str]:
    with fresh_pg_database("postfach_nodes") as dsn:
        yield dsn


def _init(d: Path, dsn: str) -> None:
    assert cli.main(["init", "--data", str(d), "--dev", "--hostname", "localhost", "--store", dsn]) == 0
    cfg = d / "postfach.toml"
    cfg.write_text(re.sub(r"port = \d+", "port = 0", cfg.read_text()))


def _start(d: Path) -> Node:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "postfach", "serve", "--data", str(d)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if "User name" in line:
            break
    else:
        proc.kill()
        raise AssertionError("node did not start:\n" + "\n".join(lines))
    ports = {}
    for ln in lines:
        m = re.search(r"listening: (\w+) on \S+ port (\d+) \((\w+)\)", ln)
        if m:
            ports[(m.group(1), m.group(3))] = int(m.group(2))
    if not ports:
        proc.kill()
        raise AssertionError("no listeners:\n" + "\n".join(lines))
    node = Node(d, proc, ports, lines)
    threading.Thread(target=_drain, args=(node,), daemon=True).start()
    return node


def _drain(node: Node) -> None:
    assert node.proc.stdout is not None
    for line in node.proc.stdout:
        node.output.append(line.rstrip("\n"))


def _stop(node: Node) -> None:
    if node.proc.poll() is None:
        node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.wait(30)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()


def _imap(node: Node) -> imaplib.IMAP4:
    c = imaplib.IMAP4("127.0.0.1", node.port("imap"), timeout=30)
    c.login(USER, PASSWORD)  # loopback is a cleartext network in the dev config
    return c


def _message(n: int, tag: str) -> bytes:
    return (
        f"From: a@example.net\r\nTo: {USER}\r\nSubject: {tag} {n}\r\nMessage-ID: <{tag}.{n}@example.net>\r\n"
        f"Date: Fri, 27 Nov 2026 09:00:00 +0000\r\n\r\nbody {tag} {n}\r\n"
    ).encode()


@pytest.fixture
def two_nodes(tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Node, Node]]:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    _init(a_dir, database)
    _init(b_dir, database)  # the second node finds the schema made and migrated by the first
    assert cli.main(["domain", "add", "example.org", "--data", str(a_dir)]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORD + "\n"))
    assert cli.main(["user", "add", USER, "--password-stdin", "--data", str(a_dir)]) == 0
    a = _start(a_dir)
    try:
        b = _start(b_dir)
    except BaseException:
        _stop(a)
        raise
    try:
        yield a, b
    finally:
        _stop(b)
        _stop(a)


def test_idle_on_a_sees_delivery_through_b(two_nodes: tuple[Node, Node]) -> None:
    a, b = two_nodes
    c = _imap(a)
    try:
        typ, data = c.select("INBOX")
        assert typ == "OK" and data == [b"0"]
        tag = c._new_tag().decode()
        c.send(f"{tag} IDLE\r\n".encode())
        assert c.readline().startswith(b"+")
        with smtplib.SMTP("127.0.0.1", b.port("mx"), timeout=30) as s:
            s.sendmail("sender@example.net", [USER], _message(1, "via-b"))
        t0 = time.monotonic()
        line = c.readline()  # the untagged update IDLE sends (RFC 2177)
        elapsed = time.monotonic() - t0
        assert line.strip() == b"* 1 EXISTS", line
        assert elapsed < 5  # target 1 s; generous for a loaded 2-core machine
        c.send(b"DONE\r\n")
        while not (ln := c.readline()).startswith(tag.encode()):
            pass
        assert b"OK" in ln
        typ, msgs = c.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        first = msgs[0]
        assert typ == "OK" and isinstance(first, tuple) and b"via-b 1" in first[1]
    finally:
        with contextlib.suppress(Exception):
            c.logout()


def test_concurrent_appends_through_both_nodes(two_nodes: tuple[Node, Node]) -> None:
    a, b = two_nodes
    results: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def appender(node: Node, name: str) -> None:
        try:
            c = _imap(node)
            uids = []
            for i in range(15):
                typ, data = c.append("INBOX", "", "", _message(i, name))
                assert typ == "OK", data
                m = re.search(rb"APPENDUID \d+ (\d+)", data[0])  # RFC 4315
                assert m, data
                uids.append(int(m.group(1)))
            results[name] = uids
            c.logout()
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=appender, args=(n, f"{nm}{i}")) for i in range(2) for n, nm in ((a, "a"), (b, "b"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    everything = [u for uids in results.values() for u in uids]
    assert sorted(everything) == list(range(1, 61))  # distinct, no gaps
    for uids in results.values():
        assert uids == sorted(uids)  # each connection saw its UIDs ascend
    c = _imap(b)
    try:
        _typ, data = c.select("INBOX", readonly=True)
        assert data == [b"60"]
    finally:
        c.logout()


def test_killing_one_node_leaves_the_other_serving(two_nodes: tuple[Node, Node]) -> None:
    a, b = two_nodes
    p = poplib.POP3("127.0.0.1", b.port("pop3"), timeout=30)
    p.user(USER)
    p.pass_(PASSWORD)  # B holds the maildrop lock now (RFC 1939 §8)
    p2 = poplib.POP3("127.0.0.1", a.port("pop3"), timeout=30)
    p2.user(USER)
    with pytest.raises(poplib.error_proto, match=r"IN-USE|in use|locked"):
        p2.pass_(PASSWORD)
    with contextlib.suppress(Exception):
        p2.quit()
    b.proc.kill()  # SIGKILL: no goodbye, no clean close
    b.proc.wait(30)
    with contextlib.suppress(OSError):
        p.sock.close()
    # A keeps serving, and B's lock went with B's database session
    deadline = time.monotonic() + 30
    while True:
        p3 = poplib.POP3("127.0.0.1", a.port("pop3"), timeout=30)
        p3.user(USER)
        try:
            p3.pass_(PASSWORD)
            break
        except poplib.error_proto:
            p3.close()
            assert time.monotonic() < deadline, "B's maildrop lock was never released"
            time.sleep(0.2)
    assert p3.stat()[0] == 0
    p3.quit()
    with smtplib.SMTP("127.0.0.1", a.port("mx"), timeout=30) as s:
        s.sendmail("sender@example.net", [USER], _message(2, "after-kill"))
    c = _imap(a)
    try:
        _typ, data = c.select("INBOX", readonly=True)
        assert data == [b"1"]
    finally:
        c.logout()
