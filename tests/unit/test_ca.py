"""The control plane's CA (meshlane.ca) and the holder's side of issuance (slowpath.certs)."""
from __future__ import annotations

import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from meshcore.errors import BadInputError, NotFoundError
from meshcore.identity import SpiffeId
from meshlane.ca import CertificateAuthority
from slowpath import certs

WEB = SpiffeId(namespace="shop", service_account="web")
DB = SpiffeId(namespace="shop", service_account="db")
DAY = timedelta(hours=24)


# --- helpers (also used by test_tls_contexts) ----------------------------------------
def ca_cert(name: str, key, issuer_name: str | None = None, issuer_key=None, *,
            ca: bool = True, days: int = 365) -> x509.Certificate:
    """A CA (or, with ca=False, a non-CA) certificate; self-signed without an issuer."""
    now = datetime.now(timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name or name)])
    signer = issuer_key or key
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key())
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                                         encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(ski, critical=False)
            .add_extension(aki, critical=False)
            .sign(signer, hashes.SHA256()))


def pem(*cs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in cs)


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_cacerts_dir(d: Path, *, levels: int = 1, root_in_chain: bool = True) -> dict:
    """Operator-style plug-in CA: RSA root -> `levels` EC intermediates; the last signs."""
    d.mkdir(parents=True, exist_ok=True)
    root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root = ca_cert("Operator Root", root_key)
    issuer, issuer_key, inters = root, root_key, []
    for i in range(levels):
        k = ec.generate_private_key(ec.SECP256R1())
        c = ca_cert(f"Operator Intermediate {i}", k, issuer.subject.rfc4514_string()[3:],
                    issuer_key)
        inters.insert(0, c)  # signing cert first
        issuer, issuer_key = c, k
    (d / "root-cert.pem").write_bytes(pem(root))
    (d / "ca-cert.pem").write_bytes(pem(inters[0]))
    (d / "ca-key.pem").write_bytes(key_pem(issuer_key))
    (d / "cert-chain.pem").write_bytes(pem(*inters, *([root] if root_in_chain else [])))
    return dict(root=root, root_key=root_key, intermediates=inters, signing_key=issuer_key)


def issue(ca: CertificateAuthority, sid: SpiffeId, ttl: timedelta = DAY) -> certs.WorkloadCert:
    key = certs.generate_key()
    leaf = ca.sign_csr(certs.make_csr(key, sid), expected=sid, ttl=ttl)
    return certs.WorkloadCert.from_pems(spiffe=sid, key_pem=certs.key_to_pem(key),
                                        cert_pem=leaf, chain_pem=ca.chain_pem,
                                        root_pem=ca.root_pem)


def verify_client_chain(wc: certs.WorkloadCert, root_pem: bytes | None = None):
    """Path validation with cryptography's webpki verifier (client profile: URI SAN)."""
    store = Store(x509.load_pem_x509_certificates(root_pem or wc.root_pem))
    leaf = x509.load_pem_x509_certificate(wc.cert_pem)
    inters = x509.load_pem_x509_certificates(wc.chain_pem) if wc.chain_pem else []
    return PolicyBuilder().store(store).build_client_verifier().verify(leaf, inters)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.self_signed()


# --- self-signed root ----------------------------------------------------------------
def test_self_signed_root_shape(ca):
    root = x509.load_pem_x509_certificate(ca.root_pem)
    assert ca.chain_pem == b""
    assert ca.certificate == root
    assert root.subject == root.issuer
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp256r1"
    life = root.not_valid_after_utc - root.not_valid_before_utc
    assert timedelta(days=3649) < life < timedelta(days=3651)
    root.verify_directly_issued_by(root)
    assert "O=meshlane" in root.subject.rfc4514_string()


def test_ca_never_exposes_its_key(ca):
    public = [n for n in dir(ca) if not n.startswith("_")]
    assert not [n for n in public if "key" in n.lower()]
    assert "PRIVATE" not in repr(ca)


