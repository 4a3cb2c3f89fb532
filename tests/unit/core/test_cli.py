"""The CLI forms operators' scripts use, and the one-line exit-2 answers to bad input."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests import backends

from postfach import cli

PW = "correct horse battery"


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "var"
    assert cli.main(["init", "--data", str(d), "--dev", "--hostname", "mail.example.org", *backends.init_args(d)]) == 0
    # cheap hashing for tests: patch the config file's auth section
    cfg = d / "postfach.toml"
    text = cfg.read_text().replace(
        "[auth]\n", "[auth]\nargon2_time_cost = 1\nargon2_memory_kib = 8\nargon2_parallelism = 1\n"
    )
    cfg.write_text(text)
    assert cli.main(["domain", "add", "example.org", "--data", str(d)]) == 0
    return d


def run(data: Path, *argv: str, stdin: str | None = None, monkeypatch: pytest.MonkeyPatch | None = None) -> int:
    if stdin is not None:
        assert monkeypatch is not None
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return cli.main([*argv, "--data", str(data)])


def test_init_writes_config_certificate_and_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "fresh"
    assert cli.main(["init", "--data", str(d), "--hostname", "mail.example.org", *backends.init_args(d)]) == 0
    assert (d / "postfach.toml").exists()
    assert (d / "tls" / "cert.pem").exists()
    assert (d / "tls" / "key.pem").stat().st_mode & 0o077 == 0
    assert (d / "srs.secret").stat().st_mode & 0o077 == 0 and len((d / "srs.secret").read_text().strip()) >= 32
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((d / "tls" / "cert.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "mail.example.org" in names.get_values_for_type(x509.DNSName)
    # a second init refuses to overwrite
    assert cli.main(["init", "--data", str(d)]) == 2
    assert "initialised" in capsys.readouterr().err


def test_init_schema_needs_a_dsn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["init", "--data", str(tmp_path / "d"), "--schema", "mail"]) == 2
    err = capsys.readouterr().err
    assert "--schema" in err and "--store" in err and err.count("\n") == 1
    assert not (tmp_path / "d" / "postfach.toml").exists()


def test_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTFACH_DATA", str(tmp_path / "envdir"))
    assert cli.main(["init", "--dev", *backends.init_args(tmp_path / "envdir")]) == 0
    assert (tmp_path / "envdir" / "postfach.toml").exists()


def test_user_lifecycle(data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        run(
            data,
            "user",
            "add",
            "Alice@Example.org",
            "--password-stdin",
            "--quota",
            "1G",
            stdin=PW + "\n",
            monkeypatch=monkeypatch,
        )
        == 0
    )
    capsys.readouterr()
    assert run(data, "user", "list", "--json") == 0
    users = json.loads(capsys.readouterr().out)
    assert [u["address"] for u in users] == ["alice@example.org"]
    assert users[0]["quota_bytes"] == 1024**3
    assert run(data, "user", "list") == 0
    out = capsys.readouterr().out
    assert "alice@example.org" in out and "1.0 GiB" in out
    assert run(data, "user", "info", "alice@example.org") == 0
    out = capsys.readouterr().out
    assert "1143 (STARTTLS)" in out and "1993 (SSL/TLS)" in out
    assert "1110 (STARTTLS)" in out and "1995 (SSL/TLS)" in out
    assert "1587 (STARTTLS)" in out and "1465 (SSL/TLS)" in out
    assert "mail.example.org" in out and "alice@example.org" in out
    assert "INBOX" in out and "Sent" in out and "Junk" in out
    assert run(data, "user", "quota", "alice@example.org", "none") == 0
    assert (
        run(
            data,
            "user",
            "passwd",
            "alice@example.org",
            "--password-stdin",
            stdin="another good one\n",
            monkeypatch=monkeypatch,
        )
        == 0
    )
    assert run(data, "user", "del", "alice@example.org") == 0
    capsys.readouterr()
    assert run(data, "user", "list", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []


@pytest.mark.parametrize(
    ("argv", "stdin", "needle"),
    [
        (("user", "add", "not-an-address", "--password-stdin"), PW, "not an email address"),
        (("user", "add", "bob@unknown.example", "--password-stdin"), PW, "unknown domain unknown.example"),
        (("user", "add", "bob@example.org", "--password-stdin"), "", "password is empty"),
        (("user", "add", "bob@example.org", "--password-stdin"), "short", "shorter than 8"),
        (("user", "add", "bob@example.org", "--password-stdin"), "aaaaaaaaaaaa", "too weak"),
        (("user", "add", "bob@example.org", "--password-stdin", "--quota", "lots"), PW, "is not a size"),
        (("user", "passwd", "nobody@example.org", "--password-stdin"), PW, "no account nobody@example.org"),
        (("user", "del", "nobody@example.org"), None, "no account nobody@example.org"),
        (("domain", "add", "not a domain"), None, "not a valid domain name"),
        (("domain", "add", "example.org"), None, "exists already"),
        (("domain", "del", "nothere.example"), None, "no domain nothere.example"),
        (("alias", "add", "x@elsewhere.example", "user@example.org"), None, "unknown domain elsewhere.example"),
        (("user", "frobnicate"), None, "invalid choice"),
    ],
)
def test_bad_input_gets_one_line_and_exit_2(
    data: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    stdin: str | None,
    needle: str,
) -> None:
    capsys.readouterr()
    code = run(data, *argv, stdin=stdin if stdin is None else stdin + "\n", monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err


def test_duplicate_user(data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        run(data, "user", "add", "bob@example.org", "--password-stdin", stdin=PW + "\n", monkeypatch=monkeypatch) == 0
    )
    capsys.readouterr()
    assert (
        run(data, "user", "add", "bob@example.org", "--password-stdin", stdin=PW + "\n", monkeypatch=monkeypatch) == 2
    )
    err = capsys.readouterr().err
    assert "account bob@example.org exists already" in err and err.count("\n") == 1


def test_domain_with_accounts_cannot_be_deleted(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (
        run(data, "user", "add", "bob@example.org", "--password-stdin", stdin=PW + "\n", monkeypatch=monkeypatch) == 0
    )
    assert run(data, "domain", "del", "example.org") == 2


def test_aliases_and_catch_all(data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        run(data, "user", "add", "bob@example.org", "--password-stdin", stdin=PW + "\n", monkeypatch=monkeypatch) == 0
    )
    assert run(data, "alias", "add", "info@example.org", "bob@example.org") == 0
    assert run(data, "alias", "add", "@example.org", "bob@example.org") == 0
    assert run(data, "alias", "add", "fwd@example.org", "someone@elsewhere.example") == 0
    assert run(data, "alias", "add", "x@example.org", "ghost@example.org") == 2
    capsys.readouterr()
    assert run(data, "alias", "list", "--json") == 0
    got = {(a["alias"], a["target"]) for a in json.loads(capsys.readouterr().out)}
    assert got == {
        ("info@example.org", "bob@example.org"),
        ("@example.org", "bob@example.org"),
        ("fwd@example.org", "someone@elsewhere.example"),
    }
    assert run(data, "alias", "del", "info@example.org", "bob@example.org") == 0
    assert run(data, "alias", "del", "info@example.org", "bob@example.org") == 2


def test_check_on_a_fresh_store_is_clean(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(data, "check") == 0
    assert "store OK" in capsys.readouterr().out


def test_bad_config_file_exits_2_with_one_line(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (data / "postfach.toml").write_text("[limits]\nbogus = 1\n")
    capsys.readouterr()
    assert run(data, "user", "list") == 2
    err = capsys.readouterr().err
    assert "postfach.toml: limits.bogus: unknown key" in err and err.count("\n") == 1


def test_console_script_runs_as_a_process(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "postfach"
    proc = subprocess.run(
        [str(exe), "domain", "list", "--data", str(tmp_path / "none")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "no such file" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500M", 500 * 1024**2),
        ("2G", 2 * 1024**3),
        ("1.5GiB", int(1.5 * 1024**3)),
        ("1048576", 1048576),
        ("none", None),
        ("10k", 10240),
    ],
)
def test_parse_size(text: str, value: int | None) -> None:
    assert cli.parse_size(text) == value


@pytest.mark.sqlite_only("`postfach demo` always sets up the embedded store")
def test_demo_sets_up_a_dev_instance_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "demo"
    assert cli.main(["demo", "--no-serve", "--data", str(d)]) == 0
    out = capsys.readouterr().out
    password = (d / "demo-password.txt").read_text().strip()
    assert f"Demo account: demo@example.org  password: {password}" in out
    assert cli.main(["user", "list", "--json", "--data", str(d)]) == 0
    assert [u["address"] for u in json.loads(capsys.readouterr().out)] == ["demo@example.org"]
    # running it again keeps the same instance and password
    assert cli.main(["demo", "--no-serve", "--data", str(d)]) == 0
    assert password in capsys.readouterr().out


def test_domain_default_quota_applies_to_new_accounts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "q"
    assert cli.main(["init", "--data", str(d), "--dev", *backends.init_args(d)]) == 0
    assert cli.main(["domain", "add", "quota.example", "--quota", "100M", "--data", str(d)]) == 0
    assert run(d, "user", "add", "a@quota.example", "--password-stdin", stdin=PW + "\n", monkeypatch=monkeypatch) == 0
    assert run(d, "user", "add", "b@quota.example", "--password-stdin", "--quota", "1G",
               stdin=PW + "\n", monkeypatch=monkeypatch) == 0
    capsys.readouterr()
    assert run(d, "user", "list", "--json") == 0
    quotas = {u["address"]: u["quota_bytes"] for u in json.loads(capsys.readouterr().out)}
    assert quotas == {"a@quota.example": 100 * 1024**2, "b@quota.example": 1024**3}
