"""The provisioning pipeline: a fixed, ordered list of small steps over one typed BuildState.

    provision:  open_ca -> new_prod_dir    -> issue_certs -> render_kits -> add_crl -> sign_kits
                -> write_kits -> zip_kits -> record_issued
    add-site:   open_ca -> latest_prod_dir -> issue_certs -> render_kits -> sign_kits -> write_kits
                -> zip_kits -> record_issued (after checking the server in project.yml is the one issued)

The order lives here, in code: signing comes after every step that adds a file, and the ledger is written
last, so it never lists a certificate whose kit was not written. If any step raises, everything this run
created on disk (the new prod_NN, or the one new kit and its zip) is removed and the error propagates;
the CA, once created, is kept, because later runs must reuse it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import CertificateError, ProjectConfigError
from runtime.identity import Kind
from runtime.kit_config import LOCAL, REVOCATION_LIST, ROOT_CA, SERVER_CONFIG, STARTUP
from runtime.kitsig import ca_fingerprint

from ._files import PRIVATE_MODE, PUBLIC_MODE
from .certs import CertificateAuthority, create_ca, issue_credential, load_ca, save_ca
from .kit import Kit, KitFile, write_kit
from .project import ParticipantSpec, Project
from .render import CERT_STEM, KitRenderer
from .signing import sign_kit
from .state import STATE_DIR_MODE, IssuedCert, StudyWorkspace, load_ledger, save_ledger
from .zipping import zip_kit

# zlib and file I/O release the GIL, so writing and zipping kits overlap on a thread per core; more threads
# than cores only add GIL contention (measured: 2 threads beat 4 on 2 cores).
MAX_WRITE_THREADS = min(4, os.cpu_count() or 2)


@dataclass
class BuildState:
    """What the steps share. Fields after `renderer` start empty; the step named beside each fills it."""

    project: Project
    workspace: StudyWorkspace
    targets: tuple[ParticipantSpec, ...]
    now: dt.datetime
    renderer: KitRenderer
    ca: CertificateAuthority | None = None  # open_ca
    is_ca_new: bool = False  # open_ca
    prod_dir: Path | None = None  # new_prod_dir / latest_prod_dir
    kits: list[Kit] = field(default_factory=list)  # issue_certs, then render_kits and sign_kits
    issued: list[IssuedCert] = field(default_factory=list)  # issue_certs
    created: list[Path] = field(default_factory=list)  # whatever must go if a later step fails

    def need_ca(self) -> CertificateAuthority:
        if self.ca is None:
            raise RuntimeError("pipeline order: open_ca must run first")
        return self.ca

    def need_prod_dir(self) -> Path:
        if self.prod_dir is None:
            raise RuntimeError("pipeline order: a prod_dir step must run first")
        return self.prod_dir

    def kit_dir(self, kit: Kit) -> Path:
        return self.need_prod_dir() / kit.name

    def zip_path(self, kit: Kit) -> Path:
        return self.need_prod_dir() / f"{kit.name}.zip"


Step = Callable[[BuildState], None]


def open_ca(state: BuildState) -> None:
    """Reuse the study CA in state/, or create it there on the first run (key 0600, folder 0700)."""
    ws = state.workspace
    if ws.ca_cert_path.exists() or ws.ca_key_path.exists():
        state.ca = load_ca(ws.ca_cert_path, ws.ca_key_path, state.now)
        return
    ws.state_dir.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
    state.ca = create_ca(state.project.name, state.now, state.project.ca_days)
    save_ca(state.ca, ws.ca_cert_path, ws.ca_key_path)
    state.is_ca_new = True


def new_prod_dir(state: BuildState) -> None:
    """Create the next prod_NN; mkdir without exist_ok, so two runs at once never share one."""
    path = state.workspace.next_prod_dir()
    path.mkdir()
    state.created.append(path)
    state.prod_dir = path


def latest_prod_dir(state: BuildState) -> None:
    """Add to the newest prod_NN; refuse when there is none, a target already has a kit there, or
    project.yml's server is not the one that prod_NN's kits were issued for."""
    path = state.workspace.latest_prod_dir()
    if path is None:
        raise ProjectConfigError(
            f"{state.workspace.root}: no prod_NN folder yet; run `fedkit provision` before add-site"
        )
    _check_same_server(state.project, path)
    for p in state.targets:
        for existing in (path / p.name, path / f"{p.name}.zip"):
            if existing.exists():
                raise ProjectConfigError(
                    f"{existing}: '{p.name}' already has a kit in {path.name}; "
                    "run `fedkit provision` for a fresh set, or `revoke` it first and remove that kit"
                )
    state.prod_dir = path


def _check_same_server(project: Project, prod_dir: Path) -> None:
    """A kit from add-site connects where project.yml says; refuse when that is not the server issued in
    `prod_dir` (a port or name edited since): the new site could never reach the study's server."""
    issued = _issued_server(prod_dir)
    if issued is None:  # the server's kit and zip were moved away: nothing to compare with
        return
    server = project.server
    wanted = (server.name, server.fed_learn_port, server.admin_port)
    had = (issued.get("name"), issued.get("fed_learn_port"), issued.get("admin_port"))
    if wanted != had:
        raise ProjectConfigError(
            f"project.yml's server {wanted[0]} (ports {wanted[1]}, {wanted[2]}) is not the one issued in "
            f"{prod_dir.name} ({had[0]}, ports {had[1]}, {had[2]}): an added kit could not reach it; put the "
            "server back as it was, or run `fedkit provision` for a fresh set of kits"
        )


