"""runtime/kit_config.py: a local settings file with mistakes is refused in one line that names each of them,
so site or server IT fixes them all in one pass instead of one per restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime import kit_config as kc
from runtime.errors import ConfigError


def test_one_mistake_is_named_with_its_field(tmp_path: Path) -> None:
    path = tmp_path / "site.yml"
    path.write_text("nproc: x\n")

    with pytest.raises(ConfigError) as caught:
        kc.load_optional(path, kc.SiteLocalSettings)

    assert str(caught.value).startswith(f"{path}: field 'nproc': ")


def test_every_mistake_is_named_on_the_same_line(tmp_path: Path) -> None:
    path = tmp_path / "site.yml"
    path.write_text("nproc: x\nbogus: 1\n")

    with pytest.raises(ConfigError) as caught:
        kc.load_optional(path, kc.SiteLocalSettings)

    message = str(caught.value)
    assert message.startswith(f"{path}: 2 problems: field 'nproc': ")
    assert "; field 'bogus': Extra inputs are not permitted" in message and "\n" not in message


def test_past_ten_mistakes_the_rest_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "site.yml"
    path.write_text("".join(f"unknown_{i}: 1\n" for i in range(12)))

    with pytest.raises(ConfigError) as caught:
        kc.load_optional(path, kc.SiteLocalSettings)

    message = str(caught.value)
    assert message.startswith(f"{path}: 12 problems: ") and message.endswith("; and 2 more")
    assert message.count("Extra inputs are not permitted") == 10


@pytest.mark.parametrize(("file", "text", "field"), [
    ("site.yml", "sandbox: {min_free_disk_mb: true}\n", "sandbox.min_free_disk_mb"),
    ("site.yml", "sandbox: {cpus: false}\n", "sandbox.cpus"),
    ("privacy.yml", "dp_site_budget: {epsilon: true, delta: 1.0e-5}\n", "dp_site_budget.epsilon"),
    ("privacy.yml", "reports: {max_metrics: true}\n", "reports.max_metrics"),
])
def test_true_or_false_where_a_number_belongs_is_refused(tmp_path: Path, file: str, text: str, field: str) -> None:
    """pydantic alone would read `true` as 1: `min_free_disk_mb: true` would quietly mean 1 MiB."""
    from runtime.client.privacy_policy import PrivacyPolicy

    path = tmp_path / file
    path.write_text(text)
    model = kc.SiteLocalSettings if file == "site.yml" else PrivacyPolicy
    with pytest.raises(ConfigError, match=f"field '{field}': Value error, (true|false) is not a number"):
        kc.load_model(path, model)
    path.write_text("send_log: false\n" if file == "site.yml" else "reports: {scalars: false}\n")
    kc.load_model(path, model)  # a real bool still reads


@pytest.mark.parametrize(("file", "text", "expected"), [
    ("site.yml", "sandbox: 5\n", "field 'sandbox': is a section (indented `key: value` lines, or {key: value, ...}), "
                                 "not the number 5"),
    ("privacy.yml", "dp_site_budget: 11.5\n", "field 'dp_site_budget': is a section"),
    ("privacy.yml", "reports: [accuracy]\n", "field 'reports': is a section"),
    ("site.yml", "sandbox: {pids: 1.5e0}\n", "field 'sandbox.pids': Input should be a valid integer, got a number "
                                             "with a fractional part"),
    ("site.yml", "sandbox: {pids: many}\n", "field 'sandbox.pids': should be a whole number, not the text 'many'"),
    # a misspelt key is named with the one it resembles, in its own section
    ("site.yml", "data_rot: /data\n", "field 'data_rot': Extra inputs are not permitted (did you mean 'data_root'?)"),
    ("site.yml", "sandbox: {memory: 100}\n", "field 'sandbox.memory': Extra inputs are not permitted (did you mean "
                                             "'memory_mb'?)"),
    ("privacy.yml", "reports: {metric_name: [loss]}\n", "field 'reports.metric_name': Extra inputs are not "
                                                        "permitted (did you mean 'metric_names'?)"),
    ("site.yml", "bogus: 1\n", "field 'bogus': Extra inputs are not permitted"),
    ("privacy.yml", "dp_budget: {epsilon: 1, delta: 1.0e-5, deltta: 1}\n", "field 'dp_budget.deltta': Extra "
                                                                         "inputs are not permitted (did you mean "
                                                                         "'delta'?)"),  # an optional section
    ("privacy.yml", "reports: {significant_digits: 1, min_magnitude: 10, max_magnitude: 1}\n",
     "field 'reports': Value error, min_magnitude (10) must be below max_magnitude (1)"),
    ("site.yml", "data_root: ~no-such-user-here/data\n", "field 'data_root': Value error, '~no-such-user-here/data':"),
    # YAML reads an unquoted all-digit hash as a number
    ("job_policy.yml", "code: {approved_hashes: [1234567890]}\n", "field 'code': Value error, approved_hashes.0: "
                                                                  "should be text, not the number 1234567890: put "
                                                                  "it in quotes"),
])
def test_a_mistake_is_said_in_the_files_terms(tmp_path: Path, file: str, text: str, expected: str) -> None:
    """Not pydantic's class names ("instance of DpBudget"), nor "unable to parse string as an integer"."""
    from runtime.client.job_policy import JobPolicy
    from runtime.client.privacy_policy import PrivacyPolicy

    path = tmp_path / file
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        kc.load_model(path, {"site.yml": kc.SiteLocalSettings, "privacy.yml": PrivacyPolicy,
                             "job_policy.yml": JobPolicy}[file])
    assert str(caught.value).startswith(f"{path}: {expected}"), str(caught.value)
    assert file != "site.yml" or "bogus" not in text or "did you mean" not in str(caught.value)
    assert "instance of" not in str(caught.value) and "unable to parse" not in str(caught.value)


