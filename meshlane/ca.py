"""The control plane's certificate authority (DESIGN.md §5).

Owns the CA key and turns workload CSRs into SPIFFE leaves.  Two ways to get one:

* `CertificateAuthority.self_signed()` / `load_or_create(state_dir)`: an ECDSA P-256
  root made and kept by the control plane, persisted in the `cacerts` layout below so
  it survives restarts.
* `CertificateAuthority.from_cacerts_dir(path)`: an operator's own CA in Istio's plug-in
  `cacerts` layout, so leaves chain to the operator's root and outside peers trusting
  that root can talk to the mesh::

      root-cert.pem   trust anchor(s): the bundle every peer verifies against
      cert-chain.pem  ca-cert.pem, then any intermediates up to (optionally) the root
      ca-cert.pem     the signing certificate
      ca-key.pem      its private key (RSA or EC, unencrypted)

What this module must not do: decide *which* identities a caller may have (the node
scoping check, "a node only gets identities of pods on that node", belongs to the
caller), or hand out the CA key in any form: there is no accessor for it, and the only
way it leaves memory is `save_self_signed` writing the control plane's own state dir.
"""
from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshcore import constants as C
from meshcore.errors import BadInputError, NotFoundError
from meshcore.identity import SpiffeId, validate_trust_domain

ROOT_CERT = "root-cert.pem"
CERT_CHAIN = "cert-chain.pem"
CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
# Order matters for `save_self_signed`: the key first and the trust anchor last, so a
# directory holding root-cert.pem was written completely.
CACERTS_FILES = (CA_KEY, CA_CERT, CERT_CHAIN, ROOT_CERT)

ROOT_VALIDITY = timedelta(days=3650)
CLOCK_SKEW = timedelta(minutes=1)  # leaves start a minute early: peers' clocks drift

_EC_HASHES = {"secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384,
              "secp521r1": hashes.SHA512}
_MIN_RSA_BITS = 2048
_LAYOUT_HINT = ("expected Istio's cacerts layout: root-cert.pem, cert-chain.pem, "
                "ca-cert.pem, ca-key.pem")

_PEM = serialization.Encoding.PEM
_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(_PEM) for c in certs)


def _spki(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, _SPKI)


def _describe(cert: x509.Certificate) -> str:
    return f"'{cert.subject.rfc4514_string() or '<empty subject>'}'"


def _hash_for(key, where: str):
    """Signature hash for a CA key; RSA and NIST-curve EC keys only (what every TLS
    stack, including Envoy's BoringSSL, verifies)."""
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < _MIN_RSA_BITS:
            raise BadInputError(f"{where}: RSA key of {key.key_size} bits is too small "
                                f"(at least {_MIN_RSA_BITS})")
        return hashes.SHA256()
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _EC_HASHES:
        return _EC_HASHES[key.curve.name]()
    raise BadInputError(f"{where}: unsupported CA key type {type(key).__name__}",
                        hint="use an RSA (>= 2048 bits) or ECDSA P-256/P-384/P-521 key")


