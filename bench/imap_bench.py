"""IMAP benchmarks (issue 3): run the server in its own process and load it over TLS.

  (a) mixed load: N concurrent clients doing what a mail client does (SELECT, FETCH headers and
      bodies, STORE flags, APPEND, EXPUNGE, SEARCH) -> operations/s and p50/p99 latency;
  (b) one mailbox of --big messages: SELECT, UID FETCH 1:* (UID FLAGS), UID SEARCH SUBJECT,
      FETCH of the newest 50 envelopes;
  (c) server RSS per idle IDLE connection with --idle connections;
  (d) issue 8 on the big mailbox: QRESYNC SELECT after 10 flag changes; SEARCH BODY and SUBJECT
      (full-text index), SORT (DATE), THREAD REFERENCES, each warm and as the first command after
      a server start ("cold"); the same SEARCH BODY as a scan; COMPRESS=DEFLATE ratio and server
      CPU on FETCH of 1,000 headers (``--issue8-only`` runs just these).

    PYTHONPATH=src .venv/bin/python bench/imap_bench.py --data /tmp/imapbench [--big 100000]
        [--clients 10 50] [--seconds 20] [--idle 2000]

The data dir is kept between runs (loading 100,000 messages takes minutes). ``--quick`` (used by
``make bench QUICK=1``) runs a 10,000-message mailbox, 5-second loads and 500 idle connections. The
last line of stdout is one JSON object of figures for bench/run.py.

Environment knobs for investigations: IMAP_BENCH_STDLIB_LOOP=1 (server without uvloop),
IMAP_BENCH_GC_THRESHOLD=50000 (gc.set_threshold in the server), IMAP_BENCH_PYINSTRUMENT=<file> /
IMAP_BENCH_PROFILE=<file> (profile the server process), IMAP_BENCH_WRITER_PROFILE=<file> (cProfile
of the SQLite store's writer thread).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import ssl
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

USER_COUNT = 50
USER_MESSAGES = 200
PASSWORD = "bench-pass-1"


def msg(i: int, who: str = "bench") -> bytes:
    return (
        f"From: Sender {i % 97} <sender{i % 97}@example.com>\r\n"
        f"To: {who}@example.org\r\n"
        f"Subject: Report {i} about topic {i % 1000}\r\n"
        f"Date: Mon, 01 Jan 2024 10:{i % 60:02d}:00 +0000\r\n"
        f"Message-ID: <bench{i}.{who}@example.com>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        + f"Hello, this is message {i}.\r\n" * 40
    ).encode()


# ------------------------------------------------------------------------------------- server side


def config_for(data: Path) -> object:
    from postfach.config import AuthConfig, Config, LimitsConfig, ListenerConfig

    return Config(
        hostname="localhost",
        listeners=(ListenerConfig("imap", 0, address="127.0.0.1", tls="implicit"),),
        auth=AuthConfig(argon2_time_cost=1, argon2_memory_kib=8, argon2_parallelism=1,
                        lockout_failures=10**6),
        limits=replace(LimitsConfig(), max_connections_per_ip=100000, max_connections_per_account=100000),
        data_dir=data,
    )


async def prepare(data: Path, big: int) -> None:
    from postfach.auth import make_hasher
    from postfach.net.tls import generate_self_signed
    from postfach.store.sqlite import SqliteStore

    cfg = config_for(data)
    cert, key = cfg.path(cfg.tls.cert), cfg.path(cfg.tls.key)  # type: ignore[attr-defined]
    if not cert.exists():
        generate_self_signed("localhost", cert, key)
    store = SqliteStore(cfg.path(cfg.store.path))  # type: ignore[attr-defined]
    await store.open()
    try:
        hashed = make_hasher(cfg.auth).hash(PASSWORD)  # type: ignore[attr-defined]
        if await store.get_domain("example.org") is None:
            await store.add_domain("example.org")
        for n in range(USER_COUNT):
            addr = f"bench{n}@example.org"
            if await store.get_account(addr) is None:
                acct = await store.create_account(addr, hashed)
                inbox = await store.get_mailbox(acct.id, "INBOX")
                assert inbox is not None
                await store.append_many(acct.id, inbox.id,
                                        [(msg(i, f"bench{n}"), frozenset(), None) for i in range(USER_MESSAGES)])
        acct0 = await store.get_account("big@example.org")
        if acct0 is None:
            acct0 = await store.create_account("big@example.org", hashed)
        inbox = await store.get_mailbox(acct0.id, "INBOX")
        assert inbox is not None
        have = (await store.mailbox_status(acct0.id, inbox.id)).messages
        t0 = time.perf_counter()
        while have < big:
            n = min(2000, big - have)
            await store.append_many(acct0.id, inbox.id, [
                (msg(have + i, "big"), frozenset({"\\Seen"}) if (have + i) % 3 else frozenset(), None)
                for i in range(n)])
            have += n
            print(f"  loaded {have}/{big} messages ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    finally:
        await store.close()


def serve(data: Path, workers: int = 1) -> None:
    from postfach.server import Server

    async def main() -> None:
        server = Server(config_for(data))  # type: ignore[arg-type]
        task = asyncio.create_task(server.run(install_signals=True, drain_seconds=1))
        await server.ready.wait()
        print(server.port_of("imap", "implicit"), flush=True)
        await task

    if workers > 1:  # `serve --workers N`: a supervisor and N worker processes
        from postfach.config import ServerConfig
        from postfach.supervisor import Supervisor

        cfg = replace(config_for(data), server=ServerConfig(workers=workers))  # type: ignore[type-var]
        sup = Supervisor(cfg, workers, drain_seconds=1, print_settings=False)  # type: ignore[arg-type]

        async def supervised() -> None:
            task = asyncio.create_task(sup.run())
            await sup.ready.wait()
            print(sup.port_of("imap", "implicit"), flush=True)
            await task

        asyncio.run(supervised())
        return

    if os.environ.get("IMAP_BENCH_WRITER_PROFILE"):
        # cProfile of the SQLite store's writer thread (written when the store closes).
        import cProfile

        from postfach.store import sqlite as store_sqlite

        writer_main = store_sqlite.SqliteStore._writer_main

        def profiled(self: store_sqlite.SqliteStore) -> None:
            prof = cProfile.Profile()
            try:
                prof.runcall(writer_main, self)
            finally:
                prof.dump_stats(os.environ["IMAP_BENCH_WRITER_PROFILE"])

        store_sqlite.SqliteStore._writer_main = profiled  # type: ignore[method-assign]
    if os.environ.get("IMAP_BENCH_SWITCH_INTERVAL"):
        # How long a store thread may wait for the GIL while the event loop runs (default 5 ms).
        sys.setswitchinterval(float(os.environ["IMAP_BENCH_SWITCH_INTERVAL"]))
    if os.environ.get("IMAP_BENCH_GC_THRESHOLD"):
        import gc

        # Fewer full collections over the big mailbox's objects (an experiment for server.py).
        gc.set_threshold(int(os.environ["IMAP_BENCH_GC_THRESHOLD"]), 20, 100)
    if not os.environ.get("IMAP_BENCH_STDLIB_LOOP"):
        try:
            import uvloop  # production runs uvloop (server.py)

            uvloop.install()
        except ImportError:
            pass
    if os.environ.get("IMAP_BENCH_PYINSTRUMENT"):
        from pyinstrument import Profiler

        prof = Profiler(interval=0.0005, async_mode="disabled")
        prof.start()
        try:
            asyncio.run(main())
        finally:
            prof.stop()
            Path(os.environ["IMAP_BENCH_PYINSTRUMENT"]).write_text(prof.output_text(show_all=False))
        return
    if os.environ.get("IMAP_BENCH_PROFILE"):
        import cProfile

        cProfile.runctx("asyncio.run(main())", globals(), locals(), os.environ["IMAP_BENCH_PROFILE"])
        return
    asyncio.run(main())


# ------------------------------------------------------------------------------------- client side


class Client:
    def __init__(self) -> None:
        self.n = 0
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter

    async def connect(self, port: int, ctx: ssl.SSLContext) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                                 server_hostname="localhost")
        await self.reader.readline()

    async def cmd(self, text: str, literal: bytes | None = None) -> tuple[bytes, int]:
        self.n += 1
        tag = b"t%d" % self.n
        line = tag + b" " + text.encode()
        if literal is not None:
            line += b" {%d+}\r\n" % len(literal) + literal
        self.writer.write(line + b"\r\n")
        size = 0
        while True:
            ln = await self.reader.readline()
            if not ln:
                raise EOFError(text)
            size += len(ln)
            if ln.endswith(b"}\r\n"):
                k = ln.rfind(b"{")
                n = int(ln[k + 1 : -3])
                size += n
                await self.reader.readexactly(n)
                continue
            if ln.startswith(tag + b" "):
                if not ln.startswith(tag + b" OK"):
                    raise RuntimeError(f"{text!r}: {ln!r}")
                return ln, size

    async def cmd_raw(self, text: str) -> int:
        """Send a command and read the answer in big chunks up to its tagged line (for big
        metadata answers, so the client's line parsing does not dominate the timing)."""
        self.n += 1
        tag = b"t%d" % self.n
        self.writer.write(tag + b" " + text.encode() + b"\r\n")
        marker = b"\r\n" + tag + b" "
        buf = b"\n"
        size = 0
        while True:
            chunk = await self.reader.read(1 << 20)
            if not chunk:
                raise EOFError(text)
            size += len(chunk)
            buf = buf[-64:] + chunk
            k = buf.find(marker)
            if k < 0 and buf.startswith(b"\n" + tag + b" "):
                k = 0
            if k >= 0 and buf.endswith(b"\r\n"):
                if b" OK " not in buf[k:]:
                    raise RuntimeError(f"{text!r}: {buf[k:]!r}")
                return size

    async def close(self) -> None:
        try:
            self.writer.write(b"z LOGOUT\r\n")
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except Exception:
            pass


async def mixed_client(idx: int, port: int, ctx: ssl.SSLContext, stop: float,
                       lat: dict[str, list[float]]) -> None:
    rng = random.Random(idx)
    c = Client()
    await c.connect(port, ctx)
    await c.cmd(f"LOGIN bench{idx % USER_COUNT}@example.org {PASSWORD}")
    await c.cmd("SELECT INBOX")
    n_appended = 0
    ops = (["fetch_headers"] * 4 + ["fetch_body"] * 3 + ["store"] * 3 + ["search"] * 2 + ["select"]
           + ["append"] + ["noop"] * 2)
    while time.perf_counter() < stop:
        op = rng.choice(ops)
        t = time.perf_counter()
        if op == "select":
            await c.cmd("SELECT INBOX")
        elif op == "fetch_headers":
            lo = rng.randint(1, USER_MESSAGES - 20)
            await c.cmd(f"FETCH {lo}:{lo + 19} (UID FLAGS RFC822.SIZE "
                        "BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE MESSAGE-ID)])")
        elif op == "fetch_body":
            await c.cmd(f"FETCH {rng.randint(1, USER_MESSAGES)} (BODY.PEEK[])")
        elif op == "store":
            await c.cmd(f"STORE {rng.randint(1, USER_MESSAGES)} {rng.choice('+-')}FLAGS (\\Seen)")
        elif op == "search":
            await c.cmd(rng.choice(["UID SEARCH UNSEEN", "SEARCH FLAGGED", "UID SEARCH SINCE 1-Jan-2020"]))
        elif op == "append":
            n_appended += 1
            await c.cmd("APPEND INBOX", msg(100000 + n_appended, "x"))
            # and remove one again, like a client deleting mail, keeping the size stable
            await c.cmd("UID STORE * +FLAGS.SILENT (\\Deleted)")
            await c.cmd("EXPUNGE")
        else:
            await c.cmd("NOOP")
        lat.setdefault(op, []).append(time.perf_counter() - t)
    await c.close()


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] if values else 0.0


