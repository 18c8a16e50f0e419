"""runtime/server/authz.py: which admin role may run which command on what."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.errors import ConfigError, PermissionDenied
from runtime.identity import Identity, Kind, Role
from runtime.server.authz import DEFAULT_POLICY, Policy


def _admin(role: Role, name: str = "alice@a.org", org: str = "org-a") -> Identity:
    return Identity(name=name, org=org, kind=Kind.ADMIN, role=role)


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    return Policy.load(tmp_path / "authorization.yml")  # absent: the defaults


def test_a_missing_policy_file_gives_the_defaults(tmp_path: Path) -> None:
    loaded = Policy.load(tmp_path / "authorization.yml")

    for role, rules in DEFAULT_POLICY.items():
        for command, scope in rules.items():
            assert loaded.scope(_admin(role), command) is scope


@pytest.mark.parametrize("command", ["submit_job", "abort_job", "shutdown_server", "shutdown_client", "anything"])
def test_project_admin_may_run_anything_anywhere(policy: Policy, command: str) -> None:
    admin = _admin(Role.PROJECT_ADMIN)

    policy.check(admin, command, target_org="org-b", job_submitter="bob@b.org")  # no exception


@pytest.mark.parametrize("command", ["sys_info", "tail_log", "shutdown_client", "restart_client"])
def test_org_admin_may_run_site_commands_on_its_own_org(policy: Policy, command: str) -> None:
    policy.check(_admin(Role.ORG_ADMIN), command, target_org="org-a")  # no exception


@pytest.mark.parametrize("command", ["sys_info", "tail_log", "shutdown_client", "restart_client"])
def test_org_admin_may_not_run_site_commands_on_another_org(policy: Policy, command: str) -> None:
    with pytest.raises(PermissionDenied, match="org 'org-a'"):
        policy.check(_admin(Role.ORG_ADMIN), command, target_org="org-b")


@pytest.mark.parametrize("command", ["submit_job", "abort_job", "shutdown_server"])
def test_org_admin_may_not_run_job_or_server_commands(policy: Policy, command: str) -> None:
    with pytest.raises(PermissionDenied, match=f"role 'org_admin' may not run '{command}'"):
        policy.check(_admin(Role.ORG_ADMIN), command, target_org="org-a")


def test_lead_may_submit_a_job(policy: Policy) -> None:
    policy.check(_admin(Role.LEAD), "submit_job")  # no exception


@pytest.mark.parametrize("command", ["abort_job", "clone_job", "delete_job", "download_job"])
def test_lead_may_manage_its_own_jobs(policy: Policy, command: str) -> None:
    policy.check(_admin(Role.LEAD), command, job_submitter="alice@a.org")  # no exception


@pytest.mark.parametrize("command", ["abort_job", "clone_job", "delete_job", "download_job"])
def test_lead_may_not_manage_another_leads_job(policy: Policy, command: str) -> None:
    with pytest.raises(PermissionDenied, match="may not run .* on a job of bob@b.org"):
        policy.check(_admin(Role.LEAD), command, job_submitter="bob@b.org")


def test_lead_may_not_shut_down_sites(policy: Policy) -> None:
    with pytest.raises(PermissionDenied):
        policy.check(_admin(Role.LEAD), "shutdown_client", target_org="org-a")


@pytest.mark.parametrize("command", ["help", "check_status", "list_jobs", "show_job"])
def test_member_may_read(policy: Policy, command: str) -> None:
    policy.check(_admin(Role.MEMBER), command)  # no exception


@pytest.mark.parametrize("command", ["submit_job", "abort_job", "download_job", "shutdown_client"])
def test_member_may_not_change_anything(policy: Policy, command: str) -> None:
    with pytest.raises(PermissionDenied, match=f"role 'member' may not run '{command}'"):
        policy.check(_admin(Role.MEMBER), command, target_org="org-a", job_submitter="alice@a.org")


def test_an_identity_without_a_role_may_run_nothing(policy: Policy) -> None:
    site = Identity(name="site-1", org="org-a", kind=Kind.CLIENT)

    with pytest.raises(PermissionDenied):
        policy.check(site, "list_jobs")


def test_a_policy_file_overrides_a_role(tmp_path: Path) -> None:
    # Prepare: members may also submit jobs, but only download their own
    path = tmp_path / "authorization.yml"
    path.write_text("member:\n  list_jobs: any\n  submit_job: any\n  download_job: own_jobs\n")
    # Execute
    loaded = Policy.load(path)
    member = _admin(Role.MEMBER)
    # Assert
    loaded.check(member, "submit_job")
    loaded.check(member, "download_job", job_submitter="alice@a.org")
    with pytest.raises(PermissionDenied):
        loaded.check(member, "download_job", job_submitter="bob@b.org")
    with pytest.raises(PermissionDenied):
        loaded.check(member, "show_job")  # not listed in the file any more


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("lead:\n  submit_job: everything\n", "lead.submit_job"),
        ("superuser:\n  submit_job: any\n", "superuser"),
        ("- lead\n- member\n", "(top level)"),
    ],
    ids=["bad-scope", "unknown-role", "not-a-mapping"],
)
def test_a_malformed_policy_file_names_the_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "authorization.yml"
    path.write_text(text)

    with pytest.raises(ConfigError) as caught:
        Policy.load(path)

    assert str(path) in str(caught.value)
    assert field in str(caught.value)


def test_a_policy_file_that_is_not_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "authorization.yml"
    path.write_text("lead: [unclosed\n")

    with pytest.raises(ConfigError, match="authorization.yml"):
        Policy.load(path)


@pytest.mark.parametrize("command", ["sys_info", "tail_log", "shutdown_client", "restart_client"])
def test_an_own_org_command_with_an_unknown_target_is_denied(policy: Policy, command: str) -> None:
    with pytest.raises(PermissionDenied, match="only for org 'org-a'"):
        policy.check(_admin(Role.ORG_ADMIN), command, target_org=None)


def test_an_own_jobs_command_on_a_job_of_unknown_submitter_is_denied(policy: Policy) -> None:
    with pytest.raises(PermissionDenied, match="only on its own jobs"):
        policy.check(_admin(Role.LEAD), "abort_job", job_submitter=None)


def test_a_policy_naming_a_command_the_server_lacks_stops_it_in_one_line(tmp_path: Path) -> None:
    """`show_jobs` (a typo) silently took show_job from members; `shutdown` (the console's word) gave leads
    nothing. Both were accepted without a word."""
    path = tmp_path / "authorization.yml"
    path.write_text("member: {help: any, show_jobs: any}\nlead: {help: any, shutdown: own_org}\n")
    policy = Policy.load(path)
    with pytest.raises(ConfigError) as caught:
        policy.check_commands({"help", "show_job", "shutdown_client"})
    message = str(caught.value)
    assert message.startswith(str(path)) and "lead: shutdown" in message and "member: show_jobs" in message
    assert "\n" not in message
    Policy(DEFAULT_POLICY).check_commands({c for rules in DEFAULT_POLICY.values() for c in rules} - {"*"})
