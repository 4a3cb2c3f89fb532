"""Local delivery: who a recipient address is, whether it has room, and the one durable write.

Resolution order for ``local@domain`` (Postfix virtual(5) + virtual_alias_maps semantics):

1. aliases of the exact address (``store.aliases_for``); an alias pointing to itself keeps a copy
   in the account of that address; targets in our domains are resolved again (up to 10 hops,
   loops are cut), targets elsewhere go to the outbound queue;
2. the account of that address;
3. ``user+tag@domain`` → the same lookups for ``user@domain``; a direct account delivery goes into
   the folder ``tag`` when the account has one (any case), else INBOX (Dovecot lda style);
4. the catch-all alias ``@domain``;
5. otherwise the recipient is unknown: ``550 5.1.1`` at RCPT time.

Before all that, an SRS address of ours (``SRS0=...@``/``SRS1=...@`` one of our domains, see
srs.py) is verified and stands for the address it encodes (local or remote, usually a bounce on
its way back to the original sender of forwarded mail); one that does not verify is unknown.

``deliver`` makes one ``store.deliver`` call for every local copy (one blob, one commit) with
per-recipient ``Return-Path`` and ``Delivered-To`` lines; it returns only when that is durable.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from postfach.config import Config
from postfach.errors import QuotaExceeded, StorageFull, StoreUnavailable
from postfach.smtp import codes
from postfach.smtp.codes import Reply
from postfach.smtp.srs import Srs, SrsError, is_srs
from postfach.store.base import Account, DeliveryTarget, Store

log = logging.getLogger("postfach.smtp")

MAX_ALIAS_HOPS = 10


class DeliveryError(Exception):
    """Delivery failed; carries the reply for the client."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class LocalRecipient:
    account: Account
    mailbox: str  # "INBOX" or a +tag folder
    delivered_to: str  # the address written into Delivered-To


@dataclass(frozen=True, slots=True)
class Resolution:
    local: tuple[LocalRecipient, ...]
    remote: tuple[str, ...]  # alias targets outside our domains: to the outbound queue


def split_address(address: str) -> tuple[str, str]:
    local, _, domain = address.rpartition("@")
    return local, domain


def a_label(domain: str) -> str:
    """The domain as the store keeps it: lower-case IDNA A-labels (RFC 6531 allows U-labels in SMTP)."""
    domain = domain.rstrip(".")
    if not domain.isascii():
        with contextlib.suppress(UnicodeError):  # not an IDN we can encode: look it up as it is
            domain = domain.encode("idna").decode("ascii")
    return domain.lower()


def normalize(address: str) -> str:
    """Lower-case local@domain as the store keeps it (accounts and aliases are lower-case)."""
    local, domain = split_address(address)
    return f"{local.lower()}@{a_label(domain)}"


