"""`fedkit job new / templates / check / schema`: a researcher starts from a template, learns of every
mistake from one line on their own machine (never a traceback, never a federation round trip), and the
console refuses the same config mistakes before it uploads anything."""

from __future__ import annotations

import asyncio
import importlib
import io
import json
import os
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from provision.cli import app
from provision.job_schema import MODELS, SCHEMA_DIR, schema_comment, schema_file, schema_for
from provision.job_templates import list_templates
from runtime.admin.console import AdminConsole
from runtime.errors import JobRejected

# each template's sample-data writer: (module, function) taking (dest, sites) and returning .site_dirs
SAMPLE_DATA = {"tabular_classifier": ("provision.demo_data", "write_demo_data"),
               "segmentation": ("provision.demo_segmentation", "write_segmentation_data")}


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, ["job", *args])


def _new(tmp_path: Path, name: str = "study-job", template: str = "tabular") -> Path:
    result = _cli("new", str(tmp_path / name), "--template", template)
    assert result.exit_code == 0, result.output
    return tmp_path / name


def _sample_data(template: str, dest: Path) -> Path:
    assert template in SAMPLE_DATA, f"template {template}: add its sample-data writer to SAMPLE_DATA"
    module, function = SAMPLE_DATA[template]
    return getattr(importlib.import_module(module), function)(dest, ["site-1"]).site_dirs["site-1"]


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_templates_lists_every_template_folder_with_one_line() -> None:
    result = _cli("templates")
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(list_templates())
    assert "tabular_classifier" in list_templates() and all(len(line.split()) > 1 for line in lines)
    # a README's first sentence, its wrapped lines joined: the first line alone ended mid-sentence
    assert all(text.endswith(".") for text in list_templates().values()), list_templates()


def test_new_names_the_job_and_gives_it_the_schema(tmp_path: Path) -> None:
    job = _new(tmp_path, "my-trial")
    assert yaml.safe_load((job / "meta.yml").read_text())["name"] == "my-trial"
    assert (job / "README.md").is_file()
    for name in MODELS:
        assert (job / name).read_text().splitlines()[0] == schema_comment(name)
        assert json.loads((job / SCHEMA_DIR / schema_file(name)).read_text()) == schema_for(name)
    again = _cli("new", str(job))
    assert again.exit_code == 2 and again.stderr.strip() == f"{job}: already exists; choose another name or remove it"
    unknown = _cli("new", str(tmp_path / "other"), "--template", "nope")
    assert unknown.exit_code == 2 and "--template nope: is not a template" in unknown.stderr
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("template", list(list_templates()))
def test_each_template_from_job_new_passes_check_with_data(tmp_path: Path, template: str) -> None:
    job = _new(tmp_path, "job", template)
    data = _sample_data(template, tmp_path / "data")
    result = _cli("check", str(job), "--data", str(data), "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["ok"] and report["problems"] == [], result.output
    assert report["ran"]["train"]["n_samples"] > 0 and report["ran"]["validate"]


# ---- one line per mistake -----------------------------------------------------------------------------

STATIC_CASES = {
    "misspelled key": ("config_fed_server.yml", "rounds: 5", "roundz: 5",
                       "config_fed_server.yml: roundz: unknown key; did you mean 'rounds'?"),
    "wrong type": ("config_fed_server.yml", "rounds: 5", "rounds: five",
                   "config_fed_server.yml: rounds: Input should be a valid integer"),
    "unknown filter": ("config_fed_client.yml", "filters: []", "filters: [{name: blur}]",
                       "config_fed_client.yml: filters.0: unknown filter 'blur' (known: exclude_vars"),
    "unknown workflow": ("config_fed_server.yml", "workflows: [fedavg]", "workflows: [fedavg, federated_magic]",
                         "config_fed_server.yml: workflows.1: unknown workflow 'federated_magic': use one of"),
    "learner module missing": ("config_fed_client.yml", "learner:TabularLearner", "lerner:TabularLearner",
                               "config_fed_client.yml: learner.path: no module 'lerner' in custom/"),
    # a listed site the job's own weights leave out trained every round for nothing (its update refused)
    "site without a weight": ("config_fed_server.yml", "server_lr: 1.0", "weighting: {site-1: 2.0, site-2: 1.0}",
                              "config_fed_server.yml: aggregator.weighting: no weight for site-3, which meta.yml "
                              "sites lists", {"meta.yml": ("sites: all", "sites: [site-1, site-2, site-3]")}),
    "weights for sites: all": ("config_fed_server.yml", "server_lr: 1.0", "weighting: {site-1: 2.0}",
                               "config_fed_server.yml: aggregator.weighting: a weight per site needs meta.yml to "
                               "list the sites", {}),  # (no other edit: its meta.yml says sites: all)
    # not a safetensors file: the job failed only when it started, in words naming neither file nor key
    "initial model not a model": ("config_fed_server.yml", "rounds: 5", "rounds: 5\ninitial_model: start.safetensors",
                                  "config_fed_server.yml: initial_model: 'start.safetensors' is not a usable model: "
                                  "not a valid safetensors file", {"start.safetensors": (None, "garbage\n")}),
}


def _make_mistake(job: Path, case: str) -> tuple[str, str, str, str]:
    """Apply STATIC_CASES[case] to `job` (and its other edits: a file's (old, new), or (None, content) for a
    new file); returns (file, old, new, expected)."""
    file, old, new, expected, *more = STATIC_CASES[case]
    for other, (was, now) in (more[0] if more else {}).items():
        if was is None:
            (job / other).write_text(now)
        else:
            _edit(job / other, was, now)
    _edit(job / file, old, new)
    return file, old, new, expected


@pytest.mark.parametrize("case", list(STATIC_CASES))
def test_each_config_mistake_gets_its_one_line(tmp_path: Path, case: str) -> None:
    job = _new(tmp_path)
    file, old, new, expected = _make_mistake(job, case)
    result = _cli("check", str(job))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr


def test_check_json_is_one_object_for_scripts(tmp_path: Path) -> None:
    job = _new(tmp_path)
    _edit(job / "config_fed_server.yml", "workflows: [fedavg]", "workflows: [fedavgg]")
    result = _cli("check", str(job), "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {"ok": False, "problems": [{
        "file": "config_fed_server.yml", "key": "workflows.0",
        "message": "unknown workflow 'fedavgg': use one of 'fedavg', 'evaluate' or 'cross_site'"}]}


