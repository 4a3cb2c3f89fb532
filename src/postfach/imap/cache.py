"""Process-wide caches keyed by blob id. Blobs are content-addressed and never change, so an
entry can never be stale; the caches only save the store's thread hops (small message bytes for
header FETCHes, parsed MessageInfo for ENVELOPE/BODYSTRUCTURE/SEARCH). No asyncio here."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class LruCache(Generic[K, T]):
    def __init__(self, max_items: int, max_cost: int) -> None:
        self.max_items = max_items
        self.max_cost = max_cost
        self.cost = 0
        self._items: OrderedDict[K, tuple[T, int]] = OrderedDict()

    def get(self, key: K) -> T | None:
        hit = self._items.get(key)
        if hit is None:
            return None
        self._items.move_to_end(key)
        return hit[0]

    def peek(self, key: K) -> T | None:
        """Like get, without refreshing the entry's age (bulk readers: SORT over 100k)."""
        hit = self._items.get(key)
        return None if hit is None else hit[0]

    def peek_many(self, keys: list[K]) -> list[T | None]:
        """``peek`` of every key, in one pass (SORT/THREAD over 100k messages)."""
        get = self._items.get
        return [None if (hit := get(k)) is None else hit[0] for k in keys]

    def put_many(self, pairs: list[tuple[K, T]]) -> None:
        """``put`` of many entries of cost 1 at once (a mailbox's sort keys from the store)."""
        items = self._items
        old = [items.pop(k) for k, _ in pairs if k in items]
        self.cost -= sum(c for _, c in old)
        before = len(items)
        items.update((k, (v, 1)) for k, v in pairs)
        self.cost += len(items) - before
        while len(items) > self.max_items or self.cost > self.max_cost:
            _, (_, c) = items.popitem(last=False)
            self.cost -= c

    def put(self, key: K, value: T, cost: int = 1) -> None:
        if cost > self.max_cost // 8:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.cost -= old[1]
        self._items[key] = (value, cost)
        self.cost += cost
        while len(self._items) > self.max_items or self.cost > self.max_cost:
            _, (_, c) = self._items.popitem(last=False)
            self.cost -= c

    def __len__(self) -> int:
        return len(self._items)


BLOB_CACHE_KEY = "imap.blob_cache"
INFO_CACHE_KEY = "imap.info_cache"
SMALL_BLOB_BYTES = 64 * 1024  # only messages up to this size are kept in memory


SECTION_CACHE_KEY = "imap.section_cache"
SEARCH_CACHE_KEY = "imap.search_cache"


def blob_cache() -> LruCache[str, bytes]:
    return LruCache(max_items=100_000, max_cost=64 * 1024 * 1024)


def info_cache() -> LruCache[str, object]:
    return LruCache(max_items=20_000, max_cost=20_000)


def section_cache() -> LruCache[tuple[str, str], bytes]:
    """Header field selections clients ask for on every message (Dovecot's cache file idea)."""
    return LruCache(max_items=200_000, max_cost=32 * 1024 * 1024)


def search_cache() -> LruCache[str, tuple[str, ...]]:
    """Decoded Subject/From/To/Cc/Bcc per blob for header SEARCH without re-reading messages."""
    return LruCache(max_items=500_000, max_cost=500_000)