async def run_mixed(port: int, ctx: ssl.SSLContext, clients: int, seconds: float) -> dict[str, object]:
    lat: dict[str, list[float]] = {}
    stop = time.perf_counter() + seconds
    t0 = time.perf_counter()
    await asyncio.gather(*(mixed_client(i, port, ctx, stop, lat) for i in range(clients)))
    elapsed = time.perf_counter() - t0
    everything = [x for v in lat.values() for x in v]
    ops = len(everything) + len(lat.get("append", [])) * 2  # append counts its STORE + EXPUNGE
    per_op = {k: round(pct(v, 0.5) * 1000, 1) for k, v in sorted(lat.items())}
    return {"clients": clients, "ops_per_s": ops / elapsed, "p50_ms": pct(everything, 0.5) * 1000,
            "p99_ms": pct(everything, 0.99) * 1000, "p50_ms_by_op": per_op}


async def run_big(port: int, ctx: ssl.SSLContext, big: int) -> dict[str, float]:
    c = Client()
    await c.connect(port, ctx)
    await c.cmd(f"LOGIN big@example.org {PASSWORD}")
    out: dict[str, float] = {}

    async def timed(name: str, text: str, repeat: int = 5) -> None:
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            await c.cmd_raw(text)
            times.append(time.perf_counter() - t)
        out[name + "_first_ms"] = times[0] * 1000
        out[name + "_ms"] = statistics.median(times[1:] or times) * 1000

    await timed("select", "SELECT INBOX")
    await timed("uid_fetch_uid_flags", "UID FETCH 1:* (UID FLAGS)")
    await timed("newest_50_envelopes", f"FETCH {big - 49}:{big} (UID ENVELOPE)")
    await timed("uid_search_subject", 'UID SEARCH SUBJECT "topic 777"', repeat=3)
    await c.close()
    return out


