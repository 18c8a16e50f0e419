"""A server and a site whose certificates end within 30 days say so in their logs when they start (and
once a day while they run): after that date the participant can no longer connect, and only lead IT can
issue new kits. Real kits of a study provisioned with 10-day certificates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from provision.local_study import LocalStudy

from ..conftest import EXAMPLE_PROJECT, with_sites


def _short_lived(data: dict[str, Any]) -> None:
    with_sites(["site-1"])(data)
    data["cert_validity_days"] = 10


def test_a_server_and_a_site_warn_of_certificates_that_end_soon(tmp_path: Path) -> None:
    study = LocalStudy.create(EXAMPLE_PROJECT, tmp_path / "study", edit=_short_lived)
    try:
        study.start_server()
        study.start_sites()
        for name, whose, cert in ((study.server, "server", "server.crt"), ("site-1", "site", "client.crt")):
            log = study.log_path(name).read_text()
            line = next((x for x in log.splitlines() if f"this {whose}'s certificate" in x), "")
            assert f"{study.kits[name]}/startup/{cert} expires on " in line, log[-2000:]
            assert "(in 9 days)" in line and "ask lead IT for a new kit before then" in line
    finally:
        study.stop_all()


def test_a_study_with_a_year_left_starts_without_the_warning(make_study) -> None:
    study = make_study(sites=["site-1"]).study
    study.start_server()
    study.start_sites()
    for name in (study.server, "site-1"):
        assert "expires on" not in study.log_path(name).read_text()
