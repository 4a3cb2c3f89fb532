"""PROXY protocol behind a load balancer (issue 9 item 5): the whole server, real sockets, real TLS.

A small loopback relay plays HAProxy: it accepts the client, connects to postfach, sends a v1 or v2
header naming a made-up client address, then pipes bytes both ways (TLS included, end to end). The
tests speak IMAP, POP3 and SMTP through it with imaplib/poplib/smtplib over STARTTLS and implicit
TLS and check that the made-up address is the one postfach uses: `Received:` and SPF on MX, auth
lockout, `cleartext_networks`. Untrusted peers, garbage and slow headers are dropped without a
greeting; a listener without `proxy_protocol` is unaffected.
"""

from __future__ import annotations

import contextlib
import imaplib
import poplib
import smtplib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from email.parser import BytesHeaderParser
from pathlib import Path

import pytest
from tests.conftest import OTHER, PASSWORD, USER, LiveServer, make_config, start_live_server, stop_live_server
from tests.dnsserver import DnsTestServer

from postfach.config import ListenerConfig, ProxyConfig, SmtpConfig
from postfach.net.proxy import PP2_TYPE_SSL, build_v1, build_v2
from postfach.store.base import Store

pytestmark = pytest.mark.timeout(120)

CLIENT_X = ("203.0.113.25", 40001)  # the "real" clients the balancer reports
CLIENT_Y = ("198.51.100.9", 40002)
CLIENT_6 = ("2001:db8::7", 40003)


class Relay:
    """What HAProxy does with `send-proxy` / `send-proxy-v2`: one header, then a dumb pipe."""

    def __init__(self, target_port: int, header: Callable[[tuple[str, int]], bytes]) -> None:
        self.target_port = target_port
        self.header = header
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            upstream.sendall(self.header(("127.0.0.1", self.target_port)))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


def v1(client: tuple[str, int]) -> Callable[[tuple[str, int]], bytes]:
    return lambda dest: build_v1(client, dest)


def v2(client: tuple[str, int], **kw: object) -> Callable[[tuple[str, int]], bytes]:
    return lambda dest: build_v2(client, dest, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsTestServer]:
    with DnsTestServer() as server:
        server.add("proxied.test", "TXT", "v=spf1 ip4:203.0.113.0/24 -all")
        yield server


@pytest.fixture
def live(tmp_path: Path, dns: DnsTestServer) -> Iterator[LiveServer]:
    base = make_config(tmp_path / "data")
    proxied = tuple(replace(lst, proxy_protocol=True) for lst in base.listeners)
    plain = (
        ListenerConfig(protocol="imap", port=0, address="127.0.0.1", tls="starttls"),
        ListenerConfig(protocol="mx", port=0, address="127.0.0.1", tls="starttls"),
    )
    live, thread = start_live_server(
        tmp_path / "data",
        listeners=proxied + plain,
        proxy=ProxyConfig(trusted_networks=("127.0.0.1/32",), header_timeout_seconds=1.0),
        auth=replace(base.auth, lockout_failures=3, free_failures=10, cleartext_networks=("127.0.0.0/8",)),
        limits=replace(base.limits, max_connections_per_ip=3),
        smtp=SmtpConfig(dns_nameservers=("127.0.0.1",), dns_port=dns.port),
    )
    try:
        yield live
    finally:
        stop_live_server(live, thread)


def port(live: LiveServer, protocol: str, tls: str, *, proxied: bool = True) -> int:
    for b in live.server.listeners:
        if (b.config.protocol, b.config.tls, b.config.proxy_protocol) == (protocol, tls, proxied):
            return int(b.port)
    raise KeyError((protocol, tls, proxied))


@contextlib.contextmanager
def relay(live: LiveServer, protocol: str, tls: str, header: Callable[[tuple[str, int]], bytes]) -> Iterator[int]:
    r = Relay(port(live, protocol, tls), header)
    try:
        yield r.port
    finally:
        r.close()


def tls_ctx(live: LiveServer) -> ssl.SSLContext:
    return live.client_context()


def last_message(live: LiveServer, address: str = USER) -> bytes:
    async def fetch(store: Store) -> bytes:
        account = await store.get_account(address)
        assert account is not None
        box = await store.get_mailbox(account.id, "INBOX")
        assert box is not None
        msgs = await store.list_messages(account.id, box.id)
        return await store.read_message(account.id, box.id, msgs[-1].uid)

    return live.call(fetch)


