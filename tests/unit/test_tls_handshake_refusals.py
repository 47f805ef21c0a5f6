"""Peers refused *inside* the TLS 1.3 handshake, with an alert (issue 12, items 1 and 7).

Leaves come from a throwaway CA made here (cryptography), so they can carry what a real
mesh CA would never sign: only a DNS SAN, two URI SANs, a URI that is no SPIFFE ID, a
trust domain of another mesh.  Each is tried against our contexts from (a) our other
side, (b) plain Python `ssl` peers and (c) the `openssl s_client` / `s_server` binaries,
and the test asserts both our refusal (`tls.handshake_error`) and the alert the peer saw.

Alerts, as OpenSSL names them on the receiving side:
  certificate_unknown      SSLV3_ALERT_CERTIFICATE_UNKNOWN       (46)
  handshake_failure        SSLV3_ALERT_HANDSHAKE_FAILURE         (40)
  no_application_protocol  TLSV1_ALERT_NO_APPLICATION_PROTOCOL   (120)
"""
from __future__ import annotations

import datetime as dt
import shutil
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshcore.identity import SpiffeId
from slowpath import certs, tls
from slowpath.hbone import StreamAccepted, StreamRequested
from slowpath.hbone.memory import CodecPipe, TlsPipe

CLIENT = SpiffeId(namespace="shop", service_account="web")
SERVER = SpiffeId(namespace="shop", service_account="db")
FOREIGN = SpiffeId(trust_domain="other.example", namespace="shop", service_account="web")

# what the peer sees for tls.IDENTITY_ALERT (certificate_unknown, as Envoy and ztunnel)
CERT_UNKNOWN = {"CERTIFICATE_UNKNOWN": "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
                "BAD_CERTIFICATE": "SSLV3_ALERT_BAD_CERTIFICATE"}[tls.IDENTITY_ALERT.name]
ALERT_NUMBER = f"alert number {int(tls.IDENTITY_ALERT)}"
HANDSHAKE_FAILURE = "SSLV3_ALERT_HANDSHAKE_FAILURE"
NO_APP_PROTO = "TLSV1_ALERT_NO_APPLICATION_PROTOCOL"


# --- a test CA that signs anything ------------------------------------------------------------
def uri(u: str) -> x509.GeneralName:
    return x509.UniformResourceIdentifier(u)


def dns(d: str) -> x509.GeneralName:
    return x509.DNSName(d)


