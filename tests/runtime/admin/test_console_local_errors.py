"""fl_admin.sh's entry point (`python -m runtime.admin`) on input a person gets wrong locally: an unclosed quote,
a download destination that cannot take the results, a file that is missing or cannot be read. Each is one
line on stderr with exit 1 (2 only for a line that does not parse), one JSON object with --json, nothing left
on disk, and the interactive console stays open. The server is a stub: these fail before or without it."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import runtime.admin.__main__ as admin_main
from runtime.admin.client import AdminClient
from runtime.errors import PermissionDenied
from runtime.proto import fedkit_pb2 as pb
from tests.conftest import JOB_TEMPLATE

JOB_ID = "20260101-000000-abcdef"


class _Stub:
    """The admin service: answers Command from `replies`, records every call; Download and Upload are refused
    (the server's own refusal, as call_errors would raise it)."""

    def __init__(self, replies: dict[str, Any]):
        self.replies = replies
        self.calls: list[str] = []

    async def Command(self, request: pb.AdminRequest, timeout: float) -> pb.AdminReply:
        self.calls.append(request.command)
        return pb.AdminReply(ok=True, data_json=json.dumps(self.replies[request.command]))

    def Download(self, request: pb.AdminRequest, timeout: float) -> AsyncIterator[pb.DataChunk]:
        self.calls.append("Download")

        async def refused() -> AsyncIterator[pb.DataChunk]:
            raise PermissionDenied("download_job: denied: role 'member' may not run 'download_job'")
            yield  # an async generator

        return refused()

    async def Upload(self, chunks: AsyncIterator[pb.UploadChunk], timeout: float) -> pb.AdminReply:
        self.calls.append("Upload")
        return pb.AdminReply(ok=False, message="not in these tests")


class _Client(AdminClient):
    """The real AdminClient (its local checks, its files) talking to _Stub instead of a server."""

    def __init__(self, stub: _Stub):
        self.config = SimpleNamespace(name="lead@study.org", project="study", role="lead", server_host="localhost",
                                      admin_port=8003)
        self._kit, self._target, self._channel, self._stub = Path("kit"), "localhost:8003", None, stub

    async def __aenter__(self) -> AdminClient:
        return self


@pytest.fixture
def console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., Any]:
    """Runs `main` as fl_admin.sh would, in tmp_path (with HOME there too, for the history file); returns
    (exit code, stdout, stderr, the server calls made)."""
    stub = _Stub({"show_job": {"output_bytes": 0}, "list_jobs": []})
    monkeypatch.setattr(admin_main, "AdminClient", lambda kit: _Client(stub))
    monkeypatch.setattr(admin_main, "private_umask", lambda: None)  # not this test process's umask
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)

    def run(*args: str, stdin: str | None = None) -> tuple[int, str, str, list[str]]:
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        code = admin_main.main(["--kit", "kit", *args])
        out, err = capsys.readouterr()
        return code, out, err, stub.calls

    return run


def _one_line(err: str) -> str:
    assert err.startswith("fl_admin: ") and err.count("\n") == 1 and err.endswith("\n"), err
    return err.removeprefix("fl_admin: ").rstrip("\n")


def _files(root: Path) -> set[Path]:
    return set(root.rglob("*"))


@pytest.mark.parametrize("line", ['submit_job "my job', "download_job J dr.o'brien", "tail_log server \\"])
def test_a_line_that_does_not_parse_exits_2_in_one_line(console: Callable[..., Any], line: str) -> None:
    code, out, err, calls = console("-c", line)
    assert code == 2 and out == ""
    assert "does not parse" in _one_line(err)
    assert calls == []


def test_a_line_that_does_not_parse_is_one_json_object_with_json(console: Callable[..., Any]) -> None:
    code, out, err, _ = console("-c", 'submit_job "my job', "--json")
    assert code == 2
    assert json.loads(out) == {"error": _one_line(err), "exit_code": 2}
    assert "no closing quotation" in json.loads(out)["error"]


@pytest.mark.parametrize("line", ["", "   "])
def test_an_empty_command_is_a_usage_error_not_the_interactive_console(console: Callable[..., Any],
                                                                       line: str) -> None:
    """`fl_admin.sh -c "$CMD" --json` with CMD unset: the script gets one JSON object, not silence and 0."""
    code, out, err, calls = console("-c", line, "--json", stdin="check_status server\n")
    assert code == 2 and "-c needs a command" in _one_line(err)
    assert json.loads(out) == {"error": _one_line(err), "exit_code": 2} and calls == []


