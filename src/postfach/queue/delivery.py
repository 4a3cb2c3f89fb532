"""Delivery of queued messages to one destination domain over SMTP (aiosmtplib as the client).

``deliver_destination`` takes every due message for one domain, finds its MX hosts (RFC 5321
§5.1, RFC 7505 null MX), and sends the messages over as few connections as it can: one session
carries several transactions. It never raises; each recipient of each job gets an ``Outcome``:
delivered, temporary (retry later) or permanent (bounce).

TLS: STARTTLS whenever the server offers it (opportunistic, RFC 7435, no certificate check), and
plaintext again if the handshake fails. Messages sent with REQUIRETLS (RFC 8689 §4.2.1) need a
DNSSEC-validated MX answer (the AD flag of the configured resolver), TLS with a certificate valid
for the MX host name, and REQUIRETLS in the EHLO after TLS; when no MX host qualifies they bounce
with 5.7.10 (no TLS) or 5.7.30 (no REQUIRETLS).

Recipients per transaction are capped (50, like Postfix); a ``452`` "too many recipients" sends
the rest in the next transaction of the same session. Idle sessions are cached for two seconds
(``ConnectionCache``) for the next message to the same host.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aiosmtplib
import dns.asyncresolver

from postfach.dns import DnsTemporaryError, lookup_addresses, lookup_mx
from postfach.queue.dsn import status_of, xtext_encode
from postfach.store.base import QueueItem

log = logging.getLogger("postfach.queue")

MIN_JOBS_PER_CONNECTION = 10
MAX_RCPTS_PER_TRANSACTION = 50  # Postfix's smtp_destination_recipient_limit
MAX_CONNECTIONS_PER_DESTINATION = 5


@dataclass
class Outcome:
    kind: str  # "delivered", "temporary", "permanent"
    reply: str  # the remote reply or our own explanation
    status: str = ""  # enhanced status code
    remote_mta: str = ""
    dsn_relayed: bool = False  # delivered to a server without DSN: we report NOTIFY=SUCCESS ourselves


@dataclass
class Job:
    """One message's recipients for one destination. The bytes are read from the store only
    when the message is about to be sent, and dropped after, so a large queue does not sit in
    memory: at most one message per open connection."""

    item: QueueItem
    load: Callable[[], Awaitable[bytes]]
    rcpt_indexes: list[int]
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    _data: bytes | None = None

    async def data(self) -> bytes:
        if self._data is None:
            self._data = await self.load()
        return self._data

    def release(self) -> None:
        self._data = None

    def open_indexes(self) -> list[int]:
        return [i for i in self.rcpt_indexes if i not in self.outcomes]

    def settle(self, outcome: Outcome, indexes: Sequence[int] | None = None) -> None:
        for i in self.open_indexes() if indexes is None else indexes:
            self.outcomes.setdefault(i, outcome)


@dataclass(frozen=True)
class DeliveryOptions:
    local_hostname: str
    port: int
    connect_timeout: float
    command_timeout: float = 300.0  # RFC 5321 §4.5.3.2 client timeouts, simplified
    verified_tls_context: Callable[[], ssl.SSLContext] = ssl.create_default_context
    cache: ConnectionCache | None = None


class ConnectionCache:
    """Idle SMTP sessions kept for a moment for the next message to the same host (Postfix's
    ``smtp_connection_cache_time_limit``): a steady trickle of mail to one destination shares
    one session instead of opening one per message."""

    def __init__(self, ttl_seconds: float = 2.0, max_sessions: int = 50) -> None:
        self.ttl = ttl_seconds
        self.max_sessions = max_sessions
        self._idle: dict[tuple[str, str, bool], list[tuple[aiosmtplib.SMTP, bool, asyncio.TimerHandle]]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.reused = 0

    def __len__(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def get(self, key: tuple[str, str, bool]) -> tuple[aiosmtplib.SMTP, bool] | None:
        entries = self._idle.get(key)
        while entries:
            client, dsn, timer = entries.pop()
            timer.cancel()
            if client.is_connected:
                self.reused += 1
                return client, dsn
            client.close()
        self._idle.pop(key, None)
        return None

    def put(self, key: tuple[str, str, bool], client: aiosmtplib.SMTP, dsn: bool) -> None:
        if len(self) >= self.max_sessions or not client.is_connected:
            self._quit_later(client)
            return
        loop = asyncio.get_running_loop()
        entry: list[tuple[aiosmtplib.SMTP, bool, asyncio.TimerHandle]] = self._idle.setdefault(key, [])
        timer = loop.call_later(self.ttl, self._expire, key, client)
        entry.append((client, dsn, timer))

    def _expire(self, key: tuple[str, str, bool], client: aiosmtplib.SMTP) -> None:
        entries = self._idle.get(key, [])
        for i, (c, _dsn, _t) in enumerate(entries):
            if c is client:
                del entries[i]
                break
        if not entries:
            self._idle.pop(key, None)
        self._quit_later(client)

    def _quit_later(self, client: aiosmtplib.SMTP) -> None:
        task = asyncio.get_running_loop().create_task(_quit(client))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for entries in self._idle.values():
            for client, _dsn, timer in entries:
                timer.cancel()
                self._quit_later(client)
        self._idle.clear()
        if self._closing:
            await asyncio.gather(*set(self._closing), return_exceptions=True)


def _opportunistic_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _HostFailed(Exception):
    """This host cannot be used (connect/greeting/EHLO/TLS problem): try the next one."""

    def __init__(self, reply: str, permanent: bool = False, tls_status: str = "") -> None:
        super().__init__(reply)
        self.reply = reply
        self.permanent = permanent
        self.tls_status = tls_status  # REQUIRETLS could not be met here: 5.7.10 or 5.7.30


def _reply(e: aiosmtplib.SMTPResponseException) -> str:
    return f"{e.code} {e.message}".strip()


_BAD_ADDRESS = re.compile(r"[\x00-\x1f<>\x7f]")


def _text(resp: aiosmtplib.SMTPResponse) -> str:
    return f"{resp.code} {resp.message}".replace("\n", " ").strip()


async def _command(client: aiosmtplib.SMTP, verb: bytes, address: str, options: Sequence[str],
                   encoding: str) -> aiosmtplib.SMTPResponse:
    """``MAIL FROM:<addr> opts`` / ``RCPT TO:<addr> opts`` written by us: the queue's addresses are
    already plain addr-specs, so aiosmtplib's address parsing (and its cost) is not needed."""
    arg = verb + b"<" + address.encode(encoding) + b">"
    return await client.execute_command(arg, *(o.encode("ascii") for o in options))


