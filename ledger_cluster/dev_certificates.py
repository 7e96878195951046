"""Development TLS material: a CA and one certificate it signs, valid for the loopback names
and addresses, usable as a server and as a client certificate (so one file pair serves every
node, the gateway and the tools of a local cluster, for mutual TLS).

Marked as development material in every subject: a real deployment issues its own
certificates from its own CA, one per process, for the names its processes are reached by.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEVELOPMENT_MARK = "ledger-cluster DEVELOPMENT ONLY"
VALIDITY_DAYS = 365
# Where the local cluster's processes may be reached (FAULTS.md puts nodes on .1 to .3).
LOOPBACK_NAMES = ("localhost",)
LOOPBACK_ADDRESSES = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "::1")
CA_CERTIFICATE_FILE = "ca.pem"
CERTIFICATE_FILE = "cert.pem"
KEY_FILE = "key.pem"


@dataclass(frozen=True)
class DevelopmentCertificates:
    ca_path: Path
    certificate_path: Path
    key_path: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEVELOPMENT_MARK),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
    )


def write_development_certificates(directory: Path) -> DevelopmentCertificates:
    """Write ca.pem, cert.pem and key.pem (readable by the owner only) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("ledger-cluster development CA")
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alternative_names: list[x509.GeneralName] = [x509.DNSName(name) for name in LOOPBACK_NAMES]
    alternative_names += [x509.IPAddress(ipaddress.ip_address(address)) for address in LOOPBACK_ADDRESSES]
    certificate = (
        _builder(_name("ledger-cluster development process"), ca_name, key.public_key())
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = DevelopmentCertificates(
        ca_path=directory / CA_CERTIFICATE_FILE,
        certificate_path=directory / CERTIFICATE_FILE,
        key_path=directory / KEY_FILE,
    )
    paths.ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    descriptor = os.open(paths.key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as key_file:
        key_file.write(key_bytes)
    return paths
