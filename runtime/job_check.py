"""The static check of a job folder: every problem the server and the sites would find in its configs,
found before the job leaves the researcher's machine, one line each.

It uses the very schemas the server and sites use (runtime.job_spec), but where they stop at the first
error this collects every one it can: each of the three files is validated on its own and all of a file's
validation errors are listed; the filters are built one by one (runtime.filters.build_filters), the
aggregator is built (runtime.aggregators.build_aggregator), each workflow is looked up in
runtime.workflows.WORKFLOWS, and files the configs name (initial_model, evaluate_models, the learner's
and a custom aggregator's module) must exist in the folder. Nothing here imports or runs job code.

The admin console runs this before it uploads a job; `fedkit job check` runs it and then the learner
itself (provision/job_check.py).
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import FedkitError, JobRejected
from .job_spec import (
    _TAGGED,
    _TAGS,
    CLIENT_CONFIG,
    CUSTOM_DIR,
    META,
    SERVER_CONFIG,
    ClientJobConfig,
    JobMeta,
    ServerJobConfig,
    _apply,
    _parse_yaml,
    parse_override,
)

FILES: dict[str, tuple[str, type[BaseModel]]] = {
    "meta": (META, JobMeta), "server": (SERVER_CONFIG, ServerJobConfig), "client": (CLIENT_CONFIG, ClientJobConfig)}
MAX_SHOWN_INPUT_CHARS = 60


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a job: the file, the dotted key in it ('' for the whole file), what to fix."""

    file: str
    key: str
    message: str

    def line(self) -> str:
        return f"{self.file}: {self.key}: {self.message}" if self.key else f"{self.file}: {self.message}"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class StaticResult:
    """The problems found, and the validated configs of the files that passed (None for one that did not)."""

    problems: list[Problem]
    configs: dict[str, Any]


def check_static(folder: Path, overrides: list[str] | None = None) -> StaticResult:
    """Every problem of `folder`'s configs (with `--set` overrides applied) that needs no job code to find."""
    if not folder.is_dir():
        return StaticResult([Problem(str(folder), "", "not a job folder (meta.yml, the two configs, custom/)")], {})
    problems: list[Problem] = []
    raw: dict[str, dict[str, Any] | None] = {}
    for section, (fname, _) in FILES.items():
        path = folder / fname
        if not path.is_file():
            problems.append(Problem(fname, "", f"missing: a job folder needs {fname} (start from `fedkit job new`)"))
            raw[section] = None
            continue
        try:
            raw[section] = _parse_yaml(fname, path.read_text())
        except (JobRejected, UnicodeDecodeError) as e:
            problems.append(Problem(fname, "", str(e).removeprefix(f"{fname}: ")))
            raw[section] = None
    set_by: dict[tuple[str, str], str] = {}  # (section, dotted key) -> the --set that put it there
    for text in overrides or []:
        try:
            section, path_parts, value = parse_override(text)
            if raw[section] is not None:
                _apply(raw[section], path_parts, value)  # type: ignore[arg-type]
                set_by[(section, ".".join(map(str, path_parts)))] = text
        except JobRejected as e:
            problems.append(Problem("--set", "", str(e)))  # its message quotes the override already
    configs: dict[str, Any] = {}
    for section, (fname, model) in FILES.items():
        data = raw[section]
        if data is None:
            configs[section] = None
            continue
        try:
            configs[section] = model.model_validate(data)
        except ValidationError as e:
            configs[section] = None
            for err in e.errors():
                key, message = _describe(model, err)
                # a key an override gave is the override's mistake, not the file's: say which
                source = next((f"{fname} (--set {text})" for (sec, path), text in set_by.items()
                               if sec == section and (key == path or key.startswith(path + "."))), fname)
                problems.append(Problem(source, key, message))
    if configs.get("client") is not None:
        problems.extend(_client_problems(folder, configs["client"]))
    if configs.get("server") is not None:
        problems.extend(_server_problems(folder, configs["server"]))
        if configs.get("meta") is not None:
            problems.extend(_weighting_problems(configs["meta"], configs["server"]))
    return StaticResult(problems, configs)


def _weighting_problems(meta: Any, server: Any) -> list[Problem]:
    """A site the job names but its own `weighting` map leaves out trains every round for nothing: the
    aggregator refuses its update ("no weight for site")."""
    weighting = getattr(server.aggregator, "weighting", None)
    if not isinstance(weighting, dict):
        return []
    if meta.sites == "all":  # every site the study has, or will have: which of them lack a weight is unknown
        return [Problem(SERVER_CONFIG, "aggregator.weighting",
                        "a weight per site needs meta.yml to list the sites (sites: [...]): with 'all', a site "
                        "without a weight would train every round and have its update refused")]
    missing = [site for site in meta.sites if site not in weighting]
    if not missing:
        return []
    return [Problem(SERVER_CONFIG, "aggregator.weighting",
                    f"no weight for {', '.join(missing)}, which meta.yml sites lists: each of its updates would "
                    "be refused; give it a weight or take it out of sites")]


def require_static_ok(folder: Path, overrides: list[str] | None = None) -> None:
    """Raise JobRejected listing every static problem of the job (one line each), else return."""
    problems = check_static(folder, overrides).problems
    if len(problems) == 1:
        raise JobRejected(problems[0].line())
    if problems:  # one line each; a one-line rendering (the console's --json) joins them with '; '
        raise JobRejected(f"job not submitted, {len(problems)} problems (`fedkit job check {folder}` lists them "
                          "too):\n" + ";\n".join(p.line() for p in problems))