async def lines_of(c: Client, text: str) -> list[bytes]:
    """A command's untagged lines (no literals expected) up to the tagged OK."""
    c.n += 1
    tag = b"t%d" % c.n
    c.writer.write(tag + b" " + text.encode() + b"\r\n")
    out = []
    while True:
        ln = await c.reader.readline()
        if not ln:
            raise EOFError(text)
        out.append(ln.rstrip(b"\r\n"))
        if ln.startswith(tag + b" "):
            if not ln.startswith(tag + b" OK"):
                raise RuntimeError(f"{text!r}: {ln!r}")
            return out


async def compressed_fetch(port: int, ctx: ssl.SSLContext, text: str, repeat: int) -> tuple[int, int]:
    """COMPRESS DEFLATE, then ``text`` ``repeat`` times: (bytes on the wire, bytes inflated)."""
    import zlib

    c = Client()
    await c.connect(port, ctx)
    await c.cmd(f"LOGIN big@example.org {PASSWORD}")
    await c.cmd("COMPRESS DEFLATE")
    inflate, deflate = zlib.decompressobj(-15), zlib.compressobj(6, zlib.DEFLATED, -15)
    wire = plain = 0
    for n, cmd in enumerate(["SELECT INBOX"] + [text] * repeat):
        tag = b"z%d" % n
        c.writer.write(deflate.compress(tag + b" " + cmd.encode() + b"\r\n")
                       + deflate.flush(zlib.Z_SYNC_FLUSH))
        buf = b""
        while True:
            chunk = await c.reader.read(1 << 20)
            if not chunk:
                raise EOFError(cmd)
            data = inflate.decompress(chunk)
            if n:
                wire += len(chunk)
                plain += len(data)
            buf = buf[-200:] + data
            if (b"\r\n" + tag + b" OK") in buf and buf.endswith(b"\r\n"):
                break
    c.writer.close()
    return wire, plain


