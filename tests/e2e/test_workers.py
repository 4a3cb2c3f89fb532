"""`postfach serve --workers 2`: a supervisor and two worker processes on loopback, one store.

One server for the module (starting one costs seconds): connections land on both workers, IDLE in
one worker hears of APPEND and SMTP deliveries through the other, concurrent APPENDs get distinct
UIDs, the POP3 maildrop lock holds across workers, a SIGKILLed worker is restarted while the other
keeps serving, and SIGTERM drains. Which worker has a connection is read from the log
(``[w1:imap3] connect ... from 127.0.0.1:<client port>``).
"""

from __future__ import annotations

import base64
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench.load.server import ServerProcess
from tests import backends

PASSWORD = "workers-pass-1"
ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.org"
CAP = 16  # max_connections_per_ip
_CONNECT = re.compile(r"\[(w\d+):\w+\] connect \w+ .* from 127\.0\.0\.1:(\d+)")


class Line:
    """A plain-text line client (the starttls listeners; loopback may log in without TLS)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = b""
        self.greeting = self.line()

    @property
    def local_port(self) -> int:
        return int(self.sock.getsockname()[1])

    def line(self, timeout: float = 20) -> bytes:
        self.sock.settimeout(timeout)
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        out, _, self.buf = self.buf.partition(b"\r\n")
        return out

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def until(self, prefix: bytes, timeout: float = 20) -> list[bytes]:
        lines = []
        while True:
            ln = self.line(timeout)
            lines.append(ln)
            if ln.startswith(prefix):
                return lines

    def close(self) -> None:
        self.sock.close()


def imap_login(port: int, user: str = ALICE) -> Line:
    c = Line(port)
    assert c.greeting.startswith(b"* OK"), c.greeting
    c.send(f"l LOGIN {user} {PASSWORD}\r\n".encode())
    assert c.until(b"l ")[-1].startswith(b"l OK")
    return c


def worker_of(server: ServerProcess, local_port: int, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for m in _CONNECT.finditer(server.log_text()):
            if int(m.group(2)) == local_port:
                return m.group(1)
        time.sleep(0.05)
    raise AssertionError(f"no connect line for client port {local_port}")


def one_per_worker(server: ServerProcess, make: type[Line] | object, port: int, tries: int = 20) -> dict[str, Line]:
    """Open connections until each worker has one; close the spares."""
    got: dict[str, Line] = {}
    spare: list[Line] = []
    for _ in range(tries):
        c = make(port)  # type: ignore[operator]
        w = worker_of(server, c.local_port)
        if w in got:
            spare.append(c)
        else:
            got[w] = c
        if len(got) == 2:
            break
    for c in spare:
        c.close()
    assert set(got) == {"w0", "w1"}, f"connections landed only on {sorted(got)}"
    return got


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("workers")
    s = ServerProcess(root / "data", workers=2, limits={"max_connections_per_ip": CAP},
                      init_args=backends.init_args(root / "data"))
    s.init()
    # One more IMAP listener behind a (pretend) load balancer: PROXY header, then TLS.
    with open(s.data / "postfach.toml", "a", encoding="utf-8") as f:
        f.write('\n[[listener]]\nprotocol = "imap"\naddress = "127.0.0.1"\nport = 0\ntls = "implicit"\n'
                'proxy_protocol = true\n\n[proxy]\ntrusted_networks = ["127.0.0.0/8"]\n')
    s.provision([ALICE, BOB, CAROL], PASSWORD)
    s.start()
    try:
        yield s
    finally:
        s.stop(30)


def test_max_connections_per_ip_counts_over_all_workers(server: ServerProcess) -> None:
    port = server.port("imap", "starttls")
    held = [Line(port) for _ in range(CAP)]
    try:
        assert all(c.greeting.startswith(b"* OK") for c in held)
        assert {worker_of(server, c.local_port) for c in held} == {"w0", "w1"}
        over = Line(port)
        assert over.greeting.startswith(b"* BYE [UNAVAILABLE]"), over.greeting
        over.close()
    finally:
        for c in held:
            c.close()
    deadline = time.monotonic() + 10
    while True:  # the workers report the closes; then there is room again
        c = Line(port)
        ok = c.greeting.startswith(b"* OK")
        c.close()
        if ok:
            break
        assert time.monotonic() < deadline, "connections never released"
        time.sleep(0.1)


def test_connections_land_on_both_workers(server: ServerProcess) -> None:
    clients = [imap_login(server.port("imap", "starttls")) for _ in range(8)]
    try:
        workers = [worker_of(server, c.local_port) for c in clients]
        # handed to the worker with the fewest connections: an even split
        assert sorted(workers).count("w0") == 4 and workers.count("w1") == 4, workers
    finally:
        for c in clients:
            c.close()


def _idle(c: Line) -> None:
    c.send(b"s SELECT INBOX\r\n")
    c.until(b"s OK")
    c.send(b"i IDLE\r\n")
    assert c.line().startswith(b"+ ")


def _exists_within(c: Line, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "no EXISTS in time"
        ln = c.line(timeout=left)
        m = re.match(rb"\* (\d+) EXISTS", ln)
        if m:
            return int(m.group(1))


def _append(c: Line, text: bytes, tag: bytes = b"a") -> int:
    c.send(tag + b" APPEND INBOX {%d+}\r\n" % len(text) + text + b"\r\n")
    last = c.until(tag + b" ")[-1]
    m = re.search(rb"APPENDUID \d+ (\d+)", last)
    assert last.startswith(tag + b" OK") and m, last
    return int(m.group(1))


def test_idle_in_each_worker_sees_append_and_smtp_through_the_other(server: ServerProcess) -> None:
    port = server.port("imap", "starttls")
    idlers = one_per_worker(server, imap_login, port)
    writers = one_per_worker(server, imap_login, port)
    try:
        for c in idlers.values():
            _idle(c)
        # an APPEND through worker 1 reaches the IDLE in worker 0 (and the one in worker 1)
        _append(writers["w1"], b"Subject: via w1\r\n\r\nhello\r\n")
        counts = {w: _exists_within(c, 1.0) for w, c in idlers.items()}
        _append(writers["w0"], b"Subject: via w0\r\n\r\nhello\r\n")
        after = {w: _exists_within(c, 1.0) for w, c in idlers.items()}
        assert all(after[w] == counts[w] + 1 for w in after), (counts, after)
        # an SMTP submission, through whichever worker, reaches both
        smtp = Line(server.port("submission", "starttls"))
        assert smtp.greeting.startswith(b"220")
        smtp.send(b"EHLO client.example\r\n")
        smtp.until(b"250 ")
        auth = base64.b64encode(f"\0{BOB}\0{PASSWORD}".encode())
        smtp.send(b"AUTH PLAIN " + auth + b"\r\n")
        assert smtp.line().startswith(b"235")
        smtp.send(f"MAIL FROM:<{BOB}>\r\n".encode())
        assert smtp.line().startswith(b"250")
        smtp.send(f"RCPT TO:<{ALICE}>\r\n".encode())
        assert smtp.line().startswith(b"250")
        smtp.send(b"DATA\r\n")
        assert smtp.line().startswith(b"354")
        smtp.send(f"From: <{BOB}>\r\nTo: <{ALICE}>\r\nSubject: by smtp\r\n\r\nhi\r\n.\r\n".encode())
        assert smtp.line().startswith(b"250")
        final = {w: _exists_within(c, 1.0) for w, c in idlers.items()}
        assert all(final[w] == after[w] + 1 for w in final), (after, final)
        smtp.close()
        for c in idlers.values():
            c.send(b"DONE\r\n")
            c.until(b"i OK")
    finally:
        for c in [*idlers.values(), *writers.values()]:
            c.close()


def test_recent_goes_to_one_session_across_workers(server: ServerProcess) -> None:
    """RFC 3501 §2.3.2: a new message is \\Recent in one session only, whichever worker has it."""
    port = server.port("imap", "starttls")
    idlers = one_per_worker(server, lambda p: imap_login(p, CAROL), port)
    writer = imap_login(port, CAROL)
    try:
        for c in idlers.values():
            _idle(c)
        recent: dict[str, int] = {}
        for k in range(3):
            _append(writer, b"Subject: recent %d\r\n\r\nhello\r\n" % k)
            for w, c in idlers.items():
                assert _exists_within(c, 5.0) == k + 1
                ln = c.line()
                m = re.match(rb"\* (\d+) RECENT", ln)
                assert m, ln
                recent[w] = int(m.group(1))
        assert sum(recent.values()) == 3, recent  # each message \\Recent in exactly one session
        for c in idlers.values():
            c.send(b"DONE\r\n")
            c.until(b"i OK")
    finally:
        for c in [*idlers.values(), writer]:
            c.close()


def test_concurrent_appends_through_both_workers_get_distinct_ascending_uids(server: ServerProcess) -> None:
    port = server.port("imap", "starttls")
    clients = [imap_login(port, BOB) for _ in range(8)]
    assert {worker_of(server, c.local_port) for c in clients} == {"w0", "w1"}
    uids: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(k: int, c: Line) -> None:
        try:
            uids[k] = [_append(c, b"Subject: %d-%d\r\n\r\nbody\r\n" % (k, i), b"t%d" % i) for i in range(15)]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k, c)) for k, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for c in clients:
        c.close()
    assert not errors, errors
    every = [u for got in uids.values() for u in got]
    assert len(every) == len(set(every)) == 120
    for got in uids.values():
        assert got == sorted(got)  # each connection's UIDs ascend
    # no gaps: one mailbox, one UID sequence shared by both processes
    assert sorted(every) == list(range(min(every), min(every) + 120))


def test_pop3_maildrop_lock_holds_across_workers(server: ServerProcess) -> None:
    conns = one_per_worker(server, Line, server.port("pop3", "starttls"))
    a, b = conns["w0"], conns["w1"]
    try:
        a.send(f"USER {ALICE}\r\n".encode())
        assert a.line().startswith(b"+OK")
        a.send(f"PASS {PASSWORD}\r\n".encode())
        assert a.line().startswith(b"+OK")
        b.send(f"USER {ALICE}\r\n".encode())
        assert b.line().startswith(b"+OK")
        b.send(f"PASS {PASSWORD}\r\n".encode())
        refused = b.line()
        assert refused.startswith(b"-ERR") and b"IN-USE" in refused, refused
        a.send(b"QUIT\r\n")
        assert a.line().startswith(b"+OK")
        # released with the session: worker 1 may have it now
        c = Line(server.port("pop3", "starttls"))
        c.send(f"USER {ALICE}\r\n".encode())
        c.line()
        c.send(f"PASS {PASSWORD}\r\n".encode())
        assert c.line().startswith(b"+OK")
        c.close()
    finally:
        a.close()
        b.close()


def _pids(server: ServerProcess) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for m in re.finditer(r"worker (\d) ready \(pid (\d+)\)", server.log_text()):
        out.setdefault(f"w{m.group(1)}", []).append(int(m.group(2)))
    return out


_PROXY_LISTENING = re.compile(r"listening: imap on \S+ port (\d+) \(implicit, PROXY\)")


def test_proxy_protocol_listener_in_every_worker(server: ServerProcess) -> None:
    """A PROXY listener under --workers: the supervisor hands the raw connection over, the worker
    reads the header before TLS, and the real client address is what the session sees."""
    import ssl

    m = _PROXY_LISTENING.search(server.log_text())
    assert m, "no PROXY listener in the log"
    port = int(m.group(1))
    ctx = ssl.create_default_context(cafile=str(server.cafile))
    seen: dict[str, str] = {}
    for k in range(8):
        client_ip = f"203.0.113.{10 + k}"
        raw = socket.create_connection(("127.0.0.1", port), timeout=20)
        raw.sendall(f"PROXY TCP4 {client_ip} 127.0.0.1 {40000 + k} 993\r\n".encode())
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            f = tls.makefile("rb")
            assert f.readline().startswith(b"* OK")
            tls.sendall(f"a LOGIN {ALICE} {PASSWORD}\r\n".encode())
            assert f.readline().startswith(b"a OK")
            tls.sendall(b"b LOGOUT\r\n")
            while not f.readline().startswith(b"b OK"):
                pass
        pat = re.compile(r"\[(w\d+):\w+\] connect \w+ .* from " + re.escape(client_ip) + r":\d+ via proxy 127\.0\.0\.1")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and client_ip not in seen:
            hit = pat.search(server.log_text())
            if hit:
                seen[client_ip] = hit.group(1)
            time.sleep(0.05)
        assert client_ip in seen, f"no connect line naming {client_ip}"
    assert set(seen.values()) == {"w0", "w1"}, seen
    # The balancer's address is not counted against max_connections_per_ip by the supervisor:
    # more proxied connections than the cap at once are all served.
    conns = []
    try:
        for k in range(CAP + 2):
            raw = socket.create_connection(("127.0.0.1", port), timeout=20)
            raw.sendall(f"PROXY TCP4 198.51.100.{k + 1} 127.0.0.1 {41000 + k} 993\r\n".encode())
            tls = ctx.wrap_socket(raw, server_hostname="localhost")
            conns.append(tls)
            assert tls.makefile("rb").readline().startswith(b"* OK")
    finally:
        for c in conns:
            c.close()


def test_sigkilled_worker_is_restarted_while_the_other_serves(server: ServerProcess) -> None:
    port = server.port("imap", "starttls")
    conns = one_per_worker(server, imap_login, port)
    victim = _pids(server)["w1"][-1]
    before = len(_pids(server)["w1"])
    subprocess.run(["kill", "-KILL", str(victim)], check=True)
    # the other worker keeps serving its session, and new connections meanwhile
    conns["w0"].send(b"n NOOP\r\n")
    assert conns["w0"].until(b"n ")[-1].startswith(b"n OK")
    extra = imap_login(port)
    extra.close()
    deadline = time.monotonic() + 20
    while len(_pids(server)["w1"]) == before:
        assert time.monotonic() < deadline, "worker 1 not restarted"
        time.sleep(0.1)
    assert f"worker 1 (pid {victim}) died (killed by signal 9)" in server.log_text()
    again = one_per_worker(server, imap_login, port)  # both workers serve again
    for c in [*conns.values(), *again.values()]:
        c.close()


def test_sighup_reaches_every_worker(server: ServerProcess) -> None:
    assert server.proc is not None
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not all(f"[{w}:-] certificates reloaded" in server.log_text() for w in ("w0", "w1")):
        assert time.monotonic() < deadline, "SIGHUP did not reach both workers"
        time.sleep(0.1)


def test_sigterm_drains_and_stops(server: ServerProcess) -> None:
    """Last in the module: SIGTERM to the supervisor; a session in progress gets its answer and
    a BYE, every process exits, status 0."""
    c = imap_login(server.port("imap", "starttls"))
    c.send(b"s SELECT INBOX\r\n")
    c.until(b"s OK")
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    lines = c.until(b"* BYE", timeout=20)
    assert lines[-1].startswith(b"* BYE")
    assert server.proc.wait(30) == 0
    text = server.log_text()
    assert "[sup:-] stopped" in text
    assert text.count("] stopped") == 3  # the supervisor and both workers


def test_workers_failing_at_start_make_serve_exit_nonzero(tmp_path: Path) -> None:
    s = ServerProcess(tmp_path / "data", workers=2, init_args=backends.init_args(tmp_path / "data"))
    s.init()
    (s.data / "tls" / "cert.pem").write_text("not a certificate\n")
    with pytest.raises(RuntimeError, match="exited with 1"):
        s.start(timeout=60)
    assert "failed 3 times at start" in s.log_text()


def test_workers_auto_in_config(tmp_path: Path) -> None:
    from postfach import config as cfgmod

    cfg = cfgmod.parse('[server]\nworkers = "auto"\n', where="t.toml", data_dir=tmp_path)
    assert cfg.server.workers == 0 and cfg.server.worker_count() >= 1
    assert cfgmod.parse("[server]\nworkers = 3\n", where="t.toml", data_dir=tmp_path).server.worker_count() == 3
    with pytest.raises(cfgmod.ConfigError, match=r"server\.workers"):
        cfgmod.parse('[server]\nworkers = "many"\n', where="t.toml", data_dir=tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "postfach", "serve", "--workers", "zero", "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and "workers" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture
def pg_database() -> Iterator[str]:
    from tests.store.storehelpers import fresh_pg_database

    with fresh_pg_database("postfach_workers") as dsn:
        yield dsn


def test_postgres_store_with_two_workers_uses_its_own_notifications(tmp_path: Path, pg_database: str) -> None:
    """With PostgreSQL the workers are not relayed (LISTEN/NOTIFY already reaches every process):
    IDLE in each worker still hears of an APPEND through the other, once (no duplicate EXISTS)."""
    from bench.load.server import FAST_AUTH

    from postfach import cli

    data = tmp_path / "data"
    assert cli.main(["init", "--data", str(data), "--dev", "--hostname", "localhost", "--store", pg_database]) == 0
    cfg = data / "postfach.toml"
    text = re.sub(r"port = \d+", "port = 0", cfg.read_text()).replace("[auth]\n", "[auth]\n" + FAST_AUTH, 1)
    cfg.write_text(text.replace("[backup]\nenabled = true", "[backup]\nenabled = false"))
    s = ServerProcess(data, workers=2)
    s.provision([ALICE], PASSWORD)
    s.start()
    try:
        port = s.port("imap", "starttls")
        idlers = one_per_worker(s, imap_login, port)
        writers = one_per_worker(s, imap_login, port)
        for c in idlers.values():
            _idle(c)
        _append(writers["w1"], b"Subject: pg\r\n\r\nhello\r\n")
        assert {w: _exists_within(c, 1.0) for w, c in idlers.items()} == {"w0": 1, "w1": 1}
        _append(writers["w0"], b"Subject: pg 2\r\n\r\nhello\r\n")
        assert {w: _exists_within(c, 1.0) for w, c in idlers.items()} == {"w0": 2, "w1": 2}
        for c in [*idlers.values(), *writers.values()]:
            c.close()
    finally:
        assert s.stop(30) == 0


def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    """No orphans: a worker that loses its supervisor drains and exits."""
    s = ServerProcess(tmp_path / "data", workers=2, init_args=backends.init_args(tmp_path / "data"))
    s.init()
    s.start()
    pids = [p for got in _pids(s).values() for p in got]
    assert len(pids) == 2
    s.kill()  # SIGKILL to the supervisor
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{p}").exists() and "zombie" not in _state(p) for p in pids):
        assert time.monotonic() < deadline, "workers outlived their supervisor"
        time.sleep(0.1)
    assert s.log_text().count("lost the supervisor; stopping") == 2


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0].lower()
    except (OSError, IndexError):
        return "zombie"



def test_login_failures_count_over_all_workers(tmp_path: Path) -> None:
    """Throttling and lockout hold for the whole server, not per worker: failures on a connection
    of each worker add up to the lockout, which then refuses the right password on both."""
    s = ServerProcess(tmp_path / "data", workers=2, init_args=backends.init_args(tmp_path / "data"))
    s.init()
    cfg = s.data / "postfach.toml"
    text = cfg.read_text("utf-8")
    no_lockout = "lockout_failures = 1000000\nfree_failures = 1000000\n"  # bench/load/server.py FAST_AUTH
    assert no_lockout in text
    cfg.write_text(text.replace(no_lockout, "lockout_failures = 4\nfree_failures = 20\n"
                                "window_seconds = 600\nlockout_seconds = 600\n"), "utf-8")
    s.provision([ALICE, BOB], PASSWORD)
    s.start()
    try:
        port = s.port("imap", "starttls")
        conns = one_per_worker(s, Line, port)
        try:
            # Two failures through each worker: neither saw the four that lock out by itself.
            for w in ("w0", "w1"):
                for i in range(2):
                    conns[w].send(f"f{i} LOGIN {ALICE} wrong-{i}\r\n".encode())
                    assert b"AUTHENTICATIONFAILED" in conns[w].until(f"f{i} ".encode())[-1]
            time.sleep(0.5)  # the other worker's failures arrive through the supervisor (ms)
            for w in ("w0", "w1"):
                conns[w].send(f"ok LOGIN {ALICE} {PASSWORD}\r\n".encode())
                last = conns[w].until(b"ok ")[-1]
                assert last.startswith(b"ok NO [UNAVAILABLE]"), (w, last)
        finally:
            for c in conns.values():
                c.close()
        assert "failures seen by another worker" in s.log_text()
    finally:
        s.stop(30)


def test_max_connections_per_account_counts_over_all_workers(tmp_path: Path) -> None:
    """The per-account cap holds for the server: a session in each worker fills a cap of 2; a
    logout frees a place; a SIGKILLed worker's sessions stop counting; a restarted worker learns
    the other's sessions."""
    s = ServerProcess(tmp_path / "data", workers=2, limits={"max_connections_per_account": 2},
                      init_args=backends.init_args(tmp_path / "data"))
    s.init()
    s.provision([ALICE, BOB], PASSWORD)
    s.start()
    port = s.port("imap", "starttls")

    def login(c: Line, tag: str, user: str = ALICE) -> bytes:
        c.send(f"{tag} LOGIN {user} {PASSWORD}\r\n".encode())
        return c.until(f"{tag} ".encode())[-1]

    try:
        first = one_per_worker(s, imap_login, port)  # alice in w0 and in w1: the cap is reached
        time.sleep(0.5)  # each worker's count reaches the other through the supervisor (ms)
        spare = one_per_worker(s, Line, port)
        for w, c in spare.items():
            assert login(c, "l").startswith(b"l NO [LIMIT]"), w  # neither worker alone is at 2
            assert login(c, "b", BOB).startswith(b"b OK"), w  # another account is not capped
        first["w0"].send(b"o LOGOUT\r\n")
        first["w0"].until(b"o ")
        first["w0"].close()
        time.sleep(0.5)
        c = Line(port)
        assert worker_of(s, c.local_port) == "w0"  # the least busy: w1 holds two connections
        assert login(c, "again").startswith(b"again OK")  # one place was free again
        # Alice has a session on each worker again: kill worker 1; its session no longer counts,
        # and its successor learns of w0's.
        victim = _pids(s)["w1"][-1]
        before = len(_pids(s)["w1"])
        subprocess.run(["kill", "-KILL", str(victim)], check=True)
        deadline = time.monotonic() + 20
        while len(_pids(s)["w1"]) == before:
            assert time.monotonic() < deadline, "worker 1 not restarted"
            time.sleep(0.1)
        time.sleep(0.5)
        held = sum(1 for x in (first["w1"], c) if _alive(x))
        assert held == 1  # the session in w0 survived, the one in w1 died with it
        fresh = one_per_worker(s, Line, port)
        # w0 forgot the dead worker's session (held: c, and now this one: 2) ...
        assert login(fresh["w0"], "n0").startswith(b"n0 OK")
        time.sleep(0.5)
        # ... and the restarted w1 knows of w0's two: c from the supervisor's snapshot, n0 relayed.
        assert login(fresh["w1"], "n1").startswith(b"n1 NO [LIMIT]")
        for x in [*first.values(), *spare.values(), *fresh.values(), c]:
            x.close()
    finally:
        s.stop(30)


def _alive(c: Line) -> bool:
    try:
        c.send(b"z NOOP\r\n")
        return c.until(b"z ", timeout=5)[-1].startswith(b"z OK")
    except (OSError, ConnectionError):
        return False
