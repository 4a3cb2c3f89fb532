"""Limits server.py enforces for every protocol: connections per IP."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from tests.conftest import LiveServer, start_live_server, stop_live_server

from postfach.config import LimitsConfig


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[LiveServer]:
    live, thread = start_live_server(tmp_path / "data", limits=replace(LimitsConfig(), max_connections_per_ip=2))
    try:
        yield live
    finally:
        stop_live_server(live, thread)


@pytest.mark.parametrize(
    ("protocol", "greeting", "refusal"),
    [
        ("imap", b"* OK", b"* BYE [UNAVAILABLE]"),
        ("pop3", b"+OK", b"-ERR [SYS/TEMP]"),
        ("submission", b"220 ", b"421 4.7.0"),
        ("mx", b"220 ", b"421 4.7.0"),
    ],
)
def test_connections_per_ip_cap(capped: LiveServer, protocol: str, greeting: bytes, refusal: bytes) -> None:
    port = capped.port(protocol, "starttls")
    first = socket.create_connection(("127.0.0.1", port), timeout=30)
    second = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        assert first.recv(200).startswith(greeting)
        assert second.recv(200).startswith(greeting)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as third:
            assert third.recv(200).startswith(refusal)
            assert third.recv(200) == b""  # and the server closes it
    finally:
        first.close()
        second.close()
    # once the others are gone a new connection is served again
    for _ in range(50):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as again:
            data = again.recv(200)
        if data.startswith(greeting):
            break
        time.sleep(0.1)
    assert data.startswith(greeting)