async def run_issue8(port: int, ctx: ssl.SSLContext, pid: int, big: int) -> dict[str, float]:
    """Issue 8: QRESYNC SELECT with 10 changes, SORT by DATE, THREAD REFERENCES, SEARCH BODY,
    COMPRESS=DEFLATE ratio and server CPU on FETCH of 1,000 headers."""
    out: dict[str, float] = {}
    c = Client()
    await c.connect(port, ctx)
    await c.cmd(f"LOGIN big@example.org {PASSWORD}")
    await c.cmd("ENABLE QRESYNC")
    sel = await lines_of(c, "SELECT INBOX")
    uv = int(next(x for x in sel if b"[UIDVALIDITY" in x).split()[3].rstrip(b"]"))
    hms = int(next(x for x in sel if b"[HIGHESTMODSEQ" in x).split()[3].rstrip(b"]"))
    top = int(next(x for x in sel if b"[UIDNEXT" in x).split()[3].rstrip(b"]")) - 1
    await c.cmd("UNSELECT")
    other = Client()
    await other.connect(port, ctx)
    await other.cmd(f"LOGIN big@example.org {PASSWORD}")
    await other.cmd("SELECT INBOX")
    rng = random.Random()
    for uid in rng.sample(range(1, top + 1), 10):
        # A real change each run: toggle \Flagged.
        got = await lines_of(other, f"UID FETCH {uid} (FLAGS)")
        op = "-" if any(b"\\Flagged" in x for x in got) else "+"
        await other.cmd(f"UID STORE {uid} {op}FLAGS.SILENT (\\Flagged)")
    await other.close()
    times = []
    for _ in range(6):
        t = time.perf_counter()
        got = await lines_of(c, f"SELECT INBOX (QRESYNC ({uv} {hms} 1:{top}))")
        times.append(time.perf_counter() - t)
        assert sum(1 for x in got if b" FETCH (" in x) >= 1, got[-3:]
        await c.cmd("UNSELECT")
    out["imap_qresync_select_100k_ms"] = statistics.median(times[1:]) * 1000
    out["imap_qresync_select_100k_first_ms"] = times[0] * 1000
    await c.cmd("SELECT INBOX")

    async def timed(key: str, text: str, repeat: int) -> None:
        ts = []
        for _ in range(repeat):
            t = time.perf_counter()
            await c.cmd_raw(text)
            ts.append(time.perf_counter() - t)
        out[key] = statistics.median(ts[1:] or ts) * 1000
        out[key.replace("_ms", "_first_ms")] = ts[0] * 1000

    for key, text in ISSUE8_COMMANDS.items():
        await timed(f"imap_{key}_100k_ms", text, 5)
    # The same SEARCH BODY as a scan of every message (the index narrows only top-level ANDs; NOT
    # NOT is the same question): what the index saves. Once: it takes seconds.
    body_key = ISSUE8_COMMANDS["search_body"].removeprefix("UID SEARCH ")
    await timed("imap_search_body_scan_100k_ms", f"UID SEARCH NOT NOT ({body_key})", 1)
    fetch = "FETCH 1:1000 (UID BODY.PEEK[HEADER])"
    await c.cmd_raw(fetch)  # warm the caches so both runs measure the same work
    cpu0 = cpu_seconds(pid)
    plain_bytes = sum([await c.cmd_raw(fetch) for _ in range(5)])
    cpu_plain = cpu_seconds(pid) - cpu0
    cpu0 = cpu_seconds(pid)
    wire, inflated = await compressed_fetch(port, ctx, fetch, 5)
    cpu_deflate = cpu_seconds(pid) - cpu0
    out["imap_compress_ratio"] = inflated / max(wire, 1)
    out["imap_compress_fetch_1000_headers_kib"] = plain_bytes / 5 / 1024
    out["imap_compress_fetch_1000_headers_wire_kib"] = wire / 5 / 1024
    out["imap_compress_cpu_ms_plain"] = cpu_plain * 1000 / 5
    out["imap_compress_cpu_ms_deflate"] = cpu_deflate * 1000 / 5
    await c.close()
    return out


