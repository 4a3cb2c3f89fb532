"""The outbound queue runner: takes due items from the store, delivers them, retries, bounces.

All state lives in the store (``queue_*`` calls), so a restart simply resumes: due items are
picked up again. One pass takes a batch of due items, groups their pending recipients by
destination domain, and hands each destination to ``delivery.deliver_destination`` (one SMTP
session carries several messages). When every destination of an item is settled, the item's
recipients are updated in one store write, with the next attempt on
``config.queue.retry_schedule_seconds``.

Bounces (RFC 3464) go to the sender for recipients that failed permanently or expired after
``config.queue.max_age_seconds``, as NOTIFY allows, and never to the null sender (RFC 5321 §4.5.5,
§6.1). A delay warning goes once after ``config.queue.delay_warning_seconds`` (0: never).
A DSN is made durable (delivered or queued) before the recipient's failure is recorded, so a
crash between the two can repeat a bounce but never lose one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import dns.asyncresolver

from postfach.context import ServerContext
from postfach.dns import make_resolver
from postfach.errors import NotFound, QuotaExceeded, StoreError
from postfach.queue.delivery import ConnectionCache, DeliveryOptions, Job, Outcome, deliver_destination
from postfach.queue.dsn import RecipientReport, compose_dsn, status_of, wants_dsn
from postfach.smtp.srs import SrsError, is_srs
from postfach.store.base import Account, DeliveryTarget, QueueItem, QueueRecipient, RecipientState
from postfach.types import QueueId

log = logging.getLogger("postfach.queue")

BATCH_SIZE = 200
MAX_IN_FLIGHT = 2000


def _now() -> datetime:
    return datetime.now(UTC)


def rcpt_domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


class QueueRunner:
    """``ctx.services["queue"]``: ``await start()``, ``wake()`` after queueing, ``await stop()``."""

    def __init__(
        self,
        ctx: ServerContext,
        *,
        resolver: dns.asyncresolver.Resolver | None = None,
        tls_verify_context: Callable[[], ssl.SSLContext] | None = None,
        poll_interval_seconds: float | None = None,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.store = ctx.store
        self.resolver = resolver or make_resolver(ctx.config, cache=True)
        q = self.config.queue
        self.options = DeliveryOptions(
            local_hostname=self.config.hostname,
            port=self.config.smtp.relay_port,
            connect_timeout=float(q.connect_timeout_seconds),
            verified_tls_context=tls_verify_context or ssl.create_default_context,
            cache=ConnectionCache(),
        )
        shortest = min(q.retry_schedule_seconds or (60,))
        self.poll_interval = poll_interval_seconds if poll_interval_seconds is not None else \
            max(0.05, min(5.0, shortest / 2))
        self.clock = clock
        self._limiter = asyncio.Semaphore(max(1, q.concurrency))
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._workers: set[asyncio.Task[None]] = set()
        self._in_flight: set[QueueId] = set()
        self._stopping = False
        # counters, for logs and the benchmark
        self.delivered = 0
        self.deferred = 0
        self.bounced = 0

    # ------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name="postfach-queue")

    async def stop(self, timeout: float = 10.0) -> None:
        """Stops taking new work; lets running deliveries finish for up to ``timeout`` seconds.
        Anything unfinished stays in the store and is retried after the next start."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._workers:
            _done, pending = await asyncio.wait(set(self._workers), timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        if self.options.cache is not None:
            await self.options.cache.close()

    def wake(self) -> None:
        """Something was queued (or retried): look now rather than at the next poll."""
        self._wake.set()

    async def idle(self) -> None:
        """Waits until no delivery is running (for tests and the benchmark)."""
        while self._workers:
            await asyncio.gather(*set(self._workers), return_exceptions=True)

    # ------------------------------------------------------------------------------ the loop
    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            got = 0
            if len(self._in_flight) < MAX_IN_FLIGHT:
                try:
                    items = await self.store.queue_due(self.clock(), limit=BATCH_SIZE)
                except StoreError as e:
                    log.warning("queue: cannot read the queue: %s", e)
                    items = []
                except Exception:  # keep the runner alive whatever happens; the log tells
                    log.exception("queue: reading due items failed")
                    items = []
                items = [it for it in items if it.id not in self._in_flight]
                got = len(items)
                if items:
                    self._dispatch(items)
            if got >= BATCH_SIZE:
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._workers.add(task)
        task.add_done_callback(self._workers.discard)

    def _dispatch(self, items: Sequence[QueueItem]) -> None:
        for it in items:
            self._in_flight.add(it.id)
        self._spawn(self._process_batch(list(items)))

    async def _process_batch(self, items: list[QueueItem]) -> None:
        try:
            await self._process_batch_inner(items)
        except Exception:
            log.exception("queue: a delivery batch failed; its items are retried later")
        finally:
            for it in items:
                self._in_flight.discard(it.id)
            if not self._stopping:
                self._wake.set()

    async def _process_batch_inner(self, items: list[QueueItem]) -> None:
        jobs_by_dest: dict[tuple[str, bool], list[Job]] = {}
        item_jobs: dict[QueueId, list[Job]] = {}
        for it in items:
            per_domain: dict[str, list[int]] = {}
            for i, r in enumerate(it.recipients):
                if r.state is RecipientState.PENDING:
                    per_domain.setdefault(rcpt_domain(r.address), []).append(i)
            jobs = []
            loader = functools.partial(self.store.read_blob, it.blob_id)
            for domain, idxs in per_domain.items():
                job = Job(it, loader, idxs)
                jobs.append(job)
                jobs_by_dest.setdefault((domain, it.requiretls), []).append(job)
            item_jobs[it.id] = jobs
        dest_tasks: dict[tuple[str, bool], asyncio.Task[None]] = {
            key: asyncio.create_task(deliver_destination(
                self.options, self.resolver, key[0], jobs, self._limiter, requiretls=key[1]))
            for key, jobs in jobs_by_dest.items()
        }
        job_dest: dict[int, tuple[str, bool]] = {}
        for key, jobs in jobs_by_dest.items():
            for j in jobs:
                job_dest[id(j)] = key

        async def finish(it: QueueItem) -> None:
            jobs = item_jobs.get(it.id, [])
            keys = {job_dest[id(j)] for j in jobs}
            await asyncio.gather(*(dest_tasks[k] for k in keys), return_exceptions=True)
            await self._finish_item(it, jobs)

        await asyncio.gather(*(finish(it) for it in items), return_exceptions=False)

    # ------------------------------------------------------------------------------ results
    def _next_attempt(self, item: QueueItem, now: datetime) -> datetime:
        sched = self.config.queue.retry_schedule_seconds or (300,)
        delay = sched[min(item.attempts, len(sched) - 1)]
        return now + timedelta(seconds=delay)

    async def _finish_item(self, item: QueueItem, jobs: Sequence[Job]) -> None:
        try:
            await self._finish_item_inner(item, jobs)
        except NotFound:
            log.info("queue: item %s was deleted during delivery", item.id)
        except Exception:
            log.exception("queue: item %s: cannot record the attempt", item.id)

    async def _finish_item_inner(self, item: QueueItem, jobs: Sequence[Job]) -> None:
        now = self.clock()
        outcomes: dict[int, Outcome] = {}
        for j in jobs:
            outcomes.update(j.outcomes)
        q = self.config.queue
        age = (now - item.created).total_seconds()
        expired = age >= q.max_age_seconds
        new_rcpts: list[QueueRecipient] = []
        failed: list[RecipientReport] = []
        relayed: list[RecipientReport] = []
        still_pending: list[tuple[int, QueueRecipient]] = []
        last_error: str | None = None
        for i, r in enumerate(item.recipients):
            if r.state is not RecipientState.PENDING:
                new_rcpts.append(r)
                continue
            out = outcomes.get(i) or Outcome("temporary", "not attempted (internal error)", "4.3.0")
            attempts = r.attempts + 1
            if out.kind == "delivered":
                new_rcpts.append(QueueRecipient(r.address, RecipientState.DELIVERED, attempts, None,
                                                r.notify, r.orcpt))
                self.delivered += 1
                log.info("queue: %s to=<%s> relay=%s status=sent (%s)", item.id, r.address,
                         out.remote_mta, out.reply)
                if out.dsn_relayed and wants_dsn(r.notify, "success") and r.notify:
                    relayed.append(RecipientReport(r.address, "relayed", "2.0.0", out.reply, out.remote_mta,
                                                   r.orcpt, now))
            elif out.kind == "permanent":
                new_rcpts.append(QueueRecipient(r.address, RecipientState.FAILED, attempts, out.reply,
                                                r.notify, r.orcpt))
                self.bounced += 1
                log.info("queue: %s to=<%s> status=bounced (%s)", item.id, r.address, out.reply)
                if wants_dsn(r.notify, "failure"):
                    failed.append(RecipientReport(r.address, "failed", out.status or "5.0.0", out.reply,
                                                  out.remote_mta, r.orcpt, now))
            elif expired:
                new_rcpts.append(QueueRecipient(r.address, RecipientState.EXPIRED, attempts, out.reply,
                                                r.notify, r.orcpt))
                self.bounced += 1
                log.info("queue: %s to=<%s> status=expired (%s)", item.id, r.address, out.reply)
                if wants_dsn(r.notify, "failure"):
                    # RFC 3463: 4.4.7 delivery time expired
                    failed.append(RecipientReport(r.address, "failed", "4.4.7", out.reply, out.remote_mta,
                                                  r.orcpt, now))
            else:
                rec = QueueRecipient(r.address, RecipientState.PENDING, attempts, out.reply, r.notify, r.orcpt)
                new_rcpts.append(rec)
                still_pending.append((i, rec))
                last_error = out.reply
                self.deferred += 1
                log.info("queue: %s to=<%s> status=deferred (%s)", item.id, r.address, out.reply)

        next_attempt = self._next_attempt(item, now)
        delay_warned: bool | None = None
        delayed: list[RecipientReport] = []
        if (still_pending and not item.delay_warned and q.delay_warning_seconds > 0
                and age >= q.delay_warning_seconds):
            delay_warned = True
            until = item.created + timedelta(seconds=q.max_age_seconds)
            for _i, rec in still_pending:
                if wants_dsn(rec.notify, "delay"):
                    delayed.append(RecipientReport(rec.address, "delayed", _status_of_pending(rec),
                                                   rec.last_error or "", "", rec.orcpt, now, until))

        # The DSNs first, then the record of the attempt (see the module docstring)
        if item.sender:
            data: bytes | None = None
            for kind, reports in (("failed", failed), ("delayed", delayed), ("relayed", relayed)):
                if not reports:
                    continue
                try:
                    if data is None:
                        data = await self.store.read_blob(item.blob_id)
                    await self._send_dsn(item, data, reports, now)
                except Exception:
                    log.exception("queue: item %s: cannot send the %s DSN; will try again", item.id, kind)
                    if kind == "failed":
                        # keep them pending: the next attempt fails again and bounces then
                        again = {r.address for r in reports}
                        new_rcpts = [
                            QueueRecipient(r.address, RecipientState.PENDING, r.attempts, r.last_error,
                                           r.notify, r.orcpt) if r.address in again else r
                            for r in new_rcpts
                        ]
                        last_error = last_error or "bounce not yet sent"
                    elif kind == "delayed":
                        delay_warned = None
        await self.store.queue_update(item.id, new_rcpts, next_attempt, last_error, delay_warned)

    async def _send_dsn(self, item: QueueItem, original: bytes, reports: Sequence[RecipientReport],
                        now: datetime) -> None:
        q = self.config.queue
        msg = compose_dsn(
            reporting_mta=self.config.hostname, sender=item.sender, original=original, reports=reports,
            arrival_date=item.created, envid=item.envid, ret=item.ret, smtputf8=item.smtputf8,
            delay_hours=(now - item.created).total_seconds() / 3600, max_age_days=q.max_age_seconds / 86400,
            now=now,
        )
        await deliver_notification(self, item.sender, msg, smtputf8=item.smtputf8)

    # ------------------------------------------------------------------------------ helpers
    async def queue_message(
        self, sender: str, recipients: Sequence[QueueRecipient], data: bytes, **kwargs: object
    ) -> QueueItem:
        """Queues and wakes the runner (what the SMTP core may call after DATA)."""
        item = await self.store.queue_add(sender, recipients, data, **kwargs)  # type: ignore[arg-type]
        self.wake()
        return item


def _status_of_pending(rec: QueueRecipient) -> str:
    if not rec.last_error:
        return "4.0.0"
    status = status_of(rec.last_error, permanent=False)
    return "4" + status[1:]  # still being retried: a transient status (RFC 3464 §2.3.4)


async def deliver_notification(runner: QueueRunner, to: str, message: bytes, *, smtputf8: bool) -> None:
    """A DSN to ``to``: into the INBOX of a local account, else queued with the null sender."""
    store = runner.store
    domain = rcpt_domain(to)
    srs = runner.ctx.services.get("srs")
    local_part = to.rpartition("@")[0]
    if srs is not None and is_srs(local_part) and (
        await store.get_domain(domain) is not None or domain == runner.config.smtp.srs_domain.lower()
    ):
        # We forwarded this mail with an SRS sender of ours: the bounce goes to the original one.
        try:
            original = srs.reverse(f"{local_part}@{domain}")
        except SrsError as e:
            log.warning("queue: bounce to <%s> discarded: %s", to, e)
            return
        if original:
            to, domain = original, rcpt_domain(original)
    if await store.get_domain(domain) is not None:
        account = await _local_account(runner, to)
        if account is None:
            log.warning("queue: no local mailbox for the bounce to <%s>; discarded", to)
            return
        prepend = f"Return-Path: <>\r\nDelivered-To: {account.address}\r\n".encode()
        try:
            await store.deliver(message, [DeliveryTarget(account.id, "INBOX", prepend=prepend)])
        except QuotaExceeded:
            log.warning("queue: bounce to <%s> discarded: mailbox over quota", to)
        return
    await store.queue_add("", [QueueRecipient(to)], message, smtputf8=smtputf8)
    runner.wake()


async def _local_account(runner: QueueRunner, address: str) -> Account | None:
    store = runner.store
    address = address.lower()
    local, _, domain = address.rpartition("@")
    candidates = [address]
    if "+" in local:
        candidates.append(f"{local.split('+', 1)[0]}@{domain}")
    for cand in candidates:
        acc = await store.get_account(cand)
        if acc is not None:
            return acc
        for alias in await store.aliases_for(cand):
            acc = await store.get_account(alias.target.lower())
            if acc is not None:
                return acc
    return None