async def _open_session(
    opts: DeliveryOptions, mx_host: str, address: str, requiretls: bool, try_tls: bool = True
) -> tuple[aiosmtplib.SMTP, bool]:
    """Connected, EHLO'd (and TLS'd where possible). Returns (client, dsn_supported)."""
    client = aiosmtplib.SMTP(
        hostname=address, port=opts.port, local_hostname=opts.local_hostname,
        timeout=opts.command_timeout, start_tls=False, use_tls=False,
    )
    where = f"{mx_host}[{address}]:{opts.port}"
    try:
        await client.connect(timeout=opts.connect_timeout)
    except aiosmtplib.SMTPConnectResponseError as e:
        raise _HostFailed(f"host {where} refused to talk to me: {_reply(e)}") from None
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as e:
        raise _HostFailed(f"connect to {where}: {e}") from None
    try:
        try:
            await client.ehlo()
        except aiosmtplib.SMTPHeloError:
            await client.helo()
        if client.supports_extension("starttls") and (try_tls or requiretls):
            ctx = opts.verified_tls_context() if requiretls else _opportunistic_context()
            try:
                await client.starttls(tls_context=ctx, server_hostname=mx_host)
                # RFC 3207 §4.2: forget what was learnt before TLS, ask again. A server that
                # rejects our (unverified) side shows it here, on the first read under TLS.
                await client.ehlo()
            except aiosmtplib.SMTPResponseException as e:
                if requiretls:
                    raise _HostFailed(f"STARTTLS at {where}: {_reply(e)}", tls_status="5.7.10") from None
                log.info("queue: STARTTLS at %s: %s; trying again without TLS", where, _reply(e))
                client.close()
                return await _open_session(opts, mx_host, address, requiretls, try_tls=False)
            except (TimeoutError, ssl.SSLError, aiosmtplib.SMTPException, OSError) as e:
                if requiretls:
                    raise _HostFailed(f"TLS with {where} failed: {e}", tls_status="5.7.10") from None
                # opportunistic TLS (RFC 7435): plaintext on a new connection, as Postfix does
                log.info("queue: TLS with %s failed (%s); trying again without TLS", where, e)
                client.close()
                return await _open_session(opts, mx_host, address, requiretls, try_tls=False)
        if requiretls:
            if client.get_transport_info("sslcontext") is None:
                raise _HostFailed(f"{where} offers no STARTTLS", tls_status="5.7.10")
            if not client.supports_extension("requiretls"):
                raise _HostFailed(f"{where} does not support REQUIRETLS", tls_status="5.7.30")
    except _HostFailed:
        client.close()
        raise
    except aiosmtplib.SMTPResponseException as e:
        client.close()
        raise _HostFailed(f"host {where} said: {_reply(e)}") from None
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as e:
        client.close()
        raise _HostFailed(f"lost connection with {where}: {e}") from None
    return client, client.supports_extension("dsn")


