"""Render one participant's kit files (scripts, configs, local/*.example, readme, runtime copy) in memory.

Templates live in `templates/kit/` and render with StrictUndefined, so a template that names a variable
the context lacks fails the build instead of shipping an empty string. The startup JSON configs are
instances of runtime.kit_config's models, dumped, so the runtime always reads what provisioning wrote.
Certificates and the signature are added by other steps; this module never touches keys.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jinja2
from pydantic import BaseModel

import runtime
from runtime.client.job_policy import JobPolicy
from runtime.client.privacy_policy import PrivacyPolicy
from runtime.errors import ConfigError
from runtime.identity import Kind
from runtime.kit_config import (
    ADMIN_CONFIG,
    CLIENT_CONFIG,
    SERVER_CONFIG,
    STARTUP,
    AdminEntry,
    AdminKitConfig,
    ClientEntry,
    ClientKitConfig,
    ServerKitConfig,
    ServerLocalSettings,
    SiteLocalSettings,
)
from runtime.server.authz import DEFAULT_POLICY

from ._files import EXECUTABLE_MODE, PUBLIC_MODE
from .kit import KitFile
from .project import AdminSpec, ClientSpec, ParticipantSpec, Project, ServerSpec, docker_name

DEFAULT_TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates" / "kit"
DISTRIBUTION = "fedkit"
# Dependencies only lead IT's machine needs (templating, the CLI); kits never import them.
PROVISION_ONLY_REQUIREMENTS = frozenset({"jinja2", "typer"})
# The server and the admin console never import torch (it runs only in a client's training worker), so
# their kits skip a multi-GB install.
# The DP accountant runs where the noise is added (the site's privacy step).
# MONAI and nibabel serve imaging jobs (templates/jobs/segmentation), which run only in the worker.
CLIENT_ONLY_REQUIREMENTS = frozenset({"torch", "dp-accounting", "monai", "nibabel"})
# The cross-site heatmap is drawn by the server, into the job's results.
SERVER_ONLY_REQUIREMENTS = frozenset({"matplotlib", "tensorboard"})
# The study dashboard (fl_admin.sh dashboard) is served by the admin console only.
ADMIN_ONLY_REQUIREMENTS = frozenset({"starlette", "uvicorn"})
RUNTIME_MODULE = {Kind.SERVER: "runtime.server", Kind.CLIENT: "runtime.client", Kind.ADMIN: "runtime.admin"}
CERT_STEM = {Kind.SERVER: "server", Kind.CLIENT: "client", Kind.ADMIN: "client"}


@dataclass(frozen=True)
class TemplateFile:
    """One template and where its output goes in the kit."""

    template: str
    dest: str
    mode: int = PUBLIC_MODE


_COMMON = (TemplateFile("requirements.txt.j2", "requirements.txt"),)
_DAEMON = (
    TemplateFile("start.sh.j2", "startup/start.sh", EXECUTABLE_MODE),
    TemplateFile("stop.sh.j2", "startup/stop.sh", EXECUTABLE_MODE),
    TemplateFile("docker.sh.j2", "startup/docker.sh", EXECUTABLE_MODE),
    TemplateFile("Dockerfile.j2", "startup/Dockerfile"),
)
KIT_TEMPLATES: Mapping[Kind, tuple[TemplateFile, ...]] = {
    Kind.SERVER: (
        *_COMMON,
        *_DAEMON,
        TemplateFile("readme.server.txt.j2", "readme.txt"),
        TemplateFile("server.yml.example.j2", "local/server.yml.example"),
        TemplateFile("authorization.yml.example.j2", "local/authorization.yml.example"),
    ),
    Kind.CLIENT: (
        *_COMMON,
        *_DAEMON,
        TemplateFile("audit_report.sh.j2", "startup/audit_report.sh", EXECUTABLE_MODE),
        TemplateFile("review_job.sh.j2", "startup/review_job.sh", EXECUTABLE_MODE),
        TemplateFile("readme.client.txt.j2", "readme.txt"),
        TemplateFile("site.yml.example.j2", "local/site.yml.example"),
        TemplateFile("job_policy.yml.example.j2", "local/job_policy.yml.example"),
        TemplateFile("privacy.yml.example.j2", "local/privacy.yml.example"),
    ),
    Kind.ADMIN: (
        *_COMMON,
        TemplateFile("fl_admin.sh.j2", "startup/fl_admin.sh", EXECUTABLE_MODE),
        TemplateFile("docker.sh.j2", "startup/docker.sh", EXECUTABLE_MODE),
        TemplateFile("Dockerfile.j2", "startup/Dockerfile"),
        TemplateFile("readme.admin.txt.j2", "readme.txt"),
    ),
}


@dataclass(frozen=True)
class KitContext:
    """Everything a kit template may use, as `kit.<field>`; StrictUndefined rejects anything else."""

    project: str
    description: str
    name: str
    org: str
    kind: str
    role: str | None
    server_host: str
    fed_learn_port: int
    admin_port: int
    docker_image: str
    image_tag: str
    container_name: str
    config_file: str
    cert_file: str
    key_file: str
    runtime_module: str
    requirements: tuple[str, ...]
    site_names: tuple[str, ...]
    ca_fingerprint: str  # SHA-256 of the study CA (runtime.kitsig.ca_fingerprint), stated in every readme


def installed_pin(name: str) -> str:
    """`name==version` of the installed distribution: kits install exactly what provisioning ran and tested.

    A local version label (torch's `+cpu`) names the build, not the release, so it is dropped: the CUDA and
    the CPU build of one release both satisfy the pin, and the Dockerfile chooses which (TORCH_INDEX)."""
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"'{name}' is not installed; run `make install`") from None
    return f"{name}=={version.split('+', 1)[0]}"


def kit_requirements(kind: Kind, distribution: str = DISTRIBUTION) -> tuple[str, ...]:
    """The runtime's pip requirements, pinned to the installed versions; the names follow pyproject.toml."""
    try:
        declared = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"'{distribution}' is not installed; run `make install`") from None
    skip = (PROVISION_ONLY_REQUIREMENTS | (CLIENT_ONLY_REQUIREMENTS if kind is not Kind.CLIENT else frozenset())
            | (SERVER_ONLY_REQUIREMENTS if kind is not Kind.SERVER else frozenset())
            | (ADMIN_ONLY_REQUIREMENTS if kind is not Kind.ADMIN else frozenset()))
    kept = []
    for req in declared:
        if ";" in req:  # extras (dev tools) and platform markers
            continue
        name = re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0].lower()
        if name not in skip:
            kept.append(installed_pin(name))
    return tuple(kept)