@pytest.mark.parametrize("line", ["tail_log server nan", "show_audit inf", "wait_job J nan", "wait_job J -5"])
def test_a_number_that_is_not_finite_is_a_usage_error(console: Callable[..., Any], line: str) -> None:
    code, out, err, calls = console("-c", line, "--json")
    assert code == 2 and json.loads(out) == {"error": _one_line(err), "exit_code": 2}
    assert "must be a number" in _one_line(err) and calls == []


@pytest.mark.parametrize("dest,reason", [
    ("afile", "cannot write results to afile: it is a file, not a folder"),
    ("afile/sub", "cannot write results to afile/sub: not a directory"),
    ("/proc/nope", "cannot write results to /proc/nope: no such file or directory"),
])
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_download_into_a_destination_that_cannot_be_written_fails_in_one_line(
        console: Callable[..., Any], tmp_path: Path, dest: str, reason: str, as_json: bool) -> None:
    (tmp_path / "afile").write_text("mine")
    before = _files(tmp_path)

    code, out, err, calls = console("-c", f"download_job {JOB_ID} {dest}", *(["--json"] if as_json else []))

    assert code == 1 and _one_line(err) == reason
    assert json.loads(out) == {"error": reason, "exit_code": 1} if as_json else out == ""
    assert "Download" not in calls, "nothing is asked of the server for a download that has nowhere to go"
    assert _files(tmp_path) == before and (tmp_path / "afile").read_text() == "mine"


def test_a_refused_download_removes_every_folder_it_made(console: Callable[..., Any], tmp_path: Path) -> None:
    code, out, err, calls = console("-c", f"download_job {JOB_ID} new/results", "--json")
    assert code == 1 and json.loads(out)["exit_code"] == 1 and "denied" in _one_line(err)
    assert "Download" in calls
    assert not (tmp_path / "new").exists(), "a refused download left the folder it made for it"


def test_a_missing_initial_model_is_a_failure_not_a_parse_error(console: Callable[..., Any], tmp_path: Path) -> None:
    shutil.copytree(JOB_TEMPLATE, tmp_path / "my-job")
    code, out, err, calls = console("-c", "submit_job my-job --initial-model nosuch.safetensors", "--json")
    assert code == 1
    assert json.loads(out) == {"error": _one_line(err), "exit_code": 1}
    assert "nosuch.safetensors: no such file" in _one_line(err) and calls == []


def test_a_job_folder_with_a_link_fails_in_one_line(console: Callable[..., Any], tmp_path: Path) -> None:
    shutil.copytree(JOB_TEMPLATE, tmp_path / "my-job")
    (tmp_path / "my-job" / "custom" / "data.csv").symlink_to(tmp_path / "gone.csv")  # a dangling link
    code, out, err, calls = console("-c", "submit_job my-job", "--json")
    assert code == 1
    assert json.loads(out) == {"error": _one_line(err), "exit_code": 1}
    assert _one_line(err) == ("my-job/custom/data.csv: a symbolic link; a job folder sends its own files only: "
                              "copy the file in if the job needs it, or remove the link")
    assert calls == []


