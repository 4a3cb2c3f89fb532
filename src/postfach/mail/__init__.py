"""postfach.mail — the message model (stdlib only; imports nothing else from postfach).

Each message is parsed once at ingest by :func:`parse_message` into a :class:`MessageInfo`
(a MIME tree with byte offsets into the original, unchanged bytes, plus the envelope and the
SORT/THREAD keys). The store caches it with :meth:`MessageInfo.to_json`. Everything IMAP needs
later (ENVELOPE, BODY/BODYSTRUCTURE, BODY[section], BINARY[section], header and text search)
is computed from the raw bytes plus that MessageInfo.
"""

from __future__ import annotations

from postfach.mail.address import parse_addr_spec, parse_address_list
from postfach.mail.headers import decode_2047
from postfach.mail.imap import imap_bodystructure, imap_envelope
from postfach.mail.model import Address, BodyPart, Envelope, MessageInfo
from postfach.mail.parser import base_subject, parse_date, parse_message
from postfach.mail.sections import (
    decoded_part_bytes,
    header_fields,
    header_values,
    search_text,
    section_bytes,
)

__all__ = [
    "Address",
    "BodyPart",
    "Envelope",
    "MessageInfo",
    "base_subject",
    "decode_2047",
    "decoded_part_bytes",
    "header_fields",
    "header_values",
    "imap_bodystructure",
    "imap_envelope",
    "parse_addr_spec",
    "parse_address_list",
    "parse_date",
    "parse_message",
    "search_text",
    "section_bytes",
]
