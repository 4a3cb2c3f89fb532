"""SMTP server: submission (587/465/any), MX (25) and local delivery.

- ``codes``: named replies with enhanced status codes
- ``parser``: sans-I/O receiver (command lines, DATA, BDAT) and command parser
- ``session``: the state machine shared by submission and MX, and ``Conversation``
- ``policy``: what differs between submission and MX
- ``delivery``: local recipients, quota, the durable store write
- ``connection``: ``handle(ctx, conn, reader, writer)``, the asyncio driver
"""

from __future__ import annotations
