"""TLS for a home cluster: a private CA and a server certificate it signs.

A home cluster has no public name, so no public CA will sign for it: this makes a private
CA (ca.crt, ca.key) and a server certificate it signs (server.crt, server.key) naming
localhost, 127.0.0.1, this machine's hostname and each extra host (the names and addresses
nodes dial). Nodes and clients verify the hub with ``--cafile ca.crt``; keys are 0600.
Uses the ``cryptography`` package (the hub extra), imported only when called.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from pathlib import Path

from linguamq.broker.users import write_private

CA_DAYS = 3650
SERVER_DAYS = 825  # what Apple and browsers accept for a server certificate
FILES = ("ca.crt", "ca.key", "server.crt", "server.key")


def write_certificates(directory: Path, hosts: list[str], *, force: bool = False) -> list[str]:
    """Write the four files; return the names the server certificate holds."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    existing = [f for f in FILES if (directory / f).exists()]
    if existing and not force:
        raise ValueError(f"{directory} already holds {', '.join(existing)} (--force to replace them)")
    names = _names(hosts)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "linguamq home cluster CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))

    def pem_key(k: ec.EllipticCurvePrivateKey) -> str:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption()).decode()

    directory.mkdir(parents=True, exist_ok=True)
    write_private(directory / "ca.key", pem_key(ca_key))
    write_private(directory / "server.key", pem_key(key))
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (directory / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return names


def _names(hosts: list[str]) -> list[str]:
    """localhost, 127.0.0.1, the hostname, then each --host; no duplicates, order kept."""
    out: list[str] = []
    for name in ["localhost", "127.0.0.1", socket.gethostname(), *hosts]:
        name = name.strip()
        if not name:
            continue
        if name not in out:
            out.append(name)
    for name in out:
        if len(name) > 253 or any(c in name for c in " /,*"):
            raise ValueError(f"--host {name!r} is not a DNS name or an IP address")
    return out
