"""ARCHITECTURE.md: ``mail/`` may import the stdlib and nothing of ours, and never asyncio."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import postfach.mail

PACKAGE = Path(postfach.mail.__file__).parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_mail_imports_only_stdlib_and_itself() -> None:
    files = sorted(PACKAGE.glob("*.py"))
    assert files
    for path in files:
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "postfach":
                assert name == "postfach.mail" or name.startswith("postfach.mail."), (path.name, name)
            else:
                assert top in sys.stdlib_module_names, (path.name, name)
            assert top != "asyncio", path.name


def test_public_api_names() -> None:
    for name in (
        "parse_message",
        "MessageInfo",
        "BodyPart",
        "Envelope",
        "Address",
        "imap_envelope",
        "imap_bodystructure",
        "section_bytes",
        "header_fields",
        "decoded_part_bytes",
        "header_values",
        "search_text",
        "parse_address_list",
        "parse_addr_spec",
    ):
        assert name in postfach.mail.__all__
        assert getattr(postfach.mail, name) is not None
