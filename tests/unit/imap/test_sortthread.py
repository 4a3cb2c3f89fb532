"""SORT/THREAD core (RFC 5256) without I/O: ordering rules, subject merging, deep threads."""

from __future__ import annotations

from postfach.imap import sortthread as st


def _item(seq: int, subject: str, mid: str, refs: tuple[str, ...] = (), date: float | None = None,
          base: str | None = None) -> st.Item:
    keys = st.make_keys(subject, base if base is not None else subject.removeprefix("Re: "), None,
                        "", "", "", "", "", mid, "", refs)
    keys = keys._replace(date=date if date is not None else float(seq))
    return st.item(seq, seq, 100 - seq, float(1000 - seq), keys)


def test_reverse_keeps_sequence_order_for_ties() -> None:
    items = [_item(1, "b", "<1>"), _item(2, "a", "<2>"), _item(3, "b", "<3>")]
    assert [i.seq for i in st.sort_order(items, [("SUBJECT", True)])] == [1, 3, 2]
    assert [i.seq for i in st.sort_order(items, [("SUBJECT", False), ("DATE", True)])] == [2, 3, 1]
    assert [i.seq for i in st.sort_order(items, [("ARRIVAL", False)])] == [3, 2, 1]


def test_missing_parent_and_subject_merge() -> None:
    # RFC 5256 §3 REFERENCES steps 1-5: the unknown <x> parent is pruned; "Re: a" joins "a".
    items = [_item(1, "a", "<1>"), _item(2, "Re: a", "<2>", ("<x>",)), _item(3, "c", "<3>", ("<1>",))]
    roots = st.thread_references(items)
    assert st.format_threads(roots, uid=False) == "(1 (2)(3))"
    assert st.format_threads(st.thread_orderedsubject(items), uid=False) == "(1 2)(3)"


def test_reference_loops_are_ignored() -> None:
    items = [_item(1, "x", "<1>", ("<2>",)), _item(2, "y", "<2>", ("<1>",))]
    text = st.format_threads(st.thread_references(items), uid=False)
    assert sorted(text.replace("(", " ").replace(")", " ").split()) == ["1", "2"]


def test_duplicate_message_ids_stay_separate() -> None:
    items = [_item(1, "p", "<same>"), _item(2, "q", "<same>")]
    assert st.format_threads(st.thread_references(items), uid=False) == "(1)(2)"


def test_a_deep_reply_chain_does_not_recurse() -> None:
    n = 3000
    items = [_item(1, "deep", "<0>")]
    items += [_item(i + 1, "Re: deep", f"<{i}>", (f"<{i - 1}>",)) for i in range(1, n)]
    text = st.format_threads(st.thread_references(items), uid=False)
    assert text == "(" + " ".join(str(i) for i in range(1, n + 1)) + ")"
