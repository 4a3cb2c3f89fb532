"""DKIM signing of outgoing mail, key generation, and the DNS records an operator must publish.

Keys live in ``<data_dir>/dkim/<domain>/<selector>.<algorithm>.key`` (PKCS#8 PEM, mode 0600),
``<algorithm>`` being ``ed25519`` or ``rsa``. A domain with both kinds is signed twice, as
RFC 8463 §4 recommends (Ed25519 for receivers that know it, RSA for the rest). Because one DNS
name can publish only one key record reliably (RFC 6376 §3.6.2.2), each algorithm gets its own
selector: ``<config.smtp.dkim_selector>-ed25519`` and ``<config.smtp.dkim_selector>-rsa``.

Signing and verification use dkimpy (with PyNaCl for Ed25519).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim as dkimpy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from postfach.config import Config
from postfach.errors import UsageError

log = logging.getLogger("postfach.smtp.dkim")

ALGORITHMS = ("ed25519", "rsa")
RSA_BITS = 2048
# Headers we sign (RFC 6376 §5.4.1); From is signed twice so that a second From cannot be added.
SIGNED_HEADERS: tuple[bytes, ...] = (
    b"from", b"from", b"reply-to", b"subject", b"date", b"to", b"cc", b"message-id",
    b"in-reply-to", b"references", b"mime-version", b"content-type", b"content-transfer-encoding",
    b"content-language", b"list-id", b"list-unsubscribe", b"list-unsubscribe-post",
)



# ----------------------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    algorithm: str  # "ed25519" or "rsa"
    path: Path
    private: bytes  # what dkimpy wants: base64 seed (ed25519) or PEM (rsa)
    public_b64: str  # the p= value

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def dns_txt(self) -> str:
        return f"v=DKIM1; k={self.algorithm}; p={self.public_b64}"

    @property
    def signature_algorithm(self) -> bytes:
        return b"ed25519-sha256" if self.algorithm == "ed25519" else b"rsa-sha256"


def key_dir(config: Config, domain: str) -> Path:
    return config.data_dir / "dkim" / domain.lower().rstrip(".")


def _load_key(domain: str, path: Path) -> DkimKey | None:
    name = path.name
    for algorithm in ALGORITHMS:
        suffix = f".{algorithm}.key"
        if name.endswith(suffix):
            selector = name[: -len(suffix)]
            break
    else:
        return None
    if not selector:
        return None
    pem = path.read_bytes()
    key: object
    if algorithm == "ed25519" and b"-----BEGIN" not in pem:
        # dkimpy's dknewkey (and rspamd) write the raw 32-byte seed in base64
        try:
            key = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(pem.strip(), validate=True))
        except (ValueError, binascii.Error):
            raise ValueError(f"{path}: neither PEM nor a base64 Ed25519 seed") from None
    else:
        key = serialization.load_pem_private_key(pem, password=None)
    if algorithm == "ed25519":
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 key")
        seed = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        private = base64.b64encode(seed)
    else:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path}: not an RSA key")
        pub = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    return DkimKey(domain, selector, algorithm, path, private, base64.b64encode(pub).decode("ascii"))


def load_keys(config: Config, domain: str) -> list[DkimKey]:
    """The newest key of each algorithm for ``domain`` (ed25519 first); [] when none."""
    d = key_dir(config, domain)
    try:
        paths = sorted(d.iterdir(), key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    chosen: dict[str, DkimKey] = {}
    for p in paths:
        try:
            k = _load_key(domain.lower(), p)
        except (OSError, ValueError) as e:
            log.warning("dkim: cannot load %s: %s", p, e)
            continue
        if k is not None and k.algorithm not in chosen:
            chosen[k.algorithm] = k
    return [chosen[a] for a in ALGORITHMS if a in chosen]


def keygen(
    config: Config, domain: str, algorithm: str = "both", selector: str | None = None
) -> list[DkimKey]:
    """Creates Ed25519 and/or RSA-2048 keys for ``domain``; refuses to overwrite one."""
    domain = domain.lower().rstrip(".")
    if not domain or "." not in domain or "/" in domain or domain.startswith("."):
        raise UsageError(f"{domain!r} is not a domain name")
    algs = ALGORITHMS if algorithm == "both" else (algorithm,)
    if any(a not in ALGORITHMS for a in algs):
        raise UsageError(f"unknown algorithm {algorithm!r} (ed25519, rsa or both)")
    d = key_dir(config, domain)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    planned: list[tuple[str, Path]] = []
    for a in algs:
        sel = selector if selector and len(algs) == 1 else (
            f"{selector}-{a}" if selector else f"{config.smtp.dkim_selector}-{a}"
        )
        path = d / f"{sel}.{a}.key"
        if path.exists():
            raise UsageError(f"{path} exists already (remove it or choose another --selector)")
        planned.append((a, path))
    made: list[DkimKey] = []
    for a, path in planned:
        key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
        if a == "ed25519":
            key = ed25519.Ed25519PrivateKey.generate()
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        loaded = _load_key(domain, path)
        assert loaded is not None
        made.append(loaded)
    return made


# -------------------------------------------------------------------------------------- signing


class DkimSigner:
    """``sign(data, domain)`` → DKIM-Signature header line(s) to prepend, or b"" without a key."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._cache: dict[str, tuple[float, list[DkimKey]]] = {}

    def keys(self, domain: str) -> list[DkimKey]:
        domain = domain.lower().rstrip(".")
        d = key_dir(self.config, domain)
        try:
            mtime = d.stat().st_mtime
        except OSError:
            self._cache.pop(domain, None)
            return []
        cached = self._cache.get(domain)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        keys = load_keys(self.config, domain)
        self._cache[domain] = (mtime, keys)
        return keys

    def sign(self, data: bytes, sender_domain: str) -> bytes:
        keys = self.keys(sender_domain)
        if not keys:
            return b""
        out = []
        # RSA first, Ed25519 on top: every receiver finds a signature it understands (RFC 8463 §4)
        for key in reversed(keys):
            try:
                sig = dkimpy.sign(
                    data,
                    key.selector.encode("ascii"),
                    key.domain.encode("ascii"),
                    key.private,
                    canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=[h for h in SIGNED_HEADERS if _has_header(data, h)] or [b"from"],
                    signature_algorithm=key.signature_algorithm,
                )
            except dkimpy.DKIMException as e:
                log.warning("dkim: cannot sign for %s with %s: %s", key.domain, key.selector, e)
                continue
            out.append(sig if sig.endswith(b"\r\n") else sig.rstrip(b"\r\n") + b"\r\n")
        return b"".join(reversed(out))


