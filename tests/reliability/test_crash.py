"""Crash safety (issue 7, item 5; ARCHITECTURE.md invariants 1-3).

A real ``postfach serve`` process takes a mixed load over TLS from this process (SMTP submissions to
two accounts, IMAP APPEND / STORE / EXPUNGE in two more, POP3 RETR+DELE+QUIT in one of the SMTP
targets) and is killed with SIGKILL at a random moment, several times. After each kill:

* ``postfach check`` exits 0 (every blob present with the right hash, counters and refcounts right);
* the server starts again and, read over IMAP, every acknowledged write is there and byte-intact,
  every acknowledged removal stays removed, acknowledged flags are set;
* nothing else is there: every stored message is one we sent, whole (a write in flight may be
  present or absent, never half-present), and none is stored twice;
* UIDVALIDITY does not change and UIDs never go backwards (UIDNEXT and later APPENDUIDs stay above
  every UID seen).

``make test`` runs 3 kills; ``POSTFACH_CRASH_ROUNDS=20`` (``make soak``) runs the full 20.
``POSTFACH_CRASH_SEED`` replays a run (the seed is printed on failure).
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest
from bench.load.clients import (
    ImapWorker,
    Ledger,
    Pop3Worker,
    SmtpWorker,
    Target,
    Worker,
    forget_lost,
    read_inbox,
    run_workers,
    verify,
)
from bench.load.server import ServerProcess
from tests import backends

PASSWORD = "crash-pass-1"
SENDER = "sender@example.org"
INBOX_RCPT = "inbox@example.org"
POP_RCPT = "pop@example.org"
IMAP_USERS = ("imap0@example.org", "imap1@example.org")
CHECKED = (INBOX_RCPT, POP_RCPT, *IMAP_USERS)


def _rounds() -> int:
    return max(1, int(os.environ.get("POSTFACH_CRASH_ROUNDS", "3")))


def _workers(target: Target, ledger: Ledger, stop: threading.Event, rng: random.Random) -> list[Worker]:
    ws: list[Worker] = [
        SmtpWorker(f"smtp{i}", target, ledger, stop, rng.getrandbits(32), SENDER, [INBOX_RCPT, POP_RCPT])
        for i in range(2)
    ]
    ws += [ImapWorker(f"imap{i}", target, ledger, stop, rng.getrandbits(32), acct) for i, acct in enumerate(IMAP_USERS)]
    ws.append(Pop3Worker("pop0", target, ledger, stop, rng.getrandbits(32), POP_RCPT))
    return ws


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_at_random_moments_loses_nothing_acknowledged(tmp_path: Path) -> None:
    seed = int(os.environ.get("POSTFACH_CRASH_SEED", str(random.randrange(2**32))))
    rng = random.Random(seed)
    # a short handshake timeout: a handshake stalled by a busy server is retried by the clients
    srv = ServerProcess(
        tmp_path / "var", init_args=backends.init_args(tmp_path / "var"), limits={"tls_handshake_timeout_seconds": 2}
    )
    srv.init()
    srv.provision([SENDER, INBOX_RCPT, POP_RCPT, *IMAP_USERS], PASSWORD)
    ledger = Ledger()
    rounds = _rounds()
    try:
        srv.start()
        for rnd in range(rounds):
            target = Target("localhost", dict(srv.ports), srv.cafile, PASSWORD)
            stop = threading.Event()
            workers = _workers(target, ledger, stop, rng)
            base = dict(ledger.counts)

            def enough(base: dict[str, int] = base) -> bool:
                # every kind of write has happened in this round at least a few times
                c = ledger.counts
                return all(c.get(k, 0) - base.get(k, 0) >= 3 for k in ("smtp", "append", "store")) and (
                    c.get("expunge", 0) > base.get("expunge", 0) or c.get("smtp", 0) - base.get("smtp", 0) >= 40
                )

            run_workers(workers, enough, timeout=60)
            broken = [w for w in workers if w.failure is not None]
            assert not broken, f"seed {seed} round {rnd}: {[(w.name, w.failure) for w in broken]}"
            time.sleep(rng.uniform(0.0, 0.6))  # the random moment: writes are in flight now
            srv.kill()
            stop.set()
            for w in workers:
                w.join(60)
                assert not w.is_alive(), f"{w.name} hangs after the kill"
                assert w.failure is None, f"seed {seed} round {rnd}: {w.name}: {w.failure!r}"

            rc, out = srv.check()
            assert rc == 0, f"seed {seed} round {rnd}: postfach check after SIGKILL:\n{out}"

            srv.start()
            target = Target("localhost", dict(srv.ports), srv.cafile, PASSWORD)
            boxes = {acct: read_inbox(target, acct) for acct in CHECKED}
            problems = verify(ledger, boxes)
            assert not problems, f"seed {seed} round {rnd}:\n" + "\n".join(problems[:30])
            forget_lost(ledger, boxes)

        print(f"seed {seed}: {rounds} SIGKILLs survived; acknowledged writes {ledger.counts}")
        assert ledger.counts.get("smtp", 0) >= 3 * rounds and ledger.counts.get("append", 0) >= 3 * rounds
        assert ledger.counts.get("expunge", 0) + ledger.counts.get("pop3-dele", 0) >= 1, ledger.counts
        assert srv.stop() == 0
        rc, out = srv.check()
        assert rc == 0, out
        assert not srv.tracebacks(), "\n".join(srv.tracebacks())
    finally:
        srv.kill()
