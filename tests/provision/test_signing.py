"""Kit signatures: a one-byte edit, an added and a removed file are each caught, by every way a kit is checked.

Ways: runtime.kitsig.verify_kit (the function), `python -m runtime.kitsig` (what start.sh runs) and
`bash startup/start.sh` itself, which must refuse before it reaches the runtime. `fedkit verify-kit`'s
output is checked in test_cli.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from provision import provision
from provision.certs import create_ca
from provision.kit import Kit, KitFile
from provision.render import KitRenderer, read_runtime_package
from provision.signing import sign_kit
from runtime import kit_config, kitsig
from runtime.errors import ConfigError, KitTamperedError
from runtime.kitsig import FileStatus, is_covered, manifest_of_dir, signature_document, signed_payload, verify_kit

from .conftest import NOW, REPO


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def link_a_folder(kit: Path, rel: str) -> None:
    """`rel` in the kit becomes a symbolic link to a folder outside it, holding a module."""
    target = kit.parent / f"outside-{rel.replace('/', '-')}"
    target.mkdir()
    (target / "__init__.py").write_text("raise SystemExit('code from outside the kit ran')\n")
    (kit / rel).symlink_to(target, target_is_directory=True)


LINK_TEXT = "a symbolic link to a folder (a kit holds none; the files behind it are not checked)"
# (case id, how to tamper with a kit, the problem lines kitsig must report, kit-relative)
Tamper = Callable[[Path], None]
TAMPER_CASES: list[tuple[str, Tamper, list[str]]] = [
    (
        "one-byte-edit-config",
        lambda kit: flip_one_byte(kit / "startup" / "fed_client.json"),
        ["startup/fed_client.json: changed since the kit was signed"],
    ),
    (
        "one-byte-edit-runtime",
        lambda kit: flip_one_byte(kit / "runtime" / "kitsig.py"),
        ["runtime/kitsig.py: changed since the kit was signed"],
    ),
    (
        "one-byte-edit-example",
        lambda kit: flip_one_byte(kit / "local" / "site.yml.example"),
        ["local/site.yml.example: changed since the kit was signed"],
    ),
    (
        "added-file",
        lambda kit: (kit / "startup" / "extra.sh").write_text("echo hi\n"),
        ["startup/extra.sh: extra (not listed in signature.json)"],
    ),
    (
        "added-top-level-bytecode",
        lambda kit: (kit / "json.pyc").write_bytes(b"\0"),
        ["json.pyc: extra (not listed in signature.json)"],
    ),
    (  # it would shadow the library module: the kit goes first on sys.path once checked
        "linked-module-folder",
        lambda kit: link_a_folder(kit, "yaml"),
        [f"yaml: {LINK_TEXT}"],
    ),
    (  # bytecode the scripts' __pycache__ clean-up (find -type d) does not remove
        "linked-bytecode-folder",
        lambda kit: link_a_folder(kit, "startup/__pycache__"),
        [f"startup/__pycache__: {LINK_TEXT}"],
    ),
    (
        "removed-file",
        lambda kit: (kit / "readme.txt").unlink(),
        ["readme.txt: missing (listed in signature.json)"],
    ),
    (
        "removed-key",
        lambda kit: (kit / "startup" / "client.key").unlink(),
        ["startup/client.key: missing (listed in signature.json)"],
    ),
]
IDS = [c[0] for c in TAMPER_CASES]


def test_a_fresh_kit_verifies(provisioned) -> None:
    for kit in provisioned.result.kits:
        report = verify_kit(kit.kit_dir)
        assert report.is_intact, report.problems()
        assert report.problems() == []
        assert len(report.files) == len(manifest_of_dir(kit.kit_dir))
        ca_pem = (provisioned.study_dir / "state" / "rootCA.pem").read_bytes()
        assert verify_kit(kit.kit_dir, ca_pem).is_intact


@pytest.mark.parametrize(("tamper", "expected"), [c[1:] for c in TAMPER_CASES], ids=IDS)
def test_verify_kit_names_each_problem(kit_copy, tamper: Tamper, expected: list[str]) -> None:
    kit = kit_copy("site-1")
    tamper(kit)
    report = verify_kit(kit)
    assert not report.is_intact
    assert report.problems() == expected
    assert report.signature_problem is None  # the manifest itself is genuine; the files are not
    with pytest.raises(KitTamperedError, match="re-unzip the kit you were sent") as err:
        report.raise_if_tampered()
    assert all(problem in str(err.value) for problem in expected) and "\n" not in str(err.value)


@pytest.mark.parametrize(("tamper", "expected"), [c[1:] for c in TAMPER_CASES], ids=IDS)
def test_kitsig_module_prints_one_line_per_problem(kit_copy, tamper: Tamper, expected: list[str]) -> None:
    kit = kit_copy("site-1")
    tamper(kit)
    done = subprocess.run(
        [sys.executable, "-m", "runtime.kitsig", str(kit)], capture_output=True, text=True, check=False, cwd=REPO
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"{kit}/{line}" for line in expected]


def test_several_problems_are_all_listed(kit_copy) -> None:
    kit = kit_copy("localhost")
    flip_one_byte(kit / "startup" / "fed_server.json")
    (kit / "local" / "authorization.yml.example").unlink()
    (kit / "runtime" / "backdoor.py").write_text("")
    assert verify_kit(kit).problems() == [
        "local/authorization.yml.example: missing (listed in signature.json)",
        "runtime/backdoor.py: extra (not listed in signature.json)",
        "startup/fed_server.json: changed since the kit was signed",
    ]


def test_site_owned_and_runtime_written_files_are_not_covered(kit_copy) -> None:
    kit = kit_copy("site-1")
    (kit / "local" / "site.yml").write_text("data_root: /data\n")
    (kit / "local" / "crl.pem").write_text("crl\n")
    (kit / "workspace" / "jobs").mkdir(parents=True)
    (kit / "workspace" / "daemon.pid").write_text("1\n")
    (kit / "workspace" / "jobs" / "x.py").write_text("")
    (kit / "runtime" / "__pycache__").mkdir()
    (kit / "runtime" / "__pycache__" / "kitsig.cpython-311.pyc").write_bytes(b"\0")
    assert verify_kit(kit).is_intact


@pytest.mark.parametrize(
    ("path", "covered"),
    [
        ("startup/start.sh", True),
        ("runtime/server/app.py", True),
        ("local/site.yml.example", True),
        ("readme.txt", True),
        ("startup/signature.json", False),
        ("local/site.yml", False),
        ("local/crl.pem", False),
        ("workspace/daemon.pid", False),
        ("runtime/__pycache__/x.cpython-311.pyc", False),
        ("runtime/__pycache__/notes.txt", True),
        ("runtime/stale.pyc", True),
        ("json.pyc", True),
    ],
)
def test_coverage_rules(path: str, covered: bool) -> None:
    assert is_covered(path) is covered


def test_a_rewritten_manifest_fails_the_signature(kit_copy) -> None:
    """An attacker who edits a file and updates its hash in signature.json still cannot re-sign it."""
    kit = kit_copy("site-1")
    flip_one_byte(kit / "startup" / "fed_client.json")
    sig_path = kit / "startup" / "signature.json"
    doc = json.loads(sig_path.read_text())
    doc["files"]["startup/fed_client.json"] = kitsig.hash_file(kit / "startup" / "fed_client.json")
    sig_path.write_text(json.dumps(doc))
    report = verify_kit(kit)
    assert report.files and all(f.status is FileStatus.OK for f in report.files)
    assert report.problems() == ["startup/signature.json: signature does not verify against startup/rootCA.pem"]


def test_a_kit_re_signed_by_another_ca_fails_against_the_study_ca(kit_copy, provisioned) -> None:
    kit = kit_copy("site-1")
    foreign = create_ca("attacker", NOW, 30)
    (kit / "startup" / "rootCA.pem").write_bytes(foreign.cert_pem)
    (kit / "startup" / "signature.json").unlink()
    files = manifest_of_dir(kit)
    signed_by = foreign.cert.subject.rfc4514_string()
    signature = foreign.key.sign(signed_payload(files, signed_by), ec.ECDSA(hashes.SHA256()))
    (kit / "startup" / "signature.json").write_bytes(signature_document(files, signed_by, signature))
    assert verify_kit(kit).is_intact  # self-consistent: why site IT should pass --ca for a real check
    study_ca = (provisioned.study_dir / "state" / "rootCA.pem").read_bytes()
    report = verify_kit(kit, study_ca)
    assert (
        report.problems()
        == [
            "startup/rootCA.pem: changed since the kit was signed",
        ]
        or report.signature_problem == "signature does not verify against the given root CA"
    )
    assert report.signature_problem == "signature does not verify against the given root CA"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "missing; this folder is not a signed fedkit kit"),
        (b"{not json", "unreadable"),
        (b'{"format": 9}', "unsupported format (expected format 1)"),
        (b'{"format": 1, "algorithm": "md5"}', "unsupported algorithm 'md5' (expected ecdsa-p256-sha256)"),
    ],
)
def test_a_bad_signature_file_is_one_problem(kit_copy, content: bytes | None, problem: str) -> None:
    kit = kit_copy("site-2")
    sig_path = kit / "startup" / "signature.json"
    sig_path.unlink()
    if content is not None:
        sig_path.write_bytes(content)
    report = verify_kit(kit)
    assert not report.is_intact and report.files == ()
    assert report.signature_problem is not None and report.signature_problem.startswith(problem)


def test_verify_kit_refuses_a_non_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a folder"):
        verify_kit(tmp_path / "nope")


def test_signature_paths_match_kit_config() -> None:
    assert kitsig.SIGNATURE_PATH == f"{kit_config.STARTUP}/{kit_config.SIGNATURE}"
    assert kitsig.ROOT_CA_PATH == f"{kit_config.STARTUP}/{kit_config.ROOT_CA}"


def test_signing_covers_exactly_the_covered_files(example_project) -> None:
    ca = create_ca("s", NOW, 30)
    kit = Kit(participant=example_project.clients[0])
    kit.add("readme.txt", KitFile.of(b"hi\n"))
    kit.add("local/site.yml.example", KitFile.of(b"a: 1\n"))
    kit.add("local/site.yml", KitFile.of(b"a: 2\n"))
    sign_kit(kit, ca)
    doc = json.loads(kit.files["startup/signature.json"].data)
    assert sorted(doc["files"]) == ["local/site.yml.example", "readme.txt"]
    with pytest.raises(ValueError, match="two files"):
        sign_kit(kit, ca)


def test_kitsig_imports_nothing_from_provision_or_heavy_runtime_deps() -> None:
    code = (
        "import sys, runtime.kitsig; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'provision', 'grpc', 'torch', 'jinja2', 'typer'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# --- start.sh over a kit whose runtime is a stub, so an intact kit's start is observable ----------------

STUB_CLIENT = b'import sys\nprint("stub client started", *sys.argv[1:])\n'


@pytest.fixture
def stub_kit(tmp_path: Path, example_project) -> Path:
    """A real, signed client kit whose runtime holds only kitsig's modules and a stub `runtime.client`."""
    real = read_runtime_package()
    keep = {"runtime/__init__.py", "runtime/errors.py", "runtime/kitsig.py"}
    runtime_files = {rel: f for rel, f in real.items() if rel in keep}
    runtime_files["runtime/client.py"] = KitFile.of(STUB_CLIENT)
    result = provision(example_project, tmp_path / "ws", NOW, KitRenderer(runtime_files=runtime_files))
    return next(k.kit_dir for k in result.kits if k.name == "site-1")


