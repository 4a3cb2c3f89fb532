"""``make soak``: a mixed load against a real ``postfach serve`` for a long time (issue 7, item 8).

SMTP submissions, IMAP APPEND/STORE/EXPUNGE and POP3 download-and-delete run from this process
over TLS, as in the crash test, for ``--minutes`` (default 30). Every ``--sample-seconds`` the
server's RSS, open file descriptors and CPU time are sampled. At the end: every acknowledged write
is verified over IMAP (present, byte-intact, removals stay removed), ``postfach check`` must be
clean, and the log must hold no traceback.

Verdict: RSS after warm-up (the first ``--warmup`` fraction of the run) must not grow by more than
``--max-growth`` (default 10 %; a leak grows without bound, caches level off), the fd count must
come back to its idle level, and there must be no errors. Prints a table and one JSON object;
exit status 1 when a check fails.

    PYTHONPATH=src .venv/bin/python bench/soak.py [--minutes 30] [--imap 4] [--smtp 2] [--pop3 1]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from bench.load.clients import (  # noqa: E402 - after the path set-up above
    ImapWorker,
    Ledger,
    Pop3Worker,
    SmtpWorker,
    Target,
    Worker,
    read_inbox,
    verify,
)
from bench.load.server import ServerProcess, cpu_seconds, open_fds, rss_kib  # noqa: E402

PASSWORD = "soak-pass-1"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--imap", type=int, default=4, help="IMAP clients (one account each)")
    ap.add_argument("--smtp", type=int, default=2, help="SMTP submission clients")
    ap.add_argument("--pop3", type=int, default=2, help="POP3 clients (one account each; SMTP delivers to them)")
    ap.add_argument("--mailbox", type=int, default=300, help="messages an IMAP client keeps (steady state)")
    ap.add_argument("--sample-seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=0.25, help="fraction of the run that is warm-up")
    ap.add_argument("--max-growth", type=float, default=0.10, help="allowed RSS growth after warm-up")
    ap.add_argument("--data", type=Path, help="data dir (default: a temporary one, removed afterwards)")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="postfach-soak-") as tmp:
        data = args.data or Path(tmp) / "var"
        return soak(args, data, rng, seed)


def soak(args: argparse.Namespace, data: Path, rng: random.Random, seed: int) -> int:
    imap_users = [f"imap{i}@example.org" for i in range(args.imap)]
    pop_users = [f"pop{i}@example.org" for i in range(args.pop3)]
    srv = ServerProcess(data, log_level="WARNING")
    if not (data / "postfach.toml").exists():
        srv.init()
    srv.provision(["sender@example.org", *imap_users, *pop_users], PASSWORD)
    ledger = Ledger()
    stop = threading.Event()
    samples: list[dict[str, float]] = []
    restarts = 0
    try:
        srv.start()
        # the log level is WARNING: ports come from the client-settings block
        target = Target("localhost", dict(srv.ports), srv.cafile, PASSWORD)

        def make(kind: str, i: int) -> Worker:
            s = rng.getrandbits(32)
            stop = stops[-1]
            if kind == "smtp":
                return SmtpWorker(f"smtp{i}", target, ledger, stop, s, "sender@example.org", pop_users, max_kib=16)
            if kind == "imap":
                return ImapWorker(f"imap{i}", target, ledger, stop, s, imap_users[i], max_kib=16,
                                  max_messages=args.mailbox)
            # download-and-delete everything: the data volume stays level, so RSS must too
            return Pop3Worker(f"pop{i}", target, ledger, stop, s, pop_users[i], batch=100, skip=0.0)

        specs = [("smtp", i) for i in range(args.smtp)] + [("imap", i) for i in range(args.imap)]
        specs += [("pop3", i) for i in range(args.pop3)]
        # A short first phase opens what the server keeps open (reader connections, caches); the
        # fd count with no clients after it is the baseline the end of the run must come back to.
        stops = [threading.Event()]
        first = [make(*spec) for spec in specs]
        for w in first:
            w.start()
        time.sleep(min(60.0, max(5.0, args.minutes * 6)))
        stops[-1].set()
        for w in first:
            w.join(60)
        time.sleep(2)
        idle_fds = open_fds(srv.pid)
        stops.append(stop)
        workers = {spec: make(*spec) for spec in specs}
        for w in workers.values():
            w.start()
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        next_sample = t0
        errors: list[str] = []
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_sample:
                samples.append({
                    "t_s": round(now - t0, 1),
                    "rss_kib": rss_kib(srv.pid),
                    "fds": open_fds(srv.pid),
                    "cpu_s": round(cpu_seconds(srv.pid), 2),
                    "acked": ledger.total_acked(),
                })
                s = samples[-1]
                print(f"  {s['t_s']:7.0f} s  RSS {s['rss_kib'] / 1024:7.1f} MiB  fds {s['fds']:4.0f}  "
                      f"cpu {s['cpu_s']:7.1f} s  writes {s['acked']:.0f}", file=sys.stderr)
                next_sample += args.sample_seconds
            for spec, w in list(workers.items()):
                if not w.is_alive():
                    if w.failure is not None:
                        errors.append(f"{w.name}: {w.failure!r}")
                    elif w.died:
                        errors.append(f"{w.name}: connection lost ({w.died_with})")
                    if not srv.running():
                        raise RuntimeError("the server died:\n" + srv.log_text()[-3000:])
                    restarts += 1
                    workers[spec] = make(*spec)
                    workers[spec].start()
            time.sleep(0.2)
        stop.set()
        for w in workers.values():
            w.join(60)
        time.sleep(2)
        end_fds = open_fds(srv.pid)
        boxes = {a: read_inbox(target, a) for a in [*imap_users, *pop_users]}
        problems = verify(ledger, boxes)
        code = srv.stop()
        rc, check_out = srv.check()
        tracebacks = srv.tracebacks()
    finally:
        stop.set()
        srv.kill()

    warm = [s for s in samples if s["t_s"] >= args.warmup * args.minutes * 60] or samples[-1:]
    base = warm[0]["rss_kib"] if warm else 0
    peak = max((s["rss_kib"] for s in warm), default=0)
    last = samples[-1]["rss_kib"] if samples else 0
    growth = (last - base) / base if base else 0.0
    elapsed = samples[-1]["t_s"] if samples else 0
    cpu = samples[-1]["cpu_s"] - samples[0]["cpu_s"] if len(samples) > 1 else 0
    result: dict[str, object] = {
        "soak_minutes": args.minutes,
        "soak_seed": seed,
        "soak_writes_acknowledged": ledger.total_acked(),
        "soak_writes_per_s": round(ledger.total_acked() / elapsed, 1) if elapsed else 0,
        "soak_counts": dict(ledger.counts),
        "soak_rss_after_warmup_kib": base,
        "soak_rss_end_kib": last,
        "soak_rss_peak_kib": peak,
        "soak_rss_growth_after_warmup_pct": round(growth * 100, 2),
        "soak_fds_idle": idle_fds,
        "soak_fds_end": end_fds,
        "soak_fds_peak": max((s["fds"] for s in samples), default=0),
        "soak_server_cpu_share": round(cpu / elapsed, 2) if elapsed else 0,
        "soak_client_errors": errors,
        "soak_client_restarts": restarts,
        "soak_temp_failures": ledger.temp_failures,
        "soak_verify_problems": problems[:20],
        "soak_check_exit": rc,
        "soak_stop_exit": code,
        "soak_tracebacks": tracebacks[:20],
        "soak_samples": samples,
    }
    failures = []
    if growth > args.max_growth:
        failures.append(f"RSS grew {growth:.1%} after warm-up (allowed {args.max_growth:.0%})")
    if end_fds > idle_fds + 2:
        failures.append(f"fds: {end_fds} at the end, {idle_fds} when idle")
    if errors:
        failures.append(f"{len(errors)} client error(s): {errors[:3]}")
    if problems:
        failures.append(f"{len(problems)} verification problem(s): {problems[:3]}")
    if rc != 0:
        failures.append(f"postfach check: {check_out.strip()[:500]}")
    if tracebacks:
        failures.append(f"tracebacks in the log: {tracebacks[:3]}")
    result["soak_ok"] = not failures
    print(f"\nsoak: {args.minutes:g} min, {ledger.total_acked()} acknowledged writes {dict(ledger.counts)}; "
          f"RSS {base / 1024:.1f} -> {last / 1024:.1f} MiB after warm-up ({growth:+.1%}), peak {peak / 1024:.1f} MiB; "
          f"fds idle {idle_fds}, end {end_fds}", file=sys.stderr)
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    if not failures:
        print("OK: no growth after warm-up, no fd leak, no errors, everything acknowledged is there", file=sys.stderr)
    print(json.dumps(result))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
