"""A site's own say over its data: which organisations and roles may run jobs here, and which code, from
the site kit's `local/job_policy.yml` (everything from a project_admin, org_admin or lead of any org, any
code, when absent). The code rule is in code_approval.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import JobRejected
from ..identity import Role
from ..kit_config import load_optional, plain_message
from .code_approval import CodeRule, ReceivedCode, check_code


class JobPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed_orgs: list[str] = Field(default_factory=lambda: ["*"])
    allowed_roles: list[Role] = Field(default_factory=lambda: [Role.PROJECT_ADMIN, Role.ORG_ADMIN, Role.LEAD])
    code: Literal["any"] | CodeRule = "any"

    @field_validator("allowed_orgs", mode="before")
    @classmethod
    def _one_org(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # `allowed_orgs: "*"` reads as the list it means

    @field_validator("code", mode="before")
    @classmethod
    def _code_rule(cls, value: Any) -> Any:
        """One clear message for a wrong `code:` (a plain union would only say "Input should be 'any'")."""
        if value == "any" or isinstance(value, CodeRule):
            return value
        if not isinstance(value, dict):
            raise ValueError("must be `any`, {approved_hashes: [...]} or {signed_by: [...]}")
        try:
            return CodeRule.model_validate(value)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"{where + ': ' if where else ''}{plain_message(first).removeprefix('Value error, ')}") \
                from None

    @classmethod
    def load(cls, path: Path) -> JobPolicy:
        return load_optional(path, cls)

    def check(self, job_id: str, submitter: dict[str, Any]) -> None:
        """Raise JobRejected, with the reason the submitter will read, if this site refuses the job."""
        org, role, name = submitter.get("org", ""), submitter.get("role", ""), submitter.get("name", "?")
        if "*" not in self.allowed_orgs and org not in self.allowed_orgs:
            raise JobRejected(f"site policy refuses job {job_id}: org '{org}' of {name} is not allowed here "
                              f"(allowed orgs: {', '.join(self.allowed_orgs) or 'none'})")
        if role not in {r.value for r in self.allowed_roles}:
            raise JobRejected(f"site policy refuses job {job_id}: role '{role}' of {name} may not run jobs here "
                              f"(allowed roles: {', '.join(r.value for r in self.allowed_roles) or 'none'})")

    @property
    def requires_code_check(self) -> bool:
        return isinstance(self.code, CodeRule)

    def check_code(self, code: ReceivedCode, root_ca_pem: bytes, revoked: frozenset[int] = frozenset()) -> str:
        """Raise JobRejected if this site refuses the job's code; else say how it was approved."""
        return check_code(self.code, code, root_ca_pem, revoked)
