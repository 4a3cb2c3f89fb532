"""Every named reply: the number in its name, its code and its enhanced-code class agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from postfach.smtp import codes
from postfach.smtp.codes import Reply


@pytest.mark.parametrize("name", sorted(codes.ALL_REPLIES))
def test_name_code_and_class_agree(name: str) -> None:
    reply = codes.ALL_REPLIES[name]
    m = re.match(r"^R(\d{3})_[A-Z0-9_]+$", name)
    assert m, name
    assert int(m.group(1)) == reply.code
    if reply.enhanced is not None:
        assert reply.enhanced[0] == str(reply.code)[0]
    else:
        # RFC 2034 §3: only the greeting, HELO/EHLO answers and 3xx continuations go without.
        assert reply.code in (220, 334, 354), name


def test_every_error_carries_an_enhanced_code() -> None:
    for name, reply in codes.ALL_REPLIES.items():
        if reply.code >= 400:
            assert reply.enhanced is not None, name


def test_wire_format_multiline_and_no_injection() -> None:
    r = Reply(250, None, ("host", "PIPELINING", "SIZE 10"))
    assert r.to_bytes() == b"250-host\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
    evil = codes.R550_NO_SUCH_USER.with_text("<a@b>\r\n250 fake")
    assert evil.to_bytes().count(b"\r\n") == 1


def test_mismatched_class_is_refused() -> None:
    with pytest.raises(ValueError):
        Reply(550, "4.1.1", ("x",))
    with pytest.raises(ValueError):
        Reply(99, None, ("x",))


@pytest.mark.parametrize("module", ["codes", "parser"])
def test_sans_io_modules_do_not_import_asyncio(module: str) -> None:
    src = Path(__file__).resolve().parents[3] / "src" / "postfach" / "smtp" / f"{module}.py"
    text = src.read_text(encoding="utf-8")
    assert not re.search(r"^\s*(import asyncio|from asyncio)", text, re.M)