async def _send_one(client: aiosmtplib.SMTP, job: Job, mx_host: str, dsn: bool) -> None:
    """One transaction. Settles every open recipient, or raises ``_HostFailed`` when the
    connection broke (leaving the rest open for the next host)."""
    item = job.item
    utf8 = item.smtputf8 or not item.sender.isascii() or any(
        not item.recipients[i].address.isascii() for i in job.open_indexes())
    try:
        data = await job.data()
    except Exception as e:  # the store failed us: try again later
        log.error("queue: item %s: cannot read its message: %s", item.id, e)
        job.settle(Outcome("temporary", f"cannot read the queued message: {e.__class__.__name__}", "4.3.0"))
        return
    try:
        # several transactions when the recipients do not fit into one (limit, or 452 4.5.3)
        while await _transaction(client, job, data, mx_host, dsn, utf8) and job.open_indexes():
            pass
    finally:
        job.release()


async def _transaction(client: aiosmtplib.SMTP, job: Job, data: bytes, mx_host: str, dsn: bool,
                       utf8: bool) -> bool:
    """One MAIL/RCPT/DATA. True when recipients were left for another transaction."""
    item = job.item
    mail_opts: list[str] = []
    if client.supports_extension("size"):
        limit = client.esmtp_extensions.get("size", "").strip()
        if limit.isdigit() and 0 < int(limit) < len(data):
            # RFC 1870 §6.1: do not send what the server announced it will refuse
            job.settle(Outcome("permanent", f"message size {len(data)} exceeds the limit {limit} of "
                               f"{mx_host}", "5.3.4", mx_host))
            return False
        mail_opts.append(f"SIZE={len(data)}")
    if client.supports_extension("8bitmime") and not data.isascii():
        mail_opts.append("BODY=8BITMIME")
    if utf8:
        if not client.supports_extension("smtputf8"):
            # RFC 6531 §3.4: cannot downgrade → permanent failure
            job.settle(Outcome("permanent", f"{mx_host} does not support SMTPUTF8", "5.6.7", mx_host))
            return False
        mail_opts.append("SMTPUTF8")
    if dsn:
        if item.ret:
            mail_opts.append(f"RET={item.ret}")
        if item.envid:
            mail_opts.append(f"ENVID={item.envid}")
    if item.requiretls:
        mail_opts.append("REQUIRETLS")
    encoding = "utf-8" if utf8 else "ascii"
    if _BAD_ADDRESS.search(item.sender):
        job.settle(Outcome("permanent", "malformed sender address", "5.1.7"))
        return False
    try:
        resp = await _command(client, b"MAIL FROM:", item.sender, mail_opts, encoding)
        if resp.code == 421:
            raise _HostFailed(f"host {mx_host} said: {_text(resp)}")
        if resp.code != 250:
            kind = "permanent" if resp.code >= 500 else "temporary"
            job.settle(Outcome(kind, _text(resp), status_of(_text(resp), permanent=kind == "permanent"),
                               mx_host))
            await _rset(client)
            return False
        accepted: list[int] = []
        more = False
        for i in job.open_indexes()[:MAX_RCPTS_PER_TRANSACTION]:
            rcpt = item.recipients[i]
            if _BAD_ADDRESS.search(rcpt.address):
                job.settle(Outcome("permanent", "malformed recipient address", "5.1.3"), [i])
                continue
            rcpt_opts: list[str] = []
            if dsn:
                if rcpt.notify:
                    rcpt_opts.append(f"NOTIFY={rcpt.notify}")
                if rcpt.orcpt:
                    rcpt_opts.append(f"ORCPT={rcpt.orcpt}")
                else:
                    rcpt_opts.append(f"ORCPT=rfc822;{xtext_encode(rcpt.address)}")
            resp = await _command(client, b"RCPT TO:", rcpt.address, rcpt_opts, encoding)
            if resp.code == 421:
                raise _HostFailed(f"host {mx_host} said: {_text(resp)}")
            if resp.code in (250, 251):
                accepted.append(i)
            elif resp.code == 452 and accepted:
                # RFC 5321 §4.5.3.1.10: too many recipients: the rest go in the next transaction
                more = True
                break
            else:
                kind = "permanent" if resp.code >= 500 else "temporary"
                job.settle(Outcome(kind, _text(resp), status_of(_text(resp), permanent=kind == "permanent"),
                                   mx_host), [i])
        if not accepted:
            await _rset(client)
            return False
        try:
            # RFC 5321 §4.5.3.2.6: wait up to 10 minutes for the reply to the final dot
            resp = await client.data(data, timeout=600.0)
        except aiosmtplib.SMTPDataError as e:
            if e.code == 421:
                raise _HostFailed(f"host {mx_host} said: {_reply(e)}") from None
            kind = "permanent" if e.code >= 500 else "temporary"
            job.settle(Outcome(kind, _reply(e), status_of(_reply(e), permanent=kind == "permanent"),
                               mx_host), accepted)
            await _rset(client)
            return False
        text = f"{resp.code} {resp.message}".strip()
        job.settle(Outcome("delivered", text, status_of(text, permanent=False) if text else "2.0.0",
                           mx_host, dsn_relayed=not dsn), accepted)
        return more or len(job.open_indexes()) > 0
    except aiosmtplib.SMTPResponseException as e:
        raise _HostFailed(f"host {mx_host} said: {_reply(e)}") from None
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as e:
        raise _HostFailed(f"lost connection with {mx_host}: {e}") from None


