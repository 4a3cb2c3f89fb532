"""Named SMTP replies with RFC 3463 enhanced status codes (RFC 2034 ENHANCEDSTATUSCODES).

Every reply the server sends is a ``Reply``. The name of each constant carries its basic code
(``R250_OK``), and a unit test checks that name, code and the class digit of the enhanced code agree
(aiosmtpd ``qa/test_1testsuite.py``). RFC 2034 §3: the greeting and the answer to HELO/EHLO carry no
enhanced code; every other reply does.

Pure module: no asyncio, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str | None  # "2.0.0"; None only for the greeting and the HELO/EHLO answer
    lines: tuple[str, ...]

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"bad SMTP reply code {self.code}")
        if self.enhanced is not None:
            parts = self.enhanced.split(".")
            if len(parts) != 3 or not all(p.isdigit() for p in parts) or parts[0] != str(self.code)[0]:
                raise ValueError(f"enhanced code {self.enhanced} does not fit {self.code}")

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def is_error(self) -> bool:
        return self.code >= 400

    @property
    def is_success(self) -> bool:
        return self.code < 400

    def with_text(self, *lines: str) -> Reply:
        """Same code and enhanced code, other wording (e.g. naming an address)."""
        return replace(self, lines=tuple(lines))

    def to_bytes(self) -> bytes:
        """Wire form: ``250-...`` continuation lines, ``250 ...`` last line (RFC 5321 §4.2.1)."""
        out: list[bytes] = []
        n = len(self.lines)
        for i, line in enumerate(self.lines or ("",)):
            sep = " " if i == n - 1 or n == 0 else "-"
            text = f"{self.enhanced} {line}" if self.enhanced is not None else line
            # A reply line never carries CR or LF from an argument (reply injection).
            text = text.replace("\r", " ").replace("\n", " ")
            out.append(f"{self.code}{sep}{text}".encode("utf-8", "replace") + b"\r\n")
        return b"".join(out)


def _r(code: int, enhanced: str | None, text: str) -> Reply:
    return Reply(code, enhanced, (text,))


# --- 2xx ------------------------------------------------------------------------------------------
R220_GREETING = _r(220, None, "ESMTP postfach")  # text replaced by "<hostname> ESMTP postfach"
R220_READY_TLS = _r(220, "2.0.0", "Ready to start TLS")
R221_BYE = _r(221, "2.0.0", "Bye")
R235_AUTH_OK = _r(235, "2.7.0", "Authentication successful")
R250_OK = _r(250, "2.0.0", "Ok")
R250_SENDER_OK = _r(250, "2.1.0", "Ok")
R250_RECIPIENT_OK = _r(250, "2.1.5", "Ok")
R250_QUEUED = _r(250, "2.0.0", "Ok: queued")
R250_CHUNK_OK = _r(250, "2.0.0", "Ok: chunk received")
R252_CANNOT_VRFY = _r(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
R214_HELP = _r(214, "2.0.0", "See RFC 5321 and https://www.postfix.org/ for SMTP help")
R334_CHALLENGE = _r(334, None, "")  # AUTH continuation: the text is base64 (RFC 4954 §4)

# --- 3xx ------------------------------------------------------------------------------------------
R354_START_DATA = _r(354, None, "End data with <CR><LF>.<CR><LF>")

# --- 4xx: temporary -------------------------------------------------------------------------------
R421_SHUTDOWN = _r(421, "4.3.2", "Service shutting down, closing transmission channel")
R421_TIMEOUT = _r(421, "4.4.2", "Error: timeout exceeded")
R421_TOO_MANY_ERRORS = _r(421, "4.7.0", "Error: too many errors")
R421_TOO_MANY_CONNECTIONS = _r(421, "4.7.0", "Error: too many connections from your address")
R451_LOCAL_ERROR = _r(451, "4.3.0", "Error: local error in processing, try again later")
R452_TOO_MANY_RECIPIENTS = _r(452, "4.5.3", "Error: too many recipients")
R452_OVER_QUOTA = _r(452, "4.2.2", "Mailbox full: quota exceeded")
R452_STORAGE_FULL = _r(452, "4.3.1", "Insufficient system storage")
R454_TLS_UNAVAILABLE = _r(454, "4.7.0", "TLS not available due to temporary reason")
R454_AUTH_TEMPORARY = _r(454, "4.7.0", "Temporary authentication failure, try again later")

# --- 5xx: permanent -------------------------------------------------------------------------------
R500_LINE_TOO_LONG = _r(500, "5.5.2", "Error: line too long")
R500_UNKNOWN_COMMAND = _r(500, "5.5.2", "Error: command not recognized")
R500_BAD_SYNTAX = _r(500, "5.5.2", "Error: bad syntax")
R501_SYNTAX = _r(501, "5.5.4", "Syntax error in parameters or arguments")
R501_AUTH_ABORTED = _r(501, "5.0.0", "Authentication aborted")
R501_AUTH_BAD_DATA = _r(501, "5.5.2", "Cannot decode response")
R502_NOT_IMPLEMENTED = _r(502, "5.5.1", "Error: command not implemented")
R503_BAD_SEQUENCE = _r(503, "5.5.1", "Error: bad sequence of commands")
R504_AUTH_MECHANISM = _r(504, "5.5.4", "Unrecognized authentication type")
R530_AUTH_REQUIRED = _r(530, "5.7.0", "Authentication required")
R530_STARTTLS_FIRST = _r(530, "5.7.0", "Must issue a STARTTLS command first")
R530_REQUIRETLS_NEEDS_TLS = _r(530, "5.7.10", "REQUIRETLS needs a TLS-protected session")
R535_AUTH_FAILED = _r(535, "5.7.8", "Authentication credentials invalid")
R538_ENCRYPTION_REQUIRED = _r(538, "5.7.11", "Encryption required for requested authentication mechanism")
R550_NO_SUCH_USER = _r(550, "5.1.1", "Recipient address rejected: User unknown")
R550_POLICY_REJECTED = _r(550, "5.7.1", "Message rejected by policy")
R550_BARE_LF = _r(550, "5.5.2", "Error: bare <LF> received")
R550_BARE_CR = _r(550, "5.5.2", "Error: bare <CR> received")
R550_NUL = _r(550, "5.6.0", "Error: message contains NUL characters")
R552_MESSAGE_TOO_BIG = _r(552, "5.3.4", "Error: message file too big")
R552_OVER_QUOTA = _r(552, "5.2.2", "Mailbox full: quota exceeded")
R553_SENDER_NOT_OWNED = _r(553, "5.7.1", "Sender address rejected: not owned by user")
R553_FROM_NOT_OWNED = _r(553, "5.7.1", "From: header address not owned by user")
R553_BAD_ADDRESS = _r(553, "5.1.3", "Error: bad address syntax")
R553_NEEDS_SMTPUTF8 = _r(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")
R554_RELAY_DENIED = _r(554, "5.7.1", "Relay access denied")
R554_NO_VALID_RECIPIENTS = _r(554, "5.5.1", "Error: no valid recipients")
R554_TOO_MANY_HOPS = _r(554, "5.4.6", "Too many hops")
R554_MAIL_LOOP = _r(554, "5.4.6", "Mail forwarding loop")
R555_UNSUPPORTED_PARAMETER = _r(555, "5.5.4", "Unsupported option")

ALL_REPLIES: dict[str, Reply] = {
    name: value for name, value in globals().items() if name.startswith("R") and isinstance(value, Reply)
}
