"""Which job code a site lets run: `code:` in local/job_policy.yml.

    code: any                                   every job (the default; org and role rules still apply)
    code: {approved_hashes: [<sha256>, ...]}    only code whose hash site IT approved (`fedkit job hash`)
    code: {signed_by: [admin@org, ...]}         only code signed by one of these admins (study CA certs)

The hash is computed here over the archive this site received (runtime.job_code), never taken from the
server. Under either strict rule the learner runs as submitted: an override of `client.learner` (its
class or its arguments) is refused, since it changes what runs without changing the hash.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .. import strict_yaml
from ..errors import JobRejected
from ..job_code import CodeSignature, code_hash_of_zip, verify_signature, verify_signer_chain
from ..job_spec import CLIENT_CONFIG, ClientJobConfig, read_zip_configs

SHA256_PATTERN = r"^[0-9a-f]{64}$"


class CodeRule(BaseModel):
    """A strict code rule: exactly one of approved_hashes or signed_by."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    approved_hashes: list[str] | None = Field(None, description="code hashes (sha256 hex) this site approved")
    signed_by: list[str] | None = Field(None, description="admin names whose signature this site accepts")

    @model_validator(mode="after")
    def _exactly_one(self) -> CodeRule:
        if (self.approved_hashes is None) == (self.signed_by is None):
            raise ValueError("give exactly one of approved_hashes or signed_by (or write `code: any`)")
        for h in self.approved_hashes or []:
            if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                raise ValueError(f"'{h[:70]}' is not a code hash (64 lowercase hex digits from `fedkit job hash`)")
        return self


@dataclass(frozen=True)
class ReceivedCode:
    """A job's code as this site received it: the hash it computed, the signature the server passed on,
    and the learner as submitted (from the archive) and as it would run (after overrides)."""

    job_id: str
    code_sha256: str
    signature: Any  # the task config's `code_signature` value: untrusted JSON, parsed here
    learner_submitted: dict[str, Any] | None
    learner_to_run: dict[str, Any]


def received_code(job_id: str, archive: bytes, task_config: dict[str, Any], client_cfg: ClientJobConfig
                  ) -> ReceivedCode:
    """What this site knows of a job's code, from the archive it received (hashed here) and the task config
    (the signature the server passed on, the learner after overrides). Raises JobRejected."""
    return ReceivedCode(job_id=job_id, code_sha256=code_hash_of_zip(archive),
                        signature=task_config.get("code_signature"),
                        learner_submitted=_learner_as_submitted(archive),
                        learner_to_run=client_cfg.learner.model_dump(mode="json"))


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON text, types included: Python's == takes 1, 1.0 and True for one value, so an override of
    an approved `mode: 1` by `true` passed as unchanged and woke a branch the review never saw run."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _learner_as_submitted(archive: bytes) -> dict[str, Any] | None:
    """The learner section of the archive's own config_fed_client.yml; None when it does not stand alone
    (e.g. the learner comes only from an override), which a strict code rule then refuses."""
    try:
        data = strict_yaml.load(read_zip_configs(archive).get(CLIENT_CONFIG, ""), aliases=False)
        return ClientJobConfig.model_validate(data).learner.model_dump(mode="json")
    except (yaml.YAMLError, ValidationError, UnicodeDecodeError, zipfile.BadZipFile):
        return None


def check_code(rule: CodeRule | str, code: ReceivedCode, root_ca_pem: bytes,
               revoked: frozenset[int] = frozenset()) -> str:
    """Raise JobRejected with the reason a person reads, or return how the code was approved."""
    if not isinstance(rule, CodeRule):
        return "any code allowed"
    short = code.code_sha256[:16]
    prefix = f"site policy refuses job {code.job_id}"
    if not _same_json(code.learner_submitted, code.learner_to_run):
        raise JobRejected(f"{prefix}: overrides change client.learner; this site runs approved code only as "
                          "submitted (edit config_fed_client.yml and have the new code hash approved)")
    if rule.approved_hashes is not None:
        if code.code_sha256 not in rule.approved_hashes:
            raise JobRejected(f"{prefix}: its code hash {code.code_sha256} is not in approved_hashes of "
                              "local/job_policy.yml")
        return f"code hash {short} approved"
    allowed = rule.signed_by or []
    if not code.signature:
        raise JobRejected(f"{prefix}: its code ({short}...) is not signed; signed_by requires one of: "
                          f"{', '.join(allowed) or 'none'}")
    try:
        signature = CodeSignature.model_validate(code.signature)
    except ValidationError:
        raise JobRejected(f"{prefix}: its code signature is malformed") from None
    try:
        signer = verify_signature(signature, code.code_sha256)
        verify_signer_chain(signature, root_ca_pem, revoked)
    except JobRejected as e:
        raise JobRejected(f"{prefix}: {e}") from None
    if signer.identity.name not in allowed:
        raise JobRejected(f"{prefix}: its code is signed by '{signer.identity.name}', who is not in signed_by "
                          f"({', '.join(allowed) or 'none'})")
    return f"code {short} signed by {signer.identity.name}"
