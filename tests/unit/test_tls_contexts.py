"""HBONE TLS contexts: full mutual TLS 1.3 handshakes pumped in memory (no sockets)."""
from __future__ import annotations

import dataclasses
import os
import ssl
import tempfile
from datetime import timedelta

import pytest

from meshcore.errors import BadInputError, MeshError
from meshcore.identity import SpiffeId
from meshlane.ca import CertificateAuthority
from slowpath import certs, tls, tlsverify
from tests.unit.test_ca import issue, make_cacerts_dir, pem

CLIENT = SpiffeId(namespace="shop", service_account="web")
SERVER = SpiffeId(namespace="shop", service_account="db")
AES_GCM = {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"}


class Pair:
    """A client and a server SSLObject joined by MemoryBIOs."""

    def __init__(self, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext):
        self.c_in, self.c_out, self.s_in, self.s_out = (ssl.MemoryBIO() for _ in range(4))
        self.client = client_ctx.wrap_bio(self.c_in, self.c_out, server_side=False,
                                          server_hostname=None)
        self.server = server_ctx.wrap_bio(self.s_in, self.s_out, server_side=True)

    def pump(self) -> bool:
        moved = False
        if self.c_out.pending:
            self.s_in.write(self.c_out.read())
            moved = True
        if self.s_out.pending:
            self.c_in.write(self.s_out.read())
            moved = True
        return moved

    def handshake(self) -> dict[str, ssl.SSLError | None]:
        """Drive both sides to the end; {side: None on success, else its error}."""
        result: dict[str, ssl.SSLError | None] = {}
        for _ in range(20):
            for side, obj in (("client", self.client), ("server", self.server)):
                if side in result:
                    continue
                try:
                    obj.do_handshake()
                    result[side] = None
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as exc:
                    result[side] = exc
            if not self.pump() and len(result) == 2:
                return result
        raise AssertionError(f"handshake did not finish: {result}")

    def send(self, src: ssl.SSLObject, dst: ssl.SSLObject, data: bytes) -> bytes:
        src.write(data)
        self.pump()
        return dst.read(len(data) + 100)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.self_signed()


@pytest.fixture(scope="module")
def client_cert(ca) -> certs.WorkloadCert:
    return issue(ca, CLIENT)


@pytest.fixture(scope="module")
def server_cert(ca) -> certs.WorkloadCert:
    return issue(ca, SERVER)


@pytest.mark.parametrize("strict", [False, True], ids=["default", "x509-strict"])
def test_mutual_tls13_handshake(client_cert, server_cert, strict):
    cctx, sctx = tls.client_context(client_cert), tls.server_context(server_cert)
    if strict:
        # OpenSSL's strict RFC 5280 checks (Python 3.13's default): empty subject needs a
        # critical SAN, AKI present, ... our leaves must pass them too.
        for ctx in (cctx, sctx):
            ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    p = Pair(cctx, sctx)
    assert p.handshake() == {"client": None, "server": None}
    for obj in (p.client, p.server):
        assert obj.version() == "TLSv1.3"
        assert obj.selected_alpn_protocol() == "h2"
        assert obj.cipher()[0] in AES_GCM
    assert p.server.server_hostname is None  # no SNI arrived
    assert tls.verify_peer_identity(p.client, SERVER) == SERVER
    assert tls.peer_identity(p.server) == CLIENT
    assert p.send(p.client, p.server, b"CONNECT") == b"CONNECT"
    assert p.send(p.server, p.client, b"200") == b"200"


def test_contexts_pin_tls13_and_mutual(client_cert, server_cert):
    for ctx in (tls.client_context(client_cert), tls.server_context(server_cert)):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.check_hostname is False
        assert tlsverify.installed(ctx)  # peers are checked inside the handshake


def test_expected_server_identity_is_checked_in_the_handshake(client_cert, server_cert):
    other = SpiffeId(namespace="shop", service_account="cache")
    p = Pair(tls.client_context(client_cert, expected=other), tls.server_context(server_cert))
    result = p.handshake()
    assert isinstance(result["client"], ssl.SSLCertVerificationError)
    assert result["server"].reason == f"SSLV3_ALERT_{tls.IDENTITY_ALERT.name}"
    err = tls.handshake_error(p.client, result["client"])
    assert err.kind == tls.WRONG_IDENTITY
    assert f"server presented {SERVER.uri} but {other.uri} was expected" in str(err)
    p = Pair(tls.client_context(client_cert, expected=SERVER), tls.server_context(server_cert))
    assert p.handshake() == {"client": None, "server": None}
    assert tls.verify_peer_identity(p.client, SERVER) == SERVER


def test_wrong_server_identity_raises(client_cert, server_cert):
    p = Pair(tls.client_context(client_cert), tls.server_context(server_cert))
    assert p.handshake() == {"client": None, "server": None}
    other = SpiffeId(namespace="shop", service_account="cache")
    with pytest.raises(tls.TlsIdentityError) as info:
        tls.verify_peer_identity(p.client, other)
    assert str(info.value).startswith(
        f"server presented {SERVER.uri} but {other.uri} was expected")
    assert isinstance(info.value, MeshError)
    assert info.value.reason == "TLS_FAILURE"


def trusting(wc: certs.WorkloadCert, root_pem: bytes) -> certs.WorkloadCert:
    return dataclasses.replace(wc, root_pem=root_pem)


def test_client_from_other_ca_fails_handshake(ca, server_cert):
    # The client trusts the mesh root, but its own leaf comes from a stranger's CA.
    stranger = trusting(issue(CertificateAuthority.self_signed(), CLIENT), ca.root_pem)
    p = Pair(tls.client_context(stranger), tls.server_context(server_cert))
    result = p.handshake()
    assert isinstance(result["server"], ssl.SSLCertVerificationError)
    assert "certificate verify failed" in str(result["server"])
    # TLS 1.3: the client finished first and learns of the rejection from the alert
    with pytest.raises(ssl.SSLError):
        if result["client"] is None:
            p.client.read(10)
        else:
            raise result["client"]


def test_server_from_other_ca_fails_handshake(ca, client_cert):
    stranger = trusting(issue(CertificateAuthority.self_signed(), SERVER), ca.root_pem)
    p = Pair(tls.client_context(client_cert), tls.server_context(stranger))
    result = p.handshake()
    assert isinstance(result["client"], ssl.SSLCertVerificationError)
    assert result["server"] is not None


def test_server_checks_trust_domain(ca, server_cert):
    # A peer whose root the server trusts but whose trust domain is another mesh's.
    other = CertificateAuthority.self_signed("other.example")
    foreign = SpiffeId(trust_domain="other.example", namespace="shop", service_account="web")
    client = trusting(issue(other, foreign), ca.root_pem)
    server = trusting(server_cert, ca.root_pem + other.root_pem)
    p = Pair(tls.client_context(client), tls.server_context(server))
    result = p.handshake()
    # refused inside the handshake, with an alert (issue 12): not accepted and checked later
    assert isinstance(result["server"], ssl.SSLCertVerificationError)
    # TLS 1.3: the client finished first and learns of the refusal from the alert
    with pytest.raises(ssl.SSLError) as seen:
        p.client.read(10)
    assert seen.value.reason == f"SSLV3_ALERT_{tls.IDENTITY_ALERT.name}"
    err = tls.handshake_error(p.server, result["server"])
    assert err.kind == tls.FOREIGN_TRUST_DOMAIN and err.reason == "TLS_FAILURE"
    assert "trust domain 'other.example', but this mesh is 'cluster.local'" in str(err)
    # a server told that its mesh is other.example takes the same client
    p = Pair(tls.client_context(client), tls.server_context(server, trust_domain="other.example"))
    assert p.handshake() == {"client": None, "server": None}
    assert tls.peer_identity(p.server, trust_domain="other.example") == foreign
    # and the check after the handshake still says what it always said
    with pytest.raises(tls.TlsIdentityError,
                       match="trust domain 'other.example', but this mesh is 'cluster.local'"):
        tls.peer_identity(p.server)


def test_plugin_ca_chain_is_served(tmp_path):
    # Leaves from an operator's second-level intermediate; peers trust only the operator
    # root, so a handshake works only if each side sends its intermediates after the leaf.
    info = make_cacerts_dir(tmp_path, levels=2)
    plug = CertificateAuthority.from_cacerts_dir(tmp_path)
    server, client = issue(plug, SERVER), issue(plug, CLIENT)
    assert client.root_pem == server.root_pem == pem(info["root"])
    p = Pair(tls.client_context(client), tls.server_context(server))
    assert p.handshake() == {"client": None, "server": None}
    assert tls.verify_peer_identity(p.client, SERVER) == SERVER
    assert tls.peer_identity(p.server) == CLIENT
    # control: the same server without its chain cannot be verified by the client
    bare = dataclasses.replace(server, chain_pem=b"")
    result = Pair(tls.client_context(client), tls.server_context(bare)).handshake()
    assert isinstance(result["client"], ssl.SSLCertVerificationError)
    assert "unable to get local issuer certificate" in str(result["client"])


def test_no_key_material_left_behind(client_cert, server_cert, tmp_path, monkeypatch):
    def fds():
        d = "/proc/self/fd"
        return {n: os.readlink(f"{d}/{n}") for n in os.listdir(d)
                if os.path.exists(f"{d}/{n}")}

    monkeypatch.chdir(tmp_path)
    tmp_before = set(os.listdir(tempfile.gettempdir()))
    before = fds()
    ctxs = [f(c) for _ in range(10)
            for f, c in ((tls.client_context, client_cert), (tls.server_context, server_cert))]
    after = fds()
    assert len(after) == len(before)
    assert not [t for t in after.values() if "memfd:" in t]
    assert set(os.listdir(tempfile.gettempdir())) == tmp_before
    assert os.listdir(tmp_path) == []
    # the key was loaded nevertheless: the last pair still shakes hands
    p = Pair(ctxs[-2], ctxs[-1])
    assert p.handshake() == {"client": None, "server": None}


def test_encrypted_key_refused_without_prompt(client_cert):
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key(client_cert.key_pem, password=None)
    enc = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.BestAvailableEncryption(b"pw"))
    bad = certs.WorkloadCert(spiffe=CLIENT, key_pem=enc, cert_pem=client_cert.cert_pem,
                             chain_pem=b"", root_pem=client_cert.root_pem,
                             not_before=client_cert.not_before,
                             not_after=client_cert.not_after)
    with pytest.raises(BadInputError, match="encrypted"):
        tls.client_context(bad)


def test_mismatched_key_refused(client_cert, server_cert):
    bad = certs.WorkloadCert(spiffe=CLIENT, key_pem=server_cert.key_pem,
                             cert_pem=client_cert.cert_pem, chain_pem=b"",
                             root_pem=client_cert.root_pem, not_before=client_cert.not_before,
                             not_after=client_cert.not_after)
    with pytest.raises(BadInputError, match=f"certificate or key for {CLIENT.uri}"):
        tls.server_context(bad)


def test_renewed_cert_still_handshakes(ca, server_cert):
    short = issue(ca, CLIENT, timedelta(minutes=5))
    assert short.renew_at < short.not_after
    p = Pair(tls.client_context(short), tls.server_context(server_cert))
    assert p.handshake() == {"client": None, "server": None}
    assert tls.peer_identity(p.server) == CLIENT
