"""The `fedkit` command line: the only place errors are caught and turned into one line and an exit code.

    fedkit provision -p project.yml -w WORKSPACE              every kit, into WORKSPACE/<study>/prod_NN
    fedkit provision add-site NAME -p project.yml -w WORKSPACE one more kit (NAME must be in project.yml)
    fedkit provision revoke NAME -p project.yml -w WORKSPACE   add NAME's certificates to the study CRL
    fedkit verify-kit DIR [--ca rootCA.pem] [--ca-fingerprint HEX]  check a kit against its signature
    fedkit job hash FOLDER                                     the code hash sites approve
    fedkit job new NAME | templates | check FOLDER | schema    start, list, check a job; its JSON Schema
    fedkit simulate JOB_FOLDER --sites N --demo-data           try a job on N virtual sites (simulate_cli.py)
    fedkit dashboard --kit ADMIN_KIT [--port 0] [--open]       the study dashboard (runtime/admin/dashboard)

Exit codes: 0 ok; 1 failure (including a kit that does not verify); 2 bad input (project.yml, a config
file, or usage). A traceback is printed only with `fedkit --debug ...`; locals never are, because
commands here hold private keys.
"""

from __future__ import annotations

import datetime as dt
import signal
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from runtime import audit
from runtime.errors import ConfigError, FedkitError, ProjectConfigError
from runtime.kitsig import check_ca_fingerprint, verify_kit

from .job_cli import job_app
from .pipeline import ProvisionResult, add_site, provision
from .project import load_project
from .revoke import revoke
from .state import StudyWorkspace

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


def exit_code_for(error: BaseException) -> int:
    return EXIT_BAD_INPUT if isinstance(error, ProjectConfigError | ConfigError) else EXIT_FAILURE


def one_line(error: BaseException) -> str:
    """The line a person sees: a FedkitError's text, an OS error's file and reason, or a labelled surprise."""
    if isinstance(error, FedkitError):
        return " ".join(str(error).split())
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror}"
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return f"unexpected error: {text} (rerun with --debug for the traceback)"


