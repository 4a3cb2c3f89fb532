from __future__ import annotations

from pathlib import Path

import pytest

from postfach import config as cfgmod
from postfach.errors import ConfigError


def parse(text: str) -> cfgmod.Config:
    return cfgmod.parse(text, where="/data/postfach.toml", data_dir=Path("/data"))


def test_initial_dev_config_has_the_dev_ports() -> None:
    cfg = parse(cfgmod.render_initial("localhost", dev=True))
    got = {(lst.protocol, lst.port, lst.tls) for lst in cfg.listeners}
    assert got == {
        ("imap", 1143, "starttls"),
        ("imap", 1993, "implicit"),
        ("pop3", 1110, "starttls"),
        ("pop3", 1995, "implicit"),
        ("submission", 1587, "starttls"),
        ("submission", 1465, "implicit"),
        ("mx", 2525, "starttls"),
    }
    assert all(lst.address == "127.0.0.1" for lst in cfg.listeners)
    assert cfg.backup.enabled is True


def test_initial_production_config_uses_standard_ports_on_all_addresses() -> None:
    cfg = parse(cfgmod.render_initial("mail.example.org", dev=False))
    assert sorted(lst.port for lst in cfg.listeners) == [25, 110, 143, 465, 587, 993, 995]
    assert {lst.address for lst in cfg.listeners} == {"::"}
    assert cfg.hostname == "mail.example.org"


def test_defaults_are_safe() -> None:
    cfg = parse('hostname = "h.example"')
    assert cfg.auth.cleartext_networks == ("127.0.0.0/8", "::1/128")
    assert cfg.limits.imap_idle_timeout_seconds >= 1800
    assert cfg.limits.pop3_idle_timeout_seconds >= 600
    assert cfg.pop3.dele_mode == "expunge"
    assert cfg.smtp.over_quota_reply == "452"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hostnme = 'x'", "/data/postfach.toml: hostnme: unknown key"),
        ("[limits]\nmax_line_bytez = 5", "/data/postfach.toml: limits.max_line_bytez: unknown key"),
        ("[limits]\nmax_line_bytes = 'big'", "/data/postfach.toml: limits.max_line_bytes: expected an integer"),
        ("[limits]\nmax_line_bytes = -1", "limits.max_line_bytes: must not be negative"),
        ("[[listener]]\nprotocol = 'gopher'\nport = 70", "listener[0].protocol: 'gopher' is not one of"),
        ("[[listener]]\nprotocol = 'imap'\nport = 70000", "listener[0].port: 70000 is not a port number"),
        ("[[listener]]\nprotocol = 'imap'", "listener[0].port: missing"),
        ("[[listener]]\nprotocol = 'imap'\nport = 143\naddress = 'nowhere'", "is not an IP address"),
        ("[[listener]]\nprotocol = 'imap'\nport = 143\ntls = 'maybe'", "listener[0].tls: 'maybe' is not one of"),
        (
            "[[listener]]\nprotocol='imap'\nport=143\n[[listener]]\nprotocol='pop3'\nport=143",
            "listener[1]: 127.0.0.1:143 is listed twice",
        ),
        ("[auth]\ncleartext_networks = ['10.0.0.0/33']", "auth.cleartext_networks[0]: '10.0.0.0/33' is not a network"),
        ("[limits]\nimap_idle_timeout_seconds = 60", "imap_idle_timeout_seconds: must be at least 1800"),
        ("[pop3]\ndele_mode = 'shred'", "pop3.dele_mode: 'shred' is not one of expunge, hide"),
        ("[store]\nbackend = 'postgres'", "store.dsn: required"),
        ("[store]\ninline_max_bytes = 100000000", "store.inline_max_bytes: at most 16777216"),
        ("[store]\nbackend = 'postgres'\ndsn = 'postgresql://x/y'\nschema = 'a\"b'", "store.schema: 'a\"b' is not"),
        ("[backup]\ntime_of_day = '25:00'", "backup.time_of_day: '25:00' is not HH:MM"),
        ("this is = = not toml", "/data/postfach.toml: not valid TOML"),
        ("[pop3]\nretr_sets_seen = 1", "pop3.retr_sets_seen: expected true or false"),
    ],
)
def test_bad_config_names_file_key_and_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(text)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_file_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run `postfach init"):
        cfgmod.load(tmp_path)


def test_relative_paths_resolve_in_the_data_dir() -> None:
    cfg = parse("[tls]\ncert = 'c.pem'\nkey = '/etc/k.pem'")
    assert cfg.path(cfg.tls.cert) == Path("/data/c.pem")
    assert cfg.path(cfg.tls.key) == Path("/etc/k.pem")


def test_config_reference_is_current() -> None:
    doc = Path(__file__).resolve().parents[3] / "docs" / "config-reference.md"
    assert doc.read_text(encoding="utf-8") == cfgmod.reference_markdown(), (
        "docs/config-reference.md is stale: run `python -m postfach.config > docs/config-reference.md`"
    )
