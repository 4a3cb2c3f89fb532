"""The message model: frozen dataclasses produced once at ingest and cached as JSON.

Offsets (``header_start``, ``header_end``, ``body_end``) always index the original message
bytes, including for parts of embedded ``message/rfc822`` messages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

Params = tuple[tuple[str, str], ...]

JSON_VERSION = 1


@dataclass(frozen=True, slots=True)
class Address:
    """One IMAP address structure (RFC 3501 §7.4.2 / RFC 9051 §7.5.2).

    Group syntax: a group start is ``Address(None, None, group_name, None)`` and the group end is
    ``Address(None, None, None, None)``.
    """

    name: str | None
    adl: str | None
    mailbox: str | None
    host: str | None

    @property
    def is_group_marker(self) -> bool:
        return self.host is None


@dataclass(frozen=True, slots=True)
class Envelope:
    """Raw (unfolded, RFC 2047 still encoded) envelope values; ``None`` where the field is absent.

    Sender/Reply-To defaulting to From (RFC 3501 §7.4.2) happens when serialising, so this
    stays faithful to the message.
    """

    date: str | None = None
    subject: str | None = None
    from_: tuple[Address, ...] | None = None
    sender: tuple[Address, ...] | None = None
    reply_to: tuple[Address, ...] | None = None
    to: tuple[Address, ...] | None = None
    cc: tuple[Address, ...] | None = None
    bcc: tuple[Address, ...] | None = None
    in_reply_to: str | None = None
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class BodyPart:
    """One MIME entity. ``content_type``/``subtype`` are lowercase; ``raw_type``/``raw_subtype``
    keep the spelling of the header (``TEXT``/``PLAIN`` when defaulted) for BODYSTRUCTURE.
    ``params`` keep the spelling of their names; values are RFC 2231-decoded (continuations
    joined, charset applied). Use :meth:`param` for case-insensitive lookup."""

    content_type: str
    subtype: str
    params: Params
    id: str | None
    description: str | None
    encoding: str
    md5: str | None
    disposition: tuple[str, Params] | None
    language: tuple[str, ...] | None
    location: str | None
    header_start: int
    header_end: int
    body_end: int
    lines: int
    size: int
    children: tuple[BodyPart, ...] = ()
    message: MessageInfo | None = None
    raw_type: str = ""
    raw_subtype: str = ""

    @property
    def is_multipart(self) -> bool:
        """A multipart container: multipart/* with a boundary parameter. Without a boundary
        the part is a leaf of that type (as Dovecot treats it), whose body is part 1."""
        return self.content_type == "multipart" and bool(self.param("boundary"))

    @property
    def is_message(self) -> bool:
        """True for message/rfc822 and message/global (body-type-msg in IMAP)."""
        return self.content_type == "message" and self.subtype in ("rfc822", "global")

    def param(self, name: str) -> str | None:
        """Value of a Content-Type parameter (case-insensitive name), or None."""
        name = name.lower()
        for key, value in self.params:
            if key.lower() == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """Everything IMAP needs about one message (or one embedded message)."""

    size: int
    root: BodyPart
    envelope: Envelope
    subject: str = ""
    base_subject: str = ""
    date: datetime | None = None
    from_addr: str = ""
    to_addr: str = ""
    cc_addr: str = ""
    message_id: str = ""
    in_reply_to: str = ""
    references: tuple[str, ...] = ()
    display_from: str = ""
    display_to: str = ""

    def to_json(self) -> bytes:
        return json.dumps(_info_to_obj(self), separators=(",", ":")).encode("ascii")

    @classmethod
    def from_json(cls, b: bytes) -> MessageInfo:
        """Inverse of :meth:`to_json`. Raises ValueError for anything it did not make (an old
        cache version or corrupt bytes): the caller then parses the message again."""
        try:
            obj = json.loads(b)
            if not isinstance(obj, dict) or obj.get("v") != JSON_VERSION:
                raise ValueError("unsupported MessageInfo JSON version")
            return _info_from_obj(obj)
        except (KeyError, IndexError, TypeError, AttributeError, RecursionError) as e:
            raise ValueError(f"corrupt MessageInfo JSON: {e!r}") from e


# --- JSON (compact positional lists; the "v" key lets the store detect stale caches) ---


def _addrs_to_obj(addrs: tuple[Address, ...] | None) -> list[list[str | None]] | None:
    if addrs is None:
        return None
    return [[a.name, a.adl, a.mailbox, a.host] for a in addrs]


def _addrs_from_obj(obj: list[list[str | None]] | None) -> tuple[Address, ...] | None:
    if obj is None:
        return None
    return tuple(Address(a[0], a[1], a[2], a[3]) for a in obj)


def _params_to_obj(params: Params) -> list[list[str]]:
    return [[k, v] for k, v in params]


def _params_from_obj(obj: list[list[str]]) -> Params:
    return tuple((str(k), str(v)) for k, v in obj)


def _part_to_obj(p: BodyPart) -> list[Any]:
    return [
        p.content_type,
        p.subtype,
        p.raw_type,
        p.raw_subtype,
        _params_to_obj(p.params),
        p.id,
        p.description,
        p.encoding,
        p.md5,
        None if p.disposition is None else [p.disposition[0], _params_to_obj(p.disposition[1])],
        None if p.language is None else list(p.language),
        p.location,
        p.header_start,
        p.header_end,
        p.body_end,
        p.lines,
        p.size,
        [_part_to_obj(c) for c in p.children],
        None if p.message is None else _info_to_obj(p.message),
    ]


def _part_from_obj(o: list[Any]) -> BodyPart:
    disp = o[9]
    lang = o[10]
    return BodyPart(
        content_type=o[0],
        subtype=o[1],
        raw_type=o[2],
        raw_subtype=o[3],
        params=_params_from_obj(o[4]),
        id=o[5],
        description=o[6],
        encoding=o[7],
        md5=o[8],
        disposition=None if disp is None else (disp[0], _params_from_obj(disp[1])),
        language=None if lang is None else tuple(lang),
        location=o[11],
        header_start=o[12],
        header_end=o[13],
        body_end=o[14],
        lines=o[15],
        size=o[16],
        children=tuple(_part_from_obj(c) for c in o[17]),
        message=None if o[18] is None else _info_from_obj(o[18]),
    )


def _info_to_obj(m: MessageInfo) -> dict[str, Any]:
    e = m.envelope
    return {
        "v": JSON_VERSION,
        "size": m.size,
        "root": _part_to_obj(m.root),
        "env": [
            e.date,
            e.subject,
            _addrs_to_obj(e.from_),
            _addrs_to_obj(e.sender),
            _addrs_to_obj(e.reply_to),
            _addrs_to_obj(e.to),
            _addrs_to_obj(e.cc),
            _addrs_to_obj(e.bcc),
            e.in_reply_to,
            e.message_id,
        ],
        "subject": m.subject,
        "base_subject": m.base_subject,
        "date": None if m.date is None else m.date.isoformat(),
        "from": m.from_addr,
        "to": m.to_addr,
        "cc": m.cc_addr,
        "message_id": m.message_id,
        "in_reply_to": m.in_reply_to,
        "references": list(m.references),
        "display_from": m.display_from,
        "display_to": m.display_to,
    }


def _info_from_obj(o: dict[str, Any]) -> MessageInfo:
    env = o["env"]
    date = o["date"]
    return MessageInfo(
        size=o["size"],
        root=_part_from_obj(o["root"]),
        envelope=Envelope(
            date=env[0],
            subject=env[1],
            from_=_addrs_from_obj(env[2]),
            sender=_addrs_from_obj(env[3]),
            reply_to=_addrs_from_obj(env[4]),
            to=_addrs_from_obj(env[5]),
            cc=_addrs_from_obj(env[6]),
            bcc=_addrs_from_obj(env[7]),
            in_reply_to=env[8],
            message_id=env[9],
        ),
        subject=o["subject"],
        base_subject=o["base_subject"],
        date=None if date is None else datetime.fromisoformat(date),
        from_addr=o["from"],
        to_addr=o["to"],
        cc_addr=o["cc"],
        message_id=o["message_id"],
        in_reply_to=o["in_reply_to"],
        references=tuple(o["references"]),
        display_from=o["display_from"],
        display_to=o["display_to"],
    )
