"""CONDSTORE/QRESYNC (RFC 7162) beyond the transcripts: a property test that a QRESYNC SELECT
from any stale state yields exactly the current state (with full history, with a floor claimed at
random, and with the history really trimmed by the store's sweep; UID FETCH CHANGEDSINCE ...
VANISHED too), and Thunderbird-style (CONDSTORE) / iOS-style (QRESYNC) resyncs over real TLS."""

from __future__ import annotations

import imaplib
import random
import re
import sys
from datetime import timedelta
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from imap_helpers import make_env, message
from test_transcripts import Peer

from conftest import PASSWORD, USER, LiveServer
from postfach.store.base import Store
from postfach.types import AccountId, MailboxId, ModSeq

FETCH_RX = re.compile(rb"\* (\d+) FETCH \(UID (\d+) FLAGS \(([^)]*)\) MODSEQ \((\d+)\)\)")
FLAGS = ("\\Seen", "\\Flagged", "\\Answered", "$Label1", "$Junk")


def expand(uidset: bytes) -> set[int]:
    out: set[int] = set()
    for part in uidset.decode().split(","):
        a, _, b = part.partition(":")
        lo, hi = int(a), int(b or a)
        out.update(range(min(lo, hi), max(lo, hi) + 1))
    return out


class Client:
    """One in-process IMAP session over the real store."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.n = 0

    async def cmd(self, text: str) -> list[bytes]:
        self.n += 1
        tag = f"t{self.n}"
        await self.peer.feed(f"{tag} {text}".encode())
        lines = await self.peer.lines()
        assert lines and lines[-1].startswith(tag.encode() + b" OK"), (text, lines[-3:])
        return lines

    async def append(self, data: bytes) -> None:
        self.n += 1
        await self.peer.feed(b"t%d APPEND INBOX {%d+}\r\n" % (self.n, len(data)) + data)
        lines = await self.peer.lines()
        assert lines[-1].startswith(b"t%d OK" % self.n), lines


class Trimmed:
    """Makes the real store say its expunge history was trimmed up to a modseq (what a store
    honouring config.imap.expunge_history_days would report)."""

    def __init__(self, store: Store) -> None:
        self.floor = 0
        self.store = store

        async def expunge_history_floor(account_id: AccountId, mailbox_id: MailboxId) -> ModSeq:
            return ModSeq(self.floor)

        store.expunge_history_floor = expunge_history_floor  # type: ignore[method-assign]


async def _truth(store: Store, account: AccountId) -> tuple[int, int, dict[int, frozenset[str]]]:
    mb = await store.get_mailbox(account, "INBOX")
    assert mb is not None
    msgs = await store.list_messages(account, mb.id)
    return mb.uidvalidity, mb.highestmodseq, {m.uid: m.flags for m in msgs}


async def _login(env_peer: Peer) -> Client:
    c = Client(env_peer)
    await env_peer.lines()
    await c.cmd(f"LOGIN {USER} {PASSWORD}")
    return c


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["history", "trimmed", "swept"])
async def test_qresync_from_any_stale_state_gives_the_current_state(tmp_path: Path, mode: str) -> None:
    """``trimmed``: the store claims a floor at random; ``swept``: the store's own sweep
    (trim_expunge_history with no retention) really drops expunge records between operations."""
    env = await make_env(tmp_path)
    trimmed, swept = mode == "trimmed", mode == "swept"
    trim = Trimmed(env.store) if trimmed else None
    rng = random.Random(7162 + trimmed + 2 * swept)
    floors: list[int] = []
    try:
        writers = [await _login(Peer(env, "127.0.0.1", True)) for _ in range(3)]
        for w in writers:
            await w.cmd("SELECT INBOX")
        for i in range(8):
            await writers[0].append(message(i))
        serial = 100
        for _round in range(12):
            uv, stale_modseq, stale = await _truth(env.store, env.account_id)
            for _op in range(rng.randint(0, 12)):
                w = rng.choice(writers)
                _, _, now = await _truth(env.store, env.account_id)
                uids = sorted(now)
                kind = rng.random()
                if kind < 0.3 or not uids:
                    serial += 1
                    await w.append(message(serial))
                elif kind < 0.65:
                    pick = rng.sample(uids, rng.randint(1, min(4, len(uids))))
                    op = rng.choice(["+", "-", ""])
                    flags = " ".join(rng.sample(FLAGS, rng.randint(0, 3)))
                    await w.cmd(f"UID STORE {','.join(map(str, pick))} {op}FLAGS.SILENT ({flags})")
                elif kind < 0.85:
                    pick = rng.sample(uids, rng.randint(1, min(3, len(uids))))
                    s = ",".join(map(str, pick))
                    await w.cmd(f"UID STORE {s} +FLAGS.SILENT (\\Deleted)")
                    await w.cmd(f"UID EXPUNGE {s}")
                else:
                    await w.cmd(f"UID MOVE {rng.choice(uids)} Archive")
                await rng.choice(writers).cmd("NOOP")
                if swept and rng.random() < 0.4:
                    await env.store.trim_expunge_history(timedelta(0), timedelta(0))
            if swept:
                mb = await env.store.get_mailbox(env.account_id, "INBOX")
                assert mb is not None
                floors.append(int(await env.store.expunge_history_floor(env.account_id, mb.id)))
            if trim is not None:
                trim.floor = rng.choice([0, stale_modseq + 1, 10**9])
            # A device comes back with its stale cache.
            reader = await _login(Peer(env, "127.0.0.1", True))
            await reader.cmd("ENABLE QRESYNC")
            args = f"{uv} {stale_modseq}"
            if stale and rng.random() < 0.7:
                args += f" 1:{max(stale)}"
                if rng.random() < 0.5:
                    order = sorted(stale)
                    idx = sorted(rng.sample(range(len(order)), min(3, len(order))))
                    args += (f" ({','.join(str(i + 1) for i in idx)}"
                             f" {','.join(str(order[i]) for i in idx)})")
            lines = await reader.cmd(f"EXAMINE INBOX (QRESYNC ({args}))")
            cache = dict(stale)
            exists = highest = None
            for line in lines:
                if line.startswith(b"* VANISHED (EARLIER) "):
                    for u in expand(line[len(b"* VANISHED (EARLIER) "):]):
                        cache.pop(u, None)
                elif (m := FETCH_RX.match(line)) is not None:
                    cache[int(m.group(2))] = frozenset(m.group(3).decode().split()) - {"\\Recent"}
                elif (m2 := re.match(rb"\* (\d+) EXISTS", line)) is not None:
                    exists = int(m2.group(1))
                elif (m3 := re.match(rb"\* OK \[HIGHESTMODSEQ (\d+)\]", line)) is not None:
                    highest = int(m3.group(1))
            _, true_modseq, truth = await _truth(env.store, env.account_id)
            # New messages above the client's known range come as FETCH; with known-uids they
            # are left to a later UID FETCH, as in RFC 7162 §3.2.5.1.
            known_top = max(stale) if stale and " 1:" in args else None
            if known_top is not None:
                for u in list(truth):
                    if u > known_top and u not in stale:
                        cache.setdefault(u, truth[u])
            assert cache == truth, (args, [x for x in lines if not x.startswith(b"* OK")], floors)
            assert exists == len(truth)
            assert highest == true_modseq
            # The same stale cache brought up to date by UID FETCH CHANGEDSINCE ... VANISHED
            # (§3.2.6) on the now current session.
            if stale:
                lines = await reader.cmd(f"UID FETCH 1:{max(stale)} (FLAGS) (CHANGEDSINCE {stale_modseq} VANISHED)")
                cache = dict(stale)
                for line in lines:
                    if line.startswith(b"* VANISHED (EARLIER) "):
                        for u in expand(line[len(b"* VANISHED (EARLIER) "):]):
                            cache.pop(u, None)
                    elif (m := FETCH_RX.match(line)) is not None:
                        cache[int(m.group(2))] = frozenset(m.group(3).decode().split()) - {"\\Recent"}
                want = {u: f for u, f in truth.items() if u <= max(stale)}
                assert cache == want, lines
            await reader.peer.session.close()
        for w in writers:
            await w.peer.session.close()
        if swept:
            assert floors and max(floors) > 0, floors  # the sweep really trimmed
    finally:
        await env.store.close()


def _imap(live: LiveServer) -> imaplib.IMAP4_SSL:
    imap = imaplib.IMAP4_SSL("localhost", live.port("imap", "implicit"),
                             ssl_context=live.client_context(), timeout=30)
    imap.login(USER, PASSWORD)
    return imap


def _append(imap: imaplib.IMAP4_SSL, i: int) -> None:
    typ, _ = imap.append("INBOX", None, None, message(i))
    assert typ == "OK"


def test_thunderbird_condstore_and_ios_qresync_over_tls(live_server: LiveServer) -> None:
    other = _imap(live_server)
    for i in range(1, 6):
        _append(other, i)
    other.select("INBOX")

    # Thunderbird: SELECT (CONDSTORE), cache HIGHESTMODSEQ, later UID FETCH 1:* (FLAGS)
    # (CHANGEDSINCE n) and a UID SEARCH for what still exists.
    tb = _imap(live_server)
    typ, data = tb._simple_command("SELECT", "INBOX", "(CONDSTORE)")
    assert typ == "OK"
    tb.state = "SELECTED"  # imaplib does not know SELECT with parameters
    highest = [x for x in tb.untagged_responses.get("OK", [])
               if isinstance(x, bytes) and x.startswith(b"[HIGHESTMODSEQ")]
    assert highest
    hms = int(highest[-1].split()[1].rstrip(b"]"))
    typ, data = tb.uid("FETCH", "1:*", "(FLAGS)")
    assert typ == "OK" and len(data) == 5
    tb.close()
    tb.logout()

    # Meanwhile on another device: flag 2, expunge 3, add 6.
    assert other.uid("STORE", "2", "+FLAGS", "(\\Flagged)")[0] == "OK"
    assert other.uid("STORE", "3", "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
    assert other.expunge()[0] == "OK"
    _append(other, 6)

    tb = _imap(live_server)
    assert tb._simple_command("SELECT", "INBOX", "(CONDSTORE)")[0] == "OK"
    tb.state = "SELECTED"
    typ, data = tb.uid("FETCH", "1:*", f"(FLAGS) (CHANGEDSINCE {hms})")
    assert typ == "OK"
    got = {int(m.group(1)): m.group(2) for d in data if d
           if (m := re.search(rb"UID (\d+) FLAGS \(([^)]*)\) MODSEQ", d if isinstance(d, bytes) else d[0]))}
    assert set(got) == {2, 6} and b"\\Flagged" in got[2]
    typ, data = tb.uid("SEARCH", "ALL")
    assert data[0].split() == [b"1", b"2", b"4", b"5", b"6"]
    tb.logout()

    # iOS Mail: ENABLE QRESYNC, SELECT (QRESYNC (uidvalidity modseq known-uids)).
    ios = _imap(live_server)
    typ, data = ios.select("INBOX")
    raw_uv = ios.untagged_responses["UIDVALIDITY"][-1]
    assert isinstance(raw_uv, bytes)
    uidvalidity = int(raw_uv)
    ios.logout()
    ios = _imap(live_server)
    assert ios._simple_command("ENABLE", "QRESYNC")[0] == "OK"
    typ, _ = ios._simple_command("SELECT", "INBOX", f"(QRESYNC ({uidvalidity} {hms} 1:5))")
    assert typ == "OK"
    ios.state = "SELECTED"
    vanished = ios.untagged_responses.get("VANISHED", [])
    assert vanished == [b"(EARLIER) 3"]
    fetches = ios.untagged_responses.get("FETCH", [])
    assert any(b"UID 2 FLAGS (\\Flagged)" in f for f in fetches)
    assert not any(b"UID 6 " in f for f in fetches)  # outside known-uids
    # Live: another device expunges; this one hears VANISHED, not EXPUNGE.
    assert other.uid("STORE", "4", "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
    assert other.expunge()[0] == "OK"
    typ, _ = ios.noop()
    assert typ == "OK"
    assert ios.untagged_responses.get("VANISHED", [])[-1:] == [b"4"]
    assert "EXPUNGE" not in ios.untagged_responses
    ios.logout()
    other.logout()
