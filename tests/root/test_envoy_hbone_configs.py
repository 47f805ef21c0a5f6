"""slowpath.envoy_hbone against a real Envoy 1.40, loopback only (no root needed).

Envoy client <-> Envoy server with a throwaway CA, plus plain-Python HBONE peers (ssl +
h2) on either side so the wire shape a Python ztunnel must interoperate with is pinned:
ALPN h2, TLS 1.3, no SNI, only :method/:authority, forwarded/baggage headers, 200 after
the upstream connect, 503 when it fails, 400 for non-CONNECT, SAN and CA checks.
"""
from __future__ import annotations

import datetime
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from slowpath import envoy_hbone as eh
from tests.envoy_util import EnvoyProcess, requires_envoy, validate

pytestmark = requires_envoy()

LO = "127.0.0.1"
TD = "spiffe://cluster.local/ns/demo/sa/"
CLIENT_ID = TD + "client"
SERVER_ID = TD + "server"
IO_TIMEOUT = 5.0


# --- PKI -----------------------------------------------------------------------------------


@dataclass
class Leaf:
    cert: str
    key: str


@dataclass
class Pki:
    root: str
    client: Leaf
    server: Leaf
    rogue_client: Leaf  # same SPIFFE id as client, signed by another CA
    foreign_client: Leaf  # right CA, another trust domain


def _ku(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )


