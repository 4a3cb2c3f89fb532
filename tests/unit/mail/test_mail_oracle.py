"""Cross-check against an independent parser: messages built by the stdlib ``email`` package
(random MIME trees) must give the same part types and decoded payloads in our model."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage, Message

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postfach.mail import BodyPart, parse_message
from postfach.mail.sections import decode_body

_text = st.text(alphabet=st.sampled_from(list("abc xyz\n=.-äö€")), max_size=80)
_binary = st.binary(max_size=80)


def _leaf(draw: st.DrawFn) -> EmailMessage:
    m = EmailMessage()
    kind = draw(st.sampled_from(["text", "html", "binary"]))
    if kind == "binary":
        m.set_content(draw(_binary), maintype="application", subtype="octet-stream")
    else:
        cte = draw(st.sampled_from(["quoted-printable", "base64", "8bit"]))
        m.set_content(draw(_text), subtype="plain" if kind == "text" else "html", cte=cte)
    return m


@st.composite
def trees(draw: st.DrawFn, depth: int = 0) -> EmailMessage:
    shape = draw(st.sampled_from(["leaf", "multi", "message"] if depth < 3 else ["leaf"]))
    if shape == "leaf":
        return _leaf(draw)
    if shape == "message":
        inner = draw(trees(depth + 1))
        inner["Subject"] = draw(st.sampled_from(["inner", "Grüße", "x"]))
        outer = EmailMessage()
        outer.set_content(inner)
        return outer
    m = EmailMessage()
    m.make_mixed()
    for _ in range(draw(st.integers(1, 3))):
        m.attach(draw(trees(depth + 1)))
    return m


def _ours(data: bytes, part: BodyPart, out: list[tuple[str, bytes | None]]) -> None:
    ctype = f"{part.content_type}/{part.subtype}"
    if part.is_multipart:
        out.append((ctype, None))
        for c in part.children:
            _ours(data, c, out)
    elif part.message is not None:
        out.append((ctype, None))
        _ours(data, part.message.root, out)
    else:
        out.append((ctype, decode_body(data, part)))


def _theirs(m: Message, out: list[tuple[str, bytes | None]]) -> None:
    ctype = m.get_content_type()
    if m.is_multipart():
        out.append((ctype, None))
        for c in m.get_payload():
            assert isinstance(c, Message)
            _theirs(c, out)
    else:
        payload = m.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append((ctype, payload))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees(), st.sampled_from(["\r\n", "\n"]))
def test_same_tree_and_payloads_as_stdlib_email(tree: EmailMessage, linesep: str) -> None:
    tree["Subject"] = "oracle"
    data = tree.as_bytes(policy=email.policy.default.clone(linesep=linesep))
    ours: list[tuple[str, bytes | None]] = []
    _ours(data, parse_message(data).root, ours)
    theirs: list[tuple[str, bytes | None]] = []
    _theirs(email.message_from_bytes(data, policy=email.policy.compat32), theirs)
    assert [t for t, _ in ours] == [t for t, _ in theirs]
    for (ctype, a), (_, b) in zip(ours, theirs, strict=True):
        if a is None or b is None:
            assert a is b
        elif ctype.startswith("text/"):
            # the two differ only in whether the line end before a delimiter is content
            assert a.replace(b"\r\n", b"\n").rstrip(b"\n") == b.replace(b"\r\n", b"\n").rstrip(b"\n")
        else:
            assert a == b
