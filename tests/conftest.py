"""Shared fixtures: a real study on 127.0.0.1 built from kits, started by their own scripts, and always
stopped (by PID) at the end of the test."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from provision.demo_data import DemoData, write_demo_data
from provision.local_study import LocalStudy, cores_per_site
from tests.docker_support import docker_engine  # noqa: F401  (a session fixture: the private Docker engine)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_PROJECT = REPO / "project.yml.example"
JOB_TEMPLATE = REPO / "templates" / "jobs" / "tabular_classifier"


def pids_naming(text: str | Path) -> list[int]:
    """Live processes whose command line contains `text` (a job's token, or a site's job folder): how a
    test sees that a worker, its sandbox or an orphan it started is really gone."""
    needle = str(text).encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def with_sites(sites: list[str]) -> Callable[[dict[str, Any]], None]:
    """An edit for LocalStudy.create that replaces the example's client sites with `sites`."""

    def edit(data: dict[str, Any]) -> None:
        others = [p for p in data["participants"] if p.get("type") != "client"]
        data["participants"] = others + [{"type": "client", "name": s, "org": f"org-{s}"} for s in sites]

    return edit


class StudyHandle:
    """A LocalStudy plus its demo data, configured for fast tests (short heartbeats)."""

    def __init__(self, study: LocalStudy, data: DemoData):
        self.study = study
        self.data = data

    def job(self, dest: Path, **overrides: Any) -> Path:
        """A copy of the tabular job template, with `server.rounds` etc. left to --set overrides."""
        shutil.copytree(JOB_TEMPLATE, dest)
        return dest


def site_2_refusing_the_lead(make: Callable[..., StudyHandle]) -> StudyHandle:
    """site-1 and site-2 started and online; site-2's local/job_policy.yml allows only its own organisation,
    so it refuses every job the lead (coordinating-center) submits."""
    handle = make(sites=["site-1", "site-2"])
    handle.study.write_local("site-2", "job_policy.yml", {"allowed_orgs": ["org-site-2"]})
    handle.study.start_server()
    handle.study.start_sites()
    return handle


@pytest.fixture
def make_study(tmp_path: Path) -> Iterator[Callable[..., StudyHandle]]:
    created: list[LocalStudy] = []

    def make(sites: list[str] | None = None, heartbeat_timeout_s: float = 6.0, name: str = "study",
             server_settings: dict[str, Any] | None = None) -> StudyHandle:
        sites = sites or ["site-1", "site-2", "site-3"]
        study = LocalStudy.create(EXAMPLE_PROJECT, tmp_path / name, edit=with_sites(sites))
        created.append(study)
        data = write_demo_data(tmp_path / name / "data", sites)
        study.write_local(study.server, "server.yml", {"heartbeat_timeout_s": heartbeat_timeout_s,
                                                        **(server_settings or {})})
        for site in sites:
            study.write_local(site, "site.yml", {"data_root": str(data.site_dirs[site]),
                                                 "heartbeat_interval_s": 1.0, "threads": cores_per_site(len(sites))})
        return StudyHandle(study, data)

    yield make
    for study in created:
        study.stop_all()
