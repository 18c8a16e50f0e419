"""Worker replies are untrusted: a bad one is refused with one line that never repeats the offending text."""

from __future__ import annotations

import json

import pytest

from runtime.client.worker_replies import MAX_METRICS, WorkerReplyRefused, parse_reply

SECRET = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49\n-----END PRIVATE KEY-----"


def _line(**reply) -> bytes:
    return json.dumps({"ok": True, **reply}).encode()


def test_a_good_train_reply_passes():
    reply = parse_reply(_line(n_samples=12, metrics={"loss": 0.5, "acc/top-1": 1}, validation={"auc": 0.7}))
    assert reply.n_samples == 12 and reply.metrics == {"loss": 0.5, "acc/top-1": 1.0}
    reply = parse_reply(_line(n_samples=1, local={"steps": 3, "lr_sum": 0.3}, local_validation={"auc": 0.9}))
    assert reply.local == {"steps": 3.0, "lr_sum": 0.3} and reply.local_validation == {"auc": 0.9}


@pytest.mark.parametrize(("reply", "expected"), [
    ({"metrics": {SECRET: 1.0}}, "metric name #1 (86 characters) is not allowed"),
    ({"validation": {"ok": 1.0, "x" * 65: 1.0}}, "metric name #2 (65 characters) is not allowed"),
    ({"metrics": {"loss": float("nan")}}, "metric 'loss' is not a finite number"),
    ({"metrics": {"loss": "high"}}, "metric 'loss' is not a finite number"),
    ({"metrics": {"loss": True}}, "metric 'loss' is not a finite number"),
    ({"metrics": {f"m{i}": 1.0 for i in range(MAX_METRICS + 1)}}, f"{MAX_METRICS + 1} metrics, more than"),
    ({"local": {"lr_sum": float("inf")}}, "metric 'lr_sum' is not a finite number"),
    ({"metrics": {"loss": 10 ** 400}}, "metric 'loss' is not a finite number"),  # float() of it raises
    # a validation's n_samples weighs its figures across sites: -40 gave an accuracy of 1.77 for the job
    ({"validation": {"auc": 0.9, "n_samples": -40}}, "metric 'n_samples' must be a sample count"),
    ({"validation": {"auc": 0.9, "n_samples": 1e308}}, "metric 'n_samples' must be a sample count"),
    ({"scalars": [["loss", 1, -10 ** 400]]}, "scalar #1: value must be a finite number"),
    ({"local_validation": {SECRET: 0.5}}, "metric name #1 (86 characters) is not allowed"),
    ({"n_samples": -1}, "n_samples must be a non-negative integer"),
    ({"n_samples": 1.5}, "n_samples must be a non-negative integer"),
    ({SECRET: 1}, "unexpected field"),
])
def test_bad_replies_are_refused_without_echoing(reply, expected):
    with pytest.raises(WorkerReplyRefused) as info:
        parse_reply(_line(**reply))
    message = str(info.value)
    assert message.startswith("worker reply refused: ") and expected in message
    assert "\n" not in message and "MIGHAgEA" not in message


# a hostile job writes to the reply pipe itself: a line nested past the parser's depth or an integer past
# Python's digit limit raised out of the parser and ended the site's daemon
@pytest.mark.parametrize("line", [b"not json", b"[1, 2]", b"\xff\xfe", b"[" * 100_000,
                                  b'{"ok": true, "n_samples": ' + b"9" * 5000 + b"}"])
def test_non_objects_are_refused(line):
    with pytest.raises(WorkerReplyRefused, match="worker reply refused: not a JSON"):
        parse_reply(line)


def test_the_learners_error_text_is_one_bounded_line():
    reply = parse_reply(json.dumps({"ok": False, "error": "boom\n" + "x" * 5000}).encode())
    assert "\n" not in reply.error and len(reply.error) < 1100
