"""runtime/job_spec.py: a job folder validated at the edge, overrides, and its zip in and out."""

from __future__ import annotations

import io
import os
import shutil
import stat
import zipfile
from pathlib import Path

import pytest

from runtime.errors import ConfigError, JobRejected
from runtime.job_spec import (
    CLIENT_CONFIG,
    META,
    SERVER_CONFIG,
    load_job_folder,
    load_job_spec,
    parse_override,
    safe_extract,
    zip_folder,
)

TEMPLATE = Path(__file__).resolve().parents[2] / "templates" / "jobs" / "tabular_classifier"


@pytest.fixture
def job(tmp_path: Path) -> Path:
    return Path(shutil.copytree(TEMPLATE, tmp_path / "job"))


def _zip(entries: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name), data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def test_the_job_template_validates() -> None:
    spec = load_job_folder(TEMPLATE)

    assert spec.meta.name == "tabular-classifier"
    assert spec.meta.min_clients == 2
    assert spec.meta.sites == "all"
    assert spec.server.rounds == 5
    assert spec.server.key_metric.name == "auc"
    assert spec.client.learner.path == "learner:TabularLearner"
    assert spec.client.learner.args["lr"] == 0.05


def test_overrides_are_applied_with_yaml_typed_values() -> None:
    spec = load_job_folder(TEMPLATE, ["server.rounds=7", "client.learner.args.lr=0.1", "meta.min_clients=3",
                                      "meta.sites=[site-1, site-2, site-3]", "server.aggregator.server_momentum=0.9"])

    assert spec.server.rounds == 7
    assert spec.client.learner.args["lr"] == 0.1
    assert spec.client.learner.args["epochs"] == 2  # siblings untouched
    assert spec.meta.min_clients == 3
    assert spec.meta.sites == ["site-1", "site-2", "site-3"]
    assert spec.server.aggregator.server_momentum == 0.9


def test_an_override_may_add_a_new_learner_argument() -> None:
    spec = load_job_folder(TEMPLATE, ["client.learner.args.dropout=0.2"])

    assert spec.client.learner.args["dropout"] == 0.2


def test_parse_override_splits_section_path_and_value() -> None:
    assert parse_override("client.learner.args.lr=0.1") == ("client", ["learner", "args", "lr"], 0.1)
    assert parse_override("meta.description=a=b") == ("meta", ["description"], "a=b")


@pytest.mark.parametrize("text", ["rounds=5", "server.rounds", "server.rounds: 5", "model.rounds=5", "server=5"])
def test_bad_override_syntax_is_rejected_with_the_usage(text: str) -> None:
    with pytest.raises(JobRejected, match="use meta.KEY=VALUE"):
        load_job_folder(TEMPLATE, [text])


def test_an_override_whose_value_is_not_yaml_is_rejected() -> None:
    with pytest.raises(JobRejected, match="server.rounds"):
        load_job_folder(TEMPLATE, ["server.rounds=[1, 2"])


def test_an_override_through_a_scalar_is_rejected() -> None:
    with pytest.raises(JobRejected, match="'rounds' is not a mapping"):
        load_job_folder(TEMPLATE, ["server.rounds.max=3"])


@pytest.mark.parametrize(
    ("override", "file", "field"),
    [
        ("server.roundz=3", SERVER_CONFIG, "roundz"),
        ("client.learner.lr=0.1", CLIENT_CONFIG, "learner.lr"),
        ("meta.owner=me", META, "owner"),
    ],
)
def test_an_unknown_key_is_rejected_naming_file_and_field(override: str, file: str, field: str) -> None:
    with pytest.raises(JobRejected) as caught:
        load_job_folder(TEMPLATE, [override])

    assert str(caught.value).startswith(f"{file}: field '{field}'")


