"""An operator's own PKI for interop tests: root -> intermediate, written in Istio's
`cacerts` layout (root-cert.pem, cert-chain.pem, ca-cert.pem, ca-key.pem) so a lab can
be started with it as its plug-in CA, and leaves issued from the intermediate the way an
operator would bring an outside HBONE peer (a real Envoy) into the mesh.

`issue()` makes a proper SPIFFE leaf; `issue_leaf()` makes any SAN set (DNS only, two
URIs, a foreign trust domain, ...) for tests of what a ztunnel must refuse.
"""
from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                         crl_sign=True, encipher_only=False, decipher_only=False)


class OperatorPki:
    """Root -> intermediate, written as Istio `cacerts`; issues leaves like the mesh CA."""

    def __init__(self, directory: Path):
        now = datetime.datetime.now(datetime.timezone.utc)
        self.dir = directory
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        root_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "interop-operator"),
                               x509.NameAttribute(NameOID.COMMON_NAME, "interop root CA")])
        root_ski = x509.SubjectKeyIdentifier.from_public_key(self.root_key.public_key())
        self.root = (
            x509.CertificateBuilder()
            .subject_name(root_name).issuer_name(root_name)
            .public_key(self.root_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .add_extension(root_ski, critical=False)
            .sign(self.root_key, hashes.SHA256())
        )
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "interop-operator"),
                             x509.NameAttribute(NameOID.COMMON_NAME, "interop intermediate CA")])
        self.ca_ski = x509.SubjectKeyIdentifier.from_public_key(self.ca_key.public_key())
        self.ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name).issuer_name(root_name)
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .add_extension(self.ca_ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski),
                           critical=False)
            .sign(self.root_key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "root-cert.pem").write_bytes(_pem(self.root))
        (directory / "cert-chain.pem").write_bytes(_pem(self.ca, self.root))
        (directory / "ca-cert.pem").write_bytes(_pem(self.ca))
        key_path = directory / "ca-key.pem"
        key_path.write_bytes(_key_pem(self.ca_key))
        key_path.chmod(0o600)

    @property
    def root_file(self) -> str:
        return str(self.dir / "root-cert.pem")

    def issue(self, spiffe: str, out: Path) -> tuple[str, str]:
        """A SPIFFE leaf from the intermediate; returns (cert file: leaf + intermediate, key file)."""
        return self.issue_leaf(out, uris=[spiffe])

    def issue_leaf(self, out: Path, *, uris: list[str] = (), dns: list[str] = ()) -> tuple[str, str]:
        """A leaf from the intermediate with exactly these URI and DNS SANs (at least one)."""
        now = datetime.datetime.now(datetime.timezone.utc)
        key = ec.generate_private_key(ec.SECP256R1())
        sans = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName(d) for d in dns]
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                self.ca_ski), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        out.mkdir(parents=True, exist_ok=True)
        cert_file, key_file = out / "cert-chain.pem", out / "key.pem"
        cert_file.write_bytes(_pem(leaf, self.ca))
        key_file.write_bytes(_key_pem(key))
        key_file.chmod(0o600)
        return str(cert_file), str(key_file)