def _make_ca(name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlane-test"),
        x509.NameAttribute(NameOID.COMMON_NAME, name),
    ])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ku(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_leaf(ca_key, ca_cert, spiffe: str, directory: Path, stem: str) -> Leaf:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))  # empty subject: the SAN carries the identity
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]), critical=True
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_ku(ca=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path = directory / f"{stem}.pem"
    key_path = directory / f"{stem}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Leaf(str(cert_path), str(key_path))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _make_ca("meshlane test root")
    (d / "root-cert.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    rogue_key, rogue_cert = _make_ca("rogue root")
    return Pki(
        root=str(d / "root-cert.pem"),
        client=_make_leaf(ca_key, ca_cert, CLIENT_ID, d, "client"),
        server=_make_leaf(ca_key, ca_cert, SERVER_ID, d, "server"),
        rogue_client=_make_leaf(rogue_key, rogue_cert, CLIENT_ID, d, "rogue-client"),
        foreign_client=_make_leaf(
            ca_key, ca_cert, "spiffe://other.domain/ns/demo/sa/client", d, "foreign-client"),
    )


# --- plain TCP helpers -------------------------------------------------------------------------


class EchoServer:
    """Threaded TCP echo on loopback; echoes until EOF, then closes."""

    def __init__(self) -> None:
        self.sock = socket.create_server((LO, 0))
        self.sock.settimeout(0.2)
        self.addr = self.sock.getsockname()[:2]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        conn.settimeout(30)
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture(scope="module")
def echo():
    server = EchoServer()
    yield server
    server.close()


def free_closed_port() -> int:
    """A loopback port with nothing listening (bound then released)."""
    with socket.socket() as s:
        s.bind((LO, 0))
        return s.getsockname()[1]


def roundtrip(port: int, payload: bytes, *, half_close: bool = True) -> bytes:
    """Send payload to LO:port; with half_close read until EOF, else until len(payload)."""
    out = bytearray()
    with socket.create_connection((LO, port), timeout=IO_TIMEOUT) as s:
        s.settimeout(IO_TIMEOUT)
        s.sendall(payload)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        try:
            while half_close or len(out) < len(payload):
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    return bytes(out)


# --- Envoy launchers -----------------------------------------------------------------------------


def start_server(pki: Pki, forward_to) -> EnvoyProcess:
    boot = eh.hbone_server_bootstrap(
        listen=(LO, 0), cert_file=pki.server.cert, key_file=pki.server.key,
        root_file=pki.root, forward_to=forward_to, admin_port=0,
    )
    return EnvoyProcess(eh.render_yaml(boot), name="hbone-server").start()


def client_boot(pki: Pki, target_port: int, authority: str, expect: str = SERVER_ID, **kw) -> dict:
    return eh.hbone_client_bootstrap(
        listen=(LO, 0), target_hbone=(LO, target_port), target_authority=authority,
        cert_file=pki.client.cert, key_file=pki.client.key, root_file=pki.root,
        expected_peer_spiffe=expect, admin_port=0, **kw,
    )


@pytest.fixture(scope="module")
def server_fixed(pki, echo):
    env = start_server(pki, echo.addr)
    yield env
    env.stop()


@pytest.fixture(scope="module")
def server_authority(pki):
    env = start_server(pki, None)
    yield env
    env.stop()


def diag(*envs: EnvoyProcess) -> str:
    return "\n".join(e.log_tail() for e in envs)


# --- Python HBONE peers (ssl + h2) -------------------------------------------------------------------


def py_client_ctx(leaf: Leaf | None, root: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # SAN is checked by hand: URI SAN, not a DNS name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(root)
    if leaf is not None:
        ctx.load_cert_chain(leaf.cert, leaf.key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def uri_sans(tls: ssl.SSLSocket) -> list[str]:
    return [v for k, v in tls.getpeercert().get("subjectAltName", ()) if k == "URI"]


class PyHboneClient:
    """Minimal blocking HBONE client: one CONNECT stream over mTLS + h2 (no SNI)."""

    def __init__(self, port: int, leaf: Leaf | None, root: str) -> None:
        raw = socket.create_connection((LO, port), timeout=IO_TIMEOUT)
        self.tls = py_client_ctx(leaf, root).wrap_socket(raw, server_hostname=None)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self._flush()
        self.data = bytearray()
        self.status: int | None = None
        self.ended = False
        self.reset = False

    def _flush(self) -> None:
        out = self.h2.data_to_send()
        if out:
            self.tls.sendall(out)

    def _pump(self) -> None:
        chunk = self.tls.recv(65536)
        if not chunk:
            raise ConnectionError("peer closed the HBONE connection")
        for ev in self.h2.receive_data(chunk):
            if isinstance(ev, h2.events.ResponseReceived):
                self.status = int(dict(ev.headers)[b":status"])
            elif isinstance(ev, h2.events.DataReceived):
                self.data += ev.data
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                self.ended = True
            elif isinstance(ev, h2.events.StreamReset):
                self.reset = True
        self._flush()

    def request(self, headers: list[tuple[str, str]]) -> int:
        self.h2.send_headers(1, headers)
        self._flush()
        while self.status is None:
            self._pump()
        return self.status

    def connect(self, authority: str) -> int:
        return self.request([(":method", "CONNECT"), (":authority", authority)])

    def send(self, data: bytes, end: bool = False) -> None:
        self.h2.send_data(1, data, end_stream=end)
        self._flush()

    def read_until(self, n: int) -> bytes:
        while len(self.data) < n and not (self.ended or self.reset):
            self._pump()
        return bytes(self.data)

    def close(self) -> None:
        try:
            self.h2.close_connection()
            self._flush()
        except OSError:
            pass
        self.tls.close()


@dataclass
class Captured:
    sni: list = field(default_factory=list)
    alpn: list = field(default_factory=list)
    tls_version: list = field(default_factory=list)
    peer_sans: list = field(default_factory=list)
    headers: list = field(default_factory=list)
    settings: list = field(default_factory=list)
    conn_window_updates: list = field(default_factory=list)
    errors: list = field(default_factory=list)


class PyHboneServer:
    """Minimal HBONE server: mTLS (client cert required), ALPN h2, answers CONNECT 200 and
    echoes the stream; records what the (Envoy) client sent."""

    def __init__(self, pki: Pki) -> None:
        self.cap = Captured()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki.root)
        ctx.load_cert_chain(pki.server.cert, pki.server.key)
        ctx.set_alpn_protocols(["h2"])
        ctx.sni_callback = lambda sock, name, _ctx: self.cap.sni.append(name)
        self.ctx = ctx
        self.sock = socket.create_server((LO, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._conn, args=(raw,), daemon=True).start()

    def _conn(self, raw: socket.socket) -> None:
        raw.settimeout(IO_TIMEOUT)
        try:
            tls = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as e:
            self.cap.errors.append(repr(e))
            raw.close()
            return
        self.cap.alpn.append(tls.selected_alpn_protocol())
        self.cap.tls_version.append(tls.version())
        self.cap.peer_sans.append(uri_sans(tls))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        try:
            tls.sendall(conn.data_to_send())
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                for ev in conn.receive_data(chunk):
                    if isinstance(ev, h2.events.RequestReceived):
                        hdrs = [(k.decode(), v.decode()) for k, v in ev.headers]
                        self.cap.headers.append(hdrs)
                        conn.send_headers(ev.stream_id, [(":status", "200")])
                    elif isinstance(ev, h2.events.DataReceived):
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        if ev.data:
                            conn.send_data(ev.stream_id, ev.data)
                    elif isinstance(ev, h2.events.StreamEnded):
                        conn.end_stream(ev.stream_id)
                    elif isinstance(ev, h2.events.RemoteSettingsChanged):
                        self.cap.settings.append(
                            {int(k): v.new_value for k, v in ev.changed_settings.items()})
                    elif isinstance(ev, h2.events.WindowUpdated) and ev.stream_id == 0:
                        self.cap.conn_window_updates.append(ev.delta)
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        return
                tls.sendall(conn.data_to_send())
        except (OSError, h2.exceptions.ProtocolError) as e:
            self.cap.errors.append(repr(e))
        finally:
            tls.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


# --- tests ---------------------------------------------------------------------------------------


def test_validate_mode_accepts_rendered_configs(pki, echo):
    configs = {
        "client": client_boot(
            pki, 15008, "10.0.0.2:8080",
            source_headers={"baggage": eh.istio_baggage(
                cluster="Kubernetes", namespace="demo", workload_name="client")},
        ),
        "server-fixed": eh.hbone_server_bootstrap(
            listen=(LO, 15008), cert_file=pki.server.cert, key_file=pki.server.key,
            root_file=pki.root, forward_to=echo.addr, admin_port=15000,
        ),
        "server-authority": eh.hbone_server_bootstrap(
            listen=(LO, 15008), cert_file=pki.server.cert, key_file=pki.server.key,
            root_file=pki.root, forward_to=None, admin_port=15000,
        ),
    }
    # IPv6 shapes (validate mode binds nothing): bracketed authority, quoted forwarded.
    configs["client-v6"] = eh.hbone_client_bootstrap(
        listen=("::1", 15001), target_hbone=("fd00::2", 15008), target_authority="[fd00::2]:80",
        cert_file=pki.client.cert, key_file=pki.client.key, root_file=pki.root,
        expected_peer_spiffe=SERVER_ID,
    )
    for name, boot in configs.items():
        rc, out = validate(eh.render_yaml(boot))
        assert rc == 0 and "OK" in out, f"{name}: envoy --mode validate failed:\n{out}"
    # Validation is real: a broken config is refused.
    broken = configs["client"]
    broken["static_resources"]["clusters"][0]["transport_socket"]["typed_config"][
        "common_tls_context"]["tls_params"]["tls_minimum_protocol_version"] = "TLSv9"
    rc, out = validate(eh.render_yaml(broken))
    assert rc != 0, out


def test_envoy_to_envoy_tunnel_fixed_upstream(pki, echo, server_fixed):
    srv_port = server_fixed.listener_port(eh.SERVER_LISTENER)
    before = server_fixed.stats()
    accepted = echo.accepted
    with EnvoyProcess(client_boot(pki, srv_port, "10.9.9.9:7777"), name="hbone-client") as cli:
        port = cli.listener_port(eh.CLIENT_LISTENER)
        payloads = [b"hello over hbone\n" * 3, bytes(range(256)) * 512]  # 17 B... / 128 KiB
        for p in payloads:
            got = roundtrip(port, p)  # half-close: FIN -> END_STREAM -> FIN and back
            assert got == p, f"echo mismatch ({len(got)} of {len(p)} bytes)\n{diag(cli, server_fixed)}"
        # Concurrent connections share one HTTP/2 connection (one stream each).
        results: list[bytes] = []
        threads = [
            threading.Thread(target=lambda i=i: results.append(roundtrip(port, b"x%d" % i)))
            for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(IO_TIMEOUT * 2)
        assert sorted(results) == sorted(b"x%d" % i for i in range(4))

        c = cli.stats()
        assert c[f"tcp.{eh.CLIENT_LISTENER}.downstream_cx_total"] == 6
        assert c[f"cluster.{eh.CLIENT_CLUSTER}.upstream_cx_total"] == 1, diag(cli)
        assert c[f"cluster.{eh.CLIENT_CLUSTER}.upstream_rq_total"] == 6
        assert c[f"cluster.{eh.CLIENT_CLUSTER}.upstream_cx_http2_total"] == 1
        assert c[f"cluster.{eh.CLIENT_CLUSTER}.ssl.handshake"] == 1
        assert c[f"cluster.{eh.CLIENT_CLUSTER}.ssl.versions.TLSv1.3"] == 1
        assert c.get(f"cluster.{eh.CLIENT_CLUSTER}.ssl.fail_verify_san", 0) == 0

    after = server_fixed.stats()
    delta = lambda k: after.get(k, 0) - before.get(k, 0)  # noqa: E731
    assert delta(f"listener.{eh.SERVER_LISTENER}.ssl.handshake") == 1
    assert delta(f"http.{eh.SERVER_LISTENER}.downstream_cx_http2_total") == 1
    assert delta(f"http.{eh.SERVER_LISTENER}.downstream_rq_total") == 6
    assert delta(f"cluster.{eh.SERVER_FORWARD_CLUSTER}.upstream_cx_total") == 6
    assert echo.accepted - accepted == 6


def test_envoy_to_envoy_tunnel_upstream_from_authority(pki, echo, server_authority):
    srv_port = server_authority.listener_port(eh.SERVER_LISTENER)
    authority = eh.format_authority(*echo.addr)
    with EnvoyProcess(client_boot(pki, srv_port, authority), name="hbone-client") as cli:
        port = cli.listener_port(eh.CLIENT_LISTENER)
        payload = b"routed by :authority"
        assert roundtrip(port, payload) == payload, diag(cli, server_authority)
        server_authority.wait_stat(f"cluster.{eh.SERVER_AUTHORITY_CLUSTER}.upstream_cx_total")

    # A tunnel to a closed port: the server's upstream connect fails, it answers 503, the
    # client Envoy closes the app connection without data.
    closed = eh.format_authority(LO, free_closed_port())
    before = server_authority.stats().get(f"http.{eh.SERVER_LISTENER}.downstream_rq_5xx", 0)
    with EnvoyProcess(client_boot(pki, srv_port, closed), name="hbone-client-closed") as cli:
        port = cli.listener_port(eh.CLIENT_LISTENER)
        assert roundtrip(port, b"nobody home") == b""
        server_authority.wait_stat(
            f"http.{eh.SERVER_LISTENER}.downstream_rq_5xx", lambda v: v == before + 1
        )
        # The client Envoy counts a non-200 CONNECT answer as a failed connect attempt
        # and resets the stream (no 5xx stat: tcp_proxy does not count responses).
        cli.wait_stat(f"cluster.{eh.CLIENT_CLUSTER}.upstream_cx_connect_attempts_exceeded")
        assert cli.stats()[f"cluster.{eh.CLIENT_CLUSTER}.upstream_rq_tx_reset"] == 1


def test_client_rejects_server_with_unexpected_san(pki, echo, server_fixed):
    srv_port = server_fixed.listener_port(eh.SERVER_LISTENER)
    boot = client_boot(pki, srv_port, "10.9.9.9:7777", expect=TD + "not-the-server")
    accepted = echo.accepted
    with EnvoyProcess(boot, name="hbone-client-badsan") as cli:
        port = cli.listener_port(eh.CLIENT_LISTENER)
        assert roundtrip(port, b"should not arrive") == b""
        cli.wait_stat(f"cluster.{eh.CLIENT_CLUSTER}.ssl.fail_verify_san")
        c = cli.stats()
        assert c.get(f"cluster.{eh.CLIENT_CLUSTER}.ssl.handshake", 0) == 0
        assert c[f"cluster.{eh.CLIENT_CLUSTER}.upstream_cx_connect_fail"] >= 1
    assert echo.accepted == accepted


def test_python_client_against_envoy_server(pki, echo, server_authority, server_fixed):
    """What a Python HBONE client sees from an Envoy HBONE server."""
    port = server_authority.listener_port(eh.SERVER_LISTENER)

    c = PyHboneClient(port, pki.client, pki.root)
    try:
        assert c.tls.selected_alpn_protocol() == "h2"
        assert c.tls.version() == "TLSv1.3"
        assert uri_sans(c.tls) == [SERVER_ID]
        # Extra headers like ztunnel's are tolerated.
        status = c.request([
            (":method", "CONNECT"), (":authority", eh.format_authority(*echo.addr)),
            ("forwarded", "for=127.0.0.1"), ("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"),
            ("baggage", eh.istio_baggage(cluster="c", namespace="demo", workload_name="py")),
        ])
        assert status == 200
        assert c.h2.remote_settings.max_concurrent_streams == 200
        assert c.h2.remote_settings.initial_window_size == 4 * 1024 * 1024
        c.send(b"ping", end=True)
        assert c.read_until(4) == b"ping"
        deadline = time.monotonic() + IO_TIMEOUT
        while not (c.ended or c.reset) and time.monotonic() < deadline:
            c._pump()
        assert c.ended, "echo's FIN should arrive as END_STREAM"
    finally:
        c.close()

    # 200 only after the upstream connect: a refused connect or an :authority that is not
    # a numeric ip:port gives 503.
    for authority in (eh.format_authority(LO, free_closed_port()), "example.invalid:80"):
        c = PyHboneClient(port, pki.client, pki.root)
        try:
            assert c.connect(authority) == 503, authority
        finally:
            c.close()

    c = PyHboneClient(port, pki.client, pki.root)
    try:
        status = c.request([(":method", "GET"), (":scheme", "https"), (":path", "/"),
                            (":authority", "x")])
        assert status == 400
    finally:
        c.close()

    # Fixed-upstream server ignores the authority's address.
    c = PyHboneClient(server_fixed.listener_port(eh.SERVER_LISTENER), pki.client, pki.root)
    try:
        assert c.connect("192.0.2.1:1") == 200
        c.send(b"fixed")
        assert c.read_until(5) == b"fixed"
    finally:
        c.close()


@pytest.mark.parametrize(
    "who, reason",
    [("no-cert", "fail_verify_no_cert"), ("rogue-ca", "fail_verify_error"),
     ("foreign-trust-domain", "fail_verify_san")],
)
def test_envoy_server_requires_client_cert_of_trust_domain(pki, server_fixed, who, reason):
    port = server_fixed.listener_port(eh.SERVER_LISTENER)
    stat = f"listener.{eh.SERVER_LISTENER}.ssl.{reason}"
    before = server_fixed.stats().get(stat, 0)
    leaf = {"no-cert": None, "rogue-ca": pki.rogue_client,
            "foreign-trust-domain": pki.foreign_client}[who]
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        c = PyHboneClient(port, leaf, pki.root)
        try:
            # TLS 1.3: the server's verdict on the client cert arrives after the client's
            # handshake completes, so it surfaces on first use.
            c.connect("127.0.0.1:1")
        finally:
            c.close()
    server_fixed.wait_stat(stat, lambda v: v == before + 1)


def test_envoy_client_against_python_server(pki):
    """What a Python HBONE server receives from an Envoy HBONE client."""
    py = PyHboneServer(pki)
    try:
        boot = client_boot(
            pki, py.port, "10.1.2.3:8080",
            source_headers={"baggage": eh.istio_baggage(
                cluster="Kubernetes", namespace="demo", workload_name="client")},
        )
        with EnvoyProcess(boot, name="hbone-client-py") as cli:
            port = cli.listener_port(eh.CLIENT_LISTENER)
            assert roundtrip(port, b"to python") == b"to python", f"{py.cap}\n{diag(cli)}"
        assert py.cap.sni == [None], "Envoy must not send SNI"
        assert py.cap.alpn == ["h2"]
        assert py.cap.tls_version == ["TLSv1.3"]
        assert py.cap.peer_sans == [[CLIENT_ID]]
        (hdrs,) = py.cap.headers
        pseudo = [(k, v) for k, v in hdrs if k.startswith(":")]
        assert sorted(pseudo) == [(":authority", "10.1.2.3:8080"), (":method", "CONNECT")]
        regular = dict((k, v) for k, v in hdrs if not k.startswith(":"))
        assert sorted(regular) == ["baggage", "forwarded"], hdrs  # nothing else (no x-envoy-*)
        assert regular["forwarded"] == "for=127.0.0.1"
        assert regular["baggage"] == (
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=demo,"
            "k8s.deployment.name=client,service.name=client,service.version=latest"
        )
        # ztunnel's HTTP/2 windows (DESIGN.md §4); <= 100 streams per pooled connection.
        first = py.cap.settings[0]
        assert first[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] == 4 * 1024 * 1024
        assert first[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 100
        assert py.cap.conn_window_updates[0] == 16 * 1024 * 1024 - 65535
    finally:
        py.close()


def test_bootstrap_shape_and_input_checks(pki):
    boot = client_boot(pki, 15008, "[fd00::1]:80")
    tp = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert tp["tunneling_config"]["hostname"] == "[fd00::1]:80"
    tls = boot["static_resources"]["clusters"][0]["transport_socket"]["typed_config"]
    assert "sni" not in tls
    assert tls["common_tls_context"]["alpn_protocols"] == ["h2"]
    assert tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": SERVER_ID}}
    ]
    assert tp["tunneling_config"]["headers_to_add"][0]["header"] == {
        "key": "forwarded", "value": "for=%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}
    v6 = eh.hbone_client_bootstrap(
        listen=("::1", 0), target_hbone=(LO, 15008), target_authority="10.0.0.1:80",
        cert_file="c", key_file="k", root_file="r", expected_peer_spiffe=SERVER_ID,
        source_headers={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"},
    )
    tp6 = v6["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert [h["header"] for h in tp6["tunneling_config"]["headers_to_add"]] == [
        {"key": "forwarded", "value": 'for="[%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%]"'},
        {"key": "traceparent", "value": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"},
    ]
    text = eh.render_yaml(boot)
    assert "&id" not in text and "*id" not in text  # no YAML aliases
    from meshcore.errors import BadInputError

    bad = [
        dict(target_authority="fd00::1:80"),
        dict(target_authority="10.0.0.1"),
        dict(target_authority="[10.0.0.1]:80"),
        dict(target_authority="[nope]:80"),
        dict(expected_peer_spiffe="cluster.local/ns/demo/sa/server"),
        dict(source_headers={":path": "/"}),
    ]
    for override in bad:
        kw = dict(
            listen=(LO, 0), target_hbone=(LO, 15008), target_authority="10.0.0.1:80",
            cert_file="c", key_file="k", root_file="r", expected_peer_spiffe=SERVER_ID,
        )
        kw.update(override)
        with pytest.raises(BadInputError):
            eh.hbone_client_bootstrap(**kw)
    with pytest.raises(BadInputError):
        eh.hbone_server_bootstrap(listen=("localhost", 15008), cert_file="c", key_file="k",
                                  root_file="r")
