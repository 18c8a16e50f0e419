"""The job code hash: stable across zip metadata (timestamps, compression, order), changed by any code or
config byte or path; and the admin signature over it."""

from __future__ import annotations

import datetime as dt
import io
import shutil
import zipfile
from pathlib import Path

import pytest

from provision.certs import create_ca, issue_credential
from provision.project import AdminSpec
from runtime.errors import JobRejected
from runtime.job_code import code_hash_of_zip, sign_code, verify_signature, verify_signer_chain
from runtime.job_spec import zip_folder

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "templates" / "jobs" / "tabular_classifier"
NOW = dt.datetime.now(dt.UTC)


def rezip(folder: Path, *, reverse: bool, compression: int, when: tuple) -> bytes:
    buf = io.BytesIO()
    paths = sorted((p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts), reverse=reverse)
    with zipfile.ZipFile(buf, "w") as zf:
        for path in paths:
            info = zipfile.ZipInfo(path.relative_to(folder).as_posix(), date_time=when)
            info.compress_type = compression
            info.external_attr = 0o100755 << 16
            zf.writestr(info, path.read_bytes())
        zf.writestr(zipfile.ZipInfo("custom/", date_time=when), b"")  # a directory entry: not hashed
    return buf.getvalue()


def test_hash_ignores_zip_metadata(tmp_path: Path) -> None:
    job = shutil.copytree(JOB, tmp_path / "job")
    reference = code_hash_of_zip(zip_folder(job))
    other = rezip(job, reverse=True, compression=zipfile.ZIP_STORED, when=(2024, 5, 6, 7, 8, 10))
    assert code_hash_of_zip(other) == reference
    (job / "custom" / "__pycache__").mkdir()
    (job / "custom" / "__pycache__" / "learner.cpython-311.pyc").write_bytes(b"junk")
    assert code_hash_of_zip(zip_folder(job)) == reference  # bytecode caches are not uploaded


@pytest.mark.parametrize("change", ["code", "config", "rename", "new_file"])
def test_hash_changes_with_code_and_configs(tmp_path: Path, change: str) -> None:
    job = shutil.copytree(JOB, tmp_path / "job")
    before = code_hash_of_zip(zip_folder(job))
    learner = job / "custom" / "learner.py"
    if change == "code":
        learner.write_text(learner.read_text() + "\n# one more line\n")
    elif change == "config":
        cfg = job / "config_fed_client.yml"
        cfg.write_text(cfg.read_text().replace("lr: 0.05", "lr: 0.5"))
    elif change == "rename":
        learner.rename(job / "custom" / "learner2.py")
    else:
        (job / "custom" / "helper.py").write_text("X = 1\n")
    assert code_hash_of_zip(zip_folder(job)) != before


def test_duplicate_member_is_refused() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("custom/a.py", b"1")
        with pytest.warns(UserWarning):
            zf.writestr("custom/a.py", b"2")
    with pytest.raises(JobRejected, match="more than once"):
        code_hash_of_zip(buf.getvalue())


def test_not_a_zip_is_one_line() -> None:
    with pytest.raises(JobRejected, match="not a valid zip"):
        code_hash_of_zip(b"PK\x03\x04 nonsense")


@pytest.fixture(scope="module")
def study():
    ca = create_ca("s", NOW, 30)
    alice = issue_credential(ca, AdminSpec(type="admin", name="alice@a.org", org="a", role="lead"), NOW, 30, "s")
    return ca, alice


def test_signature_verifies_over_the_same_hash_only(study) -> None:
    ca, alice = study
    code = "ab" * 32
    sig = sign_code(code, alice.key_pem, alice.cert_pem)
    assert verify_signature(sig, code).identity.name == "alice@a.org"
    verify_signer_chain(sig, ca.cert_pem)
    with pytest.raises(JobRejected, match="changed after signing"):
        verify_signature(sig, "cd" * 32)
    forged = sig.model_copy(update={"code_sha256": "cd" * 32})  # claims another hash, same signature
    with pytest.raises(JobRejected, match="does not verify"):
        verify_signature(forged, "cd" * 32)


def test_foreign_ca_and_wrong_key_are_refused(study) -> None:
    ca, alice = study
    other_ca = create_ca("other", NOW, 30)
    mallory = issue_credential(other_ca, AdminSpec(type="admin", name="alice@a.org", org="a", role="lead"), NOW, 30,
                               "other")
    code = "ef" * 32
    sig = sign_code(code, mallory.key_pem, mallory.cert_pem)
    verify_signature(sig, code)  # self-consistent ...
    with pytest.raises(JobRejected, match="not issued by this study's CA"):
        verify_signer_chain(sig, ca.cert_pem)  # ... but not from this study
    stolen_cert = sign_code(code, mallory.key_pem, alice.cert_pem)  # alice's cert, someone else's key
    with pytest.raises(JobRejected, match="does not verify"):
        verify_signature(stolen_cert, code)
