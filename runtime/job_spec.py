"""A job folder and its three config files, validated at the edge.

    my-job/
      meta.yml               name, sites, min_clients
      config_fed_server.yml  workflow settings: rounds, deadlines, aggregation, key metric
      config_fed_client.yml  learner class and arguments, privacy filters
      custom/                the learner's Python code (put on sys.path in the training worker)

`--set key=value` overrides address these files as `server.rounds=5`, `client.learner.args.lr=0.1`,
`meta.min_clients=2`. Errors name the file and the field.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import JobRejected

META = "meta.yml"
SERVER_CONFIG = "config_fed_server.yml"
CLIENT_CONFIG = "config_fed_client.yml"
CUSTOM_DIR = "custom"
MAX_JOB_ZIP_BYTES = 256 << 20
MAX_JOB_FILES = 10_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobMeta(_Strict):
    name: str = Field(min_length=1, max_length=128)
    description: str = ""
    sites: list[str] | Literal["all"] = "all"
    min_clients: int = Field(1, ge=1)


class KeyMetric(_Strict):
    name: str = "accuracy"
    higher_is_better: bool = True


class AggregatorConfig(_Strict):
    name: Literal["fedavg"] = "fedavg"
    server_lr: float = Field(1.0, gt=0)
    server_momentum: float = Field(0.0, ge=0, lt=1)


class ServerJobConfig(_Strict):
    workflow: Literal["fedavg"] = "fedavg"
    rounds: int = Field(ge=1, le=100_000)
    round_timeout_s: float = Field(600.0, gt=0)
    aggregator: AggregatorConfig = AggregatorConfig()
    key_metric: KeyMetric = KeyMetric()
    initial_model: str | None = Field(None, description="safetensors file in the job folder; else a site makes it")
    cross_site_validation: bool = Field(False, description="after training, score every site's model, the global "
                                                           "and the best model on every site's data")
    max_n_samples: int = Field(10**9, ge=1, description="an update claiming more samples is refused")


class LearnerConfig(_Strict):
    path: str = Field(description="'module:Class' inside custom/, e.g. 'learner:TabularLearner'")
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("path")
    @classmethod
    def _module_and_class(cls, v: str) -> str:
        module, _, klass = v.partition(":")
        if not module or not klass:
            raise ValueError("must look like 'module:Class'")
        return v


class FilterConfig(_Strict):
    name: str
    args: dict[str, Any] = Field(default_factory=dict)


class ClientJobConfig(_Strict):
    learner: LearnerConfig
    filters: list[FilterConfig] = Field(default_factory=list)
    keep_updates: bool = Field(False, description="keep each received global and each sent update on the site")
    task_timeout_s: float = Field(3600.0, gt=0)


class JobSpec(BaseModel):
    """A validated job: its three configs plus the hash of the zip it came in."""

    meta: JobMeta
    server: ServerJobConfig
    client: ClientJobConfig


def _parse_yaml(name: str, text: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise JobRejected(f"{name}: not valid YAML: {str(e).splitlines()[0]}") from None
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
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise JobRejected(f"{name}: field '{where}': {first['msg']}") from None


def parse_override(text: str) -> tuple[str, list[str], Any]:
    """'server.rounds=5' -> ('server', ['rounds'], 5). Values are read as YAML scalars."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or parts[0] not in ("meta", "server", "client"):
        raise JobRejected(f"override '{text}': use meta.KEY=VALUE, server.KEY=VALUE or client.KEY=VALUE")
    try:
        return parts[0], parts[1:], yaml.safe_load(value)
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
            if path.is_dir() or "__pycache__" in rel.parts or path.suffix == ".pyc":
                continue
            info = zipfile.ZipInfo(rel.as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    return buf.getvalue()


def read_zip_configs(data: bytes) -> dict[str, str]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = set(zf.namelist())
        return {n: zf.read(n).decode() for n in (META, SERVER_CONFIG, CLIENT_CONFIG) if n in names}


def read_zip_member(data: bytes, name: str) -> bytes:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return zf.read(name)
    except KeyError:
        raise JobRejected(f"job folder has no file '{name}'") from None


def safe_extract(data: bytes, dest: Path) -> None:
    """Unzip a job into `dest`, refusing absolute paths, '..', links and zip bombs."""
    if len(data) > MAX_JOB_ZIP_BYTES:
        raise JobRejected(f"job archive of {len(data)} bytes exceeds {MAX_JOB_ZIP_BYTES}")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise JobRejected("job archive is not a valid zip") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_JOB_FILES:
            raise JobRejected(f"job archive holds {len(infos)} files (limit {MAX_JOB_FILES})")
        if sum(i.file_size for i in infos) > 4 * MAX_JOB_ZIP_BYTES:
            raise JobRejected("job archive expands too large")
        for info in infos:
            p = PurePosixPath(info.filename)
            if p.is_absolute() or ".." in p.parts or (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise JobRejected(f"job archive entry '{info.filename}' is unsafe")
        dest.mkdir(parents=True, exist_ok=True)
        zf.extractall(dest)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def spec_to_json(spec: JobSpec) -> str:
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True)
