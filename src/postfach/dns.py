"""The one DNS resolver of postfach and the lookups mail needs (MX, addresses, TXT).

Every DNS query in postfach goes through :func:`make_resolver`, so the config's
``smtp.dns_nameservers`` / ``smtp.dns_port`` send all of them to one place (tests: a loopback
server). Lookups distinguish "the name does not exist / has no such record" (a definite answer)
from "DNS is broken right now" (``DnsTemporaryError``): mail code must retry on the second, never
bounce or fail a check (RFC 5321 §5.1, RFC 7208 §5 temperror).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.rdatatype
import dns.resolver

from postfach.config import Config

log = logging.getLogger("postfach.dns")

DNS_TIMEOUT_SECONDS = 5.0


class DnsTemporaryError(Exception):
    """SERVFAIL, timeout, no nameserver answered: try again later."""


def make_resolver(config: Config, *, cache: bool = False) -> dns.asyncresolver.Resolver:
    """The resolver for the whole process: the config's nameservers, else the system's.
    ``cache``: keep answers for their TTL (the outbound queue asks the same MX questions for
    every message to a busy destination)."""
    smtp = config.smtp
    if smtp.dns_nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = list(smtp.dns_nameservers)
        resolver.port = smtp.dns_port
    else:
        try:
            resolver = dns.asyncresolver.Resolver(configure=True)
        except dns.resolver.NoResolverConfiguration:
            # no /etc/resolv.conf (a bare container): a local resolver is the usual setup for mail
            log.warning("dns: no system resolver configured; using 127.0.0.1 "
                        "(set smtp.dns_nameservers to choose)")
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
        if smtp.dns_port != 53:
            resolver.port = smtp.dns_port
    resolver.timeout = DNS_TIMEOUT_SECONDS
    resolver.lifetime = DNS_TIMEOUT_SECONDS * 2
    # RFC 6840 §5.7: ask a validating resolver to tell us (AD) when an answer is DNSSEC-secure
    resolver.flags = dns.flags.RD | dns.flags.AD
    if cache:
        resolver.cache = dns.resolver.Cache()
    return resolver


async def query_records(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str) -> list[object] | None:
    """The answer's rdatas; None for NXDOMAIN (or a name that cannot exist); [] for NODATA.
    DnsTemporaryError when DNS itself failed."""
    rdatas, _secure = await query_validated(resolver, name, rdtype)
    return rdatas


async def query_validated(
    resolver: dns.asyncresolver.Resolver, name: str, rdtype: str
) -> tuple[list[object] | None, bool]:
    """Like ``query_records``, plus whether the resolver vouched for the answer with the AD flag
    (RFC 4035 §3.2.3; we trust the configured resolver to validate, as Postfix does with
    ``smtp_dns_support_level = dnssec``)."""
    try:
        qname = dns.name.from_text(name)
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return None, False  # malformed (empty label, too long, bad IDNA): no such name
    try:
        answer = await resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.YXDOMAIN):
        return None, False
    except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.LifetimeTimeout) as e:
        raise DnsTemporaryError(f"{name} {rdtype}: {e.__class__.__name__}") from None
    except dns.exception.DNSException as e:
        raise DnsTemporaryError(f"{name} {rdtype}: {e}") from None
    secure = bool(answer.response.flags & dns.flags.AD)
    if answer.rrset is None:
        return [], secure
    return list(answer.rrset), secure


async def lookup_txt(resolver: dns.asyncresolver.Resolver, name: str) -> list[str] | None:
    """TXT strings (each record's strings joined, RFC 7208 §3.3); None for NXDOMAIN."""
    rdatas = await query_records(resolver, name, "TXT")
    if rdatas is None:
        return None
    out = []
    for rd in rdatas:
        parts: list[bytes] = list(rd.strings)  # type: ignore[attr-defined]
        out.append(b"".join(parts).decode("utf-8", "replace"))
    return out


async def lookup_addresses(
    resolver: dns.asyncresolver.Resolver, host: str, *, ipv6: bool = True
) -> list[str]:
    """IPv4 then IPv6 addresses of ``host`` (both queried at once). [] when none exist."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return [host]
    queries = [query_records(resolver, host, "A")]
    if ipv6:
        queries.append(query_records(resolver, host, "AAAA"))
    results = await asyncio.gather(*queries, return_exceptions=True)
    out: list[str] = []
    errors: list[BaseException] = []
    for r in results:
        if isinstance(r, BaseException):
            errors.append(r)
        elif r:
            out.extend(str(rd) for rd in r)
    if not out and errors:
        raise DnsTemporaryError(str(errors[0]))
    return out


@dataclass(frozen=True)
class MxResult:
    """Where mail for a domain goes. ``hosts`` in the order to try them."""

    domain: str
    hosts: tuple[str, ...]
    null_mx: bool = False  # RFC 7505: the domain accepts no mail
    implicit: bool = False  # no MX record: the domain itself (RFC 5321 §5.1)
    exists: bool = True  # False: NXDOMAIN
    dnssec: bool = False  # the MX answer was DNSSEC-validated (AD) by the resolver


async def lookup_mx(resolver: dns.asyncresolver.Resolver, domain: str) -> MxResult:
    """MX hosts by preference, equal preferences shuffled (RFC 5321 §5.1); the implicit MX when
    the domain has none; ``null_mx`` for the RFC 7505 ``0 .`` record."""
    # An address literal [1.2.3.4] goes straight there (RFC 5321 §4.1.3)
    if domain.startswith("[") and domain.endswith("]"):
        lit = domain[1:-1]
        if lit.lower().startswith("ipv6:"):
            lit = lit[5:]
        return MxResult(domain, (lit,), implicit=True)
    rdatas, secure = await query_validated(resolver, domain, "MX")
    if rdatas is None:
        return MxResult(domain, (), exists=False)
    if not rdatas:
        # RFC 5321 §5.1: no MX → the domain is its own implicit MX (if it has addresses)
        return MxResult(domain, (domain,), implicit=True, dnssec=secure)
    records: list[tuple[int, str]] = []
    for rd in rdatas:
        pref = int(rd.preference)  # type: ignore[attr-defined]
        host = rd.exchange.to_text(omit_final_dot=True)  # type: ignore[attr-defined]
        records.append((pref, host))
    # RFC 7505 §3: a single MX with an empty exchange ("." ) means no mail at all
    if len(records) == 1 and records[0][1] in ("", "."):
        return MxResult(domain, (), null_mx=True, dnssec=secure)
    by_pref: dict[int, list[str]] = {}
    for pref, host in records:
        if host in ("", "."):
            continue
        by_pref.setdefault(pref, []).append(host)
    hosts: list[str] = []
    for pref in sorted(by_pref):
        group = by_pref[pref]
        random.shuffle(group)
        hosts.extend(h for h in group if h not in hosts)
    return MxResult(domain, tuple(hosts), dnssec=secure)