# ------------------------------------------------------------------------------ the three protocols


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
def test_imap_through_proxy(live: LiveServer, tls: str, make: Callable[..., Callable[..., bytes]]) -> None:
    with relay(live, "imap", tls, make(CLIENT_X)) as p:
        if tls == "implicit":
            imap: imaplib.IMAP4 = imaplib.IMAP4_SSL("localhost", p, ssl_context=tls_ctx(live), timeout=20)
        else:
            imap = imaplib.IMAP4("localhost", p, timeout=20)
            imap.starttls(tls_ctx(live))
        imap.login(USER, PASSWORD)
        typ, _data = imap.select("INBOX")
        assert typ == "OK"
        imap.logout()


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
def test_pop3_through_proxy(live: LiveServer, tls: str, make: Callable[..., Callable[..., bytes]]) -> None:
    with relay(live, "pop3", tls, make(CLIENT_X)) as p:
        if tls == "implicit":
            pop: poplib.POP3 = poplib.POP3_SSL("localhost", p, context=tls_ctx(live), timeout=20)
        else:
            pop = poplib.POP3("localhost", p, timeout=20)
            pop.stls(tls_ctx(live))
        pop.user(USER)
        pop.pass_(PASSWORD)
        assert pop.stat()[0] >= 0
        pop.quit()


def _message(sender: str, to: str, subject: str) -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nthrough the balancer\r\n").encode()


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
def test_submission_received_names_real_client(
    live: LiveServer, tls: str, make: Callable[..., Callable[..., bytes]]
) -> None:
    subject = f"sub-{tls}-{make.__name__}"
    with relay(live, "submission", tls, make(CLIENT_X)) as p:
        if tls == "implicit":
            smtp: smtplib.SMTP = smtplib.SMTP_SSL("localhost", p, context=tls_ctx(live), timeout=20)
        else:
            smtp = smtplib.SMTP("localhost", p, timeout=20)
            smtp.starttls(context=tls_ctx(live))
        smtp.login(USER, PASSWORD)
        smtp.sendmail(USER, [OTHER], _message(USER, OTHER, subject))
        smtp.quit()
    raw = last_message(live, OTHER)
    assert f"Subject: {subject}".encode() in raw
    received = BytesHeaderParser().parsebytes(raw).get_all("Received")
    # "from <HELO> ([address])": smtplib says EHLO [127.0.0.1] (its own socket); the address is the client's
    assert received and "([203.0.113.25])" in received[0], received


@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
def test_mx_received_and_spf_use_real_client(live: LiveServer, make: Callable[..., Callable[..., bytes]]) -> None:
    """SPF for proxied.test allows 203.0.113.0/24 only: through the balancer it passes, because the
    header's address is checked; straight from 127.0.0.1 (listener without PROXY) it fails."""
    with relay(live, "mx", "starttls", make(CLIENT_X)) as p:
        smtp = smtplib.SMTP("localhost", p, timeout=20)
        smtp.starttls(context=tls_ctx(live))
        smtp.sendmail("alice@proxied.test", [USER], _message("alice@proxied.test", USER, "mx-proxied"))
        smtp.quit()
    raw = last_message(live)
    headers = BytesHeaderParser().parsebytes(raw)
    assert "[203.0.113.25]" in (headers.get_all("Received") or [""])[0]
    assert "spf=pass" in str(headers["Authentication-Results"]), headers["Authentication-Results"]

    smtp = smtplib.SMTP("localhost", port(live, "mx", "starttls", proxied=False), timeout=20)
    smtp.starttls(context=tls_ctx(live))
    smtp.sendmail("alice@proxied.test", [USER], _message("alice@proxied.test", USER, "mx-direct"))
    smtp.quit()
    headers = BytesHeaderParser().parsebytes(last_message(live))
    assert headers["Subject"] == "mx-direct"
    assert "[127.0.0.1]" in (headers.get_all("Received") or [""])[0]
    assert "spf=fail" in str(headers["Authentication-Results"])


def test_header_and_client_hello_in_one_segment(live: LiveServer) -> None:
    """What a balancer often does on 993: header and ClientHello in the same write. The header is
    read from the raw socket without reading ahead, so the handshake still gets every byte."""
    ctx = tls_ctx(live)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    with socket.create_connection(("127.0.0.1", port(live, "imap", "implicit"))) as s:
        s.settimeout(20)
        s.sendall(build_v2(CLIENT_X, ("127.0.0.1", 993)) + hello)
        greeting = b""
        while b"\r\n" not in greeting:
            if data := outgoing.read():
                s.sendall(data)
            try:
                greeting += tls.read(4096)
                continue
            except ssl.SSLWantReadError:
                pass
            with contextlib.suppress(ssl.SSLWantReadError):
                tls.do_handshake()
            if data := outgoing.read():
                s.sendall(data)
                continue
            chunk = s.recv(65536)
            assert chunk, "closed during the handshake"
            incoming.write(chunk)
    assert greeting.startswith(b"* OK"), greeting