class TestCa:
    __test__ = False  # not a test class

    def __init__(self, name: str = "meshlane refusal test root"):
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
        self.cert = (x509.CertificateBuilder()
                     .subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(minutes=5))
                     .not_valid_after(now + dt.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                                  crl_sign=True, content_commitment=False,
                                                  key_encipherment=False, data_encipherment=False,
                                                  key_agreement=False, encipher_only=False,
                                                  decipher_only=False), critical=True)
                     .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                         self.key.public_key()), critical=False)
                     .sign(self.key, hashes.SHA256()))
        self.root_pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def leaf(self, sans: list[x509.GeneralName] | None, *, name: SpiffeId = CLIENT,
             trusting: bytes | None = None) -> certs.WorkloadCert:
        """A leaf with exactly `sans` (None: no SAN extension, a CN instead), wrapped as a
        WorkloadCert that trusts this CA (or `trusting`).  `name` only labels it."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateBuilder()
                   .issuer_name(self.cert.subject)
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(hours=24))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self.key.public_key()), critical=False))
        if sans is None:
            builder = builder.subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web.shop")]))
        else:
            builder = (builder.subject_name(x509.Name([]))
                       .add_extension(x509.SubjectAlternativeName(sans), critical=True))
        cert = builder.sign(self.key, hashes.SHA256())
        return certs.WorkloadCert(
            spiffe=name, key_pem=certs.key_to_pem(key),
            cert_pem=cert.public_bytes(serialization.Encoding.PEM), chain_pem=b"",
            root_pem=trusting or self.root_pem, not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc)


@pytest.fixture(scope="module")
def ca() -> TestCa:
    return TestCa()


@pytest.fixture(scope="module")
def good_client(ca) -> certs.WorkloadCert:
    return ca.leaf([uri(CLIENT.uri)], name=CLIENT)


@pytest.fixture(scope="module")
def good_server(ca) -> certs.WorkloadCert:
    return ca.leaf([uri(SERVER.uri)], name=SERVER)


# Leaves a mesh peer must never get past the handshake with: (sans, refusal kind).
BAD_LEAVES = {
    "dns-only": ([dns("web.shop.svc.cluster.local")], tls.NO_URI_SAN),
    "no-san": (None, tls.NO_URI_SAN),
    "two-uris": ([uri(CLIENT.uri), uri("spiffe://cluster.local/ns/shop/sa/admin")],
                 tls.MULTIPLE_URI_SANS),
    "https-uri": ([uri("https://web.shop.example/")], tls.NOT_SPIFFE),
    "bad-spiffe-path": ([uri("spiffe://cluster.local/web")], tls.NOT_SPIFFE),
    "upper-case": ([uri("spiffe://cluster.local/ns/Shop/sa/web")], tls.NOT_SPIFFE),
}


# --- pumping -----------------------------------------------------------------------------------
@dataclass
class Outcome:
    pipe: TlsPipe
    client: ssl.SSLError | None
    server: ssl.SSLError | None


def shake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> Outcome:
    """Both handshakes in memory; after the first side fails, its alert is delivered and
    the other side is stepped (or read from, if it had finished) to see it."""
    pipe = TlsPipe(client_ctx, server_ctx)
    errors: dict[str, ssl.SSLError | None] = {"client": None, "server": None}
    try:
        pipe.handshake()
    except ssl.SSLError as exc:
        errors[exc.side] = exc
        other_side = "server" if exc.side == "client" else "client"
        other = getattr(pipe, other_side)
        try:
            if other.handshake_done:
                other.read_available()
            else:
                other.step_handshake()
        except ssl.SSLError as seen:
            errors[other_side] = seen
    return Outcome(pipe, errors["client"], errors["server"])


def plain_client(ca: TestCa, leaf: certs.WorkloadCert | None, *, alpn: list[str] | None,
                 tmp: Path) -> ssl.SSLContext:
    """A stock Python client: no meshlane code, just the ssl module."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=ca.root_pem.decode())
    if leaf is not None:
        ctx.load_cert_chain(*write_pems(tmp, "plain-client", leaf))
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    return ctx


def plain_server(ca: TestCa, leaf: certs.WorkloadCert, *, alpn: list[str] | None,
                 tmp: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=ca.root_pem.decode())
    ctx.load_cert_chain(*write_pems(tmp, "plain-server", leaf))
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    return ctx


def alert(exc: ssl.SSLError | None) -> str | None:
    """The alert a peer received, by OpenSSL's name.  Python 3.11's reason table has no
    name for no_application_protocol (reason None, message "[SSL] tlsv1 alert no
    application protocol"), so fall back to the message."""
    if exc is None:
        return None
    if exc.reason:
        return exc.reason
    return str(exc.args[1]).split("] ", 1)[-1].split(" (", 1)[0].upper().replace(" ", "_")


def write_pems(d: Path, name: str, leaf: certs.WorkloadCert) -> tuple[str, str]:
    c, k = d / f"{name}.pem", d / f"{name}-key.pem"
    c.write_bytes(leaf.cert_pem)
    k.write_bytes(leaf.key_pem)
    return str(c), str(k)


# --- (a) our client and our server ----------------------------------------------------------
def test_valid_peers_still_shake_hands(good_client, good_server):
    out = shake(tls.client_context(good_client, expected=SERVER), tls.server_context(good_server))
    assert (out.client, out.server) == (None, None)
    assert out.pipe.client.sslobj.selected_alpn_protocol() == "h2"
    assert tls.peer_identity(out.pipe.server.sslobj) == CLIENT
    assert tls.verify_peer_identity(out.pipe.client.sslobj, SERVER) == SERVER
    assert tls.take_refusal(out.pipe.server.sslobj) is None
    assert tls.take_refusal(out.pipe.client.sslobj) is None