@pytest.mark.parametrize(
    ("override", "file", "field"),
    [
        ("server.rounds=many", SERVER_CONFIG, "rounds"),
        ("server.rounds=0", SERVER_CONFIG, "rounds"),
        ("server.aggregator.server_momentum=1.0", SERVER_CONFIG, "aggregator.server_momentum"),
        ("meta.min_clients=0", META, "min_clients"),
        ("client.learner.path=no_class", CLIENT_CONFIG, "learner.path"),
        ("client.task_timeout_s=-1", CLIENT_CONFIG, "task_timeout_s"),
    ],
)
def test_a_wrong_value_is_rejected_naming_file_and_field(override: str, file: str, field: str) -> None:
    with pytest.raises(JobRejected) as caught:
        load_job_folder(TEMPLATE, [override])

    assert str(caught.value).startswith(f"{file}: field '{field}'")


@pytest.mark.parametrize("missing", [META, SERVER_CONFIG, CLIENT_CONFIG])
def test_a_missing_config_file_is_named(job: Path, missing: str) -> None:
    (job / missing).unlink()

    with pytest.raises(JobRejected, match=f"job folder has no {missing}"):
        load_job_folder(job)


def test_a_missing_required_field_is_named(job: Path) -> None:
    (job / CLIENT_CONFIG).write_text("filters: []\n")

    with pytest.raises(JobRejected, match=rf"^{CLIENT_CONFIG}: field 'learner'"):
        load_job_folder(job)


@pytest.mark.parametrize(("text", "reason"), [("- a\n- b\n", "must be a mapping"),
                                              ("name: x\nsites: [a\nmin_clients: 1\n", "not valid YAML at line 3: "),
                                              ("name: x\nmin_clients: 1\nmin_clients: 3\n",
                                               "not valid YAML at line 3: found duplicate key 'min_clients'")])
def test_a_config_that_is_not_a_mapping_is_named(job: Path, text: str, reason: str) -> None:
    (job / META).write_text(text)

    with pytest.raises(JobRejected, match=f"{META}: {reason}"):
        load_job_folder(job)


def test_a_path_that_is_not_a_folder_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(JobRejected, match="not a job folder"):
        load_job_folder(tmp_path / "nowhere")


def test_load_job_spec_works_on_config_texts() -> None:
    files = {META: "name: j\n", SERVER_CONFIG: "rounds: 2\n", CLIENT_CONFIG: "learner: {path: 'm:C'}\n"}

    spec = load_job_spec(files)

    assert (spec.meta.name, spec.server.rounds, spec.client.learner.path) == ("j", 2, "m:C")


# ---- zip in and out -------------------------------------------------------------------------------

def test_zip_folder_is_deterministic(job: Path) -> None:
    first = zip_folder(job)
    os.utime(job / META, (0, 0))  # a different mtime must not change the archive
    (job / "custom" / "__pycache__").mkdir()
    (job / "custom" / "__pycache__" / "learner.cpython-311.pyc").write_bytes(b"\0")

    second = zip_folder(job)

    assert first == second


def test_zip_folder_holds_every_job_file(job: Path) -> None:
    names = zipfile.ZipFile(io.BytesIO(zip_folder(job))).namelist()

    files = [p.relative_to(job).as_posix() for p in job.rglob("*") if p.is_file()]
    assert {META, SERVER_CONFIG, CLIENT_CONFIG, "custom/learner.py"} <= set(files)
    assert names == sorted(files)  # README.md and .schema/ travel too: every file of the folder