@pytest.mark.parametrize("case", list(STATIC_CASES))
def test_the_console_refuses_each_config_mistake_before_uploading(tmp_path: Path, case: str) -> None:
    job = _new(tmp_path)
    file, old, new, expected = _make_mistake(job, case)
    client = _RecordingClient()
    console = AdminConsole(client, Console(file=io.StringIO(), markup=False))  # type: ignore[arg-type]
    with pytest.raises(JobRejected) as refused:
        asyncio.run(console.run_line(f"submit_job {job}"))
    assert expected in str(refused.value) and client.uploads == []
    _edit(job / file, new, old)
    asyncio.run(console.run_line(f"submit_job {job}"))
    assert client.uploads == [job]


def test_every_mistake_of_a_job_is_listed_at_once(tmp_path: Path) -> None:
    job = _new(tmp_path)
    _edit(job / "config_fed_server.yml", "rounds: 5", "roundz: 5")
    _edit(job / "config_fed_server.yml", "server_lr: 1.0", "server_lr: fast")
    _edit(job / "config_fed_client.yml", "filters: []", "filters: [{name: blur}, {name: percentile, args: {x: 1}}]")
    _edit(job / "meta.yml", "min_clients: 2", "min_clients: 0")
    result = _cli("check", str(job))
    assert result.exit_code == 1 and "Traceback" not in result.output
    keys = sorted(line.split(": ")[1] for line in result.stderr.strip().splitlines())
    assert keys == ["aggregator.server_lr", "filters.0", "filters.1", "min_clients", "roundz"], result.stderr


LEARNER_CASES = {
    "does not import": ("import a_package_nobody_installed\n",
                        "config_fed_client.yml: learner.path: 'broken' does not import: ModuleNotFoundError: "
                        "No module named 'a_package_nobody_installed'"),
    "missing validate": (textwrap.dedent("""
        from runtime.learner import Learner, TrainResult

        class Broken(Learner):
            def train(self, weights, round):
                return TrainResult(weights, 1)
        """), "config_fed_client.yml: learner.path: broken:Broken has no validate(weights) method"),
    "not a learner": ("class Broken:\n    pass\n",
                      "config_fed_client.yml: learner.path: broken:Broken is not a subclass of "
                      "runtime.learner.Learner"),
}


def _refused_in_one_line(result: Any, expected: str) -> None:
    """`job check` failed (exit 1) with one line starting with `expected`, never a traceback."""
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr


@pytest.mark.parametrize("case", list(LEARNER_CASES))
def test_a_broken_learner_gets_its_one_line(tmp_path: Path, case: str) -> None:
    code, expected = LEARNER_CASES[case]
    job = _new(tmp_path)
    (job / "custom" / "broken.py").write_text(code)
    _edit(job / "config_fed_client.yml", "learner:TabularLearner", "broken:Broken")
    _edit(job / "config_fed_client.yml", "    lr: 0.05\n    epochs: 2\n    batch_size: 32\n    hidden: 16\n"
          "    seed: 0\n", "    {}\n")
    _refused_in_one_line(_cli("check", str(job)), expected)