def _has_header(data: bytes, name: bytes) -> bool:
    if name == b"from":
        return True  # always signed (RFC 6376 §5.4), even if absent
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 2]
    low = b"\n" + head.lower()
    return (b"\n" + name + b":") in low or (b"\n" + name + b" :") in low


# ----------------------------------------------------------------------------------------- CLI


def _txt_chunks(value: str) -> str:
    """A TXT value as zone-file strings of at most 255 bytes (RFC 1035 §3.3.14)."""
    return " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))


SRV_SERVICES: tuple[tuple[str, str, str], ...] = (
    # (service label, listener protocol, tls mode) — RFC 6186 §3, RFC 8314 §5.1
    ("_imaps._tcp", "imap", "implicit"),
    ("_imap._tcp", "imap", "starttls"),
    ("_pop3s._tcp", "pop3", "implicit"),
    ("_pop3._tcp", "pop3", "starttls"),
    ("_submissions._tcp", "submission", "implicit"),
    ("_submission._tcp", "submission", "starttls"),
)


def dns_records(config: Config, domain: str) -> list[tuple[str, str, str, str]]:
    """(name, type, value, comment) for every record the operator should publish for ``domain``."""
    domain = domain.lower().rstrip(".")
    host = config.hostname.rstrip(".")
    rows: list[tuple[str, str, str, str]] = [
        (f"{domain}.", "MX", f"10 {host}.", f"mail for {domain} goes to {host} (which needs A/AAAA)"),
        (f"{domain}.", "TXT", _txt_chunks("v=spf1 mx -all"), "SPF: only the MX hosts send"),
    ]
    keys = load_keys(config, domain)
    for k in keys:
        rows.append((f"{k.dns_name}.", "TXT", _txt_chunks(k.dns_txt), f"DKIM {k.algorithm} key"))
    if not keys:
        rows.append(("", "", "", f"no DKIM key yet: run `postfach dkim keygen {domain}`"))
    rows.append((
        f"_dmarc.{domain}.", "TXT",
        _txt_chunks(f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}"), "DMARC policy",
    ))
    for label, proto, tls in SRV_SERVICES:
        ports = [lst.port for lst in config.listeners if lst.protocol == proto and lst.tls == tls]
        if ports:
            for prio, port in enumerate(ports):
                rows.append((f"{label}.{domain}.", "SRV", f"{prio} 1 {port} {host}.", "RFC 6186"))
        else:
            # RFC 6186 §4: target "." says the service is not offered here
            rows.append((f"{label}.{domain}.", "SRV", "0 0 0 .", "RFC 6186: not offered"))
    return rows