def test_signed_leaf_verifies_and_has_spiffe_shape(ca):
    wc = issue(ca, WEB)
    verified = verify_client_chain(wc)
    assert verified.subjects == [x509.UniformResourceIdentifier(WEB.uri)]
    leaf = x509.load_pem_x509_certificate(wc.cert_pem)
    leaf.verify_directly_issued_by(ca.certificate)
    assert len(leaf.subject) == 0  # Istio leaves it empty
    ext = leaf.extensions
    san = ext.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical, "empty subject requires a critical SAN"
    assert list(san.value) == [x509.UniformResourceIdentifier(WEB.uri)]
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    root_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == root_ski.value.digest
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())
    assert certs.peer_spiffe_from_der(leaf.public_bytes(serialization.Encoding.DER)) == WEB


def test_leaf_from_other_root_does_not_verify(ca):
    other = CertificateAuthority.self_signed()
    wc = issue(other, WEB)
    with pytest.raises(VerificationError):
        verify_client_chain(wc, root_pem=ca.root_pem)


def test_serials_are_random(ca):
    a, b = issue(ca, WEB), issue(ca, WEB)
    sa = x509.load_pem_x509_certificate(a.cert_pem).serial_number
    sb = x509.load_pem_x509_certificate(b.cert_pem).serial_number
    assert sa != sb and sa > 0 and sb > 0


@pytest.mark.parametrize("ttl", [timedelta(hours=1), timedelta(hours=24), timedelta(days=3)])
def test_ttl_honoured(ca, ttl):
    before = datetime.now(timezone.utc)
    wc = issue(ca, WEB, ttl)
    after = datetime.now(timezone.utc)
    # x509 times have second precision
    assert before + ttl - timedelta(seconds=1) <= wc.not_after <= after + ttl
    assert before - timedelta(minutes=1, seconds=1) <= wc.not_before <= after - timedelta(minutes=1)


@pytest.mark.parametrize("ttl", [timedelta(0), timedelta(seconds=-5), 3600])
def test_bad_ttl_refused(ca, ttl):
    csr = certs.make_csr(certs.generate_key(), WEB)
    with pytest.raises(BadInputError, match="TTL must be a positive timedelta"):
        ca.sign_csr(csr, expected=WEB, ttl=ttl)


def test_leaf_cut_short_at_signer_expiry(tmp_path):
    # A plug-in intermediate expiring in 2 days cannot issue a 3-day leaf.
    info = make_cacerts_dir(tmp_path)
    k = ec.generate_private_key(ec.SECP256R1())
    short = ca_cert("Short Intermediate", k, "Operator Root", info["root_key"], days=2)
    (tmp_path / "ca-cert.pem").write_bytes(pem(short))
    (tmp_path / "ca-key.pem").write_bytes(key_pem(k))
    (tmp_path / "cert-chain.pem").write_bytes(pem(short, info["root"]))
    plug = CertificateAuthority.from_cacerts_dir(tmp_path)
    wc = issue(plug, WEB, timedelta(days=3))
    assert wc.not_after == short.not_valid_after_utc


# --- CSR refusals --------------------------------------------------------------------
def _csr(key, names, *, subject=x509.Name([])) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_csr_with_wrong_san_refused(ca):
    csr = certs.make_csr(certs.generate_key(), DB)
    with pytest.raises(BadInputError) as info:
        ca.sign_csr(csr, expected=WEB, ttl=DAY)
    assert DB.uri in str(info.value) and WEB.uri in str(info.value)


def test_csr_with_two_sans_refused(ca):
    csr = _csr(certs.generate_key(), [x509.UniformResourceIdentifier(WEB.uri),
                                      x509.UniformResourceIdentifier(DB.uri)])
    with pytest.raises(BadInputError, match="requests 2 URI SANs") as info:
        ca.sign_csr(csr, expected=WEB, ttl=DAY)
    assert WEB.uri in str(info.value)


def test_csr_with_extra_dns_san_refused(ca):
    csr = _csr(certs.generate_key(), [x509.UniformResourceIdentifier(WEB.uri),
                                      x509.DNSName("web.shop.svc")])
    with pytest.raises(BadInputError, match="non-URI SANs.*web.shop.svc"):
        ca.sign_csr(csr, expected=WEB, ttl=DAY)


def test_csr_without_san_refused(ca):
    csr = _csr(certs.generate_key(), [])
    with pytest.raises(BadInputError, match="no subjectAltName"):
        ca.sign_csr(csr, expected=WEB, ttl=DAY)