async def _rset(client: aiosmtplib.SMTP) -> None:
    try:
        await client.rset()
    except aiosmtplib.SMTPResponseException as e:
        raise _HostFailed(f"RSET: {_reply(e)}") from None
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as e:
        raise _HostFailed(f"RSET: connection lost: {e}") from None


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        await asyncio.wait_for(client.quit(), 5)
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        pass
    finally:
        client.close()


async def _lane(
    opts: DeliveryOptions, resolver: dns.asyncresolver.Resolver, hosts: Sequence[str], jobs: list[Job],
    requiretls: bool, limiter: asyncio.Semaphore, implicit: bool = False,
) -> None:
    """Delivers ``jobs`` over one connection at a time, host after host until all are settled."""
    last_error = "no MX host answered"
    tls_status = ""  # set when a host could not meet REQUIRETLS
    address_found = False
    for host in hosts:
        pending = [j for j in jobs if j.open_indexes()]
        if not pending:
            return
        try:
            addresses = await lookup_addresses(resolver, host)
        except DnsTemporaryError as e:
            last_error = f"cannot find the address of {host}: {e}"
            continue
        if not addresses:
            last_error = f"no address for MX host {host}"
            continue
        address_found = True
        for address in addresses:
            pending = [j for j in jobs if j.open_indexes()]
            if not pending:
                return
            async with limiter:
                key = (host, address, requiretls)
                cached = opts.cache.get(key) if opts.cache is not None else None
                if cached is not None:
                    client, dsn = cached
                    try:
                        # RSET first: the server may have dropped an idle session (Postfix does the same)
                        await _rset(client)
                    except _HostFailed:
                        client.close()
                        cached = None
                if cached is None:
                    try:
                        client, dsn = await _open_session(opts, host, address, requiretls)
                    except _HostFailed as e:
                        last_error = e.reply
                        tls_status = tls_status or e.tls_status
                        log.info("queue: %s", e.reply)
                        continue
                try:
                    for job in pending:
                        await _send_one(client, job, host, dsn)
                except _HostFailed as e:
                    last_error = e.reply
                    log.info("queue: %s", e.reply)
                    client.close()
                    continue
                if opts.cache is not None:
                    opts.cache.put(key, client, dsn)
                else:
                    await _quit(client)
    leftover = [j for j in jobs if j.open_indexes()]
    if not leftover:
        return
    if requiretls and tls_status:
        # RFC 8689 §4.2.1: no MX host met the requirements → non-delivery report with
        # 5.7.10 (no TLS session) or 5.7.30 (no REQUIRETLS support)
        out = Outcome("permanent", f"REQUIRETLS: {last_error}", tls_status)
    elif implicit and not address_found and "cannot find" not in last_error:
        # RFC 5321 §5.1: no MX and no address either: the domain takes no mail
        out = Outcome("permanent", f"Host or domain name not found: {last_error}", "5.4.4")
    else:
        out = Outcome("temporary", last_error, "4.4.1")
    for j in leftover:
        j.settle(out)


