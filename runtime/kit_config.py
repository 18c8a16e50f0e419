"""The schemas of what a startup kit holds: `startup/fed_*.json` (written by provisioning) and the
site-owned `local/*.yml` settings (written by site IT).

Provisioning imports these models to write the files, the runtime to read them, so both always agree.
Loading raises ConfigError naming the file and the field; it never returns a half-valid config.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from . import strict_yaml
from .errors import ConfigError, problems_line
from .identity import Role

# File names inside a kit, in one place.
STARTUP = "startup"
LOCAL = "local"
SERVER_CONFIG = "fed_server.json"
CLIENT_CONFIG = "fed_client.json"
ADMIN_CONFIG = "fed_admin.json"
SIGNATURE = "signature.json"
ROOT_CA = "rootCA.pem"
REVOCATION_LIST = "crl.pem"


class SettingsModel(BaseModel):
    """A settings file's model: unknown keys refused, and true/false refused where a number belongs (pydantic
    would read `true` as 1, so `min_free_disk_mb: true` would quietly mean 1 MiB)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and _is_a_number(field.annotation):
            raise ValueError(f"{str(value).lower()} is not a number")
        if value is None and field is not None and _is_a_section(field.annotation):
            return {}  # `sandbox:` with every key below it commented out: the section's defaults
        return value


def _is_a_section(annotation: Any) -> bool:
    """A nested settings section that always exists (not optional): empty, it holds its defaults."""
    return isinstance(annotation, type) and issubclass(annotation, SettingsModel)


def _is_a_number(annotation: Any) -> bool:
    """int or float, possibly optional; not bool (a bool is an int to Python, not to site IT)."""
    return annotation in (int, float) or any(a in (int, float) for a in get_args(annotation))



class ClientEntry(SettingsModel):
    name: str
    org: str


class AdminEntry(SettingsModel):
    name: str
    org: str
    role: Role


class ServerKitConfig(SettingsModel):
    """startup/fed_server.json"""

    project: str
    name: str = Field(description="the server's TLS host name (CN and first SAN)")
    org: str
    fed_learn_port: int
    admin_port: int
    cert: str = "server.crt"
    key: str = "server.key"
    root_ca: str = ROOT_CA
    clients: list[ClientEntry] = Field(default_factory=list, description="the roster of client sites")
    admins: list[AdminEntry] = Field(default_factory=list)


class ClientKitConfig(SettingsModel):
    """startup/fed_client.json"""

    project: str
    name: str
    org: str
    server_host: str
    fed_learn_port: int
    cert: str = "client.crt"
    key: str = "client.key"
    root_ca: str = ROOT_CA


class AdminKitConfig(SettingsModel):
    """startup/fed_admin.json"""

    project: str
    name: str
    org: str
    role: Role
    server_host: str
    admin_port: int
    cert: str = "client.crt"
    key: str = "client.key"
    root_ca: str = ROOT_CA


class ServerLocalSettings(SettingsModel):
    """local/server.yml (optional; defaults apply when absent)."""

    listen_host: str | None = Field(None, description="address to bind; default: the server's host name")
    fed_learn_listen_port: int | None = Field(None, ge=1, le=65535,
                                              description="port to bind for sites, when a proxy or NAT "
                                                          "forwards the kit's fed_learn_port to another")
    admin_listen_port: int | None = Field(None, ge=1, le=65535, description="likewise for the admin port")
    heartbeat_timeout_s: float = 30.0
    disconnect_grace_s: float = Field(5.0, gt=0, description="a site whose connection dropped counts as dead "
                                                               "after this long unless it reconnects")
    max_update_bytes_factor: float = Field(1.5, description="largest accepted update, as a multiple of the model")
    max_concurrent_uploads: int = Field(4, ge=1, description="updates received at once: bounds server memory "
                                                             "(each costs its stream window and buffers, about "
                                                             "22 MiB); raise it for many sites on slow links")
    max_concurrent_downloads: int = Field(8, ge=1, description="sites fetching the model at once: bounds "
                                                               "server memory per site")
    max_jobs_per_admin: int = Field(100, ge=1, description="jobs one admin may have stored (queued, running or "
                                                           "ended); delete_job frees one")
    max_job_bytes_per_admin: int = Field(20 << 30, ge=1, description="bytes one admin's stored jobs (archives "
                                                                      "and outputs) may take on disk")
    max_job_archive_bytes: int = Field(256 << 20, ge=1, le=256 << 20,
                                       description="largest job archive an admin may upload")
    max_initial_model_bytes: int = Field(64 << 30, ge=1, description="largest initial model an admin may "
                                         "upload beside a job (submit_job --initial-model); stored on disk")
    allow_job_aggregators: bool = Field(False, description="run a job's own aggregator class (aggregator: "
                                                           "{name: custom}) in the server process: that is "
                                                           "a job's code on the server, unsandboxed")
    audit_repeated_reads_s: float = Field(60.0, ge=0, description="a successful read-only admin command "
                                          "repeated by the same admin with the same arguments (a dashboard "
                                          "polls every second) is audited once per this many seconds, with "
                                          "its repeat count; 0 = every one")