def _issued_server(prod_dir: Path) -> dict[str, object] | None:
    """The server kit's startup/fed_server.json in `prod_dir`, from its folder or else its zip (None when
    neither is there or readable)."""
    member = f"{STARTUP}/{SERVER_CONFIG}"
    try:
        for path in sorted(prod_dir.glob(f"*/{member}")):
            return json.loads(path.read_text())
        for zip_path in sorted(prod_dir.glob("*.zip")):
            with zipfile.ZipFile(zip_path) as z:
                for name in z.namelist():
                    if name.endswith(f"/{member}") and name.count("/") == 2:
                        return json.loads(z.read(name))
    except (OSError, ValueError, zipfile.BadZipFile):
        pass
    return None


def issue_certs(state: BuildState) -> None:
    """A fresh key and certificate per target, put in its kit with the CA certificate (never the CA key)."""
    ca = state.need_ca()
    run = state.need_prod_dir().name
    for participant in state.targets:
        credential = issue_credential(ca, participant, state.now, state.project.cert_validity_days, state.project.name)
        stem = CERT_STEM[participant.kind]
        kit = Kit(participant=participant)
        kit.add(f"{STARTUP}/{stem}.crt", KitFile.of(credential.cert_pem, PUBLIC_MODE))
        kit.add(f"{STARTUP}/{stem}.key", KitFile.of(credential.key_pem, PRIVATE_MODE))
        kit.add(f"{STARTUP}/{ROOT_CA}", KitFile.of(ca.cert_pem, PUBLIC_MODE))
        state.kits.append(kit)
        state.issued.append(
            IssuedCert(
                name=participant.name,
                kind=participant.kind,
                serial=str(credential.cert.serial_number),
                not_after=credential.cert.not_valid_after_utc,
                run=run,
            )
        )


def render_kits(state: BuildState) -> None:
    """Scripts, configs, local/*.example, readme, requirements and the runtime copy, into each kit."""
    fingerprint = ca_fingerprint(state.need_ca().cert_pem)
    for kit in state.kits:
        for rel, kit_file in state.renderer.render(state.project, kit.participant, ca_fingerprint=fingerprint).items():
            kit.add(rel, kit_file)


