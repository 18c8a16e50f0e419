"""The seeded fault schedule: a list of faults, each pinned to a global round number and a phase of that
round (mid-round: once the round's tasks are sent; between: once the round closed), never to a time, so a
replay of a seed injects the same faults at the same points of the study whatever the machine's speed.

The global round number counts rounds across the soak's jobs (a job that fails is followed by a new one),
so the schedule does not depend on how a job ended either.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    SITE_KILL = "site_kill"            # SIGKILL one site (daemon + worker) mid-round, restart it at once
    SITES_KILL = "sites_kill"          # SIGKILL two or three sites in the same round
    SERVER_KILL_MID = "server_kill_mid"          # SIGKILL the server mid-round, restart at once
    SERVER_KILL_BETWEEN = "server_kill_between"  # SIGKILL the server just after a round closed
    LINK_STALL = "link_stall"          # black-hole one site's connection after N bytes (either direction)
    LINK_RESET = "link_reset"          # TCP RST on one site's connection after N bytes (either direction)
    LINK_SLOW = "link_slow"            # every chunk delayed, both directions, for one round
    WORKER_CRASH = "worker_crash"      # the site's learner raises for one round
    DISK_FULL = "disk_full"            # a tiny tmpfs over the site's jobs folder for one round


class Phase(StrEnum):
    MID = "mid"
    BETWEEN = "between"


# how often each kind is drawn (out of the sum); kills dominate because they are what hurts most
WEIGHTS: dict[Kind, int] = {
    Kind.SITE_KILL: 4, Kind.SITES_KILL: 2, Kind.SERVER_KILL_MID: 2, Kind.SERVER_KILL_BETWEEN: 2,
    Kind.LINK_STALL: 2, Kind.LINK_RESET: 2, Kind.LINK_SLOW: 1, Kind.WORKER_CRASH: 2, Kind.DISK_FULL: 1,
}
LINK_BYTES_CHOICES = (0, 512, 4096, 20_000)


@dataclass(frozen=True)
class Fault:
    index: int
    round: int                 # global round number at which it fires
    phase: Phase
    kind: Kind
    sites: tuple[str, ...] = ()  # kills, worker crash, disk full, link stall and reset: the sites it hits
    direction: str = "both"    # link faults: up, down or both
    after_bytes: int = 0       # link stall/reset: bytes the connection forwards first
    delay_ms: float = 0.0      # link slow

    def describe(self) -> str:
        extra = ",".join(self.sites) or self.direction
        return f"#{self.index} r{self.round}/{self.phase.value} {self.kind.value} {extra}"


def make_schedule(seed: int, sites: list[str], n_rounds: int, kinds: tuple[Kind, ...] | None = None,
                  mean_gap_rounds: float = 1.5) -> list[Fault]:
    """Faults for global rounds 2..n_rounds (round 1 runs clean, as a warm-up). One fault per fault round;
    gaps between fault rounds are 1..2*mean_gap_rounds-1 (so about `mean_gap_rounds` on average)."""
    rng = random.Random(seed)
    pool = [k for k in WEIGHTS if kinds is None or k in kinds]
    weights = [WEIGHTS[k] for k in pool]
    faults: list[Fault] = []
    rnd = 1
    top_gap = max(1, round(2 * mean_gap_rounds - 1))
    while True:
        rnd += rng.randint(1, top_gap)
        if rnd > n_rounds:
            return faults
        kind = rng.choices(pool, weights)[0]
        phase = Phase.BETWEEN if kind is Kind.SERVER_KILL_BETWEEN else Phase.MID
        n_sites = {Kind.SITE_KILL: 1, Kind.WORKER_CRASH: 1, Kind.DISK_FULL: 1, Kind.LINK_STALL: 1,
                   Kind.LINK_RESET: 1, Kind.SITES_KILL: min(len(sites) - 2, rng.randint(2, 3))}.get(kind, 0)
        chosen = tuple(sorted(rng.sample(sites, max(0, n_sites))))
        faults.append(Fault(
            index=len(faults), round=rnd, phase=phase, kind=kind, sites=chosen,
            direction=rng.choice(("up", "down", "both")) if kind in (Kind.LINK_STALL, Kind.LINK_RESET) else "both",
            after_bytes=rng.choice(LINK_BYTES_CHOICES) if kind in (Kind.LINK_STALL, Kind.LINK_RESET) else 0,
            delay_ms=float(rng.choice((5, 20, 50))) if kind is Kind.LINK_SLOW else 0.0))
