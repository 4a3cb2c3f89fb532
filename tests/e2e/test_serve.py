"""`postfach serve` as operators run it: a real process, real listeners, signals."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests import backends

from postfach import cli


def _init(tmp_path: Path) -> Path:
    d = tmp_path / "var"
    assert cli.main(["init", "--data", str(d), "--dev", "--hostname", "localhost", *backends.init_args(d)]) == 0
    cfg = d / "postfach.toml"
    # free ports: let the kernel choose (tests run in parallel); the log says which
    cfg.write_text(re.sub(r"port = \d+", "port = 0", cfg.read_text()))
    return d


def _start(d: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "postfach", "serve", "--data", str(d)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _read_until(proc: subprocess.Popen[str], needle: str, timeout: float = 60) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen; output:\n" + "\n".join(lines))


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_serve_listens_prints_settings_and_stops_on_sigterm(tmp_path: Path) -> None:
    d = _init(tmp_path)
    proc = _start(d)
    try:
        lines = _read_until(proc, "User name")
        listening = [ln for ln in lines if "listening:" in ln]
        assert len(listening) == 7, lines  # one line per listener
        ports = {}
        for ln in listening:
            m = re.search(r"listening: (\w+) on \S+ port (\d+) \((\w+)\)", ln)
            assert m, ln
            ports[(m.group(1), m.group(3))] = int(m.group(2))
        text = "\n".join(lines)
        assert f"port {ports[('imap', 'starttls')]} (STARTTLS) or {ports[('imap', 'implicit')]} (SSL/TLS)" in text
        assert f"{ports[('submission', 'starttls')]} (STARTTLS)" in text
        # an implicit-TLS listener speaks TLS with the generated certificate (DNS name localhost)
        ctx = ssl.create_default_context(cafile=str(d / "tls" / "cert.pem"))
        with (
            socket.create_connection(("127.0.0.1", ports[("imap", "implicit")]), timeout=60) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            greeting = tls.recv(200)
            assert greeting.startswith(b"* OK")
        # TLS 1.1 is refused
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname = False
        old.verify_mode = ssl.CERT_NONE
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        with (
            socket.create_connection(("127.0.0.1", ports[("imap", "implicit")]), timeout=60) as raw,
            pytest.raises(ssl.SSLError),
        ):
            old.wrap_socket(raw, server_hostname="localhost")
        # SIGHUP reloads certificates and keeps serving
        proc.send_signal(signal.SIGHUP)
        _read_until(proc, "certificates reloaded")
        with socket.create_connection(("127.0.0.1", ports[("pop3", "starttls")]), timeout=60) as s:
            assert s.recv(200).startswith(b"+OK")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_says_bye_to_an_open_imap_session(tmp_path: Path) -> None:
    d = _init(tmp_path)
    proc = _start(d)
    try:
        lines = _read_until(proc, "User name")
        port = next(
            int(m.group(1)) for ln in lines if (m := re.search(r"listening: imap on \S+ port (\d+) \(starttls\)", ln))
        )
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            assert s.recv(200).startswith(b"* OK")
            proc.send_signal(signal.SIGTERM)
            data = b""
            while True:
                chunk = s.recv(200)
                if not chunk:
                    break
                data += chunk
            assert b"* BYE" in data
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_config_stops_serve_with_one_line(tmp_path: Path) -> None:
    d = _init(tmp_path)
    (d / "postfach.toml").write_text("[[listener]]\nprotocol = 'imap'\nport = 99999\n")
    proc = subprocess.run(
        [sys.executable, "-m", "postfach", "serve", "--data", str(d)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "postfach.toml: listener[0].port: 99999 is not a port number" in proc.stderr
    assert "Traceback" not in proc.stderr