class _FedkitGroup(TyperGroup):
    """Root command group that maps any error from any command to one stderr line and an exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # typer's own exits and usage errors already carry their message and code
        except Exception as error:
            if ctx.params.get("debug"):
                traceback.print_exc()
            typer.echo(one_line(error), err=True)
            raise typer.Exit(exit_code_for(error)) from None


app = typer.Typer(
    cls=_FedkitGroup,
    name="fedkit",
    help="fedkit: provisioning-first federated learning for multi-institution studies.",
    pretty_exceptions_show_locals=False,
    no_args_is_help=True,
    add_completion=False,
)
provision_app = typer.Typer(
    help="Issue signed startup kits from project.yml; add a site; revoke a participant.",
    pretty_exceptions_show_locals=False,
)
app.add_typer(provision_app, name="provision")
app.add_typer(job_app, name="job")

ProjectOpt = Annotated[Path, typer.Option("--project", "-p", help="the study's project.yml")]
WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", help="folder holding <study>/state and prod_NN")]
SubProjectOpt = Annotated[Path | None, typer.Option("--project", "-p", help="the study's project.yml")]
SubWorkspaceOpt = Annotated[Path | None, typer.Option("--workspace", "-w",
                                                      help="folder holding <study>/state and prod_NN")]
DEFAULT_PROJECT, DEFAULT_WORKSPACE = Path("project.yml"), Path("workspace")


def _study_paths(ctx: typer.Context, project: Path | None, workspace: Path | None) -> tuple[Path, Path]:
    """project.yml and workspace for a `provision` subcommand, given after it or before it (`fedkit provision
    -p X -w Y revoke NAME`, the order the bare command teaches): ignoring those given before it acted on
    ./project.yml and ./workspace, another study's perhaps, and a revoke cannot be undone. Both places with
    different values: refused."""
    chosen = []
    for key, own, default in (("project", project, DEFAULT_PROJECT), ("workspace", workspace, DEFAULT_WORKSPACE)):
        given = ctx.parent.params.get(key) if ctx.parent is not None else None
        before = given if given is not None and Path(given) != default else None  # the default: nothing given
        if own is not None and before is not None and Path(own) != Path(before):
            raise typer.BadParameter(f"--{key} given twice, as {before} and {own}; give it once")
        chosen.append(Path(own or before or default))
    return chosen[0], chosen[1]


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _print_result(result: ProvisionResult) -> None:
    typer.echo(f"study CA: {result.ca_cert_path} ({'created' if result.is_ca_new else 'reused'})")
    typer.echo(f"Study CA fingerprint (SHA-256): {result.ca_fingerprint}")
    typer.echo("  Give it to each site's IT by a channel other than the kit (phone, letter, signed mail): kits pin "
               "it on first start, and site IT compares.")
    typer.echo(f"Certificates valid until {result.kits_not_after:%Y-%m-%d} (the study CA until "
               f"{result.ca_not_after:%Y-%m-%d}): a participant cannot connect after its date; before then "
               "`fedkit provision` again issues every kit anew under this CA.")
    if result.kits_cut_by_ca:  # no kit of this CA can be renewed past its end
        typer.echo(f"  Note: they end with the study CA, sooner than cert_validity_days asks; before "
                   f"{result.ca_not_after:%Y-%m-%d} the study needs a new CA (provision into a new workspace), "
                   "every participant a new kit, and every site the new CA fingerprint.")
    typer.echo(f"kits in {result.prod_dir}:")
    width = max(len(k.name) for k in result.kits)
    for kit in result.kits:
        typer.echo(f"  {kit.kind.value:<6}  {kit.name:<{width}}  {kit.zip_path}")
    typer.echo("Send each participant its own zip over a trusted channel; keep state/ private and backed up.")


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="print tracebacks on errors")] = False,
) -> None:
    """fedkit: provisioning-first federated learning for multi-institution studies."""


ReinstateOpt = Annotated[list[str] | None, typer.Option(
    "--reinstate", metavar="NAME", help="issue a new kit to NAME although its certificates were revoked "
                                        "(a lost or stolen kit replaced); repeat for several")]


@provision_app.callback(invoke_without_command=True)
def provision_cmd(
    ctx: typer.Context,
    project: ProjectOpt = DEFAULT_PROJECT,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    reinstate: ReinstateOpt = None,
) -> None:
    """Issue a signed kit (folder + zip) for every participant into WORKSPACE/<study>/prod_NN.

    A participant whose certificates were all revoked is refused unless named with --reinstate."""
    if ctx.invoked_subcommand is not None:
        return
    result = provision(load_project(project), workspace, _utc_now(), reinstate=reinstate or ())
    _print_result(result)


@provision_app.command("add-site")
def add_site_cmd(
    name: Annotated[str, typer.Argument(help="a client site (or admin) already listed in project.yml")],
    ctx: typer.Context,
    project: SubProjectOpt = None,
    workspace: SubWorkspaceOpt = None,
    reinstate: ReinstateOpt = None,
) -> None:
    """Issue a kit for one new participant into the newest prod_NN under the same CA; others stay untouched.

    Add the site to project.yml first: project.yml stays the one record of who is in the study.
    The server's roster (fed_server.json) is not re-issued; the server trusts any site the CA signed.
    """
    project, workspace = _study_paths(ctx, project, workspace)
    result = add_site(load_project(project), workspace, name, _utc_now(), project_source=str(project),
                      reinstate=reinstate or ())
    _print_result(result)


@provision_app.command("revoke")
def revoke_cmd(
    name: Annotated[str, typer.Argument(help="participant whose certificates to revoke")],
    ctx: typer.Context,
    project: SubProjectOpt = None,
    workspace: SubWorkspaceOpt = None,
) -> None:
    """Revoke every certificate issued to NAME and rewrite the study's CRL."""
    project, workspace = _study_paths(ctx, project, workspace)
    study = load_project(project)
    result = revoke(StudyWorkspace.for_study(workspace, study.name), name, _utc_now())
    if result.newly_revoked:
        typer.echo(f"revoked '{name}': serial(s) {', '.join(result.newly_revoked)}")
    if result.already_revoked:
        typer.echo(f"already revoked: serial(s) {', '.join(result.already_revoked)}")
    typer.echo(f"CRL written to {result.published_crl_path} (and {result.crl_path})")
    typer.echo(
        "Next: send that crl.pem to the server's site IT; they copy it to the server kit's local/crl.pem. "
        "A running server picks it up at the next connection; no restart is needed. Sites and consoles get it "
        "from the server and refuse a server whose own certificate it lists. Never delete local/crl.pem: a server "
        "that has enforced a CRL will not start without one."
    )


@app.command("verify-kit")
def verify_kit_cmd(
    kit_dir: Annotated[Path, typer.Argument(help="an unzipped kit's top folder")],
    ca: Annotated[Path | None, typer.Option("--ca", help="root CA to trust (default: the kit's own)")] = None,
    show_all: Annotated[bool, typer.Option("--all", help="list every file, not only problems")] = False,
    fingerprint: Annotated[str | None, typer.Option(
        "--ca-fingerprint", help="the study CA's SHA-256 fingerprint, as lead IT gave it; the kit's CA must match")
    ] = None,
) -> None:
    """Check every file of a kit against its signature.json: one line per changed, missing or extra file."""
    try:
        ca_pem = ca.read_bytes() if ca is not None else None
    except OSError as e:
        raise ConfigError(f"{ca}: cannot read ({e.strerror})") from None
    report = verify_kit(kit_dir, ca_pem)
    if show_all:
        for check in report.files:
            typer.echo(f"{check.status.value:<8} {check.path}")
    problems = report.problems()
    if fingerprint is not None:
        mismatch = check_ca_fingerprint(kit_dir, fingerprint)
        problems += [mismatch] if mismatch else []
    for line in problems:
        typer.echo(f"{kit_dir}/{line}")
    if problems:
        raise typer.Exit(EXIT_FAILURE)
    typer.echo(f"{kit_dir}: ok ({len(report.files)} files match the CA-signed manifest)")


