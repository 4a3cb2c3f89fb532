"""METADATA (RFC 5464) and MULTISEARCH (RFC 7377) beyond the transcripts: values that need a
literal8 (NUL) or are over the size limit, huge MAXSIZE / DEPTH answers, ESEARCH with MODSEQ."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imap_helpers import PASSWORD, USER, make_env, message
from test_transcripts import Peer


async def _run(peer: Peer, data: bytes) -> list[bytes]:
    await peer.feed(data)
    return await peer.lines()


@pytest.mark.asyncio
async def test_binary_and_oversize_values(tmp_path: Path) -> None:
    env = await make_env(tmp_path)
    try:
        p = Peer(env, "127.0.0.1", True)
        await p.lines()
        assert (await _run(p, f"a LOGIN {USER} {PASSWORD}".encode()))[-1].startswith(b"a OK")
        # A value with NUL goes in as literal8 and comes back as literal8 (RFC 5464 §5 value).
        got = await _run(p, b"b SETMETADATA INBOX (/private/bin ~{4+}\r\na\x00b\xff)")
        assert got == [b"b OK SETMETADATA completed"]
        await p.feed(b"c GETMETADATA INBOX /private/bin")
        data = bytes(p.sink.data)
        assert data == b'* METADATA "INBOX" (/private/bin ~{4}\r\na\x00b\xff)\r\nc OK GETMETADATA completed\r\n'
        p.sink.data.clear()
        # Over the limit (64 KiB by default): NO [METADATA MAXSIZE n]; nothing of the command is set.
        limit = env.ctx.config.imap.metadata_max_entry_bytes
        big = b"x" * (limit + 1)
        got = await _run(p, b"d SETMETADATA INBOX (/private/ok \"1\" /private/big {%d+}\r\n" % len(big) + big + b")")
        assert got == [b"d NO [METADATA MAXSIZE %d] Entry value too large" % limit]
        got = await _run(p, b"e GETMETADATA INBOX (/private/ok /private/big)")
        assert got[0] == b'* METADATA "INBOX" (/private/big NIL /private/ok NIL)'
        # Exactly at the limit is fine; MAXSIZE below it leaves it out with LONGENTRIES.
        ok = b"y" * limit
        got = await _run(p, b"f SETMETADATA INBOX (/private/big {%d+}\r\n" % len(ok) + ok + b")")
        assert got == [b"f OK SETMETADATA completed"]
        got = await _run(p, b"g GETMETADATA INBOX (MAXSIZE 1024) (/private/big /private/bin)")
        assert got == [b'* METADATA "INBOX" (/private/bin ~{4}', b"a\x00b\xff)",
                       b"g OK [METADATA LONGENTRIES %d] GETMETADATA completed" % limit]
        # Non-ASCII entry names and bad syntax are BAD.
        got = await _run(p, 'h GETMETADATA INBOX "/private/ä"'.encode())
        assert got[-1].startswith(b"h BAD")
        got = await _run(p, b"i SETMETADATA INBOX (/private/x)")
        assert got[-1].startswith(b"i BAD")
        got = await _run(p, b"j SETMETADATA INBOX /private/x \"v\"")
        assert got[-1].startswith(b"j BAD")
        await p.session.close()
    finally:
        await env.store.close()


@pytest.mark.asyncio
async def test_esearch_modseq_and_selected_view(tmp_path: Path) -> None:
    env = await make_env(tmp_path)
    try:
        inbox = await env.store.get_mailbox(env.account_id, "INBOX")
        sent = await env.store.get_mailbox(env.account_id, "Sent")
        assert inbox is not None and sent is not None
        for i in range(3):
            await env.store.append(env.account_id, inbox.id, message(i))
            await env.store.append(env.account_id, sent.id, message(10 + i))
        p = Peer(env, "127.0.0.1", True)
        await p.lines()
        await _run(p, f"a LOGIN {USER} {PASSWORD}".encode())
        got = await _run(p, b"b ESEARCH IN (personal) RETURN (MAX) MODSEQ 1")
        assert len(got) == 3 and got[-1] == b"b OK ESEARCH completed"
        assert got[0].startswith(b'* ESEARCH (TAG "b" MAILBOX "INBOX" UIDVALIDITY ')
        assert all(re.search(rb"\) UID MAX 3 MODSEQ \d+\Z", x) for x in got[:2]), got
        # An expunge by another session shows in the next ESEARCH of a non-selected mailbox.
        await env.store.delete_messages(env.account_id, sent.id, [2])  # type: ignore[list-item]
        got = await _run(p, b"c ESEARCH IN (mailboxes Sent) ALL")
        assert got[0].endswith(b") UID ALL 1,3")
        await p.session.close()
    finally:
        await env.store.close()
