"""The outbound queue on two nodes: two QueueRunners, each on its own PostgresStore (node) of one
database, deliver to one remote MX (aiosmtpd): every message arrives exactly once (issue 9)."""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from pathlib import Path

import pytest
from tests.queue.queuehelpers import DnsTestServer, Sink, free_port, make_queue_config
from tests.store.storehelpers import msg, pg_dsn, pg_schema_for

from postfach.auth import Authenticator
from postfach.config import AuthConfig
from postfach.context import ServerContext
from postfach.queue.scheduler import QueueRunner
from postfach.store.base import QueueRecipient
from postfach.store.postgres import PostgresStore

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.asyncio,
    pytest.mark.postgres_only("several nodes share one PostgreSQL database"),
]

MX_IP = "127.0.0.31"


async def test_each_message_delivered_once_by_two_nodes(tmp_path: Path) -> None:
    dsn, schema = pg_dsn(), pg_schema_for(tmp_path)
    with DnsTestServer() as dns:
        dns.set("remote.test", "MX", "10 mx.remote.test.")
        dns.set("mx.remote.test", "A", MX_IP)
        config = make_queue_config(tmp_path, dns, free_port(MX_IP))
        sink = Sink(MX_IP, config.smtp.relay_port).start()
        nodes = [PostgresStore(dsn, schema=schema), PostgresStore(dsn, schema=schema)]
        runners: list[QueueRunner] = []
        n = 40
        try:
            for s in nodes:
                await s.open()
            fast = AuthConfig(argon2_time_cost=1, argon2_memory_kib=8, argon2_parallelism=1)
            for s in nodes:
                ctx = ServerContext(
                    config=config,
                    store=s,
                    auth=Authenticator(s, fast),
                    tls_context=lambda: ssl.create_default_context(ssl.Purpose.CLIENT_AUTH),
                )
                runners.append(QueueRunner(ctx, poll_interval_seconds=0.05))
            await asyncio.gather(*(r.start() for r in runners))
            # items arrive while both nodes poll: they race for every one of them
            for i in range(n):
                await nodes[i % 2].queue_add(
                    "alice@postfach.test", [QueueRecipient(f"r{i}@remote.test")], msg(i, tag="q2n")
                )
                if i % 5 == 4:
                    await asyncio.sleep(0.05)
            deadline = time.monotonic() + 60
            while await nodes[0].queue_list():
                assert time.monotonic() < deadline, "the queue did not drain"
                await asyncio.sleep(0.1)
            for r in runners:
                await r.idle()
        finally:
            for r in runners:
                await r.stop()
            for s in nodes:
                await s.close()
            sink.stop()
    subjects = []
    for rec in sink.received:
        m = re.search(rb"Subject: test q2n(\d+)", rec.data)
        assert m is not None
        subjects.append(int(m.group(1)))
    assert sorted(subjects) == list(range(n))  # each once: none lost, none twice
    assert sum(r.delivered for r in runners) == n
