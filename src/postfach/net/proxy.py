"""PROXY protocol v1 and v2 (HAProxy, "The PROXY protocol", versions 1 and 2), sans-I/O.

A load balancer in front of several nodes opens the TCP connection itself; with the PROXY protocol
it first sends one header naming the real client's address, so that throttling, logs and
``Received`` headers see the client rather than the balancer. The header comes before anything
else on the connection (before the TLS handshake on implicit-TLS ports).

Use it only on listeners configured for it, and only from trusted peers: the spec forbids guessing
("the receiver MUST NOT try to guess whether the protocol header is present or not") — on such a
listener a connection without a valid header is closed, and a header from an untrusted peer is a
spoofing attempt.

::

    rx = ProxyReceiver()
    rx.feed(data)
    ev = rx.next_event()      # NEED_DATA, or a ProxyHeader (then rx.trailing is the protocol's data)

``parse(buf)`` does the same on a buffer: ``None`` (need more bytes) or ``(header, consumed)``.
Errors raise :class:`ProxyProtocolError`; the connection should then be closed without a reply.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX_LINE = 107  # spec §2.1: "a receiver can always read 107 bytes" (CRLF included)
V2_FIXED = 16
V2_MAX_LENGTH = 4096  # far above any real header (addresses + a few TLVs); protects the buffer

# v2 TLV types (spec §2.2.7)
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_TYPE_NETNS = 0x30


class ProxyProtocolError(Exception):
    """The peer did not send a valid PROXY header (a RemoteProtocolError: close the connection)."""


class NeedData(enum.Enum):
    NEED_DATA = "need-data"


NEED_DATA = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the proxy says about the connection. ``source``/``destination`` are None when the
    proxy gives no address (v1 UNKNOWN, v2 LOCAL or UNSPEC): then the peer's own address counts."""

    version: int  # 1 or 2
    local: bool  # v2 LOCAL: the proxy's own connection (health check), not a relayed client
    family: str  # "tcp4", "tcp6", "udp4", "udp6", "unix", "unknown"
    source: tuple[str, int] | None = None  # (address, port); for unix: (path, 0)
    destination: tuple[str, int] | None = None
    tlvs: tuple[tuple[int, bytes], ...] = field(default=())

    @property
    def client_ip(self) -> str | None:
        """The real client's IP address, or None when the peer's address stands."""
        if self.source is None or self.family not in ("tcp4", "tcp6", "udp4", "udp6"):
            return None
        return self.source[0]

    def tlv(self, kind: int) -> bytes | None:
        for k, v in self.tlvs:
            if k == kind:
                return v
        return None


# ------------------------------------------------------------------------------------------ v1


def _port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text.startswith(b"0")):
        raise ProxyProtocolError(f"PROXY v1: bad port {text[:8]!r}")
    n = int(text)
    if n > 65535:
        raise ProxyProtocolError(f"PROXY v1: port {n} out of range")
    return n


def _parse_v1(buf: bytes) -> tuple[ProxyHeader, int] | None:
    end = buf.find(b"\r\n", 0, V1_MAX_LINE)
    if end < 0:
        if len(buf) >= V1_MAX_LINE or b"\n" in buf[:V1_MAX_LINE] or b"\r" in buf[: max(0, len(buf) - 1)]:
            raise ProxyProtocolError("PROXY v1: no CRLF within 107 bytes")
        return None
    line = buf[:end]
    parts = line.split(b" ")
    if len(parts) < 2 or parts[0] != b"PROXY":
        raise ProxyProtocolError("PROXY v1: malformed header")
    proto = parts[1]
    if proto == b"UNKNOWN":
        # spec §2.1: the rest of the line up to CRLF is ignored
        return ProxyHeader(1, False, "unknown"), end + 2
    if proto not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(f"PROXY v1: unknown protocol {proto[:8]!r}")
    if len(parts) != 6:
        raise ProxyProtocolError("PROXY v1: expected 'PROXY TCPx src dst sport dport'")
    try:
        src_s, dst_s = parts[2].decode("ascii"), parts[3].decode("ascii")
        if proto == b"TCP4":
            src: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(src_s)
            dst: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(dst_s)
        else:
            src, dst = ipaddress.IPv6Address(src_s), ipaddress.IPv6Address(dst_s)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProxyProtocolError(f"PROXY v1: bad address: {exc}") from None
    family = "tcp4" if proto == b"TCP4" else "tcp6"
    return ProxyHeader(1, False, family, (str(src), _port(parts[4])), (str(dst), _port(parts[5]))), end + 2


