"""``make bench``: run every benchmark script in bench/, collect their JSON, write the results.

Each script prints one JSON object (its figures) as the last line of its standard output and takes
``--quick``. This runner writes ``bench/results/latest.json`` and the table in
``docs/BENCHMARKS.md``: each figure beside its target, with the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "latest.json"
DOC = ROOT / "docs" / "BENCHMARKS.md"

# script -> the figures it reports: key -> (what, unit, target, "min"|"max" meaning target is a floor/ceiling)
SCRIPTS: dict[str, dict[str, tuple[str, str, float | None, str]]] = {
    "ingest.py": {
        "ingest_4k_msgs_per_s": ("Store ingest, 4 KiB messages, durable, concurrent writers", "msgs/s", 2000, "min"),
        "ingest_100k_msgs_per_s": ("Store ingest, 100 KiB messages, durable", "msgs/s", None, "min"),
    },
    "imap_bench.py": {
        "imap_mixed_10_ops_per_s": ("IMAP mixed load, 10 clients over TLS", "ops/s", 2000, "min"),
        "imap_mixed_10_p99_ms": ("IMAP mixed load, 10 clients, p99 latency", "ms", None, "max"),
        "imap_mixed_50_ops_per_s": ("IMAP mixed load, 50 clients over TLS", "ops/s", None, "min"),
        "imap_mixed_50_p99_ms": ("IMAP mixed load, 50 clients, p99 latency", "ms", None, "max"),
        "imap_select_100k_ms": ("SELECT of a 100k-message mailbox", "ms", 30, "max"),
        "imap_uid_fetch_flags_100k_ms": ("UID FETCH 1:* (UID FLAGS), 100k mailbox", "ms", 150, "max"),
        "imap_search_subject_100k_ms": ("UID SEARCH SUBJECT, 100k mailbox", "ms", None, "max"),
        "imap_fetch_50_envelopes_ms": ("FETCH newest 50 envelopes, 100k mailbox", "ms", 5, "max"),
        "imap_idle_rss_kib_per_conn": ("RSS per idle IDLE connection (2,000 connections)", "KiB", 50, "max"),
    },
    "pop3_bench.py": {
        "pop3_uidl_50k_ms": ("POP3 UIDL on a 50,000-message maildrop", "ms", 150, "max"),
        "pop3_list_50k_ms": ("POP3 LIST on a 50,000-message maildrop", "ms", 150, "max"),
        "pop3_retr_mib_per_s": ("POP3 RETR of 1 MiB messages over TLS", "MiB/s", 150, "min"),
    },
    "smtp_bench.py": {
        "smtp_local_delivery_10_msgs_per_s": (
            "SMTP local delivery, 10 connections, 4 KiB, durable",
            "msgs/s",
            1000,
            "min",
        ),
    },
    "queue_bench.py": {
        "queue_outbound_msgs_per_s": ("Outbound queue to a loopback sink", "msgs/s", 300, "min"),
    },
    "backup_bench.py": {
        "backup_full_s": ("Full backup", "s", None, "max"),
        "backup_incremental_s": ("Incremental backup after 1,000 new messages", "s", 5, "max"),
    },
}


def machine() -> dict[str, str]:
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    return {
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "loop": loop,
        "platform": platform.platform(terse=True),
    }


def run_script(name: str, quick: bool) -> dict[str, float]:
    path = ROOT / "bench" / name
    if not path.exists():
        print(f"  {name}: not present yet", file=sys.stderr)
        return {}
    cmd = [sys.executable, str(path)] + (["--quick"] if quick else [])
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        print(f"  {name}: failed ({proc.returncode}) after {took:.0f}s\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        print(f"  {name}: printed no JSON", file=sys.stderr)
        return {}
    figures: dict[str, float] = json.loads(lines[-1])
    print(f"  {name}: {len(figures)} figures in {took:.0f}s", file=sys.stderr)
    return figures


def verdict(value: float | None, target: float | None, sense: str) -> str:
    if value is None:
        return "not measured"
    if target is None:
        return "—"
    ok = value >= target if sense == "min" else value <= target
    return "met" if ok else "**missed**"


def write_doc(results: dict[str, object], figures: dict[str, float]) -> None:
    m = results["machine"]
    assert isinstance(m, dict)
    lines = [
        "# Benchmarks",
        "",
        "Measured by `make bench` (full) or `make bench QUICK=1` (short run) on this machine; the table",
        "is rewritten by `bench/run.py` from `bench/results/latest.json`. Targets come from the issues.",
        "",
        f"Machine: {m['cores']} cores, Python {m['python']}, {m['loop']}, {m['platform']}. "
        f"Date: {results['date']}. Mode: {'quick' if results['quick'] else 'full'}.",
        "",
        "| figure | measured | target | verdict |",
        "|---|---|---|---|",
    ]
    for specs in SCRIPTS.values():
        for key, (what, unit, target, sense) in specs.items():
            value = figures.get(key)
            shown = f"{value:,.1f} {unit}" if value is not None else "—"
            tgt = "" if target is None else f"{'≥' if sense == 'min' else '<'} {target:,g} {unit}"
            lines.append(f"| {what} | {shown} | {tgt} | {verdict(value, target, sense)} |")
    extra = sorted(k for k in figures if not any(k in s for s in SCRIPTS.values()))
    if extra:
        lines += ["", "Other figures:", ""]
        lines += [f"- `{k}`: {figures[k]:,.2f}" for k in extra]
    notes = ROOT / "docs" / "BENCHMARKS.notes.md"
    if notes.exists():
        lines += ["", notes.read_text(encoding="utf-8").rstrip()]
    DOC.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short run (about 2 minutes)")
    ap.add_argument("--only", action="append", help="run only this script (repeatable)")
    ap.add_argument("--compare", help="also measure another server (dovecot)")
    args = ap.parse_args()
    figures: dict[str, float] = {}
    previous: dict[str, float] = {}
    if RESULTS.exists():
        previous = json.loads(RESULTS.read_text()).get("figures", {})
    for name in SCRIPTS:
        if args.only and name not in args.only:
            continue
        figures.update(run_script(name, args.quick))
    merged = {**previous, **figures} if args.only else figures
    results = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "machine": machine(),
        "figures": merged,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    write_doc(results, merged)
    print(json.dumps(merged, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
