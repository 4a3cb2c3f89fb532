"""The ``postfach`` command. ``main(argv) -> int`` is testable without a process.

Bad input gets one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import getpass
import json
import os
import re
import secrets
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from postfach import config as cfgmod
from postfach.auth import make_hasher, password_problem
from postfach.config import Config
from postfach.errors import AlreadyExists, ConfigError, NotFound, NotPermitted, PostfachError, UsageError
from postfach.store.base import Account, Store

T = TypeVar("T")

_LOCAL_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


# ----------------------------------------------------------------------------------- helpers


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"postfach: {message} (see `{self.prog} --help`)\n")


def normalize_domain(name: str) -> str:
    d = name.strip().rstrip(".").lower()
    try:
        d = d.encode("idna").decode("ascii") if any(ord(c) > 127 for c in d) else d
    except UnicodeError:
        raise UsageError(f"{name!r} is not a valid domain name") from None
    labels = d.split(".")
    if len(d) > 253 or len(labels) < 2 or not all(_LABEL_RE.match(lbl) for lbl in labels):
        raise UsageError(f"{name!r} is not a valid domain name (like example.org)")
    return d


def normalize_address(address: str, *, allow_catchall: bool = False) -> str:
    a = address.strip()
    local, at, domain = a.rpartition("@")
    if not at:
        raise UsageError(f"{address!r} is not an email address (like user@example.org)")
    if not local:
        if allow_catchall:
            return "@" + normalize_domain(domain)
        raise UsageError(f"{address!r} is not an email address (like user@example.org)")
    if len(local) > 64 or not _LOCAL_RE.match(local):
        raise UsageError(f"{address!r} is not a valid email address: bad local part {local!r}")
    return f"{local.lower()}@{normalize_domain(domain)}"


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int | None:
    """'500M', '2GiB', '1.5 G', '1048576' -> bytes; 'none'/'unlimited' -> None."""
    if text.strip().lower() in ("none", "unlimited", "0"):
        return None
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"{text!r} is not a size (like 500M, 2G or none)")
    factor = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}[m.group(2).lower()]
    return int(float(m.group(1)) * factor)


def human_size(n: int | None) -> str:
    if n is None:
        return "unlimited"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [len(h) for h in header]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r).rstrip() for r in rows]
    return "\n".join(out)


def data_dir(args: argparse.Namespace) -> Path:
    d = getattr(args, "data", None) or os.environ.get("POSTFACH_DATA") or "./var"
    return Path(d)


def load_config(args: argparse.Namespace) -> Config:
    return cfgmod.load(data_dir(args))


def with_store(config: Config, fn: Callable[[Store], Awaitable[T]]) -> T:
    """Open the store, run ``fn`` and close it again, in a fresh event loop."""
    from postfach.store import open_store

    async def run() -> T:
        store = open_store(config)
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(run())


def read_password(args: argparse.Namespace, min_length: int) -> str:
    if getattr(args, "password_stdin", False):
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise UsageError("no terminal to ask for the password: use --password-stdin")
        password = getpass.getpass("Password: ")
        again = getpass.getpass("Password (again): ")
        if password != again:
            raise UsageError("the two passwords differ")
    problem = password_problem(password, min_length)
    if problem:
        raise UsageError(f"password refused: {problem}")
    return password


def hash_password(config: Config, password: str) -> str:
    return make_hasher(config.auth).hash(password)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ----------------------------------------------------------------------------------- commands


def cmd_init(args: argparse.Namespace) -> int:
    from postfach.net.tls import generate_self_signed

    d = data_dir(args)
    path = cfgmod.config_path(d)
    if path.exists():
        raise UsageError(f"{path} exists already: this data dir is initialised")
    hostname = (args.hostname or ("localhost" if args.dev else _default_hostname())).strip().lower()
    if not re.match(r"^[a-z0-9.-]+$", hostname) or hostname.startswith(("-", ".")):
        raise UsageError(f"{hostname!r} is not a host name")
    schema = getattr(args, "schema", None)
    if schema and not getattr(args, "store", None):
        raise UsageError("--schema names a PostgreSQL schema: it needs --store DSN")
    d.mkdir(parents=True, exist_ok=True)
    text = cfgmod.render_initial(hostname, dev=args.dev, store_dsn=getattr(args, "store", None), store_schema=schema)
    cfg = cfgmod.parse(text, where=str(path), data_dir=d)  # validate what we are about to write
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    cert, key = cfg.path(cfg.tls.cert), cfg.path(cfg.tls.key)
    if not cert.exists():
        generate_self_signed(hostname, cert, key)
    if cfg.smtp.srs:
        from postfach.smtp.srs import create_secret_file

        create_secret_file(cfg.path(cfg.smtp.srs_secret_file))
    with_store(cfg, _noop)
    print(f"Initialised {d} for {hostname}: config {path}, certificate {cert}")
    return 0


async def _noop(store: Store) -> None:
    return None


def _default_hostname() -> str:
    import socket

    name = socket.getfqdn()
    return name if "." in name else "localhost"


def cmd_serve(args: argparse.Namespace) -> int:
    from postfach import log as plog
    from postfach.server import run_forever

    config = load_config(args)
    workers = getattr(args, "workers", None)
    if workers is not None:
        config = dataclasses.replace(config, server=dataclasses.replace(config.server, workers=workers))
    plog.setup(config.logging)
    if config.server.worker_count() > 1:
        from postfach.supervisor import run_supervised

        return run_supervised(config)
    return run_forever(config)


def _workers_arg(text: str) -> int:
    if text == "auto":
        return 0
    if not text.isdigit() or int(text) < 1 or int(text) > 256:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers (1-256) or auto")
    return int(text)


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args)
    from postfach.net.tls import server_context

    server_context(config.path(config.tls.cert), config.path(config.tls.key), config.tls.min_version)
    print(f"{config.source}: OK ({len(config.listeners)} listeners)")
    return 0


# --- domains


def cmd_domain(args: argparse.Namespace) -> int:
    config = load_config(args)
    if args.action == "list":
        domains = with_store(config, lambda s: s.list_domains())
        if args.json:
            _print_json(
                [{"name": d.name, "created": d.created.isoformat(), "quota_bytes": d.quota_bytes} for d in domains]
            )
        else:
            rows = [(d.name, human_size(d.quota_bytes), d.created.strftime("%Y-%m-%d")) for d in domains]
            print(table(rows, ("DOMAIN", "DEFAULT QUOTA", "CREATED")))
        return 0
    if not args.name:
        raise UsageError(f"domain {args.action} needs a domain name")
    name = normalize_domain(args.name)
    if args.action == "add":

        quota = parse_size(args.quota) if args.quota else None

        async def add(s: Store) -> None:
            try:
                await s.add_domain(name, quota_bytes=quota)
            except AlreadyExists:
                raise UsageError(f"domain {name} exists already") from None

        with_store(config, add)
        extra = f" (default quota for new accounts: {human_size(quota)})" if quota else ""
        print(f"Added domain {name}{extra}")
    else:

        async def delete(s: Store) -> None:
            if await s.get_domain(name) is None:
                raise UsageError(f"no domain {name}")
            try:
                await s.delete_domain(name)
            except NotPermitted as e:
                raise UsageError(f"domain {name} not deleted: {e}") from None

        with_store(config, delete)
        print(f"Deleted domain {name}")
    return 0


# --- users


async def _need_account(s: Store, address: str) -> Account:
    acct = await s.get_account(address)
    if acct is None:
        raise UsageError(f"no account {address}")
    return acct


def _account_json(a: Account) -> dict[str, Any]:
    return {
        "address": a.address,
        "quota_bytes": a.quota_bytes,
        "quota_messages": a.quota_messages,
        "used_bytes": a.used_bytes,
        "used_messages": a.used_messages,
        "created": a.created.isoformat(),
    }


def _usage(a: Account) -> str:
    pct = f" ({100 * a.used_bytes / a.quota_bytes:.0f}%)" if a.quota_bytes else ""
    return f"{human_size(a.used_bytes)} of {human_size(a.quota_bytes)}{pct}"


def cmd_user(args: argparse.Namespace) -> int:
    config = load_config(args)
    action = args.action
    if action == "list":
        accounts = with_store(config, lambda s: s.list_accounts(args.domain))
        if args.json:
            _print_json([_account_json(a) for a in accounts])
        else:
            rows = [
                (a.address, human_size(a.used_bytes), human_size(a.quota_bytes), str(a.used_messages)) for a in accounts
            ]
            print(table(rows, ("ADDRESS", "USED", "QUOTA", "MESSAGES")))
        return 0
    address = normalize_address(args.address)
    if action == "add":
        quota = parse_size(args.quota) if args.quota else None
        domain = address.partition("@")[2]

        async def precheck(s: Store) -> None:
            if await s.get_domain(domain) is None:
                raise UsageError(f"unknown domain {domain}: add it first with `postfach domain add {domain}`")
            if await s.get_account(address) is not None:
                raise UsageError(f"account {address} exists already")

        with_store(config, precheck)
        password = read_password(args, config.auth.min_password_length)
        hashed = hash_password(config, password)

        async def add(s: Store) -> Account:
            d = await s.get_domain(domain)
            q = quota if quota is not None else (d.quota_bytes if d else None)
            try:
                return await s.create_account(address, hashed, quota_bytes=q)
            except AlreadyExists:
                raise UsageError(f"account {address} exists already") from None
            except NotFound:
                raise UsageError(f"unknown domain {domain}") from None

        acct = with_store(config, add)
        print(f"Added {acct.address} (quota {human_size(acct.quota_bytes)})")
        return 0
    if action == "passwd":
        with_store(config, lambda s: _need_account(s, address))
        password = read_password(args, config.auth.min_password_length)
        hashed = hash_password(config, password)

        async def passwd(s: Store) -> None:
            acct = await _need_account(s, address)
            await s.set_password(acct.id, hashed)

        with_store(config, passwd)
        print(f"Password of {address} changed")
        return 0
    if action == "del":

        async def delete(s: Store) -> None:
            acct = await _need_account(s, address)
            await s.delete_account(acct.id)

        with_store(config, delete)
        print(f"Deleted {address} and its mail")
        return 0
    if action == "quota":
        if args.size is None:
            raise UsageError("user quota needs a size (like 2G) or none")
        size = parse_size(args.size)

        async def setq(s: Store) -> Account:
            acct = await _need_account(s, address)
            await s.set_quota(
                acct.id,
                size,
                acct.quota_messages
                if args.messages is None
                else (None if args.messages.lower() == "none" else _int(args.messages, "--messages")),
            )
            return await _need_account(s, address)

        acct = with_store(config, setq)
        print(f"Quota of {address}: {human_size(acct.quota_bytes)}; in use {_usage(acct)}")
        return 0
    if action == "info":

        async def info(s: Store) -> tuple[Account, list[tuple[str, int]]]:
            acct = await _need_account(s, address)
            boxes = []
            for mb in await s.list_mailboxes(acct.id):
                st = await s.mailbox_status(acct.id, mb.id)
                boxes.append((mb.name, st.messages))
            return acct, boxes

        from postfach.server import client_settings

        acct, boxes = with_store(config, info)
        if args.json:
            out = _account_json(acct)
            out["mailboxes"] = dict(boxes)
            _print_json(out)
            return 0
        print(f"Account   {acct.address}")
        print(f"Storage   {_usage(acct)}, {acct.used_messages} messages")
        print(f"Folders   {', '.join(f'{n} ({c})' for n, c in boxes)}")
        print()
        print(client_settings(config, acct.address))
        return 0
    raise UsageError(f"unknown user action {action}")  # pragma: no cover - argparse restricts it


def _int(text: str, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not a whole number") from None
    if v < 0:
        raise UsageError(f"{what}: must not be negative")
    return v


# --- aliases


def cmd_alias(args: argparse.Namespace) -> int:
    config = load_config(args)
    if args.action == "list":
        aliases = with_store(config, lambda s: s.list_aliases())
        if args.json:
            _print_json([{"alias": a.source, "target": a.target} for a in aliases])
        else:
            print(table([(a.source, a.target) for a in aliases], ("ALIAS", "TARGET")))
        return 0
    if not args.alias or not args.target:
        raise UsageError(f"alias {args.action} needs ALIAS and TARGET")
    source = normalize_address(args.alias, allow_catchall=True)
    target = normalize_address(args.target)
    src_domain = source.partition("@")[2]
    if args.action == "add":

        async def add(s: Store) -> None:
            if await s.get_domain(src_domain) is None:
                raise UsageError(f"unknown domain {src_domain}: an alias must be in one of our domains")
            tdom = target.partition("@")[2]
            if await s.get_domain(tdom) is not None and await s.get_account(target) is None:
                raise UsageError(f"no account {target} for the alias to point to")
            try:
                await s.add_alias(source, target)
            except AlreadyExists:
                raise UsageError(f"alias {source} -> {target} exists already") from None

        with_store(config, add)
        print(f"Added alias {source} -> {target}")
    else:

        async def delete(s: Store) -> None:
            try:
                await s.delete_alias(source, target)
            except NotFound:
                raise UsageError(f"no alias {source} -> {target}") from None

        with_store(config, delete)
        print(f"Deleted alias {source} -> {target}")
    return 0


# --- check


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args)
    problems = with_store(config, lambda s: s.check())
    if args.json:
        _print_json([{"kind": p.kind, "detail": p.detail} for p in problems])
    elif problems:
        for p in problems:
            print(f"{p.kind}: {p.detail}")
        print(f"{len(problems)} problem(s) found")
    else:
        print("store OK: every blob present with the right hash, counters match")
    return 1 if problems else 0


# --- demo


DEMO_DOMAIN = "example.org"
DEMO_ADDRESS = "demo@example.org"


def cmd_demo(args: argparse.Namespace) -> int:
    """Set up a dev data dir with a demo domain and account (once), then serve."""
    d = data_dir(args)
    password_file = d / "demo-password.txt"
    if not cfgmod.config_path(d).exists():
        init_args = argparse.Namespace(data=str(d), hostname="localhost", dev=True, store=None)
        cmd_init(init_args)
        config = cfgmod.load(d)
        password = "demo-" + secrets.token_urlsafe(9)
        hashed = hash_password(config, password)

        async def setup(s: Store) -> None:
            await s.add_domain(DEMO_DOMAIN)
            await s.create_account(DEMO_ADDRESS, hashed)

        with_store(config, setup)
        password_file.write_text(password + "\n", encoding="utf-8")
        password_file.chmod(0o600)
    password = (
        password_file.read_text(encoding="utf-8").strip() if password_file.exists() else "(see postfach user passwd)"
    )
    print(f"Demo account: {DEMO_ADDRESS}  password: {password}")
    print(f"The certificate is self-signed: accept it in the mail client (or trust {d / 'tls' / 'cert.pem'}).")
    if args.no_serve:
        return 0
    return cmd_serve(args)


# ----------------------------------------------------------------------------------- parser


def _room_parsers(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    """Subcommands the other rooms define: queue, dkim/dns, backup, export/import, store migrate."""
    from postfach import backup, dkim, transfer
    from postfach.queue import admin
    from postfach.store import migrate

    admin.add_parsers(sub)
    dkim.add_parsers(sub)
    for add in (backup.add_parsers, transfer.add_parsers, migrate.add_parsers):
        add(sub, common)


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--data",
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="data directory (default: $POSTFACH_DATA or ./var)",
    )
    p = _Parser(prog="postfach", description="postfach — a complete mail server", parents=[common])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    s = sub.add_parser("init", parents=[common], help="create config, store and certificate")
    s.add_argument("--hostname", help="the server's host name (default: this machine's FQDN)")
    s.add_argument("--dev", action="store_true", help="listen on 127.0.0.1 with high ports")
    s.add_argument("--store", metavar="DSN", help="use PostgreSQL at DSN instead of the embedded store")
    s.add_argument("--schema", metavar="NAME", help="with --store: keep the tables in this PostgreSQL schema")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("serve", parents=[common], help="run every listener")
    s.add_argument(
        "--workers",
        type=_workers_arg,
        metavar="N",
        help="worker processes sharing the listeners and the store (auto: one per CPU; default: [server] workers)",
    )
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("demo", parents=[common], help="set up a dev instance with a demo account and serve")
    s.add_argument("--no-serve", action="store_true", help="set up only")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("check-config", parents=[common], help="validate the config file and certificates")
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("check", parents=[common], help="verify the store without changing it")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("domain", parents=[common], help="add, list or delete domains")
    s.add_argument("action", choices=("add", "list", "del"))
    s.add_argument("name", nargs="?")
    s.add_argument("--quota", metavar="SIZE", help="for add: default storage limit of new accounts, like 2G")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_domain)

    s = sub.add_parser("user", parents=[common], help="manage accounts")
    s.add_argument("action", choices=("add", "passwd", "list", "del", "info", "quota"))
    s.add_argument("address", nargs="?")
    s.add_argument("size", nargs="?", help="for quota: a size like 2G, or none")
    s.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    s.add_argument("--quota", metavar="SIZE", help="storage limit, like 2G (default: the domain's)")
    s.add_argument("--messages", metavar="N", help="for quota: message-count limit, or none")
    s.add_argument("--domain", help="for list: only this domain")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_user)

    s = sub.add_parser("alias", parents=[common], help="manage aliases (a catch-all is @domain)")
    s.add_argument("action", choices=("add", "list", "del"))
    s.add_argument("alias", nargs="?")
    s.add_argument("target", nargs="?")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_alias)

    _room_parsers(sub, common)
    return p


@contextlib.contextmanager
def _quiet_broken_pipe() -> Iterator[None]:
    try:
        yield
    except BrokenPipeError:
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - replaced for the rest of the process


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed in one line
        return e.code if isinstance(e.code, int) else 2
    if args.command == "user" and args.action != "list" and not args.address:
        print(f"postfach: user {args.action} needs an ADDRESS", file=sys.stderr)
        return 2
    try:
        with _quiet_broken_pipe():
            func: Callable[..., int] = args.func
            if getattr(func, "__module__", "") != __name__:
                return func(args, load_config(args))
            return func(args)
    except (UsageError, ConfigError) as e:
        print(f"postfach: {e}", file=sys.stderr)
        return 2
    except PostfachError as e:
        print(f"postfach: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