def _describe(model: type[BaseModel], err: Any) -> tuple[str, str]:
    """(dotted key, message with its fix) of one pydantic error, the tag of a tagged union left out."""
    loc = err["loc"]
    parts = [str(p) for i, p in enumerate(loc) if not (i and loc[i - 1] in _TAGGED and p in _TAGS)]
    message = err["msg"].removeprefix("Value error, ")
    kind = err["type"]
    if kind == "extra_forbidden":
        known = _known_keys(model, list(loc[:-1]))
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else (f"known keys: {', '.join(known)}" if known else "")
        return ".".join(parts), f"unknown key; {hint}" if hint else "unknown key: remove it"
    if kind == "missing":
        return ".".join(parts), "required: add it"
    shown = err.get("input")
    if kind == "literal_error" and parts[:1] == ["workflows"]:
        return ".".join(parts), f"unknown workflow {shown!r}: use one of {err['ctx']['expected']}"
    if kind not in ("value_error", "assertion_error") and isinstance(shown, str | int | float | bool):
        text = repr(shown)
        message += f" (got {text if len(text) <= MAX_SHOWN_INPUT_CHARS else text[:MAX_SHOWN_INPUT_CHARS] + '...'})"
    return ".".join(parts), message


def _known_keys(model: type[BaseModel], loc: list[Any]) -> list[str]:
    """The keys allowed where an unknown key sits, found by following `loc` through the model's JSON
    schema (a tagged union's member is the one whose `name` is the tag in `loc`)."""
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = defs.get(node["$ref"].rsplit("/", 1)[-1], {})
        return node

    node = schema
    for part in loc:
        node = resolve(node)
        if isinstance(part, int):
            node = node.get("items", {})
        elif part in node.get("properties", {}):
            node = node["properties"][part]
        else:
            options = [resolve(o) for o in node.get("oneOf") or node.get("anyOf") or []]
            node = next((o for o in options if o.get("properties", {}).get("name", {}).get("const") == part), {})
    return sorted(resolve(node).get("properties", {}))


def _client_problems(folder: Path, client: Any) -> list[Problem]:
    from .filters import build_filters  # numpy only; kept out of the console's import path until used

    problems = []
    for i, entry in enumerate(client.filters):
        try:
            build_filters([entry])
        except FedkitError as e:
            problems.append(Problem(CLIENT_CONFIG, f"filters.{i}", str(e).removeprefix(f"{CLIENT_CONFIG}: ")))
    module = client.learner.path.partition(":")[0]
    if not _module_exists(folder, module):
        problems.append(Problem(CLIENT_CONFIG, "learner.path",
                                f"no module '{module}' in {CUSTOM_DIR}/ (looked for {CUSTOM_DIR}/"
                                f"{module.replace('.', '/')}.py): fix the path or add the file"))
    return problems


def _server_problems(folder: Path, server: Any) -> list[Problem]:
    from .aggregators import build_aggregator
    from .workflows import WORKFLOWS

    problems = []
    for i, name in enumerate(server.workflows):
        if name not in WORKFLOWS:
            problems.append(Problem(SERVER_CONFIG, f"workflows.{i}",
                                    f"unknown workflow '{name}' (known: {', '.join(WORKFLOWS)})"))
    if server.aggregator.name == "custom":
        module = server.aggregator.path.partition(":")[0]
        if not _module_exists(folder, module):
            problems.append(Problem(SERVER_CONFIG, "aggregator.path",
                                    f"no module '{module}' in {CUSTOM_DIR}/: fix the path or add the file"))
    else:
        try:
            build_aggregator(server.aggregator)
        except (FedkitError, ValueError) as e:
            problems.append(Problem(SERVER_CONFIG, "aggregator", str(e)))
    named = ([("initial_model", server.initial_model)] if server.initial_model else []) + \
        [(f"evaluate_models.{i}", f) for i, f in enumerate(server.evaluate_models)]
    for key, name in named:
        path = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute() or not path.is_file():
            problems.append(Problem(SERVER_CONFIG, key, f"no file '{name}' in the job folder: give a path inside "
                                                        "it, or remove the key"))
        elif why := _not_a_model(path):  # it failed only when the job started, naming neither file nor key
            problems.append(Problem(SERVER_CONFIG, key, f"'{name}' is not a usable model: {why}"))
    return problems


def _not_a_model(path: Path) -> str:
    """Why the safetensors file at `path` cannot be a job's model ("" when it can): its header and offsets
    (the values are the server's to check when the job starts: a model may be gigabytes)."""
    from .weights import check_file

    try:
        check_file(path, values=False)
    except FedkitError as e:
        return str(e).removeprefix(f"{path}: ")
    return ""


def _module_exists(folder: Path, module: str) -> bool:
    """Whether the worker could find `module` (it puts custom/ and the job folder on sys.path)."""
    rel = Path(*module.split("."))
    return any((base / rel).with_suffix(".py").is_file() or (base / rel / "__init__.py").is_file()
               for base in (folder / CUSTOM_DIR, folder))


__all__ = ["Problem", "StaticResult", "check_static", "require_static_ok"]