AGGREGATOR_CASES = {  # what the server said only when the job started, after it was queued and waited
    "misspelt arg": ("{name: custom, path: 'half_step:HalfStep', args: {factr: 0.5}}",
                     "config_fed_server.yml: aggregator: custom aggregator 'half_step:HalfStep': "
                     "HalfStep(**aggregator.args) failed: TypeError:"),
    "no such class": ("{name: custom, path: 'half_step:HalfSteps', args: {}}",
                      "config_fed_server.yml: aggregator: custom aggregator 'half_step:HalfSteps': half_step.py "
                      "defines no class HalfSteps"),
    "raises on import": ("{name: custom, path: 'raising_agg:Agg', args: {}}",
                         "config_fed_server.yml: aggregator: custom aggregator 'raising_agg:Agg': importing "
                         "raising_agg.py failed: RuntimeError: no GPU here"),
}


@pytest.mark.parametrize("case", list(AGGREGATOR_CASES))
def test_a_custom_aggregator_the_server_would_refuse_gets_its_one_line(tmp_path: Path, case: str) -> None:
    from tests.runtime.server.test_job_intake import CUSTOM_AGGREGATOR

    setting, expected = AGGREGATOR_CASES[case]
    job = _new(tmp_path)
    (job / "custom" / "half_step.py").write_text(CUSTOM_AGGREGATOR)
    (job / "custom" / "raising_agg.py").write_text("raise RuntimeError('no GPU here')\n")
    ok = _cli("check", str(job), "--set", "server.aggregator={name: custom, path: 'half_step:HalfStep', "
                                          "args: {factor: 0.5}}")
    assert ok.exit_code == 0, ok.output
    _refused_in_one_line(_cli("check", str(job), "--set", f"server.aggregator={setting}"), expected)


def test_a_learner_raising_in_train_is_caught_by_the_run_on_data(tmp_path: Path) -> None:
    job = _new(tmp_path)
    (job / "custom" / "raising.py").write_text(textwrap.dedent("""
        from learner import TabularLearner

        class Raising(TabularLearner):
            def train(self, weights, round):
                raise RuntimeError("the batch has no rows")
        """))
    _edit(job / "config_fed_client.yml", "learner:TabularLearner", "raising:Raising")
    assert _cli("check", str(job)).exit_code == 0  # nothing static is wrong: only running it shows the fault
    data = _sample_data("tabular_classifier", tmp_path / "data")
    result = _cli("check", str(job), "--data", str(data))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [
        "config_fed_client.yml: learner: train failed: RuntimeError: the batch has no rows"]


def test_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    result = _cli("check", str(tmp_path / "nope"))
    assert result.exit_code == 1
    assert result.stderr.strip() == f"{tmp_path / 'nope'}: not a job folder (meta.yml, the two configs, custom/)"


# ---- the JSON Schema --------------------------------------------------------------------------------

