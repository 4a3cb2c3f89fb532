"""A real ``postfach serve`` in its own process, as an operator runs it.

The data dir is made by ``postfach init --dev``; the listener ports are rewritten to 0 so that the
kernel picks free ones (tests run in parallel) and the bound ports are read back from the log
lines ``listening: <proto> on <addr> port <n> (<tls>)``. Password hashing is made cheap (argon2
t=1, 8 KiB) because load generators log in thousands of times; the hash is still argon2id.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
DOMAIN = "example.org"

_LISTENING = re.compile(r"listening: (\w+) on \S+ port (\d+) \((\w+)\)")
# The client-settings block printed at start-up, used when the log level hides the INFO lines.
_SETTINGS = re.compile(r"\((IMAP|POP3|SMTP)\)\s+server \S+, port (.*)$", re.M)
_SETTINGS_PORT = re.compile(r"(\d+) \((STARTTLS|SSL/TLS|no encryption)\)")
_SETTINGS_NAMES = {"IMAP": "imap", "POP3": "pop3", "SMTP": "submission"}
_SETTINGS_MODES = {"STARTTLS": "starttls", "SSL/TLS": "implicit", "no encryption": "none"}


def parse_ports(text: str) -> dict[tuple[str, str], int]:
    """{(protocol, tls): port} from ``postfach serve`` output."""
    ports = {(m.group(1), m.group(3)): int(m.group(2)) for m in _LISTENING.finditer(text)}
    for m in _SETTINGS.finditer(text):
        for p in _SETTINGS_PORT.finditer(m.group(2)):
            ports.setdefault((_SETTINGS_NAMES[m.group(1)], _SETTINGS_MODES[p.group(2)]), int(p.group(1)))
    return ports

#: Keys put into the [auth] table that ``init`` writes (cheap hashing, no lockout under load).
FAST_AUTH = (
    "argon2_time_cost = 1\nargon2_memory_kib = 8\nargon2_parallelism = 1\n"
    "lockout_failures = 1000000\nfree_failures = 1000000\n"
)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(SRC), *([e["PYTHONPATH"]] if e.get("PYTHONPATH") else [])])
    e["PYTHONUNBUFFERED"] = "1"
    e.pop("PYTHONDONTWRITEBYTECODE", None)
    return e


def postfach(args: Sequence[str], *, data: Path, stdin: str | None = None, timeout: float = 120) -> tuple[int, str]:
    """Run ``python -m postfach <args> --data <data>``; (exit status, stdout+stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "postfach", *args, "--data", str(data)],
        input=stdin,
        capture_output=True,
        text=True,
        env=env(),
        timeout=timeout,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


