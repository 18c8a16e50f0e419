"""Bounded job intake (runtime/job_spec.py): YAML aliases refused, config files and zip members capped
while they are read (declared sizes are never trusted), and anything that is not a zip named as such."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from runtime.errors import JobRejected
from runtime.job_spec import (
    CLIENT_CONFIG,
    MAX_CONFIG_BYTES,
    META,
    SERVER_CONFIG,
    load_job_spec,
    read_zip_configs,
    read_zip_member,
    safe_extract,
)

GOOD = {META: "name: j\n", SERVER_CONFIG: "rounds: 2\n", CLIENT_CONFIG: "learner: {path: 'm:C'}\n"}


def _alias_bomb(levels: int = 6) -> str:
    """A few hundred bytes that expand to 10**levels strings in a naive loader."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_a_yaml_alias_bomb_is_refused_naming_the_file() -> None:
    bomb = _alias_bomb()
    assert len(bomb) < 600

    with pytest.raises(JobRejected, match=f"{CLIENT_CONFIG}: .*alias"):
        load_job_spec({**GOOD, CLIENT_CONFIG: "learner: {path: 'm:C'}\n" + bomb})


def test_any_alias_in_a_job_config_is_refused() -> None:
    with pytest.raises(JobRejected, match=f"{SERVER_CONFIG}: YAML aliases .* are not allowed"):
        load_job_spec({**GOOD, SERVER_CONFIG: "rounds: &r 2\nround_timeout_s: *r\n"})


def test_an_alias_in_an_override_value_is_refused() -> None:
    with pytest.raises(JobRejected, match="override .*alias"):
        load_job_spec(GOOD, ["client.learner.args.x=[&a [1], *a]"])


def test_an_oversized_config_text_is_refused() -> None:
    big = "name: j\n" + "#" * MAX_CONFIG_BYTES + "\n"

    with pytest.raises(JobRejected, match=f"{META}: .*larger than {MAX_CONFIG_BYTES}"):
        load_job_spec({**GOOD, META: big})


def test_a_zip_bombed_config_is_refused_without_expanding_it(tmp_path: Path) -> None:
    data = _zip({**{k: v.encode() for k, v in GOOD.items()}, META: b"name: j\n" + b" " * (50 << 20)})
    assert len(data) < 200_000

    with pytest.raises(JobRejected, match=f"{META}: .*larger than {MAX_CONFIG_BYTES}"):
        read_zip_configs(data)
    path = tmp_path / "job.zip"
    path.write_bytes(data)
    with pytest.raises(JobRejected, match=f"{META}: .*larger than"):
        read_zip_configs(path)


def test_a_member_is_read_with_a_cap_whatever_its_declared_size() -> None:
    data = _zip({"custom/big.bin": b"\0" * (4 << 20)})
    # a forged local header may understate the size: the cap counts bytes as they come out
    assert len(read_zip_member(data, "custom/big.bin", limit_bytes=4 << 20)) == 4 << 20
    with pytest.raises(JobRejected, match="custom/big.bin.*larger than 1048576"):
        read_zip_member(data, "custom/big.bin", limit_bytes=1 << 20)


def test_safe_extract_caps_every_member_and_the_total(tmp_path: Path) -> None:
    data = _zip({"custom/a.bin": b"\0" * (3 << 20), "custom/b.bin": b"\0" * (3 << 20)})

    with pytest.raises(JobRejected, match="custom/a.bin.*larger than"):
        safe_extract(data, tmp_path / "one", member_limit_bytes=2 << 20)
    with pytest.raises(JobRejected, match="expands to more than"):
        safe_extract(data, tmp_path / "all", member_limit_bytes=4 << 20, total_limit_bytes=5 << 20)
    safe_extract(data, tmp_path / "ok", member_limit_bytes=4 << 20, total_limit_bytes=8 << 20)
    assert (tmp_path / "ok" / "custom" / "b.bin").stat().st_size == 3 << 20


@pytest.mark.parametrize("data", [b"", b"plain text, not a zip", b"PK\x03\x04 broken"])
def test_reading_configs_from_something_that_is_not_a_zip_says_so(data: bytes) -> None:
    with pytest.raises(JobRejected, match="not a valid zip"):
        read_zip_configs(data)


@pytest.mark.parametrize("odd", ["custom/./learner.py", "custom//learner.py", "./custom/learner.py"])
def test_a_path_in_two_spellings_is_refused_by_the_hash_and_the_extraction(tmp_path: Path, odd: str) -> None:
    # both names were hashed (the code hash a site approves) and both extracted to one file, the last written
    # winning: a reviewer reading `custom/learner.py` approved what `custom/./learner.py` put there
    from runtime.job_code import code_hash_of_zip

    archive = _zip({**{k: v.encode() for k, v in GOOD.items()}, "custom/learner.py": b"reviewed",
                    odd: b"what runs"})
    with pytest.raises(JobRejected, match=f"'{odd}' is not a plain relative path"):
        code_hash_of_zip(archive)
    with pytest.raises(JobRejected, match=f"'{odd}' is unsafe"):
        safe_extract(archive, tmp_path / "job")
    assert not (tmp_path / "job" / "custom" / "learner.py").exists()
