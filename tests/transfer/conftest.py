"""The transfer tests share the backup tests' data-dir fixture (real init, a real store of the run's backend)."""

from __future__ import annotations

from tests.backup.conftest import Env, env, message, populate

__all__ = ["Env", "env", "message", "populate"]
