"""Crash test: SIGKILL a ``python -m postfach serve`` during a burst of submissions. After a
restart every message that got ``250`` is in the recipient's mailbox, whole, and the store check
finds nothing half-stored (ARCHITECTURE.md invariant 1)."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
from tests import backends
from tests.smtp.smtp_helpers import OTHER, PASSWORD, USER

from postfach.auth import make_hasher
from postfach.config import AuthConfig

FAST = AuthConfig(argon2_time_cost=1, argon2_memory_kib=8, argon2_parallelism=1)
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _write_config(data: Path, port: int) -> None:
    data.mkdir(parents=True, exist_ok=True)
    (data / "postfach.toml").write_text(
        f"""hostname = "localhost"

[[listener]]
protocol = "submission"
address = "127.0.0.1"
port = {port}
tls = "none"

[auth]
argon2_time_cost = 1
argon2_memory_kib = 8
argon2_parallelism = 1

[logging]
level = "WARNING"

""" + backends.store_toml(data),
        encoding="utf-8",
    )
    from postfach.net.tls import generate_self_signed

    generate_self_signed("localhost", data / "tls" / "cert.pem", data / "tls" / "key.pem")


async def _prepare_store(data: Path) -> None:
    store = await backends.open_new_store(data / "store")
    try:
        await store.add_domain("example.org")
        hashed = make_hasher(FAST).hash(PASSWORD)
        await store.create_account(USER, hashed)
        await store.create_account(OTHER, hashed)
    finally:
        await store.close()


async def _start(data: Path, port: int) -> asyncio.subprocess.Process:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "postfach", "serve", "--data", str(data),
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    for _ in range(300):
        try:
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return proc
        except OSError:
            if proc.returncode is not None:
                err = await proc.stderr.read() if proc.stderr else b""
                raise AssertionError(f"server exited: {err.decode(errors='replace')}") from None
            await asyncio.sleep(0.1)
    raise AssertionError("server did not start")


async def _reply(reader: asyncio.StreamReader) -> str:
    while True:
        line = (await reader.readline()).decode()
        if not line:
            raise ConnectionError("closed")
        if len(line) < 4 or line[3] != "-":
            return line


async def _client(port: int, cid: int, acked: list[str], stop: asyncio.Event) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _reply(reader)
        auth = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        writer.write(f"EHLO c{cid}\r\nAUTH PLAIN {auth}\r\n".encode())
        await _reply(reader)
        assert (await _reply(reader)).startswith("235")
        n = 0
        while not stop.is_set():
            n += 1
            tag = f"c{cid}-m{n}"
            body = (f"From: {USER}\r\nTo: {OTHER}\r\nSubject: {tag}\r\n\r\n" + "x" * 70 + "\r\n") * 1
            body += "filler line\r\n" * 200 + f"END {tag}\r\n"
            writer.write(f"MAIL FROM:<{USER}>\r\nRCPT TO:<{OTHER}>\r\nDATA\r\n".encode())
            for _ in range(3):
                await _reply(reader)
            writer.write(body.encode() + b".\r\n")
            if (await _reply(reader)).startswith("250"):
                acked.append(tag)
    except (ConnectionError, OSError, AssertionError):
        return


@pytest.mark.slow
@pytest.mark.asyncio
async def test_sigkill_during_burst_loses_no_acknowledged_message(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = _free_port()
    _write_config(data, port)
    await _prepare_store(data)
    proc = await _start(data, port)
    acked: list[str] = []
    stop = asyncio.Event()
    clients = [asyncio.create_task(_client(port, i, acked, stop)) for i in range(8)]
    try:
        for _ in range(600):
            if len(acked) >= 60:
                break
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # mid-burst: other messages are in flight
        await proc.wait()
    finally:
        stop.set()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.gather(*clients, return_exceptions=True)
    assert len(acked) >= 10, "the burst did not get going"

    # Restart the server (recovery runs in store.open), check it serves, stop it, then look inside.
    proc = await _start(data, port)
    proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(proc.wait(), 30)

    store = await backends.open_new_store(data / "store")
    try:
        account = await store.get_account(OTHER)
        assert account is not None
        inbox = await store.get_mailbox(account.id, "INBOX")
        assert inbox is not None
        delivered: dict[str, bytes] = {}
        for meta in await store.list_messages(account.id, inbox.id):
            msg = await store.read_message(account.id, inbox.id, meta.uid)
            assert len(msg) == meta.size
            subject = msg.split(b"\r\nSubject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            assert msg.endswith(f"END {subject}\r\n".encode()), "a message is incomplete"
            delivered[subject] = msg
        missing = [t for t in acked if t not in delivered]
        assert missing == [], f"acknowledged but lost: {missing}"
        problems = [p for p in await store.check() if p.kind != "orphan-blob"]
        assert problems == []
    finally:
        await store.close()
