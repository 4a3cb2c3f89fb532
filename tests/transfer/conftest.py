"""The transfer tests share the backup tests' data-dir fixture (real init, real SQLite store)."""

from __future__ import annotations

from tests.backup.conftest import Env, env, message, populate

__all__ = ["Env", "env", "message", "populate"]
