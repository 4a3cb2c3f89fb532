"""Logged-in IMAP sessions per account, for ``limits.max_connections_per_account``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import TypeVar

from postfach.types import AccountId

log = logging.getLogger("postfach.imap")

K = TypeVar("K", bound=Hashable)

#: Where the server's AccountCounts lives (``ServerContext.services``).
ACCOUNT_COUNTS_KEY = "imap.account_connections"


def bump(counts: dict[K, int], key: K, delta: int) -> None:
    """Add ``delta`` to ``counts[key]``; a count that reaches 0 leaves the dict."""
    n = counts.get(key, 0) + delta
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)


class AccountCounts:
    """Logged-in IMAP sessions per account (``limits.max_connections_per_account``), over every
    worker of ``serve --workers N``: this process's own sessions, and what the other workers
    reported through the supervisor (``supervisor.py``: "acct" events, a snapshot for a worker
    that (re)starts, a dead worker's sessions dropped). Two workers admitting a login in the same
    millisecond may each see the other's a moment late: the cap holds within a session or two."""

    def __init__(self) -> None:
        self.local: dict[AccountId, int] = {}
        self.remote: dict[int, dict[AccountId, int]] = {}  # worker index -> account -> sessions
        self._relay: Callable[[AccountId, int], None] | None = None

    def set_relay(self, relay: Callable[[AccountId, int], None] | None) -> None:
        self._relay = relay

    def total(self, account_id: AccountId) -> int:
        return self.local.get(account_id, 0) + sum(r.get(account_id, 0) for r in self.remote.values())

    def add(self, account_id: AccountId, delta: int) -> None:
        bump(self.local, account_id, delta)
        if self._relay is not None:
            try:
                self._relay(account_id, delta)
            except Exception:  # the other workers count one session less or more: the cap is soft
                log.exception("imap: relaying a session count failed")

    def apply_remote(self, worker: int, account_id: AccountId, delta: int) -> None:
        bump(self.remote.setdefault(worker, {}), account_id, delta)

    def replace_remote(self, snapshot: dict[int, dict[AccountId, int]]) -> None:
        self.remote = {int(w): {AccountId(a): int(n) for a, n in c.items() if n > 0} for w, c in snapshot.items()}

    def forget_worker(self, worker: int) -> None:
        self.remote.pop(worker, None)
