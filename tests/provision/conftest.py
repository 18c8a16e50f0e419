"""Fixtures for provisioning tests: the example study, a pinned clock, and one provisioned workspace.

`provisioned` is built once per session and must be treated as read-only: the kits in one prod_NN share
hard-linked runtime files, so a test that edits a kit works on `kit_copy(...)` instead.
"""

from __future__ import annotations

import datetime as dt
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from provision import KitRenderer, Project, ProvisionResult, load_project, provision

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "project.yml.example"
PYTHON = sys.executable
NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Provisioned:
    project: Project
    workspace: Path
    result: ProvisionResult

    def kit(self, name: str) -> Path:
        return self.result.prod_dir / name

    @property
    def study_dir(self) -> Path:
        return self.workspace / self.project.name


@pytest.fixture(scope="session")
def example_project() -> Project:
    return load_project(EXAMPLE)


@pytest.fixture(scope="session")
def renderer() -> KitRenderer:
    return KitRenderer()


@pytest.fixture(scope="session")
def provisioned(
    tmp_path_factory: pytest.TempPathFactory, example_project: Project, renderer: KitRenderer
) -> Provisioned:
    workspace = tmp_path_factory.mktemp("ws")
    return Provisioned(example_project, workspace, provision(example_project, workspace, NOW, renderer))


@pytest.fixture
def kit_copy(tmp_path: Path, provisioned: Provisioned) -> Callable[[str], Path]:
    """A private, independent copy of one provisioned kit (real copies, not hard links), safe to edit."""

    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(provisioned.kit(name), target)
        return target

    return copy
