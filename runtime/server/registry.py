"""Which client sites are connected, and whether they are still alive.

A site registers (getting a fresh session id) and then heartbeats; a site silent for longer than
`heartbeat_timeout_s` counts as dead. The clock is passed in so tests can pin it. No I/O here.
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


class Registry:
    def __init__(self, heartbeat_timeout_s: float, clock: Callable[[], float]):
        self._timeout_s = heartbeat_timeout_s
        self._clock = clock
        self._sites: dict[str, SiteSession] = {}

    def register(self, peer: Identity, host_info: dict[str, str] | None = None) -> tuple[SiteSession, bool]:
        """A new session for `peer`; returns it and whether the site had a session already (a rejoin)."""
        now = self._clock()
        had_session = peer.name in self._sites
        session = SiteSession(name=peer.name, org=peer.org, session_id=secrets.token_hex(16),
                              registered_at=now, last_seen=now, host_info=host_info or {})
        self._sites[peer.name] = session
        return session, had_session

    def touch(self, site: str, session_id: str, job_id: str = "", round: int = 0) -> bool:
        """Record a sign of life; False when the session is unknown (the site must register again)."""
        session = self._sites.get(site)
        if session is None or not secrets.compare_digest(session.session_id, session_id):
            return False
        session.last_seen = self._clock()
        session.job_id, session.round = job_id, round
        return True

    def seconds_since_seen(self, site: str) -> float | None:
        """Seconds since the site's last sign of life, on the registry's own clock; None if unknown."""
        session = self._sites.get(site)
        return None if session is None else self._clock() - session.last_seen

    def is_alive(self, site: str) -> bool:
        session = self._sites.get(site)
        return session is not None and self._clock() - session.last_seen <= self._timeout_s

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