def _cmd_keygen(args: argparse.Namespace, config: Config) -> int:
    made = keygen(config, args.domain, args.algorithm, args.selector)
    for k in made:
        print(f"created {k.algorithm} key {k.path} (selector {k.selector})")
    print()
    print("Publish in DNS:")
    for k in made:
        print(f"{k.dns_name}. 3600 IN TXT {_txt_chunks(k.dns_txt)}")
    return 0


def _cmd_dns(args: argparse.Namespace, config: Config) -> int:
    domain = str(args.domain).lower().rstrip(".")
    if not domain or "." not in domain:
        raise UsageError(f"{args.domain!r} is not a domain name")
    rows = dns_records(config, domain)
    width = max(len(r[0]) for r in rows)
    out = sys.stdout
    out.write(f"; DNS records for {domain} (zone-file syntax)\n")
    for name, rtype, value, comment in rows:
        if not rtype:
            out.write(f"; {comment}\n")
            continue
        out.write(f"{name:<{width}} 3600 IN {rtype:<4} {value}   ; {comment}\n")
    return 0


def add_parsers(subparsers: Any) -> None:
    """Registers ``dkim keygen`` and ``dns`` on the CLI's subparsers."""
    p_dkim = subparsers.add_parser("dkim", help="DKIM signing keys")
    dkim_sub = p_dkim.add_subparsers(dest="dkim_command", required=True)
    p_gen = dkim_sub.add_parser("keygen", help="create DKIM keys for a domain (Ed25519 and RSA-2048)")
    p_gen.add_argument("domain")
    p_gen.add_argument("--algorithm", choices=("ed25519", "rsa", "both"), default="both")
    p_gen.add_argument("--selector", default=None, help="selector name (default: from config)")
    p_gen.set_defaults(func=_cmd_keygen)
    p_dns = subparsers.add_parser("dns", help="print the DNS records to publish for a domain")
    p_dns.add_argument("domain")
    p_dns.set_defaults(func=_cmd_dns)


def verify_with_records(data: bytes, records: dict[bytes, bytes | None], idx: int) -> tuple[bool, str]:
    """Verifies signature ``idx`` of ``data`` with TXT records fetched beforehand. (ok, reason)."""
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name.lower().rstrip(b"."))

    try:
        d = dkimpy.DKIM(data, minkey=1024, timeout=5)
        ok = bool(d.verify(idx=idx, dnsfunc=dnsfunc))
    except dkimpy.DKIMException as e:
        return False, str(e) or e.__class__.__name__
    except Exception as e:  # garbage can make dkimpy fail in other ways: a failed signature
        return False, f"unverifiable signature ({e.__class__.__name__})"
    return ok, "" if ok else "signature did not verify"


def signature_tags(data: bytes) -> list[dict[bytes, bytes]]:
    """The tag lists of every DKIM-Signature in ``data`` (top first); {} for an unparsable one."""
    try:
        d = dkimpy.DKIM(data)
    except Exception:  # dkimpy raises IndexError, ValueError ... on garbage, not only DKIMException
        return []
    out: list[dict[bytes, bytes]] = []
    for name, value in d.headers:
        if name.lower() == b"dkim-signature":
            try:
                out.append(dict(dkimpy.util.parse_tag_value(value)))
            except Exception:  # dkimpy raises several types for garbage
                out.append({})
    return out


__all__: Sequence[str] = (
    "DkimKey", "DkimSigner", "add_parsers", "dns_records", "keygen", "load_keys", "signature_tags",
    "verify_with_records",
)
