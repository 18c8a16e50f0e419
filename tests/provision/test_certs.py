"""Certificates: every cert chains to the study CA (cryptography and openssl), with the right names and usages."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from provision.certs import create_ca, issue_credential, load_ca, save_ca
from provision.project import ClientSpec
from runtime.errors import CertificateError
from runtime.identity import Identity, Kind, Role, identity_from_cert

NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


def cert_of(kit: Path) -> x509.Certificate:
    name = "server.crt" if (kit / "startup" / "server.crt").exists() else "client.crt"
    return x509.load_pem_x509_certificate((kit / "startup" / name).read_bytes())


def ca_of(provisioned) -> x509.Certificate:
    return x509.load_pem_x509_certificate((provisioned.study_dir / "state" / "rootCA.pem").read_bytes())


def test_ca_is_a_critical_ca_that_signs_certs_and_crls(provisioned) -> None:
    ca = ca_of(provisioned)
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    assert ca.not_valid_after_utc - NOW == dt.timedelta(days=1825)  # outlives its kits (360 days)


def test_ca_key_is_0600_in_state_and_never_in_a_kit(provisioned) -> None:
    key_path = provisioned.study_dir / "state" / "rootCA.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    ca_key = key_path.read_bytes()
    for kit in provisioned.result.kits:
        for path in kit.kit_dir.rglob("*"):
            assert not path.name.startswith("rootCA.key")
            if path.is_file():
                assert path.read_bytes() != ca_key


def test_every_cert_chains_to_the_ca_with_cryptography(provisioned) -> None:
    ca = ca_of(provisioned)
    policy = PolicyBuilder().store(Store([ca])).time(NOW + dt.timedelta(days=1))
    for kit in provisioned.result.kits:
        cert = cert_of(kit.kit_dir)
        cert.verify_directly_issued_by(ca)
        if kit.kind is Kind.SERVER:
            chain = policy.build_server_verifier(x509.DNSName("localhost")).verify(cert, [])
        else:
            chain = policy.build_client_verifier().verify(cert, []).chain
        assert chain[-1] == ca
        assert (kit.kit_dir / "startup" / "rootCA.pem").read_bytes() == ca.public_bytes(serialization.Encoding.PEM)


def test_every_cert_chains_to_the_ca_with_openssl_verify(provisioned) -> None:
    ca_file = provisioned.study_dir / "state" / "rootCA.pem"
    for kit in provisioned.result.kits:
        cert_file = kit.kit_dir / "startup" / ("server.crt" if kit.kind is Kind.SERVER else "client.crt")
        purpose = "sslserver" if kit.kind is Kind.SERVER else "sslclient"
        # -attime: the certs are issued at a pinned past NOW, so check them as of that moment.
        at = str(int((NOW + dt.timedelta(days=1)).timestamp()))
        cmd = ["openssl", "verify", "-attime", at, "-CAfile", str(ca_file), "-purpose", purpose, str(cert_file)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip() == f"{cert_file}: OK"


def test_openssl_rejects_a_cert_from_another_ca(provisioned, tmp_path: Path) -> None:
    other = create_ca("other-study", NOW, 30)
    other_ca = tmp_path / "other.pem"
    other_ca.write_bytes(other.cert_pem)
    cert_file = provisioned.kit("site-1") / "startup" / "client.crt"
    done = subprocess.run(
        ["openssl", "verify", "-CAfile", str(other_ca), str(cert_file)], capture_output=True, text=True, check=False
    )
    assert done.returncode != 0


def test_server_cert_has_its_host_names_and_server_auth(provisioned) -> None:
    cert = cert_of(provisioned.kit("localhost"))
    assert identity_from_cert(cert) == Identity(name="localhost", org="coordinating-center", kind=Kind.SERVER)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    policy = PolicyBuilder().store(Store([ca_of(provisioned)])).time(NOW)
    policy.build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1"))).verify(cert, [])
    with pytest.raises(x509.verification.VerificationError):
        policy.build_server_verifier(x509.DNSName("elsewhere.example.org")).verify(cert, [])


@pytest.mark.parametrize(
    ("name", "org"), [("site-1", "hospital-a"), ("site-2", "hospital-b"), ("site-3", "hospital-c")]
)
def test_client_cert_names_the_site_and_its_org(provisioned, name: str, org: str) -> None:
    cert = cert_of(provisioned.kit(name))
    assert identity_from_cert(cert) == Identity(name=name, org=org, kind=Kind.CLIENT)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"fedkit://example-study/client/{name}"]


@pytest.mark.parametrize(("name", "role"), [("admin@study.org", Role.PROJECT_ADMIN), ("lead@study.org", Role.LEAD)])
def test_admin_cert_carries_name_org_and_role(provisioned, name: str, role: Role) -> None:
    cert = cert_of(provisioned.kit(name))
    assert identity_from_cert(cert) == Identity(name=name, org="coordinating-center", kind=Kind.ADMIN, role=role)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_keys_are_p256_0600_and_match_their_certs(provisioned) -> None:
    for kit in provisioned.result.kits:
        stem = "server" if kit.kind is Kind.SERVER else "client"
        key_path = kit.kit_dir / "startup" / f"{stem}.key"
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
        assert key.public_key() == cert_of(kit.kit_dir).public_key()


def test_serials_are_unique_and_validity_follows_project(provisioned) -> None:
    certs = [cert_of(k.kit_dir) for k in provisioned.result.kits]
    assert len({c.serial_number for c in certs}) == len(certs)
    for cert in certs:
        assert cert.not_valid_after_utc == NOW + dt.timedelta(days=360)
        assert cert.not_valid_before_utc < NOW


def test_leaf_validity_is_capped_at_the_ca_expiry() -> None:
    ca = create_ca("short", NOW, validity_days=10)
    credential = issue_credential(ca, ClientSpec(type="client", name="s", org="o"), NOW, 360, "short")
    assert credential.cert.not_valid_after_utc == ca.cert.not_valid_after_utc


def test_ca_round_trips_and_refuses_to_overwrite(tmp_path: Path) -> None:
    ca = create_ca("s", NOW, 30)
    save_ca(ca, tmp_path / "ca.pem", tmp_path / "ca.key")
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    loaded = load_ca(tmp_path / "ca.pem", tmp_path / "ca.key", NOW)
    assert loaded.cert == ca.cert
    with pytest.raises(FileExistsError):
        save_ca(create_ca("s", NOW, 30), tmp_path / "ca.pem", tmp_path / "ca.key")


def test_load_ca_refuses_expired_and_mismatched(tmp_path: Path) -> None:
    ca = create_ca("s", NOW, 30)
    save_ca(ca, tmp_path / "ca.pem", tmp_path / "ca.key")
    with pytest.raises(CertificateError, match="expired on 2025-03-31"):
        load_ca(tmp_path / "ca.pem", tmp_path / "ca.key", NOW + dt.timedelta(days=31))
    other = create_ca("s", NOW, 30)
    save_ca(other, tmp_path / "other.pem", tmp_path / "other.key")
    with pytest.raises(CertificateError, match="does not match ca.pem"):
        load_ca(tmp_path / "ca.pem", tmp_path / "other.key", NOW)
    with pytest.raises(CertificateError, match="cannot load the study CA"):
        load_ca(tmp_path / "missing.pem", tmp_path / "ca.key", NOW)
