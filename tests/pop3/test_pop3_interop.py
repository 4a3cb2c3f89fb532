"""Debian's fetchmail (with ``keep``) and mpop against the POP3 server, over STLS and TLS.

The "leave a copy on the server" contract: the first run downloads all N messages, the second 0,
after one new delivery exactly 1, and a message deleted elsewhere (IMAP) never reappears.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pop3_helpers import PASSWORD, USER, Env, make_env, message, serve

from postfach.types import Uid

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

FETCHMAIL = shutil.which("fetchmail")
MPOP = shutil.which("mpop")


async def _run(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode if proc.returncode is not None else -1, out.decode("utf-8", "replace")


class Client:
    def __init__(self, kind: str, tmp: Path, port: int, implicit: bool, cafile: Path) -> None:
        self.kind, self.tmp, self.port, self.implicit, self.cafile = kind, tmp, port, implicit, cafile
        self.inbox = tmp / "delivered"
        for sub in ("new", "cur", "tmp"):
            (self.inbox / sub).mkdir(parents=True, exist_ok=True)
        self.env = {"HOME": str(tmp), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}

    def delivered(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted((self.inbox / "new").iterdir())]

    def _fetchmail_argv(self) -> list[str]:
        rc = self.tmp / "fetchmailrc"
        tls = "ssl" if self.implicit else "sslproto 'tls1.2+'"
        mda = f"/bin/sh -c 'cat > {self.inbox}/new/msg.$$'"
        rc.write_text(
            "set no bouncemail\n"
            "set no syslog\n"
            f'poll 127.0.0.1 service {self.port} protocol POP3 uidl timeout 60\n'
            f'  user "{USER}" there with password "{PASSWORD}" is "tester" here\n'
            f"  keep {tls} sslcertck sslcertfile '{self.cafile}' sslcommonname 'mail.example.org'\n"
            f'  mda "{mda}"\n'
        )
        rc.chmod(0o600)
        self.env["FETCHMAILHOME"] = str(self.tmp)
        # Its own lock file: as root fetchmail locks /var/run/fetchmail.pid, shared with every other
        # fetchmail on the machine (a parallel test, another checkout's run).
        ids, pidfile = str(self.tmp / "ids"), str(self.tmp / "fetchmail.pid")
        return [FETCHMAIL or "fetchmail", "-f", str(rc), "-N", "--idfile", ids, "--pidfile", pidfile, "-v"]

    def _mpop_argv(self) -> list[str]:
        rc = self.tmp / "mpoprc"
        rc.write_text(
            "defaults\n"
            "tls on\n"
            f"tls_starttls {'off' if self.implicit else 'on'}\n"
            f"tls_trust_file {self.cafile}\n"
            "tls_host_override mail.example.org\n"
            "account test\n"
            "host 127.0.0.1\n"
            f"port {self.port}\n"
            f"user {USER}\n"
            f"password {PASSWORD}\n"
            "auth plain\n"
            "keep on\n"
            "only_new on\n"
            f"uidls_file {self.tmp / 'mpop_uidls'}\n"
            f"delivery maildir {self.inbox}\n"
        )
        rc.chmod(0o600)
        return [MPOP or "mpop", "-C", str(rc), "test"]

    async def run(self) -> int:
        """One download run; returns how many new messages arrived."""
        before = len(self.delivered())
        argv = self._fetchmail_argv() if self.kind == "fetchmail" else self._mpop_argv()
        code, out = await _run(argv, self.env)
        # fetchmail: 0 = mail retrieved, 1 = no mail; mpop: 0 = success.
        ok = code in (0, 1) if self.kind == "fetchmail" else code == 0
        assert ok, f"{self.kind} exited {code}:\n{out}"
        return len(self.delivered()) - before


def _cafile(env: Env, tmp: Path) -> Path:
    path = tmp / "ca.pem"
    env.ca.cert_pem.write_to_path(str(path))
    return path


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["fetchmail", "mpop"])
@pytest.mark.parametrize("implicit", [False, True], ids=["stls", "tls"])
async def test_leave_on_server(kind: str, implicit: bool, tmp_path: Path) -> None:
    if (FETCHMAIL if kind == "fetchmail" else MPOP) is None:
        pytest.skip(f"{kind} is not installed (Debian package {kind})")
    env = await make_env(tmp_path)
    try:
        n = 4
        uids = [await env.append(message(i)) for i in range(1, n + 1)]
        client_dir = tmp_path / "client"
        client_dir.mkdir()
        async with serve(env, implicit_tls=implicit) as port:
            client = Client(kind, client_dir, port, implicit, _cafile(env, tmp_path))
            assert await client.run() == n
            got = client.delivered()
            for i in range(1, n + 1):
                assert any(b"Subject: message %d\r\n" % i in g.replace(b"\r\n", b"\n").replace(
                    b"\n", b"\r\n") for g in got), f"message {i} missing"
            assert await client.run() == 0
            await env.append(message(n + 1))
            assert await client.run() == 1
            # Deleted through IMAP (the store call IMAP's EXPUNGE makes), then one new delivery.
            await env.store.delete_messages(env.account_id, env.inbox_id, [Uid(uids[0])])
            await env.append(message(n + 2))
            assert await client.run() == 1
            assert await client.run() == 0
        # "keep": everything except the IMAP-deleted message is still on the server.
        left = await env.store.list_messages(env.account_id, env.inbox_id)
        assert len(left) == n + 1
    finally:
        await env.store.close()