def test_one_uri_san_beside_dns_sans_is_fine(ca, good_server):
    leaf = ca.leaf([dns("web.shop"), uri(CLIENT.uri), dns("web")])
    out = shake(tls.client_context(leaf), tls.server_context(good_server))
    assert (out.client, out.server) == (None, None)
    assert tls.peer_identity(out.pipe.server.sslobj) == CLIENT


@pytest.mark.parametrize("case", sorted(BAD_LEAVES))
def test_server_refuses_client_leaf_in_handshake(ca, good_server, case):
    sans, kind = BAD_LEAVES[case]
    out = shake(tls.client_context(ca.leaf(sans)), tls.server_context(good_server))
    assert isinstance(out.server, ssl.SSLCertVerificationError), out
    assert out.client is not None and out.client.reason == CERT_UNKNOWN
    err = tls.handshake_error(out.pipe.server.sslobj, out.server, peer=("10.1.2.3", 40000))
    assert isinstance(err, tls.TlsIdentityError) and err.reason == "TLS_FAILURE"
    assert err.kind == kind
    assert err.refusal.alert == tls.IDENTITY_ALERT
    assert str(err).startswith("TLS handshake with 10.1.2.3:40000 refused: client certificate")
    assert f"sent TLS alert {tls.IDENTITY_ALERT.name.lower()}" in str(err)
    # consumed: a second look finds nothing
    assert tls.take_refusal(out.pipe.server.sslobj) is None


def test_server_refuses_foreign_trust_domain_signed_by_trusted_root(ca, good_server):
    # The case: a root the server trusts signed a leaf of another trust domain.
    out = shake(tls.client_context(ca.leaf([uri(FOREIGN.uri)], name=FOREIGN)),
                tls.server_context(good_server))
    assert isinstance(out.server, ssl.SSLCertVerificationError)
    assert out.client.reason == CERT_UNKNOWN
    err = tls.handshake_error(out.pipe.server.sslobj, out.server)
    assert err.kind == tls.FOREIGN_TRUST_DOMAIN
    assert err.refusal.peer == FOREIGN
    assert "trust domain 'other.example', but this mesh is 'cluster.local'" in str(err)


def test_server_trust_domain_is_its_own_or_the_one_given(ca):
    other_server = ca.leaf([uri("spiffe://other.example/ns/shop/sa/db")],
                           name=SpiffeId(trust_domain="other.example", namespace="shop",
                                         service_account="db"))
    foreign_client = ca.leaf([uri(FOREIGN.uri)], name=FOREIGN)
    # by default the server's own certificate says which mesh it is in
    out = shake(tls.client_context(foreign_client), tls.server_context(other_server))
    assert (out.client, out.server) == (None, None)
    # told otherwise, it refuses
    out = shake(tls.client_context(foreign_client),
                tls.server_context(other_server, trust_domain="cluster.local"))
    assert tls.handshake_error(out.pipe.server.sslobj, out.server).kind == tls.FOREIGN_TRUST_DOMAIN


def test_client_refuses_unexpected_server_identity(good_client, good_server):
    other = SpiffeId(namespace="shop", service_account="cache")
    out = shake(tls.client_context(good_client, expected=other), tls.server_context(good_server))
    assert isinstance(out.client, ssl.SSLCertVerificationError)
    assert out.server is not None and out.server.reason == CERT_UNKNOWN
    err = tls.handshake_error(out.pipe.client.sslobj, out.client)
    assert err.kind == tls.WRONG_IDENTITY and err.refusal.peer == SERVER
    assert f"server presented {SERVER.uri} but {other.uri} was expected" in str(err)
    # the server learns only that it was refused
    seen = tls.handshake_error(out.pipe.server.sslobj, out.server)
    assert seen.kind == tls.PEER_ALERT and CERT_UNKNOWN in str(seen)


@pytest.mark.parametrize("case", sorted(BAD_LEAVES))
def test_client_refuses_server_leaf_in_handshake(ca, good_client, case):
    sans, kind = BAD_LEAVES[case]
    out = shake(tls.client_context(good_client), tls.server_context(ca.leaf(sans, name=SERVER)))
    assert isinstance(out.client, ssl.SSLCertVerificationError)
    assert out.server.reason == CERT_UNKNOWN
    assert tls.handshake_error(out.pipe.client.sslobj, out.client).kind == kind


