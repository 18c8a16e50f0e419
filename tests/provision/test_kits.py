"""Kit layout, rendered files, zips and the launch scripts (except signature checks: test_signing.py)."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import signal
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import jinja2
import pytest
import yaml

import runtime
from provision.kit import Kit, KitFile
from provision.render import KitRenderer, docker_name, read_runtime_package
from provision.zipping import zip_kit
from runtime.client.job_policy import JobPolicy
from runtime.client.privacy_policy import PrivacyPolicy
from runtime.identity import Kind, Role
from runtime.kit_config import (
    AdminKitConfig,
    ClientKitConfig,
    ServerKitConfig,
    ServerLocalSettings,
    SiteLocalSettings,
    load_model,
)
from runtime.server.authz import DEFAULT_POLICY, Policy

COMMON = {"readme.txt", "requirements.txt", "startup/rootCA.pem", "startup/signature.json"}
DAEMON = {"startup/start.sh", "startup/stop.sh", "startup/docker.sh", "startup/Dockerfile"}
EXPECTED_LAYOUT = {
    Kind.SERVER: COMMON
    | DAEMON
    | {
        "startup/fed_server.json",
        "startup/server.crt",
        "startup/server.key",
        "local/server.yml.example",
        "local/authorization.yml.example",
    },
    Kind.CLIENT: COMMON
    | DAEMON
    | {
        "startup/fed_client.json",
        "startup/client.crt",
        "startup/client.key",
        "local/site.yml.example",
        "local/job_policy.yml.example",
        "local/privacy.yml.example",
        "startup/audit_report.sh",
        "startup/review_job.sh",
    },
    Kind.ADMIN: COMMON | {"startup/fed_admin.json", "startup/client.crt", "startup/client.key", "startup/fl_admin.sh",
                          "startup/docker.sh", "startup/Dockerfile"},
}
NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
EXECUTABLES = {"startup/start.sh", "startup/stop.sh", "startup/docker.sh", "startup/fl_admin.sh",
               "startup/audit_report.sh", "startup/review_job.sh"}


def files_of(kit_dir: Path) -> dict[str, Path]:
    return {p.relative_to(kit_dir).as_posix(): p for p in kit_dir.rglob("*") if p.is_file()}


def runtime_package_files() -> set[str]:
    root = Path(runtime.__file__).parent
    return {
        f"runtime/{p.relative_to(root).as_posix()}"
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def test_prod_folder_has_one_folder_and_one_zip_per_participant(provisioned) -> None:
    prod = provisioned.result.prod_dir
    assert prod == provisioned.study_dir / "prod_01"
    names = [p.name for p in provisioned.project.participants]
    assert sorted(p.name for p in prod.iterdir()) == sorted(names + [f"{n}.zip" for n in names])


@pytest.mark.parametrize("kind", list(Kind))
def test_kit_layout_matches_design(provisioned, kind: Kind) -> None:
    for kit in (k for k in provisioned.result.kits if k.kind is kind):
        found = set(files_of(kit.kit_dir))
        assert found - runtime_package_files() == EXPECTED_LAYOUT[kind]
        assert {f for f in found if f.startswith("runtime/")} == runtime_package_files()


def test_runtime_copy_is_byte_identical_and_has_no_bytecode(provisioned) -> None:
    root = Path(runtime.__file__).parent
    kit = provisioned.kit("site-1")
    for rel in runtime_package_files():
        assert (kit / rel).read_bytes() == (root / rel.removeprefix("runtime/")).read_bytes()
    assert not list(kit.rglob("__pycache__"))
    assert not list(kit.rglob("*.pyc"))


def test_modes_scripts_executable_keys_private(provisioned) -> None:
    for kit in provisioned.result.kits:
        for rel, path in files_of(kit.kit_dir).items():
            mode = stat.S_IMODE(path.stat().st_mode)
            if rel.endswith(".key"):
                assert mode == 0o600, rel
            elif rel in EXECUTABLES:
                assert mode & 0o111 == 0o111, rel
            else:
                assert mode & 0o111 == 0 and mode & 0o044 == 0o044, rel


def test_configs_are_the_runtime_models_with_the_right_values(provisioned) -> None:
    server = load_model(provisioned.kit("localhost") / "startup" / "fed_server.json", ServerKitConfig)
    assert (server.project, server.name, server.fed_learn_port, server.admin_port) == (
        "example-study",
        "localhost",
        8002,
        8003,
    )
    assert [(c.name, c.org) for c in server.clients] == [
        ("site-1", "hospital-a"),
        ("site-2", "hospital-b"),
        ("site-3", "hospital-c"),
    ]
    assert {(a.name, a.role) for a in server.admins} == {
        ("admin@study.org", Role.PROJECT_ADMIN),
        ("lead@study.org", Role.LEAD),
    }
    client = load_model(provisioned.kit("site-2") / "startup" / "fed_client.json", ClientKitConfig)
    assert (client.name, client.org, client.server_host, client.fed_learn_port) == (
        "site-2",
        "hospital-b",
        "localhost",
        8002,
    )
    admin = load_model(provisioned.kit("lead@study.org") / "startup" / "fed_admin.json", AdminKitConfig)
    assert (admin.name, admin.role, admin.server_host, admin.admin_port) == (
        "lead@study.org",
        Role.LEAD,
        "localhost",
        8003,
    )


@pytest.mark.parametrize(
    ("kit", "rel", "model"),
    [
        ("site-1", "local/site.yml.example", SiteLocalSettings),
        ("localhost", "local/server.yml.example", ServerLocalSettings),
        ("site-1", "local/privacy.yml.example", PrivacyPolicy),
    ],
)
def test_local_examples_list_exactly_the_settings_fields(provisioned, kit: str, rel: str, model: type) -> None:
    data = yaml.safe_load((provisioned.kit(kit) / rel).read_text())
    assert set(data) == set(model.model_fields)
    assert model.model_validate(data) == model()


def test_policy_examples_show_the_runtime_defaults(provisioned, tmp_path: Path) -> None:
    policy_text = (provisioned.kit("site-3") / "local" / "job_policy.yml.example").read_text()
    assert JobPolicy.model_validate(yaml.safe_load(policy_text)) == JobPolicy()
    auth = yaml.safe_load((provisioned.kit("localhost") / "local" / "authorization.yml.example").read_text())
    assert auth == {str(role): {c: str(s) for c, s in rules.items()} for role, rules in DEFAULT_POLICY.items()}
    assert set(auth) == {r.value for r in Role}
    # ... and the server's own loader accepts it as a local/authorization.yml.
    copy = tmp_path / "authorization.yml"
    copy.write_text((provisioned.kit("localhost") / "local" / "authorization.yml.example").read_text())
    Policy.load(copy)


def test_requirements_follow_pyproject_and_torch_only_on_clients(provisioned) -> None:
    def names(kit: str) -> set[str]:
        lines = (provisioned.kit(kit) / "requirements.txt").read_text().splitlines()
        return {line.split(">")[0].split("=")[0] for line in lines if line and not line.startswith("#")}

    assert {"cryptography", "pydantic", "pyyaml", "grpcio"} <= names("localhost")
    assert "torch" in names("site-1")
    assert "torch" not in names("localhost") | names("admin@study.org")
    # imaging jobs' libraries (templates/jobs/segmentation) only where the worker runs
    assert {"monai", "nibabel"} <= names("site-1")
    assert not {"monai", "nibabel"} & (names("localhost") | names("admin@study.org"))
    # pinned to exactly what provisioning ran (torch's local label, +cpu, names a build, not a release)
    for line in (provisioned.kit("site-1") / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            assert version == importlib.metadata.version(name).split("+")[0], line
    assert not {"jinja2", "typer", "pytest", "ruff"} & (names("site-1") | names("localhost"))


def test_readme_says_what_each_participant_does(provisioned) -> None:
    server = (provisioned.kit("localhost") / "readme.txt").read_text()
    client = (provisioned.kit("site-1") / "readme.txt").read_text()
    admin = (provisioned.kit("lead@study.org") / "readme.txt").read_text()
    assert "8002" in server and "8003" in server and "local/crl.pem" in server
    assert "localhost:8002" in client and "data_root" in client
    assert "fl_admin.sh" in admin and "role lead" in admin


@pytest.mark.parametrize("script", sorted(EXECUTABLES))
def test_scripts_are_valid_bash_that_verify_first(provisioned, script: str) -> None:
    kits = [k.kit_dir for k in provisioned.result.kits if (k.kit_dir / script).exists()]
    assert kits
    for kit in kits:
        text = (kit / script).read_text()
        subprocess.run(["bash", "-n", str(kit / script)], check=True)
        assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
        if script == "startup/stop.sh":
            assert "runtime.kitsig" not in text  # stopping must work even on a changed kit
            continue
        assert 'PYTHON="${FEDKIT_PYTHON:-python3}"' in text
        # The kit is verified before any of its code can be imported, and goes on PYTHONPATH only after.
        verify = text.index("sys.path.append(sys.argv[1]); from runtime.kitsig import ")  # start_check or main
        # -E -P: no PYTHONPATH, no current folder; -B: the check writes no bytecode into the kit
        assert text[:verify].endswith("-B -E -P -c 'import sys; ")
        assert "PYTHONPATH" not in text[:verify].replace("ignore PYTHONPATH", "")
        if 'exec "$PYTHON"' in text:
            assert text.index('export PYTHONPATH="$KIT_DIR"') > verify
            assert text.index('exec "$PYTHON"') > verify


def test_launch_lines_exec_the_right_runtime_module(provisioned) -> None:
    expected = {
        ("localhost", "start.sh"): 'exec "$PYTHON" -m runtime.server --kit "$KIT_DIR" "$@"',
        ("site-1", "start.sh"): 'exec "$PYTHON" -m runtime.client --kit "$KIT_DIR" "$@"',
        ("admin@study.org", "fl_admin.sh"): 'exec "$PYTHON" -m runtime.admin --kit "$KIT_DIR" "$@"',
        ("site-1", "audit_report.sh"): 'exec "$PYTHON" -m runtime.audit_report --kit "$KIT_DIR" "$@"',
        ("site-1", "review_job.sh"): 'exec "$PYTHON" -m runtime.client.code_review --kit "$KIT_DIR" "$@"',
    }
    for (kit, script), line in expected.items():
        assert (provisioned.kit(kit) / "startup" / script).read_text().rstrip().endswith(line)


def test_docker_files_use_the_project_image_and_mount_data_read_only(provisioned) -> None:
    dockerfile = (provisioned.kit("site-1") / "startup" / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim\n" in dockerfile and "USER 10001:10001" in dockerfile
    client = (provisioned.kit("site-1") / "startup" / "docker.sh").read_text()
    server = (provisioned.kit("localhost") / "startup" / "docker.sh").read_text()
    assert "--network host" in client and '"$data_root:$data_root:ro"' in client
    assert "data_root" not in server
    assert docker_name("fedkit", "Example.Study", "site_1") == "fedkit-example-study-site-1"


def test_zip_holds_exactly_the_kit_with_its_modes(provisioned) -> None:
    for kit in provisioned.result.kits:
        assert stat.S_IMODE(kit.zip_path.stat().st_mode) == 0o600  # it holds a private key
        on_disk = files_of(kit.kit_dir)
        with zipfile.ZipFile(kit.zip_path) as zf:
            assert zf.testzip() is None
            entries = {i.filename: i for i in zf.infolist() if not i.is_dir()}
            assert set(entries) == {f"{kit.name}/{rel}" for rel in on_disk}
            for rel, path in on_disk.items():
                info = entries[f"{kit.name}/{rel}"]
                assert zf.read(info) == path.read_bytes()
                assert info.external_attr >> 16 == path.stat().st_mode, rel


def test_unzip_restores_executable_scripts_and_private_keys(provisioned, tmp_path: Path) -> None:
    kit = provisioned.kit("site-2")
    subprocess.run(["unzip", "-q", str(kit.with_suffix(".zip")), "-d", str(tmp_path)], check=True)
    unpacked = tmp_path / "site-2"
    assert set(files_of(unpacked)) == set(files_of(kit))
    assert stat.S_IMODE((unpacked / "startup" / "start.sh").stat().st_mode) & 0o100
    assert stat.S_IMODE((unpacked / "startup" / "client.key").stat().st_mode) == 0o600
    done = subprocess.run([sys.executable, "-m", "runtime.kitsig", str(unpacked)], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr


def test_zip_kit_refuses_to_overwrite(tmp_path: Path, example_project) -> None:
    kit = Kit(participant=example_project.clients[0])
    kit.add("readme.txt", KitFile.of(b"hi"))
    zip_kit(kit, tmp_path / "k.zip", NOW)
    with pytest.raises(FileExistsError):
        zip_kit(kit, tmp_path / "k.zip", NOW)


def test_a_template_using_an_unknown_variable_fails_the_build(tmp_path: Path, example_project) -> None:
    templates = tmp_path / "templates"
    source = Path(__file__).resolve().parents[2] / "templates" / "kit"
    templates.mkdir()
    for path in source.iterdir():
        (templates / path.name).write_bytes(path.read_bytes())
    (templates / "stop.sh.j2").write_text("#!/usr/bin/env bash\necho {{ kit.no_such_field }}\n")
    renderer = KitRenderer(templates, runtime_files={})
    with pytest.raises(jinja2.UndefinedError, match="no_such_field"):
        renderer.render(example_project, example_project.clients[0], ca_fingerprint="AB:CD")


def test_runtime_snapshot_skips_bytecode(tmp_path: Path) -> None:
    pkg = tmp_path / "runtime"
    (pkg / "__pycache__").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (pkg / "stale.pyc").write_bytes(b"\0")
    assert set(read_runtime_package(pkg)) == {"runtime/__init__.py"}


def test_kit_refuses_two_files_at_one_path(example_project) -> None:
    kit = Kit(participant=example_project.clients[0])
    kit.add("a", KitFile.of(b"1"))
    with pytest.raises(ValueError, match="two files at a"):
        kit.add("a", KitFile.of(b"2"))


# --- stop.sh ---------------------------------------------------------------------------------------------


def run_stop(kit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(kit / "startup" / "stop.sh")], capture_output=True, text=True, check=False, timeout=60
    )


@pytest.mark.parametrize("script", ["start.sh", "stop.sh", "docker.sh"])
def test_a_script_run_with_sh_says_to_use_bash(kit_copy, script: str) -> None:
    # dash printed "set: Illegal option -o pipefail" and nothing about what to do
    kit = kit_copy("site-1")
    done = subprocess.run(["sh", str(kit / "startup" / script)], capture_output=True, text=True, check=False,
                          timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().endswith("run it with bash (bash " + f"{kit / 'startup' / script}, or "
                                        f"{kit / 'startup' / script} itself), not sh")


def test_stop_says_clearly_when_not_running(kit_copy) -> None:
    kit = kit_copy("site-1")
    done = run_stop(kit)
    assert done.returncode == 0
    assert done.stdout.strip() == f"stop.sh: 'site-1' is not running (no {kit.resolve()}/workspace/daemon.pid)"


def test_stop_terminates_the_kits_process_and_removes_the_pid_file(kit_copy) -> None:
    kit = kit_copy("site-1").resolve()
    (kit / "workspace").mkdir()
    # A stand-in for the runtime: its command line names the kit the way start.sh's exec does.
    proc = subprocess.Popen(
        [sys.executable, "-c", "import signal; signal.pause()", "--kit", str(kit)],
    )
    try:
        (kit / "workspace" / "daemon.pid").write_text(f"{proc.pid}\n")
        done = run_stop(kit)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "stop.sh: 'site-1' stopped"
        assert proc.wait(timeout=10) == -signal.SIGTERM
        assert not (kit / "workspace" / "daemon.pid").exists()
    finally:
        proc.kill()
        proc.wait()


def test_stop_leaves_an_unrelated_process_alone(kit_copy) -> None:
    kit = kit_copy("site-1")
    (kit / "workspace").mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    try:
        (kit / "workspace" / "daemon.pid").write_text(str(proc.pid))
        done = run_stop(kit)
        assert done.returncode == 1
        assert "is not this kit's runtime" in done.stderr
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_stop_clears_a_stale_pid_file(kit_copy) -> None:
    kit = kit_copy("site-1")
    (kit / "workspace").mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (kit / "workspace" / "daemon.pid").write_text(str(proc.pid))
    done = run_stop(kit)
    assert done.returncode == 0 and "is gone" in done.stdout
    assert not (kit / "workspace" / "daemon.pid").exists()


def test_kit_json_is_pretty_and_ends_with_newline(provisioned) -> None:
    text = (provisioned.kit("site-1") / "startup" / "fed_client.json").read_text()
    assert text.endswith("}\n") and json.loads(text)["name"] == "site-1"
