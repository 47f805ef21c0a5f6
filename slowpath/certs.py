"""Workload certificates, the holder's side (DESIGN.md §5).

Owns key generation, the CSR a ztunnel sends for each local workload identity, the
`WorkloadCert` bundle it gets back (and when to renew it), and reading the SPIFFE ID out
of a peer's leaf.  It must not sign anything: only the control plane's CA
(`meshlane.ca`) holds a CA key, and nodes only ever see their leaves and the trust bundle.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshcore.errors import BadInputError
from meshcore.identity import SpiffeId


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key; it never leaves the process that generated it."""
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_csr(key: ec.EllipticCurvePrivateKey, spiffe: SpiffeId) -> bytes:
    """A PEM CSR whose only request is the URI SAN `spiffe.uri` (empty subject, like Istio).

    The SAN is marked critical because the subject is empty (RFC 5280 §4.2.1.6); the CA
    makes the same choice on the leaf regardless of what the CSR says.
    """
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe.uri)]),
                          critical=True)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def uri_sans(cert: x509.Certificate) -> list[str]:
    """Every URI SAN of `cert`, in order (a SPIFFE leaf has exactly one)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def spiffe_of(cert: x509.Certificate) -> SpiffeId | None:
    """The single URI SAN of `cert` as a SpiffeId; None without one.

    BadInputError if there are several URI SANs (a SPIFFE leaf has exactly one) or the one
    URI SAN is not a SPIFFE ID.
    """
    uris = uri_sans(cert)
    if not uris:
        return None
    if len(uris) > 1:
        raise BadInputError(f"certificate serial {cert.serial_number:#x} carries "
                            f"{len(uris)} URI SANs ({', '.join(uris)}); a SPIFFE leaf has "
                            "exactly one")
    return SpiffeId.parse(uris[0])


def peer_spiffe_from_der(der: bytes) -> SpiffeId | None:
    """SPIFFE ID of a peer leaf given as DER (what `getpeercert(binary_form=True)` returns)."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise BadInputError(f"peer certificate is not valid DER: {exc}") from None
    return spiffe_of(cert)


def _pem_certs(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem) if pem.strip() else []
    except ValueError as exc:
        raise BadInputError(f"{what} is not PEM certificates: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class WorkloadCert:
    """Everything a ztunnel needs to speak for one identity.

    `key_pem` is the PKCS#8 PEM of the holder's own key.  `chain_pem` is what follows
    the leaf on the wire (intermediates; empty when the root signs directly), `root_pem`
    the trust bundle peers are verified against.  Times are timezone-aware UTC.
    """

    spiffe: SpiffeId
    key_pem: bytes
    cert_pem: bytes
    chain_pem: bytes
    root_pem: bytes
    not_before: datetime
    not_after: datetime

    def __repr__(self) -> str:  # never print key material into a log line
        return (f"WorkloadCert(spiffe={self.spiffe.uri!r}, "
                f"not_before={self.not_before.isoformat()}, "
                f"not_after={self.not_after.isoformat()})")

    @property
    def renew_at(self) -> datetime:
        """Half-life, as ztunnel does: leaves plenty of time to retry a failing CA."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def needs_renewal(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(timezone.utc)) >= self.renew_at

    @property
    def ttl(self) -> timedelta:
        return self.not_after - self.not_before

    @classmethod
    def from_pems(cls, *, spiffe: SpiffeId, key_pem: bytes, cert_pem: bytes,
                  chain_pem: bytes, root_pem: bytes) -> WorkloadCert:
        """Build from what the CA returned, checking the leaf matches the request.

        The leaf must carry `spiffe` as its URI SAN and certify the public half of
        `key_pem`; a mismatch means the CA answered a different request.
        """
        certs = _pem_certs(cert_pem, f"leaf for {spiffe}")
        if len(certs) != 1:
            raise BadInputError(f"leaf for {spiffe}: expected one certificate, got "
                                f"{len(certs)}")
        leaf = certs[0]
        _pem_certs(chain_pem, f"chain for {spiffe}")
        if not _pem_certs(root_pem, f"trust bundle for {spiffe}"):
            raise BadInputError(f"trust bundle for {spiffe} is empty",
                                hint="check the CA's root-cert.pem")
        got = spiffe_of(leaf)
        if got != spiffe:
            raise BadInputError(f"leaf carries {got} but {spiffe} was requested")
        key = serialization.load_pem_private_key(key_pem, password=None)
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if (key.public_key().public_bytes(serialization.Encoding.DER, spki)
                != leaf.public_key().public_bytes(serialization.Encoding.DER, spki)):
            raise BadInputError(f"leaf for {spiffe} certifies a different key than the "
                                "one this ztunnel generated")
        return cls(spiffe=spiffe, key_pem=key_pem, cert_pem=cert_pem, chain_pem=chain_pem,
                   root_pem=root_pem, not_before=leaf.not_valid_before_utc,
                   not_after=leaf.not_valid_after_utc)
