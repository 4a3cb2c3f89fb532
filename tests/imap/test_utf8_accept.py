"""UTF8=ACCEPT (RFC 6855): malformed UTF-8 in a command is BAD once enabled, 8-bit message data
in APPEND stays accepted, and the session carries on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imap_helpers import PASSWORD, USER, make_env
from test_transcripts import Peer


@pytest.mark.asyncio
async def test_malformed_utf8_is_bad_after_enable(tmp_path: Path) -> None:
    env = await make_env(tmp_path)
    try:
        peer = Peer(env, "127.0.0.1", True)
        await peer.lines()

        async def cmd(line: bytes) -> list[bytes]:
            await peer.feed(line)
            return await peer.lines()

        assert (await cmd(f"a LOGIN {USER} {PASSWORD}".encode()))[-1].startswith(b"a OK")
        assert await cmd(b"b ENABLE UTF8=ACCEPT") == [b"* ENABLED UTF8=ACCEPT", b"b OK ENABLE completed"]
        got = await cmd(b'c CREATE "B\xfccher"')  # Latin-1, not UTF-8
        assert got[-1].startswith(b"c BAD") and b"UTF-8" in got[-1]
        got = await cmd(b"d SELECT INBOX")
        assert got[-1].startswith(b"d OK")
        got = await cmd(b'e SEARCH SUBJECT "\xff\xfe"')
        assert got[-1].startswith(b"e BAD")
        body = b"Subject: caf\xe9\r\n\r\n8-bit body \xe9\xe8\r\n"
        await peer.feed(b"f APPEND INBOX {%d+}\r\n" % len(body) + body)
        got = await peer.lines()
        assert got[-1].startswith(b"f OK [APPENDUID")
        got = await cmd('g CREATE "Bücher"'.encode())
        assert got[-1].startswith(b"g OK")
        got = await cmd(b'h LIST "" "B*"')
        assert got[0] == '* LIST (\\HasNoChildren) "/" "Bücher"'.encode()
        await peer.session.close()
    finally:
        await env.store.close()
