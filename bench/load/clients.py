"""Blocking protocol clients over real TLS (smtplib, imaplib, poplib) and a ledger of what the
server acknowledged, for the crash test, the disk-full test and the soak run.

Every message carries a unique tag (``X-Load-Tag`` header and ``Message-ID``) and ends with a
line naming the tag again, so that a truncated or mixed-up message is recognised: the verifier
holds the exact bytes of every message it ever tried to send.

Ledger rules (ARCHITECTURE.md invariant 1, "durable before acknowledged"):

* a write is recorded as *acknowledged* only after ``250`` / ``OK`` / ``+OK`` was read;
* a write whose answer never came (the server died in between) is *in flight*: after a restart
  it may be there or not, but if it is there it is whole;
* nothing else may ever appear.
"""

from __future__ import annotations

import contextlib
import hashlib
import imaplib
import poplib
import random
import re
import smtplib
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

TAG_HEADER = "X-Load-Tag"
_TAG_RE = re.compile(rb"^X-Load-Tag: (\S+)\r?$", re.M | re.I)
_APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]")

#: What a dead or dying server looks like to the stdlib clients.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # ConnectionError, ssl.SSLError, socket.timeout
    EOFError,
    imaplib.IMAP4.abort,
    smtplib.SMTPServerDisconnected,
    poplib.error_proto,
)


T = TypeVar("T")

#: The server's TLS handshake timeout in the configs ServerProcess writes, and ours for connecting.
CONNECT_TIMEOUT = 15.0


def connect(make: Callable[[], T], attempts: int = 4) -> T:
    """Open a connection, retrying a TLS handshake that the server dropped (a server busy past its
    handshake timeout; once a real bug, see tests/reliability/test_tls_race.py). A refused
    connection (server down) is not retried."""
    last: BaseException | None = None
    for _ in range(attempts):
        try:
            return make()
        except (ssl.SSLError, TimeoutError, ConnectionResetError) as e:
            last = e
            time.sleep(0.2)
    assert last is not None
    raise last


def client_context(cafile: Path) -> ssl.SSLContext:
    """Verify the server's certificate (DNS name localhost) as a mail client does."""
    return ssl.create_default_context(cafile=str(cafile))