def _is_ca(cert: x509.Certificate) -> tuple[bool, str]:
    """(ok, why not): a certificate that may sign others."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False, "it has no basicConstraints extension"
    if not bc.ca:
        return False, "its basicConstraints say CA:FALSE"
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True, ""
    if not ku.key_cert_sign:
        return False, "its keyUsage lacks keyCertSign"
    return True, ""


def _load_certs(path: Path) -> list[x509.Certificate]:
    data = path.read_bytes()
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise BadInputError(
            f"{path}: not PEM certificates ({exc})",
            hint="each file must hold '-----BEGIN CERTIFICATE-----' blocks") from None
    return certs


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> str:
    """'' if `issuer` signed `cert`, else why not."""
    try:
        cert.verify_directly_issued_by(issuer)
    except ValueError:
        return (f"{_describe(cert)} names issuer '{cert.issuer.rfc4514_string()}', "
                f"not {_describe(issuer)}")
    except InvalidSignature:
        return f"the signature on {_describe(cert)} does not verify with {_describe(issuer)}'s key"
    except (TypeError, UnsupportedAlgorithm) as exc:
        return f"cannot check {_describe(cert)} against {_describe(issuer)}: {exc}"
    return ""


class CertificateAuthority:
    """Signs workload CSRs.  Build with `self_signed`, `from_cacerts_dir` or `load_or_create`."""

    def __init__(self, *, key, cert: x509.Certificate, chain: list[x509.Certificate],
                 roots: list[x509.Certificate], trust_domain: str):
        # `chain`: what follows a leaf on the wire (the signing cert and intermediates,
        # roots left out: peers bring their own anchor).  Empty when a root signs.
        self._key = key
        self._hash = _hash_for(key, "CA key")
        self._cert = cert
        self._chain = list(chain)
        self._roots = list(roots)
        validate_trust_domain(trust_domain)
        self.trust_domain = trust_domain

    def __repr__(self) -> str:
        return (f"CertificateAuthority(trust_domain={self.trust_domain!r}, "
                f"signer={_describe(self._cert)}, intermediates={len(self._chain)})")

    # --- what peers and holders see ----------------------------------------------------
    @property
    def root_pem(self) -> bytes:
        """The trust bundle (all anchors of root-cert.pem)."""
        return _pem(self._roots)

    @property
    def chain_pem(self) -> bytes:
        """Certificates to send after a leaf; b"" when the root signs leaves directly."""
        return _pem(self._chain)

    @property
    def certificate(self) -> x509.Certificate:
        """The signing certificate (public)."""
        return self._cert

    # --- construction ------------------------------------------------------------------
    @classmethod
    def self_signed(cls, trust_domain: str = C.DEFAULT_TRUST_DOMAIN, *,
                    org: str = "meshlane") -> CertificateAuthority:
        """A new ECDSA P-256 root, valid ten years, that signs leaves directly."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                          x509.NameAttribute(NameOID.COMMON_NAME,
                                             f"{org} root CA for {trust_domain}")])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - CLOCK_SKEW)
                .not_valid_after(now + ROOT_VALIDITY)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(ski, critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                               critical=False)
                .sign(key, hashes.SHA256()))
        return cls(key=key, cert=cert, chain=[], roots=[cert], trust_domain=trust_domain)

    @classmethod
    def from_cacerts_dir(cls, path: str | os.PathLike, *,
                         trust_domain: str = C.DEFAULT_TRUST_DOMAIN) -> CertificateAuthority:
        """Load and validate a plug-in CA in Istio's `cacerts` layout (see module doc)."""
        d = Path(path)
        if not d.is_dir():
            raise NotFoundError(f"CA directory {d} does not exist or is not a directory",
                                hint=_LAYOUT_HINT)
        for f in CACERTS_FILES:
            if not (d / f).is_file():
                raise NotFoundError(f"{f} is missing from CA directory {d}", hint=_LAYOUT_HINT)

        roots = _load_certs(d / ROOT_CERT)
        if not roots:
            raise BadInputError(f"{d / ROOT_CERT} holds no certificate")
        chain = _load_certs(d / CERT_CHAIN)
        if not chain:
            raise BadInputError(f"{d / CERT_CHAIN} holds no certificate")
        ca_certs = _load_certs(d / CA_CERT)
        if len(ca_certs) != 1:
            raise BadInputError(f"{d / CA_CERT} must hold exactly one certificate (the "
                                f"signing one), found {len(ca_certs)}",
                                hint="intermediates go in cert-chain.pem")
        cert = ca_certs[0]

        try:
            key = serialization.load_pem_private_key((d / CA_KEY).read_bytes(), password=None)
        except TypeError:
            raise BadInputError(
                f"{d / CA_KEY} is encrypted; meshlane needs the key unencrypted "
                "(protect it with file permissions / a Secret)") from None
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise BadInputError(f"{d / CA_KEY} is not a PEM private key ({exc})") from None
        _hash_for(key, str(d / CA_KEY))
        if _spki(key.public_key()) != _spki(cert.public_key()):
            raise BadInputError(f"{d / CA_KEY} does not match {d / CA_CERT}: the key "
                                f"belongs to a different certificate than {_describe(cert)}",
                                hint="check both files come from the same CA")

        ok, why = _is_ca(cert)
        if not ok:
            raise BadInputError(f"{d / CA_CERT} ({_describe(cert)}) is not a CA certificate: "
                                f"{why}", hint="ca-cert.pem must be the signing (intermediate) CA, "
                                "not a leaf")
        if len(cert.subject) == 0:
            raise BadInputError(f"{d / CA_CERT} has an empty subject; leaves could not "
                                "name their issuer")
        now = _now()
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            raise BadInputError(f"{d / CA_CERT} ({_describe(cert)}) is not valid now: "
                                f"{cert.not_valid_before_utc.isoformat()} .. "
                                f"{cert.not_valid_after_utc.isoformat()}",
                                hint="renew the plug-in CA or check the clock")

        if chain[0] != cert:
            raise BadInputError(f"{d / CERT_CHAIN} must start with ca-cert.pem, but its first "
                                f"certificate is {_describe(chain[0])}")
        # Walk cert-chain.pem: each certificate must be signed by the next, and the last
        # non-root one by an anchor of root-cert.pem.  A copy of the root at the end is
        # allowed (Istio's docs build cert-chain.pem that way) and stripped from the wire.
        send: list[x509.Certificate] = []
        anchor = None
        for i, c in enumerate(chain):
            if c in roots:
                if i + 1 != len(chain):
                    raise BadInputError(f"{d / CERT_CHAIN}: root {_describe(c)} is followed by "
                                        "more certificates; the root must come last")
                anchor = c
                break
            if i > 0:
                ok, why = _is_ca(c)
                if not ok:
                    raise BadInputError(f"{d / CERT_CHAIN}: intermediate {_describe(c)} is "
                                        f"not a CA: {why}")
            send.append(c)
            if i + 1 < len(chain):
                why = _issued_by(c, chain[i + 1])
                if why:
                    raise BadInputError(f"{d / CERT_CHAIN} is broken at position {i + 1}: {why}",
                                        hint="order it signing cert first, root last")
            else:
                reasons = [_issued_by(c, r) for r in roots]
                for r, why in zip(roots, reasons):
                    if not why:
                        anchor = r
                        break
                else:
                    raise BadInputError(
                        f"{d / CERT_CHAIN} does not lead to {d / ROOT_CERT}: "
                        + "; ".join(reasons),
                        hint="root-cert.pem must hold the root that issued the last "
                             "certificate of cert-chain.pem")
        if anchor is None:  # the chain ended on a root without reaching it by signature
            raise BadInputError(f"{d / CERT_CHAIN} does not lead to {d / ROOT_CERT}")
        if anchor != cert:
            # ca-cert.pem is a root itself only when the operator plugs in the root
            ok, why = _is_ca(anchor)
            if not ok:
                raise BadInputError(f"{d / ROOT_CERT}: anchor {_describe(anchor)} is not a "
                                    f"CA: {why}")
        return cls(key=key, cert=cert, chain=send, roots=roots, trust_domain=trust_domain)

    def save_self_signed(self, path: str | os.PathLike) -> None:
        """Persist this self-signed CA in the `cacerts` layout (ca-key.pem mode 0600).

        Refuses to overwrite: a state directory with a CA in it is loaded, never replaced.
        Plug-in CAs are not copied anywhere: the operator's directory is the source.
        """
        if self._chain or self._roots != [self._cert]:
            raise BadInputError("only a self-signed CA is saved by meshlane; a plug-in CA "
                                "stays in the operator's cacerts directory")
        d = Path(path)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        present = [f for f in CACERTS_FILES if (d / f).exists()]
        if present:
            raise BadInputError(f"refusing to overwrite {', '.join(present)} in {d}",
                                hint="load it with load_or_create, or remove the directory "
                                     "to start a new root (every workload cert changes)")
        key_pem = self._key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        cert_pem = _pem([self._cert])
        contents = {CA_KEY: (key_pem, 0o600), CA_CERT: (cert_pem, 0o644),
                    CERT_CHAIN: (cert_pem, 0o644), ROOT_CERT: (cert_pem, 0o644)}
        for name in CACERTS_FILES:
            data, mode = contents[name]
            _write_new(d / name, data, mode)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike, *,
                       trust_domain: str = C.DEFAULT_TRUST_DOMAIN,
                       org: str = "meshlane") -> CertificateAuthority:
        """The control plane's CA kept in `path`: loaded if there, created otherwise."""
        d = Path(path)
        present = [f for f in CACERTS_FILES if (d / f).exists()]
        if len(present) == len(CACERTS_FILES):
            return cls.from_cacerts_dir(d, trust_domain=trust_domain)
        if present:
            missing = [f for f in CACERTS_FILES if f not in present]
            raise BadInputError(f"CA state directory {d} is incomplete: has "
                                f"{', '.join(present)} but not {', '.join(missing)}",
                                hint="restore the missing files, or remove the directory to "
                                     "start a new root (every workload cert changes)")
        ca = cls.self_signed(trust_domain, org=org)
        ca.save_self_signed(d)
        return ca

    # --- issuing -----------------------------------------------------------------------
    def sign_csr(self, csr_pem: bytes, *, expected: SpiffeId, ttl: timedelta) -> bytes:
        """Issue a leaf (PEM) for `expected` from a holder's CSR.

        The CSR must verify and request exactly one SAN, the URI `expected.uri`; its
        subject and any other requested extensions are ignored.  The leaf has an empty
        subject and a critical URI SAN (the SPIFFE convention), CA:FALSE, serverAuth +
        clientAuth, and is valid from a minute ago for `ttl` (cut short at the signing
        chain's own expiry, which a longer leaf could not outlive anyway).
        """
        if not isinstance(ttl, timedelta) or ttl <= timedelta(0):
            raise BadInputError(f"certificate TTL must be a positive timedelta, got {ttl!r}")
        if expected.trust_domain != self.trust_domain:
            raise BadInputError(f"this CA issues identities of trust domain "
                                f"{self.trust_domain!r}, not {expected.uri}")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except (ValueError, TypeError) as exc:
            raise BadInputError(
                f"CSR for {expected} is not a PEM certificate request: {exc}") from None
        try:
            valid = csr.is_signature_valid
            pub = csr.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise BadInputError(f"CSR for {expected}: unreadable key or signature: {exc}") from None
        if not valid:
            raise BadInputError(f"CSR for {expected}: signature does not verify "
                                "(tampered in transit, or signed with another key)")
        if isinstance(pub, ec.EllipticCurvePublicKey):
            if pub.curve.name not in _EC_HASHES:
                raise BadInputError(f"CSR for {expected}: unsupported curve {pub.curve.name}",
                                    hint="use ECDSA P-256")
        elif isinstance(pub, rsa.RSAPublicKey):
            if pub.key_size < _MIN_RSA_BITS:
                raise BadInputError(f"CSR for {expected}: RSA key of {pub.key_size} bits is "
                                    f"too small (at least {_MIN_RSA_BITS})")
        else:
            raise BadInputError(f"CSR for {expected}: unsupported key type "
                                f"{type(pub).__name__}", hint="use ECDSA P-256")

        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise BadInputError(f"CSR carries no subjectAltName; expected the URI SAN "
                                f"{expected.uri}") from None
        except ValueError as exc:  # duplicate or malformed extensions
            raise BadInputError(f"CSR for {expected}: bad extensions: {exc}") from None
        names = list(san)
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        others = [n for n in names if not isinstance(n, x509.UniformResourceIdentifier)]
        if others:
            listed = ", ".join(str(n.value) for n in others)
            raise BadInputError(f"CSR requests non-URI SANs ({listed}); "
                                f"a workload certificate carries only the URI SAN {expected.uri}")
        if len(uris) != 1:
            raise BadInputError(f"CSR requests {len(uris)} URI SANs ({', '.join(uris)}) but "
                                f"exactly one, {expected.uri}, was expected")
        if uris[0] != expected.uri:
            raise BadInputError(f"CSR requests {uris[0]} but {expected.uri} was expected")

        now = _now()
        not_after = min([now + ttl] + [c.not_valid_after_utc for c in [self._cert, *self._chain]])
        try:
            ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self._cert.public_key())
        rsa_leaf = isinstance(pub, rsa.RSAPublicKey)
        leaf = (x509.CertificateBuilder()
                .subject_name(x509.Name([]))
                .issuer_name(self._cert.subject)
                .public_key(pub)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - CLOCK_SKEW)
                .not_valid_after(not_after)
                # critical because the subject is empty (RFC 5280 §4.2.1.6)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(expected.uri)]), critical=True)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=rsa_leaf, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
                .add_extension(aki, critical=False)
                .sign(self._key, self._hash))
        return leaf.public_bytes(_PEM)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write `path` atomically, failing if it exists; `mode` set before any byte lands."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # umask can only narrow `mode`; make it exact
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # unlike rename, fails instead of replacing an existing file
    except FileExistsError:
        raise BadInputError(f"refusing to overwrite {path}") from None
    finally:
        os.unlink(tmp)
