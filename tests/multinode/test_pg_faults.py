"""PostgreSQL faults under load (issue 9 item 6), without touching the shared PostgreSQL server.

Two real `postfach serve` nodes reach PostgreSQL through loopback relays that the test can cut
(every connection closed, new ones reset) and restore, as a restarting or unreachable database
looks from a node; later every backend of the test database is killed with pg_terminate_backend.
Meanwhile clients APPEND over IMAP, deliver over SMTP (MX) and read over POP3 through both nodes.

Checked: during the outage every protocol answers with its temporary error (IMAP `NO
[UNAVAILABLE]`, POP3 `-ERR [SYS/TEMP]`, SMTP `451 4.3.0`) for logins, SELECT, FETCH, RETR, RCPT and
DATA alike, and no session crashes or hangs; service resumes without restarting anything; every
acknowledged write is there afterwards, byte for byte (hash compare); and an IDLE client on node A
is told about a delivery through node B made while A was cut off (its notification was lost, the
re-sync after the reconnect makes up for it), and about deliveries after that.
"""

from __future__ import annotations

import contextlib
import hashlib
import imaplib
import io
import poplib
import re
import smtplib
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from tests.multinode.test_two_nodes import Node, _init, _start, _stop
from tests.store.storehelpers import PG_SERVER_DSN, pg_dsn, run_sync

from postfach import cli

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

USER = "user@example.org"
WATCHER = "watcher@example.org"
READER = "reader@example.org"
PASSWORD = "multi-node-pass-1"
TEMP_IMAP = "[UNAVAILABLE]"
TEMP_POP3 = "[SYS/TEMP]"