audit_app = typer.Typer(help="Check audit trails.", pretty_exceptions_show_locals=False)
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify_cmd(
    log: Annotated[Path, typer.Argument(help="an audit.jsonl from a server or site workspace")],
    expect_head: Annotated[str | None, typer.Option(
        "--expect-head", help="a head hash a server or site logged (log.txt): fail unless the log holds that "
                              "record (as record N with --expect-count); records after it are fine",
    )] = None,
    expect_count: Annotated[int | None, typer.Option(
        "--expect-count", min=0, help="the record count logged with that head: fail if records are missing")] = None,
) -> None:
    """Check an audit log's hash chain; names the line where it breaks (exit 1). Prints the head hash and
    record count; with --expect-head/--expect-count, a log cut before an anchor logged earlier, or rewritten
    up to it, fails too (exit 1). A log that grew past the anchor passes."""
    if not log.is_file():
        raise ConfigError(f"{log}: no such audit log")
    report = audit.verify(log)
    audit.check_anchors(log, report, expect_head, expect_count)
    typer.echo(f"{log}: ok ({report.records} records, chain intact, head {report.last_hash})")


@audit_app.command("report")
def audit_report_cmd(
    log: Annotated[Path, typer.Argument(help="a site's workspace/audit.jsonl")],
    job: Annotated[str | None, typer.Option("--job", help="only job ids starting with this")] = None,
    since: Annotated[str | None, typer.Option("--since", help="only records from this UTC date or time on "
                                              "(2026-11-01, 2026-11-01T08:00)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """What a site's audit trail says, job by job: who sent each job, which code ran and in what sandbox,
    what left (updates, bytes, privacy filters, DP spent, error messages), what the site refused. The hash
    chain is checked first (exit 1 where it breaks). A site kit runs the same as startup/audit_report.sh."""
    from runtime import audit_report

    activity = audit_report.summarize(log, job, audit_report.since_date(since) if since else None)
    typer.echo(audit_report.as_json_text(activity) if as_json else audit_report.render(activity))


@app.command("demo")
def demo_cmd(
    workspace: Annotated[
        Path | None, typer.Option("--workspace", help="where to put it (default: a new temp dir)")
    ] = None,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="FedAvg rounds")] = 5,
    keep: Annotated[bool, typer.Option("--keep", help="keep the temporary study folder (it holds private keys)")]
    = False,
    task: Annotated[str, typer.Option("--task", help="tabular (breast-cancer table) or segmentation (MONAI UNet "
                                      "on synthetic images)")] = "tabular",
) -> None:
    """Run the local demo study: provision, start a server and 3 sites from their kits, train, report."""
    from .demo import TASKS, run_demo  # imports scikit-learn; keep it off the other commands' start-up path

    if task not in TASKS:
        raise ConfigError(f"--task {task}: choose one of {', '.join(TASKS)}")
    run_demo(workspace, rounds, keep=keep, task=task)


@app.command("simulate")
def simulate_cmd(
    job_folder: Annotated[Path, typer.Argument(help="a job folder (meta.yml, config_fed_*.yml, custom/)")],
    sites: Annotated[int | None, typer.Option("--sites", help="number of virtual sites (site-1 .. site-N)")] = None,
    data_roots: Annotated[list[Path] | None, typer.Option(
        "--data-roots", help="a site's data folder; repeat, one site per folder (cycled with --sites N)")] = None,
    demo_data: Annotated[bool, typer.Option(
        "--demo-data", help="give the sites the demo study's data splits (cycled beyond three)")] = False,
    out: Annotated[Path, typer.Option("--out", help="results folder (download_job's layout under OUT/simulated)")]
    = Path("simulation"),
    processes: Annotated[int | None, typer.Option(
        "--processes", help="worker processes (default: one per core); 0 runs every site in this process")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="override a config value, as submit_job does: --set server.rounds=2")] = None,
) -> None:
    """Run a job on virtual sites on this machine: the same workflows, learner and filters, no kits."""
    from .simulate_cli import simulate_command  # imports torch in-process only when asked for

    simulate_command(job_folder, sites, data_roots or [], demo_data, out, processes, overrides or [])


@app.command("dashboard")
def dashboard_cmd(
    kit: Annotated[Path, typer.Option("--kit", help="an admin kit (the folder holding startup/fed_admin.json)")],
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="port on 127.0.0.1 (0: a free one)")] = 0,
    open_browser: Annotated[bool, typer.Option("--open", help="open it in the web browser")] = False,
) -> None:
    """Serve the study dashboard on 127.0.0.1 over the admin kit's own mutual-TLS link (docs/dashboard.md)."""
    import asyncio

    from runtime.admin.dashboard.serve import serve  # Starlette and uvicorn load only for the dashboard
    from runtime.procs import private_umask

    private_umask()
    asyncio.run(serve(kit.resolve(), port, open_browser))


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    """Console-script entry point (`fedkit`); errors are already mapped to one line by _FedkitGroup.
    SIGTERM (a `timeout`, a service manager) ends it as Ctrl-C does, through every cleanup on the way out:
    a provision cut short removes its half-written prod_NN, a demo stops the processes it started."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    app(prog_name="fedkit")


if __name__ == "__main__":
    main()
