"""The pipeline: runs number their prod_NN and reuse the CA, add-site adds one kit and touches nothing else,
and a failing step leaves no partial output."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from provision import KitRenderer, Project, add_site, provision
from provision.pipeline import ADD_SITE_STEPS, PROVISION_STEPS, BuildState, run_steps
from provision.state import StudyWorkspace, load_ledger
from runtime.errors import CertificateError, ProjectConfigError
from runtime.identity import Kind
from runtime.kitsig import verify_kit

from .conftest import EXAMPLE, NOW

LATER = NOW + dt.timedelta(days=3)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (zips included) -> SHA-256, to prove nothing changed."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def project_with_site(name: str, org: str = "hospital-d") -> Project:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["participants"].append({"type": "client", "name": name, "org": org})
    return Project.model_validate(data)


@pytest.fixture
def fresh(tmp_path: Path, example_project: Project, renderer: KitRenderer):
    """A workspace with one provisioning run, private to the test (it will be changed)."""
    result = provision(example_project, tmp_path, NOW, renderer)
    return tmp_path, result


def test_second_run_is_prod_02_and_reuses_the_ca(fresh, example_project, renderer) -> None:
    workspace, first = fresh
    ca_before = (workspace / "example-study" / "state" / "rootCA.pem").read_bytes()
    second = provision(example_project, workspace, LATER, renderer)
    assert (first.prod_dir.name, second.prod_dir.name) == ("prod_01", "prod_02")
    assert first.is_ca_new and not second.is_ca_new
    assert (workspace / "example-study" / "state" / "rootCA.pem").read_bytes() == ca_before
    assert (second.prod_dir / "site-1" / "startup" / "rootCA.pem").read_bytes() == ca_before
    old_key = (first.prod_dir / "site-1" / "startup" / "client.key").read_bytes()
    assert (second.prod_dir / "site-1" / "startup" / "client.key").read_bytes() != old_key


def test_ledger_records_every_issued_serial(fresh) -> None:
    workspace, result = fresh
    ledger = load_ledger(StudyWorkspace.for_study(workspace, "example-study").ledger_path)
    assert [c.name for c in ledger.issued] == [k.name for k in result.kits]
    for kit in result.kits:
        stem = "server" if kit.kind is Kind.SERVER else "client"
        cert = x509.load_pem_x509_certificate((kit.kit_dir / "startup" / f"{stem}.crt").read_bytes())
        assert ledger.serials_of(kit.name) == [str(cert.serial_number)]
    assert {c.run for c in ledger.issued} == {"prod_01"}


def test_add_site_adds_one_kit_under_the_same_ca_and_touches_nothing_else(fresh, renderer) -> None:
    workspace, first = fresh
    study = workspace / "example-study"
    before = snapshot(study)
    result = add_site(project_with_site("site-4"), workspace, "site-4", LATER, renderer)

    assert result.prod_dir == first.prod_dir
    assert [(k.name, k.kind) for k in result.kits] == [("site-4", Kind.CLIENT)]
    after = snapshot(study)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    new_kit = {p for p in after if p.startswith("prod_01/site-4/")} | {"prod_01/site-4.zip"}
    assert changed == new_kit | {"state/issued.json"}

    kit = result.kits[0].kit_dir
    assert verify_kit(kit).is_intact
    ca = x509.load_pem_x509_certificate((study / "state" / "rootCA.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((kit / "startup" / "client.crt").read_bytes())
    assert (kit / "startup" / "rootCA.pem").read_bytes() == (study / "state" / "rootCA.pem").read_bytes()
    PolicyBuilder().store(Store([ca])).time(LATER).build_client_verifier().verify(cert, [])
    done = subprocess.run(
        ["openssl", "verify", "-attime", str(int(LATER.timestamp())), "-CAfile", str(study / "state" / "rootCA.pem"),
         "-purpose", "sslclient", str(kit / "startup" / "client.crt")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    ledger = load_ledger(study / "state" / "issued.json")
    assert ledger.serials_of("site-4") == [str(cert.serial_number)]


def test_add_site_refuses_a_name_not_in_project_yml(fresh, example_project, renderer) -> None:
    workspace, _ = fresh
    with pytest.raises(ProjectConfigError, match=r"p\.yml: no participant named 'site-9' \(sites: site-1, site-2"):
        add_site(example_project, workspace, "site-9", LATER, renderer, project_source="p.yml")


def test_add_site_refuses_a_site_that_already_has_a_kit(fresh, example_project, renderer) -> None:
    workspace, first = fresh
    before = snapshot(first.prod_dir)
    with pytest.raises(ProjectConfigError, match="'site-2' already has a kit in prod_01"):
        add_site(example_project, workspace, "site-2", LATER, renderer)
    assert snapshot(first.prod_dir) == before


def test_add_site_refuses_the_server_and_a_study_never_provisioned(tmp_path, example_project, renderer) -> None:
    with pytest.raises(ProjectConfigError, match="'localhost' is the server"):
        add_site(example_project, tmp_path, "localhost", NOW, renderer)
    with pytest.raises(CertificateError, match="no study CA yet; run `fedkit provision` first"):
        add_site(project_with_site("site-4"), tmp_path, "site-4", NOW, renderer)


def test_a_failing_step_removes_the_partial_prod_dir(tmp_path, example_project, renderer) -> None:
    def explode(state: BuildState) -> None:
        raise RuntimeError("disk full")

    state = BuildState(
        project=example_project,
        workspace=StudyWorkspace.for_study(tmp_path, example_project.name),
        targets=example_project.participants,
        now=NOW,
        renderer=renderer,
    )
    steps = (*PROVISION_STEPS[:-1], explode)  # fail after kits and zips are written, before the ledger
    with pytest.raises(RuntimeError, match="disk full"):
        run_steps(state, steps)
    study = tmp_path / "example-study"
    assert sorted(p.name for p in study.iterdir()) == ["state"]  # the CA stays: later runs must reuse it
    assert not (study / "state" / "issued.json").exists()
    # ... and the next real run still numbers itself prod_01.
    assert provision(example_project, tmp_path, NOW, renderer).prod_dir.name == "prod_01"


def test_a_failing_add_site_removes_only_its_own_kit(fresh, renderer) -> None:
    workspace, first = fresh
    before = snapshot(workspace)
    project = project_with_site("site-4")

    def explode(state: BuildState) -> None:
        assert (first.prod_dir / "site-4.zip").exists()  # it got as far as writing the kit and its zip
        raise RuntimeError("disk full")

    state = BuildState(
        project=project,
        workspace=StudyWorkspace.for_study(workspace, project.name),
        targets=(project.participant("site-4"),),
        now=LATER,
        renderer=renderer,
    )
    with pytest.raises(RuntimeError, match="disk full"):
        run_steps(state, (*ADD_SITE_STEPS[:-1], explode))
    assert snapshot(workspace) == before


def test_prod_dirs_sort_by_number(tmp_path: Path) -> None:
    ws = StudyWorkspace.for_study(tmp_path, "s")
    assert ws.next_prod_dir().name == "prod_01"
    for name in ("prod_02", "prod_10", "prod_100", "prod_99", "prod_x", "notes"):
        (ws.root / name).mkdir(parents=True)
    assert [p.name for p in ws.prod_dirs()] == ["prod_02", "prod_10", "prod_99", "prod_100"]
    assert ws.next_prod_dir().name == "prod_101"


@pytest.mark.parametrize("edit", [{"fed_learn_port": 19999}, {"admin_port": 19998}, {"name": "fl.hospital.org"}])
def test_add_site_refuses_when_the_server_differs_from_the_one_issued(fresh, renderer, edit) -> None:
    # the new site's kit would point at a server that does not exist, and it could never connect
    workspace, first = fresh
    data = yaml.safe_load(EXAMPLE.read_text())
    data["participants"].append({"type": "client", "name": "site-4", "org": "hospital-d"})
    next(p for p in data["participants"] if p["type"] == "server").update(edit)
    before = snapshot(first.prod_dir)
    with pytest.raises(ProjectConfigError, match=r"is not the one issued in prod_01 \(localhost, ports 8002, 8003\)"):
        add_site(Project.model_validate(data), workspace, "site-4", LATER, renderer)
    assert snapshot(first.prod_dir) == before


def test_add_site_compares_with_the_server_zip_when_its_folder_is_gone(fresh, renderer) -> None:
    workspace, first = fresh
    server = next(k for k in first.kits if k.kind is Kind.SERVER)
    shutil.rmtree(server.kit_dir)
    data = yaml.safe_load(EXAMPLE.read_text())
    data["participants"].append({"type": "client", "name": "site-4", "org": "hospital-d"})
    next(p for p in data["participants"] if p["type"] == "server")["fed_learn_port"] = 19999
    with pytest.raises(ProjectConfigError, match="is not the one issued in prod_01"):
        add_site(Project.model_validate(data), workspace, "site-4", LATER, renderer)
    add_site(project_with_site("site-4"), workspace, "site-4", LATER, renderer)  # as issued: added
