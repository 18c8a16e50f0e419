"""Why a TLS connection to the server fails, in words a site's IT can act on.

gRPC reports every failed handshake the same way ("Ssl handshake failed", "Socket closed"), which reads
like a network fault. A plain `ssl` handshake with the kit's own certificate tells the cases apart: the
server's certificate is not from this kit's study CA (a kit of another study, or a server running one),
or the server refused this site's certificate (revoked, expired, another study: TLS 1.3 servers say so
with an alert right after the handshake), or nothing answers at all.

Blocking (a socket and a handshake): call it in a thread.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

from .transport import TlsFiles

ALERT_WAIT_S = 3.0  # a TLS 1.3 server refuses a client certificate in an alert just after the handshake


@dataclass(frozen=True)
class Diagnosis:
    message: str
    is_certificate_problem: bool  # retrying will not help: a person must change a kit


def diagnose(tls: TlsFiles, host: str, port: int, timeout_s: float = 10.0,
             holder: str = "this site's") -> Diagnosis | None:
    """Why this kit cannot talk TLS to host:port, in one line; None when the handshake is accepted.
    `holder` names whose certificate the server may have refused ("this site's", "this admin kit's")."""
    target = f"{host}:{port}"
    try:
        _, _, root_pem = tls.read()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cadata=root_pem.decode("ascii", errors="replace"))
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
        ctx.set_alpn_protocols(["h2"])
    except (OSError, ssl.SSLError, ValueError) as e:
        return Diagnosis(f"cannot use this kit's certificate files ({e}); unzip the kit lead IT sent again", True)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as conn:
            conn.settimeout(ALERT_WAIT_S)
            try:
                # an accepting gRPC server speaks first (its HTTP/2 settings); one that refused our
                # certificate sends an alert or just closes the connection
                first = conn.recv(1)
            except TimeoutError:
                first = b"?"
            except (ssl.SSLEOFError, ConnectionResetError):
                first = b""
            if not first:
                return Diagnosis(f"the server at {target} closed the connection right after the TLS handshake: "
                                 f"it refused {holder} certificate, which was revoked, has expired, or belongs "
                                 "to another study; ask lead IT for a new kit", True)
    except ssl.SSLCertVerificationError as e:
        return Diagnosis(f"the server at {target} presents a certificate this kit's study CA did not issue "
                         f"({e.verify_message}): this kit belongs to another study, or the server runs another "
                         "study's kit; check with lead IT that both kits come from the same study", True)
    except ssl.SSLError as e:
        if "ALERT" in (e.reason or "").upper():
            alert = (e.reason or "").replace("TLSV1_ALERT_", "").replace("SSLV3_ALERT_", "").replace("_", " ").lower()
            return Diagnosis(f"the server at {target} refused {holder} certificate (TLS alert: {alert}): it "
                             "was revoked, has expired, or belongs to another study; ask lead IT for a new kit", True)
        return Diagnosis(f"TLS with the server at {target} failed ({e.reason or e})", False)
    except OSError as e:
        return Diagnosis(f"nothing answers at {target} ({e.strerror or e}); check the server is running and "
                         "reachable", False)
    return None
