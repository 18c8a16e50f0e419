"""The study CA is pinned: provisioning prints its SHA-256 fingerprint and every readme states it; the
first start of a kit writes the kit's CA fingerprint to local/ca.sha256 (or finds the one site IT wrote
there), and every later check refuses a kit whose rootCA.pem differs, even one that a foreign CA re-signed
consistently. `fedkit verify-kit --ca-fingerprint` checks the same offline."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from provision.certs import create_ca
from provision.cli import app
from runtime.kitsig import ca_fingerprint, manifest_of_dir, signature_document, signed_payload

from .conftest import EXAMPLE, NOW, REPO
from .test_signing import run_start, stub_kit  # noqa: F401  (stub_kit is a fixture)

PIN = Path("local") / "ca.sha256"


def openssl_fingerprint(pem: Path) -> str:
    done = subprocess.run(["openssl", "x509", "-in", str(pem), "-noout", "-fingerprint", "-sha256"],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip().split("=", 1)[1]


def re_sign_with_foreign_ca(kit: Path) -> str:
    """Replace the kit's CA and re-sign every file with it, as someone holding another CA could; returns
    the foreign CA's fingerprint."""
    foreign = create_ca("attacker", NOW, 30)
    (kit / "startup" / "rootCA.pem").write_bytes(foreign.cert_pem)
    (kit / "startup" / "signature.json").unlink()
    files = manifest_of_dir(kit)
    signed_by = foreign.cert.subject.rfc4514_string()
    signature = foreign.key.sign(signed_payload(files, signed_by), ec.ECDSA(hashes.SHA256()))
    (kit / "startup" / "signature.json").write_bytes(signature_document(files, signed_by, signature))
    return ca_fingerprint(foreign.cert_pem)


def kitsig(kit: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.kitsig", str(kit), *args], capture_output=True,
                          text=True, check=False, cwd=REPO, timeout=60)


def test_fingerprint_is_what_openssl_prints(provisioned) -> None:
    ca = provisioned.study_dir / "state" / "rootCA.pem"
    assert ca_fingerprint(ca.read_bytes()) == openssl_fingerprint(ca)


def test_first_check_pins_the_kits_ca_and_says_to_compare_it(kit_copy, provisioned) -> None:
    kit = kit_copy("site-1")
    done = kitsig(kit)
    assert done.returncode == 0, done.stderr
    expected = openssl_fingerprint(provisioned.study_dir / "state" / "rootCA.pem")
    assert (kit / PIN).read_text() == expected + "\n"
    assert stat.S_IMODE((kit / PIN).stat().st_mode) == 0o644
    [line] = done.stderr.splitlines()
    assert str(kit / PIN) in line and expected in line and "compare" in line and "lead IT" in line

    again = kitsig(kit)
    assert again.returncode == 0 and again.stderr == ""  # quiet once pinned


def test_a_kit_re_signed_by_a_foreign_ca_is_refused_after_the_first_check(kit_copy, provisioned) -> None:
    kit = kit_copy("site-1")
    assert kitsig(kit).returncode == 0
    foreign_fp = re_sign_with_foreign_ca(kit)

    done = kitsig(kit)
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    study_fp = ca_fingerprint((provisioned.study_dir / "state" / "rootCA.pem").read_bytes())
    assert str(kit / PIN) in line and foreign_fp in line and study_fp in line
    assert (kit / PIN).read_text() == study_fp + "\n"  # the pin is never overwritten
    assert kitsig(kit, "--no-pin").returncode == 0  # self-consistent: only the pin catches it


@pytest.mark.parametrize("seeded", ["AB:CD", "not hex at all", ""])
def test_a_malformed_pin_is_refused_in_one_line(kit_copy, seeded: str) -> None:
    kit = kit_copy("site-1")
    (kit / PIN).write_text(seeded + "\n")
    done = kitsig(kit)
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert str(kit / PIN) in line and "SHA-256" in line


def test_site_it_may_pre_seed_the_pin_in_any_spelling(kit_copy, provisioned) -> None:
    fp = ca_fingerprint((provisioned.study_dir / "state" / "rootCA.pem").read_bytes())
    kit = kit_copy("site-1")
    (kit / PIN).write_text(fp.replace(":", "").lower() + "\n")
    done = kitsig(kit)
    assert done.returncode == 0 and done.stderr == ""

    other = kit_copy("site-2")
    (other / PIN).write_text(ca_fingerprint(create_ca("x", NOW, 30).cert_pem) + "\n")
    assert kitsig(other).returncode == 1  # a seeded pin that differs refuses even the first start


