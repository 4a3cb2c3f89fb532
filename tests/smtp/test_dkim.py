"""DKIM keys and signing, verified by dkimpy itself against keys published on a loopback DNS server."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dkim as dkimpy
import dns.resolver
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dnsserver import DnsTestServer
from postfach.config import Config, SmtpConfig
from postfach.dkim import DkimSigner, dns_records, keygen, load_keys

MESSAGE = (
    b"From: Alice <alice@sign.test>\r\nTo: bob@elsewhere.test\r\nSubject: signed\r\n"
    b"Date: Fri, 27 Nov 2026 09:00:00 +0000\r\nMessage-ID: <s1@sign.test>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\nHello,\r\n\r\n.line with dot\r\nbye  \r\n\r\n"
)


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsTestServer]:
    with DnsTestServer() as srv:
        yield srv


@pytest.fixture
def config(tmp_path: Path, dns_server: DnsTestServer) -> Config:
    return Config(data_dir=tmp_path, smtp=SmtpConfig(dns_nameservers=("127.0.0.1",), dns_port=dns_server.port))


def dnsfunc_for(dns_server: DnsTestServer) -> Callable[..., bytes | None]:
    """dkimpy's TXT lookup, through dnspython, at our loopback server (not the system's)."""
    res = dns.resolver.Resolver(configure=False)
    res.nameservers = ["127.0.0.1"]
    res.port = dns_server.port

    def get_txt(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            ans = res.resolve(name.decode(), "TXT", raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return None
        if ans.rrset is None:
            return None
        return b"".join(next(iter(ans.rrset)).strings)

    return get_txt


@pytest.mark.parametrize("algorithm", ["ed25519", "rsa"])
def test_sign_verify_with_dkimpy(config: Config, dns_server: DnsTestServer, algorithm: str) -> None:
    (key,) = keygen(config, "sign.test", algorithm, selector=f"k{algorithm}")
    dns_server.set(key.dns_name, "TXT", key.dns_txt)
    header = DkimSigner(config).sign(MESSAGE, "sign.test")
    assert header.startswith(b"DKIM-Signature: v=1; a=" + key.signature_algorithm)
    assert header.endswith(b"\r\n") and header.count(b"DKIM-Signature:") == 1
    assert b"c=relaxed/relaxed" in header and f"s=k{algorithm}".encode() in header
    signed = header + MESSAGE
    assert dkimpy.verify(signed, dnsfunc=dnsfunc_for(dns_server))
    # a header that was signed, changed after: the signature breaks
    assert not dkimpy.verify(signed.replace(b"Subject: signed", b"Subject: changed"),
                             dnsfunc=dnsfunc_for(dns_server))


def test_key_files_rotation_and_cache(config: Config) -> None:
    assert DkimSigner(config).sign(MESSAGE, "sign.test") == b""
    signer = DkimSigner(config)
    (old,) = keygen(config, "sign.test", "rsa", selector="old")
    assert old.path.name == "old.rsa.key"
    assert os.stat(old.path).st_mode & 0o777 == 0o600
    assert b"s=old;" in signer.sign(MESSAGE, "sign.test")
    # a newer key of the same algorithm takes over (rotation), picked up without a restart
    time.sleep(0.01)
    (new,) = keygen(config, "sign.test", "rsa", selector="new")
    os.utime(new.path, (time.time() + 5, time.time() + 5))
    os.utime(new.path.parent, (time.time() + 5, time.time() + 5))
    assert [k.selector for k in load_keys(config, "sign.test")] == ["new"]
    assert b"s=new;" in signer.sign(MESSAGE, "SIGN.test.")
    # junk in the key folder is ignored, not fatal
    (new.path.parent / "broken.ed25519.key").write_bytes(b"not a key")
    (new.path.parent / "README").write_text("notes")
    assert [k.algorithm for k in load_keys(config, "sign.test")] == ["rsa"]


def test_dns_records_list(config: Config) -> None:
    keygen(config, "rec.test", "both")
    rows = dns_records(config, "rec.test")
    kinds = [(name, rtype) for name, rtype, _v, _c in rows if rtype]
    assert ("rec.test.", "MX") in kinds and ("_dmarc.rec.test.", "TXT") in kinds
    assert ("postfach-ed25519._domainkey.rec.test.", "TXT") in kinds
    assert ("postfach-rsa._domainkey.rec.test.", "TXT") in kinds
    assert sum(1 for _n, t, _v, _c in rows if t == "SRV") == 6


def test_base64_seed_key_from_other_tools(config: Config, dns_server: DnsTestServer) -> None:
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    d = config.data_dir / "dkim" / "seed.test"
    d.mkdir(parents=True)
    (d / "rspamd.ed25519.key").write_bytes(base64.b64encode(seed) + b"\n")
    (loaded,) = load_keys(config, "seed.test")
    dns_server.set(loaded.dns_name, "TXT", loaded.dns_txt)
    signed = DkimSigner(config).sign(MESSAGE, "seed.test") + MESSAGE
    assert dkimpy.verify(signed.replace(b"alice@sign.test", b"alice@seed.test"), dnsfunc=dnsfunc_for(dns_server)) \
        is False  # From changed after signing
    assert dkimpy.verify(signed, dnsfunc=dnsfunc_for(dns_server))