def read_runtime_package(package_dir: Path | None = None) -> dict[str, KitFile]:
    """The runtime package as kit files under `runtime/`, skipping bytecode caches.

    Read once per provisioning run: every kit shares these KitFile objects (and their hashes).
    """
    root = package_dir or Path(runtime.__file__).resolve().parent
    files: dict[str, KitFile] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if "__pycache__" in rel.parts or path.suffix == ".pyc" or not path.is_file():
            continue
        mode = EXECUTABLE_MODE if path.stat().st_mode & stat.S_IXUSR else PUBLIC_MODE
        files[f"runtime/{rel.as_posix()}"] = KitFile.of(path.read_bytes(), mode)
    return files


def kit_config(project: Project, participant: ParticipantSpec) -> tuple[str, BaseModel]:
    """The startup config file name and model for one participant."""
    server = project.server
    if isinstance(participant, ServerSpec):
        return SERVER_CONFIG, ServerKitConfig(
            project=project.name,
            name=participant.name,
            org=participant.org,
            fed_learn_port=participant.fed_learn_port,
            admin_port=participant.admin_port,
            clients=[ClientEntry(name=c.name, org=c.org) for c in project.clients],
            admins=[AdminEntry(name=a.name, org=a.org, role=a.role) for a in project.admins],
        )
    if isinstance(participant, ClientSpec):
        return CLIENT_CONFIG, ClientKitConfig(
            project=project.name,
            name=participant.name,
            org=participant.org,
            server_host=server.name,
            fed_learn_port=server.fed_learn_port,
        )
    return ADMIN_CONFIG, AdminKitConfig(
        project=project.name,
        name=participant.name,
        org=participant.org,
        role=participant.role,
        server_host=server.name,
        admin_port=server.admin_port,
    )


class KitRenderer:
    """Renders kits for one provisioning run: compiled templates, the runtime copy and requirements."""

    def __init__(self, templates_dir: Path = DEFAULT_TEMPLATES_DIR, runtime_files: dict[str, KitFile] | None = None):
        if not templates_dir.is_dir():
            raise ConfigError(f"{templates_dir}: kit templates not found; reinstall fedkit from its repository")
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(templates_dir),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
            autoescape=False,
        )
        self._env.filters["shquote"] = shlex.quote
        self._runtime_files = read_runtime_package() if runtime_files is None else runtime_files
        self._requirements = {kind: kit_requirements(kind) for kind in Kind}
        # The local/*.example files show the runtime's own defaults, read from its models, so they never drift.
        self._defaults = {
            "server_defaults": ServerLocalSettings(),
            "site_defaults": SiteLocalSettings(),
            "job_policy_defaults": JobPolicy(),
            "privacy_defaults": PrivacyPolicy(),
            "authorization_defaults": {
                str(role): {command: str(scope) for command, scope in rules.items()}
                for role, rules in DEFAULT_POLICY.items()
            },
        }

    def context(self, project: Project, participant: ParticipantSpec, *, ca_fingerprint: str) -> KitContext:
        config_file, _ = kit_config(project, participant)
        stem = CERT_STEM[participant.kind]
        return KitContext(
            project=project.name,
            description=project.description,
            name=participant.name,
            org=participant.org,
            kind=participant.kind.value,
            role=participant.role.value if isinstance(participant, AdminSpec) else None,
            server_host=project.server.name,
            fed_learn_port=project.server.fed_learn_port,
            admin_port=project.server.admin_port,
            docker_image=project.docker_image,
            # one image per study and kind: every site of a study runs the same, so a host with several
            # kits (or a second site) builds nothing new
            image_tag=docker_name("fedkit", project.name, participant.kind.value),
            container_name=docker_name("fedkit", project.name, participant.name),
            config_file=config_file,
            cert_file=f"{stem}.crt",
            key_file=f"{stem}.key",
            runtime_module=RUNTIME_MODULE[participant.kind],
            requirements=self._requirements[participant.kind],
            site_names=tuple(c.name for c in project.clients),
            ca_fingerprint=ca_fingerprint,
        )

    def render(self, project: Project, participant: ParticipantSpec, *, ca_fingerprint: str) -> dict[str, KitFile]:
        """Every file of the kit but certificates and signature. Raises jinja2 errors on template bugs."""
        ctx = self.context(project, participant, ca_fingerprint=ca_fingerprint)
        files: dict[str, KitFile] = {}
        for item in KIT_TEMPLATES[participant.kind]:
            template = self._env.get_template(item.template)
            text = template.render(kit=ctx, **self._defaults)
            files[item.dest] = KitFile.of(text.encode("utf-8"), item.mode)
        config_file, config = kit_config(project, participant)
        files[f"{STARTUP}/{config_file}"] = KitFile.of((config.model_dump_json(indent=2) + "\n").encode())
        files.update(self._runtime_files)
        return files
