"""SRS encoding against libsrs2/postsrsd: the vector of postsrsd's own unit test, the SRS1
("guarded") layout, age limits and forgery."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest

from postfach.config import Config, SmtpConfig
from postfach.errors import ConfigError
from postfach.smtp import srs as srsmod
from postfach.smtp.srs import Srs, SrsError, create_secret_file, is_srs, timestamp

# postsrsd tests/unit/test_srs2.c: secret "tops3cr3t", faketime 2020-01-01 00:01:00 UTC
POSTSRSD_SECRET = b"tops3cr3t"
POSTSRSD_NOW = 1577836860
POSTSRSD_SRS0 = "SRS0=vmyz=2W=otherdomain.com=test@example.com"
DAY = 86400


def _libsrs2_hash(secret: bytes, *fields: str) -> str:
    """libsrs2 srs_hash_create_v, spelled out: HMAC-SHA1 of the lower-cased fields, base64, 4 chars."""
    mac = hmac.new(secret, "".join(fields).lower().encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode()[:4]


@pytest.fixture
def srs() -> Srs:
    return Srs([POSTSRSD_SECRET])


def test_postsrsd_forward_vector(srs: Srs) -> None:
    assert timestamp(POSTSRSD_NOW) == "2W"
    assert srs.forward("test@otherdomain.com", "example.com", now=POSTSRSD_NOW) == POSTSRSD_SRS0


def test_postsrsd_reverse_vector(srs: Srs) -> None:
    assert srs.reverse(POSTSRSD_SRS0, now=POSTSRSD_NOW) == "test@otherdomain.com"
    assert srs.reverse("test@example.com", now=POSTSRSD_NOW) is None  # not an SRS address


def test_no_rewrite_for_null_sender_and_own_domain(srs: Srs) -> None:
    assert srs.forward("", "example.com", now=POSTSRSD_NOW) == ""
    assert srs.forward("test@example.com", "example.com", now=POSTSRSD_NOW) == "test@example.com"
    assert srs.forward("test@EXAMPLE.com", "example.com", now=POSTSRSD_NOW) == "test@EXAMPLE.com"


def test_srs0_sender_becomes_srs1_pointing_at_the_first_forwarder(srs: Srs) -> None:
    # we forward mail that forwarder.example already rewrote
    srs0 = "SRS0=abcd=2W=orig.example=user@forwarder.example"
    out = srs.forward(srs0, "example.com", now=POSTSRSD_NOW)
    h = _libsrs2_hash(POSTSRSD_SECRET, "forwarder.example", "=abcd=2W=orig.example=user")
    assert out == f"SRS1={h}=forwarder.example==abcd=2W=orig.example=user@example.com"
    # a bounce to it goes back to the first forwarder's SRS0 address (which only it can verify)
    assert srs.reverse(out, now=POSTSRSD_NOW) == srs0


def test_srs1_sender_is_re_signed_keeping_the_first_forwarder(srs: Srs) -> None:
    srs1 = "SRS1=zzzz=forwarder.example==abcd=2W=orig.example=user@middle.example"
    out = srs.forward(srs1, "example.com", now=POSTSRSD_NOW)
    h = _libsrs2_hash(POSTSRSD_SECRET, "forwarder.example", "=abcd=2W=orig.example=user")
    assert out == f"SRS1={h}=forwarder.example==abcd=2W=orig.example=user@example.com"
    assert srs.reverse(out) == "SRS0=abcd=2W=orig.example=user@forwarder.example"  # SRS1 carries no date


def test_local_part_with_separators_and_case_survives(srs: Srs) -> None:
    out = srs.forward("First.Last=x+tag@Other.example", "example.com", now=POSTSRSD_NOW)
    assert out.startswith("SRS0=") and out.endswith("=Other.example=First.Last=x+tag@example.com")
    assert srs.reverse(out, now=POSTSRSD_NOW) == "First.Last=x+tag@Other.example"
    # hashes compare case-insensitively (libsrs2 strncasecmp), and the address may be lower-cased
    assert srs.reverse(out.lower(), now=POSTSRSD_NOW) == "first.last=x+tag@other.example"


def test_age_limit(srs: Srs) -> None:
    assert srs.reverse(POSTSRSD_SRS0, now=POSTSRSD_NOW + 21 * DAY) == "test@otherdomain.com"
    with pytest.raises(SrsError, match="expired"):
        srs.reverse(POSTSRSD_SRS0, now=POSTSRSD_NOW + 22 * DAY)
    short = Srs([POSTSRSD_SECRET], max_age_days=3)
    with pytest.raises(SrsError, match="expired"):
        short.reverse(POSTSRSD_SRS0, now=POSTSRSD_NOW + 4 * DAY)
    # the 2-character stamp wraps every 1024 days: a stamp "from the future" is very old
    with pytest.raises(SrsError, match="expired"):
        srs.reverse(POSTSRSD_SRS0, now=POSTSRSD_NOW - DAY)
    assert srs.reverse(POSTSRSD_SRS0, now=POSTSRSD_NOW + 1024 * DAY) == "test@otherdomain.com"


@pytest.mark.parametrize(
    "address",
    [
        "SRS0=vmyy=2W=otherdomain.com=test@example.com",  # hash changed
        "SRS0=vmyz=2W=otherdomain.com=tesT2@example.com",  # user changed
        "SRS0=vmyz=2W=evil.example=test@example.com",  # domain changed
        "SRS0=vmy=2W=otherdomain.com=test@example.com",  # hash too short
        "SRS0=vmyz=2W=otherdomain.com@example.com",  # a field missing
        "SRS0=vmyz=!!=otherdomain.com=test@example.com",  # not base32
        "SRS1=abcd=forwarder.example==abcd=2W=orig.example=user@example.com",  # SRS1, bad hash
        "SRS1=abcd@example.com",
    ],
)
def test_forged_or_damaged_addresses_are_refused(srs: Srs, address: str) -> None:
    with pytest.raises(SrsError):
        srs.reverse(address, now=POSTSRSD_NOW)


def test_wrong_secret_is_refused_and_older_secrets_still_verify() -> None:
    with pytest.raises(SrsError, match="hash"):
        Srs([b"another secret"]).reverse(POSTSRSD_SRS0, now=POSTSRSD_NOW)
    rotated = Srs([b"new secret", POSTSRSD_SECRET])
    assert rotated.reverse(POSTSRSD_SRS0, now=POSTSRSD_NOW) == "test@otherdomain.com"
    assert rotated.forward("test@otherdomain.com", "example.com", now=POSTSRSD_NOW) != POSTSRSD_SRS0


def test_is_srs() -> None:
    assert is_srs("SRS0=abcd=2W=a=b") and is_srs("srs1+x") and is_srs("SRS0-x")
    assert not is_srs("SRS0") and not is_srs("SRS2=x") and not is_srs("srs0.x") and not is_srs("user")


def test_secret_file_created_once_private_and_loaded(tmp_path: Path) -> None:
    cfg = Config(data_dir=tmp_path)
    a = srsmod.load(cfg)
    path = tmp_path / "srs.secret"
    assert a is not None and path.stat().st_mode & 0o777 == 0o600
    first = path.read_text()
    b = srsmod.load(cfg)  # a second start keeps the secret: old addresses still verify
    assert b is not None and path.read_text() == first
    addr = a.forward("x@remote.example", "example.org")
    assert b.reverse(addr) == "x@remote.example"
    assert not create_secret_file(path)
    assert srsmod.load(Config(data_dir=tmp_path, smtp=SmtpConfig(srs=False))) is None


def test_secret_file_problems_are_config_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.secret").write_text("# only a comment\n\n")
    with pytest.raises(ConfigError, match="no SRS secret"):
        srsmod.load(Config(data_dir=tmp_path, smtp=SmtpConfig(srs_secret_file="empty.secret")))


def test_config_keys(tmp_path: Path) -> None:
    from postfach.config import parse

    cfg = parse('[smtp]\nsrs_domain = "fwd.example.org"\nsrs_max_age_days = 7\n', where="t.toml", data_dir=tmp_path)
    assert cfg.smtp.srs and cfg.smtp.srs_domain == "fwd.example.org" and cfg.smtp.srs_max_age_days == 7
    for bad in (0, 1024):
        with pytest.raises(ConfigError, match="srs_max_age_days"):
            parse(f"[smtp]\nsrs_max_age_days = {bad}\n", where="t.toml", data_dir=tmp_path)
