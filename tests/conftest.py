"""Shared fixtures: a data dir made by the real ``init``, and a real server on loopback.

``live_server`` runs ``postfach.server.Server`` in a thread with its own event loop, listening on
free ports (port 0) for every protocol in both TLS modes, with a real store of the run's backend
(``--store=sqlite|postgres``, tests/backends.py) and a self-signed certificate for ``localhost``.
Blocking clients (imaplib, poplib, smtplib, mbsync, fetchmail, swaks) talk to it from the test
thread; ``server.call(coro_fn)`` runs store work on the server's loop.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import ssl
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
from tests import backends

from postfach.config import AuthConfig, Config, ListenerConfig
from postfach.net.tls import generate_self_signed
from postfach.store.base import Store

T = TypeVar("T")

PASSWORD = "secret-pass-1"
USER = "user@example.org"
OTHER = "other@example.org"

# Cheap hashing in tests (pymap does the same); production defaults are argon2id t=3, m=64 MiB.
FAST_AUTH = AuthConfig(argon2_time_cost=1, argon2_memory_kib=8, argon2_parallelism=1)

_HANDLERS = {
    "imap": "postfach.imap.connection",
    "pop3": "postfach.pop3.connection",
    "submission": "postfach.smtp.connection",
    "mx": "postfach.smtp.connection",
}


def _available(protocol: str) -> bool:
    try:
        importlib.import_module(_HANDLERS[protocol])
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------ the backend switch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--store",
        choices=backends.BACKENDS,
        default=None,
        help=f"store backend for the whole suite (default: ${backends.ENV} or sqlite)",
    )


def pytest_configure(config: pytest.Config) -> None:
    chosen = config.getoption("store") or os.environ.get(backends.ENV) or "sqlite"
    if chosen not in backends.BACKENDS:
        raise pytest.UsageError(f"{backends.ENV}={chosen!r}: expected one of {', '.join(backends.BACKENDS)}")
    os.environ[backends.ENV] = chosen  # helpers, xdist workers and subprocesses read it
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist) names the run
        os.environ[backends.RUN_ENV] = uuid.uuid4().hex[:8]
    config.addinivalue_line("markers", "sqlite_only(reason): about the embedded store only; not in the postgres pass")
    config.addinivalue_line("markers", "postgres_only(reason): about PostgreSQL only; not in the sqlite pass")
    if chosen == "postgres" and not hasattr(config, "workerinput"):
        why = backends.pg_unreachable()
        if why is not None:
            # Asked for explicitly: never a silent green run (`make test` skips the pass itself locally).
            raise pytest.UsageError(f"--store=postgres: PostgreSQL at {backends.PG_SERVER_DSN} is unreachable: {why}")


def pytest_unconfigure(config: pytest.Config) -> None:
    backends.TEST_DB.drop()  # this process's database (atexit drops it too, as a fallback)
    if backends.is_postgres() and not hasattr(config, "workerinput"):
        # Databases of workers that died without dropping theirs; a failure here must not fail the run.
        try:
            left = backends.drop_run_databases(os.environ[backends.RUN_ENV])
        except Exception as exc:
            print(f"could not drop the test run's databases: {exc}", file=sys.__stderr__)
        else:
            if left:
                print(f"dropped databases left by dead test processes: {', '.join(left)}", file=sys.__stderr__)


def pytest_report_header(config: pytest.Config) -> str:
    return f"postfach store backend: {backends.backend()}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    chosen = backends.backend()
    other = {"sqlite": "postgres_only", "postgres": "sqlite_only"}[chosen]
    keep, drop = [], []
    for item in items:
        for name in ("sqlite_only", "postgres_only"):
            m = item.get_closest_marker(name)
            if m is not None and not (m.args and isinstance(m.args[0], str) and m.args[0].strip()):
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{name} needs a one-line reason")
        (drop if item.get_closest_marker(other) is not None else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def _store_follows_the_switch(request: pytest.FixtureRequest) -> Iterator[None]:
    """In the postgres pass, a test that made an embedded store in its tmp_path missed the switch."""
    watch = (
        backends.is_postgres()
        and "tmp_path" in request.fixturenames
        and request.node.get_closest_marker("postgres_only") is None  # may use both on purpose
    )
    tmp: Path | None = request.getfixturevalue("tmp_path") if watch else None  # torn down after this one
    yield
    if tmp is None:
        return
    made = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("meta.sqlite3"))
    assert made == [], f"--store=postgres, yet this test made an embedded store: {made}"


def make_config(data_dir: Path, **overrides: Any) -> Config:
    listeners = []
    for proto in ("imap", "pop3", "submission", "mx"):
        if not _available(proto):
            continue
        modes = ("starttls",) if proto == "mx" else ("starttls", "implicit")
        for mode in modes:
            listeners.append(ListenerConfig(protocol=proto, port=0, address="127.0.0.1", tls=mode))
    cfg = Config(
        hostname="localhost",
        listeners=tuple(listeners),
        auth=FAST_AUTH,
        data_dir=data_dir,
        store=backends.store_config(data_dir),
    )
    return replace(cfg, **overrides) if overrides else cfg


@dataclass
class LiveServer:
    config: Config
    server: Any
    loop: asyncio.AbstractEventLoop
    cafile: Path

    @property
    def store(self) -> Store:
        assert self.server.ctx is not None
        store: Store = self.server.ctx.store
        return store

    def port(self, protocol: str, tls: str = "starttls") -> int:
        port: int = self.server.port_of(protocol, tls)
        return port

    def call(self, fn: Callable[[Store], Awaitable[T]], timeout: float = 30) -> T:
        """Run ``fn(store)`` on the server's loop and wait for its result."""
        fut: Future[T] = asyncio.run_coroutine_threadsafe(_wrap(fn, self.store), self.loop)
        return fut.result(timeout)

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.cafile))
        return ctx