# ------------------------------------------------------------------------------------------ v2


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as PP2_TYPE_CRC32C uses."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC32C[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


_FAMILIES = {0x1: ("4", 12), 0x2: ("6", 36), 0x3: ("unix", 216)}


def _parse_v2(buf: bytes) -> tuple[ProxyHeader, int] | None:
    if len(buf) < V2_FIXED:
        return None
    ver_cmd, fam, length = buf[12], buf[13], struct.unpack("!H", buf[14:16])[0]
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"PROXY v2: version {ver_cmd >> 4} not supported")
    command = ver_cmd & 0x0F
    if command not in (0, 1):
        raise ProxyProtocolError(f"PROXY v2: unknown command {command}")
    if length > V2_MAX_LENGTH:
        raise ProxyProtocolError(f"PROXY v2: header of {length} bytes is too long")
    total = V2_FIXED + length
    if len(buf) < total:
        return None
    body = buf[V2_FIXED:total]
    af, transport = fam >> 4, fam & 0x0F
    if af > 3 or transport > 2:
        raise ProxyProtocolError(f"PROXY v2: unknown address family/transport 0x{fam:02x}")
    source = destination = None
    family = "unknown"
    addr_len = 0
    if af in _FAMILIES and transport in (1, 2):
        tag, addr_len = _FAMILIES[af]
        if length < addr_len:
            raise ProxyProtocolError("PROXY v2: address block shorter than its family needs")
        if af == 0x1:
            s, d = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
            sp, dp = struct.unpack("!HH", body[8:12])
            source, destination = (str(s), sp), (str(d), dp)
        elif af == 0x2:
            s6, d6 = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
            sp, dp = struct.unpack("!HH", body[32:36])
            source, destination = (str(s6), sp), (str(d6), dp)
        else:
            spath = body[0:108].split(b"\x00", 1)[0].decode("utf-8", "replace")
            dpath = body[108:216].split(b"\x00", 1)[0].decode("utf-8", "replace")
            source, destination = (spath, 0), (dpath, 0)
        family = "unix" if af == 0x3 else ("tcp" if transport == 1 else "udp") + tag
    tlvs: list[tuple[int, bytes]] = []
    pos = addr_len
    crc_at: int | None = None
    while pos < length:
        if length - pos < 3:
            raise ProxyProtocolError("PROXY v2: truncated TLV")
        kind, n = body[pos], struct.unpack("!H", body[pos + 1 : pos + 3])[0]
        if pos + 3 + n > length:
            raise ProxyProtocolError("PROXY v2: TLV runs past the header")
        value = body[pos + 3 : pos + 3 + n]
        if kind == PP2_TYPE_CRC32C:
            if n != 4:
                raise ProxyProtocolError("PROXY v2: CRC32C TLV must hold 4 bytes")
            crc_at = V2_FIXED + pos + 3
        tlvs.append((kind, value))
        pos += 3 + n
    if crc_at is not None:
        whole = bytearray(buf[:total])
        want = struct.unpack("!I", whole[crc_at : crc_at + 4])[0]
        whole[crc_at : crc_at + 4] = b"\x00\x00\x00\x00"
        if crc32c(bytes(whole)) != want:
            raise ProxyProtocolError("PROXY v2: CRC32C mismatch")
    if command == 0:  # LOCAL: addresses are to be ignored (spec §2.2)
        return ProxyHeader(2, True, "unknown", None, None, tuple(tlvs)), total
    return ProxyHeader(2, False, family, source, destination, tuple(tlvs)), total


