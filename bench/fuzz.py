"""``make fuzz``: a long fuzz run of every protocol's sans-I/O code (issue 7, item 7).

For each target, N inputs (default 1,000,000) are made by mutating a corpus of real commands (bit
flips, insertions of interesting tokens, deletions, duplications, splices of two inputs, random
bytes) and fed, split at random points, through the receiver and the parser, as the connection
layer does. Only the exceptions a target documents are allowed (``ParseError``, ``CommandError``,
``CommandSyntaxError``, ``SaslError``); anything else is a crash, and an input that takes more than
``--hang-seconds`` is a hang. Each finding is saved under ``bench/results/fuzz/`` with its traceback.

    PYTHONPATH=src .venv/bin/python bench/fuzz.py [--inputs 1000000] [--target imap ...] [--jobs 2]

The session-level fuzz over real sockets (short form, in ``make test``) is
tests/reliability/test_session_fuzz.py. Prints one JSON object (inputs/s per target, findings).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import random
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
FINDINGS = ROOT / "bench" / "results" / "fuzz"

INTERESTING = [
    b"\r\n", b"\n", b"\r", b"\x00", b" ", b"  ", b"\t", b"\xff", b"\xc3\x28", b"\xf0\x9f\x92\xa9", b"{0}", b"{1}",
    b"{4294967296}", b"{99999999999999999999}", b"{5+}", b"~{3}", b"(", b")", b"((((((((((((", b"))", b"[", b"]",
    b"<", b">", b"<0.4294967295>", b'"', b'\\"', b"\\", b"*", b"%", b"1:*", b"*:1", b"0", b"-1", b"4294967295",
    b"4294967296", b"18446744073709551616", b"1,2,3:5,*", b"NIL", b"=?utf-8?B?AAAA?=", b"&AMQ-", b"&-", b"&",
    b".", b"..", b"\r\n.\r\n", b"\r\n.\n", b"\n.\n", b"BDAT ", b" LAST", b"=", b"+", b"A" * 1000, b"9" * 40,
]

IMAP_SEEDS = [
    b"a1 CAPABILITY", b"a2 LOGIN user@example.org secret-pass", b'a3 LOGIN "user" {4+}\r\npass',
    b"a4 AUTHENTICATE PLAIN AHVzZXIAcGFzcw==", b"a5 SELECT INBOX (CONDSTORE)", b"a6 EXAMINE \"Sent\"",
    b'a7 LIST "" "*" RETURN (SPECIAL-USE SUBSCRIBED CHILDREN STATUS (MESSAGES UNSEEN))', b"a8 LSUB \"\" %",
    b"a9 STATUS INBOX (MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN SIZE HIGHESTMODSEQ)",
    b"b1 APPEND INBOX (\\Seen $Junk) \"01-Jan-2024 10:00:00 +0000\" {12+}\r\nSubject: x\r\n",
    b"b2 UID FETCH 1:* (UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE BODYSTRUCTURE) (CHANGEDSINCE 5 VANISHED)",
    b"b3 FETCH 1,3:5 (BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT)] BODY[1.2.MIME]<0.100> BINARY.PEEK[1] RFC822)",
    b"b4 STORE 1:3 +FLAGS.SILENT (\\Deleted \\Seen) ", b"b5 UID STORE 7 (UNCHANGEDSINCE 12) FLAGS ($Forwarded)",
    b'b6 SEARCH CHARSET UTF-8 OR (FROM "x" SUBJECT {3+}\r\nabc) NOT (SINCE 1-Jan-2020 LARGER 100) UID 1:*',
    b"b7 UID SEARCH RETURN (MIN MAX COUNT ALL) MODSEQ 5 KEYWORD $Junk HEADER Message-ID <a@b>",
    b"b8 COPY 1:* Archive", b"b9 UID MOVE 3,4 Trash", b"c1 UID EXPUNGE 1:5", b"c2 EXPUNGE", b"c3 CLOSE",
    b"c4 IDLE", b"c5 ENABLE QRESYNC UTF8=ACCEPT", b'c6 ID ("name" "client" "version" "1.0")', b"c7 NAMESPACE",
    b"c8 CREATE \"a/b/&AMQ-\"", b"c9 RENAME a b", b"d1 DELETE x", b"d2 SUBSCRIBE INBOX", b"d3 GETQUOTAROOT INBOX",
    b"d4 SELECT INBOX (QRESYNC (67890007 20050715194045000 41,43:211,214:541))", b"d5 UNSELECT", b"d6 LOGOUT",
    b"d7 NOOP", b"d8 CHECK", b"d9 STARTTLS", b"e1 COMPRESS DEFLATE", b"e2 SETQUOTA \"\" (STORAGE 512)",
]
POP3_SEEDS = [
    b"USER user@example.org", b"PASS secret pass with spaces", b"APOP user 0123456789abcdef0123456789abcdef",
    b"AUTH PLAIN", b"AUTH PLAIN AHVzZXIAcGFzcw==", b"AUTH LOGIN", b"AUTH", b"CAPA", b"STLS", b"STAT", b"LIST",
    b"LIST 1", b"UIDL 3", b"UIDL", b"RETR 1", b"DELE 2", b"TOP 1 10", b"NOOP", b"RSET", b"QUIT", b"UTF8", b"*",
    b"AHVzZXIAcGFzcw==",
]
SMTP_SEEDS = [
    b"EHLO client.example", b"HELO [127.0.0.1]", b"MAIL FROM:<a@example.org> SIZE=1000 BODY=8BITMIME SMTPUTF8",
    b"MAIL FROM:<> RET=HDRS ENVID=QQ314159 REQUIRETLS",
    b"RCPT TO:<b@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@x",
    b"RCPT TO:<@a.example,@b.example:c@example.org>", b"RCPT TO:<\"quoted local\"@example.org>", b"DATA",
    b"BDAT 10", b"BDAT 0 LAST", b"RSET", b"NOOP", b"VRFY postmaster", b"EXPN list", b"HELP", b"QUIT",
    b"STARTTLS", b"AUTH PLAIN AHVzZXIAcGFzcw==", b"AUTH LOGIN dXNlcg==", b"AUTH CRAM-MD5", b"MAIL FROM:<a@b.c> AUTH=<>",
    b"RCPT TO:<postmaster>", "MAIL FROM:<ü@bücher.example> SMTPUTF8".encode(),
]
SASL_SEEDS = [b"\x00user\x00pass", b"authz\x00user\x00pass", b"dXNlcg==", b"*", b"", b"\x00\x00", b"user"]


class Hang(Exception):
    pass


def _alarm(_signum: int, _frame: FrameType | None) -> None:
    raise Hang("input took too long")


# -------------------------------------------------------------------------------------------- inputs


def mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.choice((0, 1, 1, 2, 3, 5, 8))):
        op = rng.randrange(8)
        pos = rng.randint(0, len(data))
        if op == 0 and data:  # flip a bit
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert an interesting token
            data[pos:pos] = rng.choice(INTERESTING)
        elif op == 2 and data:  # delete a span
            data[pos : pos + rng.randint(1, 16)] = b""
        elif op == 3 and data:  # duplicate a span
            a = rng.randrange(len(data))
            data[pos:pos] = data[a : a + rng.randint(1, 32)] * rng.randint(1, 4)
        elif op == 4:  # splice another seed in
            other = rng.choice(seeds)
            data[pos:pos] = other[rng.randint(0, len(other)) :]
        elif op == 5:  # random bytes
            data[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 6 and data:  # replace a byte with a special one
            data[rng.randrange(len(data))] = rng.choice(b"\r\n\x00 ()[]{}<>\"\\*%:@,.=+~\x7f\xff")
        else:  # change case
            data = bytearray(data.swapcase() if rng.random() < 0.5 else data.upper())
    if rng.random() < 0.02:
        return rng.randbytes(rng.randint(0, 200))
    return bytes(data)


def session(rng: random.Random, seeds: list[bytes]) -> bytes:
    """Several lines, as a pipelining client sends them."""
    ends = (b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"")
    return b"".join(mutate(rng, seeds) + rng.choice(ends) for _ in range(rng.randint(1, 6)))


def chunks(rng: random.Random, data: bytes) -> list[bytes]:
    if len(data) < 2 or rng.random() < 0.5:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 4))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


# ------------------------------------------------------------------------------------------- targets


def imap_target() -> tuple[list[bytes], Callable[[bytes, random.Random], None]]:
    from postfach.imap.parser import ParseError, parse
    from postfach.imap.receiver import NeedContinuation, NeedData, Receiver, Rejected, Request

    def run(data: bytes, rng: random.Random) -> None:
        rx = Receiver(max_line_bytes=8192, max_literal_bytes=1 << 20)
        for part in chunks(rng, data):
            rx.feed(part)
            while True:
                ev = rx.next_event()
                if isinstance(ev, Request):
                    try:
                        parse(ev.raw)
                    except ParseError as e:
                        assert e.text, "a BAD needs a text"
                elif isinstance(ev, NeedData | NeedContinuation):
                    break
                else:
                    assert isinstance(ev, Rejected), ev
        if rng.random() < 0.1:
            rx.read_line()

    return IMAP_SEEDS, run


def pop3_target() -> tuple[list[bytes], Callable[[bytes, random.Random], None]]:
    from postfach.pop3.parser import CommandSyntaxError, LineReceiver, LineTooLong, parse_command, verb_of

    def run(data: bytes, rng: random.Random) -> None:
        rx = LineReceiver(255)
        for part in chunks(rng, data):
            rx.feed(part)
            while (line := rx.next_line()) is not None:
                if isinstance(line, LineTooLong):
                    continue
                verb_of(line)
                with contextlib.suppress(CommandSyntaxError):
                    parse_command(line)

    return POP3_SEEDS, run


def smtp_target() -> tuple[list[bytes], Callable[[bytes, random.Random], None]]:
    from postfach.smtp.parser import (
        Bdat,
        ChunkComplete,
        CommandError,
        Data,
        DataComplete,
        Line,
        LineTooLong,
        Receiver,
        bare_line_end,
        is_bdat,
        parse_bdat,
        parse_command,
    )

    def run(data: bytes, rng: random.Random) -> None:
        rx = Receiver(max_line_bytes=1000, max_message_bytes=1 << 16)
        for part in chunks(rng, data):
            rx.feed(part)
            while (ev := rx.next_event()) is not None:
                if isinstance(ev, Line):
                    if is_bdat(ev.data):
                        b = parse_bdat(ev.data)
                        if isinstance(b, Bdat):
                            rx.start_chunk(b.size, discard=rng.random() < 0.2)
                        continue
                    try:
                        cmd = parse_command(ev.data)
                    except CommandError as e:
                        assert e.reply is not None
                        continue
                    if isinstance(cmd, Data):
                        rx.start_data()
                elif isinstance(ev, DataComplete):
                    bare_line_end(ev.data)
                else:
                    assert isinstance(ev, LineTooLong | ChunkComplete), ev

    return SMTP_SEEDS, run


def sasl_target() -> tuple[list[bytes], Callable[[bytes, random.Random], None]]:
    from postfach.auth import sasl

    def run(data: bytes, rng: random.Random) -> None:
        mech = sasl.start(rng.choice(["PLAIN", "LOGIN", "plain", "XOAUTH2"]))
        if mech is None:
            return
        try:
            step: bytes | None = None if rng.random() < 0.3 else data
            for _ in range(3):
                out = mech.step(step)
                if isinstance(out, sasl.Credentials):
                    return
                step = data
        except sasl.SaslError:
            pass

    return SASL_SEEDS, run


def mail_target() -> tuple[list[bytes], Callable[[bytes, random.Random], None]]:
    from postfach.mail import parse_message

    corpus = sorted((ROOT / "tests" / "corpus").glob("*.eml"))
    seeds = [p.read_bytes()[:4000] for p in corpus] or [b"Subject: x\r\n\r\nbody\r\n"]

    def run(data: bytes, rng: random.Random) -> None:
        info = parse_message(data)  # tolerant: never raises (ARCHITECTURE.md invariant 7)
        assert info.size == len(data)

    return seeds, run


TARGETS: dict[str, Callable[[], tuple[list[bytes], Callable[[bytes, random.Random], None]]]] = {
    "imap": imap_target,
    "pop3": pop3_target,
    "smtp": smtp_target,
    "sasl": sasl_target,
    "mail": mail_target,
}
DEFAULT_TARGETS = ["imap", "pop3", "smtp", "sasl"]


# --------------------------------------------------------------------------------------------- runner


def fuzz_worker(name: str, count: int, seed: int, hang_seconds: float) -> dict[str, object]:
    seeds, run = TARGETS[name]()
    rng = random.Random(seed)
    signal.signal(signal.SIGALRM, _alarm)
    findings: list[dict[str, str]] = []
    kinds: set[str] = set()
    slowest = 0.0
    t0 = time.perf_counter()
    for _ in range(count):
        data = session(rng, seeds) if name in ("imap", "pop3", "smtp") else mutate(rng, seeds)
        split_seed = rng.getrandbits(32)
        t = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, hang_seconds)
        try:
            run(data, random.Random(split_seed))
        except BaseException as e:
            signal.setitimer(signal.ITIMER_REAL, 0)
            if isinstance(e, KeyboardInterrupt):
                raise
            kind = f"{type(e).__name__}: {traceback.extract_tb(e.__traceback__)[-1].lineno if e.__traceback__ else 0}"
            if kind in kinds:
                continue  # one example per distinct crash site
            kinds.add(kind)
            findings.append(_save(name, data, split_seed, e))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        slowest = max(slowest, time.perf_counter() - t)
    return {"inputs": count, "seconds": time.perf_counter() - t0, "slowest_ms": slowest * 1000, "findings": findings}


def _save(name: str, data: bytes, split_seed: int, e: BaseException) -> dict[str, str]:
    FINDINGS.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256(data).hexdigest()[:16]
    path = FINDINGS / f"{name}-{h}.bin"
    path.write_bytes(data)
    tb = "".join(traceback.format_exception(e))
    (FINDINGS / f"{name}-{h}.txt").write_text(f"split seed {split_seed}\n{tb}", encoding="utf-8")
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return {"target": name, "file": str(shown), "error": f"{type(e).__name__}: {e}"[:300]}


def replay(path: Path) -> int:
    """Run one saved input again (``--replay bench/results/fuzz/imap-xxxx.bin``) with its traceback."""
    name = path.name.split("-", 1)[0]
    seed_line = path.with_suffix(".txt").read_text().splitlines()[0] if path.with_suffix(".txt").exists() else ""
    split_seed = int(seed_line.split()[-1]) if seed_line.startswith("split seed") else 0
    _seeds, run = TARGETS[name]()
    run(path.read_bytes(), random.Random(split_seed))
    print("no failure on replay")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=1_000_000, help="inputs per target (default 1,000,000)")
    ap.add_argument("--target", action="append", choices=sorted(TARGETS), help="repeatable; default: protocols")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--hang-seconds", type=float, default=5.0)
    ap.add_argument("--quick", action="store_true", help="20,000 inputs per target")
    ap.add_argument("--replay", type=Path, help="run one saved finding again")
    args = ap.parse_args(argv)
    if args.replay:
        return replay(args.replay)
    count = 20_000 if args.quick else args.inputs
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    targets = args.target or DEFAULT_TARGETS
    print(f"fuzzing {', '.join(targets)}: {count:,} inputs each, {args.jobs} jobs, seed {seed}", file=sys.stderr)
    out: dict[str, object] = {"seed": seed}
    failed = False
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(args.jobs) as pool:
        for name in targets:
            per = [count // args.jobs + (1 if j < count % args.jobs else 0) for j in range(args.jobs)]
            t0 = time.perf_counter()
            jobs = [(name, n, seed + 7919 * j, args.hang_seconds) for j, n in enumerate(per)]
            parts = pool.starmap(fuzz_worker, jobs)
            took = time.perf_counter() - t0
            findings = [f for p in parts for f in p["findings"]]  # type: ignore[attr-defined]
            slowest = max(float(p["slowest_ms"]) for p in parts)  # type: ignore[arg-type]
            inputs = sum(int(p["inputs"]) for p in parts)  # type: ignore[call-overload]
            print(f"  {name}: {inputs:,} inputs in {took:.0f} s ({inputs / took:,.0f}/s), slowest {slowest:.1f} ms, "
                  f"{len(findings)} finding(s)", file=sys.stderr)
            for f in findings:
                print(f"    {f['file']}: {f['error']}", file=sys.stderr)
            out[f"fuzz_{name}_inputs"] = inputs
            out[f"fuzz_{name}_findings"] = len(findings)
            out[f"fuzz_{name}_inputs_per_s"] = round(inputs / took)
            failed = failed or bool(findings)
    print(json.dumps(out))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