def test_ipv6_client_behind_ipv4_balancer(live: LiveServer) -> None:
    """A v2 header with an IPv6 client (the balancer itself talks IPv4 to us)."""
    header = lambda dest: build_v2(CLIENT_6, ("::ffff:" + dest[0], dest[1]))  # noqa: E731 - one family per header
    with relay(live, "submission", "starttls", header) as p:
        smtp = smtplib.SMTP("localhost", p, timeout=20)
        smtp.starttls(context=tls_ctx(live))
        smtp.login(USER, PASSWORD)
        smtp.sendmail(USER, [OTHER], _message(USER, OTHER, "over ipv6"))
        smtp.quit()
    received = BytesHeaderParser().parsebytes(last_message(live, OTHER)).get_all("Received")
    assert received and "2001:db8::7" in received[0], received


# ------------------------------------------------------------------------------- policy by address


def test_connection_cap_counts_the_proxied_client(live: LiveServer) -> None:
    """max_connections_per_ip (3 here) counts each client behind the balancer, not the balancer."""
    with relay(live, "imap", "starttls", v1(CLIENT_X)) as px, relay(live, "imap", "starttls", v1(CLIENT_Y)) as py:
        held = [imaplib.IMAP4("localhost", px, timeout=20) for _ in range(3)]
        with socket.create_connection(("127.0.0.1", px)) as s:
            s.settimeout(10)
            assert s.recv(200).startswith(b"* BYE [UNAVAILABLE] Too many connections")
        other = imaplib.IMAP4("localhost", py, timeout=20)  # someone else behind the same balancer
        assert other.noop()[0] == "OK"
        other.logout()
        for imap in held:
            imap.logout()


def test_lockout_hits_the_proxied_client_not_the_proxy(live: LiveServer) -> None:
    with relay(live, "imap", "implicit", v2(CLIENT_X)) as px, relay(live, "imap", "implicit", v1(CLIENT_Y)) as py:
        for _ in range(3):
            imap = imaplib.IMAP4_SSL("localhost", px, ssl_context=tls_ctx(live), timeout=20)
            with pytest.raises(imaplib.IMAP4.error):
                imap.login("nobody@example.org", "wrong-password")
            imap.logout()
        # X is locked out now, even with the right password ...
        imap = imaplib.IMAP4_SSL("localhost", px, ssl_context=tls_ctx(live), timeout=20)
        with pytest.raises(imaplib.IMAP4.error):
            imap.login(USER, PASSWORD)
        imap.logout()
        # ... another client behind the same balancer is not,
        imap = imaplib.IMAP4_SSL("localhost", py, ssl_context=tls_ctx(live), timeout=20)
        assert imap.login(USER, PASSWORD)[0] == "OK"
        imap.logout()
    # ... and neither is the balancer's own address (a direct connection from 127.0.0.1).
    imap = imaplib.IMAP4("localhost", port(live, "imap", "starttls", proxied=False), timeout=20)
    imap.starttls(tls_ctx(live))
    assert imap.login(USER, PASSWORD)[0] == "OK"
    imap.logout()


def test_cleartext_networks_use_real_client_and_ssl_tlv_is_ignored(live: LiveServer) -> None:
    """127.0.0.0/8 may log in without TLS; a proxied client from 203.0.113.25 may not, even when the
    balancer claims (SSL TLV) that it terminated TLS: only our own TLS counts."""
    ssl_tlv = bytes([0x01]) + b"\x00\x00\x00\x00"  # PP2_CLIENT_SSL, verify ok
    with relay(live, "imap", "starttls", v2(CLIENT_X, tlvs=((PP2_TYPE_SSL, ssl_tlv),))) as p:
        imap = imaplib.IMAP4("localhost", p, timeout=20)
        assert "LOGINDISABLED" in imap.capabilities
        with pytest.raises(imaplib.IMAP4.error):
            imap.login(USER, PASSWORD)
        imap.logout()
    with relay(live, "imap", "starttls", v1(("127.0.0.9", 5555))) as p:
        imap = imaplib.IMAP4("localhost", p, timeout=20)
        assert "LOGINDISABLED" not in imap.capabilities
        assert imap.login(USER, PASSWORD)[0] == "OK"
        imap.logout()


def test_v2_local_uses_the_proxy_address(live: LiveServer) -> None:
    """A LOCAL header (the balancer's own health check) leaves the peer address standing: 127.0.0.1,
    which is in cleartext_networks here, so LOGIN is offered without TLS."""
    with relay(live, "imap", "starttls", lambda dest: build_v2(None, None)) as p:
        imap = imaplib.IMAP4("localhost", p, timeout=20)
        assert "LOGINDISABLED" not in imap.capabilities
        assert imap.login(USER, PASSWORD)[0] == "OK"
        imap.logout()