def test_no_pin_neither_reads_nor_writes(kit_copy) -> None:
    kit = kit_copy("site-1")
    assert kitsig(kit, "--no-pin").returncode == 0
    assert not (kit / PIN).exists()


def test_ca_fingerprint_option(kit_copy, provisioned) -> None:
    kit = kit_copy("site-1")
    fp = ca_fingerprint((provisioned.study_dir / "state" / "rootCA.pem").read_bytes())
    assert kitsig(kit, "--no-pin", "--ca-fingerprint", fp.lower()).returncode == 0
    wrong = kitsig(kit, "--no-pin", "--ca-fingerprint", "00" * 32)
    assert wrong.returncode == 1 and len(wrong.stderr.splitlines()) == 1 and fp in wrong.stderr


def test_start_sh_refuses_a_re_signed_kit_once_the_real_ca_is_pinned(stub_kit: Path) -> None:  # noqa: F811
    assert run_start(stub_kit).returncode == 0
    re_sign_with_foreign_ca(stub_kit)
    done = run_start(stub_kit)
    assert done.returncode == 1
    assert "stub client started" not in done.stdout
    assert "local/ca.sha256" in done.stderr.splitlines()[0]


@pytest.mark.parametrize("script", ["start.sh", "docker.sh"])
def test_a_malformed_pin_gets_advice_on_that_file_not_to_unzip_again(stub_kit: Path, script: str) -> None:  # noqa: F811
    # Unzipping again never touches local/ca.sha256 (site IT wrote it): the advice must be to fix that file.
    (stub_kit / PIN).write_text("AB:CD\n")
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONSAFEPATH"}}
    env["FEDKIT_PYTHON"] = sys.executable  # docker.sh then checks with this Python, before it needs Docker
    done = subprocess.run(["bash", str(stub_kit / "startup" / script)], capture_output=True, text=True,
                          check=False, env=env, cwd=REPO, timeout=60)
    assert done.returncode == 1
    assert "stub client started" not in done.stdout
    first, last = done.stderr.splitlines()
    assert first.startswith(f"{stub_kit.resolve() / PIN}: not a SHA-256 fingerprint; write the study CA's "
                            "fingerprint from lead IT there (64 hex digits")
    assert last.startswith(f"{script}: refusing to start: the study CA check against local/ca.sha256 failed ")
    assert "unzipping the kit again leaves that file as it is" in last
    assert "unzip the kit you were sent" not in done.stderr and "signed manifest" not in done.stderr
    assert (stub_kit / PIN).read_text() == "AB:CD\n"  # left for site IT to fix, never overwritten


def test_admin_kit_is_pinned_too(kit_copy) -> None:
    kit = kit_copy("admin@study.org")
    assert kitsig(kit).returncode == 0
    assert (kit / PIN).exists()


# --- provisioning states the fingerprint ----------------------------------------------------------------

def test_provision_prints_the_fingerprint_and_every_readme_states_it(tmp_path: Path) -> None:
    done = CliRunner().invoke(app, ["provision", "-p", str(EXAMPLE), "-w", str(tmp_path)])
    assert done.exit_code == 0, done.output
    fp = openssl_fingerprint(tmp_path / "example-study" / "state" / "rootCA.pem")
    assert f"Study CA fingerprint (SHA-256): {fp}" in done.stdout
    readmes = list((tmp_path / "example-study").glob("prod_*/*/readme.txt"))
    assert len(readmes) == 6
    for readme in readmes:
        text = readme.read_text()
        assert f"Study CA fingerprint (SHA-256): {fp}" in text and "local/ca.sha256" in text


def test_verify_kit_cli_checks_the_fingerprint(provisioned) -> None:
    fp = ca_fingerprint((provisioned.study_dir / "state" / "rootCA.pem").read_bytes())
    kit = str(provisioned.kit("site-1"))
    ok = CliRunner().invoke(app, ["verify-kit", kit, "--ca-fingerprint", fp])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(app, ["verify-kit", kit, "--ca-fingerprint", "AB" * 32])
    assert bad.exit_code == 1 and fp in bad.stdout
    assert not (provisioned.kit("site-1") / PIN).exists()  # offline checks never pin


def test_a_malformed_fingerprint_argument_is_bad_input(provisioned) -> None:
    done = CliRunner().invoke(app, ["verify-kit", str(provisioned.kit("site-1")), "--ca-fingerprint", "xyz"])
    assert done.exit_code == 2
    assert done.stderr == "'xyz' is not a SHA-256 fingerprint (64 hex digits, ':' optional)\n"
