"""Job templates: every folder of templates/jobs/ with a meta.yml is one, so a new template folder simply
appears in `fedkit job templates` and can be used by `fedkit job new NAME --template T`.

A template's one-line description is the first sentence of its README.md's text (headings skipped, wrapped
lines joined), else meta.yml's `description`. `--template` takes the folder name or any unique beginning of
it (`tabular`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

from runtime.errors import ConfigError
from runtime.job_spec import META

from .job_schema import SCHEMA_DIR, TEMPLATES_DIR, add_schema_comments, write_schemas

DEFAULT_TEMPLATE = "tabular"
_JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def list_templates(root: Path = TEMPLATES_DIR) -> dict[str, str]:
    """Template name -> one line saying what it is."""
    if not root.is_dir():
        return {}
    return {p.name: describe(p) for p in sorted(root.iterdir()) if (p / META).is_file()}


def describe(template: Path) -> str:
    readme = template / "README.md"
    if readme.is_file():
        paragraph: list[str] = []  # a README wraps its lines: the first line alone ended mid-sentence
        for line in readme.read_text(errors="replace").splitlines():
            text = line.strip()
            if text and not text.startswith(("#", "<!--")):
                paragraph.append(text)
            elif paragraph:
                break
        if paragraph:
            text = " ".join(paragraph)
            return text[:text.find(". ") + 1] if ". " in text else text  # its first sentence
    try:
        meta = yaml.safe_load((template / META).read_text())
    except yaml.YAMLError:
        meta = None
    return str(meta.get("description", "")) if isinstance(meta, dict) else ""


def find_template(name: str, root: Path = TEMPLATES_DIR) -> Path:
    """The template `name` names: exactly, else the one folder whose name starts with it."""
    known = list_templates(root)
    if name in known:
        return root / name
    matches = [t for t in known if t.startswith(name)]
    if len(matches) == 1:
        return root / matches[0]
    listing = ", ".join(known) or "none found in " + str(root)
    why = "matches several" if matches else "is not a template"
    raise ConfigError(f"--template {name}: {why} (templates: {listing}); see `fedkit job templates`")


def new_job(dest: Path, template: str = DEFAULT_TEMPLATE, root: Path = TEMPLATES_DIR) -> Path:
    """Copy a template into `dest` (which must not exist), name the job after the folder, and give it the
    JSON Schema editors complete against (.schema/, pointed at by each config file's first line)."""
    if not _JOB_NAME.fullmatch(dest.name):
        raise ConfigError(f"{dest.name}: a job name is letters, digits, '.', '_' and '-' (at most 128, starting "
                          "with a letter or digit)")
    if dest.exists():
        raise ConfigError(f"{dest}: already exists; choose another name or remove it")
    source = find_template(template, root)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", SCHEMA_DIR))
    meta = dest / META
    text = meta.read_text()
    renamed, count = re.subn(r"(?m)^name:[^\n#]*?(\s*(#.*)?)$", lambda m: f"name: {dest.name}{m.group(1)}", text,
                             count=1)
    meta.write_text(renamed if count else f"name: {dest.name}\n{text}")
    write_schemas(dest / SCHEMA_DIR)
    add_schema_comments(dest)
    return dest


__all__ = ["DEFAULT_TEMPLATE", "describe", "find_template", "list_templates", "new_job"]
