"""The ``make fuzz`` harness (bench/fuzz.py) in short form: a few thousand inputs per target, fed
through the same receivers and parsers as the long run, find no crash and no hang; and the
harness does notice a crash when there is one."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import bench.fuzz as fuzz
import pytest


@pytest.mark.parametrize("target", sorted(fuzz.TARGETS))
def test_short_fuzz_run_finds_nothing(target: str) -> None:
    result = fuzz.fuzz_worker(target, 3000, seed=random.randrange(2**32), hang_seconds=10)
    assert result["inputs"] == 3000
    assert result["findings"] == [], result["findings"]


def test_harness_reports_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> tuple[list[bytes], Callable[[bytes, random.Random], None]]:
        def run(data: bytes, rng: random.Random) -> None:
            if b"\x00" in data:
                raise IndexError("boom")

        return [b"a\x00b", b"abc"], run

    monkeypatch.setattr(fuzz, "FINDINGS", tmp_path)
    monkeypatch.setitem(fuzz.TARGETS, "broken", broken)
    result = fuzz.fuzz_worker("broken", 200, seed=1, hang_seconds=10)
    findings = result["findings"]
    assert isinstance(findings, list) and findings
    assert "IndexError: boom" in findings[0]["error"]
    assert list(tmp_path.glob("broken-*.bin"))
