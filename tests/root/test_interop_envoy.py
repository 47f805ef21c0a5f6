"""Interop with a real Envoy 1.40 on the lab: our ztunnel <-> Envoy over HBONE, both ways.

One lab for the module, started with a plug-in CA made here (root -> intermediate, Istio
`cacerts` layout).  The test plays the operator who owns that CA: it issues Envoy's
leaves from the intermediate itself, so Envoy and the mesh trust each other through the
same root, exactly as an outside HBONE peer would be brought in.

* Envoy as the HBONE *client* (slowpath.envoy_hbone.hbone_client_bootstrap), run in the
  un-enrolled legacy-2's netns, tunnels a plain HTTP request to server-2:15008, where
  node2's ztunnel must accept it and take the caller's identity from Envoy's certificate.
* Envoy as the HBONE *server* (hbone_server_bootstrap) in ext-2's netns on :15008: once
  ext-2's Pod object says enrolled, client-1's redirected connection must leave node1's
  ztunnel as an HBONE CONNECT that Envoy accepts and forwards to an echo server.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshcore import constants as C
from meshcore import netns
from meshlane import lab as labmod
from slowpath import control_client
from slowpath import envoy_hbone as eh
from tests.envoy_util import EnvoyProcess, requires_envoy
from tests.root.meshtest import wait_record

pytestmark = [
    pytest.mark.root,
    requires_envoy(),
]

TD = "spiffe://cluster.local"
SERVER_ID = f"{TD}/ns/demo/sa/server"
# Not an identity the control plane hands out to any pod: if node2's ztunnel logs it,
# it can only have come from Envoy's certificate.
ENVOY_CLIENT_ID = f"{TD}/ns/legacy/sa/envoy-client"
EXT_ID = f"{TD}/ns/external/sa/default"
ECHO_PORT = 9000
IO_TIMEOUT = 10.0

TOPOLOGY = """
nodes: [node1, node2]
namespaces:
  demo: {labels: {"istio.io/dataplane-mode": ambient}}
  legacy: {labels: {}}
  external: {labels: {}}
pods:
  - {name: client-1, node: node1, namespace: demo, serviceAccount: client, app: none}
  - {name: server-1, node: node1, namespace: demo, serviceAccount: server, app: http}
  - {name: server-2, node: node2, namespace: demo, serviceAccount: server, app: http}
  - {name: legacy-2, node: node2, namespace: legacy, serviceAccount: default, app: none}
  - {name: ext-2, node: node2, namespace: external, serviceAccount: default, app: none}
