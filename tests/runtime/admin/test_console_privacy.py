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
