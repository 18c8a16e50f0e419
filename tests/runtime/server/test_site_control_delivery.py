"""shutdown / restart of a site: delivered with the site's next heartbeat, so only to a connected site, and
never to a later session of it (a shutdown queued for a dead site stopped it when its IT next started it)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from runtime.identity import Identity, Kind, Role
from runtime.server.admin_service import AdminService, CommandError
from runtime.server.authz import DEFAULT_POLICY, Policy
from runtime.server.site_controls import SiteControls

ADMIN = Identity("admin@study.org", "org-a", Kind.ADMIN, Role.PROJECT_ADMIN)


def _service(alive: list[str], controls: SiteControls) -> AdminService:
    service = AdminService.__new__(AdminService)  # only what the two commands use
    service._policy, service._controls = Policy(DEFAULT_POLICY), controls
    service._registry = SimpleNamespace(alive=lambda: alive, state=lambda site: "dead",
                                        session=lambda site: SimpleNamespace(org="org-b"))
    return service


@pytest.mark.parametrize("command", ["_shutdown_client", "_restart_client"])
def test_a_control_for_a_site_that_is_not_connected_is_refused_and_never_queued(command: str) -> None:
    controls = SiteControls()
    with pytest.raises(CommandError, match=r"site 'site-2' is dead: a (shutdown|restart) reaches only a connected"):
        asyncio.run(getattr(_service([], controls), command)(ADMIN, {"site": "site-2"}))
    assert controls.next_for("site-2") == ""

    answer = asyncio.run(getattr(_service(["site-2"], controls), command)(ADMIN, {"site": "site-2"}))
    assert answer["site"] == "site-2" and controls.next_for("site-2") == answer["control"]


def test_words_queued_for_a_sites_last_session_are_dropped_when_it_registers_again() -> None:
    controls = SiteControls()
    controls.queue("site-2", "shutdown")
    controls.forget("site-2")  # what registration does
    assert controls.next_for("site-2") == ""
