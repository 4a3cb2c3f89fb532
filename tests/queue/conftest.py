"""Queue fixtures live in queuehelpers.py (importable by the tests under a unique name)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from queuehelpers import dns_server, env

__all__ = ["dns_server", "env"]
