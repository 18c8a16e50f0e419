"""runtime/server/audit_args.py: what an admin typed goes into the audit trail bounded, with a marker
where it was cut, so no one can write megabytes into the log through a (denied) command."""

from __future__ import annotations

import json

from runtime.server.audit_args import MAX_ARGS_JSON_BYTES, MAX_STRING_CHARS, bounded_args, bounded_text


def test_short_arguments_are_kept_as_they_are() -> None:
    args = {"job_id": "20260101-120000-abcdef", "n": 5, "sites": ["site-1", "site-2"], "force": True}

    assert bounded_args(args) == args


def test_each_long_string_is_cut_with_a_marker() -> None:
    cut = bounded_args({"site": "x" * 1_000_000})["site"]

    assert cut.startswith("x" * MAX_STRING_CHARS) and "[cut 999800 chars]" in cut and len(cut) < 260


def test_the_whole_arguments_stay_under_the_json_cap_whatever_their_shape() -> None:
    hostile = [
        {f"k{i}": "y" * 199 for i in range(10_000)},
        {"sites": ["s" * 150] * 100_000},
        {"a": [[[[[[[[["deep"]]]]]]]]]},
        {"k" * 10_000: 1},
    ]
    for args in hostile:
        out = bounded_args(args)
        text = json.dumps(out)
        assert len(text.encode()) <= MAX_ARGS_JSON_BYTES, text[:100]
        assert "cut" in text


def test_bounded_text_cuts_with_a_marker() -> None:
    assert bounded_text("abc", 10) == "abc"
    assert bounded_text("a" * 50, 10) == "a" * 10 + "...[cut 40 chars]"
