"""project.yml schema: the example loads, and every mistake is one line naming file, participant and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from provision.project import Project, load_project, parse_project
from runtime.errors import ProjectConfigError
from runtime.identity import Kind, Role
from runtime.transport import host_port

EXAMPLE = Path(__file__).resolve().parents[2] / "project.yml.example"

GOOD = {
    "api_version": 1,
    "name": "study-x",
    "participants": [
        {"type": "server", "name": "fl.example.org", "org": "lead", "fed_learn_port": 8002, "admin_port": 8003},
        {"type": "client", "name": "site-1", "org": "a"},
        {"type": "client", "name": "site-2", "org": "b"},
        {"type": "admin", "name": "boss@example.org", "org": "lead", "role": "project_admin"},
    ],
}


def with_participant(index: int, **changes: object) -> dict:
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    data["participants"][index].update(changes)
    data["participants"][index] = {k: v for k, v in data["participants"][index].items() if v is not None}
    return data


def with_top(**changes: object) -> dict:
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def appended(*extra: dict) -> dict:
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    data["participants"].extend(extra)
    return data


# (case id, project.yml text, the exact one-line message for a file named "project.yml")
BAD_CASES: list[tuple[str, str, str]] = [
    (
        "duplicate-name",
        yaml.safe_dump(appended({"type": "client", "name": "site-2", "org": "c"})),
        "project.yml: participants[4] (site-2): duplicate name 'site-2'",
    ),
    (
        # docker.sh names containers fedkit-<study>-<name> with '_' and '.' as '-': both kits would get one name
        "same-container-name",
        yaml.safe_dump(appended({"type": "client", "name": "site_2", "org": "c"})),
        "project.yml: participants[4] (site_2): 'site_2' and 'site-2' (participants[2]) would share the Docker "
        "container name 'fedkit-study-x-site-2'; rename one of them",
    ),
    (
        "several-problems",  # a new user's first try: every problem is named, not the first and a count
        "participants: 5\n",
        "project.yml: 3 problems: field 'api_version': missing; field 'name': missing; "
        "field 'participants': must be a list",
    ),
    (
        "no-server",
        yaml.safe_dump({**GOOD, "participants": GOOD["participants"][1:]}),
        "project.yml: no server; add one participant with 'type: server'",
    ),
    (
        "two-servers",
        yaml.safe_dump(appended({"type": "server", "name": "fl2", "org": "x", "fed_learn_port": 1, "admin_port": 2})),
        "project.yml: participants[4] (fl2): second server; participants[0] is already the server, a study has one",
    ),
    (
        "unknown-role",
        yaml.safe_dump(with_participant(3, role="boss")),
        "project.yml: participants[3] (boss@example.org): field 'role': "
        "Input should be 'project_admin', 'org_admin', 'lead' or 'member'",
    ),
    (
        "port-too-big",
        yaml.safe_dump(with_participant(0, admin_port=70000)),
        "project.yml: participants[0] (fl.example.org): field 'admin_port': "
        "Input should be less than or equal to 65535",
    ),
    (
        "port-zero",
        yaml.safe_dump(with_participant(0, fed_learn_port=0)),
        "project.yml: participants[0] (fl.example.org): field 'fed_learn_port': "
        "Input should be greater than or equal to 1",
    ),
    (
        "same-ports",
        yaml.safe_dump(with_participant(0, admin_port=8002)),
        "project.yml: participants[0] (fl.example.org): admin_port 8002 equals fed_learn_port; the two must differ",
    ),
    (
        "port-wrong-type",
        yaml.safe_dump(with_participant(0, fed_learn_port="eight")),
        "project.yml: participants[0] (fl.example.org): field 'fed_learn_port': Input should be a valid integer",
    ),
    (
        "org-wrong-type",
        yaml.safe_dump(with_participant(1, org=123)),
        "project.yml: participants[1] (site-1): field 'org': Input should be a valid string",
    ),
    (
        "unknown-key-participant",
        yaml.safe_dump(with_participant(2, gpus=2)),
        "project.yml: participants[2] (site-2): unknown key 'gpus'",
    ),
    (
        "unknown-key-top",
        yaml.safe_dump(with_top(owner="me")),
        "project.yml: unknown key 'owner'",
    ),
    (
        "misspelt-key-participant",  # named with the key it resembles
        yaml.safe_dump(with_participant(0, admin_prt=9000)),
        "project.yml: participants[0] (fl.example.org): unknown key 'admin_prt' (did you mean 'admin_port'?)",
    ),
    (
        "misspelt-key-top",
        yaml.safe_dump(with_top(cert_validty_days=30)),
        "project.yml: unknown key 'cert_validty_days' (did you mean 'cert_validity_days'?)",
    ),
    (
        "missing-field",
        yaml.safe_dump(with_participant(1, org=None)),
        "project.yml: participants[1] (site-1): field 'org': missing",
    ),
    (
        "missing-participants",
        yaml.safe_dump(with_top(participants=None)),
        "project.yml: field 'participants': missing",
    ),
    (
        "unknown-type",
        yaml.safe_dump(with_participant(1, type="hospital")),
        "project.yml: participants[1] (site-1): field 'type': unknown type 'hospital'; use server, client or admin",
    ),
    (
        "missing-type",
        yaml.safe_dump(with_participant(1, type=None)),
        "project.yml: participants[1] (site-1): field 'type': missing; use server, client or admin",
    ),
    (
        "bad-site-name",
        yaml.safe_dump(with_participant(1, name="site 1/../x")),
        "project.yml: participants[1] (site 1/../x): field 'name': "
        "'site 1/../x' may hold only letters, digits, '.', '_' and '-', and start with a letter or digit",
    ),
    (
        "admin-not-email",
        yaml.safe_dump(with_participant(3, name="boss")),
        "project.yml: participants[3] (boss): field 'name': 'boss' is not an email address (admins are named by email)",
    ),
    (
        "bad-host-name",
        yaml.safe_dump(with_participant(0, host_names=["ok.example.org", "bad_host!"])),
        "project.yml: participants[0] (fl.example.org): field 'host_names': "
        "'bad_host!' is not a valid host name or IP address",
    ),
    (  # prod_01 would hold a folder site-1 and site-1.zip twice over
        "name-of-a-zip",
        yaml.safe_dump(with_participant(2, name="site-1.zip")),
        "project.yml: participants[2] (site-1.zip): 'site-1.zip' is the name of the zip of 'site-1' "
        "(participants[1]); rename one of them",
    ),
    (  # it would name the kit's folder, zip and container, and sites dialled "::1:8002"
        "ipv6-server-name",
        yaml.safe_dump(with_participant(0, name="::1")),
        "project.yml: participants[0] (::1): field 'name': '::1' is an IPv6 address; give the server a DNS name "
        "that resolves to it (an IPv6 address may go in host_names)",
    ),
    (
        "api-version",
        yaml.safe_dump(with_top(api_version=2)),
        "project.yml: field 'api_version': Input should be 1",
    ),
    (
        "bad-study-name",
        yaml.safe_dump(with_top(name="my study")),
        "project.yml: field 'name': 'my study' may hold only letters, digits, '.', '_' and '-', "
        "and start with a letter or digit",
    ),
    (
        "no-client",
        yaml.safe_dump({**GOOD, "participants": [GOOD["participants"][0], GOOD["participants"][3]]}),
        "project.yml: no client site; add at least one participant with 'type: client'",
    ),
    (
        "no-admin",
        yaml.safe_dump({**GOOD, "participants": GOOD["participants"][:3]}),
        "project.yml: no admin; add at least one participant with 'type: admin' and a role",
    ),
    (
        "validity-days",
        yaml.safe_dump(with_top(cert_validity_days=0)),
        "project.yml: field 'cert_validity_days': Input should be greater than or equal to 1",
    ),
    (
        "not-yaml",
        "name: [unclosed\n",
        "project.yml: not valid YAML at line 2: expected ',' or ']', but got '<stream end>'",
    ),
    (  # PyYAML would keep the last one silently: the admin would become project_admin
        "duplicate-key",
        "name: s\nparticipants:\n  - {type: admin, name: a@x.org, org: o, role: member, role: project_admin}\n",
        "project.yml: not valid YAML at line 3: found duplicate key 'role'",
    ),
    (  # the second block would replace the first, and its sites vanish without a word
        "duplicate-block",
        "name: s\nparticipants: []\nparticipants: []\n",
        "project.yml: not valid YAML at line 3: found duplicate key 'participants'",
    ),
    ("empty", "", "project.yml: empty; start from project.yml.example"),
    ("only-comments", "# nothing yet\n", "project.yml: empty; start from project.yml.example"),
    (
        "top-level-list",
        "- a\n- b\n",
        "project.yml: top level must be a mapping (api_version, name, participants, ...)",
    ),
]


def test_example_project_is_the_documented_three_site_study() -> None:
    project = load_project(EXAMPLE)
    assert project.name == "example-study"
    server = project.server
    assert (server.name, server.fed_learn_port, server.admin_port) == ("localhost", 8002, 8003)
    assert [c.name for c in project.clients] == ["site-1", "site-2", "site-3"]
    assert len({c.org for c in project.clients}) == 3
    assert sorted(a.role for a in project.admins) == sorted([Role.PROJECT_ADMIN, Role.LEAD])
    assert all("@" in a.name for a in project.admins)
    assert [p.kind for p in project.participants].count(Kind.SERVER) == 1


def test_good_project_defaults() -> None:
    project = parse_project(yaml.safe_dump(GOOD), "project.yml")
    assert project.cert_validity_days == 360
    assert project.docker_image == "python:3.11-slim"
    assert project.server.san_hosts == ("fl.example.org",)


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_project_gives_one_exact_line(text: str, expected: str) -> None:
    with pytest.raises(ProjectConfigError) as info:
        parse_project(text, "project.yml")
    message = str(info.value)
    assert "\n" not in message
    assert message == expected


def test_duplicate_names_differing_only_in_case_are_refused() -> None:
    text = yaml.safe_dump(appended({"type": "client", "name": "SITE-1", "org": "c"}))
    with pytest.raises(
        ProjectConfigError, match=r"participants\[4\] \(SITE-1\): duplicate name 'SITE-1' \(same as 'site-1'\)"
    ):
        parse_project(text, "project.yml")


def test_every_error_is_named_on_the_same_line() -> None:
    data = with_participant(1, org=None)
    data["participants"][2].pop("org")
    with pytest.raises(ProjectConfigError) as info:
        parse_project(yaml.safe_dump(data), "p.yml")
    assert str(info.value) == (
        "p.yml: 2 problems: participants[1] (site-1): field 'org': missing; "
        "participants[2] (site-2): field 'org': missing"
    )


def test_past_ten_errors_the_rest_are_counted() -> None:
    data = appended(*({"type": "client", "name": f"extra-{i}"} for i in range(12)))  # 12 sites without an org
    with pytest.raises(ProjectConfigError) as info:
        parse_project(yaml.safe_dump(data), "p.yml")
    message = str(info.value)
    assert message.startswith("p.yml: 12 problems: participants[4] (extra-0): field 'org': missing; ")
    assert "participants[13] (extra-9): field 'org': missing; and 2 more" in message
    assert message.endswith("; and 2 more") and "extra-10" not in message and "\n" not in message


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("site-2", "site.2"),
        ("site-2", "Site__2"),
        ("fl.example.org", "fl-example-org"),  # a site against the server
        ("boss@example.org", "boss-example.org"),  # and against an admin
    ],
)
def test_names_that_share_a_container_name_are_refused_naming_both(first: str, second: str) -> None:
    data = appended({"type": "client", "name": second, "org": "c"})
    index = next(i for i, p in enumerate(data["participants"]) if p["name"] == first)
    with pytest.raises(ProjectConfigError) as info:
        parse_project(yaml.safe_dump(data), "p.yml")
    assert str(info.value).startswith(
        f"p.yml: participants[4] ({second}): '{second}' and '{first}' (participants[{index}]) would share the "
        "Docker container name 'fedkit-study-x-"
    )


def test_error_names_the_path_given(tmp_path: Path) -> None:
    path = tmp_path / "studies" / "mine.yml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(with_participant(1, org=None)))
    with pytest.raises(ProjectConfigError) as info:
        load_project(path)
    assert str(info.value).startswith(f"{path}: participants[1] (site-1): ")


def test_missing_file_is_a_project_error(tmp_path: Path) -> None:
    with pytest.raises(ProjectConfigError, match=r"nope\.yml: cannot read \(No such file or directory\)"):
        load_project(tmp_path / "nope.yml")


def test_ip_literals_are_valid_host_names() -> None:
    project = parse_project(yaml.safe_dump(with_participant(0, name="10.0.0.5", host_names=["::1"])), "p")
    assert project.server.san_hosts == ("10.0.0.5", "::1")


def test_an_ipv6_listen_address_is_bracketed_for_grpc() -> None:
    assert host_port("::", 8002) == "[::]:8002" and host_port("::1", 1) == "[::1]:1"
    assert host_port("fl.example.org", 8002) == "fl.example.org:8002" and host_port("[::1]", 1) == "[::1]:1"


def test_models_validate_when_built_in_code_too() -> None:
    with pytest.raises(ValueError, match="duplicate name"):
        Project.model_validate(appended({"type": "client", "name": "site-1", "org": "z"}))
