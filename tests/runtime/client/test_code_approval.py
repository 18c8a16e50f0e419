"""local/job_policy.yml `code:`: any, approved_hashes, signed_by; each refusal says why in one line."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from provision.certs import create_ca, issue_credential
from provision.project import AdminSpec, ClientSpec
from runtime.client.code_approval import ReceivedCode
from runtime.client.job_policy import JobPolicy
from runtime.errors import ConfigError, JobRejected
from runtime.job_code import sign_code

NOW = dt.datetime.now(dt.UTC)
CODE = "12" * 32
LEARNER = {"path": "learner:TabularLearner", "args": {"lr": 0.05}}


@pytest.fixture(scope="module")
def pki():
    ca = create_ca("s", NOW, 30)
    def admin(name: str, authority=ca):
        return issue_credential(authority, AdminSpec(type="admin", name=name, org="a", role="lead"), NOW, 30, "s")

    return {"ca": ca, "alice": admin("alice@a.org"), "bob": admin("bob@a.org"),
            "site": issue_credential(ca, ClientSpec(type="client", name="site-9", org="a"), NOW, 30, "s"),
            "foreign": admin("alice@a.org", create_ca("x", NOW, 30))}


def received(signature=None, code=CODE, learner_to_run=LEARNER) -> ReceivedCode:
    return ReceivedCode(job_id="job-1", code_sha256=code, signature=signature, learner_submitted=LEARNER,
                        learner_to_run=learner_to_run)


def signed(pki, who: str, code: str = CODE) -> dict:
    cred = pki[who]
    return sign_code(code, cred.key_pem, cred.cert_pem).model_dump(mode="json")


def test_default_allows_any_code(pki) -> None:
    assert JobPolicy().check_code(received(), b"") == "any code allowed"
    assert not JobPolicy().requires_code_check


def test_approved_hashes(pki) -> None:
    policy = JobPolicy.model_validate({"code": {"approved_hashes": [CODE]}})
    assert "approved" in policy.check_code(received(), pki["ca"].cert_pem)
    with pytest.raises(JobRejected, match=f"code hash {'34' * 32} is not in approved_hashes"):
        policy.check_code(received(code="34" * 32), pki["ca"].cert_pem)


def test_learner_override_is_refused_under_a_strict_rule(pki) -> None:
    policy = JobPolicy.model_validate({"code": {"approved_hashes": [CODE]}})
    with pytest.raises(JobRejected, match="overrides change client.learner"):
        policy.check_code(received(learner_to_run={**LEARNER, "args": {"lr": 9}}), pki["ca"].cert_pem)


@pytest.mark.parametrize("value", [True, 1.0, "1", [1]])
def test_an_override_that_changes_only_a_type_is_a_change(pki, value) -> None:
    # Python's == takes 1, 1.0 and True for one value: `mode: 1` approved, `--set ...mode=true` ran
    # `if isinstance(self.mode, bool): leak()`, a branch the review never saw taken
    policy = JobPolicy.model_validate({"code": {"approved_hashes": [CODE]}})
    approved = {**LEARNER, "args": {"mode": 1}}
    as_run = ReceivedCode(job_id="job-1", code_sha256=CODE, signature=None, learner_submitted=approved,
                          learner_to_run={**LEARNER, "args": {"mode": value}})
    with pytest.raises(JobRejected, match="overrides change client.learner"):
        policy.check_code(as_run, pki["ca"].cert_pem)
    unchanged = ReceivedCode(job_id="job-1", code_sha256=CODE, signature=None, learner_submitted=approved,
                             learner_to_run={"args": {"mode": 1}, "path": LEARNER["path"]})  # key order is no change
    assert "approved" in policy.check_code(unchanged, pki["ca"].cert_pem)


@pytest.mark.parametrize(("signer", "code", "fragment"), [
    (None, CODE, "is not signed; signed_by requires one of: alice@a.org"),
    ("bob", CODE, "signed by 'bob@a.org', who is not in signed_by (alice@a.org)"),
    ("foreign", CODE, "not issued by this study's CA"),
    ("site", CODE, "a client, not an admin"),
    ("alice", "56" * 32, "changed after signing"),  # the code the site received is not what alice signed
])
def test_signed_by_refusals(pki, signer, code, fragment) -> None:
    policy = JobPolicy.model_validate({"code": {"signed_by": ["alice@a.org", "site-9"]} if signer == "site"
                                       else {"signed_by": ["alice@a.org"]}})
    signature = signed(pki, signer, code) if signer else None
    with pytest.raises(JobRejected) as err:
        policy.check_code(received(signature), pki["ca"].cert_pem)
    assert fragment in str(err.value) and "site policy refuses job job-1" in str(err.value)


def test_signed_by_accepts_a_listed_admin_and_refuses_revoked(pki) -> None:
    policy = JobPolicy.model_validate({"code": {"signed_by": ["alice@a.org"]}})
    assert policy.check_code(received(signed(pki, "alice")), pki["ca"].cert_pem).endswith("signed by alice@a.org")
    with pytest.raises(JobRejected, match="revoked"):
        policy.check_code(received(signed(pki, "alice")), pki["ca"].cert_pem,
                          frozenset({pki["alice"].cert.serial_number}))
    with pytest.raises(JobRejected, match="signature is malformed"):
        policy.check_code(received({"code_sha256": CODE}), pki["ca"].cert_pem)


@pytest.mark.parametrize(("text", "fragment"), [
    ("code: some\n", "field 'code"),
    ("code: {approved_hashes: [abc]}\n", "not a code hash"),
    ("code: {approved_hashes: [], signed_by: []}\n", "exactly one of approved_hashes or signed_by"),
])
def test_malformed_code_rule_is_one_line(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "job_policy.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        JobPolicy.load(path)
    assert str(err.value).startswith(str(path)) and fragment in str(err.value) and "\n" not in str(err.value)


def test_one_org_may_be_written_without_the_list(tmp_path) -> None:
    # the example said `"*" = any org`: written so, it stopped the site from starting
    assert JobPolicy.model_validate({"allowed_orgs": "*"}).allowed_orgs == ["*"]
    path = tmp_path / "job_policy.yml"
    path.write_text("allowed_orgs: hospital-a\n")
    policy = JobPolicy.load(path)
    assert policy.allowed_orgs == ["hospital-a"]
    with pytest.raises(JobRejected, match="org 'hospital-b' of x@b.org is not allowed here"):
        policy.check("job-1", {"name": "x@b.org", "org": "hospital-b", "role": "lead"})
    policy.check("job-1", {"name": "y@a.org", "org": "hospital-a", "role": "lead"})
