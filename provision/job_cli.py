"""`fedkit job ...`: commands about a job folder, for researchers, admins and site IT.

    fedkit job templates                          the job templates, one line each
    fedkit job new NAME [--template T]            a new job folder NAME from a template (default: tabular)
    fedkit job check FOLDER [--data DIR] [--json] everything the server and a site would refuse, found here;
                                                  with --data, one train and validate in the site's worker
    fedkit job schema [--out DIR]                 JSON Schema of the three config files (editors use it)
    fedkit job hash FOLDER                        the code hash a site approves in local/job_policy.yml

The hash is computed exactly as the admin console computes it at submit (over the zip it uploads) and as
a site computes it over the archive it receives: runtime.job_code. `job check` exits 1 when it finds a
problem, with one line per problem naming the file, the key and the fix (or one JSON object with --json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from runtime.errors import ConfigError
from runtime.job_code import code_hash_of_zip
from runtime.job_spec import zip_folder

from .job_check import check_job
from .job_schema import SCHEMA_DIR, write_schemas
from .job_templates import DEFAULT_TEMPLATE, list_templates, new_job

job_app = typer.Typer(help="Job folders: start one from a template, check it, its schema, its code hash.",
                      pretty_exceptions_show_locals=False)


@job_app.command("templates")
def templates_cmd() -> None:
    """List the job templates `fedkit job new --template` takes."""
    found = list_templates()
    if not found:
        raise ConfigError("no job templates found (templates/jobs/ is missing from this installation)")
    width = max(map(len, found))
    for name, line in found.items():
        typer.echo(f"{name:<{width}}  {line}")


@job_app.command("new")
def new_cmd(name: Annotated[Path, typer.Argument(help="the new job folder (its name is the job's name)")],
            template: Annotated[str, typer.Option("--template", "-t", help="a template name or its beginning "
                                                  "(see `fedkit job templates`)")] = DEFAULT_TEMPLATE) -> None:
    """Start a job from a template: configs with comments, a README saying what to edit, the schema."""
    job = new_job(name, template)
    typer.echo(f"created {job}: edit custom/ and the three .yml files (see {job / 'README.md'}), then "
               f"`fedkit job check {job} --data DATA_DIR`")


@job_app.command("check")
def check_cmd(folder: Annotated[Path, typer.Argument(help="a job folder")],
              data: Annotated[Path | None, typer.Option("--data", help="a site's data folder: run the learner "
                                                        "once (init, train, validate) on it")] = None,
              set_: Annotated[list[str] | None, typer.Option("--set", help="an override as at submit, e.g. "
                                                             "server.rounds=5")] = None,
              as_json: Annotated[bool, typer.Option("--json", help="one JSON object: {ok, problems}")] = False,
              timeout_s: Annotated[float | None, typer.Option("--timeout-s", help="per step with --data, "
                                                              "and for importing and building the learner "
                                                              "(default: the job's task_timeout_s; 120 s to "
                                                              "import)")] = None,
              ) -> None:
    """Check a job before submitting it; exit 0 when the server and sites would accept it, else 1."""
    report = check_job(folder, data, set_ or [], timeout_s)
    if as_json:
        typer.echo(json.dumps(report.as_json()))
    elif report.ok:
        summary = "configs, learner, filters and workflows"
        if report.ran:
            train = report.ran.get("train", {})
            metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(report.ran.get("validate", {}).items()))
            summary += f"; on {data}: trained on {train.get('n_samples', '-')} samples, validate: {metrics}"
        typer.echo(f"{folder}: ok ({summary})")
    else:
        for problem in report.problems:
            typer.echo(problem.line(), err=True)
    raise typer.Exit(0 if report.ok else 1)


@job_app.command("schema")
def schema_cmd(out: Annotated[Path, typer.Option("--out", help="where to write the three .schema.json "
                                                 "files")] = Path(SCHEMA_DIR)) -> None:
    """Write JSON Schema for meta.yml, config_fed_server.yml and config_fed_client.yml."""
    for path in write_schemas(out):
        typer.echo(str(path))


@job_app.command("hash")
def hash_cmd(folder: Annotated[Path, typer.Argument(help="a job folder (meta.yml, configs, custom/)")]) -> None:
    """Print the job's code hash: every file of the folder by path and content (not __pycache__).

    `--set` overrides at submit are not part of it; show_job lists them next to the hash."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a job folder")
    typer.echo(f"{code_hash_of_zip(zip_folder(folder))}  {folder}")
