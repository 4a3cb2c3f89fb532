"""Local delivery throughput: N parallel SMTP connections (MX listener, loopback) sending 4 KiB
messages to a local account, every one durable before its 250 (SQLite commits with
synchronous=FULL: inline.sqlite3 for messages up to 64 KiB, then the metadata; bigger ones are
synced files). The clients run in a separate process so that they do not share the server's
event loop.

    PYTHONPATH=src .venv/bin/python bench/smtp_bench.py [--messages 3000] [--connections 10] [--size 4096]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any


def _message(i: int, size: int) -> bytes:
    head = f"From: bench@sender.example\r\nTo: user@example.org\r\nSubject: bench {i}\r\n\r\n".encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd\r\n"  # 78
    body = line * max(0, (size - len(head)) // len(line))
    return head + body


async def smtp_session(port: int) -> tuple[asyncio.StreamWriter, Callable[[], Awaitable[bytes]]]:
    """A plain connection to ``port`` after greeting and EHLO; ``reply()`` reads one whole reply
    (its last line)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != b"-":
                return line

    await reply()
    writer.write(b"EHLO bench.example\r\n")
    await reply()
    return writer, reply


async def send_messages(port: int, count: int, size: int, cid: int, rcpt: str = "user@example.org") -> int:
    """One connection sending ``count`` messages one after the other; the number acknowledged."""
    writer, reply = await smtp_session(port)
    ok = 0
    for i in range(count):
        # PIPELINING: MAIL, RCPT and DATA in one write (RFC 2920), then the message.
        writer.write(f"MAIL FROM:<bench@sender.example>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
        for _ in range(3):
            await reply()
        writer.write(_message(cid * 1_000_000 + i, size) + b".\r\n")
        if (await reply()).startswith(b"250"):
            ok += 1
    writer.write(b"QUIT\r\n")
    await reply()
    writer.close()
    return ok


def _clients(port: int, total: int, conns: int, size: int, out: Any) -> None:
    async def main() -> None:
        per = total // conns
        t0 = time.perf_counter()
        oks = await asyncio.gather(*(send_messages(port, per, size, c) for c in range(conns)))
        out.put((sum(oks), time.perf_counter() - t0))

    asyncio.run(main())


async def run(total: int, conns: int, size: int, workdir: Path, *, sink: bool = False) -> dict[str, Any]:
    from postfach.auth import Authenticator
    from postfach.config import AuthConfig, Config, ListenerConfig
    from postfach.context import ConnectionInfo, ServerContext
    from postfach.smtp.connection import handle
    from postfach.store.sqlite import SqliteStore

    store = SqliteStore(workdir / "store")
    await store.open()
    config = Config(hostname="bench.example", auth=AuthConfig(argon2_time_cost=1, argon2_memory_kib=8,
                                                                argon2_parallelism=1))
    auth = Authenticator(store, config.auth)
    await store.add_domain("example.org")
    await store.create_account("user@example.org", await auth.hash_password("bench-password"))
    if sink:
        # Protocol-layer ceiling: the SMTP stack without the durable write (nothing is stored).
        async def no_deliver(data: bytes, targets: Any) -> list[Any]:
            return []

        store.deliver = no_deliver  # type: ignore[method-assign]
    ctx = ServerContext(config=config, store=store, auth=auth, tls_context=lambda: None)  # type: ignore[arg-type,return-value]
    listener = ListenerConfig("mx", 25, tls="none")

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        conn = ConnectionInfo(listener, peer[0], peer[1], "127.0.0.1", 25, False)
        await handle(ctx, conn, reader, writer)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, backlog=128)
    port = server.sockets[0].getsockname()[1]
    q: Any = multiprocessing.get_context("spawn").Queue()
    proc = multiprocessing.get_context("spawn").Process(target=_clients, args=(port, total, conns, size, q))
    proc.start()
    loop = asyncio.get_running_loop()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    ok, seconds = await loop.run_in_executor(None, q.get)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    await loop.run_in_executor(None, proc.join)
    server.close()
    await server.wait_closed()
    account = await store.get_account("user@example.org")
    assert account is not None
    inbox = await store.get_mailbox(account.id, "INBOX")
    assert inbox is not None
    stored = len(await store.list_messages(account.id, inbox.id))
    await store.close()
    return {
        "benchmark": "smtp_local_delivery",
        "connections": conns,
        "message_bytes": size,
        "messages_acknowledged": ok,
        "messages_stored": stored,
        "seconds": round(seconds, 3),
        "messages_per_second": round(ok / seconds, 1),
        # CPU of the server process (all threads) per message: less sensitive to a busy machine.
        "server_cpu_us_per_msg": {
            "user": round((ru1.ru_utime - ru0.ru_utime) / max(1, ok) * 1e6),
            "sys": round((ru1.ru_stime - ru0.ru_stime) / max(1, ok) * 1e6),
        },
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "durable": not sink,
        "event_loop": type(asyncio.get_running_loop()).__module__,
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--connections", type=int, default=10)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--sink", action="store_true", help="skip the store write: measures the SMTP layer alone")
    args = p.parse_args(argv)
    if not args.no_uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
    with tempfile.TemporaryDirectory(prefix="postfach-bench-") as d:
        result = asyncio.run(run(args.messages, args.connections, args.size, Path(d), sink=args.sink))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