"""


# --- the operator's PKI ----------------------------------------------------------------


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
        now = datetime.datetime.now(datetime.timezone.utc)
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]),
                           critical=True)
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


# --- lab ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interop(tmp_path_factory):
    base = tmp_path_factory.mktemp("interop")
    pki = OperatorPki(base / "cacerts")
    topo = base / "topology.yaml"
    topo.write_text(TOPOLOGY)
    name = f"mli{os.getpid() % 10000}"
    try:
        state = labmod.up(name, str(topo), cacerts=str(pki.dir))
        yield name, {p["name"]: p for p in state["pods"]}, pki, base
    finally:
        try:
            labmod.down(name, quiet=True)
        except Exception:
            pass


def connect_from(ns: str, addr: tuple[str, int], timeout: float = IO_TIMEOUT) -> socket.socket:
    with netns.entered(ns):
        s = socket.socket()
    s.settimeout(timeout)
    try:
        s.connect(addr)
    except BaseException:
        s.close()
        raise
    return s


def read_all(s: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


# --- 1: Envoy client -> our ztunnel --------------------------------------------------------


def test_envoy_hbone_client_reaches_our_ztunnel(interop):
    lab, pods, pki, base = interop
    legacy, s2 = pods["legacy-2"], pods["server-2"]
    cert, key = pki.issue(ENVOY_CLIENT_ID, base / "envoy-client")
    boot = eh.hbone_client_bootstrap(
        listen=("127.0.0.1", 0),
        target_hbone=(s2["ip"], C.PORT_HBONE),
        target_authority=f"{s2['ip']}:8080",
        cert_file=cert, key_file=key, root_file=pki.root_file,
        expected_peer_spiffe=SERVER_ID,
    )
    marker = f"envoy-interop-{uuid.uuid4().hex[:12]}"
    with EnvoyProcess(boot, name="hbone-client", netns=legacy["netns"]) as envoy:
        port = envoy.listener_port(eh.CLIENT_LISTENER)
        with connect_from(legacy["netns"], ("127.0.0.1", port)) as s:
            s.sendall(f"GET /{marker} HTTP/1.1\r\nHost: {s2['ip']}:8080\r\n"
                      "Connection: close\r\n\r\n".encode())
            data = read_all(s)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), (data[:300], envoy.log_tail())
        answer = json.loads(body)
        assert answer["pod"] == "server-2" and answer["path"] == f"/{marker}"
        # the ztunnel connects to the app transparently from the tunnel's source (legacy-2)
        assert answer["peer"].split(":")[0] == legacy["ip"], answer

        rec = wait_record(lab, "node2", lambda r: r.get("direction") == "inbound"
                          and r.get("protocol") == "HBONE"
                          and r.get("src_identity") == ENVOY_CLIENT_ID
                          and r.get("status") is not None)
        assert rec["status"] == 200, rec
        assert rec["src"] == legacy["ip"]
        assert rec["dst"] == f"{s2['ip']}:8080"
        assert rec["dst_identity"] == SERVER_ID and rec["dst_workload"] == "demo/server-2"

        c = envoy.stats()
        up = f"cluster.{eh.CLIENT_CLUSTER}"
        assert c.get(f"{up}.ssl.handshake", 0) >= 1, envoy.log_tail()
        assert c.get(f"{up}.ssl.versions.TLSv1.3", 0) >= 1
        assert c.get(f"{up}.upstream_cx_http2_total", 0) >= 1
        assert c.get(f"{up}.ssl.fail_verify_san", 0) == 0
        assert c.get(f"{up}.upstream_cx_connect_attempts_exceeded", 0) == 0
    assert envoy.proc is not None and envoy.proc.poll() is not None


# --- 2: our ztunnel -> Envoy server ----------------------------------------------------------


class EchoServer:
    """TCP echo on 0.0.0.0:<port> inside a netns; one thread, connections served in turn."""

    def __init__(self, ns: str, port: int):
        with netns.entered(ns):
            self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", port))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.received: list[bytes] = []
        self.peers: list[tuple[str, int]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="echo", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, peer = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.peers.append(peer)
            with conn:
                conn.settimeout(IO_TIMEOUT)
                got = b""
                try:
                    while chunk := conn.recv(65536):
                        got += chunk
                        conn.sendall(chunk)
                except OSError:
                    pass
                self.received.append(got)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


def _set_enrolled(lab: str, pod: dict, value: bool) -> None:
    control_client.call(str(labmod.LabPaths(lab).control_socket), "set_status", kind="Pod",
                        name=pod["name"], namespace=pod["namespace"], status={"enrolled": value})


def _ztunnel_sees(lab: str, node: str, ip: str, protocol: str) -> bool:
    code, body = labmod.http_get_in_netns(f"{lab}-{node}", C.PORT_ADMIN, "/config_dump")
    assert code == 200
    return any(w["ip"] == ip and w["protocol"] == protocol for w in json.loads(body)["workloads"])


def _wait(what: str, check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_our_ztunnel_reaches_envoy_hbone_server(interop):
    lab, pods, pki, base = interop
    c1, ext = pods["client-1"], pods["ext-2"]
    assert ext["serviceAccount"] == "default" and ext["namespace"] == "external"
    cert, key = pki.issue(EXT_ID, base / "envoy-server")
    boot = eh.hbone_server_bootstrap(
        listen=("0.0.0.0", C.PORT_HBONE),
        cert_file=cert, key_file=key, root_file=pki.root_file,
        forward_to=("127.0.0.1", ECHO_PORT),
    )
    echo = EchoServer(ext["netns"], ECHO_PORT)
    try:
        with EnvoyProcess(boot, name="hbone-server", netns=ext["netns"]) as envoy:
            assert envoy.listener_port(eh.SERVER_LISTENER) == C.PORT_HBONE
            before = envoy.stats()
            _set_enrolled(lab, ext, True)
            try:
                _wait("node1's ztunnel to treat ext-2 as HBONE",
                      lambda: _ztunnel_sees(lab, "node1", ext["ip"], "HBONE"))
                payload = f"ping-through-envoy-{uuid.uuid4().hex}".encode() * 50
                with connect_from(c1["netns"], (ext["ip"], ECHO_PORT)) as s:
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                    echoed = read_all(s)
                assert echoed == payload, (len(echoed), len(payload), envoy.log_tail())
                _wait("the echo server to finish", lambda: payload in echo.received)
                # Envoy, not the client, connected to the echo server
                assert echo.peers and echo.peers[-1][0] == "127.0.0.1"

                out = wait_record(lab, "node1", lambda r: r.get("direction") == "outbound"
                                  and r.get("dst") == f"{ext['ip']}:{ECHO_PORT}")
                assert out["protocol"] == "HBONE", out
                assert out["dst_identity"] == EXT_ID
                assert out["src_identity"] == f"{TD}/ns/demo/sa/client"
                assert "error" not in out, out
                assert out["bytes_sent"] == len(payload) and out["bytes_received"] == len(payload)

                after = envoy.stats()

                def delta(k: str) -> int:
                    return after.get(k, 0) - before.get(k, 0)

                assert delta(f"listener.{eh.SERVER_LISTENER}.ssl.handshake") >= 1, envoy.log_tail()
                assert delta(f"listener.{eh.SERVER_LISTENER}.ssl.versions.TLSv1.3") >= 1
                assert delta(f"http.{eh.SERVER_LISTENER}.downstream_cx_http2_total") >= 1
                assert delta(f"http.{eh.SERVER_LISTENER}.downstream_rq_total") == 1
                # the one request was our ztunnel's CONNECT, upgraded to a tunnel
                assert delta(f"http.{eh.SERVER_LISTENER}.downstream_cx_upgrades_total") == 1
                assert delta(f"http.{eh.SERVER_LISTENER}.downstream_rq_2xx") == 1
                assert delta(f"cluster.{eh.SERVER_FORWARD_CLUSTER}.upstream_cx_total") == 1
            finally:
                _set_enrolled(lab, ext, False)
            _wait("node1's ztunnel to treat ext-2 as plain TCP again",
                  lambda: _ztunnel_sees(lab, "node1", ext["ip"], "TCP"))
        assert envoy.proc is not None and envoy.proc.poll() is not None
    finally:
        echo.close()
