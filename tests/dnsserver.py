"""A real DNS server on loopback for tests (dnslib), serving one editable zone over UDP and TCP.

Usage::

    with DnsTestServer() as dns:
        dns.add("example.test", "MX", "10 mx.example.test.")
        dns.add("mx.example.test", "A", "127.0.0.2")
        dns.add("example.test", "TXT", "v=spf1 ip4:127.0.0.0/8 -all")
        config = Config(smtp=SmtpConfig(dns_nameservers=("127.0.0.1",), dns_port=dns.port))

Records may be added or removed while the server runs. Names are matched case-insensitively; a
name with no records at all answers NXDOMAIN, a name with other record types answers NODATA.
``fail(name)`` makes a name answer SERVFAIL (DNS trouble: mail code must retry, never bounce).
Long TXT values are split into 255-byte strings as a real zone would be. Both transports listen on
the same port, so dnspython's TCP retry of a truncated UDP answer works.
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType
from typing import Any

from dnslib import QTYPE, RCODE, RR, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer


def _norm(name: str) -> str:
    return name.rstrip(".").lower() + "."


class _Resolver(BaseResolver):  # type: ignore[misc]
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: dict[str, list[tuple[str, str, int]]] = {}
        self.queries: list[tuple[str, str]] = []
        self.servfail: set[str] = set()
        self.authenticated = False  # set the AD flag, as a DNSSEC-validating resolver would

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        reply.header.ad = 1 if self.authenticated else 0  # reply() copies the query's flags
        qname = _norm(str(request.q.qname))
        qtype = QTYPE[request.q.qtype]
        with self.lock:
            self.queries.append((qname, qtype))
            rrs = list(self.records.get(qname, ()))
            broken = qname in self.servfail
        if broken:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        if not rrs:
            # RFC 7208 §4.3 / RFC 7505 tests need real NXDOMAIN vs NODATA
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for rtype, value, ttl in rrs:
            if rtype == qtype or (rtype == "CNAME" and qtype != "CNAME"):
                for rr in RR.fromZone(f"{qname} {ttl} IN {rtype} {value}"):
                    reply.add_answer(rr)
        return reply


class _QuietLogger(DNSLogger):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__(log="-request,-reply,-truncated,-error,-recv,-send,-data")


def _txt_zone_value(value: str) -> str:
    raw = value.encode("utf-8")
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    out = []
    for c in chunks:
        s = c.decode("utf-8", "replace").replace("\\", "\\\\").replace('"', '\\"')
        out.append(f'"{s}"')
    return " ".join(out)


class DnsTestServer:
    """A loopback DNS server; ``port`` is where both UDP and TCP listen on 127.0.0.1."""

    def __init__(self, address: str = "127.0.0.1") -> None:
        self.address = address
        self.resolver = _Resolver()
        self.port = 0
        self._servers: list[Any] = []

    # --- zone ------------------------------------------------------------------------------------
    def add(self, name: str, rtype: str, value: str, ttl: int = 60) -> None:
        rtype = rtype.upper()
        if rtype == "TXT":
            value = _txt_zone_value(value)
        with self.resolver.lock:
            self.resolver.records.setdefault(_norm(name), []).append((rtype, value, ttl))

    def remove(self, name: str, rtype: str | None = None) -> None:
        with self.resolver.lock:
            key = _norm(name)
            if rtype is None:
                self.resolver.records.pop(key, None)
            else:
                kept = [r for r in self.resolver.records.get(key, []) if r[0] != rtype.upper()]
                if kept:
                    self.resolver.records[key] = kept
                else:
                    self.resolver.records.pop(key, None)

    def set(self, name: str, rtype: str, value: str) -> None:
        self.remove(name, rtype)
        self.add(name, rtype, value)

    def fail(self, name: str, failing: bool = True) -> None:
        """Answer SERVFAIL for ``name`` (a broken authoritative server) until told otherwise."""
        with self.resolver.lock:
            if failing:
                self.resolver.servfail.add(_norm(name))
            else:
                self.resolver.servfail.discard(_norm(name))

    def set_authenticated(self, on: bool) -> None:
        """Answer with AD=1 (DNSSEC-validated), for REQUIRETLS (RFC 8689 §4.2.1) tests."""
        self.resolver.authenticated = on

    @property
    def queries(self) -> list[tuple[str, str]]:
        with self.resolver.lock:
            return list(self.resolver.queries)

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        for _ in range(20):
            udp = DNSServer(self.resolver, address=self.address, port=0, logger=_QuietLogger())
            port = udp.server.server_address[1]
            try:
                tcp = DNSServer(self.resolver, address=self.address, port=port, tcp=True,
                                logger=_QuietLogger())
            except OSError:
                udp.server.server_close()
                continue
            self.port = port
            self._servers = [udp, tcp]
            for s in self._servers:
                s.server.allow_reuse_address = True
                s.start_thread()
            return
        raise RuntimeError("no free port for the test DNS server")

    def stop(self) -> None:
        for s in self._servers:
            s.stop()
            s.server.server_close()
        self._servers = []

    def __enter__(self) -> DnsTestServer:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])