def test_zip_then_safe_extract_gives_the_same_files(job: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"

    safe_extract(zip_folder(job), dest)

    for name in (META, SERVER_CONFIG, CLIENT_CONFIG, "custom/learner.py"):
        assert (dest / name).read_bytes() == (job / name).read_bytes()


@pytest.mark.parametrize(
    "data",
    [
        _zip({"meta.yml": b"x", "../evil": b"x"}),
        _zip({"custom/../../evil": b"x"}),
        _zip({"/tmp/evil": b"x"}),
        _zip({"meta.yml": b"x"}, symlink="custom/link"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink"],
)
def test_safe_extract_refuses_unsafe_entries_and_writes_nothing(tmp_path: Path, data: bytes) -> None:
    dest = tmp_path / "a" / "b" / "dest"

    with pytest.raises(JobRejected, match="unsafe"):
        safe_extract(data, dest)

    assert not dest.exists()
    assert not (tmp_path / "a" / "evil").exists()


@pytest.mark.parametrize("data", [b"", b"PK\x03\x04 not really a zip", b"\x00" * 100])
def test_safe_extract_refuses_data_that_is_not_a_zip(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(JobRejected, match="not a valid zip"):
        safe_extract(data, tmp_path / "dest")


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["meta.sites=[site-1,site-2]", "meta.min_clients=3"], "min_clients is 3 but sites names only 2"),
        (["meta.sites=[]"], "sites is an empty list"),
        (["meta.sites=[site-1,site-1]"], "sites names site-1 more than once"),
    ],
)
def test_a_job_that_could_never_start_is_refused(overrides: list[str], reason: str) -> None:
    with pytest.raises(JobRejected) as caught:
        load_job_folder(TEMPLATE, overrides)

    assert str(caught.value).startswith(f"{META}: {reason}")


def test_a_job_naming_as_many_sites_as_it_needs_is_accepted() -> None:
    spec = load_job_folder(TEMPLATE, ["meta.sites=[site-1,site-2]", "meta.min_clients=2"])

    assert spec.meta.sites == ["site-1", "site-2"]


def test_zip_folder_refuses_a_fifo(job: Path) -> None:
    """Reading a FIFO would make the zip (and submit_job) wait for ever: one line instead."""
    path = job / "custom" / "special"
    os.mkfifo(path)
    with pytest.raises(ConfigError, match=f"{path}: not a regular file"):
        zip_folder(job)


@pytest.mark.parametrize("target_is_folder", [False, True])
def test_zip_folder_refuses_a_symbolic_link(job: Path, tmp_path: Path, target_is_folder: bool) -> None:
    """A job folder copied from someone else may link to the researcher's own secrets: zipped, the link's
    target (an admin key, ~/.ssh) went to the server and every site, where the job's code could read it."""
    secret = tmp_path / "secret"
    if target_is_folder:
        secret.mkdir()
        (secret / "id_rsa").write_text("-----BEGIN PRIVATE KEY-----\n")
    else:
        secret.write_text("-----BEGIN PRIVATE KEY-----\n")
    link = job / "custom" / "notes"
    link.symlink_to(secret, target_is_directory=target_is_folder)
    with pytest.raises(ConfigError, match=f"^{link}: a symbolic link; a job folder sends its own files only"):
        zip_folder(job)


@pytest.mark.parametrize("override", ['meta.name="evil\\n2026-12-03 17:00:00,000 INFO fedkit.server: FORGED"',
                                      'meta.description="x\\e[31m"', 'meta.name="a\\u202eb"', 'meta.name="a\\u200fb"',
                                      'meta.sites=["site-1\\u200b"]'])
def test_text_shown_to_other_admins_is_one_line_of_plain_text(override: str) -> None:
    # a job's name, description and sites are printed on every admin's console and in the server's log
    with pytest.raises(JobRejected, match=r"^meta\.yml: field '(name|description|sites)': control character U\+"):
        load_job_folder(TEMPLATE, [override])


def test_an_override_with_a_control_character_is_refused() -> None:
    with pytest.raises(JobRejected, match=r"^override 'server\.rounds=3\\x1b\[2J': control character U\+001B"):
        parse_override("server.rounds=3\x1b[2J")


def test_an_aggregator_without_a_name_is_fedavg_as_documented() -> None:
    """docs/config-reference.md gives aggregator.name the default "fedavg"; leaving it out failed with pydantic's
    'Unable to extract tag using discriminator'."""
    from runtime.job_spec import ServerJobConfig

    config = ServerJobConfig.model_validate({"rounds": 2, "aggregator": {"server_lr": 0.5}})
    assert config.aggregator.name == "fedavg" and config.aggregator.server_lr == 0.5
