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
