"""``postfach serve --workers N``: one supervisor process, N worker processes, one store.

Python runs one core per process; an IMAP server under load saturates it. The supervisor binds
every listener, accepts every connection and hands it (the file descriptor, over a Unix socket
pair, ``SCM_RIGHTS``) to the worker with the fewest open connections. Why not ``SO_REUSEPORT``
in each worker: the kernel spreads connections by a hash of the addresses, blind to load, so ten
long-lived IMAP sessions often land 7/3; and the connections queued on a worker's socket are reset
when that worker dies. Why not inherited listening sockets: every idle worker wakes for each
connection and the first one awake takes the whole burst (libuv accepts until EAGAIN), so a burst
of logins lands on one process. Handing over costs one ``sendmsg`` per connection (connections
are long-lived; a worker then owns it, TLS handshake included), balances by load, keeps the
backlog in the supervisor when a worker restarts, and works with port 0.

The same socket pair carries the store's change feed: a worker's SQLite store publishes the
changes it committed (``SqliteStore.set_change_relay``), the supervisor fans them out, and each
other worker injects them into its own feed (``inject_changes``), so IMAP IDLE/NOTIFY and POP3 in
every worker hear of a delivery through any other within milliseconds. (PostgreSQL already has
LISTEN/NOTIFY between processes and nodes; its store is not relayed.) Messages are pickles between
processes of one installation started by the supervisor itself (a private socket pair).

The supervisor restarts a worker that dies (backoff 0.25 s doubling to 10 s), gives up with exit
status 1 when a worker fails three times in a row before it was ever ready (a bad certificate, a
store it cannot open), forwards SIGHUP (certificate reload) and on SIGTERM/SIGINT stops accepting,
forwards SIGTERM (each worker drains its sessions) and waits for them. Worker 0 runs the
singletons (queue runner, quota warnings, backup); every worker runs listeners' protocols, DKIM
signing and inbound checks. Log lines carry ``sup`` or ``w<i>`` before the connection id.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import os
import pickle
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from postfach import log as plog
from postfach.config import Config, ListenerConfig
from postfach.imap.counts import ACCOUNT_COUNTS_KEY, AccountCounts, bump
from postfach.types import AccountId

log = logging.getLogger("postfach.supervisor")

_HEADER = struct.Struct("!I")
#: Changes with more UIDs than this travel without them (the UIDs are a hint; subscribers re-read).
_MAX_RELAYED_UIDS = 20_000
_START_FAILURES = 3  # consecutive failures of a worker before it was ever ready: give up
_BACKOFF_FIRST = 0.25
_BACKOFF_MAX = 10.0
_STABLE_SECONDS = 30.0  # a worker that ran this long starts the backoff afresh when it dies


# ------------------------------------------------------------------------------------- channel
class Channel:
    """Length-prefixed pickles over a non-blocking Unix stream socket, with file descriptors
    passed beside them (each "conn" message carries one, sent with its first byte; the kernel
    delivers a descriptor no later than that byte, so a FIFO of received descriptors pairs
    them up). Runs on the event loop; ``on_message(obj, fd)`` is called for each message."""

    def __init__(
        self,
        sock: socket.socket,
        on_message: Callable[[Any, int | None], None],
        on_close: Callable[[], None],
    ) -> None:
        self.sock = sock
        sock.setblocking(False)
        self._on_message = on_message
        self._on_close = on_close
        self._buf = bytearray()
        self._fds: collections.deque[int] = collections.deque()
        self._out: collections.deque[tuple[memoryview, list[socket.socket]]] = collections.deque()
        self._writing = False
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def send(self, obj: Any, conn: socket.socket | None = None) -> None:
        """Queue one message (and hand over ``conn``, closed here once sent)."""
        if self.closed:
            if conn is not None:
                conn.close()
            return
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        self._out.append((memoryview(_HEADER.pack(len(data)) + data), [conn] if conn is not None else []))
        if not self._writing:
            self._flush()

    def _flush(self) -> None:
        while self._out:
            frame, conns = self._out[0]
            try:
                fds = [c.fileno() for c in conns]
                n = socket.send_fds(self.sock, [frame], fds) if fds else self.sock.send(frame)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()
                return
            for c in conns:
                c.close()  # the peer has its own copy now
            if n < len(frame):
                self._out[0] = (frame[n:], [])
                break
            self._out.popleft()
        want = bool(self._out)
        if want != self._writing:
            if want:
                self._loop.add_writer(self.sock.fileno(), self._flush)
            else:
                self._loop.remove_writer(self.sock.fileno())
            self._writing = want

    def _readable(self) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 256 * 1024, 8)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        self._fds.extend(fds)
        if not data:
            self.close()
            return
        self._buf += data
        while len(self._buf) >= _HEADER.size:
            (n,) = _HEADER.unpack_from(self._buf)
            if len(self._buf) < _HEADER.size + n:
                break
            obj = pickle.loads(bytes(self._buf[_HEADER.size : _HEADER.size + n]))
            del self._buf[: _HEADER.size + n]
            fd = self._fds.popleft() if isinstance(obj, tuple) and obj and obj[0] == "conn" and self._fds else None
            try:
                self._on_message(obj, fd)
            except Exception:
                log.exception("handling %r from the other side failed", obj[0] if isinstance(obj, tuple) else obj)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self.sock.fileno())
        if self._writing:
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self.sock.fileno())
            self._writing = False
        for _frame, conns in self._out:
            for c in conns:
                c.close()
        self._out.clear()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self.sock.close()
        self._on_close()


def _slim(changes: list[Any]) -> list[Any]:
    out = []
    for ch in changes:
        if len(ch.uids) > _MAX_RELAYED_UIDS:
            ch = type(ch)(ch.account_id, ch.kind, ch.mailbox_id, ch.modseq, (), ch.name)
        out.append(ch)
    return out


# -------------------------------------------------------------------------------- worker side
OnConnect = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class WorkerLink:
    """A worker's end: takes the connections the supervisor hands over, relays store changes."""

    def __init__(self, sock: socket.socket, index: int, lost: Callable[[], None]) -> None:
        self.index = index
        self._listeners: list[tuple[ListenerConfig, OnConnect, ssl.SSLContext | None, ProxySettings | None]] = []
        self._store: Any = None
        self._ctx: Any = None
        self._handshake_timeout: float = 30.0
        self._accepting = True
        self._lost = lost
        self._tasks: set[asyncio.Task[None]] = set()
        self.channel = Channel(sock, self._message, self._closed)

    # called by Server
    def register(
        self,
        lst: ListenerConfig,
        on_connect: OnConnect,
        ssl_ctx: ssl.SSLContext | None,
        proxy: ProxySettings | None = None,
    ) -> None:
        """``proxy``: the listener takes a PROXY header first (before TLS); its trusted networks
        and header timeout. ``on_connect`` then also gets the parsed header."""
        self._listeners.append((lst, on_connect, ssl_ctx, proxy))

    def attach(self, ctx: Any) -> None:
        self._ctx = ctx
        if self.index != 0:
            # The queue runner lives in worker 0: mail queued here wakes it through the supervisor
            # (else it would wait for the runner's next scan, up to 5 s).
            ctx.services["queue"] = _RemoteQueue(self)
        self._handshake_timeout = float(ctx.config.limits.tls_handshake_timeout_seconds)
        counts = ctx.services.setdefault(ACCOUNT_COUNTS_KEY, AccountCounts())
        if isinstance(counts, AccountCounts):
            # max_connections_per_account counts the sessions of every worker.
            counts.set_relay(lambda account_id, delta: self.channel.send(("acct", int(account_id), delta)))
        auth = getattr(ctx, "auth", None)
        if auth is not None and hasattr(auth, "set_relay"):
            # Login failures count over all workers (throttling, lockout), as in one process.
            auth.set_relay(lambda event: self.channel.send(("auth", event)))
        store = ctx.store
        if hasattr(store, "set_change_relay") and hasattr(store, "inject_changes"):
            self._store = store
            store.set_change_relay(lambda changes: self.channel.send(("changes", _slim(changes))))

    def ready(self) -> None:
        self.channel.send(("ready", os.getpid(), len(self._listeners)))

    def stop_accepting(self) -> None:
        self._accepting = False
        self.channel.send(("draining",))

    # messages from the supervisor
    def _message(self, obj: Any, fd: int | None) -> None:
        kind = obj[0]
        if kind == "conn":
            if fd is None:
                return
            conn = socket.socket(fileno=fd)
            index, cid = int(obj[1]), obj[2]
            if not self._accepting or index >= len(self._listeners):
                conn.close()
                self.channel.send(("closed", cid))
                return
            task = asyncio.get_running_loop().create_task(self._serve(conn, cid, *self._listeners[index]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif kind == "changes" and self._store is not None:
            self._store.inject_changes(obj[1])
        elif kind in ("acct", "acct-gone", "acct-snapshot") and self._ctx is not None:
            counts = self._ctx.services.get(ACCOUNT_COUNTS_KEY)
            if isinstance(counts, AccountCounts):
                if kind == "acct":
                    counts.apply_remote(int(obj[1]), AccountId(int(obj[2])), int(obj[3]))
                elif kind == "acct-gone":
                    counts.forget_worker(int(obj[1]))
                else:
                    counts.replace_remote(obj[1])
        elif kind == "auth" and self._ctx is not None:
            auth = getattr(self._ctx, "auth", None)
            if auth is not None and hasattr(auth, "apply_remote"):
                auth.apply_remote(tuple(obj[1]))
        elif kind == "wake-queue" and self._ctx is not None:
            queue = self._ctx.services.get("queue")
            if queue is not None and not isinstance(queue, _RemoteQueue):
                queue.wake()

    def _closed(self) -> None:
        if self._accepting:
            log.error("lost the supervisor; stopping")
            self._accepting = False
            self._lost()

    async def _serve(
        self,
        conn: socket.socket,
        cid: int,
        lst: ListenerConfig,
        on_connect: OnConnect,
        ssl_ctx: ssl.SSLContext | None,
        proxy: ProxySettings | None,
    ) -> None:
        """What ``asyncio.start_server`` does for an accepted socket, then the listener's callback."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        if proxy is not None:
            await self._serve_proxied(conn, cid, lst, on_connect, ssl_ctx, proxy, done)
            return

        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await on_connect(reader, writer)
            finally:
                if not done.done():
                    done.set_result(None)

        try:
            conn.setblocking(False)
            reader = asyncio.StreamReader(limit=2**16, loop=loop)
            protocol = asyncio.StreamReaderProtocol(reader, client, loop=loop)
            await loop.connect_accepted_socket(
                lambda: protocol,
                conn,
                ssl=ssl_ctx,
                ssl_handshake_timeout=self._handshake_timeout if ssl_ctx is not None else None,
            )
            await done
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            logging.getLogger("postfach.access").info("handed-over connection failed before its session: %s", exc)
            with contextlib.suppress(OSError):
                conn.close()
        finally:
            self.channel.send(("closed", cid))


    async def _serve_proxied(
        self,
        conn: socket.socket,
        cid: int,
        lst: ListenerConfig,
        on_connect: Any,
        ssl_ctx: ssl.SSLContext | None,
        proxy: ProxySettings,
        done: asyncio.Future[None],
    ) -> None:
        """A PROXY listener's connection: the header (from a trusted balancer) before TLS, as
        ``net.proxy_listener.ProxyListener`` does in a single process."""
        from postfach.net.proxy_listener import admit

        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, header: Any) -> None:
            try:
                await on_connect(reader, writer, header)
            finally:
                if not done.done():
                    done.set_result(None)

        try:
            conn.setblocking(False)
            try:
                addr = conn.getpeername()
            except OSError:
                conn.close()
                return
            started = await admit(
                conn, addr, client, name=lst.describe(), trusted_networks=proxy.trusted_networks,
                header_timeout=proxy.header_timeout, ssl_context=ssl_ctx,
                ssl_handshake_timeout=self._handshake_timeout if ssl_ctx is not None else None,
            )
            if started:
                await done
        finally:
            self.channel.send(("closed", cid))


@dataclass(frozen=True)
class ProxySettings:
    trusted_networks: tuple[str, ...]
    header_timeout: float


class _RemoteQueue:
    """``ctx.services["queue"]`` in workers other than 0: only ``wake`` is called there."""

    def __init__(self, link: WorkerLink) -> None:
        self._link = link

    def wake(self) -> None:
        self._link.channel.send(("wake-queue",))


def worker_main(fd: int, index: int) -> int:
    """The ``postfach.supervisor --worker`` process: read the config, run a Server."""
    from postfach.server import Server

    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    header = _recv_exact(sock, _HEADER.size)
    config: Config = pickle.loads(_recv_exact(sock, _HEADER.unpack(header)[0]))
    plog.process_tag = f"w{index}"
    plog.setup(config.logging)
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run

    async def main() -> None:
        server: Server

        def lost() -> None:
            server.request_stop()

        link = WorkerLink(sock, index, lost)
        server = Server(config, worker=index, link=link)
        task = asyncio.create_task(server.run())
        ready = asyncio.create_task(server.ready.wait())
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if server.ready.is_set():
            log.info("worker %d ready (pid %d)", index, os.getpid())
            link.ready()
        ready.cancel()
        await task
        link.channel.close()

    try:
        runner(main())
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        log.error("worker %d failed: %s: %s", index, type(exc).__name__, exc)
        return 1
    return 0


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the supervisor went away")
        buf += chunk
    return bytes(buf)


# ---------------------------------------------------------------------------- supervisor side
@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    channel: Channel | None = None
    ready: bool = False
    conns: set[int] = field(default_factory=set)  # ids of connections handed over, not yet closed
    started: float = 0.0
    ever_ready: bool = False
    start_failures: int = 0
    crashes: int = 0  # consecutive, for the backoff
    restart_at: float | None = None
    pid: int = 0
    # Logged-in IMAP sessions per account in this worker (its "acct" events), for the snapshot a
    # (re)started worker gets; dropped when the worker dies (its sessions died with it).
    accounts: dict[int, int] = field(default_factory=dict)


@dataclass
class _Bound:
    config: ListenerConfig
    socks: list[socket.socket]
    port: int


class Supervisor:
    def __init__(
        self, config: Config, workers: int, *, drain_seconds: float = 10.0, print_settings: bool = True
    ) -> None:
        self.config = config
        self.print_settings = print_settings
        self.ready = asyncio.Event()  # every worker was ready once (the client settings are printed)
        self.n = workers
        self.drain_seconds = drain_seconds
        self.workers = [_Worker(i) for i in range(workers)]
        self.listeners: list[_Bound] = []
        self._stopping = False
        self._accepting = False
        self._failed: str | None = None
        self._wake = asyncio.Event()
        self._announced = False
        # max_connections_per_ip over all workers: the supervisor sees every connection
        self._per_ip: dict[str, int] = {}
        self._conn_ip: dict[int, str] = {}
        self._cids = itertools.count(1)

    # --- listening sockets ---------------------------------------------------------------------
    def _bind(self) -> None:
        for lst in self.config.listeners:
            host: str | None = None if lst.address in ("", "*", "::", "0.0.0.0") else lst.address
            family = socket.AF_INET if lst.address == "0.0.0.0" else socket.AF_UNSPEC
            infos = socket.getaddrinfo(host, lst.port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
            socks: list[socket.socket] = []
            port = lst.port
            seen: set[Any] = set()
            for fam, stype, proto, _canon, addr in infos:
                if (fam, addr[0]) in seen:
                    continue
                seen.add((fam, addr[0]))
                s = socket.socket(fam, stype, proto)
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if fam == socket.AF_INET6:
                        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    s.bind((addr[0], port, *addr[2:]))
                    s.listen(512)
                    s.setblocking(False)
                except OSError as exc:
                    s.close()
                    for t in socks:
                        t.close()
                    raise OSError(exc.errno, f"cannot listen on {lst.describe()}: {exc.strerror}") from None
                if port == 0:
                    port = s.getsockname()[1]
                socks.append(s)
            self.listeners.append(_Bound(lst, socks, port))
            log.info("listening: %s on %s port %d (%s%s)", lst.protocol, lst.address or "*", port, lst.tls,
                     ", PROXY" if lst.proxy_protocol else "")

    def _set_accepting(self, on: bool) -> None:
        if on == self._accepting:
            return
        loop = asyncio.get_running_loop()
        for k, b in enumerate(self.listeners):
            for s in b.socks:
                if on:
                    loop.add_reader(s.fileno(), self._accept, s, k)
                else:
                    loop.remove_reader(s.fileno())
        self._accepting = on

    def _accept(self, lsock: socket.socket, index: int) -> None:
        for _ in range(64):
            ready = [w for w in self.workers if w.ready and w.channel is not None and not w.channel.closed]
            if not ready:
                self._set_accepting(False)  # connections wait in the backlog for a worker
                return
            try:
                conn, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: leave it in the backlog a moment
                log.warning("accept failed: %s", exc)
                return
            ip = str(addr[0])
            if ip.startswith("::ffff:"):
                ip = ip[7:]
            if self.listeners[index].config.proxy_protocol:
                # The peer is the load balancer; the real client is known only after the PROXY
                # header, in the worker, which applies the cap per process.
                ip = ""
            if ip and self._per_ip.get(ip, 0) >= self.config.limits.max_connections_per_ip:
                self._refuse(conn, ip, self.listeners[index].config)
                continue
            cid = next(self._cids)
            if ip:
                self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
                self._conn_ip[cid] = ip
            w = min(ready, key=lambda x: (len(x.conns), x.index))
            w.conns.add(cid)
            assert w.channel is not None
            w.channel.send(("conn", index, cid), conn)

    def _refuse(self, conn: socket.socket, ip: str, lst: ListenerConfig) -> None:
        """Over max_connections_per_ip (counted over every worker): the protocol's busy reply
        where the connection starts in plain text, as the single process does (server.py)."""
        from postfach.server import _BUSY

        logging.getLogger("postfach.access").warning("refused %s: over max_connections_per_ip", ip)
        if lst.tls != "implicit":
            with contextlib.suppress(OSError):
                conn.setblocking(False)
                conn.send(_BUSY[lst.protocol])
        conn.close()

    def _release(self, w: _Worker, cid: int) -> None:
        w.conns.discard(cid)
        ip = self._conn_ip.pop(cid, None)
        if ip is not None:
            n = self._per_ip.get(ip, 0) - 1
            if n > 0:
                self._per_ip[ip] = n
            else:
                self._per_ip.pop(ip, None)

    # --- workers -------------------------------------------------------------------------------
    def _spawn(self, w: _Worker) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cmd = [sys.executable, "-m", "postfach.supervisor", "--worker", str(w.index), "--fd", str(child.fileno())]
        try:
            w.proc = subprocess.Popen(cmd, pass_fds=[child.fileno()], close_fds=True)
        finally:
            child.close()
        w.pid = w.proc.pid
        w.started = time.monotonic()
        w.ready = False
        w.ever_ready = False
        for cid in list(w.conns):
            self._release(w, cid)
        w.restart_at = None
        parent.setblocking(True)
        data = pickle.dumps(self.config, protocol=pickle.HIGHEST_PROTOCOL)
        parent.sendall(_HEADER.pack(len(data)) + data)
        w.channel = Channel(parent, functools.partial(self._message, w), functools.partial(self._channel_closed, w))
        log.info("worker %d started (pid %d)", w.index, w.pid)

    def _message(self, w: _Worker, obj: Any, fd: int | None) -> None:
        if fd is not None:
            os.close(fd)
        kind = obj[0]
        if kind == "ready":
            # What the other workers' sessions hold, for this (re)started worker's account caps.
            snapshot = {o.index: dict(o.accounts) for o in self.workers if o is not w and o.accounts}
            if w.channel is not None and not w.channel.closed:
                w.channel.send(("acct-snapshot", snapshot))
            w.ready = True
            w.ever_ready = True
            w.start_failures = 0
            if not self._stopping:
                self._set_accepting(True)
            self._wake.set()
        elif kind == "closed":
            self._release(w, obj[1])
        elif kind == "draining":
            w.ready = False
        elif kind == "wake-queue":
            first = self.workers[0]
            if first.channel is not None and not first.channel.closed:
                first.channel.send(obj)
        elif kind == "acct":
            aid, delta = int(obj[1]), int(obj[2])
            bump(w.accounts, aid, delta)
            self._to_others(w, ("acct", w.index, aid, delta))
        elif kind in ("changes", "auth"):
            self._to_others(w, obj)

    def _to_others(self, w: _Worker, obj: Any) -> None:
        for other in self.workers:
            if other is not w and other.channel is not None and not other.channel.closed:
                other.channel.send(obj)

    def _channel_closed(self, w: _Worker) -> None:
        w.ready = False
        self._wake.set()

    def _reap(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.proc is None or w.proc.poll() is None:
                continue
            code = w.proc.returncode
            if w.channel is not None:
                w.channel.close()
                w.channel = None
            w.proc = None
            w.ready = False
            for cid in list(w.conns):  # its connections died with it
                self._release(w, cid)
            if w.accounts:  # and its sessions: the others stop counting them
                w.accounts.clear()
                self._to_others(w, ("acct-gone", w.index))
            if self._stopping:
                log.info("worker %d (pid %d) exited with status %s", w.index, w.pid, code)
                continue
            how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            if not w.ever_ready:
                w.start_failures += 1
                if w.start_failures >= _START_FAILURES:
                    self._failed = f"worker {w.index} failed {w.start_failures} times at start ({how}); giving up"
                    self._wake.set()
                    return
            w.crashes = 1 if now - w.started > _STABLE_SECONDS else w.crashes + 1
            delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** (w.crashes - 1))
            w.restart_at = now + delay
            log.error("worker %d (pid %d) died (%s); restarting in %.2f s", w.index, w.pid, how, delay)

    def _announce(self) -> None:
        if self._announced or not all(w.ready for w in self.workers):
            return
        self._announced = True
        from postfach.server import client_settings

        bound = {(b.config.protocol, b.config.tls): b.port for b in self.listeners}
        log.info("ready (%d workers, %d listeners)", self.n, len(self.listeners))
        if self.print_settings:
            print(client_settings(self.config, bound=bound), flush=True)
        self.ready.set()

    def port_of(self, protocol: str, tls: str) -> int:
        for b in self.listeners:
            if b.config.protocol == protocol and b.config.tls == tls:
                return b.port
        raise KeyError((protocol, tls))

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.proc is not None]

    # --- running -------------------------------------------------------------------------------
    def _signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            log.info("SIGHUP: reloading certificates in every worker")
            for w in self.workers:
                if w.proc is not None and w.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w.pid, signal.SIGHUP)
            return
        if not self._stopping:
            log.info("shutting down: stopping the workers")
            self._stopping = True
            self._wake.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._bind()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._signal, sig)
        try:
            for w in self.workers:
                self._spawn(w)
            while not self._stopping and self._failed is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.1)
                self._wake.clear()
                self._reap()
                now = time.monotonic()
                for w in self.workers:
                    if w.proc is None and w.restart_at is not None and now >= w.restart_at and self._failed is None:
                        self._spawn(w)
                self._announce()
            return await self._shutdown()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def _shutdown(self) -> int:
        self._set_accepting(False)
        for b in self.listeners:
            for s in b.socks:
                s.close()
        sig = signal.SIGKILL if self._failed else signal.SIGTERM
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, sig)
        deadline = time.monotonic() + self.drain_seconds + 10
        while any(w.proc is not None for w in self.workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            self._reap()
        for w in self.workers:
            if w.proc is not None:
                log.error("worker %d (pid %d) did not stop; killing it", w.index, w.pid)
                w.proc.kill()
                w.proc.wait()
        if self._failed:
            log.error("%s", self._failed)
            return 1
        log.info("stopped")
        return 0


def run_supervised(config: Config) -> int:
    """``postfach serve`` with ``[server] workers`` (or ``--workers``) above 1."""
    plog.process_tag = "sup"
    n = config.server.worker_count()
    try:
        # Made once here, so that workers starting together never race to create the SRS secret.
        from postfach.errors import ConfigError
        from postfach.smtp import srs

        srs.load(config)
    except ConfigError as exc:
        print(f"postfach: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(Supervisor(config, n).run())
    except OSError as exc:
        log.error("%s", exc)
        print(f"postfach: {exc}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="a postfach worker process (started by `serve --workers N`)")
    ap.add_argument("--worker", type=int, required=True)
    ap.add_argument("--fd", type=int, required=True)
    args = ap.parse_args(argv)
    return worker_main(args.fd, args.worker)


if __name__ == "__main__":
    sys.exit(_main())
