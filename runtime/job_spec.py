"""A job folder and its three config files, validated at the edge.

    my-job/
      meta.yml               name, sites, min_clients
      config_fed_server.yml  the workflows in order and their settings: rounds, deadlines, aggregation
      config_fed_client.yml  learner class and arguments, privacy filters
      custom/                the learner's Python code (put on sys.path in the training worker)

`--set key=value` overrides address these files as `server.rounds=5`, `client.learner.args.lr=0.1`,
`meta.min_clients=2`. Errors name the file and the field.

Everything here reads what a stranger sent, so every read is bounded: a config text is at most
MAX_CONFIG_BYTES, YAML aliases are refused (a few hundred bytes of nested aliases expand to gigabytes),
and zip members are decompressed with a cap counted as they come out (runtime/bounded_zip.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import strict_yaml
from .aggregators.config import AggregatorConfig, FedAvgConfig
from .bounded_zip import check_entries, extract_capped, is_plain_path, open_zip, read_member
from .errors import ConfigError, JobRejected
from .plain_text import check_one_line

META = "meta.yml"
SERVER_CONFIG = "config_fed_server.yml"
CLIENT_CONFIG = "config_fed_client.yml"
CUSTOM_DIR = "custom"
MAX_JOB_ZIP_BYTES = 256 << 20
MAX_JOB_FILES = 10_000
MAX_CONFIG_BYTES = 64 << 10  # each of the three config files; real ones are a few hundred bytes
MAX_MEMBER_BYTES = MAX_JOB_ZIP_BYTES  # any one file of a job, decompressed
MAX_EXPANDED_BYTES = 4 * MAX_JOB_ZIP_BYTES  # a whole job, decompressed
MAX_OVERRIDES = 64
MAX_OVERRIDE_CHARS = 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobMeta(_Strict):
    name: str = Field(min_length=1, max_length=128, description="the job's name, shown in list_jobs")
    description: str = Field("", description="one line for people: what the job does")
    sites: list[str] | Literal["all"] = Field("all", description="the sites that take part: 'all' or a list of "
                                                               "site names")
    min_clients: int = Field(1, ge=1, description="a round needs at least this many sites' answers")

    @field_validator("name", "description")
    @classmethod
    def _one_line(cls, v: str) -> str:  # shown on every admin's console, in logs and the dashboard
        return check_one_line(v)

    @field_validator("sites")
    @classmethod
    def _site_names_one_line(cls, v: list[str] | str) -> list[str] | str:
        for name in [] if isinstance(v, str) else v:
            check_one_line(name)
        return v

    @model_validator(mode="after")
    def _can_start(self) -> JobMeta:
        """A job that could never start is refused at submit, not left queued for ever."""
        if self.sites == "all":
            return self
        if not self.sites:
            raise ValueError("sites is an empty list: name the sites that take part, or 'all'")
        if len(set(self.sites)) != len(self.sites):
            twice = sorted({s for s in self.sites if self.sites.count(s) > 1})
            raise ValueError(f"sites names {', '.join(twice)} more than once")
        if self.min_clients > len(self.sites):
            raise ValueError(f"min_clients is {self.min_clients} but sites names only {len(self.sites)} "
                             f"({', '.join(self.sites)}): the job could never start")
        return self


class KeyMetric(_Strict):
    name: str = Field("accuracy", description="a metric validate() returns; picks the best model")
    higher_is_better: bool = Field(True, description="false for a loss")


_TAGGED = frozenset({"aggregator"})
_TAGS = frozenset({"fedavg", "fedopt", "scaffold", "median", "trimmed_mean", "custom"})
WorkflowName = Literal["fedavg", "evaluate", "cross_site"]
TRAINING_WORKFLOWS = frozenset({"fedavg"})
_RENAMED = {"workflow": "'workflow' is now 'workflows', a list in run order, e.g. workflows: [fedavg]",
            "cross_site_validation": "'cross_site_validation' is now a workflow: workflows: [fedavg, cross_site]"}


class ServerJobConfig(_Strict):
    """What the server runs: the job's workflows in order, and their settings.

        workflows: [fedavg, cross_site]   train, then score every site's model on every site
        workflows: [evaluate]             score given models (evaluate_models, else initial_model) on every site
    """

    workflows: list[WorkflowName] = Field(default_factory=lambda: ["fedavg"], min_length=1,
                                          description="what the job does, in run order: fedavg trains; "
                                                      "cross_site then scores every site's model on every "
                                                      "site; evaluate scores given models")
    rounds: int = Field(1, ge=1, le=100_000, description="training rounds of fedavg")
    round_timeout_s: float = Field(600.0, gt=0, description="a round ends at the latest after this many "
                                                            "seconds, with the answers it has")
    rejoin_wait_s: float = Field(0.0, ge=0, description="how long a round waits for an offline site of the "
                                                        "job to come back (restarting, reconnecting): at the "
                                                        "round's start for a site that took part before, and "
                                                        "for a site that went silent before answering; 0: go "
                                                        "on without it at once")
    aggregator: AggregatorConfig = Field(FedAvgConfig(), description="how the sites' updates are combined")
    proximal_mu: float = Field(0.0, ge=0, description="> 0: FedProx, the proximal term added on every site")
    key_metric: KeyMetric = Field(KeyMetric(), description="the metric that picks the best global model")
    initial_model: str | None = Field(None, description="safetensors file in the job folder; else a site makes it")
    evaluate_models: list[str] = Field(default_factory=list, max_length=64,
                                       description="safetensors files in the job folder that `evaluate` scores")
    max_n_samples: int = Field(10**9, ge=1, description="an update claiming more samples is refused")
    wire_dtype: Literal["float32", "float16", "bfloat16", "int8"] = Field(
        "float32", description="what the server's models (to every site) and the sites' training updates are "
                               "cast to on the wire (runtime/quantize.py); a site's round-0 and cross-site models "
                               "go in full precision")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, hint in _RENAMED.items():
                if old in data:
                    raise ValueError(hint)
            aggregator = data.get("aggregator")
            if isinstance(aggregator, dict) and "name" not in aggregator:  # the documented default, not
                data = {**data, "aggregator": {"name": "fedavg", **aggregator}}  # "unable to extract tag"
        return data

    @field_validator("initial_model")
    @classmethod
    def _initial_in_job_folder(cls, v: str | None) -> str | None:
        return None if v is None else _job_file(v)

    @field_validator("evaluate_models")
    @classmethod
    def _models_in_job_folder(cls, v: list[str]) -> list[str]:
        return [_job_file(name) for name in v]

    @model_validator(mode="after")
    def _consistent(self) -> ServerJobConfig:
        names = self.workflows
        if len(set(names)) != len(names):
            raise ValueError(f"workflows {names}: each may appear once")
        if "cross_site" in names and not any(n in TRAINING_WORKFLOWS for n in names[:names.index("cross_site")]):
            raise ValueError("cross_site scores the sites' trained models: put a training workflow (fedavg) "
                             "before it")
        if "evaluate" in names and not (self.evaluate_models or self.initial_model):
            raise ValueError("evaluate needs the models to score: evaluate_models (or initial_model)")
        if self.proximal_mu > 0 and self.aggregator.name == "scaffold":
            raise ValueError("proximal_mu (FedProx) and the scaffold aggregator each correct the sites' drift; "
                             "choose one")
        return self

    @property
    def trains(self) -> bool:
        return any(n in TRAINING_WORKFLOWS for n in self.workflows)


class LearnerConfig(_Strict):
    path: str = Field(description="'module:Class' inside custom/, e.g. 'learner:TabularLearner'")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the learner's "
                                                                   "constructor")

    @field_validator("path")
    @classmethod
    def _module_and_class(cls, v: str) -> str:
        module, _, klass = v.partition(":")
        if not module or not klass:
            raise ValueError("must look like 'module:Class'")
        return v


class FilterConfig(_Strict):
    name: str = Field(description="a privacy filter: exclude_vars, percentile, gaussian_dp or svt")
    args: dict[str, Any] = Field(default_factory=dict, description="the filter's arguments")

    @field_validator("args")
    @classmethod
    def _text_one_line(cls, v: dict[str, Any]) -> dict[str, Any]:
        """Every text in the arguments is one line of plain text: show_job prints a site's filters with
        them, so an exclude_vars pattern holding ESC and a newline wrote a fake line on an admin's terminal."""
        def check(value: Any) -> None:
            if isinstance(value, str):
                check_one_line(value)
            elif isinstance(value, dict | list):
                for item in value.values() if isinstance(value, dict) else value:
                    check(item)
        for key, value in v.items():
            check_one_line(str(key))
            check(value)
        return v