# --------------------------------------------------------------------------------- refused peers


def _nothing_then_closed(sock: socket.socket) -> None:
    """The server sends no greeting and closes the connection (a reset when our bytes were unread)."""
    sock.settimeout(10)
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(100) == b""


@pytest.mark.parametrize("protocol,tls", [("imap", "starttls"), ("pop3", "implicit"), ("mx", "starttls")])
def test_garbage_header_closes_without_greeting(live: LiveServer, protocol: str, tls: str) -> None:
    with socket.create_connection(("127.0.0.1", port(live, protocol, tls))) as s:
        s.sendall(b"EHLO i-am-no-proxy\r\n")
        _nothing_then_closed(s)
    with socket.create_connection(("127.0.0.1", port(live, protocol, tls))) as s:
        s.sendall(b"PROXY TCP4 1.2.3.4 nonsense\r\n")
        _nothing_then_closed(s)


def test_missing_header_times_out(live: LiveServer) -> None:
    """A client that connects straight to a PROXY listener and waits for a greeting is closed after
    header_timeout_seconds (1 s here) without one; so is a header that stops half way."""
    with socket.create_connection(("127.0.0.1", port(live, "imap", "starttls"))) as s:
        _nothing_then_closed(s)
    with socket.create_connection(("127.0.0.1", port(live, "submission", "implicit"))) as s:
        s.sendall(build_v2(CLIENT_X, ("127.0.0.1", 1))[:20])
        _nothing_then_closed(s)


def test_no_tls_after_header_on_implicit_port(live: LiveServer) -> None:
    """A good header followed by plaintext on 993: the handshake fails, the connection closes, and
    the listener goes on serving."""
    with socket.create_connection(("127.0.0.1", port(live, "imap", "implicit"))) as s:
        s.sendall(build_v1(CLIENT_X, ("127.0.0.1", 993)) + b"a1 LOGIN user pass\r\n")
        _nothing_then_closed(s)
    with relay(live, "imap", "implicit", v1(CLIENT_X)) as p:
        imap = imaplib.IMAP4_SSL("localhost", p, ssl_context=tls_ctx(live), timeout=20)
        assert imap.noop()[0] == "OK"
        imap.logout()


def test_v1_unknown_keeps_the_proxy_address(live: LiveServer) -> None:
    with relay(live, "imap", "starttls", lambda dest: b"PROXY UNKNOWN\r\n") as p:
        imap = imaplib.IMAP4("localhost", p, timeout=20)
        assert "LOGINDISABLED" not in imap.capabilities  # 127.0.0.1 is in cleartext_networks
        imap.logout()


def test_untrusted_peer_is_refused(live: LiveServer) -> None:
    """127.0.0.2 is not in trusted_networks: even with a valid header, no greeting."""
    with socket.create_connection(("127.0.0.1", port(live, "imap", "starttls")), source_address=("127.0.0.2", 0)) as s:
        s.sendall(build_v1(CLIENT_X, ("127.0.0.1", 143)))
        _nothing_then_closed(s)


def test_listener_without_proxy_protocol_is_unaffected(live: LiveServer) -> None:
    """A PROXY header sent to an ordinary listener is just a bad command there; the greeting came first."""
    with socket.create_connection(("127.0.0.1", port(live, "imap", "starttls", proxied=False))) as s:
        s.settimeout(10)
        assert s.recv(200).startswith(b"* OK")
    imap = imaplib.IMAP4("localhost", port(live, "imap", "starttls", proxied=False), timeout=20)
    assert imap.login(USER, PASSWORD)[0] == "OK"
    imap.logout()


def test_config_requires_trusted_networks(tmp_path: Path) -> None:
    from postfach.config import parse
    from postfach.errors import ConfigError

    text = '[[listener]]\nprotocol = "imap"\nport = 143\nproxy_protocol = true\n'
    with pytest.raises(ConfigError, match=r"proxy\.trusted_networks"):
        parse(text, where="t.toml", data_dir=tmp_path)
    cfg = parse(text + '[proxy]\ntrusted_networks = ["10.0.0.0/8"]\n', where="t.toml", data_dir=tmp_path)
    assert cfg.proxy.trusted_networks == ("10.0.0.0/8",)
    with pytest.raises(ConfigError, match=r"proxy.trusted_networks\[0\]"):
        parse(text + '[proxy]\ntrusted_networks = ["nonsense"]\n', where="t.toml", data_dir=tmp_path)


