"""PostgreSQL store, one node and two nodes (issue 9): real ``postfach serve`` processes on one
fresh database, the load generators in separate processes, beside the embedded store measured by
the same harness in the same run.

* SMTP local delivery: the load of ``smtp_bench.py`` (10 connections on the MX listener, 4 KiB,
  PIPELINING, every message durable before its 250) against node A, then split across A and B;
  once to one recipient as smtp_bench does (every delivery locks that account's row: they queue),
  once with one recipient per connection (as an MX's traffic is spread over many accounts). The
  MX listener's SPF/DKIM/DMARC lookups go to a DNS server on loopback (a local resolver);
* IMAP mixed load: the generator of ``load/scale.py`` (10 clients over TLS) against A, then split;
* cross-node notification latency: an IDLE session on A, deliveries through B's MX listener, the
  time from B's 250 to the ``* n EXISTS`` at A (and the same with the delivery through A);
* where the CPU goes: each node's CPU (/proc), the PostgreSQL backends of the bench database and
  PostgreSQL's background processes (WAL writer, checkpointer; /proc/<pid>/stat of each), the load
  generator's own; and a pyinstrument profile of node A during the one-node SMTP and IMAP loads.

    PYTHONPATH=src .venv/bin/python bench/pg_bench.py [--quick] [--dsn postgresql://postgres@127.0.0.1/postgres]

The database ``postfach_bench_<pid>`` is created and dropped again. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import asyncpg  # noqa: E402
from bench.load import aimap  # noqa: E402
from bench.load.scale import _area, pct, summarize_profile  # noqa: E402
from bench.load.server import ServerProcess, cpu_seconds  # noqa: E402
from bench.smtp_bench import send_messages, smtp_session  # noqa: E402
from tests.dnsserver import DnsTestServer  # noqa: E402

ADMIN_DSN = os.environ.get("POSTFACH_BENCH_PG", os.environ.get("POSTFACH_TEST_PG",
                                                                "postgresql://postgres@127.0.0.1:5432/postgres"))
PASSWORD = "bench-pass-1"
IMAP_USERS = [f"bench{i}@example.org" for i in range(10)]
SMTP_USER = "user@example.org"  # smtp_bench's recipient
SPREAD_USERS = [f"rcpt{i}@example.org" for i in range(10)]  # one recipient per connection
WATCH_USER = "watch@example.org"  # the IDLE session of the notification latency
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------- CPU accounting


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (no children), 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


class PgProcesses:
    """The PostgreSQL processes whose CPU a load costs: the backends connected to the bench
    database, and the server's background processes (WAL writer, checkpointer, ...), which other
    users of a shared server also keep busy. Listed through pg_stat_activity; CPU from /proc."""

    def __init__(self, admin_dsn: str, database: str) -> None:
        self.admin_dsn = admin_dsn
        self.database = database

    async def pids(self) -> tuple[dict[str, list[int]], dict[str, float]]:
        """The processes, and counters: commits in the bench database, WAL flushes (fsync) of the
        whole server (other users of a shared server add theirs)."""
        conn = await asyncpg.connect(self.admin_dsn, timeout=10)
        try:
            rows = await conn.fetch("SELECT pid, datname, backend_type FROM pg_stat_activity")
            commits = await conn.fetchval("SELECT xact_commit FROM pg_stat_database WHERE datname = $1",
                                          self.database)
            try:
                wal = await conn.fetchrow("SELECT wal_sync, wal_write FROM pg_stat_wal")
            except asyncpg.PostgresError:  # before PostgreSQL 14
                wal = None
        finally:
            await conn.close()
        out: dict[str, list[int]] = {"backends": [], "background": []}
        for r in rows:
            if r["datname"] == self.database:
                out["backends"].append(int(r["pid"]))
            elif r["datname"] is None and r["backend_type"] != "client backend":
                out["background"].append(int(r["pid"]))
        counters = {"commits": float(commits or 0)}
        if wal is not None:
            counters["wal_syncs"] = float(wal["wal_sync"])
        return out, counters

    def sample(self) -> dict[str, dict[Any, float]]:
        pids, counters = asyncio.run(self.pids())
        return {**{k: {p: _proc_cpu(p) for p in v} for k, v in pids.items()}, "counters": dict(counters)}

    @staticmethod
    def delta(before: dict[str, dict[Any, float]], after: dict[str, dict[Any, float]]) -> dict[str, float]:
        """CPU seconds used in between (a backend that started meanwhile counts from zero; one that
        ended meanwhile is lost: the nodes' pools keep their connections, so that is rare), and the
        counters' increase."""
        return {k: sum(v - before.get(k, {}).get(key, 0.0) for key, v in after[k].items()) for k in after
                if k != "counters"} | {k: v - before["counters"].get(k, 0.0) for k, v in after["counters"].items()}


class Window:
    """CPU seconds of the nodes and of PostgreSQL over one measurement."""

    def __init__(self, nodes: Sequence[ServerProcess], pg: PgProcesses | None) -> None:
        self.nodes = nodes
        self.pg = pg

    def __enter__(self) -> Window:
        self.node0 = [cpu_seconds(n.pid) for n in self.nodes]
        self.pg0 = self.pg.sample() if self.pg else {}
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.node_cpu = [cpu_seconds(n.pid) - c for n, c in zip(self.nodes, self.node0, strict=True)]
        self.pg_cpu = PgProcesses.delta(self.pg0, self.pg.sample()) if self.pg else {}


# ------------------------------------------------------------------------------- load processes


def _smtp_proc(ports: list[int], rcpts: list[str], total: int, conns: int, size: int, go: Any, out: Any) -> None:
    """smtp_bench's clients, connection c on ports[c % len(ports)] to rcpts[c % len(rcpts)]; waits
    for ``go``."""

    async def main() -> tuple[int, float]:
        per = total // conns
        t0 = time.perf_counter()
        oks = await asyncio.gather(*(send_messages(ports[c % len(ports)], per, size, c, rcpts[c % len(rcpts)])
                                     for c in range(conns)))
        return sum(oks), time.perf_counter() - t0

    try:
        out.put("ready")
        go.wait(60)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        ok, seconds = asyncio.run(main())
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        out.put({"ok": ok, "seconds": seconds,
                 "cpu": ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime})
    except BaseException as e:  # reported by the parent
        out.put({"error": repr(e)})


def _imap_proc(ports: list[int], cafile: str, users: list[str], clients: int, seconds: float, go: Any,
               out: Any) -> None:
    """scale.py's IMAP mixed load in one process, the clients split evenly across ``ports``."""

    async def main() -> dict[str, Any]:
        groups = []
        first = 0
        for k, port in enumerate(ports):
            n = clients // len(ports) + (1 if k < clients % len(ports) else 0)
            groups.append(aimap.imap_load("127.0.0.1", port, cafile, users, PASSWORD, n, seconds, first))
            first += n
        results: list[Any] = await asyncio.gather(*groups)
        ops: dict[str, list[float]] = {}
        for r in results:
            for op, v in r["ops"].items():
                ops.setdefault(op, []).extend(v)
        return {"ops": ops, "errors": sum(int(r["errors"]) for r in results),
                "error_samples": [e for r in results for e in r["error_samples"]],
                "wall": max(float(r["wall"]) for r in results)}

    try:
        out.put("ready")
        go.wait(60)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        result = asyncio.run(main())
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        result["cpu"] = ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime
        out.put(result)
    except BaseException as e:
        out.put({"error": repr(e)})


def _run_load(fn: Callable[..., None], args: tuple[Any, ...], nodes: Sequence[ServerProcess],
              pg: PgProcesses | None) -> tuple[dict[str, Any], Window]:
    """One load process; the CPU window opens once it has started (spawn and imports excluded)."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    go = ctx.Event()
    proc = ctx.Process(target=fn, args=(*args, go, q))
    proc.start()
    first = q.get(timeout=120)
    if first != "ready":
        raise RuntimeError(f"load process failed: {first}")
    with Window(nodes, pg) as win:
        go.set()
        result = q.get(timeout=1800)
    proc.join(60)
    if "error" in result:
        raise RuntimeError(f"load process failed: {result['error']}")
    return result, win


def _breakdown(win: Window, client_cpu: float, units: int) -> dict[str, Any]:
    """CPU per unit of work (µs) and cores busy, by process group."""
    per = max(1, units)
    cpu = {k: v for k, v in win.pg_cpu.items() if k in ("backends", "background")}
    parts = {"nodes": sum(win.node_cpu), **{f"pg_{k}": v for k, v in cpu.items()}, "load_generator": client_cpu}
    counters = {f"{k}_per_unit": round(v / per, 2) for k, v in win.pg_cpu.items() if k not in cpu}
    return {
        **counters,
        "wall_s": round(win.wall, 2),
        "cpu_us_per_unit": {k: round(v / per * 1e6) for k, v in parts.items()},
        "cores_busy": {k: round(v / win.wall, 2) for k, v in parts.items()} | {
            "total": round(sum(parts.values()) / win.wall, 2)},
        "node_cores_busy": [round(c / win.wall, 2) for c in win.node_cpu],
    }


def measure_smtp(nodes: Sequence[ServerProcess], pg: PgProcesses | None, total: int, conns: int = 10,
                 size: int = 4096, rcpts: Sequence[str] = (SMTP_USER,)) -> dict[str, Any]:
    ports = [n.port("mx", "starttls") for n in nodes]
    r, win = _run_load(_smtp_proc, (ports, list(rcpts), total, conns, size), nodes, pg)
    return {"msgs_per_s": round(r["ok"] / r["seconds"], 1), "acknowledged": r["ok"],
            **_breakdown(win, r["cpu"], r["ok"])}


def measure_imap(nodes: Sequence[ServerProcess], pg: PgProcesses | None, seconds: float,
                 clients: int = 10) -> dict[str, Any]:
    ports = [n.port("imap", "implicit") for n in nodes]
    r, win = _run_load(_imap_proc, (ports, str(nodes[0].cafile), IMAP_USERS, clients, seconds), nodes, pg)
    lat = [x for v in r["ops"].values() for x in v]
    ops = len(lat) + 2 * len(r["ops"].get("append", []))  # an APPEND op is APPEND, STORE, EXPUNGE
    measured = min(seconds, float(r["wall"]))
    if r["errors"]:
        print(f"    IMAP errors: {r['errors']}, e.g. {r['error_samples'][:3]}", file=sys.stderr)
    return {"ops_per_s": round(ops / measured, 1), "p50_ms": round(pct(lat, 0.5) * 1000, 2),
            "p99_ms": round(pct(lat, 0.99) * 1000, 2), "errors": r["errors"],
            **_breakdown(win, r["cpu"], ops)}


def warm_up(nodes: Sequence[ServerProcess], loads: Sequence[str] = ("smtp", "imap")) -> None:
    """A short run of the loads, not measured: a node just started has its first connections to
    open, asyncpg its statements to prepare, PostgreSQL its buffers to fill."""
    if "smtp" in loads:
        measure_smtp(nodes, None, 100)
    if "imap" in loads:
        measure_imap(nodes, None, 2.0)


# ------------------------------------------------------------------------------ notification


async def notify_latency(idle_node: ServerProcess, via: ServerProcess, samples: int) -> dict[str, Any]:
    """IDLE on ``idle_node``; ``samples`` deliveries one after the other through ``via``'s MX
    listener; for each, the time from the 250 that acknowledges it to the ``* n EXISTS`` the IDLE
    session gets (RFC 2177). Negative (EXISTS read before the 250) counts as 0."""
    ctx = ssl.create_default_context(cafile=str(idle_node.cafile))
    ctx.check_hostname = False
    c = aimap.ImapClient()
    await c.connect("127.0.0.1", idle_node.port("imap", "implicit"), ctx)
    await c.cmd(f'LOGIN "{WATCH_USER}" "{PASSWORD}"')
    await c.cmd("SELECT INBOX")
    c.writer.write(b"i IDLE\r\n")
    if not (await c.reader.readline()).startswith(b"+"):
        raise RuntimeError("IDLE refused")
    seen: list[tuple[int, float]] = []
    arrived = asyncio.Event()

    async def watch() -> None:
        while line := await c.reader.readline():
            if line.startswith(b"* ") and line.rstrip().endswith(b" EXISTS"):
                seen.append((int(line.split()[1]), time.perf_counter()))
                arrived.set()

    watcher = asyncio.create_task(watch())
    writer, reply = await smtp_session(via.port("mx", "starttls"))
    lat: list[float] = []
    early = 0
    try:
        for i in range(samples):
            writer.write(f"MAIL FROM:<bench@sender.example>\r\nRCPT TO:<{WATCH_USER}>\r\nDATA\r\n".encode())
            for _ in range(3):
                await reply()
            writer.write(aimap.bench_message(i, WATCH_USER, 2048) + b".\r\n")
            answer = await reply()
            acked = time.perf_counter()
            if not answer.startswith(b"250"):
                raise RuntimeError(f"delivery refused: {answer!r}")
            want = c.exists + i + 1
            deadline = acked + 10
            while not (seen and seen[-1][0] >= want):
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), max(0.01, deadline - time.perf_counter()))
            at = next(t for n, t in seen if n >= want)
            if at < acked:
                early += 1
            lat.append(max(0.0, at - acked))
            await asyncio.sleep(0.01)  # deliveries one by one, not in a burst
    finally:
        writer.write(b"QUIT\r\n")
        writer.close()
        c.writer.write(b"DONE\r\n")
        watcher.cancel()
        await c.close()
    return {"samples": len(lat), "p50_ms": round(pct(lat, 0.5) * 1000, 2), "p99_ms": round(pct(lat, 0.99) * 1000, 2),
            "max_ms": round(max(lat) * 1000, 2), "mean_ms": round(statistics.fmean(lat) * 1000, 2),
            "exists_before_ack": early}


# ------------------------------------------------------------------------------------- setup


async def _admin(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def provision(srv: ServerProcess) -> None:
    """The accounts: IMAP users with 200 messages each (as in scale.py), the SMTP recipient, the
    IDLE watcher. Straight through the store of ``srv``'s configuration."""
    from postfach import config as cfgmod
    from postfach.auth import make_hasher
    from postfach.store import open_store

    config = cfgmod.load(srv.data)
    hashed = make_hasher(config.auth).hash(PASSWORD)
    store = open_store(config)
    await store.open()
    try:
        if await store.get_domain("example.org") is None:
            await store.add_domain("example.org")
        for addr in [SMTP_USER, WATCH_USER, *SPREAD_USERS, *IMAP_USERS]:
            if await store.get_account(addr) is not None:
                continue
            acct = await store.create_account(addr, hashed)
            if addr in IMAP_USERS:
                inbox = await store.get_mailbox(acct.id, "INBOX")
                assert inbox is not None
                await store.append_many(acct.id, inbox.id, [
                    (aimap.bench_message(i, addr), frozenset({"\\Seen"}) if i % 3 else frozenset(), None)
                    for i in range(aimap.USER_MESSAGES)])
    finally:
        await store.close()


def local_resolver() -> DnsTestServer:
    """A DNS server on loopback for the MX listener's SPF / DKIM / DMARC lookups, standing in for
    the local caching resolver an MX host has: without one, every lookup waits for the system
    resolver's timeout and the bench measures that."""
    dns = DnsTestServer()
    dns.start()
    dns.add("sender.example", "TXT", "v=spf1 ip4:127.0.0.0/8 -all")
    dns.add("_dmarc.sender.example", "TXT", "v=DMARC1; p=none")
    return dns


def use_resolver(srv: ServerProcess, dns: DnsTestServer) -> None:
    cfg = srv.data / "postfach.toml"
    cfg.write_text(cfg.read_text(encoding="utf-8")
                   + f'\n[smtp]\ndns_nameservers = ["127.0.0.1"]\ndns_port = {dns.port}\n', encoding="utf-8")


def _pg_area(frames: list[str]) -> str:
    """scale.py's areas, plus asyncpg (the PostgreSQL wire protocol, pool, record decoding) and
    the message parse (MIME structure kept with each blob)."""
    inner = frames[-3:]
    if any("asyncpg" in f for f in inner):
        return "asyncpg (PostgreSQL client: protocol, pool, records)"
    if any("hashlib" in f or "sha256" in f for f in inner):
        return "sha256 of message bytes (content address)"
    return _area(frames)


def profile_node(srv: ServerProcess, pg: PgProcesses, out: Path, load: str, smtp_total: int,
                 seconds: float) -> dict[str, Any]:
    """The one-node SMTP or IMAP load once more, node A under pyinstrument (its event-loop thread)."""
    try:
        import pyinstrument  # noqa: F401
    except ImportError:
        return {"error": "pyinstrument is not installed (pip install pyinstrument)"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    print(f"  profiling node A during the {load.upper()} load (pyinstrument) ...", file=sys.stderr)
    srv.start(python_args=["-m", "pyinstrument", "-r", "json", "-o", str(out)])
    try:
        warm_up([srv], [load])  # the profile covers the node's whole life: only this load
        got = measure_smtp([srv], pg, smtp_total) if load == "smtp" else measure_imap([srv], pg, seconds)
    finally:
        srv.stop(timeout=120)
    summary = summarize_profile(out, area_of=_pg_area)
    return {**(summary or {"error": "pyinstrument wrote no profile"}), "under_profiler": got}


# -------------------------------------------------------------------------------------- main


def _best(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The median run by ``key`` (odd count) or the better of two."""
    ordered = sorted(runs, key=lambda r: float(r[key]))
    return ordered[len(ordered) // 2]


def run_all(work: Path, args: argparse.Namespace, dns: DnsTestServer, figures: dict[str, Any],
            breakdown: dict[str, Any]) -> None:
    """Every measurement, in rounds: the embedded store, PostgreSQL with node A, with A and B (the
    servers not measured stay idle, so the three set-ups share the machine's state of the moment)."""
    quick = args.quick
    rounds = breakdown["rounds"]
    smtp_total = 1000 if quick else 3000
    seconds = 4.0 if quick else 15.0
    samples = 100 if quick else 300
    database = f"postfach_bench_{os.getpid()}"
    dsn = f"{args.dsn.rpartition('/')[0]}/{database}"
    e: ServerProcess | None = None
    if not args.no_embedded:
        e = ServerProcess(work / "embedded", log_level="INFO")
        e.init()
        use_resolver(e, dns)
        asyncio.run(provision(e))
    asyncio.run(_admin(args.dsn, f'CREATE DATABASE "{database}"'))
    try:
        a = ServerProcess(work / "a", log_level="INFO", store_dsn=dsn)
        b = ServerProcess(work / "b", log_level="INFO", store_dsn=dsn)
        a.init()
        b.init()  # finds the schema made by A's init
        use_resolver(a, dns)
        use_resolver(b, dns)
        shutil.rmtree(b.data / "tls")
        shutil.copytree(a.data / "tls", b.data / "tls")  # one certificate: one cafile for the clients
        print(f"preparing {database} ...", file=sys.stderr)
        asyncio.run(provision(a))
        pg = PgProcesses(args.dsn, database)
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in ("smtp1", "smtp2", "spread1", "spread2", "imap1",
                                                                   "imap2", "esmtp", "espread", "eimap")}
        a.start()
        try:
            if e is not None:
                e.start()
                warm_up([e])
            warm_up([a])
            for r in range(rounds):
                if e is not None:
                    print(f"  round {r + 1}/{rounds}: embedded store: SMTP, IMAP ...", file=sys.stderr)
                    runs["esmtp"].append(measure_smtp([e], None, smtp_total))
                    runs["espread"].append(measure_smtp([e], None, smtp_total, rcpts=SPREAD_USERS))
                    runs["eimap"].append(measure_imap([e], None, seconds))
                print(f"  round {r + 1}/{rounds}: PostgreSQL, 1 node: SMTP, IMAP ...", file=sys.stderr)
                runs["smtp1"].append(measure_smtp([a], pg, smtp_total))
                runs["spread1"].append(measure_smtp([a], pg, smtp_total, rcpts=SPREAD_USERS))
                runs["imap1"].append(measure_imap([a], pg, seconds))
                b.start()
                try:
                    warm_up([a, b])
                    print(f"  round {r + 1}/{rounds}: PostgreSQL, 2 nodes: SMTP, IMAP ...", file=sys.stderr)
                    runs["smtp2"].append(measure_smtp([a, b], pg, smtp_total))
                    runs["spread2"].append(measure_smtp([a, b], pg, smtp_total, rcpts=SPREAD_USERS))
                    runs["imap2"].append(measure_imap([a, b], pg, seconds))
                    if r == rounds - 1:
                        print(f"  notification latency, {samples} samples ...", file=sys.stderr)
                        breakdown["notify_cross"] = asyncio.run(notify_latency(a, b, samples))
                        breakdown["notify_local"] = asyncio.run(notify_latency(a, a, samples))
                finally:
                    b.stop()
        finally:
            a.stop()
            if e is not None:
                e.stop()
        for tb in a.tracebacks() + b.tracebacks() + (e.tracebacks() if e is not None else []):
            print(f"    server log: {tb}", file=sys.stderr)
        if not args.no_profile:
            for load in ("smtp", "imap"):
                breakdown[f"profile_{load}_1node"] = profile_node(
                    a, pg, args.profile_dir / f"profile-pg-{load}.json", load, smtp_total, seconds)
    finally:
        asyncio.run(_admin(args.dsn, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
    names = {"smtp": ("smtp", "msgs_per_s"), "spread": ("smtp_spread", "msgs_per_s"), "imap": ("imap", "ops_per_s")}
    for short, (name, rate) in names.items():
        for run, where in ((short + "1", "1node"), (short + "2", "2node"), ("e" + short, "embedded")):
            if runs[run]:
                breakdown[f"{name}_{where}"] = _best(runs[run], rate)
    breakdown["all_runs"] = {k: [x.get("msgs_per_s", x.get("ops_per_s")) for x in v] for k, v in runs.items() if v}
    keys = {
        "pg_smtp_10_1node_msgs_per_s": ("smtp_1node", "msgs_per_s"),
        "pg_smtp_10_2node_msgs_per_s": ("smtp_2node", "msgs_per_s"),
        "pg_smtp_10_spread_1node_msgs_per_s": ("smtp_spread_1node", "msgs_per_s"),
        "pg_smtp_10_spread_2node_msgs_per_s": ("smtp_spread_2node", "msgs_per_s"),
        "pg_imap_mixed_10_1node_ops_per_s": ("imap_1node", "ops_per_s"),
        "pg_imap_mixed_10_1node_p99_ms": ("imap_1node", "p99_ms"),
        "pg_imap_mixed_10_2node_ops_per_s": ("imap_2node", "ops_per_s"),
        "pg_imap_mixed_10_2node_p99_ms": ("imap_2node", "p99_ms"),
        "pg_notify_cross_p50_ms": ("notify_cross", "p50_ms"),
        "pg_notify_cross_p99_ms": ("notify_cross", "p99_ms"),
        "pg_notify_local_p50_ms": ("notify_local", "p50_ms"),
        "pg_notify_local_p99_ms": ("notify_local", "p99_ms"),
        "serve_embedded_smtp_10_msgs_per_s": ("smtp_embedded", "msgs_per_s"),
        "serve_embedded_smtp_10_spread_msgs_per_s": ("smtp_spread_embedded", "msgs_per_s"),
        "serve_embedded_imap_mixed_10_ops_per_s": ("imap_embedded", "ops_per_s"),
        "serve_embedded_imap_mixed_10_p99_ms": ("imap_embedded", "p99_ms"),
    }
    for key, (part, fig) in keys.items():
        if isinstance(breakdown.get(part), dict):
            figures[key] = breakdown[part][fig]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dsn", default=ADMIN_DSN, help="a database of the PostgreSQL server to connect to for "
                    "CREATE/DROP DATABASE (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=0,
                    help="rounds of embedded / 1-node / 2-node runs, interleaved (default: 1 with --quick, else 3)")
    ap.add_argument("--no-embedded", action="store_true", help="skip the embedded store's figures")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--profile-dir", type=Path, default=ROOT / "bench" / "results",
                    help="where the pyinstrument sessions go (profile-pg-smtp.json, profile-pg-imap.json)")
    args = ap.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    figures: dict[str, Any] = {}
    breakdown: dict[str, Any] = {"rounds": rounds, "quick": args.quick}
    dns = local_resolver()
    try:
        with tempfile.TemporaryDirectory(prefix="postfach-pgbench-") as tmp:
            run_all(Path(tmp), args, dns, figures, breakdown)
    finally:
        dns.stop()
    breakdown["loadavg_1min"] = round(os.getloadavg()[0], 2)
    figures["pg_breakdown"] = breakdown
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