#: Issue 8 commands measured warm (repeated on one connection) and cold (first after a start).
ISSUE8_COMMANDS = {
    "search_body": 'UID SEARCH BODY "message 77777."',
    "search_subject_idx": 'UID SEARCH SUBJECT "report 7777"',
    "sort_date": "UID SORT (DATE) UTF-8 ALL",
    "thread_refs": "UID THREAD REFERENCES UTF-8 ALL",
}


def start_server(data: Path, workers: int = 1) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "--data", str(data), "--workers", str(workers)],
                            stdout=subprocess.PIPE, env=dict(os.environ), text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def run_cold(data: Path, ctx: ssl.SSLContext) -> dict[str, float]:
    """Each issue-8 command as the first one after a server start (nothing cached in the
    process: what a user sees after a restart). One fresh server per command."""
    out: dict[str, float] = {}
    for key, text in ISSUE8_COMMANDS.items():
        proc, port = start_server(data)
        try:
            async def one(port: int = port, text: str = text) -> float:
                c = Client()
                await c.connect(port, ctx)
                await c.cmd(f"LOGIN big@example.org {PASSWORD}")
                await c.cmd("SELECT INBOX")
                t = time.perf_counter()
                await c.cmd_raw(text)
                took = time.perf_counter() - t
                await c.close()
                return took

            out[f"imap_{key}_100k_cold_ms"] = asyncio.run(one()) * 1000
        finally:
            proc.terminate()
            proc.wait(30)
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time of the server: the process and its children (the workers of --workers N)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += cpu_seconds(int(child))
    return total


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def run_idle(port: int, ctx: ssl.SSLContext, pid: int, count: int) -> dict[str, float]:
    before = rss_kib(pid)
    clients: list[Client] = []
    sem = asyncio.Semaphore(50)

    async def one(i: int) -> Client:
        async with sem:
            c = Client()
            await c.connect(port, ctx)
            await c.cmd(f"LOGIN bench{i % USER_COUNT}@example.org {PASSWORD}")
            await c.cmd("SELECT INBOX")
            c.writer.write(b"idle IDLE\r\n")
            await c.reader.readline()
            return c

    clients = await asyncio.gather(*(one(i) for i in range(count)))
    await asyncio.sleep(2)
    after = rss_kib(pid)
    for c in clients:
        c.writer.close()
    return {"connections": count, "rss_before_kib": before, "rss_after_kib": after,
            "kib_per_connection": (after - before) / count}