# --------------------------------------------------------------------------------------- entry


def parse(buf: bytes) -> tuple[ProxyHeader, int] | None:
    """A header at the start of ``buf``: ``(header, bytes consumed)``, or None when more bytes are
    needed to decide. Raises ProxyProtocolError when ``buf`` does not start with a valid header."""
    n = min(len(buf), len(V2_SIGNATURE))
    if buf[:n] == V2_SIGNATURE[:n]:
        return _parse_v2(buf) if n == len(V2_SIGNATURE) else None
    n = min(len(buf), len(V1_PREFIX))
    if buf[:n] == V1_PREFIX[:n]:
        return _parse_v1(buf) if n == len(V1_PREFIX) else None
    raise ProxyProtocolError("the connection does not start with a PROXY protocol header")


class ProxyReceiver:
    """Feed bytes; ``next_event()`` gives NEED_DATA until the header is complete, then the
    :class:`ProxyHeader` (once); what followed it is in ``trailing``."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.header: ProxyHeader | None = None
        self.trailing = b""

    def feed(self, data: bytes) -> None:
        if self.header is not None:
            self.trailing += data
            return
        self._buf += data
        if len(self._buf) > V2_FIXED + V2_MAX_LENGTH:
            raise ProxyProtocolError("PROXY header too long")

    def next_event(self) -> ProxyHeader | NeedData:
        if self.header is not None:
            return NEED_DATA
        got = parse(bytes(self._buf))
        if got is None:
            return NEED_DATA
        self.header, used = got
        self.trailing = bytes(self._buf[used:])
        self._buf.clear()
        return self.header


def is_trusted(peer_ip: str, networks: Iterable[str]) -> bool:
    """Whether the connecting peer (the load balancer) may send a PROXY header: ``networks`` are
    CIDRs such as ``("10.0.0.0/8", "::1/128")``. IPv4-mapped IPv6 peers match IPv4 networks."""
    try:
        ip = ipaddress.ip_address(peer_ip)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for net in networks:
        try:
            if ip in ipaddress.ip_network(net, strict=False):
                return True
        except ValueError:
            continue
    return False


def build_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v1 header (for tests and for a client that must present one)."""
    ip = ipaddress.ip_address(source[0])
    proto = "TCP4" if ip.version == 4 else "TCP6"
    return f"PROXY {proto} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode("ascii")


def build_v2(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    tlvs: tuple[tuple[int, bytes], ...] = (),
    *,
    with_crc: bool = False,
) -> bytes:
    """A v2 header; ``source=None`` makes a LOCAL one."""
    if source is None or destination is None:
        cmd, fam, addr = 0x20, 0x00, b""
    else:
        s, d = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
        fam = 0x11 if s.version == 4 else 0x21
        addr = s.packed + d.packed + struct.pack("!HH", source[1], destination[1])
        cmd = 0x21
    body = addr + b"".join(bytes([k]) + struct.pack("!H", len(v)) + v for k, v in tlvs)
    if with_crc:
        body += bytes([PP2_TYPE_CRC32C]) + b"\x00\x04" + b"\x00\x00\x00\x00"
    head = V2_SIGNATURE + bytes([cmd, fam]) + struct.pack("!H", len(body))
    whole = head + body
    if with_crc:
        whole = whole[:-4] + struct.pack("!I", crc32c(whole))
    return whole


__all__ = [
    "NEED_DATA",
    "NeedData",
    "ProxyHeader",
    "ProxyProtocolError",
    "ProxyReceiver",
    "build_v1",
    "build_v2",
    "crc32c",
    "is_trusted",
    "parse",
]
