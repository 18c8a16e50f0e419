"""fedkit's exception tree: every error a person can hit has a named class and a one-line message.

    FedkitError                    base; str(e) is the one line the CLI prints
    ├── ProjectConfigError         project.yml is malformed (names file, participant, field)
    ├── ConfigError                a kit, job or local settings file is malformed
    ├── CertificateError           a certificate is missing, foreign, expired or of the wrong kind
    ├── KitTamperedError           a startup kit's files differ from its signed manifest
    ├── ServerUnreachable          the federated server did not answer within its deadline
    │   └── TransferStalled        a stream moved nothing for longer than its idle timeout
    ├── SessionExpired             the server no longer knows this site's session: register again
    ├── JobRejected                a job folder or submission was refused (bad folder, policy, auth)
    │   └── DpBudgetExhausted      a DP release would take a job past this site's privacy budget
    ├── PermissionDenied           an admin's role does not allow a command
    ├── UpdateRejected             a site's model update failed validation (names, shapes, NaN, size)
    └── AuditChainBroken           an audit log's hash chain does not verify

Only the CLI layer catches these; everything below raises. This module never imports grpc or torch.
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_PROBLEMS_SHOWN = 10  # a file with many mistakes names this many on its one line, then counts the rest


def problems_line(source: str, problems: Iterable[str]) -> str:
    """`source: problem`, or `source: N problems: a; b; ...; and K more` for several (repeats once): a person
    fixes every mistake of a file in one pass, and the message stays one line."""
    unique = list(dict.fromkeys(problems))
    if len(unique) == 1:
        return f"{source}: {unique[0]}"
    more = f"; and {len(unique) - MAX_PROBLEMS_SHOWN} more" if len(unique) > MAX_PROBLEMS_SHOWN else ""
    return f"{source}: {len(unique)} problems: {'; '.join(unique[:MAX_PROBLEMS_SHOWN])}{more}"


class FedkitError(Exception):
    """Base of every fedkit error; its message is a single line meant for a person."""


class ProjectConfigError(FedkitError):
    """project.yml is malformed."""


class ConfigError(FedkitError):
    """A kit, job or local settings file is malformed."""


class CertificateError(FedkitError):
    """A certificate is missing, foreign, expired or of the wrong kind."""


class KitTamperedError(FedkitError):
    """A startup kit's files differ from its signed manifest."""


class ServerUnreachable(FedkitError):
    """The federated server did not answer within its deadline."""


class TransferStalled(ServerUnreachable):
    """A stream moved nothing for longer than its idle timeout (a stalled link)."""


class SessionExpired(FedkitError):
    """The server no longer knows this site's session (it restarted, or the site was presumed dead)."""


class JobRejected(FedkitError):
    """A job folder or submission was refused."""


class DpBudgetExhausted(JobRejected):
    """A differentially private release would take a job's total epsilon on this site past its budget
    (local/privacy.yml dp_budget); the release was not sent. `details` says by how much, for the audit."""

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.details = details


class PermissionDenied(FedkitError):
    """An admin's role does not allow this command."""


class UpdateRejected(FedkitError):
    """A site's model update failed validation."""


class AuditChainBroken(FedkitError):
    """An audit log's hash chain does not verify."""


__all__ = [
    "AuditChainBroken",
    "CertificateError",
    "ConfigError",
    "DpBudgetExhausted",
    "FedkitError",
    "JobRejected",
    "KitTamperedError",
    "PermissionDenied",
    "ProjectConfigError",
    "ServerUnreachable",
    "SessionExpired",
    "TransferStalled",
    "UpdateRejected",
]
