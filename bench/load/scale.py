"""Scale curves against a real ``postfach serve`` (issue 7, item 3), the load generators in
separate processes, everything over TLS:

* IMAP mixed load: operations/s and p50/p99 latency at 1, 10, 50, 200 concurrent clients;
* SMTP submission: deliveries/s (4 KiB, durable before 250) at 1, 10, 50 connections;
* POP3 leave-on-server sessions at 10 clients (RETR MiB/s);
* SELECT, UID SEARCH and UID FETCH 1:* (FLAGS) time against mailbox size 1k, 10k, 100k;
* the server's CPU use during each load (1.0 = one core saturated: the "does one process
  saturate" figure) and a pyinstrument profile of the 50-client IMAP run, summarised.

    PYTHONPATH=src .venv/bin/python bench/load/scale.py [--quick] [--data DIR] [--no-profile]

Prints one JSON object (flat figures) as its last line; ``bench/run.py`` draws the chart from it.
The data dir is kept (filling 100k messages takes minutes); default /tmp/postfach-bench-scale.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from bench.load import aimap  # noqa: E402
from bench.load.server import ServerProcess, cpu_seconds  # noqa: E402

PASSWORD = "bench-pass-1"
USERS = [f"bench{i}@example.org" for i in range(50)]
SENDER = "sender@example.org"
PER_PROCESS = 100  # clients per load-generator process


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * p))] if v else 0.0


# ------------------------------------------------------------------------------- load processes


def _imap_proc(port: int, cafile: str, users: list[str], password: str, clients: int, seconds: float,
               first: int, out: Any) -> None:
    try:
        out.put(asyncio.run(aimap.imap_load("127.0.0.1", port, cafile, users, password, clients, seconds, first)))
    except BaseException as e:  # reported by the parent
        out.put({"error": repr(e)})


def _pop3_proc(port: int, cafile: str, users: list[str], password: str, clients: int, seconds: float,
               out: Any) -> None:
    try:
        out.put(asyncio.run(aimap.pop3_load("127.0.0.1", port, cafile, users, password, clients, seconds)))
    except BaseException as e:
        out.put({"error": repr(e)})


def _smtp_proc(port: int, cafile: str, user: str, password: str, rcpts: list[str], conns: int, seconds: float,
               out: Any) -> None:
    try:
        out.put(asyncio.run(aimap.smtp_load("127.0.0.1", port, cafile, user, password, rcpts, conns, seconds)))
    except BaseException as e:
        out.put({"error": repr(e)})


def run_procs(jobs: list[tuple[Any, tuple[Any, ...]]], pid: int | None) -> tuple[list[dict[str, Any]], float]:
    """Run load processes; their results and the server's CPU seconds used meanwhile."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=fn, args=(*args, q)) for fn, args in jobs]
    cpu0 = cpu_seconds(pid) if pid else 0.0
    for p in procs:
        p.start()
    results = [q.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join(60)
    cpu = (cpu_seconds(pid) - cpu0) if pid else 0.0
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"load process failed: {errors}")
    return results, cpu


