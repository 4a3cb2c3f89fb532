"""Accounts' passwords and logins: argon2id hashes (off the event loop), SASL, and throttling.

Every protocol authenticates through one ``Authenticator``, so failures count the same whether they
come from IMAP, POP3 or SMTP: after a few free failures each one waits longer (per IP and per
account), and too many within a window lock the IP / account out for a while (configurable).
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from postfach.auth.sasl import Credentials
from postfach.config import AuthConfig
from postfach.store.base import Account, Store

log = logging.getLogger("postfach.auth")

# A hash of a random password, verified when the user does not exist so that timing does not
# tell which addresses exist.
_DUMMY_PASSWORD = "postfach-no-such-user"


class AuthOutcome(enum.Enum):
    OK = "ok"
    FAILED = "failed"  # wrong user or password
    LOCKED = "locked"  # too many failures: temporary lockout
    DISABLED = "disabled"


@dataclass(frozen=True)
class AuthResult:
    outcome: AuthOutcome
    account: Account | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is AuthOutcome.OK


class _Failures:
    """Failure timestamps per key, with a lockout deadline."""

    def __init__(self) -> None:
        self.times: dict[str, deque[float]] = {}
        self.locked_until: dict[str, float] = {}

    def recent(self, key: str, now: float, window: float) -> int:
        q = self.times.get(key)
        if not q:
            return 0
        while q and q[0] < now - window:
            q.popleft()
        if not q:
            del self.times[key]
            return 0
        return len(q)

    def add(self, key: str, now: float) -> None:
        self.times.setdefault(key, deque()).append(now)

    def clear(self, key: str) -> None:
        self.times.pop(key, None)

    def locked(self, key: str, now: float) -> bool:
        until = self.locked_until.get(key)
        if until is None:
            return False
        if until <= now:
            del self.locked_until[key]
            return False
        return True


def make_hasher(cfg: AuthConfig) -> PasswordHasher:
    return PasswordHasher(
        time_cost=cfg.argon2_time_cost,
        memory_cost=cfg.argon2_memory_kib,
        parallelism=cfg.argon2_parallelism,
    )


def password_problem(password: str, min_length: int) -> str | None:
    """Why a new password is refused, or None. Kept simple and explicit for operators."""
    if not password:
        return "the password is empty"
    if len(password) < min_length:
        return f"the password is shorter than {min_length} characters"
    if password.strip() != password:
        return "the password starts or ends with white space"
    if len(set(password)) < 4:
        return "the password is too weak (too few different characters)"
    if password.lower() in {"password", "passwort", "12345678", "123456789", "qwertyui", "postfach"}:
        return "the password is too common"
    return None


class Authenticator:
    def __init__(self, store: Store, cfg: AuthConfig, *, clock: Callable[[], float] | None = None) -> None:
        self._store = store
        self._cfg = cfg
        self._hasher = make_hasher(cfg)
        self._dummy_hash = self._hasher.hash(_DUMMY_PASSWORD)
        self._failures = _Failures()
        self._networks = cfg.networks()
        self._clock = clock or time.monotonic
        # ``serve --workers N``: where this process's login outcomes go for the other workers'
        # counts (set_relay); what they saw arrives through apply_remote.
        self._relay: Callable[[tuple[str, ...]], None] | None = None

    def set_relay(self, relay: Callable[[tuple[str, ...]], None] | None) -> None:
        """Send every failed login (and every success, which clears the account's count) to the
        other worker processes, so that throttling and lockout count over all of them. One
        message per outcome, no round trip: a login never waits for the other workers."""
        self._relay = relay

    def apply_remote(self, event: tuple[str, ...]) -> None:
        """A login outcome another worker saw: ("failed", user, ip) or ("ok", user)."""
        if len(event) == 3 and event[0] == "failed":
            self._record_failure(str(event[1]), str(event[2]), remote=True)
        elif len(event) == 2 and event[0] == "ok":
            self._failures.clear(f"user:{event[1]}")

    def _send(self, event: tuple[str, ...]) -> None:
        if self._relay is not None:
            try:
                self._relay(event)
            except Exception:  # the other workers count a little less; the login goes on
                log.exception("auth: relaying a login outcome to the other workers failed")

    # --- policy -----------------------------------------------------------------------------------
    def cleartext_allowed(self, remote_ip: str) -> bool:
        """True when a password may be sent without TLS from this address ([auth] cleartext_networks)."""
        try:
            ip = ipaddress.ip_address(remote_ip.split("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip.version == n.version and ip in n for n in self._networks)

    # --- hashing ----------------------------------------------------------------------------------
    async def hash_password(self, password: str) -> str:
        return await asyncio.to_thread(self._hasher.hash, password)

    def _verify(self, hashed: str, password: str) -> bool:
        try:
            return self._hasher.verify(hashed, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    # --- logins -----------------------------------------------------------------------------------
    def _record_failure(self, user: str, remote_ip: str, *, remote: bool = False) -> int:
        """Count a failure for the IP and the account; lock both out at ``lockout_failures``
        within ``window_seconds``. Returns the higher of the two counts."""
        now = self._clock()
        ip_key, user_key = f"ip:{remote_ip}", f"user:{user}"
        window = self._cfg.window_seconds
        self._failures.add(ip_key, now)
        self._failures.add(user_key, now)
        count = max(self._failures.recent(ip_key, now, window), self._failures.recent(user_key, now, window))
        if count >= self._cfg.lockout_failures:
            until = now + self._cfg.lockout_seconds
            locked = self._failures.locked(ip_key, now) and self._failures.locked(user_key, now)
            self._failures.locked_until[ip_key] = until
            self._failures.locked_until[user_key] = until
            if not (remote and locked):
                log.warning("auth lockout: user=%s ip=%s for %ds%s", user, remote_ip, self._cfg.lockout_seconds,
                            " (failures seen by another worker)" if remote else "")
        return count

    def _delay_for(self, failures: int) -> float:
        extra = failures - self._cfg.free_failures
        if extra < 0:
            return 0.0
        return float(min(self._cfg.failure_delay_seconds * (2**extra), self._cfg.max_failure_delay_seconds))

    async def authenticate_credentials(self, creds: Credentials, *, remote_ip: str, protocol: str) -> AuthResult:
        # RFC 4616 §2: an authzid equal to the authcid (neomutt sends it) is the same identity.
        if creds.authzid and creds.authzid.lower() != creds.authcid.lower():
            log.info("auth %s refused: authorization identity differs (ip=%s)", protocol, remote_ip)
            return await self._fail(creds.authcid, remote_ip, protocol)
        return await self.authenticate(creds.authcid, creds.password, remote_ip=remote_ip, protocol=protocol)

    async def authenticate(self, username: str, password: str, *, remote_ip: str, protocol: str) -> AuthResult:
        user = username.strip().lower()
        now = self._clock()
        ip_key, user_key = f"ip:{remote_ip}", f"user:{user}"
        if self._failures.locked(ip_key, now) or self._failures.locked(user_key, now):
            log.warning("auth %s locked out: user=%s ip=%s", protocol, user, remote_ip)
            return AuthResult(AuthOutcome.LOCKED)
        account = await self._store.get_account(user) if "@" in user else None
        hashed = account.password_hash if account is not None else self._dummy_hash
        ok = await asyncio.to_thread(self._verify, hashed, password)
        if ok and account is not None:
            if account.disabled:
                log.info("auth %s refused: account disabled user=%s ip=%s", protocol, user, remote_ip)
                return AuthResult(AuthOutcome.DISABLED)
            self._failures.clear(user_key)
            self._send(("ok", user))
            log.info("auth %s ok: user=%s ip=%s", protocol, user, remote_ip)
            if self._hasher.check_needs_rehash(hashed):
                try:
                    await self._store.set_password(account.id, await self.hash_password(password))
                except Exception:  # a rehash is an optimisation; never fail a login for it
                    log.exception("rehash failed for %s", user)
            return AuthResult(AuthOutcome.OK, account)
        return await self._fail(user, remote_ip, protocol)

    async def _fail(self, user: str, remote_ip: str, protocol: str) -> AuthResult:
        count = self._record_failure(user, remote_ip)
        log.info("auth %s failed: user=%s ip=%s failures=%d", protocol, user, remote_ip, count)
        self._send(("failed", user, remote_ip))
        delay = self._delay_for(count)
        if delay:
            await asyncio.sleep(delay)
        return AuthResult(AuthOutcome.FAILED)
