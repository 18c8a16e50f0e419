"""docs/config-reference.md and each template's .schema/ are generated from the models (`make docs`):
this fails, naming the fix, when a model changed and they were not regenerated."""

from __future__ import annotations

import pytest

from provision.job_schema import (
    MODELS,
    REFERENCE_PAGE,
    SCHEMA_DIR,
    reference_markdown,
    schema_comment,
    schema_texts,
    templates,
)
from runtime.aggregators.config import AggregatorConfig
from runtime.job_spec import ClientJobConfig, JobMeta, ServerJobConfig

STALE = "is stale: run `make docs` and commit the result"


def test_the_reference_page_is_current() -> None:
    assert REFERENCE_PAGE.is_file(), f"{REFERENCE_PAGE} is missing: run `make docs`"
    assert REFERENCE_PAGE.read_text() == reference_markdown(), f"{REFERENCE_PAGE} {STALE}"


def test_the_reference_page_names_every_key() -> None:
    page = reference_markdown()
    for model, prefix in ((JobMeta, ""), (ServerJobConfig, ""), (ClientJobConfig, "")):
        for key in model.model_fields:
            assert f"| `{prefix}{key}` |" in page, key
    for member in AggregatorConfig.__origin__.__args__:  # type: ignore[attr-defined]
        for key in member.model_fields:
            assert f"| `aggregator.{key}` |" in page, (member.__name__, key)
    assert "| `learner.args` |" in page and "| `filters[].name` |" in page


@pytest.mark.parametrize("template", templates(), ids=lambda p: p.name)
def test_each_template_carries_the_current_schema_and_points_at_it(template) -> None:  # type: ignore[no-untyped-def]
    for name, text in schema_texts().items():
        path = template / SCHEMA_DIR / name
        assert path.is_file() and path.read_text() == text, f"{path} {STALE}"
    for name in MODELS:
        first = (template / name).read_text().splitlines()[0]
        assert first == schema_comment(name), f"{template / name}: first line {STALE}"
