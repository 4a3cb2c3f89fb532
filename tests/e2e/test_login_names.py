"""Login names the protocol parsers let through but no account can have (a NUL inside an IMAP
literal or a POP3 USER line) fail as a wrong login does, on every store backend: never an internal
error, never a "try again later" that makes the client retry forever."""

from __future__ import annotations

import socket

from tests.conftest import LiveServer


def _exchange(port: int, lines: list[bytes]) -> list[bytes]:
    """Send each line after reading the answer to the one before (first the greeting)."""
    answers: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        f = s.makefile("rb")
        answers.append(f.readline())
        for line in lines:
            s.sendall(line)
            answers.append(f.readline())
    return answers


def test_imap_login_with_nul_in_literal_is_an_authentication_failure(live_server: LiveServer) -> None:
    name = b"us\x00er@example.org"
    answers = _exchange(
        live_server.port("imap"),
        [b"a LOGIN {%d+}\r\n%s {6+}\r\nsecret\r\n" % (len(name), name), b"b LOGOUT\r\n"],
    )
    assert answers[1].startswith(b"a NO [AUTHENTICATIONFAILED]"), answers


def test_pop3_user_with_nul_is_an_authentication_failure(live_server: LiveServer) -> None:
    answers = _exchange(
        live_server.port("pop3"), [b"USER us\x00er@example.org\r\n", b"PASS secret\r\n", b"QUIT\r\n"]
    )
    assert answers[1].startswith(b"+OK"), answers
    assert answers[2].startswith(b"-ERR [AUTH]"), answers