def test_a_number_in_exponent_form_is_a_number(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e12 and 2.5e3 as text; fedkit reads them as YAML 1.2 and JSON do
    path = tmp_path / "site.yml"
    path.write_text("sandbox: {min_free_disk_mb: 1e6, pids: 2.5e3, max_task_s: 1.0e3}\n")
    sandbox = kc.load_model(path, kc.SiteLocalSettings).sandbox
    assert (sandbox.min_free_disk_mb, sandbox.pids, sandbox.max_task_s) == (1_000_000, 2500, 1000.0)


def test_a_section_with_every_key_commented_out_holds_its_defaults(tmp_path: Path) -> None:
    """`sandbox:` with the keys below it commented out (as site IT tries one thing, then another) is the
    section's defaults, as `reports: null` is in privacy.yml; a section given a value is still refused."""
    path = tmp_path / "site.yml"
    path.write_text("sandbox:\n#  memory_mb: 4096\nsend_log: false\n")
    settings = kc.load_model(path, kc.SiteLocalSettings)
    assert settings.sandbox == kc.SandboxSettings() and settings.send_log is False
    path.write_text("sandbox: 0\n")
    with pytest.raises(ConfigError, match="field 'sandbox': is a section"):
        kc.load_model(path, kc.SiteLocalSettings)


def test_a_setting_written_twice_is_refused_with_its_line(tmp_path: Path) -> None:
    # PyYAML keeps the last of two equal keys silently: the first setting would never take effect
    path = tmp_path / "site.yml"
    path.write_text("nproc: 1\nthreads: 2\nnproc: 4\n")

    with pytest.raises(ConfigError) as caught:
        kc.load_optional(path, kc.SiteLocalSettings)

    assert str(caught.value) == f"{path}: not valid YAML at line 3: found duplicate key 'nproc'"


def test_a_file_that_is_not_yaml_says_where(tmp_path: Path) -> None:
    path = tmp_path / "site.yml"
    path.write_text("nproc: [1\n")

    with pytest.raises(ConfigError, match=rf"^{path}: not valid YAML at line 2: "):
        kc.load_optional(path, kc.SiteLocalSettings)
