"""Outbound queue throughput: messages/s from a real SQLite queue to an SMTP sink on loopback.

    PYTHONPATH=src .venv/bin/python bench/queue_bench.py [--messages 2000] [--size 4096]

The sink runs in its own process (a minimal asyncio SMTP server that stores nothing, with
PIPELINING like a real MTA), so it does not share the GIL with the queue. DNS comes from a loopback
dnslib server (tests/dnsserver.py). The figure is messages handed over and accepted (``250``) per
second, measured from the runner's start until the queue is empty: every attempt's result is
recorded durably in the store. Prints one JSON object. Target: at least 300 messages/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dnsserver import DnsTestServer, free_port
from postfach.auth import Authenticator
from postfach.config import AuthConfig, Config, QueueConfig, SmtpConfig
from postfach.context import ServerContext
from postfach.queue.scheduler import QueueRunner
from postfach.store.base import QueueRecipient
from postfach.store.sqlite import SqliteStore

SINK_IP = "127.0.0.1"


def _sink_main(port: int, ready: Any, count: Any) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink.test ESMTP\r\n")
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await reader.readuntil(b"\r\n.\r\n")
                    with count.get_lock():
                        count.value += 1
                    writer.write(b"250 2.0.0 accepted\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    break
                else:
                    writer.write(b"250 2.0.0 ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, SINK_IP, port, limit=1 << 24)
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


async def bench(messages: int, size: int, recipients_per_domain: int) -> dict[str, object]:
    with DnsTestServer() as dns, tempfile.TemporaryDirectory() as tmp:
        port = free_port(SINK_IP)
        ctx_mp = mp.get_context("spawn")
        ready = ctx_mp.Event()
        count = ctx_mp.Value("i", 0)
        sink = ctx_mp.Process(target=_sink_main, args=(port, ready, count), daemon=True)
        sink.start()
        try:
            if not ready.wait(30):
                raise RuntimeError("the sink did not start")
            domains = [f"d{i}.bench.test" for i in range(4)]
            for d in domains:
                dns.add(d, "MX", "10 mx.bench.test.")
            dns.add("mx.bench.test", "A", SINK_IP)
            auth_cfg = AuthConfig(argon2_time_cost=1, argon2_memory_kib=8, argon2_parallelism=1)
            config = Config(
                hostname="bench.postfach.test", data_dir=Path(tmp), auth=auth_cfg,
                smtp=SmtpConfig(dns_nameservers=("127.0.0.1",), dns_port=dns.port, relay_port=port),
                queue=QueueConfig(retry_schedule_seconds=(1,), delay_warning_seconds=0),
            )
            store = SqliteStore(Path(tmp) / "store")
            await store.open()
            try:
                body = b"x" * 76 + b"\r\n"
                t0 = time.perf_counter()
                adds = []
                for i in range(messages):
                    head = (f"From: <sender@bench.postfach.test>\r\nTo: <r{i}@{domains[i % 4]}>\r\n"
                            f"Subject: bench {i}\r\nMessage-ID: <{i}@bench>\r\n\r\n").encode()
                    data = head + body * max(1, (size - len(head)) // len(body))
                    rcpts = [QueueRecipient(f"r{i}.{k}@{domains[i % 4]}") for k in range(recipients_per_domain)]
                    adds.append(store.queue_add("sender@bench.postfach.test", rcpts, data))
                    if len(adds) >= 64:
                        await asyncio.gather(*adds)
                        adds = []
                await asyncio.gather(*adds)
                t_add = time.perf_counter() - t0
                ctx = ServerContext(config=config, store=store, auth=Authenticator(store, auth_cfg),
                                    tls_context=lambda: ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
                runner = QueueRunner(ctx)
                t1 = time.perf_counter()
                cpu1 = time.process_time()
                await runner.start()
                total = messages * recipients_per_domain
                while runner.delivered + runner.bounced < total:  # noqa: ASYNC110 - polling a counter
                    await asyncio.sleep(0.02)
                await runner.idle()  # every attempt recorded in the store
                t_deliver = time.perf_counter() - t1
                cpu = time.process_time() - cpu1
                left = len(await store.queue_list())
                await runner.stop()
            finally:
                await store.close()
            return {
                "benchmark": "queue_outbound",
                "messages": messages,
                "message_bytes": size,
                "recipients_per_message": recipients_per_domain,
                "seconds": round(t_deliver, 3),
                "messages_per_second": round(messages / t_deliver, 1),
                "queue_outbound_msgs_per_s": round(messages / t_deliver, 1),
                "queue_process_cpu_ms_per_message": round(cpu * 1000 / messages, 3),
                "sink_accepted": count.value,
                "delivered": runner.delivered,
                "deferred": runner.deferred,
                "left_in_queue": left,
                "queue_add_per_second": round(messages / t_add, 1),
                "target_messages_per_second": 300,
            }
        finally:
            sink.terminate()
            sink.join(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--recipients", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a short run (500 messages)")
    args = p.parse_args(argv)
    if args.quick:
        args.messages = min(args.messages, 500)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(bench(args.messages, args.size, args.recipients))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