def test_tampered_csr_refused(ca):
    # Same-length edit of the requested SAN: the CSR still parses and asks for exactly
    # the expected identity, so only the signature check can catch it.
    evil = SpiffeId(namespace="shop", service_account="wex")
    der = x509.load_pem_x509_csr(certs.make_csr(certs.generate_key(), WEB)) \
        .public_bytes(serialization.Encoding.DER)
    assert der.count(b"/sa/web") == 1
    tampered = x509.load_der_x509_csr(der.replace(b"/sa/web", b"/sa/wex"))
    with pytest.raises(BadInputError, match="signature does not verify"):
        ca.sign_csr(tampered.public_bytes(serialization.Encoding.PEM), expected=evil, ttl=DAY)


def test_garbage_csr_refused(ca):
    with pytest.raises(BadInputError, match="not a PEM certificate request"):
        ca.sign_csr(b"hello", expected=WEB, ttl=DAY)


def test_small_rsa_csr_key_refused(ca):
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    csr = _csr(small, [x509.UniformResourceIdentifier(WEB.uri)])
    with pytest.raises(BadInputError, match="1024 bits is too small"):
        ca.sign_csr(csr, expected=WEB, ttl=DAY)


def test_foreign_trust_domain_refused(ca):
    foreign = SpiffeId(trust_domain="other.example", namespace="shop", service_account="web")
    csr = certs.make_csr(certs.generate_key(), foreign)
    with pytest.raises(BadInputError, match="trust domain 'cluster.local'.*other.example"):
        ca.sign_csr(csr, expected=foreign, ttl=DAY)


def test_csr_subject_is_ignored(ca):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")])
    leaf = ca.sign_csr(_csr(certs.generate_key(), [x509.UniformResourceIdentifier(WEB.uri)],
                            subject=name), expected=WEB, ttl=DAY)
    assert len(x509.load_pem_x509_certificate(leaf).subject) == 0


