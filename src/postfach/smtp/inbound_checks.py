"""Sender authentication of mail arriving on the MX: SPF, DKIM, DMARC, Authentication-Results.

``InboundChecker(config, resolver).check(remote_ip, helo, mail_from, data)`` returns the
``Authentication-Results`` header (RFC 8601) to prepend and what to do with the message:

- SPF (RFC 7208) is evaluated here, with every query through postfach's one resolver: ip4, ip6,
  a, mx, ptr, include, exists, all, redirect, the macro language (§7), the limits of ten DNS
  mechanisms and two void lookups (§4.6.4).
- DKIM (RFC 6376, RFC 8463 Ed25519) with dkimpy; the key records are fetched through our resolver
  first, then dkimpy verifies against them.
- DMARC (RFC 7489): ``_dmarc`` record of the From domain, else of its organisational domain
  (a public-suffix heuristic), relaxed or strict alignment, ``p``/``sp``/``pct``.

DNS trouble never rejects mail: it gives ``temperror`` and the message is accepted (as OpenDMARC
and policyd-spf do by default).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Literal

import dns.asyncresolver

from postfach.config import Config
from postfach.dkim import signature_tags, verify_with_records
from postfach.dns import DnsTemporaryError, lookup_txt, query_records

log = logging.getLogger("postfach.smtp.checks")

Action = Literal["accept", "reject", "quarantine"]


@dataclass(frozen=True)
class DkimResult:
    result: str  # pass, fail, neutral, temperror, permerror, policy
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    b: str = ""  # first characters of b= (RFC 6008) to tell signatures apart
    reason: str = ""


@dataclass(frozen=True)
class InboundVerdict:
    header: bytes  # "Authentication-Results: ...\r\n"
    action: Action
    spf: str = "none"
    dkim: tuple[DkimResult, ...] = ()
    dmarc: str = "none"
    dmarc_policy: str = ""  # the policy that applied: none, quarantine, reject
    reason: str = ""  # for the 550 / log line
    from_domain: str = ""
    details: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ SPF


class _SpfPermError(Exception):
    pass


class _SpfTempError(Exception):
    pass


SPF_MAX_DNS_MECHANISMS = 10  # RFC 7208 §4.6.4
SPF_MAX_VOID_LOOKUPS = 2
SPF_MAX_MX_OR_PTR_NAMES = 10

_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MECH_RE = re.compile(r"^([+\-~?]?)([a-z][a-z0-9_.\-]*)(.*)$", re.IGNORECASE)
_MACRO_RE = re.compile(r"%\{([slodiphcrtvSLODIPHCRTV])(\d*)(r?)([.\-+,/_=]*)\}|%%|%_|%-")


@dataclass
class _SpfState:
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    sender: str
    helo: str
    dns_mechanisms: int = 0
    void_lookups: int = 0


class SpfEvaluator:
    """RFC 7208 check_host() over an async dnspython resolver."""

    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self.resolver = resolver

    async def check_host(self, ip: str, domain: str, sender: str, helo: str = "") -> tuple[str, str]:
        """(result, explanation): result is none/neutral/pass/fail/softfail/temperror/permerror."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return "permerror", f"bad client address {ip!r}"
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if "@" not in sender:
            sender = f"postmaster@{sender or domain}"
        state = _SpfState(addr, sender, helo)
        try:
            result = await self._check(state, domain.rstrip(".").lower(), depth=0)
        except _SpfPermError as e:
            return "permerror", str(e)
        except (_SpfTempError, DnsTemporaryError) as e:
            return "temperror", str(e)
        return result, ""

    async def _record(self, state: _SpfState, domain: str) -> str | None:
        if not _valid_domain(domain):
            return None  # RFC 7208 §4.3: malformed domain → none
        txts = await lookup_txt(self.resolver, domain)
        records = [t for t in (txts or []) if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]
        if len(records) > 1:
            raise _SpfPermError(f"{domain} has {len(records)} SPF records")  # RFC 7208 §4.5
        return records[0] if records else None

    def _count_dns(self, state: _SpfState) -> None:
        state.dns_mechanisms += 1
        if state.dns_mechanisms > SPF_MAX_DNS_MECHANISMS:
            raise _SpfPermError("more than 10 DNS-querying terms (RFC 7208 §4.6.4)")

    def _void(self, state: _SpfState) -> None:
        state.void_lookups += 1
        if state.void_lookups > SPF_MAX_VOID_LOOKUPS:
            raise _SpfPermError("more than 2 void lookups (RFC 7208 §4.6.4)")

    async def _check(self, state: _SpfState, domain: str, depth: int) -> str:
        if depth > 20:
            raise _SpfPermError("include/redirect loop")
        record = await self._record(state, domain)
        if record is None:
            return "none"
        terms = record.split()[1:]
        redirect: str | None = None
        mechanisms: list[tuple[str, str, str]] = []
        for term in terms:
            m = _MECH_RE.match(term)
            if not m:
                raise _SpfPermError(f"bad SPF term {term!r}")
            qual, name, rest = m.group(1), m.group(2).lower(), m.group(3)
            if rest.startswith("=") and not qual:
                # a modifier (RFC 7208 §6): redirect and exp matter, unknown ones are ignored
                if name == "redirect":
                    if redirect is not None:
                        raise _SpfPermError("two redirect= modifiers")
                    redirect = rest[1:]
                continue
            if name not in ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"):
                raise _SpfPermError(f"unknown mechanism {name!r}")
            mechanisms.append((_QUALIFIERS[qual or "+"], name, rest))
        for result, name, arg in mechanisms:
            if await self._matches(state, domain, name, arg, depth):
                return result
        if redirect is not None:
            # RFC 7208 §6.1: only when no mechanism matched; "none" from the target is permerror
            self._count_dns(state)
            target = self._expand(state, redirect, domain)
            r = await self._check(state, target, depth + 1)
            if r == "none":
                raise _SpfPermError(f"redirect to {target} found no SPF record")
            return r
        return "neutral"  # RFC 7208 §4.7

    async def _matches(self, state: _SpfState, domain: str, name: str, arg: str, depth: int) -> bool:
        ip = state.ip
        if name == "all":
            if arg:
                raise _SpfPermError(f"bad 'all{arg}'")
            return True
        if name in ("ip4", "ip6"):
            if not arg.startswith(":"):
                raise _SpfPermError(f"{name} needs an address")
            try:
                net = ipaddress.ip_network(arg[1:], strict=False)
            except ValueError:
                raise _SpfPermError(f"bad network {arg[1:]!r}") from None
            if (name == "ip4") != (net.version == 4):
                raise _SpfPermError(f"{name} with a version-{net.version} network")
            return ip.version == net.version and ip in net
        if name == "include":
            self._count_dns(state)
            if not arg.startswith(":"):
                raise _SpfPermError("include needs a domain")
            target = self._expand(state, arg[1:], domain)
            r = await self._check(state, target, depth + 1)
            # RFC 7208 §5.2 table
            if r == "pass":
                return True
            if r in ("fail", "softfail", "neutral"):
                return False
            if r == "temperror":
                raise _SpfTempError(f"include:{target}")
            raise _SpfPermError(f"include:{target} gave {r}")
        if name == "exists":
            self._count_dns(state)
            if not arg.startswith(":"):
                raise _SpfPermError("exists needs a domain")
            target = self._expand(state, arg[1:], domain)
            rd = await query_records(self.resolver, target, "A")
            if not rd:
                self._void(state)
            return bool(rd)
        # a, mx, ptr: optional :domain, optional /cidr4 and //cidr6
        spec, cidr4, cidr6 = _split_cidr(arg)
        target = self._expand(state, spec[1:], domain) if spec.startswith(":") else domain
        if spec and not spec.startswith(":"):
            raise _SpfPermError(f"bad {name} argument {arg!r}")
        self._count_dns(state)
        if name == "a":
            return await self._addr_match(state, target, cidr4, cidr6)
        if name == "mx":
            rd = await query_records(self.resolver, target, "MX")
            if not rd:
                self._void(state)
                return False
            if len(rd) > SPF_MAX_MX_OR_PTR_NAMES:
                raise _SpfPermError(f"{target} has more than 10 MX records")
            for rec in rd:
                host = rec.exchange.to_text(omit_final_dot=True)  # type: ignore[attr-defined]
                if host and await self._addr_match(state, host, cidr4, cidr6, count_void=False):
                    return True
            return False
        # ptr (RFC 7208 §5.5, "SHOULD NOT be used"): validated reverse names ending in target
        try:
            rev = ipaddress.ip_address(ip).reverse_pointer
            ptrs = await query_records(self.resolver, rev, "PTR")
        except DnsTemporaryError:
            return False  # §5.5: a temporary error here is treated as no match
        for p in (ptrs or [])[:SPF_MAX_MX_OR_PTR_NAMES]:
            name_ = p.target.to_text(omit_final_dot=True).lower()  # type: ignore[attr-defined]
            if name_ == target or name_.endswith("." + target):
                try:
                    if await self._addr_match(state, name_, None, None, count_void=False):
                        return True
                except DnsTemporaryError:
                    continue
        return False

    async def _addr_match(
        self, state: _SpfState, host: str, cidr4: int | None, cidr6: int | None, count_void: bool = True
    ) -> bool:
        ip = state.ip
        rdtype = "A" if ip.version == 4 else "AAAA"
        rd = await query_records(self.resolver, host, rdtype)
        if not rd:
            if count_void:
                self._void(state)
            return False
        prefix = (cidr4 if ip.version == 4 else cidr6)
        for r in rd:
            addr = ipaddress.ip_address(str(r))
            bits = prefix if prefix is not None else addr.max_prefixlen
            if ip in ipaddress.ip_network(f"{addr}/{bits}", strict=False):
                return True
        return False

    def _expand(self, state: _SpfState, spec: str, domain: str) -> str:
        """RFC 7208 §7 macro expansion (the parts used in domain-spec)."""
        local, _, sdomain = state.sender.rpartition("@")

        def letter_value(c: str) -> str:
            c = c.lower()
            ip = state.ip
            if c == "s":
                return state.sender
            if c == "l":
                return local or "postmaster"
            if c == "o":
                return sdomain
            if c == "d":
                return domain
            if c in ("i", "c"):
                if ip.version == 4:
                    return str(ip)
                return ".".join(ip.exploded.replace(":", "")) if c == "i" else str(ip)
            if c == "v":
                return "in-addr" if ip.version == 4 else "ip6"
            if c == "h":
                return state.helo or domain
            if c == "p":
                return "unknown"
            if c == "r":
                return "unknown"
            if c == "t":
                return "0"
            raise _SpfPermError(f"bad macro letter {c!r}")

        def repl(m: re.Match[str]) -> str:
            whole = m.group(0)
            if whole == "%%":
                return "%"
            if whole == "%_":
                return " "
            if whole == "%-":
                return "%20"
            value = letter_value(m.group(1))
            delims = m.group(4) or "."
            parts = re.split("[" + re.escape(delims) + "]", value)
            if m.group(3):
                parts.reverse()
            if m.group(2):
                n = int(m.group(2))
                if n == 0:
                    raise _SpfPermError("macro with 0 labels")
                parts = parts[-n:]
            return ".".join(parts)

        if "%" not in spec:
            return spec.rstrip(".").lower()
        out = _MACRO_RE.sub(repl, spec)
        if "%" in out.replace("%20", ""):
            raise _SpfPermError(f"bad macro in {spec!r}")
        # §7.3: longer than 253 → drop labels from the left
        while len(out) > 253 and "." in out:
            out = out.split(".", 1)[1]
        return out.rstrip(".").lower()