async def deliver_destination(
    opts: DeliveryOptions,
    resolver: dns.asyncresolver.Resolver,
    domain: str,
    jobs: list[Job],
    limiter: asyncio.Semaphore,
    *,
    requiretls: bool = False,
) -> None:
    """Settles every open recipient of ``jobs`` (all for ``domain``). Never raises."""
    try:
        try:
            mx = await lookup_mx(resolver, domain)
        except DnsTemporaryError as e:
            for j in jobs:
                j.settle(Outcome("temporary", f"DNS lookup for {domain} failed: {e}", "4.4.3"))
            return
        if not mx.exists:
            for j in jobs:
                j.settle(Outcome("permanent", f"Host or domain name not found: {domain}", "5.1.2"))
            return
        if mx.null_mx:
            # RFC 7505 §4.2: 556 5.1.10 recipient address has null MX
            for j in jobs:
                j.settle(Outcome("permanent", f"556 5.1.10 Domain {domain} does not accept mail (null MX)",
                                 "5.1.10"))
            return
        if requiretls and not mx.dnssec and not mx.implicit:
            # RFC 8689 §4.2.1 step 2: an MX answer must be DNSSEC-validated (or the host confirmed
            # by MTA-STS, which postfach does not do yet)
            for j in jobs:
                j.settle(Outcome("permanent", f"REQUIRETLS: the MX records of {domain} are not "
                                 "DNSSEC-validated", "5.7.30"))
            return
        hosts = tuple(h for h in mx.hosts if h.lower().rstrip(".") != opts.local_hostname.lower())
        if not hosts:
            # we are the MX of a domain that is not ours (Postfix: "mail for X loops back to myself")
            for j in jobs:
                j.settle(Outcome("permanent", f"mail for {domain} loops back to myself", "5.4.6"))
            return
        lanes = max(1, min(MAX_CONNECTIONS_PER_DESTINATION, len(jobs) // MIN_JOBS_PER_CONNECTION))
        groups = [jobs[i::lanes] for i in range(lanes)]
        await asyncio.gather(*(
            _lane(opts, resolver, hosts, g, requiretls, limiter, mx.implicit) for g in groups if g
        ))
    except asyncio.CancelledError:
        raise
    except Exception as e:  # never let one destination take the runner down
        log.exception("queue: delivery to %s failed", domain)
        for j in jobs:
            j.settle(Outcome("temporary", f"internal error: {e.__class__.__name__}", "4.3.0"))