def add_crl(state: BuildState) -> None:
    """The study's current CRL into the server kit's local/crl.pem (site-owned, so unsigned; the CRL carries
    the CA's own signature). A server kit issued after a revoke must refuse the revoked from its first
    start: without it, the fresh server admitted every certificate revoked before it was issued."""
    crl_path = state.workspace.crl_path
    if not crl_path.exists():
        return
    crl_pem = crl_path.read_bytes()
    for kit in state.kits:
        if kit.participant.kind is Kind.SERVER:
            kit.add(f"{LOCAL}/{REVOCATION_LIST}", KitFile.of(crl_pem, PUBLIC_MODE))


def sign_kits(state: BuildState) -> None:
    ca = state.need_ca()
    for kit in state.kits:
        sign_kit(kit, ca)


def _run_per_kit(kits: Sequence[Kit], action: Callable[[Kit], object]) -> None:
    """Run `action` on every kit on a small thread pool; the first exception propagates."""
    with ThreadPoolExecutor(max_workers=max(1, min(MAX_WRITE_THREADS, len(kits)))) as pool:
        for future in [pool.submit(action, kit) for kit in kits]:
            future.result()


def write_kits(state: BuildState) -> None:
    """Each kit as a folder in prod_NN, every file created with its final mode.

    The first kit is written alone; the others then hard-link the files they share with it (the runtime
    copy), so prod_NN's kit folders share those inodes. The zips stay fully independent.
    """
    if not state.kits:
        return
    for kit in state.kits:
        state.created.append(state.kit_dir(kit))
    first, *rest = state.kits
    link_sources = write_kit(first, state.kit_dir(first))
    _run_per_kit(rest, lambda kit: write_kit(kit, state.kit_dir(kit), link_sources))


def zip_kits(state: BuildState) -> None:
    """One zip (0600: it holds a private key) per kit, beside its folder."""
    for kit in state.kits:
        state.created.append(state.zip_path(kit))
    _run_per_kit(state.kits, lambda kit: zip_kit(kit, state.zip_path(kit), state.now))


def record_issued(state: BuildState) -> None:
    """Append this run's serials to state/issued.json, so `revoke` can find them later."""
    ledger_path = state.workspace.ledger_path
    save_ledger(ledger_path, load_ledger(ledger_path).with_issued(state.issued))


PROVISION_STEPS: tuple[Step, ...] = (
    open_ca,
    new_prod_dir,
    issue_certs,
    render_kits,
    add_crl,
    sign_kits,
    write_kits,
    zip_kits,
    record_issued,
)
ADD_SITE_STEPS: tuple[Step, ...] = (
    open_ca,
    latest_prod_dir,
    issue_certs,
    render_kits,
    sign_kits,
    write_kits,
    zip_kits,
    record_issued,
)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def run_steps(state: BuildState, steps: Sequence[Step]) -> None:
    """Run `steps` in order; on any exception remove what this run created, then re-raise it unchanged."""
    try:
        for step in steps:
            step(state)
    except BaseException:
        for path in reversed(state.created):
            _remove(path)
        raise


@dataclass(frozen=True)
class KitOutput:
    name: str
    kind: Kind
    kit_dir: Path
    zip_path: Path


@dataclass(frozen=True)
class ProvisionResult:
    """What a run produced, for the CLI to print and tests to inspect."""

    prod_dir: Path
    kits: tuple[KitOutput, ...]
    ca_cert_path: Path
    is_ca_new: bool
    ca_fingerprint: str  # SHA-256, as `openssl x509 -fingerprint -sha256` prints it; lead IT hands it out
    ca_not_after: dt.datetime  # the study ends its certificates' life here: no kit outlives its CA
    kits_not_after: dt.datetime  # the earliest end of the certificates this run issued
    kits_cut_by_ca: bool  # the CA ends sooner than cert_validity_days from now: the kits end with it