def test_the_interactive_console_stays_open_after_such_errors(console: Callable[..., Any], tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("mine")
    lines = [f"download_job {JOB_ID} dr.o'brien", f"download_job {JOB_ID} afile", "tail_log server nan",
             "list_jobs", "bye"]

    code, out, err, calls = console(stdin="\n".join(lines) + "\n")

    assert code == 0
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3 and "does not parse" in errors[0], err
    assert errors[1] == "error: cannot write results to afile: it is a file, not a folder"
    assert "Traceback" not in err
    assert "no jobs yet" in out and calls[-1] == "list_jobs", "the line after the errors ran"


def test_the_interactive_console_with_json_answers_every_line_on_stdout(console: Callable[..., Any],
                                                                        tmp_path: Path) -> None:
    """A script feeding lines to `fl_admin.sh --json` reads one JSON value per line, a failed one included."""
    (tmp_path / "afile").write_text("mine")
    lines = [f"download_job {JOB_ID} afile", "tail_log server nan", "list_jobs", "bye"]

    code, out, err, calls = console("--json", stdin="\n".join(lines) + "\n")

    assert code == 0
    answers = [json.loads(line) for line in out.splitlines()]  # no prompt, no banner: JSON only
    assert answers[:2] == [{"error": "cannot write results to afile: it is a file, not a folder", "exit_code": 1},
                           {"error": answers[1]["error"], "exit_code": 2}]
    assert "must be a number" in answers[1]["error"]
    assert answers[2] == [] and calls[-1] == "list_jobs"


def test_a_history_file_that_cannot_be_read_does_not_stop_the_console(console: Callable[..., Any],
                                                                       tmp_path: Path) -> None:
    (tmp_path / ".fedkit_admin_history").mkdir()
    code, out, err, calls = console(stdin="list_jobs\nbye\n")
    assert code == 0 and "no jobs yet" in out and calls == ["list_jobs"]


@pytest.mark.parametrize(("line", "expected"), [
    ("list_jobs extra", "usage: list_jobs"),
    ("submit_job my-job --set foo", "--set foo: use --set KEY=VALUE"),
    ("submit_job my-job --initial-model a.safetensors --initial-model b.safetensors", "given twice"),
])
def test_a_command_line_a_command_cannot_take_exits_2(console: Callable[..., Any], tmp_path: Path, line: str,
                                                      expected: str) -> None:
    shutil.copytree(JOB_TEMPLATE, tmp_path / "my-job")
    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / name).write_bytes(b"")
    code, out, err, calls = console("-c", line, "--json")
    assert code == 2 and json.loads(out) == {"error": _one_line(err), "exit_code": 2}
    assert expected in _one_line(err) and calls == []


def test_a_download_never_follows_links_planted_in_a_shared_results_folder(tmp_path: Path) -> None:
    """The download came in under fixed .part names: a link planted there by anyone who can write the results
    folder had the zip written over its target, or the results unpacked into the planter's folder."""
    import asyncio
    import io as _io
    import zipfile

    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("metrics.jsonl", "{}\n")
    archive = buf.getvalue()

    class _Serving(_Stub):
        def Download(self, request: pb.AdminRequest, timeout: float) -> AsyncIterator[pb.DataChunk]:
            async def chunks() -> AsyncIterator[pb.DataChunk]:
                yield pb.DataChunk(data=archive)
            return chunks()

    dest, victim, elsewhere = tmp_path / "results", tmp_path / "victim.txt", tmp_path / "elsewhere"
    dest.mkdir()
    elsewhere.mkdir()
    victim.write_text("precious")
    (dest / f".{JOB_ID}.zip.part").symlink_to(victim)
    (dest / f".{JOB_ID}.part").symlink_to(elsewhere)

    out, received = asyncio.run(_Client(_Serving({})).download_job(JOB_ID, dest, keep_zip=True))

    assert victim.read_text() == "precious" and list(elsewhere.iterdir()) == []
    assert out == dest / JOB_ID and not out.is_symlink() and (out / "metrics.jsonl").read_text() == "{}\n"
    assert (dest / f"{JOB_ID}.zip").read_bytes() == archive and received == len(archive)
    assert sorted(p.name for p in dest.iterdir()) == sorted([f".{JOB_ID}.zip.part", f".{JOB_ID}.part", JOB_ID,
                                                             f"{JOB_ID}.zip"])  # the planted links, untouched


@pytest.mark.parametrize("flags", [["-c", "list_jobs", "--bogus"], ["--port", "abc"], ["-c"], ["dashbord"]],
                         ids=["unknown-flag", "bad-port", "c-without-command", "unknown-mode"])
def test_a_command_line_argparse_refuses_is_one_json_object_with_json(capsys: pytest.CaptureFixture[str],
                                                                      flags: list[str]) -> None:
    """README: with --json every outcome is one JSON object on stdout; argparse's own refusals left it empty."""
    with pytest.raises(SystemExit) as exited:
        admin_main.main(["--kit", "kit", "--json", *flags])
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and json.loads(out)["exit_code"] == 2
    assert json.loads(out)["error"] in err and err.startswith("fl_admin: ") and err.count("\n") == 1