class ServerProcess:
    """``postfach serve --data DIR`` as a child process; start, SIGKILL, restart, check."""

    def __init__(
        self,
        data: Path,
        *,
        log_level: str = "INFO",
        limits: dict[str, int] | None = None,
        log_dir: Path | None = None,
        workers: int = 1,
        init_args: Sequence[str] = (),
        store_dsn: str | None = None,
    ) -> None:
        self.data = data
        self.store_dsn = store_dsn  # PostgreSQL (``init --store DSN``) instead of the embedded store
        self.workers = workers  # serve --workers N (a supervisor and N worker processes)
        self.init_args = list(init_args)  # more `postfach init` arguments (e.g. --store DSN --schema S)
        self.log_dir = log_dir or data.parent
        self.log_level = log_level
        self.limits = {
            "max_connections_per_ip": 100_000,
            "max_connections_per_account": 100_000,
            "tls_handshake_timeout_seconds": 10,
        }
        self.limits.update(limits or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[tuple[str, str], int] = {}
        self.starts = 0
        self.logs: list[Path] = []

    # --- setting up ---------------------------------------------------------------------------------
    def init(self) -> None:
        """``postfach init --dev`` and the rewrites: ports 0, cheap hashing, limits, log level."""
        store = ["--store", self.store_dsn] if self.store_dsn else []
        rc, out = postfach(["init", "--dev", "--hostname", "localhost", *store, *self.init_args], data=self.data)
        if rc != 0:
            raise RuntimeError(f"postfach init failed ({rc}): {out}")
        cfg = self.data / "postfach.toml"
        text = re.sub(r"port = \d+", "port = 0", cfg.read_text(encoding="utf-8"))
        text = text.replace("[auth]\n", "[auth]\n" + FAST_AUTH, 1)
        text = re.sub(r"\[backup\]\nenabled = true", "[backup]\nenabled = false", text)
        text += "\n[limits]\n" + "".join(f"{k} = {v}\n" for k, v in self.limits.items())
        text += f'\n[logging]\nlevel = "{self.log_level}"\n'
        cfg.write_text(text, encoding="utf-8")

    def provision(self, users: Sequence[str], password: str, *, domain: str = DOMAIN) -> None:
        """Add the domain and the accounts (local parts or full addresses) through the store API.
        Runs while the server is stopped or running (the store lock is shared)."""
        if str(SRC) not in sys.path:
            sys.path.insert(0, str(SRC))
        from postfach import config as cfgmod
        from postfach.auth import make_hasher
        from postfach.store import open_store

        config = cfgmod.load(self.data)
        hashed = make_hasher(config.auth).hash(password)

        async def run() -> None:
            store = open_store(config)
            await store.open()
            try:
                if await store.get_domain(domain) is None:
                    await store.add_domain(domain)
                for u in users:
                    addr = u if "@" in u else f"{u}@{domain}"
                    if await store.get_account(addr) is None:
                        await store.create_account(addr, hashed)
            finally:
                await store.close()

        asyncio.run(run())

    @property
    def cafile(self) -> Path:
        return self.data / "tls" / "cert.pem"

    # --- running ------------------------------------------------------------------------------------
    def start(self, timeout: float = 90, *, python_args: Sequence[str] = ()) -> dict[tuple[str, str], int]:
        """Start ``postfach serve``; return {(protocol, tls): port} once it says it is ready.
        ``python_args`` go before ``-m postfach`` (e.g. a profiler: ``-m pyinstrument -o FILE``)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        log = self.log_dir / f"{self.data.name}-serve-{self.starts}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, *python_args, "-m", "postfach", "serve", "--data", str(self.data),
                 *(["--workers", str(self.workers)] if self.workers != 1 else [])],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env(),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_text(encoding="utf-8", errors="replace")
            if "User name" in text:  # the client settings, printed once every listener is bound
                self.ports = parse_ports(text)
                return self.ports
            if self.proc.poll() is not None:
                raise RuntimeError(f"postfach serve exited with {self.proc.returncode}:\n{text[-4000:]}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"postfach serve not ready after {timeout} s:\n{log.read_text(errors='replace')[-4000:]}")

    def port(self, protocol: str, tls: str = "implicit") -> int:
        return self.ports[(protocol, tls)]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, no flush, as a power cut looks to the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait for the graceful stop; returns the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode

    def check(self) -> tuple[int, str]:
        """``postfach check``: (exit status, output)."""
        return postfach(["check"], data=self.data)

    def log_text(self) -> str:
        return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in self.logs if p.exists())

    def tracebacks(self) -> list[str]:
        """Unexpected-error reports in every log so far (a crash we did not cause)."""
        out = []
        for p in self.logs:
            text = p.read_text(encoding="utf-8", errors="replace")
            for m in re.finditer(r"^.*(?:Traceback \(most recent call last\)|unexpected error).*$", text, re.M):
                out.append(f"{p.name}: {m.group(0)}")
        return out


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (the workers of ``serve --workers N``),
    from /proc (for the "does one process saturate" figure)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return total + sum(cpu_seconds(int(c)) for c in children if c.isdigit())
