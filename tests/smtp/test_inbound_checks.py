"""SPF, DKIM verification, DMARC and the Authentication-Results header, against a loopback DNS server."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import authres
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dnsserver import DnsTestServer
from postfach.config import Config, SmtpConfig
from postfach.dkim import DkimSigner, keygen
from postfach.dns import lookup_mx, make_resolver
from postfach.smtp.inbound_checks import (
    InboundChecker,
    organizational_domain,
    remove_forged_results,
)


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsTestServer]:
    with DnsTestServer() as srv:
        z = srv.add
        z("pass.test", "TXT", "v=spf1 ip4:127.0.0.0/8 -all")
        z("fail.test", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
        z("soft.test", "TXT", "v=spf1 ip4:192.0.2.0/24 ~all")
        z("neutral.test", "TXT", "v=spf1 ?all")
        z("incl.test", "TXT", "v=spf1 include:pass.test -all")
        z("mxspf.test", "TXT", "v=spf1 mx/24 -all")
        z("mxspf.test", "MX", "10 mail.mxspf.test.")
        z("mail.mxspf.test", "A", "127.0.5.1")
        z("redir.test", "TXT", "v=spf1 redirect=pass.test")
        z("macro.test", "TXT", "v=spf1 exists:%{ir}.%{v}._spf.%{d} -all")
        z("1.0.0.127.in-addr._spf.macro.test", "A", "127.0.0.2")
        z("two.test", "TXT", "v=spf1 -all")
        z("two.test", "TXT", "v=spf1 +all")
        z("other.test", "TXT", "unrelated text")
        for i in range(12):
            z(f"loop{i}.test", "TXT", f"v=spf1 include:loop{i + 1}.test -all")
        z("loop12.test", "TXT", "v=spf1 +all")
        # DMARC
        z("_dmarc.rejecting.test", "TXT", "v=DMARC1; p=reject; rua=mailto:d@rejecting.test")
        z("rejecting.test", "TXT", "v=spf1 ip4:192.0.2.1 -all")
        z("_dmarc.quarantining.test", "TXT", "v=DMARC1; p=quarantine")
        z("quarantining.test", "TXT", "v=spf1 ip4:192.0.2.1 -all")
        z("_dmarc.signed.test", "TXT", "v=DMARC1; p=reject; adkim=s")
        z("_dmarc.org.test", "TXT", "v=DMARC1; p=none; sp=reject")
        z("sub.org.test", "TXT", "v=spf1 -all")
        # MX
        z("multi.test", "MX", "20 b.multi.test.")
        z("multi.test", "MX", "10 a.multi.test.")
        z("nullmx.test", "MX", "0 .")
        z("nomx.test", "A", "127.0.0.9")
        yield srv


@pytest.fixture
def config(dns_server: DnsTestServer, tmp_path: Path) -> Config:
    return Config(
        hostname="mx.postfach.test",
        data_dir=tmp_path,
        smtp=SmtpConfig(dns_nameservers=("127.0.0.1",), dns_port=dns_server.port),
    )


def msg(from_: str, body: str = "hello\r\n") -> bytes:
    return (
        f"From: Someone <{from_}>\r\nTo: user@postfach.test\r\nSubject: test\r\n"
        f"Message-ID: <1@x>\r\nDate: Fri, 27 Nov 2026 09:00:00 +0000\r\n\r\n{body}"
    ).encode()


def parse_ar(header: bytes) -> authres.AuthenticationResultsHeader:
    text = header.decode()
    assert text.endswith("\r\n")
    return authres.AuthenticationResultsHeader.parse(text.rstrip("\r\n"))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("domain", "ip", "expected"),
    [
        ("pass.test", "127.0.0.1", "pass"),
        ("fail.test", "127.0.0.1", "fail"),
        ("fail.test", "192.0.2.7", "pass"),
        ("soft.test", "127.0.0.1", "softfail"),
        ("neutral.test", "127.0.0.1", "neutral"),
        ("incl.test", "127.0.0.1", "pass"),
        ("incl.test", "10.0.0.1", "fail"),
        ("mxspf.test", "127.0.5.200", "pass"),
        ("mxspf.test", "127.0.6.1", "fail"),
        ("redir.test", "127.0.0.1", "pass"),
        ("macro.test", "127.0.0.1", "pass"),
        ("macro.test", "127.0.0.3", "fail"),
        ("two.test", "127.0.0.1", "permerror"),
        ("other.test", "127.0.0.1", "none"),
        ("nosuch.test", "127.0.0.1", "none"),
        ("loop0.test", "127.0.0.1", "permerror"),
        ("loop3.test", "127.0.0.1", "pass"),
        ("pass.test", "::ffff:127.0.0.1", "pass"),
        ("pass.test", "2001:db8::1", "fail"),
    ],
)
async def test_spf(config: Config, domain: str, ip: str, expected: str) -> None:
    checker = InboundChecker(config, make_resolver(config))
    result, _ = await checker.spf.check_host(ip, domain, f"alice@{domain}", "helo.test")
    assert result == expected


@pytest.mark.asyncio
async def test_authentication_results_syntax_and_spf_identity(config: Config) -> None:
    checker = InboundChecker(config, make_resolver(config))
    v = await checker.check("127.0.0.1", "client.test", "bob@pass.test", msg("bob@pass.test"))
    ar = parse_ar(v.header)
    assert ar.authserv_id == "mx.postfach.test"
    by = {r.method: r for r in ar.results}
    assert by["spf"].result == "pass"
    assert [(p.type, p.name, p.value) for p in by["spf"].properties] == [("smtp", "mailfrom", "pass.test")]
    assert by["dkim"].result == "none"
    assert v.action == "accept"
    # null sender: SPF checks the HELO identity (RFC 7208 §2.4)
    v = await checker.check("127.0.0.1", "pass.test", "", msg("bob@pass.test"))
    spf = next(r for r in parse_ar(v.header).results if r.method == "spf")
    assert spf.result == "pass"
    assert spf.properties[0].name == "helo"


@pytest.mark.asyncio
async def test_dmarc_reject_and_configurable(config: Config, tmp_path: Path) -> None:
    checker = InboundChecker(config, make_resolver(config))
    v = await checker.check("127.0.0.1", "evil.test", "x@evil.test", msg("ceo@rejecting.test"))
    assert v.dmarc == "fail"
    assert v.dmarc_policy == "reject"
    assert v.action == "reject"
    dmarc = next(r for r in parse_ar(v.header).results if r.method == "dmarc")
    assert dmarc.result == "fail"
    assert dmarc.properties[0].value == "rejecting.test"
    relaxed = Config(hostname=config.hostname, data_dir=tmp_path,
                     smtp=SmtpConfig(dns_nameservers=config.smtp.dns_nameservers,
                                     dns_port=config.smtp.dns_port, dmarc_reject=False))
    v = await InboundChecker(relaxed, make_resolver(relaxed)).check(
        "127.0.0.1", "evil.test", "x@evil.test", msg("ceo@rejecting.test"))
    assert v.action == "quarantine"
    # aligned SPF pass → dmarc=pass, accepted
    v = await checker.check("192.0.2.1", "good.test", "news@rejecting.test", msg("ceo@rejecting.test"))
    assert (v.spf, v.dmarc, v.action) == ("pass", "pass", "accept")


@pytest.mark.asyncio
async def test_dmarc_quarantine_and_subdomain_policy(config: Config) -> None:
    checker = InboundChecker(config, make_resolver(config))
    v = await checker.check("127.0.0.1", "evil.test", "x@evil.test", msg("a@quarantining.test"))
    assert (v.dmarc, v.dmarc_policy, v.action) == ("fail", "quarantine", "quarantine")
    # sub.org.test has no _dmarc record of its own: the organisational domain's sp= applies
    v = await checker.check("127.0.0.1", "evil.test", "x@sub.org.test", msg("a@sub.org.test"))
    assert (v.dmarc, v.dmarc_policy, v.action) == ("fail", "reject", "reject")
    # no DMARC record anywhere
    v = await checker.check("127.0.0.1", "evil.test", "x@evil.test", msg("a@nowhere.test"))
    assert (v.dmarc, v.action) == ("none", "accept")


@pytest.mark.asyncio
@pytest.mark.parametrize("algorithm", ["ed25519", "rsa"])
async def test_dkim_sign_verify_round_trip(
    config: Config, dns_server: DnsTestServer, algorithm: str
) -> None:
    keys = keygen(config, "signed.test", algorithm, selector=f"t{algorithm}")
    for k in keys:
        dns_server.set(k.dns_name, "TXT", k.dns_txt)
    data = msg("boss@signed.test")
    signed = DkimSigner(config).sign(data, "signed.test") + data
    checker = InboundChecker(config, make_resolver(config))
    # SPF fails (no record for signed.test → none), DKIM aligned strictly → DMARC pass
    v = await checker.check("127.0.0.1", "h.test", "boss@signed.test", signed)
    assert [r.result for r in v.dkim] == ["pass"]
    assert v.dkim[0].algorithm == f"{algorithm}-sha256"
    assert (v.dmarc, v.action) == ("pass", "accept")
    dkim = next(r for r in parse_ar(v.header).results if r.method == "dkim")
    assert dkim.result == "pass"
    assert ("header", "d", "signed.test") in [(p.type, p.name, p.value) for p in dkim.properties]
    # a changed body breaks the signature, and DMARC p=reject then rejects
    tampered = signed.replace(b"hello", b"HELLO")
    v = await checker.check("127.0.0.1", "h.test", "boss@signed.test", tampered)
    assert [r.result for r in v.dkim] == ["fail"]
    assert (v.dmarc, v.action) == ("fail", "reject")


@pytest.mark.asyncio
async def test_dual_signature_and_missing_key(config: Config, dns_server: DnsTestServer) -> None:
    keys = keygen(config, "dual.test", "both", selector="d")
    assert sorted(k.algorithm for k in keys) == ["ed25519", "rsa"]
    data = msg("a@dual.test")
    sig = DkimSigner(config).sign(data, "dual.test")
    assert sig.count(b"DKIM-Signature:") == 2
    assert sig.endswith(b"\r\n")
    assert DkimSigner(config).sign(data, "nokey.test") == b""
    checker = InboundChecker(config, make_resolver(config))
    # keys not yet published: permerror for both
    v = await checker.check("127.0.0.1", "h.test", "a@dual.test", sig + data)
    assert [r.result for r in v.dkim] == ["permerror", "permerror"]
    for k in keys:
        dns_server.set(k.dns_name, "TXT", k.dns_txt)
    v = await checker.check("127.0.0.1", "h.test", "a@dual.test", sig + data)
    assert sorted(r.result for r in v.dkim) == ["pass", "pass"]
    assert len([r for r in parse_ar(v.header).results if r.method == "dkim"]) == 2


@pytest.mark.asyncio
async def test_garbage_message_gives_verdict(config: Config) -> None:
    checker = InboundChecker(config, make_resolver(config))
    for data in (b"", b"no headers at all", b"DKIM-Signature: garbage\r\n\r\nx", b"\x00\xff\r\n\r\n"):
        v = await checker.check("127.0.0.1", "", "", data)
        parse_ar(v.header)
        assert v.action == "accept"


@pytest.mark.asyncio
async def test_mx_lookup(config: Config) -> None:
    r = make_resolver(config)
    mx = await lookup_mx(r, "multi.test")
    assert mx.hosts == ("a.multi.test", "b.multi.test")
    assert (await lookup_mx(r, "nullmx.test")).null_mx
    implicit = await lookup_mx(r, "nomx.test")
    assert implicit.implicit and implicit.hosts == ("nomx.test",)
    assert not (await lookup_mx(r, "nonexistent.test")).exists


def test_organizational_domain_and_forged_results() -> None:
    assert organizational_domain("a.b.example.com") == "example.com"
    assert organizational_domain("mail.example.co.uk") == "example.co.uk"
    data = (b"Authentication-Results: mx.postfach.test; spf=pass\r\n"
            b"Authentication-Results: other.example; dkim=pass\r\nSubject: x\r\n\r\nbody")
    cleaned = remove_forged_results(data, "mx.postfach.test")
    assert cleaned == b"Authentication-Results: other.example; dkim=pass\r\nSubject: x\r\n\r\nbody"


@pytest.mark.asyncio
async def test_dns_trouble_gives_temperror_and_accepts(config: Config, dns_server: DnsTestServer) -> None:
    dns_server.add("flaky.test", "TXT", "v=spf1 -all")
    dns_server.fail("flaky.test")
    dns_server.fail("_dmarc.flaky.test")
    try:
        checker = InboundChecker(config, make_resolver(config))
        v = await checker.check("127.0.0.1", "h.test", "a@flaky.test", msg("a@flaky.test"))
    finally:
        dns_server.fail("flaky.test", False)
        dns_server.fail("_dmarc.flaky.test", False)
    assert (v.spf, v.dmarc, v.action) == ("temperror", "temperror", "accept")
    results = {r.method: r.result for r in parse_ar(v.header).results}
    assert results == {"spf": "temperror", "dkim": "none", "dmarc": "temperror"}


SPF_RESULTS = {"none", "neutral", "pass", "fail", "softfail", "temperror", "permerror"}
_term = st.one_of(
    st.sampled_from(["all", "-all", "~all", "?all", "+all", "mx", "a", "ptr", "a/24", "mx//64", "a:%{d}",
                     "exists:%{ir}.%{l1r+-}.x.test", "include:pass.test", "include:nosuch.test",
                     "redirect=pass.test", "ip4:127.0.0.1", "ip6:::1/128", "ip4:300.1.1.1", "exp=x.test",
                     "%{z}", "include:", "a:/33", "unknown=mod", "ip4:127.0.0.0/40", "mx:%{h}"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789:./%{}-+~?=_", min_size=1, max_size=20),
)


@pytest.mark.asyncio
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(terms=st.lists(_term, max_size=6), ip=st.sampled_from(["127.0.0.1", "192.0.2.1", "2001:db8::1"]))
async def test_spf_fuzz_always_gives_a_result(
    config: Config, dns_server: DnsTestServer, terms: list[str], ip: str
) -> None:
    dns_server.set("fuzz.test", "TXT", " ".join(["v=spf1", *terms]))
    checker = InboundChecker(config, make_resolver(config))
    result, _ = await checker.spf.check_host(ip, "fuzz.test", "user@fuzz.test", "helo.test")
    assert result in SPF_RESULTS


@pytest.mark.asyncio
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), sender=st.text(max_size=30), helo=st.text(max_size=20))
@example(data=b" ", sender="", helo="")  # dkimpy raised IndexError on this once
async def test_checker_fuzz_never_raises(config: Config, data: bytes, sender: str, helo: str) -> None:
    checker = InboundChecker(config, make_resolver(config))
    for blob in (data, b"DKIM-Signature: " + data + b"\r\nFrom: a@pass.test\r\n\r\nx"):
        v = await checker.check("127.0.0.1", helo, sender, blob)
        assert v.action in ("accept", "reject", "quarantine")
        assert v.header.startswith(b"Authentication-Results: mx.postfach.test;")


@pytest.mark.asyncio
async def test_rsa_sha1_signature_is_not_accepted(config: Config, dns_server: DnsTestServer) -> None:
    import dkim as dkimpy

    (key,) = keygen(config, "sha1.test", "rsa", selector="old")
    dns_server.set(key.dns_name, "TXT", key.dns_txt)
    data = msg("a@sha1.test")
    sig = dkimpy.sign(data, b"old", b"sha1.test", key.private, signature_algorithm=b"rsa-sha1")
    v = await InboundChecker(config, make_resolver(config)).check("127.0.0.1", "h", "a@sha1.test", sig + data)
    assert [(r.result, r.algorithm) for r in v.dkim] == [("fail", "rsa-sha1")]
