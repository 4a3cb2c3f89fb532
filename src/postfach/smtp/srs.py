"""Sender Rewriting Scheme (SRS) for forwarding, in the format of libsrs2 / postsrsd.

When an alias of ours forwards mail from ``user@orig.example`` to a remote mailbox, the receiver's
SPF check would see our IP sending for ``orig.example`` and fail. So the forwarded copy leaves with
the envelope sender rewritten into our own domain (Postfix + postsrsd, Exim, Dovecot users know
these addresses)::

    SRS0=HHHH=TT=orig.example=user@our.example          (we forward original mail)
    SRS1=HHHH=first.example==HHHH=TT=orig.example=user@our.example   (we forward SRS0 mail again)

``HHHH``: the first 4 characters of the base64 HMAC-SHA1, keyed with our secret, over the
lower-cased fields (SRS0: timestamp, domain, local part; SRS1: the first forwarder's domain and
its SRS0 local part after "SRS0"); ``TT``: days since the epoch modulo 1024 in two base32
characters. A bounce (null sender) to such an address is verified (hash, age ≤ ``max_age_days``)
and goes back to ``user@orig.example`` (SRS0) or to the first forwarder's SRS0 address (SRS1);
anything that does not verify is refused with 550 5.1.1, so the addresses are no open relay.

The secret file holds one secret per line: the first signs, every line verifies (a new secret
can be put on top while the old one still verifies bounces of mail sent before; postsrsd's
``secrets-file`` works the same way).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets as _secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from postfach.errors import ConfigError

if TYPE_CHECKING:
    from postfach.config import Config

SEPARATORS = "=+-"
_TIME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_TIME_PRECISION = 86400  # one day
_TIME_SLOTS = 1024  # two base32 characters
HASH_LENGTH = 4


class SrsError(ValueError):
    """An address that looks like SRS but does not verify (forged, damaged or expired)."""


def is_srs(local_part: str) -> bool:
    """Does the local part start with SRS0/SRS1 and a separator (case-insensitive, as libsrs2)?"""
    return len(local_part) > 5 and local_part[:4].upper() in ("SRS0", "SRS1") and local_part[4] in SEPARATORS


def timestamp(now: float) -> str:
    t = int(now) // _TIME_PRECISION
    return _TIME_CHARS[(t >> 5) & 31] + _TIME_CHARS[t & 31]


def _stamp_age_days(stamp: str, now: float) -> int:
    """Days between the stamp and ``now``, modulo the 1024-day cycle (libsrs2 srs_timestamp_check)."""
    if len(stamp) != 2:
        raise SrsError("bad SRS timestamp")
    then = 0
    for ch in stamp.upper():
        i = _TIME_CHARS.find(ch)
        if i < 0:
            raise SrsError("bad SRS timestamp")
        then = (then << 5) | i
    today = (int(now) // _TIME_PRECISION) % _TIME_SLOTS
    return (today - then) % _TIME_SLOTS


class Srs:
    """Forward and reverse SRS addresses with a set of secrets (the first one signs)."""

    def __init__(self, secrets: Sequence[bytes], *, max_age_days: int = 21) -> None:
        if not secrets or not all(secrets):
            raise ValueError("SRS needs at least one non-empty secret")
        self.secrets = list(secrets)
        self.max_age_days = max_age_days

    @classmethod
    def from_file(cls, path: Path, *, max_age_days: int = 21) -> Srs:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the SRS secret: {e.strerror or e}") from None
        lines = [ln.strip() for ln in text.splitlines()]
        secrets = [ln.encode() for ln in lines if ln and not ln.startswith("#")]
        if not secrets:
            raise ConfigError(f"{path}: no SRS secret in the file")
        return cls(secrets, max_age_days=max_age_days)

    # --- hashing (libsrs2 srs_hash_create_v) ---------------------------------------------------------
    @staticmethod
    def _hash_with(secret: bytes, *fields: str) -> str:
        mac = hmac.new(secret, b"".join(f.lower().encode("utf-8") for f in fields), hashlib.sha1)
        return base64.b64encode(mac.digest()).decode("ascii")[:HASH_LENGTH]

    def _hash(self, *fields: str) -> str:
        return self._hash_with(self.secrets[0], *fields)

    def _verify(self, given: str, *fields: str) -> bool:
        if len(given) < HASH_LENGTH:
            return False
        given = given[:HASH_LENGTH].lower()  # libsrs2 compares case-insensitively
        return any(hmac.compare_digest(self._hash_with(s, *fields).lower(), given) for s in self.secrets)

    # --- forward -------------------------------------------------------------------------------------
    def forward(self, sender: str, srs_domain: str, *, now: float | None = None) -> str:
        """The envelope sender for a copy of mail from ``sender`` that ``srs_domain`` forwards.

        The null sender stays null (RFC 5321 §4.5.5); senders of ``srs_domain`` itself stay as they
        are; an SRS0 or SRS1 sender becomes SRS1 (the "guarded" scheme: a bounce goes to the first
        forwarder, not through every hop)."""
        if not sender:
            return sender
        local, at, domain = sender.rpartition("@")
        if not at or not local or not domain:
            return sender  # not an address we can encode; sent as it is
        if domain.lower() == srs_domain.lower():
            return sender
        when = time.time() if now is None else now
        if is_srs(local) and local[:4].upper() == "SRS1":
            # SRS1=HHH=first.example==HHH=TT=orig=user@domain: keep the first forwarder's part
            rest = local[5:]
            _old_hash, sep1, tail = rest.partition("=")
            first_host, sep2, first_user = tail.partition("=")
            if not sep1 or not sep2 or not first_host or not first_user:
                return self._srs0(local, domain, srs_domain, when)
            return f"SRS1={self._hash(first_host, first_user)}={first_host}={first_user}@{srs_domain}"
        if is_srs(local):  # SRS0 of another forwarder: SRS1 that points back to it
            user = local[4:]  # "=HHHH=TT=orig=user", separator included (libsrs2)
            return f"SRS1={self._hash(domain, user)}={domain}={user}@{srs_domain}"
        return self._srs0(local, domain, srs_domain, when)

    def _srs0(self, local: str, domain: str, srs_domain: str, now: float) -> str:
        stamp = timestamp(now)
        return f"SRS0={self._hash(stamp, domain, local)}={stamp}={domain}={local}@{srs_domain}"

    # --- reverse -------------------------------------------------------------------------------------
    def reverse(self, address: str, *, now: float | None = None) -> str | None:
        """The address an SRS address of ours stands for; None when it is no SRS address at all.
        Raises SrsError when it is one but does not verify (bad hash, expired, malformed)."""
        local, at, _domain = address.rpartition("@")
        if not at or not is_srs(local):
            return None
        when = time.time() if now is None else now
        tag, body = local[:4].upper(), local[5:]
        if tag == "SRS1":
            given, sep1, tail = body.partition("=")
            host, sep2, user = tail.partition("=")
            if not sep1 or not sep2 or not host or not user:
                raise SrsError("malformed SRS1 address")
            if not self._verify(given, host, user):
                raise SrsError("invalid SRS hash")
            return f"SRS0{user}@{host}"
        parts = body.split("=", 3)
        if len(parts) != 4 or not all(parts):
            raise SrsError("malformed SRS0 address")
        given, stamp, host, user = parts
        if _stamp_age_days(stamp, when) > self.max_age_days:
            raise SrsError("SRS address expired")
        if not self._verify(given, stamp, host, user):
            raise SrsError("invalid SRS hash")
        return f"{user}@{host}"


def create_secret_file(path: Path) -> bool:
    """Write a new random secret to ``path`` (mode 0600) unless the file exists; True if written.
    Safe against a concurrent creator (O_EXCL) and durable before it is used."""
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = base64.b64encode(_secrets.token_bytes(24)).decode("ascii")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except FileExistsError:
        return False
    try:
        os.write(fd, (secret + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def load(config: Config) -> Srs | None:
    """The server's SRS from ``[smtp]`` (None when ``srs = false``); the secret file is created
    on first use, so data dirs made before SRS existed get one too."""
    if not config.smtp.srs:
        return None
    path = config.path(config.smtp.srs_secret_file)
    try:
        create_secret_file(path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot create the SRS secret: {e.strerror or e}") from None
    return Srs.from_file(path, max_age_days=config.smtp.srs_max_age_days)
