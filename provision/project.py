"""The project.yml schema: one study, its server, client sites and admins, validated at the edge.

The models only hold and check data; they never drive provisioning. Every check that spans participants
(unique names and container names, exactly one server, at least one site and one admin, distinct ports)
lives here, so a `Project` built in code is as valid as one loaded from a file. `load_project` turns the
mistakes into one ProjectConfigError line naming the file, the participant (index and name) and the field, e.g.
`project.yml: participants[3] (site-2): duplicate name 'site-2'`, or for several
`project.yml: 2 problems: field 'name': missing; participants[1] (site-1): field 'org': missing`.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from runtime import strict_yaml
from runtime.errors import ProjectConfigError, problems_line
from runtime.identity import Kind, Role
from runtime.plain_text import check_one_line

API_VERSION = 1
DEFAULT_CERT_VALIDITY_DAYS = 360
MAX_CERT_VALIDITY_DAYS = 3650
# The CA outlives the kits it signs: kits are renewed (provision, add-site) under the same CA, whose
# fingerprint every site pinned; a CA as short-lived as its kits would cap every later kit at its end.
DEFAULT_CA_VALIDITY_DAYS = 1825
DEFAULT_DOCKER_IMAGE = "python:3.11-slim"
# X.509 caps CN and O at 64 characters (RFC 5280 ub-common-name / ub-organization-name).
MAX_NAME_CHARS = 64

_FOLDER_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")
_DOCKER_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]*")

Port = Annotated[int, Field(strict=True, ge=1, le=65535)]
NonEmpty = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_host_name(host: str) -> str:
    """A DNS name or an IP literal: what a TLS client may dial and a SAN may hold."""
    if is_ip_literal(host):
        return host
    labels = host.split(".")
    if len(host) > 253 or not all(len(label) <= 63 and _DNS_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"'{host}' is not a valid host name or IP address")
    return host


def _check_folder_safe(name: str) -> str:
    if not _FOLDER_SAFE.fullmatch(name) or name in {".", ".."}:
        raise ValueError(f"'{name}' may hold only letters, digits, '.', '_' and '-', and start with a letter or digit")
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSpec(_Strict):
    """The one federated server. `name` is the TLS host name clients and admins dial."""

    type: Literal["server"]
    name: NonEmpty
    org: NonEmpty
    fed_learn_port: Port
    admin_port: Port
    host_names: tuple[str, ...] = Field(default=(), description="extra SANs: other DNS names or IP literals")

    @property
    def kind(self) -> Kind:
        return Kind.SERVER

    @field_validator("org")
    @classmethod
    def _org_one_line(cls, v: str) -> str:
        return check_one_line(v)

    @field_validator("name")
    @classmethod
    def _name_is_host(cls, v: str) -> str:
        if ":" in v:  # the name also names the server's kit folder, zip and container, where ':' breaks docker -v
            raise ValueError(f"'{v}' is an IPv6 address; give the server a DNS name that resolves to it (an "
                             "IPv6 address may go in host_names)")
        return _check_host_name(v)

    @field_validator("host_names")
    @classmethod
    def _extra_hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_host_name(h) for h in v)

    @model_validator(mode="after")
    def _ports_differ(self) -> ServerSpec:
        if self.fed_learn_port == self.admin_port:
            raise ValueError(f"admin_port {self.admin_port} equals fed_learn_port; the two must differ")
        return self

    @property
    def san_hosts(self) -> tuple[str, ...]:
        """The server's name then its extra host names, without repeats, in project.yml order."""
        return tuple(dict.fromkeys((self.name, *self.host_names)))


class ClientSpec(_Strict):
    """A client site: a hospital's training node. `name` is its folder and certificate CN."""

    type: Literal["client"]
    name: NonEmpty
    org: NonEmpty

    @property
    def kind(self) -> Kind:
        return Kind.CLIENT

    @field_validator("org")
    @classmethod
    def _org_one_line(cls, v: str) -> str:
        return check_one_line(v)

    @field_validator("name")
    @classmethod
    def _name_is_folder_safe(cls, v: str) -> str:
        return _check_folder_safe(v)


