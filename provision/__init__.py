"""Lead IT's side of fedkit: turn one project.yml into signed, zipped startup kits, one per participant.

The pipeline (pipeline.py) runs fixed steps: open the study CA, issue certs, render kits, sign, write,
zip, record. It may import `runtime` (for the config schemas and the kit-signature format the kits
verify themselves with); `runtime` never imports this package.
"""

from .certs import CertificateAuthority, IssuedCredential, create_ca, issue_credential, load_ca
from .pipeline import KitOutput, ProvisionResult, add_site, provision
from .project import AdminSpec, ClientSpec, Project, ServerSpec, load_project, parse_project
from .render import KitRenderer
from .revoke import RevokeResult, build_crl, revoke
from .state import Ledger, StudyWorkspace

__all__ = [
    "AdminSpec",
    "CertificateAuthority",
    "ClientSpec",
    "IssuedCredential",
    "KitOutput",
    "KitRenderer",
    "Ledger",
    "Project",
    "ProvisionResult",
    "RevokeResult",
    "ServerSpec",
    "StudyWorkspace",
    "add_site",
    "build_crl",
    "create_ca",
    "issue_credential",
    "load_ca",
    "load_project",
    "parse_project",
    "provision",
    "revoke",
]