def measure_imap(prefix: str, port: int, cafile: str, users: list[str], password: str, levels: list[int],
                 seconds: float, pid: int | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for n in levels:
        print(f"  {prefix} IMAP mixed load, {n} clients, {seconds:g} s ...", file=sys.stderr)
        jobs = []
        for first in range(0, n, PER_PROCESS):
            k = min(PER_PROCESS, n - first)
            jobs.append((_imap_proc, (port, cafile, users, password, k, seconds, first)))
        results, cpu = run_procs(jobs, pid)
        lat = [x for r in results for v in r["ops"].values() for x in v]
        wall = max(float(r["wall"]) for r in results)
        # an APPEND op is three commands (APPEND, STORE, EXPUNGE)
        ops = len(lat) + 2 * sum(len(r["ops"].get("append", [])) for r in results)
        measured = seconds if seconds < wall else wall
        out[f"{prefix}imap_scale_{n}_ops_per_s"] = round(ops / measured, 1)
        out[f"{prefix}imap_scale_{n}_p50_ms"] = round(pct(lat, 0.5) * 1000, 2)
        out[f"{prefix}imap_scale_{n}_p99_ms"] = round(pct(lat, 0.99) * 1000, 2)
        out[f"{prefix}imap_scale_{n}_errors"] = sum(int(r["errors"]) for r in results)
        samples = [e for r in results for e in r.get("error_samples", [])]
        if samples:
            print(f"    errors, e.g.: {samples[:3]}", file=sys.stderr)
        if pid:
            out[f"{prefix}imap_scale_{n}_server_cpu"] = round(cpu / measured, 2)
    return out


def measure_pop3(prefix: str, port: int, cafile: str, users: list[str], password: str, clients: int,
                 seconds: float, pid: int | None) -> dict[str, float]:
    print(f"  {prefix} POP3 sessions, {clients} clients ...", file=sys.stderr)
    results, cpu = run_procs([(_pop3_proc, (port, cafile, users, password, clients, seconds))], pid)
    r = results[0]
    sessions = r["ops"].get("session", [])
    out = {
        f"{prefix}pop3_scale_{clients}_sessions_per_s": round(len(sessions) / seconds, 1),
        f"{prefix}pop3_scale_{clients}_p99_ms": round(pct(sessions, 0.99) * 1000, 2),
        f"{prefix}pop3_scale_{clients}_retr_mib_per_s": round(r["octets"] / seconds / 2**20, 2),
    }
    if pid:
        out[f"{prefix}pop3_scale_{clients}_server_cpu"] = round(cpu / seconds, 2)
    return out


def measure_smtp(port: int, cafile: str, levels: list[int], seconds: float, pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for n in levels:
        print(f"  SMTP submission, {n} connections ...", file=sys.stderr)
        results, cpu = run_procs([(_smtp_proc, (port, cafile, SENDER, PASSWORD, USERS, n, seconds))], pid)
        lat = results[0]["ops"].get("deliver", [])
        if results[0]["errors"]:
            print(f"    {results[0]['errors']} refused, e.g.: {results[0]['error_samples'][:3]}", file=sys.stderr)
        out[f"smtp_scale_{n}_msgs_per_s"] = round(len(lat) / seconds, 1)
        out[f"smtp_scale_{n}_p99_ms"] = round(pct(lat, 0.99) * 1000, 2)
        out[f"smtp_scale_{n}_server_cpu"] = round(cpu / seconds, 2)
    return out


async def _timed_big(port: int, cafile: str, sizes: list[int]) -> dict[str, float]:
    import ssl

    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = False
    out: dict[str, float] = {}
    for size in sizes:
        c = aimap.ImapClient()
        await c.connect("127.0.0.1", port, ctx)
        await c.cmd(f'LOGIN "big{size}@example.org" "{PASSWORD}"')

        async def timed(text: str, repeat: int = 3) -> float:
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                await c.cmd(text)  # noqa: B023 - the loop's client, awaited right here
                times.append(time.perf_counter() - t)
            return round(statistics.median(times) * 1000, 2)

        out[f"imap_select_{size}_ms"] = await timed("SELECT INBOX")
        out[f"imap_search_{size}_ms"] = await timed('UID SEARCH SUBJECT "topic 777"')
        out[f"imap_fetch_flags_{size}_ms"] = await timed("UID FETCH 1:* (UID FLAGS)")
        await c.close()
    return out


# ------------------------------------------------------------------------------------- data


def _size_label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


async def prepare(srv: ServerProcess, sizes: list[int]) -> None:
    """Users with 200 messages each and one account per mailbox size, straight through the store
    (the server is not running yet)."""
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
        for addr in [SENDER, *USERS]:
            if await store.get_account(addr) is None:
                acct = await store.create_account(addr, hashed)
                if addr == SENDER:
                    continue
                inbox = await store.get_mailbox(acct.id, "INBOX")
                assert inbox is not None
                await store.append_many(acct.id, inbox.id, [
                    (aimap.bench_message(i, addr), frozenset({"\\Seen"}) if i % 3 else frozenset(), None)
                    for i in range(aimap.USER_MESSAGES)])
        for size in sizes:
            addr = f"big{size}@example.org"
            acct = await store.get_account(addr) or await store.create_account(addr, hashed)
            inbox = await store.get_mailbox(acct.id, "INBOX")
            assert inbox is not None
            have = (await store.mailbox_status(acct.id, inbox.id)).messages
            t0 = time.perf_counter()
            while have < size:
                n = min(2000, size - have)
                await store.append_many(acct.id, inbox.id, [
                    (aimap.bench_message(have + i, addr, 1500),
                     frozenset({"\\Seen"}) if (have + i) % 3 else frozenset(), None) for i in range(n)])
                have += n
                if have % 10000 == 0 or have == size:
                    print(f"    {addr}: {have}/{size} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    finally:
        await store.close()


# ---------------------------------------------------------------------------------- profile


def summarize_profile(path: Path, top: int = 12,
                      area_of: Callable[[list[str]], str] | None = None) -> dict[str, Any]:
    """pyinstrument's JSON session -> where the event loop's time goes: self time by function and
    by area (TLS, SQLite/store, each postfach package, waiting). Only the main thread is sampled:
    the store's writer and blob threads show up as the time the loop waits for them."""
    if not path.exists():
        return {}
    doc = json.loads(path.read_text())
    root = doc.get("root_frame")
    if root is None:
        return {}
    classify = area_of or _area
    self_time: dict[str, float] = {}
    area: dict[str, float] = {}

    def walk(frame: dict[str, Any], stack: list[str], parent: str) -> None:
        children = frame.get("children", [])
        own = float(frame.get("time", 0)) - sum((float(c.get("time", 0)) for c in children), 0.0)
        where = str(frame.get("file_path_short") or frame.get("file_path") or "")
        function = str(frame.get("function", "?"))
        if (function == "<module>" and stack) or "importlib" in str(frame.get("file_path") or ""):
            return  # start-up (imports), not serving
        # pyinstrument's "[self]" / "[await]" pseudo-frames belong to the function above them
        name = parent if function.startswith("[") else f"{function} ({where.rsplit('/', 1)[-1]})"
        here = [*stack, f"{function} {frame.get('file_path') or ''}"]
        if own > 0:
            self_time[name] = self_time.get(name, 0.0) + own
            key = classify(here)
            area[key] = area.get(key, 0.0) + own
        for c in children:
            walk(c, here, name)

    walk(root, [], "?")
    total = sum(self_time.values())
    if not total:
        return {}
    return {
        "seconds": round(total, 2),
        "self": [(f, round(100 * t / total, 1)) for f, t in sorted(self_time.items(), key=lambda x: -x[1])[:top]],
        "areas": [(a, round(100 * t / total, 1)) for a, t in sorted(area.items(), key=lambda x: -x[1])],
    }


def _area(frames: list[str]) -> str:
    """What a sample was doing, by its innermost frame: the event loop itself (uvloop's C code:
    polling, socket I/O, callbacks), TLS, SQLite, or the postfach package whose Python code runs."""
    if len(frames) > 1 and frames[-1].startswith("["):  # pyinstrument's [self]: the function above
        frames = frames[:-1]
    leaf = frames[-1]
    if "/ssl.py" in leaf or "sslproto" in leaf or "SSL" in leaf.split(" ", 1)[0]:
        return "TLS (ssl)"
    if "sqlite" in leaf.lower():
        return "SQLite (in the loop thread)"
    if "/postfach/" in leaf:
        return "postfach." + leaf.split("/postfach/", 1)[1].split("/")[0].removesuffix(".py")
    if "runners.py" in leaf or "base_events.py" in leaf or "uvloop" in leaf or "[await]" in leaf:
        return "event loop (uvloop: polling, socket I/O, waiting for store threads)"
    for f in reversed(frames):
        if "/postfach/" in f:
            pkg = f.split("/postfach/", 1)[1].split("/")[0].removesuffix(".py")
            if pkg not in ("server", "cli", "__main__"):
                return f"postfach.{pkg} (stdlib/asyncio below it)"
    return "other (asyncio, stdlib)"


# --------------------------------------------------------------------------------------- main


def profile_run(srv: ServerProcess, out: Path, seconds: float) -> dict[str, Any]:
    """The 50-client IMAP load once more, with the server under pyinstrument (sampling, low
    overhead); py-spy would attach from outside but cannot read this container's processes."""
    try:
        import pyinstrument  # noqa: F401
    except ImportError:
        return {"error": "pyinstrument is not installed (pip install pyinstrument)"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    print("  profiling the 50-client IMAP load (pyinstrument) ...", file=sys.stderr)
    srv.start(python_args=["-m", "pyinstrument", "-r", "json", "-o", str(out)])
    try:
        measure_imap("", srv.port("imap"), str(srv.cafile), USERS, PASSWORD, [50], seconds, srv.pid)
    finally:
        srv.stop(timeout=120)
    summary = summarize_profile(out)
    return summary or {"error": "pyinstrument wrote no profile"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "postfach-bench-scale")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--workers", type=int, default=2,
                    help="also measure the IMAP mixed load (10 and 50 clients) with serve --workers N (1: skip)")
    ap.add_argument("--profile-out", type=Path, default=ROOT / "bench" / "results" / "profile-imap-50.json")
    args = ap.parse_args(argv)
    quick = args.quick
    imap_levels = [1, 10, 50] if quick else [1, 10, 50, 200]
    smtp_levels = [1, 10, 50]
    sizes = [1000, 10000] if quick else [1000, 10000, 100000]
    seconds = 4.0 if quick else 15.0
    srv = ServerProcess(args.data / "var", log_level="WARNING")
    if not (srv.data / "postfach.toml").exists():
        args.data.mkdir(parents=True, exist_ok=True)
        srv.init()
    print("preparing data ...", file=sys.stderr)
    asyncio.run(prepare(srv, sizes))
    figures: dict[str, Any] = {}
    try:
        srv.start()
        cafile = str(srv.cafile)
        pid = srv.pid
        figures.update(measure_imap("", srv.port("imap"), cafile, USERS, PASSWORD, imap_levels, seconds, pid))
        figures.update(measure_pop3("", srv.port("pop3"), cafile, USERS, PASSWORD, 10, seconds, pid))
        figures.update(measure_smtp(srv.port("submission"), cafile, smtp_levels, seconds, pid))
        print("  SELECT / SEARCH against mailbox size ...", file=sys.stderr)
        figures.update(asyncio.run(_timed_big(srv.port("imap"), cafile, sizes)))
    finally:
        srv.stop()
    if args.workers > 1:
        # The same load against `serve --workers N` (the load generators run on the same cores).
        wsrv = ServerProcess(srv.data, log_level="WARNING", workers=args.workers, log_dir=srv.log_dir)
        wsrv.starts = srv.starts  # its own log file names
        try:
            wsrv.start()
            got = measure_imap("", wsrv.port("imap"), str(wsrv.cafile), USERS, PASSWORD, [10, 50], seconds, wsrv.pid)
            figures.update({k.replace("imap_scale_", f"imap_scale_w{args.workers}_"): v for k, v in got.items()})
        finally:
            wsrv.stop()
    if not args.no_profile:
        figures["profile_imap_50"] = profile_run(srv, args.profile_out, seconds)
    figures["scale_quick"] = quick
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