class AdminSpec(_Strict):
    """A person who runs the admin console; `name` is their email, `role` goes into their cert."""

    type: Literal["admin"]
    name: NonEmpty
    org: NonEmpty
    role: Role

    @property
    def kind(self) -> Kind:
        return Kind.ADMIN

    @field_validator("org")
    @classmethod
    def _org_one_line(cls, v: str) -> str:
        return check_one_line(v)

    @field_validator("name")
    @classmethod
    def _name_is_email(cls, v: str) -> str:
        if not _EMAIL.fullmatch(v):
            raise ValueError(f"'{v}' is not an email address (admins are named by email)")
        return v


ParticipantSpec = ServerSpec | ClientSpec | AdminSpec
Participant = Annotated[ParticipantSpec, Field(discriminator="type")]


def docker_name(*parts: str) -> str:
    """A docker image/container name from folder-safe parts: lowercase, runs of other characters -> '-'."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def _participant_error(index: int, message: str) -> PydanticCustomError:
    """A cross-participant error that remembers which participant it is about, for the one-line message."""
    return PydanticCustomError("participant", message, {"participant_index": index})


class Project(_Strict):
    """A whole study: what project.yml holds once validated."""

    api_version: Literal[1]
    name: NonEmpty
    description: str = ""
    cert_validity_days: Annotated[int, Field(strict=True, ge=1, le=MAX_CERT_VALIDITY_DAYS)] = DEFAULT_CERT_VALIDITY_DAYS
    # None: DEFAULT_CA_VALIDITY_DAYS, or cert_validity_days where that is longer
    ca_validity_days: Annotated[int, Field(strict=True, ge=1, le=MAX_CERT_VALIDITY_DAYS)] | None = None
    docker_image: str = DEFAULT_DOCKER_IMAGE
    participants: tuple[Participant, ...]

    @field_validator("name")
    @classmethod
    def _study_folder_safe(cls, v: str) -> str:
        return _check_folder_safe(v)

    @property
    def ca_days(self) -> int:
        """How long a CA created now stays valid (a CA reused from state/ keeps its own end)."""
        return self.ca_validity_days or max(DEFAULT_CA_VALIDITY_DAYS, self.cert_validity_days)

    @field_validator("description")
    @classmethod
    def _description_one_line(cls, v: str) -> str:
        return check_one_line(v)

    @field_validator("docker_image")
    @classmethod
    def _image_ref(cls, v: str) -> str:
        if not _DOCKER_IMAGE.fullmatch(v):
            raise ValueError(f"'{v}' is not a docker image reference like python:3.11-slim")
        return v

    @model_validator(mode="after")
    def _roster(self) -> Project:
        seen: dict[str, int] = {}
        containers: dict[str, int] = {}
        server_at: int | None = None
        for i, p in enumerate(self.participants):
            key = p.name.casefold()
            if key in seen:
                first = self.participants[seen[key]].name
                raise _participant_error(
                    i, f"duplicate name '{p.name}'" + ("" if first == p.name else f" (same as '{first}')")
                )
            seen[key] = i
            # Each kit's docker.sh names its container after the participant, lowercased with runs of other
            # characters as '-' (the one identifier a kit derives from a name): 'site-a' and 'site_a' would
            # fight over one container on a shared Docker host, so refuse them here, for add-site too.
            container = docker_name("fedkit", self.name, p.name)
            if container in containers:
                j = containers[container]
                raise _participant_error(
                    i, f"'{p.name}' and '{self.participants[j].name}' (participants[{j}]) would share the Docker "
                       f"container name '{container}'; rename one of them",
                )
            containers[container] = i
            if isinstance(p, ServerSpec):
                if server_at is not None:
                    raise _participant_error(
                        i, f"second server; participants[{server_at}] is already the server, a study has one"
                    )
                server_at = i
        for i, p in enumerate(self.participants):  # prod_NN holds a folder and a <name>.zip per participant
            other = seen.get(f"{p.name}.zip".casefold())
            if other is not None:
                raise _participant_error(
                    other, f"'{self.participants[other].name}' is the name of the zip of '{p.name}' "
                           f"(participants[{i}]); rename one of them",
                )
        if server_at is None:
            raise ValueError("no server; add one participant with 'type: server'")
        if not self.clients:
            raise ValueError("no client site; add at least one participant with 'type: client'")
        if not self.admins:
            raise ValueError("no admin; add at least one participant with 'type: admin' and a role")
        return self

    @property
    def server(self) -> ServerSpec:
        return next(p for p in self.participants if isinstance(p, ServerSpec))

    @property
    def clients(self) -> tuple[ClientSpec, ...]:
        return tuple(p for p in self.participants if isinstance(p, ClientSpec))

    @property
    def admins(self) -> tuple[AdminSpec, ...]:
        return tuple(p for p in self.participants if isinstance(p, AdminSpec))

    def participant(self, name: str) -> ParticipantSpec | None:
        return next((p for p in self.participants if p.name == name), None)


def _name_at(data: Any, index: int) -> str | None:
    try:
        name = data["participants"][index]["name"]
    except (KeyError, IndexError, TypeError):
        return None
    return str(name)


def _describe(error: ErrorDetails) -> str:
    """The human half of one pydantic error: what is wrong with which field."""
    loc = [str(part) for part in error["loc"]]
    field = ".".join(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"unknown key '{loc[-1]}'"
    if kind == "missing":
        return f"field '{field}': missing"
    if kind == "union_tag_not_found":
        return "field 'type': missing; use server, client or admin"
    if kind == "union_tag_invalid":
        tag = (error.get("ctx") or {}).get("tag", "?")
        return f"field 'type': unknown type '{tag}'; use server, client or admin"
    if kind == "tuple_type":  # a YAML list is a tuple here; "valid tuple" would be Python's word, not the file's
        return f"field '{field}': must be a list"
    message = error["msg"].removeprefix("Value error, ")
    return f"field '{field}': {message}" if field else message


def _did_you_mean(loc: list[Any]) -> str:
    """For an unknown key: the known key of its place it most resembles (`fed_learn_prt`: fed_learn_port)."""
    specs = {"server": ServerSpec, "client": ClientSpec, "admin": AdminSpec}
    if len(loc) == 1:
        known = list(Project.model_fields)
    elif len(loc) == 4 and loc[0] == "participants" and loc[2] in specs:
        known = list(specs[loc[2]].model_fields)
    else:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _locate(data: Any, error: ErrorDetails) -> str:
    """One problem as text: participant (index and name) if it is about one, then field and message."""
    hint = _did_you_mean(list(error["loc"])) if error["type"] == "extra_forbidden" else ""
    loc = list(error["loc"])
    ctx = error.get("ctx") or {}
    where = ""
    if "participant_index" in ctx:
        index = int(ctx["participant_index"])
        loc = []
    elif len(loc) >= 2 and loc[0] == "participants" and isinstance(loc[1], int):
        index = loc[1]
        loc = loc[3:] if len(loc) > 2 and loc[2] in ("server", "client", "admin") else loc[2:]
    else:
        index = -1
    if index >= 0:
        name = _name_at(data, index)
        where = f"participants[{index}]" + (f" ({name})" if name else "") + ": "
    return where + _describe({**error, "loc": tuple(loc)}) + hint


def format_validation_error(source: str, data: Any, err: ValidationError) -> str:
    """One line naming every error in `err` (runtime.errors.problems_line), each with
    its participant (index and name) and field: a new user fixes them all in one pass, not one per run."""
    return problems_line(source, (_locate(data, error) for error in err.errors()))


def parse_project(text: str, source: str) -> Project:
    """Validate project.yml text; `source` names the file in error messages. Raises ProjectConfigError."""
    try:
        data = strict_yaml.load(text)
    except yaml.YAMLError as e:
        raise ProjectConfigError(f"{source}: not valid YAML {strict_yaml.problem(e)}") from None
    if data is None:
        raise ProjectConfigError(f"{source}: empty; start from project.yml.example")
    if not isinstance(data, dict):
        raise ProjectConfigError(f"{source}: top level must be a mapping (api_version, name, participants, ...)")
    try:
        return Project.model_validate(data)
    except ValidationError as e:
        raise ProjectConfigError(format_validation_error(source, data, e)) from None


def load_project(path: Path) -> Project:
    """Read and validate project.yml at `path` (named as given in messages). Raises ProjectConfigError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ProjectConfigError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ProjectConfigError(f"{path}: not UTF-8 text") from None
    return parse_project(text, str(path))