async def client_main(args: argparse.Namespace, port: int, pid: int) -> dict[str, object]:
    ctx = ssl.create_default_context(cafile=str(args.data / "tls" / "cert.pem"))
    results: dict[str, object] = {}
    mixed: list[dict[str, object]] = []
    results["mixed"] = mixed
    for n in args.clients:
        print(f"mixed load, {n} clients ...", file=sys.stderr)
        cpu0, own0 = cpu_seconds(pid), time.process_time()
        res = await run_mixed(port, ctx, n, args.seconds)
        res["server_cpu_ms_per_op"] = (cpu_seconds(pid) - cpu0) * 1000 / (res["ops_per_s"] * args.seconds)
        # The load generator is one Python process too: at ~1 core it is the limit, not the server.
        res["client_cpu_share"] = (time.process_time() - own0) / args.seconds
        mixed.append(res)
        print("mixed", res, flush=True)
    if args.big and not args.issue8_only:
        print("big mailbox ...", file=sys.stderr)
        results["big"] = await run_big(port, ctx, args.big)
        print("big", results["big"], flush=True)
    if args.big:
        print("issue 8 figures ...", file=sys.stderr)
        results["issue8"] = await run_issue8(port, ctx, pid, args.big)
        print("issue8", results["issue8"], flush=True)
    if args.idle:
        print("idle connections ...", file=sys.stderr)
        results["idle"] = await run_idle(port, ctx, pid, args.idle)
        print("idle", results["idle"], flush=True)
    return results


