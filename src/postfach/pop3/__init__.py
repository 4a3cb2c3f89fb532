"""POP3 server: RFC 1939 with CAPA (RFC 2449), STLS (RFC 2595) and SASL (RFC 5034)."""

from __future__ import annotations
