"""Who may run which admin command on what. The role comes from the admin's certificate; the policy
from the server kit's `local/authorization.yml` (the defaults below when absent).

A policy maps role -> command -> scope:
    any       on anything
    own_org   only on sites (or the server) of the admin's own organisation, and jobs its members submitted
    own_jobs  only on jobs the admin submitted
A command missing from a role's map (and no "*" entry) is denied, and so is an own_org / own_jobs
command whose target is unknown. A policy file replaces the rules of the roles it names; roles it
does not name keep their defaults.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import RootModel

from ..errors import ConfigError, PermissionDenied
from ..identity import Identity, Role
from ..kit_config import load_model


class Scope(StrEnum):
    ANY = "any"
    OWN_ORG = "own_org"
    OWN_JOBS = "own_jobs"


READ_ONLY = {"help": Scope.ANY, "check_status": Scope.ANY, "list_jobs": Scope.ANY, "show_job": Scope.ANY}

DEFAULT_POLICY: dict[str, dict[str, Scope]] = {
    Role.PROJECT_ADMIN: {"*": Scope.ANY},
    Role.ORG_ADMIN: {**READ_ONLY, "download_job": Scope.ANY, "sys_info": Scope.OWN_ORG,
                     "tail_log": Scope.OWN_ORG, "shutdown_client": Scope.OWN_ORG,
                     "restart_client": Scope.OWN_ORG},
    Role.LEAD: {**READ_ONLY, "submit_job": Scope.ANY, "abort_job": Scope.OWN_JOBS, "clone_job": Scope.OWN_JOBS,
                "delete_job": Scope.OWN_JOBS, "download_job": Scope.OWN_JOBS},
    Role.MEMBER: dict(READ_ONLY),
}


class _PolicyFile(RootModel[dict[Role, dict[str, Scope]]]):
    pass


class Policy:
    def __init__(self, rules: dict[str, dict[str, Scope]], source: Path | None = None):
        self._rules = rules
        self._source = source

    @classmethod
    def load(cls, path: Path) -> Policy:
        if not path.exists():
            return cls(DEFAULT_POLICY)
        parsed = load_model(path, _PolicyFile).root
        # a file changes the roles it names and leaves the others at their defaults
        return cls({**DEFAULT_POLICY, **{role.value: rules for role, rules in parsed.items()}}, source=path)

    def check_commands(self, known: set[str]) -> None:
        """Raise ConfigError, one line naming the file, for a command the policy names that the server does not
        have: a typo (`show_jobs`) silently took the right away, or granted nothing."""
        unknown = sorted(f"{role}: {name}" for role, rules in self._rules.items() for name in rules
                         if name != "*" and name not in known)
        if unknown:
            raise ConfigError(f"{self._source or 'authorization policy'}: unknown command(s) {'; '.join(unknown)}; "
                              f"the commands are {', '.join(sorted(known))}")

    def scope(self, admin: Identity, command: str) -> Scope:
        """The scope `admin` holds for `command`; raises PermissionDenied when none."""
        role = _role(admin)
        rules = self._rules.get(role, {})
        scope = rules.get(command) or rules.get("*")
        if scope is None:
            raise PermissionDenied(f"denied: role '{role}' may not run '{command}'")
        return scope

    def allows(self, admin: Identity, command: str, target_org: str | None = None,
               job_submitter: str | None = None) -> bool:
        """Whether `check` would pass; for filtering what a listing shows."""
        try:
            self.check(admin, command, target_org, job_submitter)
        except PermissionDenied:
            return False
        return True

    def check(self, admin: Identity, command: str, target_org: str | None = None,
              job_submitter: str | None = None) -> None:
        """Raise PermissionDenied unless `admin` may run `command` on this target."""
        scope = self.scope(admin, command)
        if scope is Scope.OWN_ORG and target_org != admin.org:
            raise PermissionDenied(f"denied: role '{_role(admin)}' may not run '{command}' on a target of org "
                                   f"'{target_org}' (only for org '{admin.org}')")
        if scope is Scope.OWN_JOBS and job_submitter != admin.name:
            raise PermissionDenied(f"denied: role '{_role(admin)}' may not run '{command}' on a job of "
                                   f"{job_submitter} (only on its own jobs)")


def _role(admin: Identity) -> str:
    return admin.role.value if admin.role else ""
