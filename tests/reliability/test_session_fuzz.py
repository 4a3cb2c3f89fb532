"""Session-level fuzzing over real sockets (issue 7, item 7; ARCHITECTURE.md invariant 7).

One real ``postfach serve`` process; hypothesis throws random bytes and random mixes of real
commands (with a valid login among them, so that authenticated and selected states are reached)
at its IMAP, POP3 and SMTP listeners (plain text on loopback, STARTTLS among the commands). The server
must never crash or hang: after every example it still greets, afterwards a normal login works on
every protocol, and its log holds no traceback and no "unexpected error".

The parser-level fuzz tests live beside each parser (tests/unit/*, tests/*/test_*fuzz*.py);
``make fuzz`` (bench/fuzz.py) runs the long form, 1,000,000 inputs per protocol.
"""

from __future__ import annotations

import base64
import imaplib
import poplib
import smtplib
import socket
import ssl
from collections.abc import Iterator

import pytest
from bench.load.clients import CONNECT_TIMEOUT
from bench.load.server import ServerProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests import backends

PASSWORD = "fuzz-pass-1"
FUZZ_USER = "fuzz@example.org"  # the fuzzer may delete and expunge this one's mail
CHECK_USER = "check@example.org"  # used only for the "a normal login still works" check

FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("fuzzserve")
    srv = ServerProcess(
        d / "var",
        init_args=backends.init_args(d / "var"),
        limits={"tls_handshake_timeout_seconds": 3, "max_bad_commands": 1000},
    )
    srv.init()
    srv.provision([FUZZ_USER, CHECK_USER], PASSWORD)
    srv.start()
    try:
        yield srv
        assert srv.running(), "the server died under fuzzing:\n" + srv.log_text()[-3000:]
        assert not srv.tracebacks(), "\n".join(srv.tracebacks())
        assert srv.stop() == 0
    finally:
        srv.kill()


# --------------------------------------------------------------------------------------- strategies

_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=16)
_atom = st.one_of(
    _text,
    st.sampled_from(["INBOX", "1:*", "*", "1", "0", "4294967296", '""', "()", "(FLAGS)", "{5}", "{3+}", "~{2}",
                     "\\Seen", "$Junk", "<>", "<a@b>", "NIL", '"\\"', "(((((", "]", "%", "&AMQ-"]),
    st.integers(-5, 2**33).map(str),
)


def _cmd(verbs: list[str], *, tagged: bool) -> st.SearchStrategy[bytes]:
    def build(t: tuple[str, str, list[str]]) -> bytes:
        tag, verb, args = t
        line = " ".join([tag, verb, *args] if tagged else [verb, *args])
        return line.encode("utf-8", "surrogatepass")

    tag = st.sampled_from(["a1", "*", "+", "", "A" * 300, "t.1", "x"]) if tagged else st.just("")
    return st.tuples(tag, st.sampled_from(verbs), st.lists(_atom, max_size=5)).map(build)


