"""show_job/wait_job total a running job's output while the job replaces files in it (checkpoint
references, models): a file that disappears mid-walk is not counted, and the command does not fail."""

from __future__ import annotations

from pathlib import Path

from runtime.server.job_store import JobStore


def test_a_file_replaced_while_the_folder_is_walked_is_skipped(tmp_path, monkeypatch):
    store = JobStore(tmp_path / "jobs")
    job = store.job_dir("j1")
    (job / "models").mkdir(parents=True)
    (job / "record.json").write_bytes(b"x" * 10)
    doomed = job / "models" / "checkpoint-ref.old.safetensors"
    doomed.write_bytes(b"y" * 100)
    is_file, real_stat = Path.is_file, Path.stat

    def stat_gone_after_listing(self, *args, **kwargs):
        if self == doomed:
            raise FileNotFoundError(2, "No such file or directory", str(self))  # replaced since the listing
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "is_file", lambda self: True if self == doomed else is_file(self))
    monkeypatch.setattr(Path, "stat", stat_gone_after_listing)
    assert store.output_bytes("j1") == 10


def test_temporary_files_the_download_leaves_out_are_not_counted(tmp_path):
    """A running job keeps its replaced global file as a spare to write over (global.safetensors.spare.tmp);
    download_job leaves *.tmp out, so the progress total must too."""
    store = JobStore(tmp_path / "jobs")
    models = store.job_dir("j1") / "models"
    models.mkdir(parents=True)
    (models / "global.safetensors").write_bytes(b"m" * 40)
    (models / "global.safetensors.spare.tmp").write_bytes(b"s" * 40)
    assert store.output_bytes("j1") == 40
