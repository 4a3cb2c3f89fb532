"""Quota warnings: one message in INBOX each time an account's usage crosses a warning level.

Usage is kept exact by the store in the same transaction as every write (and enforced there:
``QuotaExceeded``). This service watches the changes this process makes to every account
(``subscribe(ALL_ACCOUNTS)``); when an append takes usage from below ``[quota] warn_percents``
(80 % and 95 % by default) to at or above it, the account gets one warning per crossing. When usage
drops below a level again (expunges), a later crossing warns again — as Dovecot's quota_warning does.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import uuid
from collections.abc import Sequence

from postfach.config import Config
from postfach.context import ServerContext
from postfach.errors import QuotaExceeded, StoreError
from postfach.store.base import ALL_ACCOUNTS, Account, ChangeKind, DeliveryTarget, Store
from postfach.types import AccountId, MailboxId, Uid

log = logging.getLogger("postfach.quota")


def crossed(before: int, after: int, limit: int | None, percents: Sequence[int]) -> list[int]:
    """The warning levels (percent) that usage passed upwards going from ``before`` to ``after``."""
    if not limit or after <= before:
        return []
    return [p for p in sorted(percents) if before * 100 < p * limit <= after * 100]


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def warning_message(config: Config, account: Account, percent: int) -> bytes:
    """The warning put into INBOX (texts from ``[quota] warning_subject`` / ``warning_text``)."""
    limit = account.quota_bytes or 0
    values = {
        "percent": percent,
        "address": account.address,
        "used": _human(account.used_bytes),
        "limit": _human(limit),
    }
    subject = config.quota.warning_subject.format(**values)
    text = config.quota.warning_text.format(**values).replace("\r\n", "\n").replace("\n", "\r\n")
    postmaster = f"postmaster@{account.domain}"
    headers = [
        f"From: Mail system <{postmaster}>",
        f"To: <{account.address}>",
        f"Subject: {subject}",
        f"Date: {email.utils.formatdate(localtime=False)}",
        f"Message-ID: <quota.{uuid.uuid4().hex}@{config.hostname}>",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    return ("\r\n".join(headers) + "\r\n\r\n" + text + "\r\n").encode("utf-8")


class QuotaWarner:
    """Server service with ``start()`` / ``stop()``."""

    def __init__(self, ctx: ServerContext) -> None:
        self._store: Store = ctx.store
        self._config = ctx.config
        self._last_used: dict[AccountId, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._sub = self._store.subscribe(ALL_ACCOUNTS)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="quota-warnings")

    async def stop(self) -> None:
        self._sub.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            change = await self._sub.get()
            if change.kind not in (ChangeKind.APPEND, ChangeKind.EXPUNGE, ChangeKind.ACCOUNT):
                continue
            try:
                await self._look_at(change.account_id, change.kind, change.mailbox_id, change.uids)
            except StoreError as e:
                log.warning("quota check of account %s failed: %s", change.account_id, e)
            except Exception:
                log.exception("quota check of account %s failed", change.account_id)

    async def _look_at(
        self, account_id: AccountId, kind: ChangeKind, mailbox_id: MailboxId | None, uids: Sequence[Uid]
    ) -> None:
        account = await self._store.get_account_by_id(account_id)
        if account is None:
            self._last_used.pop(account_id, None)
            return
        after = account.used_bytes
        before = self._last_used.get(account_id)
        self._last_used[account_id] = after
        if kind is not ChangeKind.APPEND or not account.quota_bytes:
            return
        if before is None:
            # First sight of this account since start: usage before this append is usage now
            # less what the append added.
            before = after
            if mailbox_id is not None and uids:
                metas = await self._store.get_messages(account_id, mailbox_id, list(uids))
                before = after - sum(m.size for m in metas)
        for percent in crossed(before, after, account.quota_bytes, self._config.quota.warn_percents):
            await self._warn(account, percent)

    async def _warn(self, account: Account, percent: int) -> None:
        data = warning_message(self._config, account, percent)
        try:
            await self._store.deliver(data, [DeliveryTarget(account.id, "INBOX")])
        except QuotaExceeded:
            log.warning("quota warning %d%% for %s not delivered: the mailbox is full", percent, account.address)
            return
        log.info("quota warning: %s crossed %d%% of %s", account.address, percent, _human(account.quota_bytes or 0))
