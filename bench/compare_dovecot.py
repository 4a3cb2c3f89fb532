"""``make bench COMPARE=dovecot``: the same IMAP and POP3 loads against Dovecot (issue 7, item 2).

Installs Dovecot from Debian when missing (``apt-get install dovecot-imapd dovecot-pop3d``, needs
root or sudo), configures it in a temporary directory on loopback high ports with implicit TLS
(the same kind of self-signed certificate postfach uses), a passdb from a passwd-file with the
same accounts and password as ``bench/load/scale.py``, Maildir storage, and fills every mailbox
with the same messages over IMAP APPEND. Then it runs the same load generators
(``bench/load/aimap.py``) at the same client counts. Dovecot runs in its high-performance mode
(``service_count = 0`` login processes), as its documentation recommends for benchmarks; its
``mail_fsync`` stays at the default (``optimized``).

    PYTHONPATH=src .venv/bin/python bench/compare_dovecot.py [--quick]

Prints one JSON object with ``dovecot_``-prefixed figures as its last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from bench.load import aimap  # noqa: E402
from bench.load.scale import PASSWORD, USERS, measure_imap, measure_pop3  # noqa: E402


def ensure_installed() -> str:
    exe = shutil.which("dovecot") or ("/usr/sbin/dovecot" if Path("/usr/sbin/dovecot").exists() else None)
    if exe:
        return exe
    print("installing Dovecot from Debian (dovecot-imapd dovecot-pop3d) ...", file=sys.stderr)
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "dovecot-imapd", "dovecot-pop3d"], check=True, env=env)
    # the package starts a system instance on the standard ports; the bench runs its own
    subprocess.run([*sudo, "service", "dovecot", "stop"], check=False, capture_output=True)
    return shutil.which("dovecot") or "/usr/sbin/dovecot"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def configure(d: Path, users: list[str], password: str) -> tuple[Path, dict[str, int]]:
    from postfach.net.tls import generate_self_signed

    cert, key = d / "cert.pem", d / "key.pem"
    generate_self_signed("localhost", cert, key)
    for sub in ("run", "state", "mail"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "passwd").write_text("".join(f"{u}:{{PLAIN}}{password}::::::\n" for u in users))
    ports = {"imaps": free_port(), "pop3s": free_port()}
    mail_user = "nobody"
    mail_group = "nogroup"
    shutil.chown(d / "mail", mail_user, mail_group)
    os.chmod(d, 0o755)
    conf = d / "dovecot.conf"
    conf.write_text(f"""
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap pop3
listen = 127.0.0.1
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = plain login
mail_location = maildir:{d}/mail/%d/%n
mail_max_userip_connections = 10000
default_client_limit = 10000
default_process_limit = 1000
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/passwd
}}
userdb {{
  driver = static
  args = uid={mail_user} gid={mail_group} home={d}/mail/%d/%n
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {ports["imaps"]}
    ssl = yes
  }}
  service_count = 0
  process_min_avail = 2
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {ports["pop3s"]}
    ssl = yes
  }}
  service_count = 0
  process_min_avail = 2
}}
service imap {{
  process_limit = 2000
}}
service pop3 {{
  process_limit = 2000
}}
""")
    return conf, ports


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"dovecot does not listen on {port}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    levels = [1, 10, 50] if args.quick else [1, 10, 50, 200]
    seconds = 4.0 if args.quick else 15.0
    exe = ensure_installed()
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="postfach-dovecot-") as tmp:
        d = Path(tmp)
        conf, ports = configure(d, USERS, PASSWORD)
        proc = subprocess.Popen([exe, "-F", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_port(ports["imaps"])
            wait_port(ports["pop3s"])
            cafile = str(d / "cert.pem")
            print(f"Dovecot {version}: filling {len(USERS)} mailboxes over IMAP ...", file=sys.stderr)

            async def fill() -> None:
                sem = asyncio.Semaphore(8)

                async def one(u: str) -> None:
                    async with sem:
                        await aimap.load_mailbox("127.0.0.1", ports["imaps"], cafile, u, PASSWORD,
                                                 aimap.USER_MESSAGES)

                await asyncio.gather(*(one(u) for u in USERS))

            asyncio.run(fill())
            figures.update(measure_imap("dovecot_", ports["imaps"], cafile, USERS, PASSWORD, levels, seconds, None))
            figures.update(measure_pop3("dovecot_", ports["pop3s"], cafile, USERS, PASSWORD, 10, seconds, None))
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log = d / "dovecot.log"
            if log.exists():
                errors = [ln for ln in log.read_text(errors="replace").splitlines() if "Error" in ln or "Fatal" in ln]
                if errors:
                    print("dovecot log errors:\n" + "\n".join(errors[:10]), file=sys.stderr)
    figures["dovecot_version"] = version
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