def test_client_contexts_cache_one_context_per_identity(good_client, good_server):
    cache = tls.ClientContexts(good_client, max_size=2)
    a, b = cache.get(SERVER), cache.get(SpiffeId(namespace="shop", service_account="x"))
    assert cache.get(SERVER) is a and a is not b and len(cache) == 2
    cache.get(SpiffeId(namespace="shop", service_account="y"))
    assert len(cache) == 2 and cache.get(SERVER) is a  # SERVER was used last: kept
    assert shake(a, tls.server_context(good_server)).client is None
    assert shake(b, tls.server_context(good_server)).client is not None


def test_handshake_error_for_untrusted_chain(good_server):
    stranger = TestCa("stranger").leaf([uri(CLIENT.uri)], trusting=good_server.root_pem)
    out = shake(tls.client_context(stranger), tls.server_context(good_server))
    err = tls.handshake_error(out.pipe.server.sslobj, out.server)
    assert err.kind == tls.UNTRUSTED_CHAIN and err.refusal is None
    assert "did not verify" in str(err)
    assert out.client.reason == "TLSV1_ALERT_UNKNOWN_CA"


# --- (b) plain Python ssl peers: ALPN -----------------------------------------------------------
def test_client_without_alpn_is_accepted_and_speaks_h2(ca, good_client, good_server, tmp_path):
    out = shake(plain_client(ca, good_client, alpn=None, tmp=tmp_path),
                tls.server_context(good_server))
    assert (out.client, out.server) == (None, None)
    assert out.pipe.server.sslobj.selected_alpn_protocol() is None
    assert tls.peer_identity(out.pipe.server.sslobj) == CLIENT
    # and HTTP/2 CONNECT runs over it regardless
    pipe = CodecPipe(tls=out.pipe)
    pipe.pump()
    sid = pipe.client.open_stream("10.0.0.5:8080")
    _, s = pipe.pump()
    assert [type(e) for e in s] == [StreamRequested]
    pipe.server.accept(sid)
    c, _ = pipe.pump()
    assert c == [StreamAccepted(stream_id=sid)]


def test_client_offering_only_http11_gets_no_application_protocol(ca, good_client, good_server,
                                                                   tmp_path):
    out = shake(plain_client(ca, good_client, alpn=["http/1.1"], tmp=tmp_path),
                tls.server_context(good_server))
    assert alert(out.client) == NO_APP_PROTO
    err = tls.handshake_error(out.pipe.server.sslobj, out.server)
    assert err.kind == tls.NO_H2_OFFERED
    assert err.refusal.alert.name == "NO_APPLICATION_PROTOCOL"
    assert "client offered ALPN [http/1.1] without h2" in str(err)


def test_client_offering_h2_among_others_gets_h2(ca, good_client, good_server, tmp_path):
    out = shake(plain_client(ca, good_client, alpn=["http/1.1", "h2"], tmp=tmp_path),
                tls.server_context(good_server))
    assert (out.client, out.server) == (None, None)
    assert out.pipe.server.sslobj.selected_alpn_protocol() == "h2"


@pytest.mark.parametrize("case", ["dns-only", "two-uris", "https-uri"])
def test_plain_client_with_bad_leaf_sees_the_identity_alert(ca, good_server, tmp_path, case):
    sans, kind = BAD_LEAVES[case]
    out = shake(plain_client(ca, ca.leaf(sans), alpn=["h2"], tmp=tmp_path),
                tls.server_context(good_server))
    assert out.client.reason == CERT_UNKNOWN
    assert tls.handshake_error(out.pipe.server.sslobj, out.server).kind == kind


def test_server_selecting_no_alpn_is_refused(ca, good_client, good_server, tmp_path):
    out = shake(tls.client_context(good_client, expected=SERVER),
                plain_server(ca, good_server, alpn=None, tmp=tmp_path))
    assert isinstance(out.client, ssl.SSLCertVerificationError)
    assert out.server is not None and out.server.reason == HANDSHAKE_FAILURE
    err = tls.handshake_error(out.pipe.client.sslobj, out.client)
    assert err.kind == tls.H2_NOT_SELECTED
    assert "server selected no ALPN protocol" in str(err)