def make_message(tag: str, sender: str, rcpt: str, rng: random.Random, *, min_kib: int = 1, max_kib: int = 48) -> bytes:
    """A CRLF message with no line starting with '.', so that SMTP sends it byte for byte."""
    size = rng.randint(min_kib * 1024, max_kib * 1024)
    line = hashlib.sha256(tag.encode()).hexdigest() + "\r\n"  # 66 bytes
    body = line * max(1, size // len(line))
    return (
        f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: load {tag}\r\n"
        f"Message-ID: <{tag}@load.example>\r\n{TAG_HEADER}: {tag}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        f"{body}END {tag}\r\n"
    ).encode()


def tag_of(data: bytes) -> str | None:
    head = data.split(b"\r\n\r\n", 1)[0]
    m = _TAG_RE.search(head)
    return m.group(1).decode() if m else None


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Ledger:
    """What was attempted and what the server acknowledged. Thread-safe."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: dict[str, tuple[int, str]] = field(default_factory=dict)  # tag -> (size, sha256) of what we sent
    rcpt: dict[str, str] = field(default_factory=dict)  # tag -> account it was addressed to
    via: dict[str, str] = field(default_factory=dict)  # tag -> "smtp" | "append"
    acked: set[str] = field(default_factory=set)  # tags whose delivery/APPEND was acknowledged
    uid_of: dict[str, int] = field(default_factory=dict)  # APPEND tag -> APPENDUID uid
    # account -> APPENDed tags with a UID, not (yet) known removed, in order: what an IMAP worker
    # picks from. Kept as it goes, so that picking costs the mailbox's size, not the whole run's
    # (a scan of every tag ever sent made the soak's clients slow down as the ledger grew).
    appended: dict[str, dict[str, None]] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)  # acknowledged EXPUNGE / POP3 DELE+QUIT
    maybe_removed: set[str] = field(default_factory=set)  # removal in flight when the server died
    flagged: set[str] = field(default_factory=set)  # acknowledged STORE +FLAGS (\Flagged)
    deleted_flag: dict[str, set[str]] = field(default_factory=dict)  # account -> tags with acked \Deleted
    maybe_deleted_flag: dict[str, set[str]] = field(default_factory=dict)
    uidvalidity: dict[str, int] = field(default_factory=dict)  # account INBOX -> first seen
    max_uid: dict[str, int] = field(default_factory=dict)  # account INBOX -> highest uid seen
    uid_regressions: list[str] = field(default_factory=list)
    temp_failures: int = 0  # 4xx / NO answers (disk full)
    errors: list[str] = field(default_factory=list)  # protocol answers that should not happen
    counts: dict[str, int] = field(default_factory=dict)  # acknowledged writes per kind

    def attempt(self, tag: str, data: bytes, rcpt: str, via: str) -> None:
        with self.lock:
            self.sent[tag] = (len(data), digest(data))
            self.rcpt[tag] = rcpt
            self.via[tag] = via

    def is_whole(self, tag: str, data: bytes, *, exact: bool) -> bool:
        """``data`` is what we sent for ``tag`` (exact), or ends with it (SMTP trace headers first)."""
        size, want = self.sent[tag]
        if exact and len(data) != size:
            return False
        return len(data) >= size and digest(data[len(data) - size :]) == want

    def ack(self, kind: str, tag: str | None = None) -> None:
        with self.lock:
            if tag is not None:
                self.acked.add(tag)
            self.counts[kind] = self.counts.get(kind, 0) + 1

    def saw_uid(self, account: str, uidvalidity: int, uid: int) -> None:
        with self.lock:
            first = self.uidvalidity.setdefault(account, uidvalidity)
            if first != uidvalidity:
                self.uid_regressions.append(f"{account}: UIDVALIDITY changed {first} -> {uidvalidity}")
            if uid <= self.max_uid.get(account, 0):
                self.uid_regressions.append(f"{account}: new UID {uid} not above {self.max_uid[account]}")
            self.max_uid[account] = max(uid, self.max_uid.get(account, 0))

    def total_acked(self) -> int:
        with self.lock:
            return sum(self.counts.values())


# ------------------------------------------------------------------------------------------- workers


@dataclass
class Target:
    """Where the server listens now (ports change at every restart)."""

    host: str
    ports: dict[tuple[str, str], int]
    cafile: Path
    password: str
    timeout: float = 30.0

    def ctx(self) -> ssl.SSLContext:
        return client_context(self.cafile)


class Worker(threading.Thread):
    """One client loop; stops at ``stop`` or at the first connection error (the server died)."""

    def __init__(self, name: str, target: Target, ledger: Ledger, stop: threading.Event, seed: int) -> None:
        super().__init__(name=name, daemon=True)
        self.target = target
        self.ledger = ledger
        self.stop_event = stop
        self.rng = random.Random(seed)
        self.failure: BaseException | None = None
        self.died = False  # saw the connection break
        self.died_with: str | None = None

    def run(self) -> None:
        try:
            self.loop()
        except CONNECTION_ERRORS as e:
            self.died = True
            self.died_with = f"{type(e).__name__}: {e}"
        except BaseException as e:  # reported by the test
            self.failure = e

    def loop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def tag(self, n: int) -> str:
        return f"{self.name}-{n}-{self.rng.getrandbits(32):08x}"


class SmtpWorker(Worker):
    """Submission over implicit TLS with AUTH: each message to one of ``rcpts``."""

    def __init__(self, name: str, target: Target, ledger: Ledger, stop: threading.Event, seed: int,
                 sender: str, rcpts: list[str], max_kib: int = 48) -> None:
        super().__init__(name, target, ledger, stop, seed)
        self.sender = sender
        self.rcpts = rcpts
        self.max_kib = max_kib

    def loop(self) -> None:
        t = self.target
        port = t.ports[("submission", "implicit")]
        smtp = connect(lambda: smtplib.SMTP_SSL(t.host, port, context=t.ctx(), timeout=CONNECT_TIMEOUT))
        assert smtp.sock is not None
        smtp.sock.settimeout(t.timeout)
        with smtp:
            smtp.login(self.sender, t.password)
            n = 0
            while not self.stop_event.is_set():
                n += 1
                tag = self.tag(n)
                rcpt = self.rng.choice(self.rcpts)
                data = make_message(tag, self.sender, rcpt, self.rng, max_kib=self.max_kib)
                self.ledger.attempt(tag, data, rcpt, "smtp")
                try:
                    smtp.sendmail(self.sender, [rcpt], data)
                except smtplib.SMTPResponseException as e:
                    if 400 <= e.smtp_code < 500:
                        with self.ledger.lock:
                            self.ledger.temp_failures += 1
                        time.sleep(0.05)
                        smtp.rset()
                        continue
                    raise
                except smtplib.SMTPRecipientsRefused as e:
                    codes = [c for c, _m in e.recipients.values()]
                    if all(400 <= c < 500 for c in codes):
                        with self.ledger.lock:
                            self.ledger.temp_failures += 1
                        time.sleep(0.05)
                        smtp.rset()
                        continue
                    raise
                self.ledger.ack("smtp", tag)


def imap_connect(t: Target, timeout: float | None = None) -> imaplib.IMAP4_SSL:
    port = t.ports[("imap", "implicit")]
    imap = connect(lambda: imaplib.IMAP4_SSL(t.host, port, ssl_context=t.ctx(), timeout=CONNECT_TIMEOUT))
    imap.sock.settimeout(timeout or t.timeout)
    return imap


def _ok(typ: str, data: Sequence[object], what: str) -> None:
    if typ != "OK":
        raise AssertionError(f"IMAP {what}: {typ} {data!r}")


class ImapWorker(Worker):
    """One account's INBOX: APPEND, STORE +FLAGS (\\Flagged or \\Deleted) and EXPUNGE, with the
    acknowledged results in the ledger. Only this worker touches the account, so the expected
    state is exact."""

    def __init__(self, name: str, target: Target, ledger: Ledger, stop: threading.Event, seed: int,
                 account: str, max_kib: int = 32, max_messages: int | None = None) -> None:
        super().__init__(name, target, ledger, stop, seed)
        self.account = account
        self.max_kib = max_kib
        self.max_messages = max_messages  # steady state (soak): delete rather than append above this

    def loop(self) -> None:
        t = self.target
        led = self.ledger
        imap = imap_connect(t)
        try:
            _ok(*imap.login(self.account, t.password), "LOGIN")
            typ, _ = imap.select("INBOX")
            _ok(typ, _, "SELECT")
            n = 0
            while not self.stop_event.is_set():
                n += 1
                op = self.rng.random()
                with led.lock:
                    mine = [tg for tg in led.appended.get(self.account, {})
                            if tg not in led.removed and tg not in led.maybe_removed]
                if self.max_messages is not None and len(mine) > self.max_messages:
                    op = 0.8 if self.rng.random() < 0.6 else 0.95  # \Deleted or EXPUNGE
                if op < 0.55 or len(mine) < 3:
                    self.append(imap, n)
                elif op < 0.75:
                    self.store(imap, self.rng.choice(mine), "\\Flagged")
                elif op < 0.9:
                    self.store(imap, self.rng.choice(mine), "\\Deleted")
                else:
                    self.expunge(imap)
        finally:
            with contextlib.suppress(Exception):  # the connection may be dead already
                imap.shutdown()

    def append(self, imap: imaplib.IMAP4, n: int) -> None:
        led = self.ledger
        tag = self.tag(n)
        data = make_message(tag, "appender@example.org", self.account, self.rng, max_kib=self.max_kib)
        led.attempt(tag, data, self.account, "append")
        typ, resp = imap.append("INBOX", None, None, data)
        if typ == "NO":
            with led.lock:
                led.temp_failures += 1
            time.sleep(0.05)
            return
        _ok(typ, resp, "APPEND")
        m = _APPENDUID.search(resp[0] if resp and isinstance(resp[0], bytes) else b"")
        if m is None:
            raise AssertionError(f"APPEND without APPENDUID: {resp!r}")
        uidvalidity, uid = int(m.group(1)), int(m.group(2))
        led.saw_uid(self.account, uidvalidity, uid)
        with led.lock:
            led.uid_of[tag] = uid
            led.appended.setdefault(self.account, {})[tag] = None
        led.ack("append", tag)

    def store(self, imap: imaplib.IMAP4, tag: str, flag: str) -> None:
        led = self.ledger
        uid = led.uid_of[tag]
        if flag == "\\Deleted":
            with led.lock:
                led.maybe_deleted_flag.setdefault(self.account, set()).add(tag)
        typ, resp = imap.uid("STORE", str(uid), "+FLAGS.SILENT", f"({flag})")
        if typ == "NO":
            with led.lock:
                led.temp_failures += 1
                led.maybe_deleted_flag.get(self.account, set()).discard(tag)
            return
        _ok(typ, resp, "STORE")
        with led.lock:
            if flag == "\\Flagged":
                led.flagged.add(tag)
            else:
                led.deleted_flag.setdefault(self.account, set()).add(tag)
                led.maybe_deleted_flag.get(self.account, set()).discard(tag)
        led.ack("store")

    def expunge(self, imap: imaplib.IMAP4) -> None:
        led = self.ledger
        with led.lock:
            going = set(led.deleted_flag.get(self.account, set()))
            maybe = set(led.maybe_deleted_flag.get(self.account, set()))
            led.maybe_removed |= going | maybe  # if the answer never comes, they may be gone or not
        typ, resp = imap.expunge()
        if typ == "NO":
            with led.lock:
                led.temp_failures += 1
            return
        _ok(typ, resp, "EXPUNGE")
        with led.lock:
            led.removed |= going  # every message with an acknowledged \Deleted is gone now
            mine = led.appended.get(self.account, {})
            for tag in going:
                mine.pop(tag, None)
            led.maybe_removed -= going
            led.deleted_flag[self.account] = set()
            led.maybe_deleted_flag[self.account] = set()
        led.ack("expunge")


class Pop3Worker(Worker):
    """Download-and-delete, as a POP3 client does: RETR a few, DELE them, QUIT (+OK = removed)."""

    def __init__(self, name: str, target: Target, ledger: Ledger, stop: threading.Event, seed: int,
                 account: str, batch: int = 3, skip: float = 0.5) -> None:
        super().__init__(name, target, ledger, stop, seed)
        self.account = account
        self.batch = batch  # messages looked at per session
        self.skip = skip  # chance to leave one on the server

    def loop(self) -> None:
        t = self.target
        led = self.ledger
        while not self.stop_event.is_set():
            pop = connect(lambda: poplib.POP3_SSL(t.host, t.ports[("pop3", "implicit")], context=t.ctx(),
                                                  timeout=CONNECT_TIMEOUT))
            pop.sock.settimeout(t.timeout)
            tags: list[str] = []
            try:
                pop.user(self.account)
                pop.pass_(t.password)
                count, _size = pop.stat()
                for i in range(1, min(count, self.batch) + 1):
                    if self.rng.random() < self.skip:
                        continue
                    _resp, lines, _octets = pop.retr(i)
                    data = b"\r\n".join(lines) + b"\r\n"
                    tag = tag_of(data)
                    if tag is None or tag not in led.sent:
                        led.errors.append(f"POP3 RETR {i} of {self.account}: unknown message {data[:200]!r}")
                        continue
                    if not led.is_whole(tag, data, exact=False):
                        led.errors.append(f"POP3 RETR of {tag}: bytes differ from what was sent")
                    pop.dele(i)
                    tags.append(tag)
                with led.lock:
                    led.maybe_removed.update(tags)
                pop.quit()  # RFC 1939 §6: the UPDATE state removes them; +OK only after that
            except poplib.error_proto as e:
                if "[SYS/TEMP]" in str(e) or "[IN-USE]" in str(e):
                    with led.lock:
                        led.temp_failures += 1
                    pop.close()
                    time.sleep(0.1)
                    continue
                raise
            with led.lock:
                led.removed.update(tags)
                led.maybe_removed.difference_update(tags)
            if tags:
                led.ack("pop3-dele")
            time.sleep(0.05)


def run_workers(workers: list[Worker], until: Callable[[], bool], timeout: float) -> None:
    """Start the workers and return once ``until()`` is true or the time is up."""
    for w in workers:
        w.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until():
        if all(not w.is_alive() for w in workers):
            break
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------- verifying


@dataclass
class Mailbox:
    uidvalidity: int
    uidnext: int
    messages: dict[int, tuple[frozenset[str], bytes]]  # uid -> (flags, bytes)


_FETCH_HEAD = re.compile(rb"UID (\d+)|FLAGS \(([^)]*)\)")


def read_inbox(target: Target, account: str) -> Mailbox:
    """Every message of an INBOX over IMAP: UID, FLAGS and BODY.PEEK[] (changes nothing)."""
    imap = imap_connect(target, timeout=120)
    try:
        _ok(*imap.login(account, target.password), "LOGIN")
        typ, _ = imap.select("INBOX", readonly=True)
        _ok(typ, _, "EXAMINE")
        uidvalidity = int(bytes(imap.untagged_responses.get("UIDVALIDITY", [b"0"])[-1]))  # type: ignore[arg-type]
        uidnext = int(bytes(imap.untagged_responses.get("UIDNEXT", [b"0"])[-1]))  # type: ignore[arg-type]
        msgs: dict[int, tuple[frozenset[str], bytes]] = {}
        typ, data = imap.uid("FETCH", "1:*", "(UID FLAGS BODY.PEEK[])")
        _ok(typ, data, "FETCH")
        for item in data:
            if not isinstance(item, tuple):
                continue
            head, body = item
            uid = flags = None
            for m in _FETCH_HEAD.finditer(head):
                if m.group(1):
                    uid = int(m.group(1))
                else:
                    flags = frozenset(m.group(2).decode().split())
            if uid is None:
                continue
            msgs[uid] = (flags or frozenset(), bytes(body))
        # Flags may come after the literal: a second pass without bodies makes them exact.
        typ, data = imap.uid("FETCH", "1:*", "(UID FLAGS)")
        _ok(typ, data, "FETCH FLAGS")
        for item in data:
            if not isinstance(item, bytes):
                continue
            uid = flags = None
            for m in _FETCH_HEAD.finditer(item):
                if m.group(1):
                    uid = int(m.group(1))
                else:
                    flags = frozenset(m.group(2).decode().split())
            if uid is not None and uid in msgs:
                msgs[uid] = (flags or frozenset(), msgs[uid][1])
        imap.logout()
        return Mailbox(uidvalidity, uidnext, msgs)
    finally:
        with contextlib.suppress(Exception):  # logged out already
            imap.shutdown()


def verify(ledger: Ledger, boxes: dict[str, Mailbox]) -> list[str]:
    """Every rule of the module docstring; returns the violations (empty: all good)."""
    problems: list[str] = list(ledger.errors) + list(ledger.uid_regressions)
    seen: dict[str, tuple[str, int]] = {}
    for account, box in boxes.items():
        first = ledger.uidvalidity.setdefault(account, box.uidvalidity)
        if first != box.uidvalidity:
            problems.append(f"{account}: UIDVALIDITY changed {first} -> {box.uidvalidity}")
        top = max(box.messages, default=0)
        if box.uidnext <= max(top, ledger.max_uid.get(account, 0)):
            problems.append(f"{account}: UIDNEXT {box.uidnext} went backwards (highest UID seen "
                            f"{max(top, ledger.max_uid.get(account, 0))})")
        ledger.max_uid[account] = max(top, ledger.max_uid.get(account, 0))
        for uid, (flags, data) in box.messages.items():
            tag = tag_of(data)
            if tag is None or tag not in ledger.sent:
                problems.append(f"{account} UID {uid}: a message nobody sent ({len(data)} bytes): {data[:120]!r}")
                continue
            if tag in seen:
                problems.append(f"{tag} stored twice: {seen[tag]} and {(account, uid)}")
            seen[tag] = (account, uid)
            size = ledger.sent[tag][0]
            if ledger.rcpt[tag] != account:
                problems.append(f"{tag} in {account}, sent to {ledger.rcpt[tag]}")
            if ledger.via[tag] == "append":
                if not ledger.is_whole(tag, data, exact=True):
                    problems.append(f"{tag} (APPEND) not byte-exact: {len(data)} bytes, sent {size}")
                want = ledger.uid_of.get(tag)
                if want is not None and want != uid:
                    problems.append(f"{tag}: APPENDUID said {want}, now UID {uid}")
            else:
                # SMTP prepends trace headers (Received, Return-Path, Delivered-To) and nothing else
                if not ledger.is_whole(tag, data, exact=False):
                    problems.append(f"{tag} (SMTP) truncated or altered: {len(data)} bytes, sent {size}")
                elif b"\r\n\r\n" in data[: len(data) - size]:
                    problems.append(f"{tag} (SMTP) has more than trace headers before the message")
            if tag in ledger.removed:
                problems.append(f"{tag} is back after an acknowledged EXPUNGE/DELE")
            if tag in ledger.flagged and "\\Flagged" not in flags:
                problems.append(f"{tag}: acknowledged \\Flagged is lost (flags {sorted(flags)})")
            if tag in ledger.deleted_flag.get(account, set()) and "\\Deleted" not in flags:
                problems.append(f"{tag}: acknowledged \\Deleted is lost (flags {sorted(flags)})")
    for tag in ledger.acked:
        if tag not in seen and tag not in ledger.removed and tag not in ledger.maybe_removed:
            problems.append(f"{tag} ({ledger.via[tag]} to {ledger.rcpt[tag]}) was acknowledged and is missing")
    return problems


def forget_lost(ledger: Ledger, boxes: dict[str, Mailbox]) -> None:
    """After a verified restart, settle what was in flight: removals that did not happen are undone
    and APPENDs that were not acknowledged but landed get their UID (so the next round may use them)."""
    present: dict[str, int] = {}
    for box in boxes.values():
        for uid, (_flags, data) in box.messages.items():
            tag = tag_of(data)
            if tag is not None:
                present[tag] = uid
    with ledger.lock:
        for tag in list(ledger.maybe_removed):
            if tag in present:
                ledger.maybe_removed.discard(tag)
            else:
                ledger.removed.add(tag)
                ledger.maybe_removed.discard(tag)
                ledger.appended.get(ledger.rcpt.get(tag, ""), {}).pop(tag, None)
        for tag, uid in present.items():
            if ledger.via.get(tag) == "append" and tag not in ledger.uid_of:
                ledger.uid_of[tag] = uid
                ledger.appended.setdefault(ledger.rcpt[tag], {})[tag] = None
        # a \Deleted STORE in flight: settle from what the server has now
        for account, box in boxes.items():
            flagged = {tag_of(d) for _u, (f, d) in box.messages.items() if "\\Deleted" in f}
            ledger.deleted_flag[account] = {t for t in flagged if t is not None}
            ledger.maybe_deleted_flag[account] = set()
