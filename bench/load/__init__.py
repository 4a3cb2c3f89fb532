"""Load-generator code shared by the benchmarks, the soak run and the reliability tests.

``server`` runs a real ``postfach serve`` subprocess (made by ``postfach init --dev``) and reads its
bound ports from the log; ``clients`` speaks SMTP, IMAP and POP3 over real TLS with the stdlib
clients (smtplib, imaplib, poplib) and records every acknowledged write; ``aimap`` is a small
asyncio IMAP client for many concurrent connections.
"""

from __future__ import annotations
