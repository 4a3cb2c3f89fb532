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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "latest.json"
DOC = ROOT / "docs" / "BENCHMARKS.md"

#: The three set-ups pg_bench.py measures with the same load, in this order.
PG_WHERE = ("embedded store, `postfach serve`", "PostgreSQL, 1 node", "PostgreSQL, 2 nodes")

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
        "imap_qresync_select_100k_ms": ("QRESYNC SELECT, 10 changes, 100k mailbox", "ms", 20, "max"),
        "imap_search_body_100k_ms": ("UID SEARCH BODY <word>, 100k mailbox (full-text index)", "ms", 100, "max"),
        "imap_search_body_100k_cold_ms": ("  the same, first command after a server start", "ms", 100, "max"),
        "imap_search_body_scan_100k_ms": ("  the same question as a scan (NOT NOT: no index)", "ms", None, "max"),
        "imap_search_subject_idx_100k_ms": ("UID SEARCH SUBJECT <text>, 100k mailbox (full-text index)", "ms", 100,
                                            "max"),
        "imap_search_subject_idx_100k_cold_ms": ("  the same, first command after a server start", "ms", 100, "max"),
        "imap_sort_date_100k_ms": ("UID SORT (DATE), 100k mailbox", "ms", 100, "max"),
        "imap_sort_date_100k_cold_ms": ("  the same, first command after a server start", "ms", 100, "max"),
        "imap_thread_refs_100k_ms": ("UID THREAD REFERENCES, 100k mailbox", "ms", 300, "max"),
        "imap_thread_refs_100k_cold_ms": ("  the same, first command after a server start", "ms", 300, "max"),
        "imap_compress_ratio": ("COMPRESS=DEFLATE ratio, FETCH of 1,000 headers", "x", None, "min"),
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
    "pg_bench.py": {
        **{
            f"{key}_msgs_per_s": (f"SMTP local delivery, 10 connections, 4 KiB, durable{rcpt}, {where}", "msgs/s", None,
                                  "min")
            for rcpt, keys in (("", ("serve_embedded_smtp_10", "pg_smtp_10_1node", "pg_smtp_10_2node")),
                               (", 10 recipients", ("serve_embedded_smtp_10_spread", "pg_smtp_10_spread_1node",
                                                    "pg_smtp_10_spread_2node")))
            for key, where in zip(keys, PG_WHERE, strict=True)
        },
        **{
            f"{key}_{fig}": (f"IMAP mixed load, 10 clients over TLS{what}, {where}", unit, None, sense)
            for fig, what, unit, sense in (("ops_per_s", "", "ops/s", "min"), ("p99_ms", ", p99 latency", "ms", "max"))
            for key, where in zip(("serve_embedded_imap_mixed_10", "pg_imap_mixed_10_1node", "pg_imap_mixed_10_2node"),
                                  PG_WHERE, strict=True)
        },
        "pg_notify_cross_p50_ms": ("Cross-node notification, IDLE on node A, delivery through B, p50", "ms", None,
                                   "max"),
        "pg_notify_cross_p99_ms": ("Cross-node notification, IDLE on node A, delivery through B, p99", "ms", 200,
                                   "max"),
        "pg_notify_local_p99_ms": ("Same-node notification (delivery through A), PostgreSQL, p99", "ms", None, "max"),
    },
    "queue_bench.py": {
        "queue_outbound_msgs_per_s": ("Outbound queue to a loopback sink", "msgs/s", 300, "min"),
    },
    "load/scale.py": {
        **{
            f"imap_scale_{n}_ops_per_s": (f"IMAP mixed load, {n} client{'s' if n > 1 else ''} over TLS", "ops/s", None,
                                          "min")
            for n in (1, 10, 50, 200)
        },
        **{
            f"imap_scale_{n}_p99_ms": (f"IMAP mixed load, {n} client{'s' if n > 1 else ''}, p99 latency", "ms", None,
                                       "max")
            for n in (1, 10, 50, 200)
        },
        **{
            f"smtp_scale_{n}_msgs_per_s": (f"SMTP submission over TLS, {n} connection{'s' if n > 1 else ''}, 4 KiB",
                                           "msgs/s", None, "min")
            for n in (1, 10, 50)
        },
        **{
            f"imap_scale_w2_{n}_ops_per_s": (f"IMAP mixed load, {n} clients over TLS, `serve --workers 2`", "ops/s",
                                             2000 if n == 10 else None, "min")
            for n in (10, 50)
        },
        **{
            f"imap_scale_w2_{n}_p99_ms": (f"IMAP mixed load, {n} clients, `serve --workers 2`, p99 latency", "ms",
                                          None, "max")
            for n in (10, 50)
        },
        "pop3_scale_10_sessions_per_s": ("POP3 sessions (login, UIDL, 5 RETR, QUIT), 10 clients", "sessions/s", None,
                                         "min"),
        **{
            f"imap_{what}_{size}_ms": (f"{label}, {size // 1000}k-message mailbox", "ms",
                                       30 if (what, size) == ("select", 100000) else None, "max")
            for size in (1000, 10000, 100000)
            for what, label in (("select", "SELECT"), ("search", "UID SEARCH SUBJECT"),
                                ("fetch_flags", "UID FETCH 1:* (UID FLAGS)"))
        },
    },
    "proxy_bench.py": {
        "imap_implicit_plain_conn_per_s": ("New IMAP connections over implicit TLS (handshake + greeting)", "conn/s",
                                           None, "min"),
        "imap_implicit_proxy_conn_per_s": ("The same through a PROXY v2 listener", "conn/s", None, "min"),
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


#: Keys some scripts print under their own names, mapped to the table's keys.
KEY_MAP: dict[str, dict[str, str]] = {
    "smtp_bench.py": {"messages_per_second": "smtp_local_delivery_10_msgs_per_s"},
    "pop3_bench.py": {
        "uidl_ms_median": "pop3_uidl_50k_ms",
        "list_ms_median": "pop3_list_50k_ms",
        "retr_tls_mib_per_s": "pop3_retr_mib_per_s",
    },
    "queue_bench.py": {"messages_per_second": "queue_outbound_msgs_per_s"},
    "backup_bench.py": {"full_backup_s": "backup_full_s", "incremental_backup_s": "backup_incremental_s"},
}


def _last_json(stdout: str) -> dict[str, Any] | None:
    """The last JSON object a script printed (one line, or indented over several)."""
    lines = stdout.strip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                obj = json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def run_script(name: str, quick: bool) -> dict[str, Any]:
    path = ROOT / "bench" / name
    if not path.exists():
        print(f"  {name}: not present yet", file=sys.stderr)
        return {}
    cmd = [sys.executable, str(path)] + (["--quick"] if quick else [])
    print(f"  {name} ...", file=sys.stderr)
    t0 = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3 * 3600, env=env)
    except subprocess.TimeoutExpired:
        print(f"  {name}: timed out", file=sys.stderr)
        return {}
    if proc.returncode == 2 and quick and "unrecognized arguments: --quick" in proc.stderr:
        print(f"  {name}: has no --quick; running its default", file=sys.stderr)
        return run_script(name, False)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        print(f"  {name}: failed ({proc.returncode}) after {took:.0f}s\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {}
    figures = _last_json(proc.stdout)
    if figures is None:
        print(f"  {name}: printed no JSON object", file=sys.stderr)
        return {}
    for key, alias in KEY_MAP.get(name, {}).items():
        if key in figures and alias not in figures:
            figures[alias] = figures[key]
    print(f"  {name}: {len(figures)} figures in {took:.0f}s", file=sys.stderr)
    return figures


def verdict(value: float | None, target: float | None, sense: str) -> str:
    if value is None:
        return "not measured"
    if target is None:
        return "—"
    ok = value >= target if sense == "min" else value <= target
    return "met" if ok else "**missed**"


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


COMPARE_SCRIPTS = {"dovecot": "compare_dovecot.py"}

#: Issue targets that bench/load/scale.py measures the same way (same load, over TLS, real serve):
#: used when the protocol's own script did not report the figure.
ALIASES = {
    "imap_mixed_10_ops_per_s": "imap_scale_10_ops_per_s",
    "imap_mixed_10_p99_ms": "imap_scale_10_p99_ms",
    "imap_mixed_50_ops_per_s": "imap_scale_50_ops_per_s",
    "imap_mixed_50_p99_ms": "imap_scale_50_p99_ms",
    "imap_select_100k_ms": "imap_select_100000_ms",
    "imap_uid_fetch_flags_100k_ms": "imap_fetch_flags_100000_ms",
    "imap_search_subject_100k_ms": "imap_search_100000_ms",
}
CHART = ROOT / "docs" / "benchmarks-scale.png"
NOTES = ROOT / "docs" / "BENCHMARKS.notes.md"
GENERATED = "<!-- generated by bench/run.py from bench/results/latest.json: everything below is rewritten -->"


def write_doc(results: dict[str, object], figures: dict[str, Any]) -> None:
    m = results["machine"]
    assert isinstance(m, dict)
    lines = [
        "# Benchmarks",
        "",
        "Measured by `make bench` (full) or `make bench QUICK=1` (short run) on this machine; the table",
        "is rewritten by `bench/run.py` from `bench/results/latest.json`. Targets come from the issues.",
        "",
        f"Machine: {m['cores']} cores, Python {m['python']}, {m['loop']}, {m['platform']}. "
        f"Date: {results['date']}. Mode: {_mode(results)}.",
        "",
        "| figure | measured | target | verdict |",
        "|---|---|---|---|",
    ]
    aliased = []
    for specs in SCRIPTS.values():
        for key, (what, unit, target, sense) in specs.items():
            value = _num(figures.get(key))
            if value is None and key in ALIASES and _num(figures.get(ALIASES[key])) is not None:
                value = _num(figures[ALIASES[key]])
                what += " ¹"
                aliased.append(key)
            shown = f"{value:,.1f} {unit}" if value is not None else "—"
            tgt = "" if target is None else f"{'≥' if sense == 'min' else '<'} {target:,g} {unit}"
            lines.append(f"| {what} | {shown} | {tgt} | {verdict(value, target, sense)} |")
    if aliased:
        lines += ["", "¹ measured by `bench/load/scale.py` (the same load against a real `postfach serve` over TLS), "
                  "because the protocol's own bench script reported no figure for it."]
    lines += compare_table(figures)
    if CHART.exists():
        lines += ["", f"![throughput and p99 latency against concurrent clients]({CHART.name})"]
    known = {k for s in SCRIPTS.values() for k in s}
    extra = sorted(k for k in figures if k not in known and _num(figures[k]) is not None
                   and not k.startswith("dovecot_"))
    if extra:
        lines += ["", "Other figures:", ""]
        lines += [f"- `{k}`: {_num(figures[k]):,.2f}" for k in extra]
    if NOTES.exists():
        lines += ["", NOTES.read_text(encoding="utf-8").rstrip()]
    DOC.write_text("\n".join(lines) + "\n", encoding="utf-8")


def compare_table(figures: dict[str, Any]) -> list[str]:
    """postfach and Dovecot side by side, for every figure measured on both (same load, same data)."""
    pairs = sorted(k.removeprefix("dovecot_") for k in figures if k.startswith("dovecot_") and "_errors" not in k
                   and _num(figures[k]) is not None and _num(figures.get(k.removeprefix("dovecot_"))) is not None)
    if not pairs:
        return []
    version = f"Dovecot {figures.get('dovecot_version', '')}".strip()
    out = ["", f"## Side by side with {version}", "",
           "The same load generators (`bench/load/aimap.py`), accounts and messages, both servers on loopback with",
           "implicit TLS (`make bench COMPARE=dovecot`; Dovecot from Debian, configured by",
           "`bench/compare_dovecot.py`).",
           "", "| figure | postfach | Dovecot | postfach / Dovecot |", "|---|---|---|---|"]
    for k in sorted(pairs, key=_curve_order):
        a, b = _num(figures[k]), _num(figures["dovecot_" + k])
        assert a is not None and b is not None
        ratio = f"{a / b:.2f}×" if b else "—"
        out.append(f"| `{k}` | {a:,.1f} | {b:,.1f} | {ratio} |")
    return out


def _curve_order(key: str) -> tuple[str, int, str]:
    parts = key.split("_")
    nums = [int(p) for p in parts if p.isdigit()]
    return (parts[0], nums[0] if nums else 0, key)


def curve(figures: dict[str, Any], pattern: str, levels: tuple[int, ...]) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for n in levels:
        v = _num(figures.get(pattern.format(n=n)))
        if v is not None:
            xs.append(n)
            ys.append(v)
    return xs, ys


def draw_chart(figures: dict[str, Any], path: Path = CHART) -> bool:
    """IMAP ops/s and p99 against clients, SMTP deliveries/s against connections, SELECT/SEARCH
    against mailbox size; Dovecot beside postfach where it was measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  chart: matplotlib is not installed (pip install matplotlib); no PNG", file=sys.stderr)
        return False
    levels = (1, 10, 50, 200)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    ax = axes[0]
    for prefix, label, style in (("", "postfach", "o-"), ("dovecot_", "Dovecot", "s--")):
        xs, ys = curve(figures, prefix + "imap_scale_{n}_ops_per_s", levels)
        if xs:
            ax.plot(xs, ys, style, label=label)
    ax.set(xscale="log", xlabel="concurrent IMAP clients", ylabel="operations/s", title="IMAP mixed load: throughput")
    ax.legend()
    ax = axes[1]
    for prefix, label, style in (("", "postfach", "o-"), ("dovecot_", "Dovecot", "s--")):
        xs, ys = curve(figures, prefix + "imap_scale_{n}_p99_ms", levels)
        if xs:
            ax.plot(xs, ys, style, label=label)
    ax.set(xscale="log", yscale="log", xlabel="concurrent IMAP clients", ylabel="p99 latency (ms)",
           title="IMAP mixed load: p99 latency")
    ax.legend()
    ax = axes[2]
    xs, ys = curve(figures, "smtp_scale_{n}_msgs_per_s", (1, 10, 50))
    if xs:
        ax.plot(xs, ys, "o-", label="deliveries/s")
        ax2 = ax.twinx()
        xs2, ys2 = curve(figures, "smtp_scale_{n}_p99_ms", (1, 10, 50))
        ax2.plot(xs2, ys2, "x:", color="tab:red", label="p99 ms")
        ax2.set_ylabel("p99 latency (ms)")
    ax.set(xscale="log", xlabel="SMTP connections", ylabel="deliveries/s (durable)", title="SMTP submission")
    ax = axes[3]
    sizes = (1000, 10000, 100000)
    for what, style in (("select", "o-"), ("search", "s-"), ("fetch_flags", "^-")):
        xs, ys = curve(figures, f"imap_{what}_{{n}}_ms", sizes)
        if xs:
            ax.plot(xs, ys, style, label=what.replace("_", " ").upper())
    ax.set(xscale="log", yscale="log", xlabel="messages in the mailbox", ylabel="ms",
           title="Large mailbox: time per command")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def knee(figures: dict[str, Any], prefix: str = "") -> str:
    """Where more clients stop buying throughput and only buy latency."""
    xs, ops = curve(figures, prefix + "imap_scale_{n}_ops_per_s", (1, 10, 50, 200))
    _, p99 = curve(figures, prefix + "imap_scale_{n}_p99_ms", (1, 10, 50, 200))
    if len(xs) < 2 or len(p99) != len(xs):
        return "not measured"
    best = max(range(len(xs)), key=lambda i: ops[i])
    for i in range(1, len(xs)):
        if ops[i] < ops[i - 1] * 1.15:
            return (f"between {xs[i - 1]} and {xs[i]} clients: throughput goes from {ops[i - 1]:,.0f} to "
                    f"{ops[i]:,.0f} ops/s while p99 goes from {p99[i - 1]:,.0f} to {p99[i]:,.0f} ms "
                    f"(peak {ops[best]:,.0f} ops/s at {xs[best]})")
    return f"not reached up to {xs[-1]} clients ({ops[-1]:,.0f} ops/s, p99 {p99[-1]:,.0f} ms)"


def write_notes(figures: dict[str, Any]) -> None:
    """The generated half of docs/BENCHMARKS.notes.md: knee, bottleneck, profile, workers.
    Hand-written prose above the marker line stays as it is."""
    head = NOTES.read_text(encoding="utf-8").split(GENERATED)[0].rstrip() if NOTES.exists() else ""
    cpu: dict[int, float] = {}
    for n in (1, 10, 50, 200):
        v = _num(figures.get(f"imap_scale_{n}_server_cpu"))
        if v is not None:
            cpu[n] = v
    lines = [GENERATED, "", "### Scale: knee and bottleneck (generated)", ""]
    lines.append(f"- **Knee (IMAP mixed load):** {knee(figures)}.")
    if any(k.startswith("dovecot_imap_scale") for k in figures):
        lines.append(f"- **Knee, Dovecot, same load:** {knee(figures, 'dovecot_')}.")
    if cpu:
        shown = ", ".join(f"{v:.2f} at {n}" for n, v in cpu.items())
        top = max(cpu.values())
        lines.append(f"- **Server CPU** (cores busy, from /proc, event loop plus the store's threads): {shown}.")
        if top >= 0.9:
            lines.append("- **One process saturates:** from the knee on, the server process keeps about one core "
                         "busy: the event loop (IMAP session code, TLS, MIME sections; see the profile) runs all the "
                         "time and more clients only queue; `serve --workers N` (below) spreads the sessions over "
                         "N processes.")
        else:
            lines.append(f"- **One process does not saturate** on this machine: the server peaks at {top:.2f} of a "
                         "core while latency grows. The two cores are shared with the load generators (separate "
                         "processes doing TLS too) and, on the build machine, with other jobs, so the loop waits "
                         "for CPU and for the store's writer thread (fsync per group commit) rather than running "
                         "flat out.")
    w2 = [(n, _num(figures.get(f"imap_scale_{n}_ops_per_s")), _num(figures.get(f"imap_scale_w2_{n}_ops_per_s")),
           _num(figures.get(f"imap_scale_w2_{n}_server_cpu"))) for n in (10, 50)]
    w2 = [t for t in w2 if t[1] is not None and t[2] is not None]
    if w2:
        lines.append("- **`serve --workers 2`** (a supervisor hands each connection to the least busy of two worker "
                     "processes; one store): " + "; ".join(
                         f"{n} clients: {one:,.0f} ops/s with one process, {two:,.0f} with two"
                         + (f" (server {cpu:.2f} cores)" if cpu is not None else "")
                         for n, one, two, cpu in w2 if one is not None and two is not None)
                     + ". The load generators run on the same two cores, so a second worker competes with "
                     "them for CPU.")
    smtp = curve(figures, "smtp_scale_{n}_msgs_per_s", (1, 10, 50))
    if smtp[0]:
        lines.append("- **SMTP:** " + ", ".join(f"{y:,.0f} deliveries/s at {x}" for x, y in zip(*smtp, strict=True))
                     + " connections; each delivery is fsynced before its 250, and concurrent deliveries share one "
                     "commit (group commit), which is why throughput grows with connections.")
    sizes = [(n, _num(figures.get(f"imap_select_{n}_ms")), _num(figures.get(f"imap_search_{n}_ms")))
             for n in (1000, 10000, 100000)]
    sizes = [t for t in sizes if t[1] is not None]
    if sizes:
        lines.append("- **Mailbox size:** " + "; ".join(
            f"{n // 1000}k messages: SELECT {sel:,.1f} ms, SEARCH SUBJECT {sea:,.1f} ms"
            for n, sel, sea in sizes if sel is not None and sea is not None) + ".")
    lines += pg_notes(figures)
    prof = figures.get("profile_imap_50")
    if isinstance(prof, dict) and prof.get("areas"):
        lines += ["", "### Profile of the 50-client IMAP load (pyinstrument, event-loop thread, generated)", "",
                  "Share of sampled time by what the loop was doing:", ""]
        lines += [f"- {a}: {p:.1f} %" for a, p in prof["areas"][:8]]
        lines += ["", "Functions with the most self time:", ""]
        lines += [f"- `{f}`: {p:.1f} %" for f, p in prof.get("self", [])[:10]]
    elif isinstance(prof, dict) and prof.get("error"):
        lines += ["", f"Profile: not taken ({prof['error']})."]
    NOTES.parent.mkdir(parents=True, exist_ok=True)
    NOTES.write_text((head + "\n\n" if head else "") + "\n".join(lines) + "\n", encoding="utf-8")


def pg_notes(figures: dict[str, Any]) -> list[str]:
    """The generated notes of bench/pg_bench.py: the three set-ups side by side, the gain of a
    second node, where the CPU goes (per delivery / per IMAP command), the notification latency,
    the profile of node A during the SMTP load."""
    pg = figures.get("pg_breakdown")
    if not isinstance(pg, dict):
        return []
    out = ["", "### PostgreSQL store: one node, two nodes (generated from `bench/pg_bench.py`)", "",
           f"{pg.get('rounds', 1)} round(s) of each load, the median shown; load average at the end "
           f"{pg.get('loadavg_1min', '?')}.", "",
           "| load | embedded, `serve` | PostgreSQL, 1 node | PostgreSQL, 2 nodes | 2 nodes / 1 node |",
           "|---|---|---|---|---|"]
    loads = (("SMTP, 10 connections, 1 recipient (msgs/s)", "smtp", "msgs_per_s"),
             ("SMTP, 10 connections, 10 recipients (msgs/s)", "smtp_spread", "msgs_per_s"),
             ("IMAP mixed, 10 clients (ops/s)", "imap", "ops_per_s"))
    for label, key, fig in loads:
        emb, one, two = (pg.get(f"{key}_{w}") for w in ("embedded", "1node", "2node"))
        vals = [_num(x.get(fig)) if isinstance(x, dict) else None for x in (emb, one, two)]
        cells = [f"{v:,.0f}" if v is not None else "—" for v in vals]
        gain = f"{vals[2] / vals[1]:.2f}×" if vals[1] and vals[2] is not None else "—"
        out.append(f"| {label} | {' | '.join(cells)} | {gain} |")
    out += ["", "Where the CPU goes, per delivery or IMAP command (µs of CPU; cores busy during the load in "
            "brackets; `/proc/<pid>/stat` of the nodes, of the PostgreSQL backends of the bench database and of "
            "PostgreSQL's background processes, `getrusage` of the load generator):", "",
            "| load | nodes | PG backends | PG background | load generator | all (cores) | commits | WAL flushes |",
            "|---|---|---|---|---|---|---|---|"]
    for label, key, _ in loads:
        for w in ("embedded", "1node", "2node"):
            x = pg.get(f"{key}_{w}")
            if not isinstance(x, dict):
                continue
            us, busy = x.get("cpu_us_per_unit", {}), x.get("cores_busy", {})

            def cell(part: str, us: dict[str, Any] = us, busy: dict[str, Any] = busy) -> str:
                return f"{us[part]:,} ({busy.get(part, 0):.2f})" if part in us else "—"

            where = {"embedded": "embedded", "1node": "PG 1 node", "2node": "PG 2 nodes"}[w]
            out.append(f"| {label.split(' (')[0]}, {where} | {cell('nodes')} | {cell('pg_backends')} | "
                       f"{cell('pg_background')} | {cell('load_generator')} | {busy.get('total', 0):.2f} | "
                       f"{x.get('commits_per_unit', '—')} | {x.get('wal_syncs_per_unit', '—')} |")
    out += ["", "(commits: transactions committed in the bench database per unit; WAL flushes: fsyncs of the "
            "write-ahead log per unit, counted server-wide, so other users of the server add to it.)", ""]
    for name, what in (("notify_cross", "IDLE on node A, delivery through node B's MX listener"),
                       ("notify_local", "IDLE on node A, delivery through node A")):
        n = pg.get(name)
        if isinstance(n, dict):
            out.append(f"- **Notification latency, {what}:** p50 {n['p50_ms']:.1f} ms, p99 {n['p99_ms']:.1f} ms, "
                       f"max {n['max_ms']:.1f} ms over {n['samples']} deliveries (from the 250 to the "
                       f"`* n EXISTS`; {n.get('exists_before_ack', 0)} arrived before the 250 and count as 0).")
    for load, label, rate, unit in (("smtp", "SMTP", "msgs_per_s", "msgs/s"), ("imap", "IMAP", "ops_per_s", "ops/s")):
        prof = pg.get(f"profile_{load}_1node")
        if isinstance(prof, dict) and prof.get("areas"):
            under = prof.get("under_profiler", {})
            out += ["", f"#### Profile of node A during the one-node {label} load (pyinstrument, event-loop thread)",
                    "", f"{under.get(rate, '?')} {unit} under the profiler. Share of sampled time:", ""]
            out += [f"- {a}: {v:.1f} %" for a, v in prof["areas"][:8]]
            out += ["", "Functions with the most self time:", ""]
            out += [f"- `{f}`: {v:.1f} %" for f, v in prof.get("self", [])[:10]]
        elif isinstance(prof, dict) and prof.get("error"):
            out += ["", f"{label} profile: not taken ({prof['error']})."]
    return out


def _mode(results: dict[str, Any]) -> str:
    """"full", "quick", or full with the scripts whose figures come from a --quick run named."""
    if results.get("quick"):
        return "quick"
    q = results.get("quick_scripts") or []
    return "full" if not q else "full, except " + ", ".join(f"`{n}`" for n in q) + " (quick)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short run (about 2 minutes)")
    ap.add_argument("--only", action="append", help="run only this script (repeatable)")
    ap.add_argument("--compare", choices=sorted(COMPARE_SCRIPTS), help="also measure another server (dovecot)")
    ap.add_argument("--doc-only", action="store_true", help="rewrite docs from bench/results/latest.json")
    args = ap.parse_args()
    figures: dict[str, Any] = {}
    previous: dict[str, Any] = {}
    quick_scripts: list[str] = []  # which scripts' figures come from a --quick run
    if RESULTS.exists():
        old = json.loads(RESULTS.read_text())
        previous = old.get("figures", {})
        quick_scripts = list(old.get("quick_scripts", list(SCRIPTS) if old.get("quick") else []))
    if not (args.only or args.doc_only):
        quick_scripts = []
    if not args.doc_only:
        for name in SCRIPTS:
            if args.only and name not in args.only:
                continue
            figures.update(run_script(name, args.quick))
            quick_scripts = [q for q in quick_scripts if q != name] + ([name] if args.quick else [])
        if args.compare:
            figures.update(run_script(COMPARE_SCRIPTS[args.compare], args.quick))
    merged = {**previous, **figures} if (args.only or args.doc_only) else figures
    results = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": bool(quick_scripts) and set(quick_scripts) >= set(SCRIPTS),
        "quick_scripts": sorted(quick_scripts),
        "machine": machine(),
        "figures": merged,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    draw_chart(merged)
    write_notes(merged)
    write_doc(results, merged)
    print(json.dumps({k: v for k, v in merged.items() if _num(v) is not None}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