async def _wrap(fn: Callable[[Store], Awaitable[T]], store: Store) -> T:
    return await fn(store)


def start_live_server(data_dir: Path, **overrides: Any) -> tuple[LiveServer, threading.Thread]:
    from postfach.auth import make_hasher
    from postfach.server import Server

    data_dir.mkdir(parents=True, exist_ok=True)
    config = make_config(data_dir, **overrides)
    cert, key = config.path(config.tls.cert), config.path(config.tls.key)
    if not cert.exists():
        generate_self_signed("localhost", cert, key)
    # The loop production runs (`postfach serve` uses uvloop where installed).
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop = asyncio.new_event_loop()
    server = Server(config)
    started = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def main() -> None:
            task = asyncio.create_task(server.run(install_signals=False, drain_seconds=3))
            ready = asyncio.create_task(server.ready.wait())
            await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
            started.set()
            ready.cancel()
            await task

        try:
            loop.run_until_complete(main())
        except BaseException as e:  # surfaced to the test below
            errors.append(e)
            started.set()
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="postfach-live-server", daemon=True)
    thread.start()
    started.wait(60)
    if errors:
        raise errors[0]
    live = LiveServer(config=config, server=server, loop=loop, cafile=cert)
    hasher = make_hasher(config.auth)

    async def setup(store: Store) -> None:
        if await store.get_domain("example.org") is None:
            await store.add_domain("example.org")
        for addr in (USER, OTHER):
            if await store.get_account(addr) is None:
                await store.create_account(addr, hasher.hash(PASSWORD))

    live.call(setup)
    return live, thread


def stop_live_server(live: LiveServer, thread: threading.Thread) -> None:
    live.server.request_stop()
    thread.join(30)


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[LiveServer]:
    live, thread = start_live_server(tmp_path / "data")
    try:
        yield live
    finally:
        stop_live_server(live, thread)
