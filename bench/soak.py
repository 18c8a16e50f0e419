"""The chaos soak (issue 16): a study from real kits with N sites (12 by default) runs the soak job round
after round for `--minutes` while a seeded schedule kills and restarts sites (one or several in a round)
and the server (mid-round and between rounds), stalls, resets and slows links through a fault proxy,
crashes a worker and fills a site's disk; then it checks every invariant and prints the summary table
with the seed. The engine is tests/soak/ (shared with the 2-minute test, tests/e2e/test_soak.py); what is
checked and how to read the table: docs/soak.md.

    python bench/soak.py                                # 12 sites, 15 minutes, seed 1
    python bench/soak.py --minutes 5 --sites 6 --seed 42
    python bench/soak.py --rounds 40 --sites 4 --replay-check   # the same seed twice: same schedule, same model

Exit code 0 when every invariant passed, 1 otherwise. Needs root for the disk-full fault (a tmpfs mount);
without it that kind is left out and the summary says so.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.soak.driver import SoakConfig  # noqa: E402
from tests.soak.report import schedule_digest  # noqa: E402
from tests.soak.run import SoakResult, soak  # noqa: E402


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=15.0, help="how long to run (default 15); not with --replay-check")
    p.add_argument("--seed", type=int, default=1, help="the fault schedule's seed (default 1)")
    p.add_argument("--sites", type=int, default=12, help="client sites (default 12)")
    p.add_argument("--rounds", type=int, default=100_000, help="stop after this many rounds (default: by --minutes)")
    p.add_argument("--min-clients", type=int, default=None, help="the job's min_clients (default: sites // 3, >= 2)")
    p.add_argument("--round-timeout-s", type=float, default=120.0, help="the job's round_timeout_s (default 120)")
    p.add_argument("--root", type=Path, default=None, help="where the study lives (default: a temp dir, removed)")
    p.add_argument("--replay-check", action="store_true",
                   help="run the seed twice over --rounds rounds (no time limit) and compare schedules and models")
    args = p.parse_args(argv)
    if args.sites < 3:
        p.error("--sites: at least 3 (a several-site kill leaves min_clients standing)")
    if args.replay_check and args.rounds >= 100_000:
        p.error("--replay-check needs --rounds N (a fixed number of rounds; try 40)")
    return args


def _one(args: argparse.Namespace, root: Path, minutes: float | None) -> SoakResult:
    min_clients = args.min_clients or max(2, args.sites // 3)
    config = SoakConfig(root=root, sites=args.sites, seed=args.seed, rounds=args.rounds, minutes=minutes,
                        min_clients=min_clients, round_timeout_s=args.round_timeout_s)
    result = soak(config)
    print(result.text, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    base = args.root or Path(tempfile.mkdtemp(prefix="fedkit-soak-"))
    try:
        if not args.replay_check:
            return 0 if _one(args, base / "run", args.minutes).passed else 1
        first, second = _one(args, base / "run-1", None), _one(args, base / "run-2", None)
        same_schedule = schedule_digest(first.run.schedule) == schedule_digest(second.run.schedule)
        same_model = list(first.final_models.values()) == list(second.final_models.values())
        print(f"replay of seed {args.seed}: schedule {'SAME' if same_schedule else 'DIFFERENT'}, "
              f"final model(s) {'SAME' if same_model else 'DIFFERENT'}")
        for (g, a), (_, b) in zip(first.participants, second.participants, strict=False):
            if a != b:
                print(f"  first round answered by other sites: {g}: {a} then {b}")
                break
        return 0 if first.passed and second.passed and same_schedule and same_model else 1
    finally:
        if args.root is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
