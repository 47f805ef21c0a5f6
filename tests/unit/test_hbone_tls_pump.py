"""HBONE through real mutual TLS 1.3: two ssl.SSLObjects over MemoryBIOs, no sockets.

A throwaway CA (ECDSA P-256) signs a client and a server leaf whose only identity is a
SPIFFE URI SAN, as DESIGN.md §5 describes; a second, unrelated CA signs an intruder."""
from __future__ import annotations

import datetime as dt
import random
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from slowpath.hbone import (
    DataReceived,
    StreamAccepted,
    StreamEnded,
    StreamRefused,
    StreamRequested,
    StreamReset,
)
from slowpath.hbone.memory import CodecPipe, TlsPipe

CLIENT_ID = "spiffe://cluster.local/ns/demo/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/demo/sa/server"
MiB = 1024 * 1024


@dataclass
class Pki:
    root: Path            # the mesh's trust anchor
    client: tuple[Path, Path]   # (cert, key)
    server: tuple[Path, Path]
    intruder: tuple[Path, Path]  # a client leaf from a different root


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _ca(name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(ca_cert, ca_key, spiffe_id: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([]))  # like Istio: identity only in the SAN
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=24))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                         content_commitment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            # empty subject => the SAN must be critical (RFC 5280 §4.2.1.6)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    root, root_key = _ca("meshlane test root")
    other, other_key = _ca("someone else's root")
    (d / "root-cert.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))

    def write(name, cert, key):
        c, k = d / f"{name}.pem", d / f"{name}-key.pem"
        c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        k.write_bytes(_pem_key(key))
        return c, k

    return Pki(
        root=d / "root-cert.pem",
        client=write("client", *_leaf(root, root_key, CLIENT_ID)),
        server=write("server", *_leaf(root, root_key, SERVER_ID)),
        intruder=write("intruder", *_leaf(other, other_key, CLIENT_ID)),
    )


def _context(purpose: int, pki: Pki, chain: tuple[Path, Path] | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT if purpose == ssl.Purpose.SERVER_AUTH
                         else ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False          # identities are SPIFFE URIs, checked by the caller
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual: both sides present and verify a chain
    ctx.load_verify_locations(cafile=str(pki.root))
    if chain is not None:
        ctx.load_cert_chain(str(chain[0]), str(chain[1]))
    ctx.set_alpn_protocols(["h2"])
    return ctx


def client_context(pki: Pki, chain=None) -> ssl.SSLContext:
    return _context(ssl.Purpose.SERVER_AUTH, pki, pki.client if chain is None else chain)


def server_context(pki: Pki, sni_seen: list | None = None) -> ssl.SSLContext:
    ctx = _context(ssl.Purpose.CLIENT_AUTH, pki, pki.server)
    if sni_seen is not None:
        ctx.sni_callback = lambda sslobj, name, _ctx: sni_seen.append(name)
    return ctx


def uri_sans(cert: dict) -> list[str]:
    return [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]


@pytest.fixture
def tls(pki) -> TlsPipe:
    sni: list = []
    pipe = TlsPipe(client_context(pki), server_context(pki, sni))
    pipe.handshake()
    pipe.sni_seen = sni  # type: ignore[attr-defined]
    return pipe


def test_mutual_tls13_with_alpn_h2_and_no_sni(tls):
    for end in (tls.client, tls.server):
        assert end.sslobj.version() == "TLSv1.3"
        assert end.sslobj.selected_alpn_protocol() == "h2"
        assert end.sslobj.cipher()[0] in ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256",
                                          "TLS_CHACHA20_POLY1305_SHA256")
    assert tls.sni_seen == [None]  # the ClientHello carried no server_name
    assert uri_sans(tls.server.sslobj.getpeercert()) == [CLIENT_ID]
    assert uri_sans(tls.client.sslobj.getpeercert()) == [SERVER_ID]


def test_hbone_tunnel_over_tls(tls):
    pipe = CodecPipe(tls=tls)
    pipe.pump()
    # the HBONE server learns who is calling from TLS, not from any header
    assert uri_sans(tls.server.sslobj.getpeercert()) == [CLIENT_ID]

    sid = pipe.client.open_stream("10.0.0.5:8080", [("baggage", "k8s.namespace.name=demo")])
    _, s = pipe.pump()
    assert s == [StreamRequested(stream_id=sid, authority="10.0.0.5:8080", host="10.0.0.5", port=8080,
                                 headers={"baggage": "k8s.namespace.name=demo"})]
    pipe.server.accept(sid)
    c, _ = pipe.pump()
    assert c == [StreamAccepted(stream_id=sid)]

    payload = random.Random(7).randbytes(6 * MiB + 3)  # more than one stream window
    sent, got, short_writes = 0, [], 0
    while sent < len(payload) or sum(map(len, got)) < len(payload):
        if sent < len(payload):
            n = pipe.client.send_data(sid, payload[sent:])
            short_writes += n < len(payload) - sent
            sent += n
        _, s = pipe.pump()
        for e in s:
            if isinstance(e, DataReceived):
                got.append(e.data)
                pipe.server.ack_data(sid, e.flow_controlled_length)
        pipe.pump()
    assert b"".join(got) == payload
    assert short_writes >= 1  # flow control held the sender back at least once

    pipe.server.send_data(sid, b"pong")
    pipe.server.end_stream(sid)
    c, _ = pipe.pump()
    assert c == [DataReceived(stream_id=sid, data=b"pong", flow_controlled_length=4),
                 StreamEnded(stream_id=sid)]
    pipe.client.end_stream(sid)
    _, s = pipe.pump()
    assert s == [StreamEnded(stream_id=sid)]

    denied = pipe.client.open_stream("10.0.0.6:9090")
    pipe.pump()
    pipe.server.reject(denied, 401)
    c, _ = pipe.pump()
    assert c == [StreamRefused(stream_id=denied, status=401)]

    aborted = pipe.client.open_stream("[fd00::6]:9090")
    pipe.pump()
    pipe.server.accept(aborted)
    pipe.pump()
    pipe.server.reset_stream(aborted)
    c, _ = pipe.pump()
    assert c == [StreamReset(stream_id=aborted, error_code=0x8)]


def test_client_cert_from_another_root_fails_the_handshake(pki):
    pipe = TlsPipe(client_context(pki, chain=pki.intruder), server_context(pki))
    with pytest.raises(ssl.SSLError) as e:
        pipe.handshake()
    assert e.value.side == "server"
    assert e.value.reason == "CERTIFICATE_VERIFY_FAILED"
    # TLS 1.3: the client finished first; it learns of the rejection from the alert
    assert pipe.client.handshake_done and not pipe.server.handshake_done
    with pytest.raises(ssl.SSLError) as alert:
        pipe.client.read_available()
    assert alert.value.reason == "TLSV1_ALERT_UNKNOWN_CA"


def test_client_without_cert_fails_the_handshake(pki):
    ctx = _context(ssl.Purpose.SERVER_AUTH, pki, None)
    pipe = TlsPipe(ctx, server_context(pki))
    with pytest.raises(ssl.SSLError) as e:
        pipe.handshake()
    assert e.value.side == "server"
    assert "certificate" in str(e.value).lower()


def test_tls12_only_client_is_refused(pki):
    ctx = client_context(pki)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    pipe = TlsPipe(ctx, server_context(pki))
    with pytest.raises(ssl.SSLError) as e:
        pipe.handshake()
    assert e.value.side == "server"
    assert e.value.reason in ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION")