class ClientJobConfig(_Strict):
    learner: LearnerConfig = Field(description="the class each site runs on its own data")
    filters: list[FilterConfig] = Field(default_factory=list, max_length=16,
                                        description="privacy filters run in order on the update before it leaves "
                                                    "the site")
    keep_updates: bool = Field(False, description="keep each received global and each sent update on the "
                                                "site, within its local/site.yml keep_updates_max_mb")
    task_timeout_s: float = Field(3600.0, gt=0, description="a site gives up on one task (init, train, "
                                                            "validate) after this many seconds, and on building "
                                                            "the learner after this many (at most 300)")


class JobSpec(BaseModel):
    """A validated job: its three configs plus the hash of the zip it came in."""

    meta: JobMeta
    server: ServerJobConfig
    client: ClientJobConfig


def _job_file(name: str) -> str:
    """A file of the job folder the server reads (initial_model, evaluate_models): a plain relative path,
    one line of plain text; its name labels rows of the cross-site report and the console's status."""
    check_one_line(name)
    if not is_plain_path(name):
        raise ValueError(f"{name!r}: give a file of the job folder as a plain relative path (e.g. "
                         "models/base.safetensors)")
    return name


def _parse_yaml(name: str, text: str) -> dict[str, Any]:
    if len(text) > MAX_CONFIG_BYTES:
        raise JobRejected(f"{name}: larger than {MAX_CONFIG_BYTES} bytes; keep settings short and put data in "
                          f"{CUSTOM_DIR}/")
    try:
        data = strict_yaml.load(text, aliases=False)
    except strict_yaml.AliasRefused:
        raise JobRejected(f"{name}: YAML aliases (*name) are not allowed in job configs; write the value out "
                          "instead") from None
    except yaml.YAMLError as e:  # where and what, as provisioning says it for project.yml
        raise JobRejected(f"{name}: not valid YAML {strict_yaml.problem(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise JobRejected(f"{name}: must be a mapping of settings")
    return data


def _validate(name: str, model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = first["loc"]
        # a tagged union (aggregator, algorithm) puts its tag in the path: aggregator.fedavg.server_lr
        where = ".".join(str(p) for i, p in enumerate(loc) if not (i and loc[i - 1] in _TAGGED and p in _TAGS))
        message = first["msg"].removeprefix("Value error, ")
        raise JobRejected(f"{name}: field '{where}': {message}" if where else f"{name}: {message}") from None


def parse_override(text: str) -> tuple[str, list[str], Any]:
    """'server.rounds=5' -> ('server', ['rounds'], 5). Values are read as YAML scalars."""
    try:  # an override is shown with the job, on every admin's console
        check_one_line(text)
    except ValueError as e:
        raise JobRejected(f"override {text[:200]!r}: {e}") from None
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or parts[0] not in ("meta", "server", "client"):
        raise JobRejected(f"override '{text}': use meta.KEY=VALUE, server.KEY=VALUE or client.KEY=VALUE")
    try:
        return parts[0], parts[1:], strict_yaml.load(value, aliases=False)
    except strict_yaml.AliasRefused:
        raise JobRejected(f"override '{text[:200]}': YAML aliases (*name) are not allowed; write the value "
                          "out") from None
    except yaml.YAMLError as e:
        raise JobRejected(f"override '{text}': value is not valid YAML: {str(e).splitlines()[0]}") from None


def _apply(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise JobRejected(f"override: '{part}' is not a mapping")
    node[path[-1]] = value


def load_job_spec(files: dict[str, str], overrides: list[str] | None = None) -> JobSpec:
    """Validate a job's config texts (keyed by file name), with overrides applied first."""
    if len(overrides or []) > MAX_OVERRIDES:
        raise JobRejected(f"{len(overrides or [])} overrides (limit {MAX_OVERRIDES}); put settings in the "
                          "config files instead")
    for text in overrides or []:
        if len(text) > MAX_OVERRIDE_CHARS:
            raise JobRejected(f"override '{text[:60]}...' is longer than {MAX_OVERRIDE_CHARS} characters; put "
                              "it in the config file instead")
    raw = {}
    for section, fname in (("meta", META), ("server", SERVER_CONFIG), ("client", CLIENT_CONFIG)):
        if fname not in files:
            raise JobRejected(f"job folder has no {fname}")
        raw[section] = _parse_yaml(fname, files[fname])
    for text in overrides or []:
        section, path, value = parse_override(text)
        _apply(raw[section], path, value)
    return JobSpec(
        meta=_validate(META, JobMeta, raw["meta"]),
        server=_validate(SERVER_CONFIG, ServerJobConfig, raw["server"]),
        client=_validate(CLIENT_CONFIG, ClientJobConfig, raw["client"]),
    )


def load_job_folder(folder: Path, overrides: list[str] | None = None) -> JobSpec:
    if not folder.is_dir():
        raise JobRejected(f"{folder}: not a job folder")
    files = {n: (folder / n).read_text() for n in (META, SERVER_CONFIG, CLIENT_CONFIG) if (folder / n).is_file()}
    return load_job_spec(files, overrides)


def zip_folder(folder: Path) -> bytes:
    """Zip a job folder deterministically (sorted names, fixed timestamps) so its hash is stable."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if "__pycache__" in rel.parts or path.suffix == ".pyc":
                continue
            if path.is_symlink():  # sent, it would carry what it points to (a key, ~/.ssh) to every site
                raise ConfigError(f"{path}: a symbolic link; a job folder sends its own files only: copy the "
                                  "file in if the job needs it, or remove the link")
            if path.is_dir():
                continue
            if path.exists() and not path.is_file():  # reading a FIFO would wait for ever; a device, the same
                raise ConfigError(f"{path}: not a regular file (a FIFO, socket or device); a job folder holds "
                                  "files and folders only: remove it")
            info = zipfile.ZipInfo(rel.as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    return buf.getvalue()


def read_zip_configs(source: bytes | Path) -> dict[str, str]:
    """The three config texts of a job archive (in memory or a file), each read with a cap of
    MAX_CONFIG_BYTES however large it claims or turns out to be. Raises JobRejected."""
    with open_zip(source) as zf:
        names = set(zf.namelist())
        texts = {}
        for n in (META, SERVER_CONFIG, CLIENT_CONFIG):
            if n not in names:
                continue
            try:
                data = read_member(zf, n, MAX_CONFIG_BYTES)
            except JobRejected:
                raise JobRejected(f"{n}: larger than {MAX_CONFIG_BYTES} bytes decompressed; keep settings short "
                                  f"and put data in {CUSTOM_DIR}/") from None
            try:
                texts[n] = data.decode()
            except UnicodeDecodeError:
                raise JobRejected(f"{n}: not UTF-8 text") from None
        return texts


def read_zip_member(source: bytes | Path, name: str, limit_bytes: int = MAX_MEMBER_BYTES) -> bytes:
    """One file of a job archive, refused past `limit_bytes` decompressed. Raises JobRejected."""
    with open_zip(source) as zf:
        return read_member(zf, name, limit_bytes)


def check_archive(source: bytes | Path) -> None:
    """Refuse (JobRejected) an archive that no site would extract: an unsafe entry (absolute, '..', a link),
    too many files, or sizes past the caps `safe_extract` holds every site to. The server checks at submit,
    so such a job fails there in one line instead of on every site, round after round."""
    with open_zip(source) as zf:
        check_entries(zf, MAX_JOB_FILES, MAX_MEMBER_BYTES, MAX_EXPANDED_BYTES)


def safe_extract(data: bytes, dest: Path, member_limit_bytes: int = MAX_MEMBER_BYTES,
                 total_limit_bytes: int = MAX_EXPANDED_BYTES) -> None:
    """Unzip a job into `dest`, refusing absolute paths, '..', links and zip bombs (every member and the
    total are capped while decompressing, whatever the archive declares)."""
    if len(data) > MAX_JOB_ZIP_BYTES:
        raise JobRejected(f"job archive of {len(data)} bytes exceeds {MAX_JOB_ZIP_BYTES}")
    with open_zip(data) as zf:
        extract_capped(zf, dest, MAX_JOB_FILES, member_limit_bytes, total_limit_bytes)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def spec_to_json(spec: JobSpec) -> str:
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True)