def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = schema_for(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("template", list(list_templates()))
def test_the_schema_accepts_every_template(tmp_path: Path, template: str) -> None:
    job = _new(tmp_path, "job", template)
    for name in MODELS:
        errors = list(_validator(name).iter_errors(yaml.safe_load((job / name).read_text())))
        assert errors == [], f"{template}/{name}: {errors[0].message if errors else ''}"


# a file's schema sees that file only: not the code, another file, or the model a key names
@pytest.mark.parametrize("case", [c for c, v in STATIC_CASES.items() if c != "learner module missing" and len(v) == 4])
def test_the_schema_rejects_each_config_mistake(tmp_path: Path, case: str) -> None:
    file, old, new, _ = STATIC_CASES[case]
    job = _new(tmp_path)
    _edit(job / file, old, new)
    assert not _validator(file).is_valid(yaml.safe_load((job / file).read_text()))


def test_schema_command_writes_the_three_files(tmp_path: Path) -> None:
    result = _cli("schema", "--out", str(tmp_path / "s"))
    assert result.exit_code == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(schema_file(n) for n in MODELS)


class _RecordingClient:
    """The admin client's submit_job, recording what would be uploaded (the console is what is tested)."""

    def __init__(self) -> None:
        self.uploads: list[Path] = []

    async def submit_job(self, folder: Path, overrides: list[str], progress: Any,
                         initial_model: Path | None = None) -> dict[str, Any]:
        self.uploads.append(folder)
        return {"job_id": "j1", "name": folder.name, "state": "submitted", "code_hash": "0" * 64}


def test_a_learner_hanging_while_it_is_built_is_bounded_by_the_timeout_given(tmp_path: Path) -> None:
    # --timeout-s bounded each step only: a learner hanging in its constructor (which runs only with --data,
    # in the worker) waited the worker start's 300 s whatever was given
    job = _new(tmp_path)
    (job / "custom" / "hanging.py").write_text(textwrap.dedent("""
        import time
        from learner import TabularLearner

        class Hanging(TabularLearner):
            def __init__(self, context, **args):
                time.sleep(3600)
        """))
    _edit(job / "config_fed_client.yml", "learner:TabularLearner", "hanging:Hanging")
    assert _cli("check", str(job)).exit_code == 0  # without data the class is imported and checked, not built
    data = _sample_data("tabular_classifier", tmp_path / "data")
    result = _cli("check", str(job), "--data", str(data), "--timeout-s", "30")
    _refused_in_one_line(result, "config_fed_client.yml: learner: training worker gave no answer within 30 s "
                                 "while starting (importing hanging:Hanging, building the learner")


def test_a_module_hanging_when_imported_is_bounded_by_the_timeout_given(tmp_path: Path) -> None:
    job = _new(tmp_path)
    (job / "custom" / "hanging.py").write_text("import time\ntime.sleep(3600)\n")
    _edit(job / "config_fed_client.yml", "learner:TabularLearner", "hanging:Hanging")
    result = _cli("check", str(job), "--timeout-s", "20")
    _refused_in_one_line(result, "config_fed_client.yml: learner.path: importing hanging:Hanging did not finish "
                                 "within 20 s: does the module run long work when imported")


@pytest.mark.parametrize(("body", "said"), [
    ("r = super().train(weights, round)\n"
     "                k = next(iter(r.weights))\n"
     "                r.weights[k] = r.weights[k] * float('nan')\n"
     "                return r", "holds NaN or Inf"),
    ("return dataclasses.replace(super().train(weights, round), n_samples=0)", "n_samples must be a positive"),
    ("return dataclasses.replace(super().train(weights, round), n_samples=10**10)",
     "exceeds the job's max_n_samples"),
], ids=["nan-weights", "no-samples", "too-many-samples"])
def test_a_train_result_the_server_would_refuse_fails_the_check(tmp_path: Path, body: str, said: str) -> None:
    # each passed `job check --data` and then failed every round of the study
    job = _new(tmp_path)
    (job / "custom" / "odd.py").write_text(textwrap.dedent(f"""
        import dataclasses
        from learner import TabularLearner

        class Odd(TabularLearner):
            def train(self, weights, round):
                {body}
        """))
    _edit(job / "config_fed_client.yml", "learner:TabularLearner", "odd:Odd")
    data = _sample_data("tabular_classifier", tmp_path / "data")
    result = _cli("check", str(job), "--data", str(data))
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("config_fed_client.yml: learner: train") and said in line, line


def test_what_submit_would_refuse_in_the_folder_fails_the_check(tmp_path: Path, monkeypatch) -> None:
    # a link (it would carry what it points to) and an archive past the server's cap passed `job check`
    # and were refused only at submit_job
    import provision.job_check as job_check

    job = _new(tmp_path)
    secret = tmp_path / "client.key"
    secret.write_text("KEY")
    (job / "custom" / "key.pem").symlink_to(secret)
    result = _cli("check", str(job))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "study-job: custom/key.pem: a symbolic link; a job folder sends its own files only: copy the file in if "
        "the job needs it, or remove the link"]
    (job / "custom" / "key.pem").unlink()
    (job / "custom" / "weights.bin").write_bytes(os.urandom(3 << 20))
    monkeypatch.setattr(job_check, "MAX_JOB_ZIP_BYTES", 2 << 20)
    result = _cli("check", str(job))
    assert result.exit_code == 1 and "zips to 3 MiB, more than the 2 MiB a server takes" in result.stderr


@pytest.mark.parametrize("workflows", ["[fedavg]", "[fedavg, cross_site]"])
def test_a_wrong_key_metric_is_the_server_configs_whatever_the_workflows(tmp_path: Path, workflows: str) -> None:
    # with cross_site, train validates the trained model with the key metric too, and the check blamed the
    # learner's train in config_fed_client.yml
    job = _new(tmp_path)
    _edit(job / "config_fed_server.yml", "workflows: [fedavg]", f"workflows: {workflows}")
    text = (job / "config_fed_server.yml").read_text()
    (job / "config_fed_server.yml").write_text(text.replace("name: auc", "name: AUC", 1))
    data = _sample_data("tabular_classifier", tmp_path / "data")
    result = _cli("check", str(job), "--data", str(data))
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("config_fed_server.yml: key_metric.name: 'AUC' is not among the metrics validate() "
                           "returned"), line
