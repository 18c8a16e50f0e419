"""The real worker process answers a train command's `release` (the model it trained on last time) with
`held`: false once its own state has moved on to the new model, true while the learner keeps the old one,
so the daemon writes a later download over that file only when the worker cannot read it any more."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import numpy as np
import pytest

from runtime.tasks import TaskKind
from runtime.weights import save_file
from tests.runtime.client.worker_process import REPLY_TIMEOUT_S, start_worker

LEARNER = textwrap.dedent('''
    import numpy as np
    from runtime.learner import Learner, TrainResult

    class Delta(Learner):
        def __init__(self, context, keep_first=False):
            super().__init__(context)
            self.keep_first, self.first = keep_first, None

        def train(self, weights, round):
            if self.keep_first and self.first is None:
                self.first = weights  # the learner's own business: it may read them in any later round
            return TrainResult({k: np.ones_like(v) for k, v in weights.items()}, n_samples=1, is_delta=True)

        def validate(self, weights):
            return {"n_samples": 1.0}
''')


async def _held_answers(tmp_path: Path, keep_first: bool) -> list[bool | None]:
    handle, folders = await start_worker(tmp_path, "delta", LEARNER, "delta:Delta", {"keep_first": keep_first})
    answers: list[bool | None] = []
    try:
        previous = None
        for r in (1, 2, 3):
            model = folders.inbox / f"global_{r}.safetensors"
            save_file({"w": np.full(100_000, float(r), np.float32)}, model)
            command = {"op": TaskKind.TRAIN.value, "weights": str(model), "round": r,
                       "key_metric": {"name": "n_samples", "higher_is_better": True}}
            if previous is not None:
                command["release"] = previous.stat().st_ino
            reply = await handle.call_writing(command, tmp_path / f"delta_{r}.safetensors", REPLY_TIMEOUT_S)
            answers.append(reply["held"] if "release" in command else None)
            previous = model
    finally:
        await handle.stop()
    return answers


@pytest.mark.parametrize("keep_first, expected", [(False, [None, False, False]), (True, [None, True, False])])
def test_the_worker_says_whether_it_still_reads_the_model_it_trained_on_last(tmp_path: Path, keep_first: bool,
                                                                             expected: list[bool | None]) -> None:
    assert asyncio.run(_held_answers(tmp_path, keep_first)) == expected