def _result(state: BuildState) -> ProvisionResult:
    kits = tuple(KitOutput(k.name, k.participant.kind, state.kit_dir(k), state.zip_path(k)) for k in state.kits)
    ca = state.need_ca()
    asked_end = state.now + dt.timedelta(days=state.project.cert_validity_days)
    return ProvisionResult(state.need_prod_dir(), kits, state.workspace.ca_cert_path, state.is_ca_new,
                           ca_fingerprint(ca.cert_pem), ca.cert.not_valid_after_utc,
                           min(c.not_after for c in state.issued),
                           ca.cert.not_valid_after_utc < asked_end)


def provision(
    project: Project, workspace: Path, now: dt.datetime, renderer: KitRenderer | None = None,
    reinstate: Sequence[str] = (),
) -> ProvisionResult:
    """Issue a kit for every participant into a new WORKSPACE/<study>/prod_NN. `now` is aware UTC.
    A participant whose every certificate was revoked gets none unless named in `reinstate`."""
    state = BuildState(
        project=project,
        workspace=StudyWorkspace.for_study(workspace, project.name),
        targets=project.participants,
        now=now,
        renderer=renderer or KitRenderer(),
    )
    with state.workspace.locked():
        refuse_revoked(state.workspace, [p.name for p in state.targets], reinstate)
        run_steps(state, PROVISION_STEPS)
    return _result(state)


def refuse_revoked(workspace: StudyWorkspace, names: Sequence[str], reinstate: Sequence[str] = ()) -> None:
    """Raise ProjectConfigError when a participant to be issued a kit had every certificate revoked: renewing all
    kits (a routine `fedkit provision`) let a revoked site back into the study, its new serial on no CRL.
    `reinstate` names those issued a kit on purpose (a lost or stolen kit replaced)."""
    ledger = load_ledger(workspace.ledger_path)
    revoked = ledger.revoked_serials()
    barred = [n for n in names if n not in reinstate and (serials := ledger.serials_of(n))
              and all(s in revoked for s in serials)]
    if barred:
        who = ", ".join(barred)
        raise ProjectConfigError(f"project.yml lists {who}, whose certificates were revoked: a new kit would let "
                                 f"{'it' if len(barred) == 1 else 'them'} back in. Remove {who} from project.yml, "
                                 "or issue a new kit on purpose (a lost or stolen kit replaced) with "
                                 f"{' '.join(f'--reinstate {n}' for n in barred)}")


def add_site(
    project: Project,
    workspace: Path,
    name: str,
    now: dt.datetime,
    renderer: KitRenderer | None = None,
    project_source: str = "project.yml",
    reinstate: Sequence[str] = (),
) -> ProvisionResult:
    """Issue a kit for the one participant `name` (a client site or an admin listed in project.yml) into
    the newest prod_NN, under the existing CA, leaving every other kit untouched.

    Raises ProjectConfigError if `name` is not in project.yml, is the server, or already has a kit there;
    CertificateError if the study has no CA yet.
    """
    participant = project.participant(name)
    if participant is None:
        known = ", ".join(c.name for c in project.clients)
        raise ProjectConfigError(
            f"{project_source}: no participant named '{name}' (sites: {known}); add it to participants first"
        )
    if participant.kind is Kind.SERVER:
        raise ProjectConfigError(
            f"{project_source}: '{name}' is the server; re-issue it with a full `fedkit provision`"
        )
    ws = StudyWorkspace.for_study(workspace, project.name)
    if not ws.ca_cert_path.exists():
        raise CertificateError(f"{ws.ca_cert_path}: no study CA yet; run `fedkit provision` first")
    state = BuildState(
        project=project, workspace=ws, targets=(participant,), now=now, renderer=renderer or KitRenderer()
    )
    with ws.locked():
        refuse_revoked(ws, [name], reinstate)
        run_steps(state, ADD_SITE_STEPS)
    return _result(state)
