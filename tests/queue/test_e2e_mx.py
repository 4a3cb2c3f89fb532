"""End to end: submission to postfach A, A's queue finds B through the loopback DNS server's MX
record, B's MX checks SPF/DKIM/DMARC and files the message; the answer says pass three times."""

from __future__ import annotations

import importlib.util
import smtplib
import ssl
import sys
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import authres
import pytest
import trustme
from queuehelpers import DnsTestServer, free_port

from postfach.config import Config, ListenerConfig, QueueConfig, SmtpConfig
from postfach.dkim import keygen
from postfach.store.base import Store

pytestmark = pytest.mark.timeout(120)

B_IP = "127.0.0.21"


def _root_conftest() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("postfach_tests_root_conftest", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _start_pair(tmp_path: Path, dns_server: DnsTestServer, b_cert: trustme.LeafCert | None
                ) -> Generator[tuple[Any, Any, Any], None, None]:
    root = _root_conftest()
    if not root._available("submission") or not root._available("mx"):
        pytest.skip("the SMTP server core is not in the tree")
    relay_port = free_port(B_IP)
    smtp_b = SmtpConfig(dns_nameservers=("127.0.0.1",), dns_port=dns_server.port)
    if b_cert is not None:  # B's certificate names its MX host, as a real one would
        (tmp_path / "b" / "tls").mkdir(parents=True)
        b_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "b" / "tls" / "cert.pem"))
        b_cert.private_key_pem.write_to_path(str(tmp_path / "b" / "tls" / "key.pem"))
    live_b, thread_b = root.start_live_server(
        tmp_path / "b", hostname="mx.b.test",
        listeners=(ListenerConfig(protocol="mx", port=relay_port, address=B_IP, tls="starttls"),),
        smtp=smtp_b,
    )
    try:
        async def setup_b(store: Store) -> None:
            await store.add_domain("b.test")
            await store.create_account("bob@b.test", "$argon2id$not-used")

        live_b.call(setup_b)
        # A signs for example.org: keys made before A starts, published in the test zone
        data_a = tmp_path / "a"
        for k in keygen(Config(data_dir=data_a), "example.org", "both"):
            dns_server.set(k.dns_name, "TXT", k.dns_txt)
        dns_server.set("b.test", "MX", "10 mx.b.test.")
        dns_server.set("mx.b.test", "A", B_IP)
        dns_server.set("example.org", "TXT", "v=spf1 ip4:127.0.0.0/8 -all")
        dns_server.set("_dmarc.example.org", "TXT", "v=DMARC1; p=reject")
        smtp_a = SmtpConfig(dns_nameservers=("127.0.0.1",), dns_port=dns_server.port, relay_port=relay_port)
        live_a, thread_a = root.start_live_server(
            data_a, smtp=smtp_a, queue=QueueConfig(retry_schedule_seconds=(1,), connect_timeout_seconds=5),
        )
        try:
            yield root, live_a, live_b
        finally:
            root.stop_live_server(live_a, thread_a)
    finally:
        root.stop_live_server(live_b, thread_b)


@pytest.fixture
def two_servers(tmp_path: Path, dns_server: DnsTestServer) -> Iterator[tuple[Any, Any, Any]]:
    yield from _start_pair(tmp_path, dns_server, None)


def _submit(root: Any, live_a: Any, msg: bytes, **kw: Any) -> None:
    ctx = ssl.create_default_context(cafile=str(live_a.cafile))
    ctx.check_hostname = False  # the certificate names "localhost"; we connect to 127.0.0.1
    with smtplib.SMTP("127.0.0.1", live_a.port("submission", "starttls"), timeout=30) as s:
        s.starttls(context=ctx)
        s.login(root.USER, root.PASSWORD)
        refused = s.sendmail(root.USER, ["bob@b.test"], msg, **kw)
        assert refused == {}


async def _inbox(store: Store, address: str) -> list[bytes]:
    acc = await store.get_account(address)
    assert acc is not None
    mb = await store.get_mailbox(acc.id, "INBOX")
    assert mb is not None
    return [await store.read_message(acc.id, mb.id, m.uid) for m in await store.list_messages(acc.id, mb.id)]


def _wait_inbox(live: Any, address: str, timeout: float = 60) -> list[bytes]:
    deadline = time.monotonic() + timeout
    got: list[bytes] = []
    while time.monotonic() < deadline:
        got = live.call(lambda store: _inbox(store, address))
        if got:
            break
        time.sleep(0.2)
    return got


def test_submission_reaches_second_instance_with_passing_checks(two_servers: tuple[Any, Any, Any]) -> None:
    root, live_a, live_b = two_servers
    msg = (
        f"From: User <{root.USER}>\r\nTo: Bob <bob@b.test>\r\nSubject: across the loopback\r\n\r\n"
        "Hello from A.\r\n"
    ).encode()
    _submit(root, live_a, msg)
    got = _wait_inbox(live_b, "bob@b.test")
    assert len(got) == 1, "the message did not arrive at B"
    data = got[0]
    assert b"Hello from A." in data
    assert data.count(b"DKIM-Signature:") == 2
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    ar_lines = [h for h in head.replace("\r\n\t", " ").replace("\r\n ", " ").split("\r\n")
                if h.lower().startswith("authentication-results:")]
    assert len(ar_lines) == 1
    ar = authres.AuthenticationResultsHeader.parse(ar_lines[0])
    assert ar.authserv_id == "mx.b.test"
    results = {(r.method, r.result) for r in ar.results}
    assert ("spf", "pass") in results
    assert ("dkim", "pass") in results
    assert ("dmarc", "pass") in results
    assert all(r.result == "pass" for r in ar.results if r.method == "dkim")


def test_requiretls_goes_over_verified_tls(
    tmp_path: Path, dns_server: DnsTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    # the outbound client verifies against the system store; point it at the test CA
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    pair = _start_pair(tmp_path, dns_server, ca.issue_cert("mx.b.test"))
    root, live_a, live_b = next(pair)
    dns_server.set_authenticated(True)  # RFC 8689 §4.2.1: a DNSSEC-validated MX lookup
    try:
        msg = (f"From: <{root.USER}>\r\nTo: <bob@b.test>\r\nSubject: secret\r\n\r\nTLS only.\r\n").encode()
        _submit(root, live_a, msg, mail_options=["REQUIRETLS"], rcpt_options=["NOTIFY=FAILURE"])
        got = _wait_inbox(live_b, "bob@b.test")
        assert len(got) == 1 and b"TLS only." in got[0]
        assert b"with ESMTPS" in got[0]  # B's Received line: TLS on the MX hop
        assert _wait_inbox(live_a, root.USER, timeout=1) == []  # no bounce
    finally:
        dns_server.set_authenticated(False)
        pair.close()
