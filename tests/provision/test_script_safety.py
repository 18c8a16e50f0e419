"""project.yml text never becomes shell code: free text with a newline or another control character is
refused with one line naming the field, and anything else (quotes, `;`, `$(...)`) lands in the rendered
scripts inert, which we check by parsing and running the scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from provision import provision
from provision.project import parse_project
from runtime.errors import ProjectConfigError

from .conftest import NOW, REPO

EXAMPLE = REPO / "project.yml.example"
SCRIPTS = ("startup/start.sh", "startup/stop.sh", "startup/docker.sh", "startup/fl_admin.sh")


def _example_with(**changes: object) -> dict:
    """The example project with `org` (every participant's) and/or `description` replaced."""
    data = yaml.safe_load(EXAMPLE.read_text())
    if "org" in changes:
        for p in data["participants"]:
            p["org"] = changes["org"]
    if "description" in changes:
        data["description"] = changes["description"]
    return data


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        ({"org": "x\n$(touch /tmp/pwned)"}, "participants[0] (localhost): field 'org'"),
        ({"org": "x\r`touch /tmp/pwned`"}, "participants[0] (localhost): field 'org'"),
        ({"org": "tab\there"}, "participants[0] (localhost): field 'org'"),
        ({"org": "escape\x1b[31m"}, "participants[0] (localhost): field 'org'"),
        ({"org": "bidi\u202eevil"}, "participants[0] (localhost): field 'org'"),
        # marks and zero-width characters: two orgs that look the same would differ (org_admin's scope)
        ({"org": "hospital\u200f-a"}, "participants[0] (localhost): field 'org'"),
        ({"org": "hospital\u200b-a"}, "participants[0] (localhost): field 'org'"),
        ({"description": "two\nlines; $(touch /tmp/pwned)"}, "field 'description'"),
        ({"description": "nul\x00"}, "field 'description'"),
    ],
    ids=["org-newline", "org-cr", "org-tab", "org-ansi", "org-bidi", "org-bidi-mark", "org-zero-width",
         "description-newline", "description-nul"],
)
def test_control_characters_in_free_text_are_one_line_naming_the_field(changes: dict, where: str) -> None:
    text = yaml.safe_dump(_example_with(**changes))
    with pytest.raises(ProjectConfigError) as err:
        parse_project(text, "project.yml")
    message = str(err.value)
    # (an org change hits every participant: the line then names each of them, participants[0] among them)
    assert message.startswith("project.yml: ") and f": {where}: control character U+" in message
    assert "\n" not in message


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONSAFEPATH"}}
    env["FEDKIT_PYTHON"] = sys.executable
    return env


def test_quotes_and_command_substitution_in_org_stay_inert_in_every_script(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"  # the scripts run with tmp_path as their working directory
    hostile = "x'; touch pwned; ' \"$(touch pwned)\" `touch pwned` \\"
    project = parse_project(yaml.safe_dump(_example_with(org=hostile, description=hostile)), "project.yml")
    result = provision(project, tmp_path / "ws", NOW)

    scripts = [k.kit_dir / s for k in result.kits for s in SCRIPTS if (k.kit_dir / s).exists()]
    assert len(scripts) >= 7
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)
    admin_kit = next(k.kit_dir for k in result.kits if k.name == "admin@study.org")
    assert hostile in (admin_kit / "startup" / "fl_admin.sh").read_text()  # it is there, as inert text
    # Run the scripts' safe paths: the admin console's --help (after the kit check and pinning) and stop.sh.
    done = subprocess.run(["bash", str(admin_kit / "startup" / "fl_admin.sh"), "--help"], capture_output=True,
                          text=True, env=_env(), timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "usage: fl_admin.sh" in done.stdout
    for kit in result.kits:
        if (kit.kit_dir / "startup" / "stop.sh").exists():
            subprocess.run(["bash", str(kit.kit_dir / "startup" / "stop.sh")], check=True, capture_output=True,
                           env=_env(), timeout=60, cwd=tmp_path)
    assert not marker.exists(), "project.yml text was executed by a kit script"
