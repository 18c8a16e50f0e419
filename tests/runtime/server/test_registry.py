"""runtime/server/registry.py: sessions, heartbeats and liveness under a pinned clock."""

from __future__ import annotations

from runtime.identity import Identity, Kind
from runtime.server.registry import Registry

TIMEOUT_S = 30.0


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _site(name: str, org: str = "org-a") -> Identity:
    return Identity(name=name, org=org, kind=Kind.CLIENT)


def _registry(clock: FakeClock) -> Registry:
    return Registry(heartbeat_timeout_s=TIMEOUT_S, clock=clock)


def test_register_creates_a_live_session() -> None:
    clock = FakeClock()
    reg = _registry(clock)

    session, had_session = reg.register(_site("site-1"), {"os": "linux"})

    assert had_session is False
    assert (session.name, session.org, session.host_info) == ("site-1", "org-a", {"os": "linux"})
    assert session.registered_at == session.last_seen == 1000.0
    assert reg.is_alive("site-1")
    assert reg.alive() == ["site-1"]


def test_an_unknown_site_is_not_alive() -> None:
    reg = _registry(FakeClock())

    assert reg.is_alive("ghost") is False
    assert reg.alive() == []


def test_touch_keeps_a_site_alive_past_the_first_timeout() -> None:
    clock = FakeClock()
    reg = _registry(clock)
    session, _ = reg.register(_site("site-1"))

    clock.now += TIMEOUT_S - 1
    touched = reg.touch("site-1", session.session_id, job_id="job-1", round=3)
    clock.now += TIMEOUT_S - 1

    assert touched is True
    assert reg.is_alive("site-1")
    assert (reg.session("site-1").job_id, reg.session("site-1").round) == ("job-1", 3)


def test_a_poll_or_upload_keeps_what_the_last_heartbeat_said_the_site_works_on() -> None:
    clock = FakeClock()
    reg = _registry(clock)
    session, _ = reg.register(_site("site-1"))
    reg.touch("site-1", session.session_id, job_id="job-1", round=3)  # a heartbeat: busy with round 3

    clock.now += 1
    reg.touch("site-1", session.session_id)  # a poll for its next task, or its upload
    assert reg.state("site-1") == "round 3 of job job-1"
    assert reg.seconds_since_seen("site-1") == 0

    reg.touch("site-1", session.session_id, job_id="", round=0)  # a heartbeat: the job is over here
    assert reg.state("site-1") == "idle"


def test_a_silent_site_is_dead_after_the_heartbeat_timeout() -> None:
    clock = FakeClock()
    reg = _registry(clock)
    reg.register(_site("site-1"))
    reg.register(_site("site-2"))
    s2 = reg.session("site-2")

    clock.now += TIMEOUT_S  # exactly at the limit: still alive
    at_limit = reg.is_alive("site-1")
    reg.touch("site-2", s2.session_id)
    clock.now += 0.001

    assert at_limit is True
    assert reg.is_alive("site-1") is False
    assert reg.alive() == ["site-2"]


def test_a_rejoin_reports_the_old_session_and_gets_a_new_id() -> None:
    clock = FakeClock()
    reg = _registry(clock)
    first, _ = reg.register(_site("site-1"))

    clock.now += 5
    second, had_session = reg.register(_site("site-1"))

    assert had_session is True
    assert second.session_id != first.session_id
    assert second.registered_at == 1005.0
    assert reg.touch("site-1", first.session_id) is False
    assert reg.touch("site-1", second.session_id) is True


def test_touch_with_a_wrong_session_id_is_refused_and_does_not_count() -> None:
    clock = FakeClock()
    reg = _registry(clock)
    reg.register(_site("site-1"))

    clock.now += TIMEOUT_S
    touched = reg.touch("site-1", "0" * 32)
    clock.now += 1

    assert touched is False
    assert reg.is_alive("site-1") is False


def test_touch_for_an_unknown_site_is_refused() -> None:
    reg = _registry(FakeClock())

    assert reg.touch("ghost", "0" * 32) is False


