"""Before a site registers or a console sends a command: is the server's own certificate revoked?

The TLS handshake proves the server holds a certificate of our study CA, but not that lead IT has not
revoked it since (a stolen server key, a decommissioned host). So the peer asks the server for the CRL
it enforces (GetCrl), checks that the study CA signed it and that it is not older than a CRL this kit
has already seen (the number is pinned in the kit's workspace), takes the server's actual certificate
from a TLS handshake of its own (same kit certificate, same CA, same host name check, ALPN h2 as gRPC
uses), and refuses to go on when that certificate's serial is on the list.

Limits: a server that has never served a CRL to this kit can withhold it; once this kit has seen one, a
missing or older list is refused. The check runs on every (re)registration and every console session.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any

from cryptography import x509

from .crl import PIN_FILE, Crl, CrlPin, load_root_ca, parse_crl
from .errors import CertificateError, ServerUnreachable
from .proto import fedkit_pb2 as pb
from .transport import TlsFiles, call_errors

CRL_RPC_TIMEOUT_S = 30.0
HANDSHAKE_TIMEOUT_S = 15.0


def fetch_server_certificate(tls: TlsFiles, host: str, port: int,
                             timeout_s: float = HANDSHAKE_TIMEOUT_S) -> x509.Certificate:
    """The certificate the server at host:port presents, from a TLS handshake verified like gRPC's (study
    CA, host name) with this kit's own certificate. Blocking: call it in a thread.

    Raises CertificateError when the handshake fails verification, ServerUnreachable when nothing answers.
    """
    _, _, root_pem = tls.read()  # also refuses a key others can read
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    ctx.load_verify_locations(cadata=root_pem.decode("ascii", errors="replace"))
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as conn:
            der = conn.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as e:
        raise CertificateError(f"TLS handshake with {host}:{port} failed: {e.verify_message}") from None
    except ssl.SSLError as e:
        raise CertificateError(f"TLS handshake with {host}:{port} failed: {e.reason or e}") from None
    except OSError as e:
        raise ServerUnreachable(f"server {host}:{port} unreachable: {e.strerror or e}") from None
    if der is None:
        raise CertificateError(f"server {host}:{port} presented no certificate")
    return x509.load_der_x509_certificate(der)


def check_not_revoked(crl_pem: bytes, server_cert: x509.Certificate, root_ca: x509.Certificate, pin: CrlPin,
                      target: str) -> Crl | None:
    """Accept the CRL the server at `target` served (b"": none) and check its certificate against it.

    Returns the accepted CRL (None when there is none and none was ever seen here). Raises
    CertificateError, in one line, when the CRL is foreign, older than one seen before, withheld after one
    was seen, or lists the server's certificate.
    """
    label = f"the CRL served by {target}"
    if not crl_pem:
        highest = pin.highest()
        if highest is not None:
            raise CertificateError(f"server {target} serves no revocation list, but this kit has seen CRL number "
                                   f"{highest}; refusing it (its local/crl.pem may be missing: tell lead IT)")
        return None
    crl = parse_crl(crl_pem, root_ca, label)
    pin.accept(crl, label)
    if server_cert.serial_number in crl.revoked:
        raise CertificateError(f"server {target}'s certificate (serial {server_cert.serial_number}) is revoked by "
                               f"the study CRL (number {crl.number}); refusing to talk to it: tell lead IT")
    return crl


async def refuse_revoked_server(stub: Any, tls: TlsFiles, host: str, port: int, workspace: Path) -> None:
    """Fetch the server's CRL over `stub` (a Federation or Admin stub) and its certificate, then run
    `check_not_revoked` with the pin in `workspace`. Raises CertificateError or ServerUnreachable."""
    target = f"{host}:{port}"
    with call_errors("connect", target):  # the first call of every session: its failure is the connection's
        reply = await stub.GetCrl(pb.CrlRequest(), timeout=CRL_RPC_TIMEOUT_S)
    server_cert = await asyncio.to_thread(fetch_server_certificate, tls, host, port)
    root_ca = await asyncio.to_thread(load_root_ca, tls.root_ca)
    await asyncio.to_thread(check_not_revoked, reply.crl_pem, server_cert, root_ca, CrlPin(workspace / PIN_FILE),
                            target)


__all__ = ["check_not_revoked", "fetch_server_certificate", "refuse_revoked_server"]