def run_start(kit: Path, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONSAFEPATH"}}
    env["FEDKIT_PYTHON"] = sys.executable
    return subprocess.run(
        ["bash", str(kit / "startup" / "start.sh"), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        env=env,
        timeout=60,
    )


def test_start_sh_runs_the_kits_own_runtime_when_intact(stub_kit: Path) -> None:
    # cwd is the repository, which has its own runtime/client: the kit's stub must still be the one run.
    done = run_start(stub_kit, "--extra")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"stub client started --kit {stub_kit.resolve()} --extra"
    assert not list(stub_kit.rglob("__pycache__"))  # neither the check nor the runtime writes bytecode there


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [c[1:] for c in TAMPER_CASES if "runtime" not in c[0]],
    ids=[i for i in IDS if "runtime" not in i],
)
def test_start_sh_refuses_a_tampered_kit(stub_kit: Path, tamper: Tamper, expected: list[str]) -> None:
    tamper(stub_kit)
    done = run_start(stub_kit)
    assert done.returncode == 1
    assert "stub client started" not in done.stdout
    lines = done.stderr.splitlines()
    assert lines[:-1] == [f"{stub_kit.resolve()}/{line}" for line in expected]
    assert lines[-1] == (
        "start.sh: refusing to start: this kit differs from its signed manifest (lines above); "
        "unzip the kit you were sent again"
    )


def test_start_sh_refuses_a_tampered_runtime_module(stub_kit: Path) -> None:
    (stub_kit / "runtime" / "client.py").write_bytes(STUB_CLIENT.replace(b"started", b"HACKED"))
    done = run_start(stub_kit)
    assert done.returncode == 1 and "HACKED" not in done.stdout
    assert f"{stub_kit.resolve()}/runtime/client.py: changed since the kit was signed" in done.stderr


def test_start_sh_drops_bytecode_that_came_with_the_kit(stub_kit: Path) -> None:
    cache = stub_kit / "runtime" / "__pycache__"
    cache.mkdir()
    (cache / "client.cpython-311.pyc").write_bytes(b"not bytecode")
    done = run_start(stub_kit)
    assert done.returncode == 0, done.stderr
    assert not (cache / "client.cpython-311.pyc").exists()


def test_start_sh_explains_a_missing_python(stub_kit: Path) -> None:
    env = {**os.environ, "FEDKIT_PYTHON": "/nonexistent/python3"}
    done = subprocess.run(
        ["bash", str(stub_kit / "startup" / "start.sh")], capture_output=True, text=True, check=False, env=env
    )
    assert done.returncode == 1
    assert "is missing or older than Python 3.11" in done.stderr


def test_start_sh_names_the_packages_its_python_lacks(stub_kit: Path, tmp_path: Path) -> None:
    # the runtime would otherwise die at its first import with a traceback (No module named 'grpc')
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    env = {**os.environ, "FEDKIT_PYTHON": str(bare / "bin" / "python")}
    done = subprocess.run(
        ["bash", str(stub_kit / "startup" / "start.sh")], capture_output=True, text=True, check=False, env=env
    )
    assert done.returncode == 1 and "stub client started" not in done.stdout
    [line] = done.stderr.splitlines()
    assert line.startswith(f"start.sh: '{bare}/bin/python' lacks cryptography, pyyaml, grpcio")
    assert line.endswith(f"of requirements.txt; install them: {bare}/bin/python -m pip install -r "
                         f"{stub_kit.resolve()}/requirements.txt (or set FEDKIT_PYTHON to a Python that has them)")


def test_fl_admin_json_answers_a_refused_kit_with_one_json_object(tmp_path: Path, example_project) -> None:
    # --json: every outcome is one JSON object on stdout, the script's own refusals too
    result = provision(example_project, tmp_path / "ws", NOW, KitRenderer())
    kit = next(k.kit_dir for k in result.kits if k.name == "lead@study.org")
    flip_one_byte(kit / "readme.txt")
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONSAFEPATH"}}
    env["FEDKIT_PYTHON"] = sys.executable
    done = subprocess.run(["bash", str(kit / "startup" / "fl_admin.sh"), "-c", "list_jobs", "--json"],
                          capture_output=True, text=True, check=False, env=env, timeout=60)
    assert done.returncode == 1
    refusal = ("refusing to start: this kit differs from its signed manifest (lines above); unzip the kit you "
               "were sent again")
    assert json.loads(done.stdout) == {"error": refusal, "exit_code": 1}
    assert done.stderr.splitlines()[-1] == f"fl_admin.sh: {refusal}"
