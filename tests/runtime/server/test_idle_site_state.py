"""check_status, while a job runs, says why a site with no task in hand does nothing: it is done with the
round in flight (the round waits for others), it was not picked for that round, or it is not one of the
job's sites. Between rounds, and while its task waits to be fetched, it is plainly idle."""

from __future__ import annotations

from types import SimpleNamespace

from runtime.server.controller import JobController, _Round
from runtime.tasks import TaskKind
from runtime.workflows import RoundOutcome, RoundPlan


def _controller(sites: list[str] | str, in_flight: _Round | None) -> JobController:
    controller = JobController.__new__(JobController)  # only what the phrase reads: record, meta, the round
    controller.record = SimpleNamespace(job_id="job-7")
    controller.spec = SimpleNamespace(meta=SimpleNamespace(sites=sites))
    controller._round = in_flight
    return controller


def _round_3(tasked: list[str], answered: list[str]) -> _Round:
    rnd = _Round(outcome=RoundOutcome(plan=RoundPlan(kind=TaskKind.TRAIN, round=3), step=3),
                 tasks={site: SimpleNamespace() for site in tasked})
    rnd.outcome.failures |= {site: "x" for site in answered}  # a failure answers the round as a result does
    return rnd


def test_a_site_done_with_the_round_or_outside_it_says_which() -> None:
    controller = _controller("all", _round_3(tasked=["a", "b"], answered=["a"]))
    assert controller.idle_site_state("a") == "done with round 3 of job job-7"
    assert controller.idle_site_state("c") == "outside round 3 of job job-7"
    assert controller.idle_site_state("b") is None  # its task waits to be fetched: idle, as its daemon says


def test_a_site_not_among_the_jobs_sites_is_outside_the_job_between_rounds_too() -> None:
    assert _controller(["a"], _round_3(tasked=["a"], answered=[])).idle_site_state("z") == "outside job job-7"
    assert _controller(["a"], None).idle_site_state("z") == "outside job job-7"
    assert _controller(["a"], None).idle_site_state("a") is None