class PgRelay:
    """A loopback TCP relay in front of PostgreSQL that can be cut: ``cut()`` closes every relayed
    connection (with a reset, as a crashed server's host would) and resets new ones until
    ``restore()``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._up = True
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        threading.Thread(target=self._serve, daemon=True).start()

    @staticmethod
    def _reset(s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                up = self._up
            if not up:
                self._reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                self._reset(client)
                continue
            with self._lock:
                self._open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        with self._lock:
            self._up = False
            victims, self._open = self._open, set()
        for s in victims:
            self._reset(s)

    def restore(self) -> None:
        with self._lock:
            self._up = True

    def close(self) -> None:
        self.cut()
        self.sock.close()


def _pg_target() -> tuple[str, int]:
    m = re.match(r"postgresql://[^@]*@([^:/]+):(\d+)/", PG_SERVER_DSN)
    assert m, PG_SERVER_DSN
    return m.group(1), int(m.group(2))


async def _admin(sql: str, *args: object) -> object:
    conn = await asyncpg.connect(PG_SERVER_DSN, timeout=5)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


@dataclass
class Cluster:
    a: Node
    b: Node
    relay_a: PgRelay
    relay_b: PgRelay
    database: str

    def cut(self) -> None:
        self.relay_a.cut()
        self.relay_b.cut()

    def restore(self) -> None:
        self.relay_a.restore()
        self.relay_b.restore()


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    pg_dsn()  # fails (CI) or skips loudly when PostgreSQL is unreachable
    name = f"postfach_faults_{uuid.uuid4().hex[:10]}"
    run_sync(_admin(f'CREATE DATABASE "{name}"'))
    relays = [PgRelay(_pg_target()), PgRelay(_pg_target())]
    nodes: list[Node] = []
    try:
        dirs = [tmp_path / "a", tmp_path / "b"]
        for d, relay in zip(dirs, relays, strict=True):
            host, _ = _pg_target()
            _init(d, f"postgresql://postgres@{host}:{relay.port}/{name}")
        assert cli.main(["domain", "add", "example.org", "--data", str(dirs[0])]) == 0
        for user in (USER, WATCHER, READER):
            monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORD + "\n"))
            assert cli.main(["user", "add", user, "--password-stdin", "--data", str(dirs[0])]) == 0
        for d in dirs:
            nodes.append(_start(d))
        yield Cluster(nodes[0], nodes[1], relays[0], relays[1], name)
    finally:
        for n in reversed(nodes):
            _stop(n)
        for r in relays:
            r.close()
        run_sync(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# ------------------------------------------------------------------------------------- clients


def _imap(node: Node, user: str = USER) -> imaplib.IMAP4:
    c = imaplib.IMAP4("127.0.0.1", node.port("imap"), timeout=30)
    c.login(user, PASSWORD)  # loopback is a cleartext network in the dev config
    return c


def _message(tag: str, n: int) -> bytes:
    return (
        f"From: a@example.net\r\nTo: {USER}\r\nSubject: {tag} {n}\r\nMessage-ID: <{tag}.{n}@example.net>\r\n"
        f"Date: Fri, 27 Nov 2026 09:00:00 +0000\r\n\r\nbody {tag} {n} {uuid.uuid4().hex}\r\n"
    ).encode()


@dataclass
class Load:
    """What the load threads saw. ``acked``: writes answered OK/250 (must all be there later)."""

    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    appended: list[bytes] = field(default_factory=list)  # byte-exact (IMAP APPEND)
    delivered: list[bytes] = field(default_factory=list)  # stored with our trace headers on top
    ok: dict[str, int] = field(default_factory=dict)
    temp: dict[str, int] = field(default_factory=dict)
    last_ok: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def count(self, kind: str, what: str) -> None:
        with self.lock:
            table = self.ok if kind == "ok" else self.temp
            table[what] = table.get(what, 0) + 1
            if kind == "ok":
                self.last_ok[what] = time.monotonic()

    def fail(self, what: str, exc: BaseException) -> None:
        with self.lock:
            self.failures.append(f"{what}: {type(exc).__name__}: {exc}")


def _imap_appender(load: Load, node: Node, tag: str) -> None:
    c: imaplib.IMAP4 | None = None
    n = 0
    while not load.stop.is_set():
        n += 1
        try:
            if c is None:
                try:
                    c = _imap(node)
                except imaplib.IMAP4.error as e:
                    assert TEMP_IMAP in str(e), e
                    load.count("temp", tag)
                    time.sleep(0.2)
                    continue
            msg = _message(tag, n)
            typ, data = c.append("INBOX", "", "", msg)
            if typ == "OK":
                with load.lock:
                    load.appended.append(msg)
                load.count("ok", tag)
            else:
                assert typ == "NO" and TEMP_IMAP.encode() in data[0], (typ, data)
                load.count("temp", tag)
                time.sleep(0.1)
        except BaseException as e:  # a crash, a hang (timeout) or a wrong answer
            load.fail(tag, e)
            c = None
            time.sleep(0.5)
    if c is not None:
        with contextlib.suppress(Exception):
            c.logout()


def _smtp_sender(load: Load, node: Node, tag: str) -> None:
    n = 0
    while not load.stop.is_set():
        n += 1
        msg = _message(tag, n)
        try:
            with smtplib.SMTP("127.0.0.1", node.port("mx"), timeout=30) as s:
                s.sendmail("sender@example.net", [USER], msg)
            with load.lock:
                load.delivered.append(msg)
            load.count("ok", tag)
        except smtplib.SMTPRecipientsRefused as e:
            code, text = next(iter(e.recipients.values()))
            assert (code, text[:5]) == (451, b"4.3.0"), e
            load.count("temp", tag)
            time.sleep(0.1)
        except (smtplib.SMTPDataError, smtplib.SMTPSenderRefused) as e:
            assert (e.smtp_code, e.smtp_error[:5]) == (451, b"4.3.0"), e
            load.count("temp", tag)
            time.sleep(0.1)
        except BaseException as e:
            load.fail(tag, e)
            time.sleep(0.5)


def _pop3_reader(load: Load, node: Node, tag: str) -> None:
    while not load.stop.is_set():
        try:
            p = poplib.POP3("127.0.0.1", node.port("pop3"), timeout=30)
            try:
                p.user(READER)
                p.pass_(PASSWORD)
                count = p.stat()[0]
                if count:
                    p.retr(count)
                p.quit()
                load.count("ok", tag)
            except poplib.error_proto as e:
                # the maildrop lock is the node's database session: after a cut it may take a
                # moment until PostgreSQL has ended the old one (IN-USE), never longer
                assert TEMP_POP3.encode() in e.args[0] or b"[IN-USE]" in e.args[0], e
                load.count("temp", tag)
                with contextlib.suppress(Exception):
                    p.quit()
                time.sleep(0.1)
        except BaseException as e:
            load.fail(tag, e)
            time.sleep(0.5)


# ----------------------------------------------------------------------------- during the outage


def _expect_imap_temp(fn: object, *args: object) -> None:
    try:
        typ, data = fn(*args)  # type: ignore[operator]
    except imaplib.IMAP4.error as e:  # imaplib raises for a NO on LOGIN
        assert TEMP_IMAP in str(e), e
        return
    assert typ == "NO" and TEMP_IMAP.encode() in data[0], (typ, data)


def _probe_outage(cluster: Cluster, selected: imaplib.IMAP4) -> None:
    """Every kind of store call a session makes, while the database is unreachable."""
    a, b = cluster.a, cluster.b
    _expect_imap_temp(selected.fetch, "1", "(BODY.PEEK[])")
    _expect_imap_temp(selected.select, "INBOX")
    _expect_imap_temp(selected.append, "INBOX", "", "", _message("outage", 1))
    fresh = imaplib.IMAP4("127.0.0.1", a.port("imap"), timeout=30)
    _expect_imap_temp(fresh.login, USER, PASSWORD)
    _expect_imap_temp(fresh.authenticate, "PLAIN", lambda _: f"\0{USER}\0{PASSWORD}".encode())
    fresh.logout()

    with smtplib.SMTP("127.0.0.1", a.port("submission"), timeout=30) as s:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            s.login(USER, PASSWORD)  # loopback may authenticate without TLS in the dev config
        assert (refused.value.smtp_code, refused.value.smtp_error[:5]) == (451, b"4.3.0"), refused.value

    p = poplib.POP3("127.0.0.1", b.port("pop3"), timeout=30)
    p.user(USER)
    with pytest.raises(poplib.error_proto, match=re.escape(TEMP_POP3)):
        p.pass_(PASSWORD)
    p.quit()

    with smtplib.SMTP("127.0.0.1", b.port("mx"), timeout=30) as s:
        s.ehlo()
        assert s.mail("sender@example.net")[0] == 250
        code, text = s.rcpt(USER)
        assert (code, text[:5]) == (451, b"4.3.0"), (code, text)
        s.rset()


# ------------------------------------------------------------------------------------- the test


def _wait_for(what: str, cond: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _read_idle(c: imaplib.IMAP4, want: bytes, timeout: float = 60) -> None:
    assert c.sock is not None
    c.sock.settimeout(timeout)
    while True:
        line = c.readline()
        assert line, "IDLE connection closed"
        if line.strip() == want:
            return


def test_postgres_outage_under_load(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    load = Load()
    # one message to read from the start (POP3 RETR, IMAP FETCH in the probes)
    with smtplib.SMTP("127.0.0.1", a.port("mx"), timeout=30) as s:
        first = _message("first", 0)
        s.sendmail("sender@example.net", [USER, READER], first)
        load.delivered.append(first)
    plan = [
        (_imap_appender, a, "append-a"),
        (_imap_appender, b, "append-b"),
        (_smtp_sender, b, "smtp-b"),
        (_smtp_sender, a, "smtp-a"),
        (_pop3_reader, a, "pop3-a"),
    ]
    workers = [threading.Thread(target=fn, args=(load, node, t), daemon=True) for fn, node, t in plan]
    tags = [t for _fn, _node, t in plan]
    selected = _imap(a)
    assert selected.select("INBOX")[0] == "OK"
    pop = poplib.POP3("127.0.0.1", b.port("pop3"), timeout=30)  # a POP3 session across the outage
    pop.user(USER)
    pop.pass_(PASSWORD)
    for w in workers:
        w.start()
    _wait_for("the load to get going", lambda: all(load.ok.get(t) for t in tags))

    # 1. the database goes away for both nodes
    cluster.cut()
    cut_at = time.monotonic()
    _probe_outage(cluster, selected)
    for cmd in (lambda: pop.retr(1), lambda: pop.top(1, 0)):
        with pytest.raises(poplib.error_proto, match=re.escape(TEMP_POP3)):
            cmd()
    time.sleep(max(0.0, 3 - (time.monotonic() - cut_at)))
    assert all(load.temp.get(t) for t in tags if not t.startswith("pop3")), load.temp
    cluster.restore()
    restored = time.monotonic()
    _wait_for("every client to be served again", lambda: all(load.last_ok.get(t, 0) > restored for t in tags))
    assert selected.select("INBOX")[0] == "OK"  # the same sessions go on
    assert pop.retr(1)[0].startswith(b"+OK")
    pop.quit()

    # 2. every backend of the database killed (pg_terminate_backend), under load
    killed = run_sync(
        _admin(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            cluster.database,
        )
    )
    assert isinstance(killed, int) and killed >= 2  # at least both nodes' control connections
    killed_at = time.monotonic()
    _wait_for("service after pg_terminate_backend", lambda: all(load.last_ok.get(t, 0) > killed_at for t in tags))

    # 3. A alone is cut off while B delivers: A's IDLE client hears of it after A reconnects
    watcher = _imap(a, WATCHER)
    assert watcher.select("INBOX") == ("OK", [b"0"])
    tag = watcher._new_tag().decode()
    watcher.send(f"{tag} IDLE\r\n".encode())
    assert watcher.readline().startswith(b"+")
    cluster.relay_a.cut()
    time.sleep(0.5)
    with smtplib.SMTP("127.0.0.1", b.port("mx"), timeout=30) as s:
        s.sendmail("sender@example.net", [WATCHER], _message("while-a-was-away", 1))
    time.sleep(0.5)
    cluster.relay_a.restore()
    _read_idle(watcher, b"* 1 EXISTS")  # the NOTIFY was lost; the re-sync after the reconnect is not
    with smtplib.SMTP("127.0.0.1", b.port("mx"), timeout=30) as s:
        s.sendmail("sender@example.net", [WATCHER], _message("after", 2))
    _read_idle(watcher, b"* 2 EXISTS")  # and LISTEN works again
    watcher.send(b"DONE\r\n")
    while not (ln := watcher.readline()).startswith(tag.encode()):
        pass
    assert b"OK" in ln
    watcher.logout()

    load.stop.set()
    for w in workers:
        w.join(60)
        assert not w.is_alive(), "a client hung"
    assert not load.failures, load.failures
    with contextlib.suppress(Exception):
        selected.logout()

    # 4. nothing acknowledged is lost: every APPEND byte for byte, every delivery under its headers
    c = _imap(b)
    try:
        typ, _ = c.select("INBOX", readonly=True)
        assert typ == "OK"
        typ, msgs = c.fetch("1:*", "(BODY.PEEK[])")
        assert typ == "OK"
        stored = [m[1] for m in msgs if isinstance(m, tuple)]
    finally:
        c.logout()
    hashes = {hashlib.sha256(m).hexdigest() for m in stored}
    missing = [m[:120] for m in load.appended if hashlib.sha256(m).hexdigest() not in hashes]
    assert not missing, missing
    by_id = {}
    for m in stored:
        found = re.search(rb"^Message-ID: (<[^>]+>)", m, re.M | re.I)
        if found:
            by_id.setdefault(found.group(1), []).append(m)
    for msg in load.delivered:
        mid = re.search(rb"^Message-ID: (<[^>]+>)", msg, re.M).group(1)  # type: ignore[union-attr]
        assert any(s.endswith(msg) for s in by_id.get(mid, [])), mid
    assert len(load.appended) >= 10 and len(load.delivered) >= 10, (load.ok, load.temp)

    # 5. both nodes ran through it: no restart, no unexpected error logged
    for node in (a, b):
        assert node.proc.poll() is None
        out = node.output
        bad = [i for i, ln in enumerate(out) if "unexpected error" in ln or "internal error" in ln or "Traceback" in ln]
        assert not bad, "\n".join("\n".join(out[i - 3 : i + 1] + out[i + 20 : i + 40]) for i in bad[:3])
