"""runtime.certs' expiry warning: a long-running server or site repeats it once a day from 30 days before
its certificate ends, and says nothing before."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from provision.certs import create_ca
from runtime import certs
from runtime.certs import expiry_warning, warn_before_expiry

NOW = dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)


def test_the_warning_starts_30_days_before_the_end() -> None:
    cert = create_ca("study", NOW, validity_days=100).cert  # ends 2026-04-11 12:00
    assert expiry_warning(cert, "x", NOW + dt.timedelta(days=69)) is None
    line = expiry_warning(cert, "this site's certificate c.crt", NOW + dt.timedelta(days=70, hours=1))
    assert line == ("this site's certificate c.crt expires on 2026-04-11 12:00 UTC (in 29 days): after that it "
                    "cannot connect; ask lead IT for a new kit before then")
    assert "(in 0 days)" in (expiry_warning(cert, "x", NOW + dt.timedelta(days=101)) or "")


def test_a_running_process_hears_it_once_a_day(monkeypatch: pytest.MonkeyPatch) -> None:
    cert = create_ca("study", NOW, validity_days=100).cert
    days = iter(range(60, 80))  # the clock read at each wake-up: days after NOW
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 20:
            raise asyncio.CancelledError

    monkeypatch.setattr(certs.asyncio, "sleep", sleep)
    warned: list[str] = []
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(warn_before_expiry(cert, "c", warned.append, clock=lambda: NOW + dt.timedelta(days=next(days))))
    assert slept == [certs.DAY_S] * 20
    assert len(warned) == 10 and "(in 30 days)" in warned[0] and "(in 21 days)" in warned[-1]  # days 70..79


def test_when_the_study_ca_ends_too_the_warning_says_a_new_kit_cannot_help() -> None:
    from provision.certs import issue_credential
    from provision.project import ClientSpec

    ca = create_ca("study", NOW, validity_days=20)
    cert = issue_credential(ca, ClientSpec(type="client", name="site-1", org="o"), NOW, 360, "study").cert
    line = expiry_warning(cert, "c", NOW + dt.timedelta(days=5), ca=ca.cert)  # capped at the CA's end
    assert line is not None and line.endswith("after that it cannot connect; the study CA ends then too: lead IT "
                                              "must create a new study CA and issue every participant a new kit")
    longer = create_ca("study", NOW, validity_days=1000)
    assert (expiry_warning(cert, "c", NOW + dt.timedelta(days=5), ca=longer.cert) or "").endswith(
        "ask lead IT for a new kit before then")
