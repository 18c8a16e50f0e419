"""show_job's lines for the learners' logged scalars: the last value per site and name, cleaned of
terminal escapes, bounded per site, and nothing at all for a job that logged none."""

from __future__ import annotations

from runtime.admin.scalars_view import MAX_NAMES_SHOWN, scalar_lines


def test_last_values_per_site_are_listed_with_their_step() -> None:
    lines = scalar_lines({"site-2": {"lr": [3, 0.01]}, "site-1": {"loss": [41, 0.123456], "acc": [41, 0.9]}})
    assert lines[1:] == ["  site-1: acc 0.9 (step 41), loss 0.1235 (step 41)", "  site-2: lr 0.01 (step 3)"]
    assert "tensorboard --logdir" in lines[0]


def test_nothing_logged_prints_nothing_and_odd_input_does_not_crash() -> None:
    assert scalar_lines({}) == [] and scalar_lines(None) == [] and scalar_lines([1, 2]) == []
    lines = scalar_lines({"s\x1b[2Jx": {"a": "junk", "b": [1]}, "s2": "junk"})
    assert lines[1:] == ["  sx: a ?, b ?", "  s2: -"], "the escape sequence is gone, the junk shown as ?"


def test_many_names_are_cut_with_a_count() -> None:
    names = {f"n{i:02d}": [0, 1.0] for i in range(MAX_NAMES_SHOWN + 4)}
    (line,) = scalar_lines({"s": names})[1:]
    assert line.count("(step 0)") == MAX_NAMES_SHOWN and line.endswith("(+4 more)")
