"""runtime/server/metrics_check.py (via controller.decode_metrics): a site's metrics reach show_job,
wait_job and the key-metric choice only if their names are plain, few, and their values finite numbers."""

from __future__ import annotations

import json

import pytest

from runtime.errors import UpdateRejected
from runtime.server.metrics_check import MAX_METRICS_JSON_BYTES, decode_metrics


def test_plain_metrics_pass_and_unknown_top_level_keys_are_left_alone() -> None:
    data = {"train": {"loss": 0.5, "val/acc_top-1": 1}, "validation": {"accuracy": 0.9},
            "privacy": {"epsilon": 1.0, "mechanism": "gaussian"}}

    assert decode_metrics(json.dumps(data)) == data


@pytest.mark.parametrize("name", ["\x1b]0;pwned\x07", "a b", "", "x" * 65, "naïve", "loss\n"])
def test_a_metric_name_outside_the_allowed_characters_is_refused(name: str) -> None:
    with pytest.raises(UpdateRejected, match="metric name .* must match"):
        decode_metrics(json.dumps({"train": {name: 1.0}}))


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", '"0.5"', "true", "[1]", "null", "1" * 400])
def test_a_metric_value_that_is_not_a_finite_number_is_refused(value: str) -> None:
    with pytest.raises(UpdateRejected, match="finite number"):
        decode_metrics('{"validation": {"accuracy": ' + value + "}}")


@pytest.mark.parametrize("text", ["[" * 100_000, '{"train": {"loss": ' + "9" * 5000 + "}}"])
def test_json_the_parser_itself_cannot_take_is_refused(text: str) -> None:
    with pytest.raises(UpdateRejected, match="not valid JSON"):
        decode_metrics(text)


@pytest.mark.parametrize("count", [-40, 1e308])
def test_a_validation_count_that_is_no_count_is_refused(count: float) -> None:
    with pytest.raises(UpdateRejected, match="'n_samples' in 'validation' must be a sample count"):
        decode_metrics(json.dumps({"validation": {"auc": 0.9, "n_samples": count}}))


def test_too_many_metrics_in_one_map_are_refused() -> None:
    with pytest.raises(UpdateRejected, match="257 metrics .*limit 256"):
        decode_metrics(json.dumps({"train": {f"m{i}": 1.0 for i in range(257)}}))


def test_a_map_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(UpdateRejected, match="'train' must be an object"):
        decode_metrics(json.dumps({"train": [1, 2]}))


def test_oversized_metrics_are_refused_whatever_their_keys() -> None:
    with pytest.raises(UpdateRejected, match="metrics are .* bytes"):
        decode_metrics(json.dumps({"privacy": {"notes": "x" * MAX_METRICS_JSON_BYTES}}))
