"""Which client sites are connected, and whether they are still alive.

A site registers (getting a fresh session id) and then heartbeats; a site silent for longer than
`heartbeat_timeout_s` counts as dead. A site also holds a presence stream open while connected: when
that stream ends (its connection dropped: a crash closes its sockets at once) the site is *suspect*,
and dead once `disconnect_grace_s` passes without a new presence stream. A link that flaps and comes
back within the grace is never counted dead. The clock is passed in so tests can pin it. No I/O here.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from ..identity import Identity


@dataclass
class SiteSession:
    name: str
    org: str
    session_id: str
    registered_at: float
    last_seen: float
    job_id: str = ""
    round: int = 0
    host_info: dict[str, str] = field(default_factory=dict)
    connection: int = 0                   # the newest presence stream's number (0: none yet)
    disconnected_at: float | None = None  # when the newest presence stream ended; None while it is open
    is_revoked: bool = False              # its certificate was refused as revoked since it registered
    is_stopped: bool = False              # it said it stops on purpose (stop.sh, shutdown): gone, not dead
    instance_id: str = ""                 # the site process's own random id (RegisterRequest.instance_id)


class Registry:
    def __init__(self, heartbeat_timeout_s: float, clock: Callable[[], float], disconnect_grace_s: float | None = None):
        self._timeout_s = heartbeat_timeout_s
        self._grace_s = heartbeat_timeout_s if disconnect_grace_s is None else min(disconnect_grace_s,
                                                                                    heartbeat_timeout_s)
        self._clock = clock
        self._sites: dict[str, SiteSession] = {}
        self._connections = 0  # numbers presence streams across sessions: an old stream never counts

    def register(self, peer: Identity, host_info: dict[str, str] | None = None,
                 instance_id: str = "") -> tuple[SiteSession, bool]:
        """A new session for `peer`; returns it and whether the site had a session already (a rejoin)."""
        now = self._clock()
        had_session = peer.name in self._sites
        session = SiteSession(name=peer.name, org=peer.org, session_id=secrets.token_hex(16),
                              registered_at=now, last_seen=now, host_info=host_info or {},
                              instance_id=instance_id)
        self._sites[peer.name] = session
        return session, had_session

    def touch(self, site: str, session_id: str, job_id: str | None = None, round: int = 0) -> bool:
        """Record a sign of life; False when the session is unknown (the site must register again).
        `job_id` and `round` come with a heartbeat, which says what the site works on ("" for nothing); any
        other call (a poll, an upload) leaves that as the last heartbeat said: a site polling between two
        rounds of a job is still on the job, and reading it as idle showed a busy site idle in check_status."""
        session = self._sites.get(site)
        if session is None or not secrets.compare_digest(session.session_id, session_id):
            return False
        session.last_seen = self._clock()
        if job_id is not None:
            session.job_id, session.round = job_id, round
        return True

    def connected(self, site: str) -> int:
        """A presence stream opened for `site`; returns its number, to pass to `disconnected`."""
        session = self._sites.get(site)
        if session is None:
            return 0
        self._connections += 1
        session.connection, session.disconnected_at = self._connections, None
        return self._connections

    def disconnected(self, site: str, connection: int) -> None:
        """Presence stream number `connection` ended; only the newest one makes the site suspect."""
        session = self._sites.get(site)
        if session is not None and connection and connection == session.connection:
            session.disconnected_at = self._clock()

    def seconds_since_seen(self, site: str) -> float | None:
        """Seconds since the site's last sign of life, on the registry's own clock; None if unknown."""
        session = self._sites.get(site)
        return None if session is None else self._clock() - session.last_seen

    def held_by_another(self, site: str, instance_id: str) -> SiteSession | None:
        """The live session of another process of this site, if one holds it: alive, its presence stream
        open, and another instance id. Then a second copy of the site's kit is running (its certificate is
        the same), and registering it would throw the first off. A restarted site is not held back: a process
        that ended closed its stream (and one on a machine that died stops counting at its heartbeat timeout),
        and the same process registering again (after a network cut) has the same id."""
        session = self._sites.get(site)
        if (session is None or not instance_id or not session.instance_id or session.instance_id == instance_id
                or not self.is_alive(site) or session.connection == 0 or session.disconnected_at is not None):
            return None
        return session

    def mark_stopped(self, site: str) -> None:
        """The site said, with its last heartbeat, that it stops on purpose: gone now, and shown as stopped."""
        session = self._sites.get(site)
        if session is not None:
            session.is_stopped = True

    def mark_revoked(self, site: str) -> None:
        """The site's certificate was just refused as revoked: it is gone, whatever its last heartbeat."""
        session = self._sites.get(site)
        if session is not None:
            session.is_revoked = True

    def is_alive(self, site: str) -> bool:
        session = self._sites.get(site)
        if session is None or session.is_revoked or session.is_stopped:
            return False
        now = self._clock()
        if session.disconnected_at is not None and now - session.disconnected_at > self._grace_s:
            return False
        return now - session.last_seen <= self._timeout_s

    def state(self, site: str) -> str:
        """One word or phrase for a person: revoked, dead, reconnecting, idle, or the job's round."""
        session = self._sites.get(site)
        if session is None:
            return "unknown"
        if session.is_revoked:
            return "revoked"
        if session.is_stopped:
            return "stopped"
        if not self.is_alive(site):
            return "dead"
        if session.disconnected_at is not None:
            return "reconnecting"
        return f"round {session.round} of job {session.job_id}" if session.job_id else "idle"

    def why_gone(self, site: str) -> str:
        """Why a site that is not alive counts as gone, for a person: its connection dropped and it did not
        come back, it fell silent, or it was revoked."""
        session = self._sites.get(site)
        if session is None:
            return "never registered"
        if session.is_revoked:
            return "its certificate was revoked"
        if session.is_stopped:
            return "its site stopped it"
        if session.disconnected_at is not None:
            return f"its connection dropped and it did not reconnect within {self._grace_s:g} s"
        return f"it went silent (no heartbeat for {self._clock() - session.last_seen:.0f} s)"

    def is_suspect(self, site: str) -> bool:
        """Its connection dropped and it has not come back yet (it may still, within the grace)."""
        session = self._sites.get(site)
        return session is not None and session.disconnected_at is not None

    def alive(self) -> list[str]:
        return sorted(name for name in self._sites if self.is_alive(name))

    def session(self, site: str) -> SiteSession | None:
        return self._sites.get(site)

    def sessions(self) -> list[SiteSession]:
        return [self._sites[k] for k in sorted(self._sites)]

    def drop(self, site: str) -> None:
        self._sites.pop(site, None)

    @property
    def heartbeat_timeout_s(self) -> float:
        return self._timeout_s

    @property
    def disconnect_grace_s(self) -> float:
        return self._grace_s
