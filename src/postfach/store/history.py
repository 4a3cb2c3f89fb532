"""Trimming of the QRESYNC expunge history (RFC 7162 §3.2.5.2, ``imap.expunge_history_days``).

Every expunge leaves a row in the store's ``expunged`` table so that a QRESYNC client can be told
``VANISHED (EARLIER)`` for exactly what went while it was away. Kept forever, that table only
grows. ``serve`` runs this sweeper every ``imap.expunge_history_sweep_minutes``: it drops records
older than the retention and raises the mailbox's floor (``store.expunge_history_floor``). A client
that comes back with a modseq below the floor is still answered exactly: the IMAP session then
reports as vanished every UID of the client's known range that is not in the mailbox (RFC 7162
§3.2.5.2 allows naming UIDs the client never saw, never ones that exist), narrowed by known-uids
and the sequence match data when the client sends them. Dovecot trims its transaction logs the
same way, without an operator's command.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from postfach.context import ServerContext
from postfach.errors import StoreError

log = logging.getLogger("postfach.store")

#: Checkpoints are at least this far apart per mailbox, relative to the retention (1 % of it):
#: a record lives at most that much longer than ``expunge_history_days``, and each active mailbox
#: keeps about a hundred checkpoints.
MARK_FRACTION = 100


def sweep_params(days: int, sweep_minutes: int) -> tuple[timedelta, timedelta]:
    """(keep, mark_every) for ``Store.trim_expunge_history``."""
    keep = timedelta(days=days)
    return keep, max(timedelta(minutes=sweep_minutes), keep / MARK_FRACTION)


class ExpungeHistoryTrimmer:
    """Server service with ``start()`` / ``stop()``; nothing runs when the days are 0 (keep)."""

    def __init__(self, ctx: ServerContext) -> None:
        self._store = ctx.store
        self._days = ctx.config.imap.expunge_history_days
        self._minutes = ctx.config.imap.expunge_history_sweep_minutes
        self._task: asyncio.Task[None] | None = None
        self.trimmed = 0

    async def start(self) -> None:
        if self._days <= 0 or not hasattr(self._store, "trim_expunge_history"):
            return
        self._task = asyncio.create_task(self._loop(), name="expunge-history")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def sweep(self) -> int:
        keep, every = sweep_params(self._days, self._minutes)
        n = int(await self._store.trim_expunge_history(keep, every))
        self.trimmed += n
        if n:
            log.info("expunge history: %d records older than %d days trimmed", n, self._days)
        return n

    async def _loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except StoreError as e:
                log.warning("expunge history sweep failed: %s", e)
            except Exception:
                log.exception("expunge history sweep failed")
            await asyncio.sleep(self._minutes * 60)