# --- persistence ---------------------------------------------------------------------
def test_load_or_create_persists_root(tmp_path):
    state = tmp_path / "ca"
    first = CertificateAuthority.load_or_create(state)
    assert sorted(p.name for p in state.iterdir()) == [
        "ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"]
    assert stat.S_IMODE((state / "ca-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    mtime = (state / "ca-key.pem").stat().st_mtime_ns

    second = CertificateAuthority.load_or_create(state)
    assert second.root_pem == first.root_pem
    assert second.chain_pem == b""
    assert (state / "ca-key.pem").stat().st_mtime_ns == mtime  # loaded, not rewritten
    # the reloaded CA signs with the same key: its leaves verify under the first root
    wc = issue(second, WEB)
    assert verify_client_chain(wc, root_pem=first.root_pem).subjects == [
        x509.UniformResourceIdentifier(WEB.uri)]


def test_load_or_create_refuses_incomplete_state(tmp_path):
    CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / "root-cert.pem").unlink()
    with pytest.raises(BadInputError, match="incomplete.*not root-cert.pem"):
        CertificateAuthority.load_or_create(tmp_path)


def test_save_self_signed_refuses_overwrite(tmp_path, ca):
    ca.save_self_signed(tmp_path)
    with pytest.raises(BadInputError, match="refusing to overwrite"):
        CertificateAuthority.self_signed().save_self_signed(tmp_path)
    assert CertificateAuthority.from_cacerts_dir(tmp_path).root_pem == ca.root_pem


def test_plugin_ca_is_not_saved(tmp_path):
    make_cacerts_dir(tmp_path / "in")
    plug = CertificateAuthority.from_cacerts_dir(tmp_path / "in")
    with pytest.raises(BadInputError, match="only a self-signed CA"):
        plug.save_self_signed(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- plug-in CA ----------------------------------------------------------------------
@pytest.mark.parametrize("levels,root_in_chain", [(1, True), (1, False), (2, True)])
def test_from_cacerts_dir_issues_leaves_chaining_to_root(tmp_path, levels, root_in_chain):
    info = make_cacerts_dir(tmp_path, levels=levels, root_in_chain=root_in_chain)
    plug = CertificateAuthority.from_cacerts_dir(tmp_path)
    assert plug.root_pem == pem(info["root"])
    # what follows the leaf: the intermediates, never the root
    assert plug.chain_pem == pem(*info["intermediates"])
    wc = issue(plug, WEB)
    verified = verify_client_chain(wc)
    assert verified.chain[-1] == info["root"]
    assert len(verified.chain) == levels + 2
    leaf = x509.load_pem_x509_certificate(wc.cert_pem)
    assert leaf.issuer == info["intermediates"][0].subject


def test_from_cacerts_dir_accepts_rsa_signing_key(tmp_path):
    info = make_cacerts_dir(tmp_path)
    (tmp_path / "ca-cert.pem").write_bytes(pem(info["root"]))
    (tmp_path / "ca-key.pem").write_bytes(key_pem(info["root_key"]))
    (tmp_path / "cert-chain.pem").write_bytes(pem(info["root"]))
    plug = CertificateAuthority.from_cacerts_dir(tmp_path)  # operator plugs the root in
    assert plug.chain_pem == b""
    wc = issue(plug, WEB)
    leaf = x509.load_pem_x509_certificate(wc.cert_pem)
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    assert verify_client_chain(wc).chain[-1] == info["root"]


@pytest.mark.parametrize("missing", ["root-cert.pem", "cert-chain.pem", "ca-cert.pem",
                                     "ca-key.pem"])
def test_from_cacerts_dir_missing_file(tmp_path, missing):
    make_cacerts_dir(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(NotFoundError) as info:
        CertificateAuthority.from_cacerts_dir(tmp_path)
    assert missing in str(info.value) and str(tmp_path) in str(info.value)


def test_from_cacerts_dir_missing_dir(tmp_path):
    with pytest.raises(NotFoundError, match="does not exist"):
        CertificateAuthority.from_cacerts_dir(tmp_path / "nope")


def test_from_cacerts_dir_mismatched_key(tmp_path):
    make_cacerts_dir(tmp_path)
    (tmp_path / "ca-key.pem").write_bytes(key_pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(BadInputError, match="ca-key.pem does not match .*ca-cert.pem"):
        CertificateAuthority.from_cacerts_dir(tmp_path)


def test_from_cacerts_dir_non_ca_cert(tmp_path):
    info = make_cacerts_dir(tmp_path)
    k = ec.generate_private_key(ec.SECP256R1())
    leafish = ca_cert("Not A CA", k, "Operator Root", info["root_key"], ca=False)
    (tmp_path / "ca-cert.pem").write_bytes(pem(leafish))
    (tmp_path / "ca-key.pem").write_bytes(key_pem(k))
    (tmp_path / "cert-chain.pem").write_bytes(pem(leafish, info["root"]))
    with pytest.raises(BadInputError, match="is not a CA certificate: .*CA:FALSE"):
        CertificateAuthority.from_cacerts_dir(tmp_path)


def test_from_cacerts_dir_chain_to_wrong_root(tmp_path):
    make_cacerts_dir(tmp_path)
    other = ca_cert("Someone Else's Root", rsa.generate_private_key(65537, 2048))
    (tmp_path / "root-cert.pem").write_bytes(pem(other))
    with pytest.raises(BadInputError, match="does not lead to .*root-cert.pem"):
        CertificateAuthority.from_cacerts_dir(tmp_path)


def test_from_cacerts_dir_forged_intermediate(tmp_path):
    # Right issuer *name*, wrong signer: the signature check must catch it.
    make_cacerts_dir(tmp_path, root_in_chain=False)
    impostor = rsa.generate_private_key(65537, 2048)
    k = ec.generate_private_key(ec.SECP256R1())
    forged = ca_cert("Operator Intermediate 0", k, "Operator Root", impostor)
    (tmp_path / "ca-cert.pem").write_bytes(pem(forged))
    (tmp_path / "ca-key.pem").write_bytes(key_pem(k))
    (tmp_path / "cert-chain.pem").write_bytes(pem(forged))
    with pytest.raises(BadInputError, match="signature .* does not verify"):
        CertificateAuthority.from_cacerts_dir(tmp_path)


def test_from_cacerts_dir_chain_must_start_with_ca_cert(tmp_path):
    info = make_cacerts_dir(tmp_path)
    (tmp_path / "cert-chain.pem").write_bytes(pem(info["root"]))
    with pytest.raises(BadInputError, match="must start with ca-cert.pem"):
        CertificateAuthority.from_cacerts_dir(tmp_path)


def test_from_cacerts_dir_encrypted_key(tmp_path):
    info = make_cacerts_dir(tmp_path)
    (tmp_path / "ca-key.pem").write_bytes(info["signing_key"].private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(BadInputError, match="ca-key.pem is encrypted"):
        CertificateAuthority.from_cacerts_dir(tmp_path)


def test_from_cacerts_dir_garbage_pem(tmp_path):
    make_cacerts_dir(tmp_path)
    (tmp_path / "root-cert.pem").write_bytes(b"not a certificate\n")
    with pytest.raises(BadInputError, match="root-cert.pem"):
        CertificateAuthority.from_cacerts_dir(tmp_path)


# --- holder side (slowpath.certs) ------------------------------------------------------
def test_make_csr_carries_only_uri_san():
    key = certs.generate_key()
    csr = x509.load_pem_x509_csr(certs.make_csr(key, WEB))
    assert csr.is_signature_valid
    assert key.curve.name == "secp256r1"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(WEB.uri)]
    assert len(csr.subject) == 0


def test_workload_cert_renews_at_half_life(ca):
    wc = issue(ca, WEB, timedelta(hours=10))
    assert wc.renew_at == wc.not_before + (wc.not_after - wc.not_before) / 2
    assert not wc.needs_renewal(wc.renew_at - timedelta(seconds=1))
    assert wc.needs_renewal(wc.renew_at)
    assert not wc.needs_renewal()  # just issued
    assert "PRIVATE" not in repr(wc)


def test_from_pems_checks_identity_and_key(ca):
    key = certs.generate_key()
    leaf = ca.sign_csr(certs.make_csr(key, WEB), expected=WEB, ttl=DAY)
    with pytest.raises(BadInputError, match=f"carries {WEB.uri} but {DB.uri} was requested"):
        certs.WorkloadCert.from_pems(spiffe=DB, key_pem=certs.key_to_pem(key), cert_pem=leaf,
                                     chain_pem=b"", root_pem=ca.root_pem)
    with pytest.raises(BadInputError, match="different key"):
        certs.WorkloadCert.from_pems(spiffe=WEB, key_pem=certs.key_to_pem(certs.generate_key()),
                                     cert_pem=leaf, chain_pem=b"", root_pem=ca.root_pem)


def _der_with_sans(names) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    c = ca_cert("x", key, ca=False)
    b = (x509.CertificateBuilder().subject_name(c.subject).issuer_name(c.issuer)
         .public_key(key.public_key()).serial_number(1)
         .not_valid_before(c.not_valid_before_utc).not_valid_after(c.not_valid_after_utc))
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_peer_spiffe_from_der():
    assert certs.peer_spiffe_from_der(_der_with_sans(None)) is None
    assert certs.peer_spiffe_from_der(_der_with_sans([x509.DNSName("a.example")])) is None
    assert certs.peer_spiffe_from_der(
        _der_with_sans([x509.DNSName("a.example"), x509.UniformResourceIdentifier(DB.uri)])) == DB
    with pytest.raises(BadInputError, match="2 URI SANs"):
        certs.peer_spiffe_from_der(_der_with_sans([x509.UniformResourceIdentifier(DB.uri),
                                                   x509.UniformResourceIdentifier(WEB.uri)]))
    with pytest.raises(BadInputError, match="does not start with 'spiffe://'"):
        certs.peer_spiffe_from_der(
            _der_with_sans([x509.UniformResourceIdentifier("https://a.example/")]))
    with pytest.raises(BadInputError, match="not valid DER"):
        certs.peer_spiffe_from_der(b"\x30\x03junk")


def test_ca_files_written_without_key_in_other_files(tmp_path):
    CertificateAuthority.load_or_create(tmp_path)
    for name in ("root-cert.pem", "cert-chain.pem", "ca-cert.pem"):
        assert b"PRIVATE KEY" not in (tmp_path / name).read_bytes()
    assert b"PRIVATE KEY" in (tmp_path / "ca-key.pem").read_bytes()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
