"""runtime/server/taskboard.py: tasks handed out oldest first, results accepted once, from the right site."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from runtime.errors import UpdateRejected
from runtime.server.taskboard import Task, TaskBoard, TaskState

T = TypeVar("T")
NOW = 1000.0


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro, debug=True)


def _board() -> TaskBoard:
    return TaskBoard(clock=lambda: NOW)


def _task(site: str = "site-1", name: str = "train", job_id: str = "job-1", round: int = 1) -> Task:
    return Task(job_id=job_id, site=site, name=name, round=round, config={})


def _posted(board: TaskBoard, *tasks: Task) -> tuple[Task, ...]:
    for t in tasks:
        board.post(t)
    return tasks


def test_next_for_hands_the_oldest_pending_task_and_marks_it_sent() -> None:
    # Prepare
    board = _board()
    first, other_site, second = _posted(board, _task(name="a"), _task(site="site-2"), _task(name="b"))

    # Execute
    async def scenario() -> list[Task | None]:
        return [await board.next_for("site-1", wait_s=0) for _ in range(3)]

    got = _run(scenario())
    # Assert
    assert got == [first, second, None]
    assert first.state is TaskState.SENT and first.sent_at == NOW
    assert second.state is TaskState.SENT
    assert other_site.state is TaskState.PENDING


def test_next_for_returns_none_after_wait_s_with_nothing_to_send() -> None:
    board = _board()

    async def scenario() -> tuple[Task | None, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        task = await board.next_for("site-1", wait_s=0.05)
        return task, loop.time() - start

    task, waited_s = _run(scenario())

    assert task is None
    assert 0.04 <= waited_s < 2.0


def test_a_waiting_next_for_wakes_when_a_task_is_posted() -> None:
    board = _board()
    task = _task()

    async def scenario() -> Task | None:
        poll = asyncio.create_task(board.next_for("site-1", wait_s=30))
        await asyncio.sleep(0)  # let the poll start waiting
        board.post(task)
        return await asyncio.wait_for(poll, 5)

    assert _run(scenario()) is task
    assert task.state is TaskState.SENT


def test_a_task_for_another_site_does_not_wake_a_poll() -> None:
    board = _board()
    board.post(_task(site="site-2"))

    async def scenario() -> Task | None:
        return await board.next_for("site-1", wait_s=0.02)

    assert _run(scenario()) is None


def test_claim_returns_a_sent_task_for_its_site() -> None:
    board = _board()
    (task,) = _posted(board, _task())
    _run(board.next_for("site-1", wait_s=0))

    assert board.claim(task.task_id, "site-1") is task


def test_claim_refuses_an_unknown_task() -> None:
    board = _board()

    with pytest.raises(UpdateRejected, match="never sent to site-1"):
        board.claim("f" * 24, "site-1")


def test_claim_refuses_a_task_of_another_site() -> None:
    board = _board()
    (task,) = _posted(board, _task(site="site-2"))
    _run(board.next_for("site-2", wait_s=0))

    with pytest.raises(UpdateRejected, match="never sent to site-1"):
        board.claim(task.task_id, "site-1")


def test_claim_refuses_a_replay_after_complete() -> None:
    board = _board()
    (task,) = _posted(board, _task())
    _run(board.next_for("site-1", wait_s=0))
    board.complete(board.claim(task.task_id, "site-1"))

    with pytest.raises(UpdateRejected, match="already received"):
        board.claim(task.task_id, "site-1")


def test_claim_refuses_a_second_result_while_the_first_is_still_being_received() -> None:
    # Prepare: the first upload for the task has been claimed but not yet completed (it is streaming)
    board = _board()
    (task,) = _posted(board, _task())
    _run(board.next_for("site-1", wait_s=0))
    board.claim(task.task_id, "site-1")
    # Execute / Assert: "a result is accepted once per task" -- a concurrent duplicate must not also fold
    with pytest.raises(UpdateRejected):
        board.claim(task.task_id, "site-1")


def test_claim_refuses_a_cancelled_task_as_late() -> None:
    board = _board()
    (task,) = _posted(board, _task())
    _run(board.next_for("site-1", wait_s=0))
    board.cancel([task])

    with pytest.raises(UpdateRejected, match="late"):
        board.claim(task.task_id, "site-1")


def test_cancel_leaves_answered_tasks_done() -> None:
    board = _board()
    done, open_ = _posted(board, _task(name="a"), _task(name="b"))
    board.complete(done)

    board.cancel([done, open_])

    assert done.state is TaskState.DONE
    assert open_.state is TaskState.CANCELLED


def test_resend_all_offers_sent_tasks_again() -> None:
    # Prepare: one task sent, one answered, one for another site sent
    board = _board()
    sent, answered, foreign = _posted(board, _task(name="a"), _task(name="b"), _task(site="site-2"))

    async def hand_out() -> None:
        await board.next_for("site-1", wait_s=0)
        await board.next_for("site-1", wait_s=0)
        await board.next_for("site-2", wait_s=0)

    _run(hand_out())
    board.complete(answered)
    # Execute
    count = board.resend_all("site-1")
    again = _run(board.next_for("site-1", wait_s=0))
    # Assert
    assert count == 1
    assert again is sent
    assert answered.state is TaskState.DONE
    assert foreign.state is TaskState.SENT


def test_unsend_offers_a_task_again() -> None:
    board = _board()
    (task,) = _posted(board, _task())
    _run(board.next_for("site-1", wait_s=0))

    board.unsend(task)

    assert task.state is TaskState.PENDING
    assert _run(board.next_for("site-1", wait_s=0)) is task


def test_unsend_does_not_revive_an_answered_task() -> None:
    board = _board()
    (task,) = _posted(board, _task())
    _run(board.next_for("site-1", wait_s=0))
    board.complete(task)

    board.unsend(task)

    assert task.state is TaskState.DONE
    assert _run(board.next_for("site-1", wait_s=0)) is None


def test_forget_refuses_later_results_but_still_names_replays() -> None:
    board = _board()
    answered, open_ = _posted(board, _task(name="a"), _task(name="b"))
    board.complete(answered)

    board.forget("job-1")

    with pytest.raises(UpdateRejected, match="late"):
        board.claim(open_.task_id, "site-1")
    with pytest.raises(UpdateRejected, match="already received"):
        board.claim(answered.task_id, "site-1")
