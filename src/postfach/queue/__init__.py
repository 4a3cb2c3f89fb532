"""The outbound queue: scheduler (retries, bounces), delivery (MX, SMTP client), DSNs, admin CLI."""

from __future__ import annotations
