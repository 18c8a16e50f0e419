"""Every rendered Dockerfile and kit script passes hadolint and shellcheck (what `make lint` runs)."""

from __future__ import annotations

from pathlib import Path

from tests.kit_lint import lint_kits, render_example_kits


def test_rendered_dockerfiles_and_scripts_are_lint_clean(tmp_path: Path) -> None:
    kits = render_example_kits(tmp_path)
    assert len(list(kits.rglob("startup/docker.sh"))) == len([d for d in kits.iterdir() if d.is_dir()])  # every kit
    assert lint_kits(kits) == []


def test_the_lint_catches_a_bad_script_and_dockerfile(tmp_path: Path) -> None:
    startup = tmp_path / "kit" / "startup"
    startup.mkdir(parents=True)
    (startup / "start.sh").write_text("#!/usr/bin/env bash\nrm -rf $1/*\n")
    (startup / "Dockerfile").write_text("FROM python\nRUN pip install torch\n")
    problems = "\n".join(lint_kits(tmp_path))
    assert "SC2086" in problems  # unquoted expansion
    assert "DL3006" in problems or "DL3013" in problems  # untagged image / unpinned pip
