from __future__ import annotations

import pytest

from postfach.auth import sasl


def test_plain_with_initial_response() -> None:
    m = sasl.start("plain")
    assert m is not None
    assert m.step(b'\x00user@example.org\x00pa ss"\\') == sasl.Credentials("user@example.org", 'pa ss"\\', "")


def test_plain_without_initial_response_sends_empty_challenge() -> None:
    m = sasl.start("PLAIN")
    assert m is not None
    assert m.step(None) == sasl.Challenge(b"")
    got = m.step(b"user@example.org\x00user@example.org\x00pw")
    assert got == sasl.Credentials("user@example.org", "pw", "user@example.org")


@pytest.mark.parametrize("data", [b"", b"nouser", b"\x00\x00", b"a\x00b", b"\x00u\x00", b"\x00u\x00\xff\xfe"])
def test_plain_malformed(data: bytes) -> None:
    m = sasl.start("PLAIN")
    assert m is not None
    with pytest.raises(sasl.SaslError):
        m.step(data)


def test_login_two_steps_and_initial_response() -> None:
    m = sasl.start("LOGIN")
    assert m is not None
    assert m.step(None) == sasl.Challenge(b"Username:")
    assert m.step(b"u@example.org") == sasl.Challenge(b"Password:")
    assert m.step(b"secret") == sasl.Credentials("u@example.org", "secret")
    # Outlook for Mac: LOGIN with the user name as initial response
    m2 = sasl.start("login")
    assert m2 is not None
    assert m2.step(b"u@example.org") == sasl.Challenge(b"Password:")
    assert m2.step(b"secret") == sasl.Credentials("u@example.org", "secret")


def test_unknown_mechanism() -> None:
    assert sasl.start("CRAM-MD5") is None
