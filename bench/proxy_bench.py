"""What the PROXY protocol costs: new implicit-TLS IMAP connections per second, plain vs PROXY.

    PYTHONPATH=src .venv/bin/python bench/proxy_bench.py [--connections 400] [--quick]

The server (``postfach.server.Server`` on uvloop, embedded store) runs in its own process with two
IMAP listeners on 993-style implicit TLS: an ordinary one and one with ``proxy_protocol = true``
(PROXY listeners run their own accept loop and read the header from the raw socket before the
handshake). One client connects over and over, sends a v2 header where the listener wants one,
does the TLS handshake, reads the greeting and closes; the two listeners are measured in
alternating rounds so that a shared machine's noise hits both alike. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from postfach.config import AuthConfig, Config, ListenerConfig, ProxyConfig
from postfach.net.proxy import build_v2
from postfach.net.tls import generate_self_signed


def _server_main(data_dir: str, ports: Any, ready: Any, stop: Any) -> None:
    import uvloop

    from postfach.server import Server

    cfg = Config(
        hostname="localhost",
        listeners=(
            ListenerConfig(protocol="imap", port=0, tls="implicit"),
            ListenerConfig(protocol="imap", port=0, tls="implicit", proxy_protocol=True),
        ),
        auth=AuthConfig(argon2_time_cost=1, argon2_memory_kib=8, argon2_parallelism=1),
        proxy=ProxyConfig(trusted_networks=("127.0.0.1/32",)),
        data_dir=Path(data_dir),
    )
    server = Server(cfg)

    async def main() -> None:
        task = asyncio.create_task(server.run(install_signals=False, drain_seconds=1))
        await server.ready.wait()
        for b in server.listeners:
            ports[1 if b.config.proxy_protocol else 0] = b.port
        ready.set()
        await asyncio.to_thread(stop.wait)
        server.request_stop()
        await task

    uvloop.run(main())


def _connect(port: int, ctx: ssl.SSLContext, header: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port)) as raw:
        if header:
            raw.sendall(header)
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            greeting = tls.recv(200)
            assert greeting.startswith(b"* OK"), greeting


def bench(connections: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp) / "tls" / "cert.pem", Path(tmp) / "tls" / "key.pem"
        generate_self_signed("localhost", cert, key)
        spawn = mp.get_context("spawn")
        ports = spawn.Array("i", 2)
        ready, stop = spawn.Event(), spawn.Event()
        proc = spawn.Process(target=_server_main, args=(tmp, ports, ready, stop))
        proc.start()
        try:
            if not ready.wait(60):
                raise SystemExit("server did not start")
            ctx = ssl.create_default_context(cafile=str(cert))
            header = build_v2(("203.0.113.25", 40000), ("127.0.0.1", 993))
            spent = {"plain": 0.0, "proxy": 0.0}
            rounds, per_round = 10, max(1, connections // 10)
            for _ in range(rounds):
                for name, port, hdr in (("plain", ports[0], b""), ("proxy", ports[1], header)):
                    t0 = time.perf_counter()
                    for _ in range(per_round):
                        _connect(port, ctx, hdr)
                    spent[name] += time.perf_counter() - t0
            n = rounds * per_round
            plain, proxied = n / spent["plain"], n / spent["proxy"]
            return {
                "connections_each": n,
                "imap_implicit_plain_conn_per_s": round(plain, 1),
                "imap_implicit_proxy_conn_per_s": round(proxied, 1),
                "proxy_overhead_percent": round((plain / proxied - 1) * 100, 1),
            }
        finally:
            stop.set()
            proc.join(30)
            if proc.is_alive():
                proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=400)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(json.dumps(bench(100 if args.quick else args.connections)))


if __name__ == "__main__":
    main()
