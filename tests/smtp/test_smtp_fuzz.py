"""Hypothesis fuzz of the whole command handling: arbitrary byte streams (seeded with real
commands) through Receiver + Session + the real store never raise and every reply is well-formed."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.smtp.smtp_helpers import make_env

from postfach.smtp.session import Conversation, Peer

REPLY_LINE = re.compile(rb"^[2-5]\d\d[ -].*$")

WORDS = [
    b"EHLO x.example\r\n", b"HELO x\r\n", b"MAIL FROM:<a@b.example>\r\n", b"MAIL FROM:<>\r\n",
    b"MAIL FROM:<user@example.org> BODY=BINARYMIME\r\n", b"RCPT TO:<user@example.org>\r\n",
    b"RCPT TO:<x@elsewhere.example>\r\n", b"RCPT TO:<team@example.org> NOTIFY=NEVER\r\n", b"DATA\r\n",
    b"BDAT 5\r\n", b"BDAT 3 LAST\r\n", b"BDAT 0 LAST\r\n", b".\r\n", b"\r\n.\r\n", b"\n.\n", b"RSET\r\n",
    b"NOOP\r\n", b"VRFY u\r\n", b"STARTTLS\r\n", b"AUTH PLAIN\r\n", b"AUTH LOGIN dXNlcg==\r\n", b"*\r\n",
    b"AHVzZXJAZXhhbXBsZS5vcmcAc2VjcmV0LXBhc3M=\r\n", b"Subject: x\r\n", b"\x00", b"\r", b"\n", b"QUIT\r\n",
]

streams = st.lists(st.one_of(st.sampled_from(WORDS), st.binary(max_size=40)), max_size=30)


def test_fuzz_session(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    env = loop.run_until_complete(make_env(tmp_path, {"limits.max_message_bytes": 2000}))

    async def play(chunks: list[bytes], protocol: str) -> None:
        peer = Peer("127.0.0.1", "starttls", False)
        conv = Conversation.create(env.ctx, peer, protocol)
        for chunk in chunks:
            conv.feed(chunk)
            while True:
                step = await conv.next()
                if step is None:
                    break
                for line in step.data.split(b"\r\n")[:-1]:
                    assert REPLY_LINE.match(line) or line.startswith(b"334 "), line
                    assert not line.startswith(b"451"), "internal error"
                if step.starttls:
                    conv.receiver.reset()
                    conv.session.tls_started("TLSv1.3 test")
                if step.close:
                    return

    @settings(max_examples=int(os.environ.get("SMTP_FUZZ_EXAMPLES", "150")), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(streams, st.sampled_from(["submission", "mx"]))
    def run(chunks: list[bytes], protocol: str) -> None:
        loop.run_until_complete(play(chunks, protocol))

    try:
        run()
    finally:
        loop.run_until_complete(env.store.close())
        loop.close()
