"""Configuration: one TOML file (``postfach.toml`` in the data dir) read into frozen dataclasses.

Unknown keys, wrong types and bad values raise ``ConfigError`` whose message names the file, the key
path and the problem, so that ``postfach`` can print one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from postfach.errors import ConfigError

Protocol_ = Literal["imap", "pop3", "submission", "mx"]
TlsMode = Literal["starttls", "implicit", "none"]
PROTOCOLS = ("imap", "pop3", "submission", "mx")
TLS_MODES = ("starttls", "implicit", "none")

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class ListenerConfig:
    protocol: str
    port: int
    address: str = "127.0.0.1"
    tls: str = "starttls"
    proxy_protocol: bool = False

    def describe(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.protocol} on {host}:{self.port} ({self.tls})"


@dataclass(frozen=True)
class ServerConfig:
    # Worker processes sharing the listeners and the store; 0 (or "auto"): one per CPU.
    workers: int = 1

    def worker_count(self) -> int:
        return self.workers if self.workers > 0 else max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class StoreConfig:
    backend: str = "sqlite"  # "sqlite" (embedded) or "postgres"
    path: str = "store"  # sqlite: folder below the data dir holding the database and blobs
    dsn: str = ""  # postgres
    schema: str = ""  # postgres: the schema holding postfach's tables (made when missing); "": the default (public)
    group_commit_max: int = 256  # writes that may share one commit
    # sqlite: messages up to this size go into inline.sqlite3 (one commit stores a batch of them),
    # bigger ones into files of their own under blobs/; 0: every message in a file
    inline_max_bytes: int = 65536


@dataclass(frozen=True)
class TlsConfig:
    cert: str = "tls/cert.pem"
    key: str = "tls/key.pem"
    min_version: str = "1.2"  # "1.2" or "1.3"


@dataclass(frozen=True)
class AuthConfig:
    cleartext_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # Throttling: after `free_failures` failures, each further one waits delay * 2**n, capped;
    # `lockout_failures` failures within `window_seconds` lock the IP / account out for `lockout_seconds`.
    free_failures: int = 3
    failure_delay_seconds: float = 0.5
    max_failure_delay_seconds: float = 8.0
    lockout_failures: int = 10
    window_seconds: int = 900
    lockout_seconds: int = 900
    min_password_length: int = 8
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 65536
    argon2_parallelism: int = 2

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.cleartext_networks]


@dataclass(frozen=True)
class LimitsConfig:
    max_line_bytes: int = 65536  # IMAP command line; SMTP uses smtp_max_line_bytes
    smtp_max_line_bytes: int = 4096  # RFC 5321 §4.5.3.1.6 says 1000; we accept more, refuse beyond
    max_literal_bytes: int = 64 * MiB
    max_message_bytes: int = 50 * MiB
    max_recipients: int = 100
    max_connections_per_ip: int = 50
    max_connections_per_account: int = 50
    max_bad_commands: int = 20
    imap_idle_timeout_seconds: int = 1800  # RFC 9051 §5.4: at least 30 minutes
    pop3_idle_timeout_seconds: int = 600  # RFC 1939 §3: at least 10 minutes
    smtp_idle_timeout_seconds: int = 300  # RFC 5321 §4.5.3.2.7
    tls_handshake_timeout_seconds: int = 30


@dataclass(frozen=True)
class ImapConfig:
    max_append_bytes: int = 50 * MiB  # APPENDLIMIT
    # QRESYNC expunge records older than this are trimmed (RFC 7162 §3.2.5.2; a client that was
    # away longer resynchronises from the UIDs it knows); 0 keeps them forever.
    expunge_history_days: int = 365
    expunge_history_sweep_minutes: int = 60  # how often the server looks for records to trim
    # METADATA (RFC 5464): the largest entry value, the entries per mailbox (and of the server
    # entries), and the entries of one account in all; RFC 5464 §4.1 asks for at least 1024 / 10.
    metadata_max_entry_bytes: int = 64 * KiB
    metadata_max_mailbox_entries: int = 100
    metadata_max_account_entries: int = 1000
    metadata_server_admin: str = ""  # the read-only server entry /shared/admin (a mailto: or tel: URI)


@dataclass(frozen=True)
class Pop3Config:
    retr_sets_seen: bool = True
    dele_mode: str = "expunge"  # "expunge" or "hide" (keep for IMAP, hide from POP3)
    expire: str = "NEVER"
    login_delay_seconds: int = 0


@dataclass(frozen=True)
class SmtpConfig:
    received_privacy: bool = False  # leave the client's IP out of Received on submission
    over_quota_reply: str = "452"  # "452" (4.2.2, temporary) or "552" (5.2.2, permanent)
    dmarc_reject: bool = True  # p=reject -> 550 5.7.1; False: deliver to Junk
    dns_nameservers: tuple[str, ...] = ()  # empty: the system resolver
    dns_port: int = 53
    relay_port: int = 25  # port of remote MX hosts (tests point it at a loopback sink)
    dkim_selector: str = "postfach"
    # SRS (postsrsd format) for mail an alias forwards to a remote address: the envelope sender
    # becomes SRS0=hash=stamp=domain=user@<the alias's domain, or srs_domain>; bounces to such
    # addresses are verified and returned to the original sender.
    srs: bool = True
    srs_secret_file: str = "srs.secret"  # below the data dir; `postfach init` (or first start) writes it
    srs_domain: str = ""  # empty: the domain of the forwarding alias
    srs_max_age_days: int = 21  # bounces to older SRS addresses are refused (550 5.1.1)


@dataclass(frozen=True)
class QueueConfig:
    retry_schedule_seconds: tuple[int, ...] = (60, 300, 900, 1800, 3600, 7200, 14400)
    max_age_seconds: int = 5 * 86400
    delay_warning_seconds: int = 4 * 3600
    concurrency: int = 20
    connect_timeout_seconds: int = 30


@dataclass(frozen=True)
class BackupConfig:
    enabled: bool = False
    directory: str = "backups"
    time_of_day: str = "03:00"
    keep_daily: int = 7
    keep_weekly: int = 4
    keep_monthly: int = 6


@dataclass(frozen=True)
class QuotaConfig:
    warn_percents: tuple[int, ...] = (80, 95)
    warning_subject: str = "Your mailbox is {percent}% full"
    warning_text: str = (
        "Your mailbox {address} uses {used} of {limit} ({percent}%).\n"
        "Please delete or archive some messages, or new mail may be refused."
    )


@dataclass(frozen=True)
class ProxyConfig:
    # Load balancers allowed to send a PROXY protocol header (HAProxy v1/v2) on listeners with
    # `proxy_protocol = true` (Dovecot: haproxy_trusted_networks). Anyone else is disconnected there.
    trusted_networks: tuple[str, ...] = ()
    # The header must be complete this soon after connecting (Dovecot: haproxy_timeout = 3s).
    header_timeout_seconds: float = 3.0


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    format: str = "text"  # "text" or "json"


@dataclass(frozen=True)
class Config:
    hostname: str = "localhost"
    listeners: tuple[ListenerConfig, ...] = ()
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    imap: ImapConfig = field(default_factory=ImapConfig)
    pop3: Pop3Config = field(default_factory=Pop3Config)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    quota: QuotaConfig = field(default_factory=QuotaConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Set by load(), not read from the file:
    data_dir: Path = Path("var")
    source: Path | None = None

    def path(self, relative: str) -> Path:
        """A path from the config, relative to the data dir unless absolute."""
        p = Path(relative)
        return p if p.is_absolute() else self.data_dir / p

    def listeners_for(self, protocol: str) -> list[ListenerConfig]:
        return [lst for lst in self.listeners if lst.protocol == protocol]


# ----------------------------------------------------------------------------------- loading

_SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "store": StoreConfig,
    "tls": TlsConfig,
    "auth": AuthConfig,
    "limits": LimitsConfig,
    "imap": ImapConfig,
    "pop3": Pop3Config,
    "smtp": SmtpConfig,
    "queue": QueueConfig,
    "backup": BackupConfig,
    "quota": QuotaConfig,
    "proxy": ProxyConfig,
    "logging": LoggingConfig,
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "listener.protocol": PROTOCOLS,
    "listener.tls": TLS_MODES,
    "store.backend": ("sqlite", "postgres"),
    "tls.min_version": ("1.2", "1.3"),
    "pop3.dele_mode": ("expunge", "hide"),
    "smtp.over_quota_reply": ("452", "552"),
    "logging.level": ("DEBUG", "INFO", "WARNING", "ERROR"),
    "logging.format": ("text", "json"),
}


def _convert(value: Any, hint: Any, where: str, keypath: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {keypath}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {keypath}: expected an integer, got {value!r}")
        if value < 0:
            raise ConfigError(f"{where}: {keypath}: must not be negative, got {value}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: {keypath}: expected a number, got {value!r}")
        if value < 0:
            raise ConfigError(f"{where}: {keypath}: must not be negative, got {value}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {keypath}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        (item_hint, _ellipsis) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {keypath}: expected a list, got {value!r}")
        return tuple(_convert(v, item_hint, where, f"{keypath}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{where}: {keypath}: unsupported type")  # pragma: no cover - not used
    raise ConfigError(f"{where}: {keypath}: unsupported type {hint!r}")  # pragma: no cover


def _build(cls: type[Any], table: Any, where: str, prefix: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: {prefix}: expected a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        keypath = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"{where}: {keypath}: unknown key")
        converted = _convert(value, hints[key], where, keypath)
        choice_key = f"{prefix.split('[')[0]}.{key}"
        if choice_key in _CHOICES and converted not in _CHOICES[choice_key]:
            allowed = ", ".join(_CHOICES[choice_key])
            raise ConfigError(f"{where}: {keypath}: {converted!r} is not one of {allowed}")
        kwargs[key] = converted
    return cls(**kwargs)


def _validate(cfg: Config, where: str) -> None:
    seen: set[tuple[str, int]] = set()
    for i, lst in enumerate(cfg.listeners):
        keypath = f"listener[{i}]"
        if not 0 <= lst.port < 65536:
            raise ConfigError(f"{where}: {keypath}.port: {lst.port} is not a port number (1-65535)")
        try:
            ipaddress.ip_address(lst.address)
        except ValueError:
            if lst.address not in ("", "*"):
                raise ConfigError(f"{where}: {keypath}.address: {lst.address!r} is not an IP address") from None
        if lst.port and (lst.address, lst.port) in seen:
            raise ConfigError(f"{where}: {keypath}: {lst.address}:{lst.port} is listed twice")
        seen.add((lst.address, lst.port))
        if lst.protocol == "mx" and lst.tls == "implicit":
            raise ConfigError(f"{where}: {keypath}.tls: MX (port 25) speaks STARTTLS, not implicit TLS")
        if lst.proxy_protocol and not cfg.proxy.trusted_networks:
            raise ConfigError(
                f"{where}: {keypath}.proxy_protocol: needs proxy.trusted_networks (the load balancers' addresses)"
            )
    for i, net in enumerate(cfg.auth.cleartext_networks):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(
                f"{where}: auth.cleartext_networks[{i}]: {net!r} is not a network (like 10.0.0.0/8)"
            ) from None
    for i, net in enumerate(cfg.proxy.trusted_networks):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(
                f"{where}: proxy.trusted_networks[{i}]: {net!r} is not a network (like 10.0.0.0/8)"
            ) from None
    if cfg.proxy.header_timeout_seconds <= 0:
        raise ConfigError(f"{where}: proxy.header_timeout_seconds: must be more than 0")
    if cfg.limits.imap_idle_timeout_seconds < 1800:
        raise ConfigError(f"{where}: limits.imap_idle_timeout_seconds: must be at least 1800 (RFC 9051 §5.4)")
    if cfg.limits.pop3_idle_timeout_seconds < 600:
        raise ConfigError(f"{where}: limits.pop3_idle_timeout_seconds: must be at least 600 (RFC 1939 §3)")
    im = cfg.imap
    if im.expunge_history_days < 0 or im.expunge_history_sweep_minutes < 1:
        raise ConfigError(f"{where}: imap.expunge_history_*: days must be >= 0 and sweep_minutes >= 1")
    if im.metadata_max_entry_bytes < 1024 or im.metadata_max_mailbox_entries < 10:
        raise ConfigError(f"{where}: imap.metadata_max_*: RFC 5464 §4.1 asks for at least 1024 bytes and 10 entries")
    if im.metadata_max_account_entries < im.metadata_max_mailbox_entries:
        raise ConfigError(f"{where}: imap.metadata_max_account_entries: below metadata_max_mailbox_entries")
    if not 1 <= cfg.smtp.srs_max_age_days < 1024:
        raise ConfigError(f"{where}: smtp.srs_max_age_days: must be 1 to 1023 (the SRS timestamp wraps at 1024 days)")
    if cfg.store.inline_max_bytes > 16 * 1024 * 1024:
        raise ConfigError(f"{where}: store.inline_max_bytes: at most 16777216 (bigger messages belong in files)")
    if cfg.store.backend == "postgres" and not cfg.store.dsn:
        raise ConfigError(f'{where}: store.dsn: required when store.backend is "postgres"')
    if cfg.store.schema and not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", cfg.store.schema):
        raise ConfigError(
            f"{where}: store.schema: {cfg.store.schema!r} is not a plain PostgreSQL name (a-z, 0-9, _; at most 63)"
        )
    hh, _, mm = cfg.backup.time_of_day.partition(":")
    if not (hh.isdigit() and mm.isdigit() and int(hh) < 24 and int(mm) < 60):
        raise ConfigError(f"{where}: backup.time_of_day: {cfg.backup.time_of_day!r} is not HH:MM")


def parse(text: str, *, where: str, data_dir: Path) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "hostname":
            kwargs["hostname"] = _convert(value, str, where, key)
        elif key == "listener":
            if not isinstance(value, list):
                raise ConfigError(f"{where}: listener: expected [[listener]] tables")
            listeners = []
            for i, table in enumerate(value):
                for required in ("protocol", "port"):
                    if isinstance(table, dict) and required not in table:
                        raise ConfigError(f"{where}: listener[{i}].{required}: missing")
                lst = _build(ListenerConfig, table, where, f"listener[{i}]")
                listeners.append(lst)
            kwargs["listeners"] = tuple(listeners)
        elif key in _SECTIONS:
            if key == "server" and isinstance(value, dict) and value.get("workers") == "auto":
                value = {**value, "workers": 0}
            kwargs[key] = _build(_SECTIONS[key], value, where, key)
        else:
            raise ConfigError(f"{where}: {key}: unknown key")
    cfg = Config(**kwargs, data_dir=data_dir, source=Path(where))
    _validate(cfg, where)
    return cfg


def config_path(data_dir: Path) -> Path:
    return data_dir / "postfach.toml"


def load(data_dir: Path) -> Config:
    path = config_path(data_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (run `postfach init --data {data_dir}` first)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    return parse(text, where=str(path), data_dir=data_dir)


# ----------------------------------------------------------------------------------- writing

DEV_PORTS: tuple[tuple[str, int, str], ...] = (
    ("imap", 1143, "starttls"),
    ("imap", 1993, "implicit"),
    ("pop3", 1110, "starttls"),
    ("pop3", 1995, "implicit"),
    ("submission", 1587, "starttls"),
    ("submission", 1465, "implicit"),
    ("mx", 2525, "starttls"),
)
STANDARD_PORTS: tuple[tuple[str, int, str], ...] = (
    ("imap", 143, "starttls"),
    ("imap", 993, "implicit"),
    ("pop3", 110, "starttls"),
    ("pop3", 995, "implicit"),
    ("submission", 587, "starttls"),
    ("submission", 465, "implicit"),
    ("mx", 25, "starttls"),
)


def render_initial(
    hostname: str,
    *,
    dev: bool,
    ports: tuple[tuple[str, int, str], ...] | None = None,
    address: str | None = None,
    store_dsn: str | None = None,
    store_schema: str | None = None,
) -> str:
    """The postfach.toml that ``postfach init`` writes: every listener spelled out, defaults noted."""
    addr = address if address is not None else ("127.0.0.1" if dev else "::")
    chosen = ports if ports is not None else (DEV_PORTS if dev else STANDARD_PORTS)
    lines = [
        "# postfach configuration. Every key and its default: docs/config-reference.md",
        f'hostname = "{hostname}"',
        "",
    ]
    for proto, port, tls in chosen:
        lines += [
            "[[listener]]",
            f'protocol = "{proto}"',
            f'address = "{addr}"',
            f"port = {port}",
            f'tls = "{tls}"',
            "",
        ]
    lines += ["[store]"]
    if store_dsn:
        lines += ['backend = "postgres"', f'dsn = "{store_dsn}"']
        if store_schema:
            lines += [f'schema = "{store_schema}"']
    else:
        lines += ['backend = "sqlite"', 'path = "store"']
    lines += [
        "",
        "[tls]",
        'cert = "tls/cert.pem"',
        'key = "tls/key.pem"',
        "",
        "[auth]",
        "# Networks that may log in without TLS (loopback counts as secured, as in Dovecot).",
        'cleartext_networks = ["127.0.0.0/8", "::1/128"]',
        "",
        "[backup]",
        f"enabled = {'true' if dev else 'false'}",
        'directory = "backups"',
        'time_of_day = "03:00"',
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- reference

_SECTION_DOCS: dict[str, str] = {
    "listener": (
        "One `[[listener]]` table per port: any protocol on any port in any TLS mode."
        " `proxy_protocol = true`: only a load balancer from `[proxy] trusted_networks` connects, and it"
        " sends a PROXY header first (before the TLS handshake on implicit-TLS ports)."
    ),
    "server": (
        'Processes. `workers` = N runs N worker processes (`"auto"` or 0: one per CPU) behind one'
        " supervisor that accepts connections and hands each to the least busy worker; they share"
        " the store, and changes reach IDLE sessions in every worker. `max_connections_per_ip` is"
        " counted over all workers (by the supervisor), and so are failed logins (throttling and"
        " lockout) and `max_connections_per_account`: each worker tells the others through the"
        " supervisor, so two logins in the same millisecond on two workers may overshoot a cap by one."
    ),
    "store": "Where mail is kept. Embedded store: messages up to `inline_max_bytes` in `inline.sqlite3` "
    "(a batch of them stored by one commit), bigger ones as files under `blobs/`; 0 puts every message in a file.",
    "tls": "Certificate and key (PEM); reloaded on SIGHUP.",
    "auth": "Logins: where passwords may travel without TLS, throttling and lockout, hashing cost.",
    "limits": "Every limit a client can run into.",
    "imap": "IMAP behaviour.",
    "pop3": "POP3 behaviour.",
    "smtp": "SMTP submission and MX behaviour.",
    "queue": "The outbound queue.",
    "backup": "The daily backup that `serve` runs.",
    "quota": "Quota warnings.",
    "proxy": (
        "The PROXY protocol (v1 and v2, auto-detected) behind a load balancer such as HAProxy: on a"
        " listener with `proxy_protocol = true` every connection must come from `trusted_networks` and"
        " start with a header naming the real client, whose address then counts everywhere (logs, limits,"
        " lockout, `cleartext_networks`, `Received:`, SPF). TLVs are ignored; TLS is only what we did ourselves."
    ),
    "logging": "Log level and format.",
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


def reference_markdown() -> str:
    """docs/config-reference.md, generated from the dataclasses (a test keeps the file current)."""
    out = [
        "# Configuration reference",
        "",
        "Generated from `src/postfach/config.py` by `python -m postfach.config`; do not edit by hand.",
        "The file is `postfach.toml` in the data dir. Unknown keys are errors.",
        "",
        "## top level",
        "",
        "| key | default | choices |",
        "|---|---|---|",
        f"| `hostname` | `{_toml_value(Config().hostname)}` | the server's host name |",
    ]
    tables: list[tuple[str, type[Any]]] = [("listener", ListenerConfig), *_SECTIONS.items()]
    for name, cls in tables:
        header = f"[[{name}]]" if name == "listener" else f"[{name}]"
        out += ["", f"## {header}", "", _SECTION_DOCS.get(name, ""), "", "| key | default | choices |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f"`{_toml_value(f.default)}`"
            elif f.default_factory is not dataclasses.MISSING:
                default = f"`{_toml_value(f.default_factory())}`"
            else:
                default = "required"
            choices = ", ".join(_CHOICES.get(f"{name}.{f.name}", ()))
            out.append(f"| `{f.name}` | {default} | {choices} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
