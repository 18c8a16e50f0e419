"""Code this site's strict code rule refused, kept for site IT to review (startup/review_job.sh).

Under `code: {approved_hashes: ...}` or `{signed_by: ...}` a job with other code is refused before any of
it runs. To approve it, site IT must read exactly the code that asked to run, and its hash: the site keeps
the archive it received (the bytes it hashed), never unpacked, with what it knew of the job:

    workspace/review/<job>.zip    the job's archive as received
    workspace/review/<job>.json   job name, submitter, when and why it was refused, its code and archive hashes,
                                  the learner as it would run (after --set overrides)

`review_job.sh` lists them; `review_job.sh JOB` unpacks one into workspace/review/<job>/ (as the site
unpacks a job: no links, no paths out, bounded sizes), checks the archive still has the hash it was refused
with, and says how to approve it; `--against OTHER` first shows what changed from the code of another job
(one that ran here, as approved), so a new version of reviewed code is read as its diff. Nothing here
imports or runs the job's code. The newest MAX_KEPT archives are kept, within MAX_KEPT_BYTES.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from ..audit_report import person
from ..errors import ConfigError, JobRejected
from ..job_code import code_hash_of_zip
from ..job_spec import safe_extract
from ..plain_text import shown

REVIEW_DIR = "review"
MAX_KEPT = 16
MAX_KEPT_BYTES = 512 << 20
MAX_DIFFED_BYTES = 1 << 20


def keep_for_review(workspace: Path, job_id: str, archive: bytes, facts: dict[str, Any]) -> bool:
    """Keep a refused job's archive and `facts` (JSON-able) for review, unless it would pass MAX_KEPT_BYTES
    alone; then trim the oldest. Returns whether it is kept (now, or since an earlier refusal)."""
    folder = workspace / REVIEW_DIR
    if is_kept(workspace, job_id):
        return True
    if len(archive) > MAX_KEPT_BYTES:
        return False
    folder.mkdir(exist_ok=True)
    part = folder / f"{job_id}.zip.part"
    part.write_bytes(archive)
    (folder / f"{job_id}.json").write_text(json.dumps({"job_id": job_id, **facts}, indent=1, sort_keys=True))
    part.replace(folder / f"{job_id}.zip")
    _trim(folder)
    return True


def is_kept(workspace: Path, job_id: str) -> bool:
    return (workspace / REVIEW_DIR / f"{job_id}.zip").exists()


def _trim(folder: Path) -> None:
    kept = sorted(folder.glob("*.zip"), key=lambda p: p.stat().st_mtime, reverse=True)
    total = 0
    for i, archive in enumerate(kept):
        total += archive.stat().st_size
        if i >= MAX_KEPT or total > MAX_KEPT_BYTES:
            _forget(folder, archive.name.removesuffix(".zip"))


def _forget(folder: Path, job_id: str) -> None:
    for path in (folder / f"{job_id}.zip", folder / f"{job_id}.json"):
        path.unlink(missing_ok=True)
    shutil.rmtree(folder / job_id, ignore_errors=True)


def pending(workspace: Path) -> list[dict[str, Any]]:
    """The kept reviews, newest first."""
    folder = workspace / REVIEW_DIR
    archives = sorted(folder.glob("*.zip"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [json.loads(facts.read_text()) for facts in (a.with_suffix(".json") for a in archives) if facts.is_file()]


def unpack(workspace: Path, job_id: str) -> tuple[dict[str, Any], Path, list[tuple[str, int]]]:
    """Unpack a kept job into workspace/review/<job>/ (afresh); its facts, the folder and its files (name,
    bytes). Raises ConfigError if none is kept, JobRejected if the archive no longer hashes as it did."""
    folder = workspace / REVIEW_DIR
    archive, facts_file = folder / f"{job_id}.zip", folder / f"{job_id}.json"
    if "/" in job_id or job_id.startswith(".") or not archive.is_file() or not facts_file.is_file():
        kept = ", ".join(f["job_id"] for f in pending(workspace)) or "none"
        raise ConfigError(f"no refused job '{job_id}' kept for review (kept: {kept})")
    facts = json.loads(facts_file.read_text())
    data = archive.read_bytes()
    if code_hash_of_zip(data) != facts.get("code_sha256"):
        raise JobRejected(f"{archive}: its code hash is no longer {facts.get('code_sha256')}: the file changed "
                          "since the site refused it; do not approve from it")
    dest = folder / job_id
    shutil.rmtree(dest, ignore_errors=True)
    safe_extract(data, dest)
    files = sorted((str(p.relative_to(dest)), p.stat().st_size) for p in dest.rglob("*") if p.is_file())
    return facts, dest, files


def code_of(workspace: Path, job_id: str) -> Path:
    """The code of `job_id` as this site has it: a job that ran here (workspace/jobs/<job>/code, as it was
    approved and unpacked) or a refused one kept for review (unpacked now). Raises ConfigError if neither."""
    if "/" not in job_id and not job_id.startswith("."):
        ran = workspace / "jobs" / job_id / "code"
        if ran.is_dir():
            return ran
        if is_kept(workspace, job_id):
            return unpack(workspace, job_id)[1]
    raise ConfigError(f"job '{job_id}' neither ran on this site (workspace/jobs/{job_id}/code) nor is kept for review")


def code_diff(old: Path, new: Path) -> list[str]:
    """What changed from folder `old` to folder `new`: files added and removed, and for each file that
    differs a unified diff (text under MAX_DIFFED_BYTES) or its two sha256 (anything else)."""
    def files(root: Path) -> dict[str, Path]:
        return {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file() and not p.is_symlink()}

    before, after = files(old), files(new)
    lines = [f"added: {name}" for name in sorted(after.keys() - before.keys())]
    lines += [f"removed: {name}" for name in sorted(before.keys() - after.keys())]
    for name in sorted(before.keys() & after.keys()):
        a, b = before[name].read_bytes(), after[name].read_bytes()
        if a == b:
            continue
        try:
            if max(len(a), len(b)) > MAX_DIFFED_BYTES:
                raise UnicodeDecodeError("utf-8", b"", 0, 1, "too large to show")
            lines += difflib.unified_diff(a.decode().splitlines(), b.decode().splitlines(), f"a/{name}",
                                          f"b/{name}", lineterm="")
        except UnicodeDecodeError:
            lines.append(f"changed: {name} (sha256 {hashlib.sha256(a).hexdigest()[:16]}... -> "
                         f"{hashlib.sha256(b).hexdigest()[:16]}..., not shown: binary or over "
                         f"{MAX_DIFFED_BYTES >> 20} MiB)")
    return lines or ["no file differs"]


def render_pending(reviews: list[dict[str, Any]]) -> str:
    if not reviews:
        return "no refused job is kept for review"
    lines = ["refused jobs kept for review (newest first); review one with: startup/review_job.sh JOB"]
    for facts in reviews:
        who = person(facts.get("submitter")) or "?"
        lines.append(f"  {facts['job_id']}  \"{facts.get('job_name', '')}\" from {who} "
                     f"at {facts.get('refused_at', '?')}: code {facts.get('code_sha256', '?')[:16]}...")
    return "\n".join(shown(line) for line in lines)


def render_review(facts: dict[str, Any], dest: Path, files: list[tuple[str, int]]) -> str:
    code = facts.get("code_sha256", "?")
    lines = [f"job {facts['job_id']} \"{facts.get('job_name', '')}\" from {person(facts.get('submitter')) or '?'}",
             f"refused at {facts.get('refused_at', '?')}: {facts.get('reason', '')}",
             f"code sha256 {code} (the archive still hashes so)",
             f"learner as it would run: {json.dumps(facts.get('learner_to_run'), sort_keys=True)}",
             f"unpacked, never run, into {dest}:"]
    lines += [f"  {name}  ({size} bytes)" for name, size in files]
    lines += ["to approve this code after reading it, add its hash to local/job_policy.yml and restart the site:",
              "  code:", "    approved_hashes:", f"      - {code}",
              "then ask the study's researcher to submit it again (clone_job)."]
    return "\n".join(shown(line) for line in lines)  # file names are the job's: printed, never obeyed


def main(argv: list[str] | None = None) -> int:
    """`python -m runtime.client.code_review --kit KIT [JOB]` (startup/review_job.sh)."""
    import argparse

    parser = argparse.ArgumentParser(prog="review_job.sh", description="Jobs this site's code rule refused, "
                                     "kept to be read before approving their code hash.")
    parser.add_argument("job", nargs="?", help="a job id: unpack its code (never run) and say how to approve it")
    parser.add_argument("--against", metavar="JOB", help="also show what changed from the code of JOB (one that "
                        "ran here, or another kept one): a new version of approved code is read as its diff")
    parser.add_argument("--kit", type=Path, default=Path.cwd(), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    workspace = args.kit / "workspace"
    try:
        if args.job is None:
            print(render_pending(pending(workspace)))
        else:
            facts, dest, files = unpack(workspace, args.job)
            if args.against:
                print(f"changes from the code of job {args.against} to this one:")
                print("\n".join(shown(line) for line in code_diff(code_of(workspace, args.against), dest)))
                print()
            print(render_review(facts, dest, files))
    except (ConfigError, JobRejected, OSError, ValueError) as e:
        print(f"review_job: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
