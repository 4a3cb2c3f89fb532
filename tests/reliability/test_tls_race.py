"""Regression test for a bug the crash test found in ``server.py`` (fixed there since).

Implicit TLS used to be started with ``writer.start_tls`` on the accepted plain connection. Under
``postfach serve`` (uvloop), when the client's ClientHello was already there by the time the
connection task ran (the event loop was busy: a big FETCH, a burst of deliveries), the plain
StreamReader had read those bytes into its buffer and the TLS layer never saw them: the handshake
stalled until ``tls_handshake_timeout_seconds`` and the client got EOF. Here a SIGSTOP makes the
loop "busy" deterministically. The listener now passes ``ssl=`` to ``asyncio.start_server``.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from bench.load.server import ServerProcess
from tests import backends


@pytest.mark.timeout(180)
def test_implicit_tls_handshake_survives_a_busy_event_loop(tmp_path: Path) -> None:
    srv = ServerProcess(
        tmp_path / "var", init_args=backends.init_args(tmp_path / "var"), limits={"tls_handshake_timeout_seconds": 4}
    )
    srv.init()
    srv.start()
    try:
        port = srv.port("imap", "implicit")
        ctx = ssl.create_default_context(cafile=str(srv.cafile))
        result: list[object] = []

        def client() -> None:
            try:
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
                    ctx.wrap_socket(raw, server_hostname="localhost") as tls,
                ):
                    result.append(tls.recv(100))
            except (OSError, ssl.SSLError) as e:
                result.append(e)

        os.kill(srv.pid, signal.SIGSTOP)  # the event loop is busy ...
        try:
            t = threading.Thread(target=client)
            t.start()
            time.sleep(0.5)  # ... while the kernel accepts and the ClientHello arrives
        finally:
            os.kill(srv.pid, signal.SIGCONT)
        t.join(60)
        assert result, "client hangs"
        assert isinstance(result[0], bytes), f"TLS handshake failed: {result[0]!r}"
        assert result[0].startswith(b"* OK")
    finally:
        srv.kill()
