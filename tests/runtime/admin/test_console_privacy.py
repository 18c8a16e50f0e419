"""show_job's privacy lines: one per site and distinct chain, naming the rounds and tasks it covered."""

from __future__ import annotations

from runtime.admin.console import _privacy_lines


def report(noise: float, applied_to: str = "delta") -> dict:
    return {"task": "train", "applied_to": applied_to, "on_weaker_job": "raise", "raised": True,
            "chain": [{"name": "gaussian_dp", "args": {"clip_norm": 1.0, "noise_multiplier": noise}, "source": "site"}],
            "excluded": [], "n_excluded": 0, "payload_sha256": "0" * 64}


def test_lines_group_rounds_per_site_and_chain() -> None:
    metrics = [
        {"type": "shared", "task": "init", "round": 0, "sites": ["a"], "failed": {},
         "privacy": {"a": report(1.0, "whole_model")}},
        {"type": "round", "round": 1, "privacy": {"a": report(1.0), "b": report(2.0)}},
        {"type": "validation", "model_round": 1},
        {"type": "round", "round": 2, "privacy": {"a": report(1.0), "b": report(0.5)}},
        {"type": "round", "round": 3},  # from a server before privacy reports: no line
    ]
    lines = _privacy_lines(metrics)
    chain = "gaussian_dp(clip_norm=1, noise_multiplier={})[site]; raised by site"
    assert lines[1:] == [f"  a: {chain.format(1)}  [init, round 1, round 2]",
                         f"  b: {chain.format(0.5)}  [round 2]",
                         f"  b: {chain.format(2)}  [round 1]"]
    assert lines[0].startswith("privacy, per site")
    assert _privacy_lines([{"type": "round", "round": 1}]) == []


def with_dp(base: dict, releases: int, total: float | str, last: float | str = 4.73, noise: float = 1.0) -> dict:
    return {**base, "dp": {"epsilon_round": last, "epsilon_total": total, "delta": 1e-5, "noise_multiplier": noise,
                           "sampling_rate": 1.0, "releases": releases}}


def test_dp_lines_show_each_sites_latest_total() -> None:
    metrics = [
        {"type": "shared", "task": "init", "round": 0, "sites": ["a"], "failed": {},
         "privacy": {"a": with_dp(report(1.0, "whole_model"), 1, 4.73)}},
        {"type": "round", "round": 1, "privacy": {"a": with_dp(report(1.0), 2, 6.9), "b": with_dp(report(0.0), 1, "inf",
                                                                                                  "inf", 0.0)}},
        {"type": "round", "round": 2, "privacy": {"a": with_dp(report(1.0), 3, 8.512), "c": report(1.0)}},
    ]
    lines = _privacy_lines(metrics)
    start = next(i for i, line in enumerate(lines) if line.startswith("differential privacy spent"))
    assert lines[start + 1:] == [
        "  a: epsilon 8.51 at delta 1e-05 after 3 releases (noise multiplier 1, sampling rate 1; "
        "the last release alone: 4.73)",
        "  b: epsilon infinite at delta 1e-05 after 1 release (noise multiplier 0, sampling rate 1; the last release "
        "alone: infinite); not differentially private: a release had no noise",
    ]
    without_dp = _privacy_lines([{"type": "round", "round": 1, "privacy": {"c": report(1.0)}}])
    assert without_dp and not any("differential privacy" in line for line in without_dp)
