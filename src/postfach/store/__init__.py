"""The store: the only place that knows SQL or files (ARCHITECTURE.md).

``open_store(config)`` builds the configured backend; callers then ``await store.open()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from postfach.errors import StoreError
from postfach.store.base import Store

if TYPE_CHECKING:
    from postfach.config import Config


def open_store(config: Config) -> Store:
    """The Store the configuration names (not opened yet: ``await store.open()``)."""
    backend = config.store.backend
    if backend == "sqlite":
        from postfach.store.sqlite import SqliteStore

        return SqliteStore(
            config.path(config.store.path),
            group_commit_max=config.store.group_commit_max,
            inline_max=config.store.inline_max_bytes,
        )
    if backend == "postgres":
        if not config.store.dsn:
            raise StoreError('[store] backend = "postgres" needs dsn = "postgresql://user@host/dbname"')
        from postfach.store.postgres import PostgresStore

        return PostgresStore(config.store.dsn, schema=config.store.schema or None)
    raise StoreError(f"unknown store backend {backend!r}")


__all__ = ["Store", "open_store"]
