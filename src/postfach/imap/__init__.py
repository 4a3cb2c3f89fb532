"""IMAP4rev2 / IMAP4rev1 server: sans-I/O wire layers, a session state machine, an asyncio driver."""

from __future__ import annotations
