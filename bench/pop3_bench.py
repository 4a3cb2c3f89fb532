"""POP3 benchmark: UIDL and LIST on a 50,000-message maildrop, RETR throughput of 1 MiB messages
over TLS on loopback. Prints one JSON object.

    PYTHONPATH=src .venv/bin/python bench/pop3_bench.py [--messages 50000] [--big 64] [--runs 5]

The server (postfach.pop3.connection.handle over a real SqliteStore in a temporary folder) runs in
this process on uvloop when installed, like ``postfach serve``; the client runs in a separate process
(``--client``) so that the two do not share one interpreter. Targets (issue 4): UIDL and LIST
< 150 ms on 50,000 messages; RETR >= 150 MiB/s over TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

USER = "bench@example.org"
PASSWORD = "bench-pass-123"
MiB = 1024 * 1024


# ------------------------------------------------------------------------------------ the client


async def _read_multiline(reader: asyncio.StreamReader) -> int:
    """Reads a status line and a multi-line body up to the final '.'; returns body bytes."""
    status = await reader.readline()
    if not status.startswith(b"+OK"):
        raise RuntimeError(f"unexpected answer {status!r}")
    total = 0
    tail = b""
    while True:
        chunk = await reader.read(1 << 20)
        if not chunk:
            raise RuntimeError("connection closed")
        total += len(chunk)
        tail = (tail + chunk)[-5:]
        if tail == b"\r\n.\r\n" or (total == 3 and tail == b".\r\n"):
            return total


async def _login(host: str, port: int, tls: ssl.SSLContext | None) -> tuple[Any, Any]:
    reader, writer = await asyncio.open_connection(
        host, port, ssl=tls, server_hostname="localhost" if tls else None, limit=1 << 22
    )
    await reader.readline()
    writer.write(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
    await reader.readline()
    answer = await reader.readline()
    if not answer.startswith(b"+OK"):
        raise RuntimeError(f"login failed: {answer!r}")
    return reader, writer


async def client_main(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # 1. UIDL and LIST on the big maildrop (plaintext loopback: the protocol cost, not TLS).
    t0 = time.perf_counter()
    reader, writer = await _login("127.0.0.1", args.port, None)
    out["login_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    for cmd in ("UIDL", "LIST"):
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            writer.write(cmd.encode() + b"\r\n")
            size = await _read_multiline(reader)
            times.append((time.perf_counter() - t) * 1000)
        out[f"{cmd.lower()}_ms_median"] = round(statistics.median(times), 1)
        out[f"{cmd.lower()}_ms_min"] = round(min(times), 1)
        out[f"{cmd.lower()}_bytes"] = size
    writer.write(b"QUIT\r\n")
    await reader.readline()
    writer.close()
    # 2. RETR of 1 MiB messages over implicit TLS.
    tls = ssl.create_default_context(cafile=args.cafile)
    reader, writer = await _login("127.0.0.1", args.tls_port, tls)
    best = 0.0
    for _ in range(max(1, args.runs // 2)):
        t = time.perf_counter()
        total = 0
        for i in range(1, args.big + 1):
            writer.write(b"RETR %d\r\n" % i)
            total += await _read_multiline(reader)
        dt = time.perf_counter() - t
        best = max(best, total / MiB / dt)
    out["retr_tls_mib_per_s"] = round(best, 1)
    out["retr_messages"] = args.big
    writer.write(b"QUIT\r\n")
    await reader.readline()
    writer.close()
    # 3. Baseline: the same bytes as raw TLS writes (no POP3, no store) — what this machine's
    # loopback TLS can do at all right now; useful when the machine is shared and loaded.
    best = 0.0
    for _ in range(max(1, args.runs // 2)):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", args.pipe_port, ssl=tls, server_hostname="localhost", limit=1 << 22
        )
        t = time.perf_counter()
        writer.write(b"go\n")
        total = 0
        while chunk := await reader.read(1 << 20):
            total += len(chunk)
        best = max(best, total / MiB / (time.perf_counter() - t))
        writer.close()
    out["tls_pipe_baseline_mib_per_s"] = round(best, 1)
    return out


# ------------------------------------------------------------------------------------ the server


def _big_message(i: int) -> bytes:
    line = b"%06d " % i + b"abcdefghijklmnopqrstuvwxyz0123456789" * 2 + b"\r\n"
    head = b"From: a@example.net\r\nTo: %s\r\nSubject: big %d\r\n\r\n" % (USER.encode(), i)
    body = line * (MiB // len(line))
    return head + body[: MiB - len(head)]


async def server_main(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import trustme

    from postfach.auth import Authenticator
    from postfach.config import AuthConfig, Config, ListenerConfig, Pop3Config
    from postfach.context import ConnectionInfo, ServerContext
    from postfach.pop3.connection import handle
    from postfach.store.sqlite import SqliteStore

    store = SqliteStore(tmp / "store")
    await store.open()
    auth_cfg = AuthConfig(argon2_time_cost=1, argon2_memory_kib=8, argon2_parallelism=1)
    # The bench reads the same messages again and again: leave flags alone to measure streaming.
    config = Config(auth=auth_cfg, pop3=Pop3Config(retr_sets_seen=False))
    auth = Authenticator(store, auth_cfg)
    await store.add_domain("example.org")
    big_account = await store.create_account(USER, await auth.hash_password(PASSWORD))
    inbox = await store.get_mailbox(big_account.id, "INBOX")
    assert inbox is not None
    result: dict[str, Any] = {}
    t = time.perf_counter()
    # 1 MiB messages first (numbers 1..big), then the small ones up to `messages`.
    for i in range(1, args.big + 1):
        await store.append(big_account.id, inbox.id, _big_message(i))
    small = b"From: a@example.net\r\nSubject: small\r\n\r\nhello\r\n"
    remaining = args.messages - args.big
    while remaining > 0:
        n = min(remaining, 2000)
        await store.append_many(big_account.id, inbox.id, [(small, frozenset(), None)] * n)
        remaining -= n
    result["fill_seconds"] = round(time.perf_counter() - t, 1)

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_tls)
    cafile = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    ctx = ServerContext(config=config, store=store, auth=auth, tls_context=lambda: server_tls)

    def make_cb(implicit: bool) -> Any:
        async def cb(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = writer.get_extra_info("peername")
            conn = ConnectionInfo(
                listener=ListenerConfig("pop3", 0, tls="implicit" if implicit else "starttls"),
                remote_ip=peer[0], remote_port=peer[1], local_ip="127.0.0.1", local_port=0,
                tls_active=implicit,
            )
            await handle(ctx, conn, reader, writer)

        return cb

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        for i in range(1, args.big + 1):
            writer.write(_big_message(i))
            await writer.drain()
        writer.close()

    pipe_srv = await asyncio.start_server(pipe, "127.0.0.1", 0, ssl=server_tls)
    pipe_port = pipe_srv.sockets[0].getsockname()[1]
    plain = await asyncio.start_server(make_cb(False), "127.0.0.1", 0)
    tls_srv = await asyncio.start_server(make_cb(True), "127.0.0.1", 0, ssl=server_tls)
    port = plain.sockets[0].getsockname()[1]
    tls_port = tls_srv.sockets[0].getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--client", "--port", str(port), "--tls-port", str(tls_port),
        "--cafile", str(cafile), "--big", str(args.big), "--runs", str(args.runs),
        "--pipe-port", str(pipe_port),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    stdout, _ = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"client failed ({proc.returncode})")
    result.update(json.loads(stdout))
    plain.close()
    tls_srv.close()
    pipe_srv.close()
    await store.close()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--big", type=int, default=64, help="how many 1 MiB messages for RETR")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tls-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cafile", help=argparse.SUPPRESS)
    ap.add_argument("--pipe-port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    loop_name = "asyncio"
    try:
        import uvloop

        uvloop.install()
        loop_name = "uvloop"
    except ImportError:
        pass
    if args.client:
        print(json.dumps(asyncio.run(client_main(args))))
        return 0
    with tempfile.TemporaryDirectory(prefix="pop3bench-") as d:
        result = asyncio.run(server_main(args, Path(d)))
    result = {"benchmark": "pop3", "messages": args.messages, "loop": loop_name, **result}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
