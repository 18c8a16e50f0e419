"""The "privacy" object of a result: fixed schema, bounded size, one line naming the bad field."""

from __future__ import annotations

import pytest

from runtime.errors import UpdateRejected
from runtime.privacy_report import decode_report, describe_chain

GOOD = {"task": "train", "applied_to": "delta", "on_weaker_job": "raise", "raised": True,
        "chain": [{"name": "exclude_vars", "args": {"pattern": "^2\\.bias$"}, "source": "site"},
                  {"name": "gaussian_dp", "args": {"clip_norm": 1.0, "noise_multiplier": 1.5}, "source": "raised"}],
        "excluded": ["2.bias"], "n_excluded": 1, "payload_sha256": "a" * 64}


def test_good_report_round_trips_and_reads_in_one_line() -> None:
    report = decode_report(GOOD)
    assert report == GOOD
    assert describe_chain(report) == ("exclude_vars(pattern=^2\\.bias$)[site] -> gaussian_dp(clip_norm=1, "
                                      "noise_multiplier=1.5)[raised]; on delta; raised by site")
    assert decode_report(None) is None


@pytest.mark.parametrize(("change", "fragment"), [
    ({"chain": [{"name": "blur", "args": {}}]}, "field 'chain.0.name'"),
    ({"extra": 1}, "field 'extra'"),
    ({"payload_sha256": "xyz"}, "field 'payload_sha256'"),
    ({"excluded": ["n"] * 65}, "field 'excluded'"),
    ({"chain": [{"name": "svt", "args": {"k": "v" * 300}}]}, "field 'chain.0.args': Value error, argument 'k' is "
                                                             "longer than 256 characters"),
    ({"excluded": ["x" * 250] * 64, "chain": [GOOD["chain"][0]] * 30}, "exceeds 16384 bytes"),
])
def test_bad_report_is_refused_naming_the_field(change: dict, fragment: str) -> None:
    with pytest.raises(UpdateRejected) as err:
        decode_report({**GOOD, **change})
    assert fragment in str(err.value) and "\n" not in str(err.value)


DP = {"epsilon_round": 4.73, "epsilon_total": 10.2, "delta": 1e-5, "noise_multiplier": 1.0, "sampling_rate": 1.0,
      "releases": 3}


def test_dp_spend_round_trips_with_inf_as_a_word() -> None:
    assert decode_report({**GOOD, "dp": DP})["dp"] == DP
    infinite = {**DP, "epsilon_round": "inf", "epsilon_total": "inf", "noise_multiplier": 0.0}
    assert decode_report({**GOOD, "dp": infinite})["dp"] == infinite
    assert "dp" not in decode_report(GOOD)


@pytest.mark.parametrize(("change", "fragment"), [
    ({"epsilon_total": -1.0}, "field 'dp.epsilon_total"),
    ({"epsilon_total": float("inf")}, "field 'dp.epsilon_total"),  # json.loads reads Infinity as this
    ({"epsilon_round": float("nan")}, "field 'dp.epsilon_round"),
    ({"epsilon_total": "Infinity"}, "field 'dp.epsilon_total"),
    ({"epsilon_total": "a lot"}, "field 'dp.epsilon_total"),
    ({"delta": 1.0}, "field 'dp.delta'"),
    ({"sampling_rate": 0.0}, "field 'dp.sampling_rate'"),
    ({"noise_multiplier": -0.5}, "field 'dp.noise_multiplier'"),
    ({"releases": 0}, "field 'dp.releases'"),
    ({"releases": 10**9 + 1}, "field 'dp.releases'"),
    ({"note": "x" * 100}, "field 'dp.note'"),
])
def test_bad_dp_spend_is_refused_naming_the_field(change: dict, fragment: str) -> None:
    with pytest.raises(UpdateRejected) as err:
        decode_report({**GOOD, "dp": {**DP, **change}})
    assert fragment in str(err.value) and "\n" not in str(err.value)
