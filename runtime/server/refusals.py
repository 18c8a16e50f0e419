"""Peers the server refused (revoked, wrong kind of certificate, and at the TLS handshake: another study's
CA, expired, none: see handshake_watch.py), recorded once per peer and reason per
interval: a refused site retries with backoff forever, and a record per retry would bury the audit trail
and the log. The peer's address is written the way a person reads it (`[::1]:50120`, not gRPC's
`ipv6:%5B::1%5D:50120`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from urllib.parse import unquote

from ..audit import AuditLog

log = logging.getLogger(__name__)

REPEAT_AFTER_S = 60.0


def readable_peer(peer: str) -> str:
    """gRPC's peer string as an address: 'ipv6:%5B::1%5D:50120' -> '[::1]:50120'."""
    text = unquote(peer)
    for prefix in ("ipv4:", "ipv6:", "unix:"):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


class RefusalLog:
    """Called as the transport's refusal hook: (service, peer, reason)."""

    def __init__(self, audit: AuditLog, clock: Callable[[], float], repeat_after_s: float = REPEAT_AFTER_S):
        self._audit = audit
        self._clock = clock
        self._repeat_after_s = repeat_after_s
        self._last: dict[tuple[str, str, str], float] = {}
        self._suppressed: dict[tuple[str, str, str], int] = {}

    def __call__(self, service: str, peer: str, reason: str) -> None:
        host = readable_peer(peer).rsplit(":", 1)[0]  # a retry comes from a new port: key on the host
        key = (service, host, reason)
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._repeat_after_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        repeats = self._suppressed.pop(key, 0)
        self._last[key] = now
        log.warning("%s refused %s: %s%s", service, readable_peer(peer), reason,
                    f" (and {repeats} more times since the last record)" if repeats else "")
        self._audit.append("peer_refused", service=service, peer=readable_peer(peer), reason=reason,
                           repeats_since_last=repeats)