def _split_cidr(arg: str) -> tuple[str, int | None, int | None]:
    cidr4: int | None = None
    cidr6: int | None = None
    m = re.search(r"(?:/(\d+))?(?://(\d+))?$", arg)
    if m and m.group(0):
        if m.group(1) is not None:
            cidr4 = int(m.group(1))
            if cidr4 > 32:
                raise _SpfPermError(f"bad ip4 prefix /{cidr4}")
        if m.group(2) is not None:
            cidr6 = int(m.group(2))
            if cidr6 > 128:
                raise _SpfPermError(f"bad ip6 prefix //{cidr6}")
        arg = arg[: m.start()]
    return arg, cidr4, cidr6


def _valid_domain(domain: str) -> bool:
    if not domain or len(domain) > 253 or "." not in domain:
        return False
    return all(0 < len(label) <= 63 for label in domain.split("."))


# ---------------------------------------------------------------------------------------- DMARC

# Public suffixes with more than one label that are common in mail; enough for the heuristic the
# brief allows (a full Public Suffix List would be the complete answer).
_MULTI_LABEL_SUFFIXES = frozenset(
    f"{sld}.{cc}"
    for cc in ("uk", "au", "nz", "za", "jp", "br", "in", "il", "kr", "tr", "mx", "ar", "sg", "hk", "tw",
               "cn", "id", "my", "th", "ua", "pl", "at")
    for sld in ("co", "com", "org", "net", "ac", "gov", "edu", "ne", "or", "go", "gob", "gv", "waw")
) | frozenset({"github.io", "herokuapp.com", "blogspot.com", "azurewebsites.net", "cloudfront.net"})


def organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2 with a small public-suffix list: the registered domain."""
    labels = domain.lower().rstrip(".").split(".")
    if len(labels) <= 2:
        return ".".join(labels)
    if ".".join(labels[-2:]) in _MULTI_LABEL_SUFFIXES:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def _aligned(a: str, b: str, mode: str) -> bool:
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)


def parse_dmarc(record: str) -> dict[str, str] | None:
    tags: dict[str, str] = {}
    for part in record.split(";"):
        k, eq, v = part.strip().partition("=")
        if eq:
            tags.setdefault(k.strip().lower(), v.strip())
    if tags.get("v") != "DMARC1":
        return None
    p = tags.get("p", "").lower()
    if p not in ("none", "quarantine", "reject"):
        # RFC 7489 §6.6.3: a bad/missing p with a valid rua is treated as none; simpler: invalid
        if "rua" in tags:
            tags["p"] = "none"
        else:
            return None
    return tags


# ------------------------------------------------------------------------------ the checker


def _header_fields(data: bytes) -> list[tuple[str, str]]:
    end = data.find(b"\r\n\r\n")
    head = data[: end + 2] if end >= 0 else data
    fields: list[tuple[str, str]] = []
    for line in re.split(rb"\r?\n(?![ \t])", head):
        if not line.strip():
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        fields.append((name.strip().decode("ascii", "replace").lower(),
                       re.sub(r"\r?\n[ \t]", " ", value.decode("utf-8", "replace")).strip()))
    return fields


def from_domains(data: bytes) -> list[str]:
    """The domains of the RFC5322.From addresses (RFC 7489 §6.6.1)."""
    values = [v for n, v in _header_fields(data) if n == "from"]
    out = []
    for _, addr in getaddresses(values):
        if "@" in addr:
            out.append(addr.rpartition("@")[2].strip().lower().rstrip(">").rstrip("."))
    return out


def _ar_value(s: str) -> str:
    """A value for a ptype.property (RFC 8601 §2.2: a token, or a quoted string)."""
    if s and re.fullmatch(r"[A-Za-z0-9!#$%&'*+\-./=?^_`{|}~@]+", s):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ar_comment(s: str) -> str:
    clean = re.sub(r"[()\\\r\n]", " ", s)[:120].strip()
    return f" ({clean})" if clean else ""


class InboundChecker:
    def __init__(self, config: Config, resolver: dns.asyncresolver.Resolver) -> None:
        self.config = config
        self.resolver = resolver
        self.spf = SpfEvaluator(resolver)

    async def check(self, remote_ip: str, helo: str, mail_from: str, data: bytes) -> InboundVerdict:
        spf_task = asyncio.ensure_future(self._spf(remote_ip, helo, mail_from))
        dkim_results = await self._dkim(data)
        spf_result, spf_domain, spf_identity, spf_reason = await spf_task
        return await self._dmarc(data, spf_result, spf_domain, spf_identity, spf_reason, dkim_results)

    async def _spf(self, remote_ip: str, helo: str, mail_from: str) -> tuple[str, str, str, str]:
        if mail_from and "@" in mail_from:
            domain = mail_from.rpartition("@")[2].lower().rstrip(".")
            identity = "smtp.mailfrom"
            sender = mail_from
        else:
            # RFC 7208 §2.4: the null sender is checked as postmaster@<helo>
            domain = helo.lower().strip("[]").rstrip(".")
            identity = "smtp.helo"
            sender = f"postmaster@{domain}"
        if not _valid_domain(domain):
            return "none", domain, identity, ""
        result, reason = await self.spf.check_host(remote_ip, domain, sender, helo)
        return result, domain, identity, reason

    async def _dkim(self, data: bytes) -> list[DkimResult]:
        sigs = signature_tags(data)
        if not sigs:
            return []
        results: list[DkimResult] = []
        for idx, tags in enumerate(sigs[:8]):  # cap the work one message can ask for
            d = tags.get(b"d", b"").decode("ascii", "replace").strip().lower()
            s = tags.get(b"s", b"").decode("ascii", "replace").strip().lower()
            a = tags.get(b"a", b"").decode("ascii", "replace").strip().lower()
            b = re.sub(r"\s+", "", tags.get(b"b", b"").decode("ascii", "replace"))[:8]
            if not d or not s:
                results.append(DkimResult("permerror", d, s, a, b, "signature lacks d= or s="))
                continue
            if a == "rsa-sha1":
                # RFC 8301 §3.1: verifiers MUST NOT consider rsa-sha1 signatures valid
                results.append(DkimResult("fail", d, s, a, b, "rsa-sha1 is not accepted (RFC 8301)"))
                continue
            name = f"{s}._domainkey.{d}"
            try:
                txts = await lookup_txt(self.resolver, name)
            except DnsTemporaryError as e:
                results.append(DkimResult("temperror", d, s, a, b, str(e)))
                continue
            if not txts:
                results.append(DkimResult("permerror", d, s, a, b, f"no key at {name}"))
                continue
            records: dict[bytes, bytes | None] = {name.encode(): txts[0].encode()}
            ok, reason = await asyncio.to_thread(verify_with_records, data, records, idx)
            if ok:
                results.append(DkimResult("pass", d, s, a, b))
            else:
                kind = "neutral" if "unknown" in reason.lower() and "algorithm" in reason.lower() else "fail"
                results.append(DkimResult(kind, d, s, a, b, reason))
        return results

    async def _dmarc(
        self, data: bytes, spf_result: str, spf_domain: str, spf_identity: str, spf_reason: str,
        dkim_results: Sequence[DkimResult],
    ) -> InboundVerdict:
        hostname = self.config.hostname
        parts = [f"spf={spf_result}{_ar_comment(spf_reason)} {spf_identity}={_ar_value(spf_domain or '')}"]
        if not dkim_results:
            parts.append("dkim=none")
        for r in dkim_results:
            s = f"dkim={r.result}{_ar_comment(r.reason)} header.d={_ar_value(r.domain or 'unknown')}"
            if r.selector:
                s += f" header.s={_ar_value(r.selector)}"
            if r.algorithm:
                s += f" header.a={_ar_value(r.algorithm)}"
            if r.b:
                s += f" header.b={_ar_value(r.b)}"
            parts.append(s)

        domains = from_domains(data)
        dmarc = "none"
        policy = ""
        action: Action = "accept"
        reason = ""
        from_domain = ""
        if len(set(domains)) == 1:
            from_domain = domains[0]
            dmarc, policy, reason = await self._evaluate_dmarc(from_domain, spf_result, spf_domain,
                                                               dkim_results)
            comment = f" (p={policy})" if policy else ""
            parts.append(f"dmarc={dmarc}{comment} header.from={_ar_value(from_domain)}")
            if dmarc == "fail":
                if policy == "reject":
                    action = "reject" if self.config.smtp.dmarc_reject else "quarantine"
                elif policy == "quarantine":
                    action = "quarantine"
        elif len(set(domains)) > 1:
            # RFC 7489 §6.6.1: several From domains — we cannot pick one; report it, take no action
            dmarc = "permerror"
            parts.append("dmarc=permerror (several From domains)")
        else:
            parts.append("dmarc=none (no From domain)")
        header = ("Authentication-Results: " + hostname + ";\r\n\t" + ";\r\n\t".join(parts) + "\r\n")
        return InboundVerdict(
            header=header.encode("utf-8"), action=action, spf=spf_result, dkim=tuple(dkim_results),
            dmarc=dmarc, dmarc_policy=policy, reason=reason, from_domain=from_domain,
        )

    async def _evaluate_dmarc(
        self, from_domain: str, spf_result: str, spf_domain: str, dkim_results: Sequence[DkimResult]
    ) -> tuple[str, str, str]:
        """(result, policy, reason) per RFC 7489 §6.6."""
        try:
            tags, at_org = await self._dmarc_record(from_domain)
        except DnsTemporaryError:
            return "temperror", "", "DNS failure fetching the DMARC record"
        if tags is None:
            return "none", "", ""
        p = tags.get("p", "none").lower()
        policy = tags.get("sp", p).lower() if at_org else p
        if policy not in ("none", "quarantine", "reject"):
            policy = p
        adkim = tags.get("adkim", "r").lower()
        aspf = tags.get("aspf", "r").lower()
        dkim_ok = any(r.result == "pass" and _aligned(r.domain, from_domain, adkim) for r in dkim_results)
        spf_ok = spf_result == "pass" and bool(spf_domain) and _aligned(spf_domain, from_domain, aspf)
        if dkim_ok or spf_ok:
            return "pass", policy, ""
        try:
            pct = int(tags.get("pct", "100"))
        except ValueError:
            pct = 100
        # RFC 7489 §6.6.4: pct < 100 samples; the rest gets the next milder policy
        if pct < 100 and random.randint(1, 100) > pct:
            policy = {"reject": "quarantine", "quarantine": "none"}.get(policy, policy)
        return "fail", policy, f"DMARC policy of {from_domain} ({policy}): neither SPF nor DKIM aligned"

    async def _dmarc_record(self, from_domain: str) -> tuple[dict[str, str] | None, bool]:
        """RFC 7489 §6.6.3: the From domain's record, else the organisational domain's."""
        for candidate, at_org in ((from_domain, False), (organizational_domain(from_domain), True)):
            if at_org and candidate == from_domain:
                break
            txts = await lookup_txt(self.resolver, f"_dmarc.{candidate}")
            records = [t for t in (txts or []) if t.replace(" ", "").startswith("v=DMARC1")]
            if len(records) == 1:
                parsed = parse_dmarc(records[0])
                if parsed is not None:
                    return parsed, at_org
        return None, False


def remove_forged_results(data: bytes, authserv_id: str) -> bytes:
    """Drops Authentication-Results fields that claim to be ours (RFC 8601 §5: a receiver MUST
    remove or rename those before adding its own), leaving every other byte as it was."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data
    head, body = data[: end + 2], data[end + 2 :]
    lines = re.split(rb"(?<=\n)(?![ \t])", head)
    ours = authserv_id.lower().encode()
    kept = []
    for field_ in lines:
        name, colon, value = field_.partition(b":")
        if colon and name.strip().lower() == b"authentication-results":
            ident = re.split(rb"[;\s(]", value.strip(), maxsplit=1)[0].lower()
            if ident == ours:
                continue
        kept.append(field_)
    return b"".join(kept) + body
