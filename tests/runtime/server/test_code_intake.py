"""At submit the server records the code hash, and refuses a signature that does not sign this archive."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from provision.certs import create_ca, issue_credential
from provision.project import AdminSpec
from runtime.errors import JobRejected
from runtime.job_code import code_hash_of_zip, sign_code
from runtime.job_spec import zip_folder
from runtime.server.code_intake import signed_code

JOB = Path(__file__).resolve().parents[3] / "templates" / "jobs" / "tabular_classifier"
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def lead():
    return issue_credential(create_ca("s", NOW, 30), AdminSpec(type="admin", name="lead@x.org", org="x", role="lead"),
                            NOW, 30, "s")


def test_unsigned_job_gets_its_code_hash() -> None:
    archive = zip_folder(JOB)
    assert signed_code(archive, None).code_sha256 == code_hash_of_zip(archive)
    assert signed_code(archive, None).signed_by == ""


def test_signature_over_this_archive_is_kept(lead) -> None:
    archive = zip_folder(JOB)
    signature = sign_code(code_hash_of_zip(archive), lead.key_pem, lead.cert_pem).model_dump(mode="json")
    code = signed_code(archive, signature)
    assert code.signed_by == "lead@x.org" and code.signature == signature


def test_signature_over_other_code_is_refused(lead, tmp_path: Path) -> None:
    signature = sign_code("0" * 64, lead.key_pem, lead.cert_pem).model_dump(mode="json")
    with pytest.raises(JobRejected, match="changed after signing"):
        signed_code(zip_folder(JOB), signature)


@pytest.mark.parametrize("bad", [{"code_sha256": "0" * 64}, "text", {"code_sha256": "x", "signature": "s",
                                                                     "certificate": "c", "more": 1}])
def test_malformed_signature_is_one_line(bad) -> None:
    with pytest.raises(JobRejected, match="^code signature: field '"):
        signed_code(zip_folder(JOB), bad)