def test_plain_server_with_h2_and_right_identity_is_accepted(ca, good_client, good_server,
                                                             tmp_path):
    out = shake(tls.client_context(good_client, expected=SERVER),
                plain_server(ca, good_server, alpn=["h2"], tmp=tmp_path))
    assert (out.client, out.server) == (None, None)


def test_plain_server_with_dns_leaf_is_refused(ca, good_client, tmp_path):
    out = shake(tls.client_context(good_client, expected=SERVER),
                plain_server(ca, ca.leaf([dns("db.shop")], name=SERVER), alpn=["h2"],
                             tmp=tmp_path))
    assert out.server.reason == CERT_UNKNOWN
    assert tls.handshake_error(out.pipe.client.sslobj, out.client).kind == tls.NO_URI_SAN


# --- over real sockets, with threads -------------------------------------------------------
def test_socket_handshakes_in_threads_attribute_each_refusal(ca, good_server):
    """Sixteen handshakes at once on socketpairs, half of them refused: each refusal is
    found on its own connection (the record is per connection, not per thread)."""
    server_ctx = tls.server_context(good_server)
    leaves = {"good": ca.leaf([uri(CLIENT.uri)]), "dns": ca.leaf([dns("x.shop")]),
              "foreign": ca.leaf([uri(FOREIGN.uri)], name=FOREIGN)}
    want = {"good": None, "dns": tls.NO_URI_SAN, "foreign": tls.FOREIGN_TRUST_DOMAIN}
    client_ctxs = {k: tls.client_context(v) for k, v in leaves.items()}
    results: dict[int, str | None] = {}
    barrier = threading.Barrier(16)

    def run(i: int, which: str) -> None:
        a, b = socket.socketpair()
        a.settimeout(10)
        b.settimeout(10)

        def client() -> None:
            try:
                with client_ctxs[which].wrap_socket(a, server_hostname=None) as s:
                    s.recv(1)
            except (ssl.SSLError, OSError):
                pass
        t = threading.Thread(target=client)
        barrier.wait()
        t.start()
        srv = server_ctx.wrap_socket(b, server_side=True, do_handshake_on_connect=False)
        try:
            srv.do_handshake()
            results[i] = None
            srv.close()
        except ssl.SSLError as exc:
            results[i] = tls.handshake_error(srv, exc).kind
            srv.close()
        t.join(10)

    kinds = [("good", "dns", "foreign", "good")[i % 4] for i in range(16)]
    threads = [threading.Thread(target=run, args=(i, k)) for i, k in enumerate(kinds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {i: want[k] for i, k in enumerate(kinds)}


# --- (c) the openssl binaries -------------------------------------------------------------
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl binary not installed")


class OurServer:
    """Our server context on a loopback socket, one connection, in a thread."""

    def __init__(self, ctx: ssl.SSLContext):
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.error: tls.TlsIdentityError | None = None
        self.alpn: str | None = "unset"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        conn.settimeout(10)
        s = self.ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        try:
            s.do_handshake()
            self.alpn = s.selected_alpn_protocol()
            s.sendall(b"hello\n")
        except (ssl.SSLError, OSError) as exc:
            self.error = tls.handshake_error(s, exc)
        finally:
            s.close()
            self.sock.close()


def s_client(port: int, tmp: Path, ca: TestCa, leaf: certs.WorkloadCert,
             alpn: str | None) -> str:
    root = tmp / "root.pem"
    root.write_bytes(ca.root_pem)
    cert, key = write_pems(tmp, "s_client", leaf)
    cmd = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-cert", cert,
           "-key", key, "-CAfile", str(root), "-ign_eof"]
    if alpn:
        cmd += ["-alpn", alpn]
    done = subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=20, text=True)
    return done.stdout + done.stderr


