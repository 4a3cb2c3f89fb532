"""The exception tree. Each store/domain error carries enough for a protocol to pick its reply."""

from __future__ import annotations


class PostfachError(Exception):
    """Root of every error postfach raises on purpose."""


class ConfigError(PostfachError):
    """A configuration file is wrong; the message names file, key and problem."""


class UsageError(PostfachError):
    """A CLI call is wrong (bad address, duplicate user, ...); one line for the operator."""


class StoreError(PostfachError):
    """The store could not do what was asked."""


class NotFound(StoreError):
    """The account, mailbox, message or queue item does not exist."""


class AlreadyExists(StoreError):
    """A domain, account, alias or mailbox of that name exists already."""


class MailboxInUse(StoreError):
    """The operation needs exclusive access (POP3 maildrop lock) that another session holds."""


class QuotaExceeded(StoreError):
    """The write would take the account over its storage or message limit."""

    def __init__(self, message: str = "quota exceeded", *, resource: str = "STORAGE") -> None:
        super().__init__(message)
        self.resource = resource


class TooManyEntries(StoreError):
    """A metadata write would take a mailbox (or the server entries) or the account over its
    entry limit (IMAP answers NO [METADATA TOOMANY], RFC 5464 §4.3)."""


class NotPermitted(StoreError):
    """The operation is not allowed on this object (e.g. deleting INBOX)."""


class StorageFull(StoreError):
    """The disk is full or another temporary I/O failure: the caller answers with a temporary error."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached right now (temporary)."""
