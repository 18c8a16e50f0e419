"""The steps of a site's task as its result line reports them: each step's time adds up over repeats, in the
order the steps first ran, and a step that failed still counts (a slow upload that broke is still slow)."""

from __future__ import annotations

import re
import time

import pytest

from runtime.client.daemon import Steps


def test_steps_add_up_in_the_order_they_first_ran() -> None:
    steps = Steps()
    with steps.timed("worker"):
        time.sleep(0.02)
    with steps.timed("upload"):
        pass
    with steps.timed("worker"):
        time.sleep(0.02)

    assert list(steps.seconds) == ["worker", "upload"]
    assert steps.seconds["worker"] >= 0.04
    assert re.fullmatch(r"worker \d+\.\d\d s, upload \d+\.\d\d s", str(steps)), str(steps)  # not its timing


def test_a_step_that_fails_is_still_counted() -> None:
    steps = Steps()
    with pytest.raises(ConnectionError), steps.timed("upload"):
        time.sleep(0.01)
        raise ConnectionError("reset")

    assert steps.seconds["upload"] >= 0.01