def test_drop_forgets_the_site() -> None:
    reg = _registry(FakeClock())
    session, _ = reg.register(_site("site-1"))

    reg.drop("site-1")

    assert reg.session("site-1") is None
    assert reg.touch("site-1", session.session_id) is False
    assert reg.register(_site("site-1"))[1] is False


GRACE_S = 3.0


def _with_grace(clock: FakeClock) -> Registry:
    return Registry(heartbeat_timeout_s=TIMEOUT_S, clock=clock, disconnect_grace_s=GRACE_S)


def test_a_site_whose_connection_dropped_is_dead_after_the_grace_not_the_heartbeat_timeout() -> None:
    clock = FakeClock()
    reg = _with_grace(clock)
    reg.register(_site("site-1"))
    connection = reg.connected("site-1")

    reg.disconnected("site-1", connection)
    clock.now += GRACE_S - 0.5
    suspect_but_alive = reg.is_suspect("site-1"), reg.is_alive("site-1")
    clock.now += 1.0

    assert suspect_but_alive == (True, True)
    assert reg.is_alive("site-1") is False
    assert reg.alive() == []


def test_a_link_that_comes_back_within_the_grace_is_never_dead() -> None:
    clock = FakeClock()
    reg = _with_grace(clock)
    reg.register(_site("site-1"))
    first = reg.connected("site-1")

    reg.disconnected("site-1", first)
    clock.now += GRACE_S - 1
    reg.connected("site-1")
    clock.now += 2 * GRACE_S

    assert reg.is_alive("site-1")
    assert reg.is_suspect("site-1") is False


def test_an_old_stream_ending_after_the_site_rejoined_does_not_make_it_suspect() -> None:
    clock = FakeClock()
    reg = _with_grace(clock)
    reg.register(_site("site-1"))
    old = reg.connected("site-1")
    reg.register(_site("site-1"))  # the site came back on a new connection and session
    reg.connected("site-1")

    reg.disconnected("site-1", old)  # the server notices the old connection's end only now
    clock.now += 2 * GRACE_S

    assert reg.is_suspect("site-1") is False
    assert reg.is_alive("site-1")


def test_without_a_presence_stream_only_the_heartbeat_timeout_counts() -> None:
    clock = FakeClock()
    reg = _with_grace(clock)
    reg.register(_site("site-1"))

    clock.now += TIMEOUT_S - 1

    assert reg.is_alive("site-1")


def test_state_says_idle_busy_reconnecting_dead_or_revoked() -> None:
    clock = FakeClock()
    reg = _with_grace(clock)
    session, _ = reg.register(_site("site-1"))
    connection = reg.connected("site-1")
    states = [reg.state("site-1")]
    reg.touch("site-1", session.session_id, job_id="job-7", round=3)
    states.append(reg.state("site-1"))
    reg.disconnected("site-1", connection)
    states.append(reg.state("site-1"))
    clock.now += GRACE_S + 1
    states.append(reg.state("site-1"))
    reg.mark_revoked("site-1")
    states.append(reg.state("site-1"))

    assert states == ["idle", "round 3 of job job-7", "reconnecting", "dead", "revoked"]
    assert reg.is_alive("site-1") is False


def test_a_gone_site_says_why_it_counts_as_gone() -> None:
    # a killed site's round failure read "site went silent (missed heartbeats)" though the server had seen
    # its connection drop
    clock = FakeClock()
    reg = _with_grace(clock)
    for name in ("crashed", "silent", "revoked"):
        reg.register(_site(name))
    reg.disconnected("crashed", reg.connected("crashed"))
    reg.mark_revoked("revoked")
    clock.now += TIMEOUT_S + 1
    assert reg.why_gone("crashed") == f"its connection dropped and it did not reconnect within {GRACE_S:g} s"
    assert reg.why_gone("silent") == f"it went silent (no heartbeat for {TIMEOUT_S + 1:.0f} s)"
    assert reg.why_gone("revoked") == "its certificate was revoked"
    assert reg.why_gone("site-9") == "never registered"