def figures(results: dict[str, object], big: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in results.get("mixed", []):  # type: ignore[attr-defined]
        n = m["clients"]
        out[f"imap_mixed_{n}_ops_per_s"] = round(m["ops_per_s"], 1)
        out[f"imap_mixed_{n}_p50_ms"] = round(m["p50_ms"], 1)
        out[f"imap_mixed_{n}_p99_ms"] = round(m["p99_ms"], 1)
        out[f"imap_mixed_{n}_server_cpu_ms_per_op"] = round(m["server_cpu_ms_per_op"], 2)
    b = results.get("big")
    if isinstance(b, dict):
        size = "100k" if big == 100_000 else str(big)
        names = {"select": "select", "uid_fetch_uid_flags": "uid_fetch_flags",
                 "uid_search_subject": "search_subject", "newest_50_envelopes": "fetch_50_envelopes"}
        for key, name in names.items():
            label = f"imap_{name}_{size}_ms" if name != "fetch_50_envelopes" else f"imap_{name}_ms"
            if name == "fetch_50_envelopes" and size != "100k":
                label = f"imap_{name}_{size}_ms"
            out[label] = round(b[f"{key}_ms"], 2)
            out[label.replace("_ms", "_first_ms")] = round(b[f"{key}_first_ms"], 2)
    i8 = results.get("issue8")
    if isinstance(i8, dict):
        size = "100k" if big == 100_000 else str(big)
        for key, value in i8.items():
            out[key.replace("_100k_", f"_{size}_")] = round(value, 2)
    idle = results.get("idle")
    if isinstance(idle, dict):
        out["imap_idle_rss_kib_per_conn"] = round(idle["kib_per_connection"], 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/tmp/postfach-imap-bench"))
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--big", type=int, default=100_000)
    ap.add_argument("--clients", type=int, nargs="*", default=[10, 50])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--idle", type=int, default=2000)
    ap.add_argument("--prepare-only", action="store_true", help="load the data and stop")
    ap.add_argument("--issue8-only", action="store_true",
                    help="only the issue-8 figures (QRESYNC, SORT, THREAD, SEARCH BODY, COMPRESS)")
    ap.add_argument("--quick", action="store_true", help="short run: 10k mailbox, 5 s loads, 500 idle")
    ap.add_argument("--workers", type=int, default=1, help="server worker processes (serve --workers N)")
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.data, args.workers)
        return 0
    if args.issue8_only:
        args.clients, args.idle = [], 0
    if args.quick:
        args.big, args.seconds, args.idle = min(args.big, 10_000), min(args.seconds, 5.0), min(args.idle, 500)
        if args.data == Path("/tmp/postfach-imap-bench"):
            args.data = Path("/tmp/postfach-imap-bench-quick")
    args.data.mkdir(parents=True, exist_ok=True)
    print("preparing data ...", file=sys.stderr)
    asyncio.run(prepare(args.data, args.big))
    if args.prepare_only:
        return 0
    cold: dict[str, float] = {}
    if args.big:
        print("issue 8 commands, each first after a server start ...", file=sys.stderr)
        cold = run_cold(args.data, ssl.create_default_context(cafile=str(args.data / "tls" / "cert.pem")))
        print("cold", cold, flush=True)
    proc, port = start_server(args.data, args.workers)
    try:
        results = asyncio.run(client_main(args, port, proc.pid))
        results["issue8"] = {**results.get("issue8", {}), **cold}  # type: ignore[dict-item]
        # bench/run.py reads the figures from the last line: one flat JSON object.
        print(json.dumps(figures(results, args.big)), flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