class SandboxSettings(SettingsModel):
    """local/site.yml `sandbox:`: how this site confines job code (a stranger's code) while it runs."""

    backend: Literal["auto", "native", "docker", "off"] = Field(
        "auto", description="native: Linux namespaces (bubblewrap); docker: a container per job; "
                            "auto: docker when this site runs in Docker, else native; off: no sandbox (warned)")
    image: str | None = Field(None, description="docker: the image job workers run in; default: the image "
                                                "docker.sh runs this site in")
    cpus: float | None = Field(None, gt=0, description="CPU cores a job may use; null = no limit")
    memory_mb: int | None = Field(None, ge=64, description="memory a job may use, in MiB; null = no limit")
    pids: int = Field(4096, ge=16, description="processes and threads a job may run at once")
    max_task_s: float | None = Field(None, gt=0, description="the longest a job's task (and its worker's start) "
                                                             "may run here, whatever the job asks; null = the "
                                                             "job's task_timeout_s")
    min_free_disk_mb: int | None = Field(1024, ge=0, description="a job's worker is stopped when the workspace's "
                                                                 "disk has less free; null = not watched")
    run_as: str = Field("65534:65534", pattern=r"^[1-9][0-9]{0,9}:[1-9][0-9]{0,9}$",
                        description="when this site runs as root: the unprivileged uid:gid job code runs as "
                                    "(never root); it must be able to read data_root. Otherwise job code "
                                    "runs as this site's own user")

    def run_as_ids(self) -> tuple[int, int]:
        uid, gid = self.run_as.split(":")
        return int(uid), int(gid)


class SiteLocalSettings(SettingsModel):
    """local/site.yml on a client site (optional; defaults apply when absent)."""

    data_root: str | None = Field(None, description="folder holding this site's data; passed to the learner")
    gpus: list[int] = Field(default_factory=list, description="GPU indices the learner may use; [] = CPU")
    nproc: int | None = Field(None, ge=1, le=64, description="training processes (torchrun ranks); "
                                                              "default: one per listed GPU, else 1")
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads per training rank (torch, BLAS); "
                                                                 "default: the cores granted (sandbox.cpus, else "
                                                                 "the machine's) split between the ranks")
    heartbeat_interval_s: float = 5.0
    python: str | None = Field(None, description="interpreter for the training worker; default: this one")
    sandbox: SandboxSettings = Field(default_factory=SandboxSettings)
    send_log: bool = Field(True, description="answer an admin's tail_log with the end of workspace/log.txt")
    keep_updates_max_mb: int = Field(2048, ge=0, description="the most, in MiB, the models jobs ask to keep here "
                                                             "(keep_updates) may take together; past it the oldest "
                                                             "go; 0 = keep none")

    @field_validator("data_root")
    @classmethod
    def _absolute_data_root(cls, value: str | None) -> str | None:
        """`~` expanded here, once, for the start's checks and the sandbox's mount alike (the mount took
        `~/data` as written and found nothing); a relative path would depend on where start.sh ran."""
        if not value:
            return value
        try:
            path = Path(value).expanduser()
        except RuntimeError as e:  # ~user unknown, or no home for this user
            raise ValueError(f"'{value}': {e}; give the data folder's full path") from None
        if not path.is_absolute():
            raise ValueError(f"'{value}' is a relative path; give the data folder's full path, e.g. /data/study")
        return str(path)


M = TypeVar("M", bound=BaseModel)


def _format_validation_error(path: Path, err: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line naming every problem (field and message): site IT fixes them all in one pass. An unknown
    key gets the known key it most resembles (`data_rot`: did you mean data_root?)."""
    return problems_line(str(path), (f"field '{'.'.join(str(p) for p in e['loc']) or '(top level)'}': "
                                     f"{plain_message(e)}{_did_you_mean(e, model)}" for e in err.errors()))


def _did_you_mean(error: Any, model: type[BaseModel] | None) -> str:
    if error["type"] != "extra_forbidden" or model is None or not error["loc"]:
        return ""
    for part in error["loc"][:-1]:  # down to the section that holds the unknown key
        field = model.model_fields.get(str(part))
        candidates = (field.annotation, *get_args(field.annotation)) if field is not None else ()
        section = next((a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if section is None:  # a section that is optional (`dp_budget: DpBudget | None`) too
            return ""
        model = section
    close = difflib.get_close_matches(str(error["loc"][-1]), list(model.model_fields), n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ""


_SECTION_ERRORS = frozenset({"model_type", "model_attributes_type", "dataclass_type", "dict_type"})


def plain_message(error: Any) -> str:
    """pydantic's message, in the file's own terms where pydantic's would puzzle a person: a section given a
    single value is named by its class ("instance of DpBudget"), and text where a whole number belongs is
    "unable to parse string as an integer"."""
    value = error.get("input")
    if error["type"] in _SECTION_ERRORS:
        given = "empty" if value is None else f"not {_shown(value)}"
        return f"is a section (indented `key: value` lines, or {{key: value, ...}}), {given}"
    if error["type"] == "int_parsing" and isinstance(value, str):
        return f"should be a whole number, not {_shown(value)}"
    if error["type"] == "string_type" and isinstance(value, int | float) and not isinstance(value, bool):
        # YAML reads an unquoted all-digit hash (or a version, a code) as a number
        return f"should be text, not {_shown(value)}: put it in quotes"
    return str(error["msg"])


def _shown(value: Any) -> str:
    kind = {bool: "the value", int: "the number", float: "the number", str: "the text", list: "the list"}
    text = repr(value)
    return f"{kind.get(type(value), 'the value')} {text if len(text) <= 60 else text[:57] + '...'}"


def load_model(path: Path, model: type[M]) -> M:
    """Load a JSON or YAML file into `model`; raise ConfigError with one line naming file and field."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else strict_yaml.load(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid json: {str(e).splitlines()[0]}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML {strict_yaml.problem(e)}") from None
    try:
        return model.model_validate(data or {})
    except ValidationError as e:
        raise ConfigError(_format_validation_error(path, e, model)) from None


def load_optional(path: Path, model: type[M]) -> M:
    """Like load_model, but a missing file yields the model's defaults."""
    return load_model(path, model) if path.exists() else model()
