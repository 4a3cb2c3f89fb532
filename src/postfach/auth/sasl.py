"""Sans-I/O SASL mechanisms shared by IMAP, POP3 and SMTP (RFC 4422 family).

The protocol layer base64-decodes what the client sends and hands raw bytes to ``step``; ``step``
returns either a ``Challenge`` (raw bytes to base64-encode and send) or ``Credentials`` once the
exchange is complete. Errors raise ``SaslError``; ``"*"`` cancellation is the protocol's business.
"""

from __future__ import annotations

from dataclasses import dataclass

MECHANISMS = ("PLAIN", "LOGIN")


class SaslError(Exception):
    """The client's SASL data is malformed (the protocol answers BAD / -ERR / 501 5.5.2)."""


@dataclass(frozen=True)
class Challenge:
    data: bytes


@dataclass(frozen=True)
class Credentials:
    authcid: str  # the authentication identity (user name)
    password: str
    authzid: str = ""  # the authorization identity; we accept "" or the authcid itself


def _utf8(b: bytes, what: str) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError(f"{what} is not UTF-8") from None


class Plain:
    """RFC 4616: message = [authzid] NUL authcid NUL passwd, in one step."""

    name = "PLAIN"

    def __init__(self) -> None:
        self._done = False

    def step(self, data: bytes | None) -> Challenge | Credentials:
        if self._done:
            raise SaslError("exchange already complete")
        if data is None:  # no initial response: send an empty challenge ("+ ")
            return Challenge(b"")
        parts = data.split(b"\x00")
        if len(parts) != 3:
            raise SaslError("PLAIN needs authzid NUL authcid NUL password")
        authzid, authcid, password = (_utf8(p, "PLAIN data") for p in parts)
        if not authcid or not password:
            raise SaslError("PLAIN: empty user name or password")
        self._done = True
        return Credentials(authcid=authcid, password=password, authzid=authzid)


class Login:
    """The LOGIN mechanism (draft-murchison-sasl-login): "Username:" then "Password:".
    An initial response, as Outlook for Mac sends, is the user name."""

    name = "LOGIN"

    def __init__(self) -> None:
        self._user: str | None = None
        self._done = False

    def step(self, data: bytes | None) -> Challenge | Credentials:
        if self._done:
            raise SaslError("exchange already complete")
        if self._user is None:
            if data is None:
                return Challenge(b"Username:")
            self._user = _utf8(data, "user name")
            if not self._user:
                raise SaslError("LOGIN: empty user name")
            return Challenge(b"Password:")
        if data is None:
            return Challenge(b"Password:")
        self._done = True
        return Credentials(authcid=self._user, password=_utf8(data, "password"))


Mechanism = Plain | Login


def start(name: str) -> Mechanism | None:
    """A fresh mechanism for ``name`` (case-insensitive), or None when we do not offer it."""
    match name.upper():
        case "PLAIN":
            return Plain()
        case "LOGIN":
            return Login()
    return None