class LocalDelivery:
    def __init__(self, store: Store, config: Config, srs: Srs | None = None) -> None:
        self.store = store
        self.config = config
        self.srs = srs
        # One LocalDelivery lives as long as one SMTP session: domains added or removed meanwhile
        # count from the next connection on (Postfix reads its tables per process the same way).
        self._domains: dict[str, bool] = {}

    # --- domains ---------------------------------------------------------------------------------
    async def is_local_domain(self, domain: str) -> bool:
        name = a_label(domain)
        known = self._domains.get(name)
        if known is None:
            known = await self.store.get_domain(name) is not None
            if len(self._domains) < 1000:
                self._domains[name] = known
        return known

    async def is_local_address(self, address: str) -> bool:
        """Our domain, or an address some alias is defined for (alias-only domains)."""
        addr = normalize(address)
        local, domain = split_address(addr)
        if await self.is_local_domain(domain):
            return True
        if self.srs is not None and is_srs(local) and domain == self.srs_domain_override():
            return True
        return bool(await self.store.aliases_for(addr)) or bool(await self.store.aliases_for("@" + domain))

    async def postmaster(self) -> str:
        """RFC 5321 §4.1.1.3 "<Postmaster>": postmaster of the host name's domain (or the first one)."""
        domains = [d.name for d in await self.store.list_domains()]
        host = self.config.hostname.lower()
        for name in sorted(domains, key=len, reverse=True):
            if host == name or host.endswith("." + name):
                return f"postmaster@{name}"
        return f"postmaster@{domains[0]}" if domains else f"postmaster@{host}"

    # --- SRS -------------------------------------------------------------------------------------
    def srs_domain_override(self) -> str:
        return a_label(self.config.smtp.srs_domain) if self.config.smtp.srs_domain else ""

    async def forward_sender(self, sender: str, alias_address: str) -> str:
        """The envelope sender for a copy that the alias ``alias_address`` forwards to a remote
        address: SRS-rewritten into our domain unless it is null or one of ours already (then
        SPF at the receiver passes without it, and submission stays untouched)."""
        if self.srs is None or not sender:
            return sender
        _, sdomain = split_address(sender)
        if await self.is_local_domain(sdomain):
            return sender
        domain = self.srs_domain_override() or split_address(normalize(alias_address))[1]
        return self.srs.forward(sender, domain)

    async def _srs_reverse(self, addr: str) -> str | None:
        """The address an SRS address of ours encodes; "" when it does not verify; None when
        ``addr`` is not an SRS address of ours."""
        if self.srs is None:
            return None
        lpart, domain = split_address(addr)  # the local part as given: it carries the original's
        domain = a_label(domain)
        if not is_srs(lpart):
            return None
        if domain != self.srs_domain_override() and not await self.is_local_domain(domain):
            return None
        try:
            original = self.srs.reverse(f"{lpart}@{domain}")
        except SrsError as e:
            log.info("SRS address <%s> refused: %s", addr, e)
            return ""
        return original or None

    # --- resolution ------------------------------------------------------------------------------
    async def resolve(self, address: str) -> Resolution | None:
        """The local and remote targets of a local address; None when nobody is known there."""
        local: dict[tuple[int, str], LocalRecipient] = {}
        remote: list[str] = []
        original = await self._srs_reverse(address)
        if original is not None:
            if not original:
                return None  # forged, damaged or expired: 550 5.1.1
            _, odomain = split_address(original)
            if not await self.is_local_domain(odomain):
                return Resolution((), (original,))
            address = original  # e.g. a bounce of mail one of our users sent through a forwarder
        found = await self._expand(normalize(address), local, remote, set(), 0)
        if not found or (not local and not remote):  # unknown, or aliases that lead nowhere (a loop)
            return None
        return Resolution(tuple(local.values()), tuple(dict.fromkeys(remote)))

    async def _expand(
        self,
        addr: str,
        local: dict[tuple[int, str], LocalRecipient],
        remote: list[str],
        seen: set[str],
        depth: int,
    ) -> bool:
        if depth > MAX_ALIAS_HOPS or addr in seen:
            return depth > 0  # a loop or a long chain: what was found so far stands
        seen.add(addr)
        lpart, domain = split_address(addr)
        if await self._alias_targets(addr, local, remote, seen, depth):
            return True
        account = await self.store.get_account(addr)
        if account is not None:
            local.setdefault((account.id, "INBOX"), LocalRecipient(account, "INBOX", addr))
            return True
        if "+" in lpart:
            base = f"{lpart.split('+', 1)[0]}@{domain}"
            tag = lpart.split("+", 1)[1]
            if await self._alias_targets(base, local, remote, seen, depth):
                return True
            account = await self.store.get_account(base)
            if account is not None:
                folder = await self._tag_folder(account, tag)
                local.setdefault((account.id, folder), LocalRecipient(account, folder, addr))
                return True
        return await self._alias_targets("@" + domain, local, remote, seen, depth)

    async def _alias_targets(
        self,
        source: str,
        local: dict[tuple[int, str], LocalRecipient],
        remote: list[str],
        seen: set[str],
        depth: int,
    ) -> bool:
        aliases = await self.store.aliases_for(source)
        if not aliases:
            return False
        for alias in aliases:
            target = normalize(alias.target)
            if target == source:
                # "a@x -> a@x": keep a copy in the account itself (Postfix idiom).
                account = await self.store.get_account(target)
                if account is not None:
                    local.setdefault((account.id, "INBOX"), LocalRecipient(account, "INBOX", target))
                continue
            _, tdomain = split_address(target)
            if await self.is_local_domain(tdomain):
                if not await self._expand(target, local, remote, seen, depth + 1):
                    log.warning("alias %s -> %s: target unknown, dropped", source, target)
            else:
                remote.append(alias.target)
        return True

    async def _tag_folder(self, account: Account, tag: str) -> str:
        if not tag:
            return "INBOX"
        mbox = await self.store.get_mailbox(account.id, tag)
        if mbox is not None:
            return mbox.name
        for m in await self.store.list_mailboxes(account.id):
            if m.name.lower() == tag.lower():
                return m.name
        return "INBOX"

    # --- quota -----------------------------------------------------------------------------------
    def over_quota_reply(self) -> Reply:
        return codes.R552_OVER_QUOTA if self.config.smtp.over_quota_reply == "552" else codes.R452_OVER_QUOTA

    async def quota_problem(self, resolution: Resolution, size: int) -> Reply | None:
        """RCPT-time quota check for every local target (the store re-checks at delivery)."""
        for rcpt in resolution.local:
            account = rcpt.account  # read by resolve() just now: usage is current
            if account.quota_bytes is not None and account.used_bytes + size > account.quota_bytes:
                return self.over_quota_reply()
            if account.quota_messages is not None and account.used_messages + 1 > account.quota_messages:
                return self.over_quota_reply()
        return None

    # --- the write -------------------------------------------------------------------------------
    async def deliver(
        self, data: bytes, sender: str, recipients: Sequence[LocalRecipient], *, junk: bool = False
    ) -> None:
        """One durable ``store.deliver`` for every local copy; raises DeliveryError with the reply."""
        targets: dict[tuple[int, str], DeliveryTarget] = {}
        return_path = f"Return-Path: <{sender}>\r\n".encode()
        for r in recipients:
            mailbox = "Junk" if junk else r.mailbox
            key = (r.account.id, mailbox)
            if key in targets:
                continue
            prepend = return_path + f"Delivered-To: {r.delivered_to}\r\n".encode()
            flags = frozenset({"$Junk"}) if junk else frozenset()
            targets[key] = DeliveryTarget(r.account.id, mailbox, flags, prepend)
        if not targets:
            return
        try:
            await self.store.deliver(data, list(targets.values()))
        except QuotaExceeded as e:
            log.info("delivery refused, over quota: %s", e)
            raise DeliveryError(self.over_quota_reply()) from e
        except StorageFull as e:
            log.warning("delivery failed, storage full: %s", e)
            raise DeliveryError(codes.R452_STORAGE_FULL) from e
        except StoreUnavailable as e:
            log.warning("delivery failed, store unavailable: %s", e)
            raise DeliveryError(codes.R451_LOCAL_ERROR) from e
