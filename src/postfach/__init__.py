"""postfach — a complete mail server (IMAP, POP3, SMTP) in one Python program."""

from __future__ import annotations

__version__ = "0.1.0"