@needs_openssl
@pytest.mark.parametrize("case", ["dns-only", "two-uris", "https-uri"])
def test_s_client_with_bad_leaf_gets_identity_alert(ca, good_server, tmp_path, case):
    sans, kind = BAD_LEAVES[case]
    srv = OurServer(tls.server_context(good_server))
    out = s_client(srv.port, tmp_path, ca, ca.leaf(sans), "h2")
    srv.thread.join(10)
    assert srv.error is not None and srv.error.kind == kind
    assert ALERT_NUMBER in out, out


@needs_openssl
def test_s_client_with_foreign_trust_domain_gets_identity_alert(ca, good_server, tmp_path):
    srv = OurServer(tls.server_context(good_server))
    out = s_client(srv.port, tmp_path, ca, ca.leaf([uri(FOREIGN.uri)], name=FOREIGN), "h2")
    srv.thread.join(10)
    assert srv.error.kind == tls.FOREIGN_TRUST_DOMAIN
    assert ALERT_NUMBER in out, out


@needs_openssl
def test_s_client_offering_http11_gets_alert_120(ca, good_client, good_server, tmp_path):
    srv = OurServer(tls.server_context(good_server))
    out = s_client(srv.port, tmp_path, ca, good_client, "http/1.1")
    srv.thread.join(10)
    assert srv.error.kind == tls.NO_H2_OFFERED
    assert "alert number 120" in out, out
    assert "no application protocol" in out


@needs_openssl
def test_s_client_without_alpn_is_accepted(ca, good_client, good_server, tmp_path):
    srv = OurServer(tls.server_context(good_server))
    out = s_client(srv.port, tmp_path, ca, good_client, None)
    srv.thread.join(10)
    assert srv.error is None and srv.alpn is None
    assert "hello" in out and "alert" not in out.lower(), out


class SServer:
    """`openssl s_server` for one connection; `output()` stops it and returns its log."""

    def __init__(self, tmp: Path, ca: TestCa, leaf: certs.WorkloadCert, alpn: str | None):
        root = tmp / "root.pem"
        root.write_bytes(ca.root_pem)
        cert, key = write_pems(tmp, "s_server", leaf)
        cmd = [OPENSSL, "s_server", "-accept", "127.0.0.1:0", "-naccept", "1", "-tls1_3",
               "-cert", cert, "-key", key, "-CAfile", str(root), "-Verify", "2"]
        if alpn:
            cmd += ["-alpn", alpn]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines = []
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("ACCEPT"):
                self.port = int(line.rsplit(":", 1)[1])
                break
        else:
            raise AssertionError("s_server did not start: " + "".join(self.lines))

    def output(self) -> str:
        try:
            out, _ = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return "".join(self.lines) + out


def dial(ctx: ssl.SSLContext, port: int) -> tls.TlsIdentityError | None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    s = ctx.wrap_socket(sock, server_hostname=None, do_handshake_on_connect=False)
    try:
        s.do_handshake()
        return None
    except (ssl.SSLError, OSError) as exc:
        return tls.handshake_error(s, exc)
    finally:
        s.close()


@needs_openssl
def test_s_server_with_dns_leaf_gets_identity_alert(ca, good_client, tmp_path):
    srv = SServer(tmp_path, ca, ca.leaf([dns("db.shop")], name=SERVER), "h2")
    err = dial(tls.client_context(good_client, expected=SERVER), srv.port)
    out = srv.output()
    assert err is not None and err.kind == tls.NO_URI_SAN
    assert ALERT_NUMBER in out, out


@needs_openssl
def test_s_server_without_alpn_gets_alert_40(ca, good_client, good_server, tmp_path):
    srv = SServer(tmp_path, ca, good_server, None)
    err = dial(tls.client_context(good_client, expected=SERVER), srv.port)
    out = srv.output()
    assert err is not None and err.kind == tls.H2_NOT_SELECTED
    assert "alert number 40" in out, out


@needs_openssl
def test_s_server_with_right_identity_and_h2_is_accepted(ca, good_client, good_server, tmp_path):
    srv = SServer(tmp_path, ca, good_server, "h2")
    err = dial(tls.client_context(good_client, expected=SERVER), srv.port)
    srv.output()
    assert err is None