def _session(lines: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    ends = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\n\r\n", b""])
    return st.lists(st.tuples(lines, ends).map(lambda t: t[0] + t[1]), min_size=1, max_size=25).map(b"".join)


_raw = st.binary(max_size=3000)

IMAP_VERBS = ["CAPABILITY", "NOOP", "LOGOUT", "LOGIN", "AUTHENTICATE", "STARTTLS", "SELECT", "EXAMINE", "CREATE",
              "DELETE", "RENAME", "SUBSCRIBE", "LIST", "LSUB", "STATUS", "APPEND", "CHECK", "CLOSE", "UNSELECT",
              "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE", "UID FETCH", "UID STORE", "UID SEARCH",
              "UID EXPUNGE", "UID COPY", "UID MOVE", "IDLE", "DONE", "ENABLE", "NAMESPACE", "ID", "GETQUOTAROOT",
              "COMPRESS", "XYZZY"]
_imap_login = st.just(f"l1 LOGIN {FUZZ_USER} {PASSWORD}\r\nl2 SELECT INBOX\r\n".encode())
_imap_append = st.integers(0, 40).map(lambda n: b"ap APPEND INBOX {%d+}\r\n" % n + b"x" * n)
IMAP_INPUT = st.one_of(
    _raw,
    st.tuples(_imap_login, _session(st.one_of(_cmd(IMAP_VERBS, tagged=True), _imap_append, _raw))).map(b"".join),
    _session(st.one_of(_cmd(IMAP_VERBS, tagged=True), st.binary(max_size=60))),
)

POP3_VERBS = ["USER", "PASS", "APOP", "AUTH", "CAPA", "STLS", "STAT", "LIST", "UIDL", "RETR", "DELE", "TOP", "NOOP",
              "RSET", "QUIT", "UTF8", "XTND"]
_pop_login = st.just(f"USER {FUZZ_USER}\r\nPASS {PASSWORD}\r\n".encode())
POP3_INPUT = st.one_of(
    _raw,
    st.tuples(_pop_login, _session(st.one_of(_cmd(POP3_VERBS, tagged=False), _raw))).map(b"".join),
    _session(st.one_of(_cmd(POP3_VERBS, tagged=False), st.binary(max_size=60))),
)

SMTP_VERBS = ["EHLO", "HELO", "LHLO", "MAIL FROM:", "RCPT TO:", "DATA", "BDAT", "RSET", "VRFY", "EXPN", "NOOP",
              "HELP", "AUTH", "AUTH PLAIN", "AUTH LOGIN", "STARTTLS", "QUIT", "ETRN", "MAIL FROM:<a@b> SIZE=",
              "RCPT TO:<check@example.org> NOTIFY=", "BDAT 10 LAST"]
_auth = base64.b64encode(f"\0{FUZZ_USER}\0{PASSWORD}".encode())
_smtp_tx = st.tuples(
    st.sampled_from([b"", b"EHLO fuzz.example\r\n"]),
    st.sampled_from([b"", b"AUTH PLAIN " + _auth + b"\r\n"]),
    st.sampled_from([b"MAIL FROM:<fuzz@example.org>\r\n", b"MAIL FROM:<>\r\n",
                     b"MAIL FROM:<fuzz@example.org> BODY=8BITMIME\r\n"]),
    st.sampled_from([b"RCPT TO:<check@example.org>\r\n", b"RCPT TO:<nobody@example.org>\r\n",
                     b"RCPT TO:<x@remote.invalid>\r\n"]),
    st.sampled_from([b"DATA\r\n", b"BDAT 5\r\n", b"BDAT 0 LAST\r\n"]),
    st.binary(max_size=400),
    st.sampled_from([b"\r\n.\r\n", b"\n.\n", b"\r\n.\n", b".\r\n", b""]),
).map(b"".join)
SMTP_INPUT = st.one_of(
    _raw,
    _smtp_tx,
    _session(st.one_of(_cmd(SMTP_VERBS, tagged=False), st.binary(max_size=60))),
)


# ---------------------------------------------------------------------------------------- driving


def _throw(srv: ServerProcess, protocol: str, data: bytes) -> None:
    """Connect, expect a greeting, send ``data`` and end our side (EOF), read what comes back until
    the server closes, and check that the server process is still there.

    Plain text on the STARTTLS listener (loopback may log in without TLS, as with Dovecot), so that
    the fuzzer reaches every state including STARTTLS itself; TLS is exercised by the final check
    and by the crash test (implicit TLS under load hits the handshake bug of test_tls_race.py)."""
    with socket.create_connection(("127.0.0.1", srv.port(protocol, "starttls")), timeout=CONNECT_TIMEOUT) as s:
        greeting = s.recv(512)
        assert greeting[:1] in (b"*", b"+", b"2"), greeting
        s.settimeout(5)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        except (TimeoutError, OSError):
            pass  # the server may close on us (budgets, QUIT, LOGOUT) or wait out the rest
    assert srv.running(), "server died:\n" + srv.log_text()[-3000:]


def _greets(srv: ServerProcess, protocol: str) -> None:
    with socket.create_connection(("127.0.0.1", srv.port(protocol, "starttls")), timeout=30) as s:
        assert s.recv(512)[:1] in (b"*", b"+", b"2")


def _logins_work(server: ServerProcess) -> None:
    """Every protocol still serves a real client over TLS, and the store is consistent."""
    ctx = ssl.create_default_context(cafile=str(server.cafile))
    for proto in ("imap", "pop3", "submission"):
        _greets(server, proto)
    imap = imaplib.IMAP4_SSL("localhost", server.port("imap", "implicit"), ssl_context=ctx, timeout=30)
    assert imap.login(CHECK_USER, PASSWORD)[0] == "OK"
    assert imap.select("INBOX")[0] == "OK"
    imap.logout()
    pop = poplib.POP3_SSL("localhost", server.port("pop3", "implicit"), context=ctx, timeout=30)
    pop.user(CHECK_USER)
    assert pop.pass_(PASSWORD).startswith(b"+OK")
    pop.stat()
    pop.quit()
    with smtplib.SMTP_SSL("localhost", server.port("submission", "implicit"), context=ctx, timeout=30) as smtp:
        smtp.login(CHECK_USER, PASSWORD)
        smtp.sendmail(CHECK_USER, [CHECK_USER], b"Subject: after fuzz\r\n\r\nstill here\r\n")
    rc, out = server.check()
    assert rc == 0, out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("protocol", "inputs"),
    [("imap", IMAP_INPUT), ("pop3", POP3_INPUT), ("submission", SMTP_INPUT)],
    ids=["imap", "pop3", "smtp"],
)
def test_random_input_never_breaks_the_server(
    server: ServerProcess, protocol: str, inputs: st.SearchStrategy[bytes]
) -> None:
    @FUZZ
    @given(data=inputs)
    def throw(data: bytes) -> None:
        _throw(server, protocol, data)

    throw()
    _logins_work(server)  # afterwards a normal login works on every protocol
