"""Issue 12's defects, each driven through a real Envoy 1.40 on a lab of our own.

Both directions, as in test_interop_envoy: Envoy as the HBONE *client* (in the
un-enrolled legacy-2's netns) dialling our node2 ztunnel on server-2:15008, and Envoy as
the HBONE *server* on ext-2:15008 (ext-2 marked enrolled, so node1's ztunnel tunnels
client-1's connections to it).  The lab runs with a plug-in CA made here, so the test,
as the operator, issues Envoy's certificates (good and bad ones) from the same root.
Witnesses: the app sockets themselves (bytes, FIN or RST), Envoy's admin stats and
debug log, and our ztunnels' access records and counters.
"""
from __future__ import annotations

import json
import socket
import struct
import threading
import time
import uuid
from datetime import datetime, timezone

import pytest

from meshcore import constants as C
from meshcore import netns
from meshlane import lab as labmod
from slowpath import envoy_hbone as eh
from tests.envoy_util import EnvoyProcess, requires_envoy
from tests.root.meshtest import (
    connect_from,
    ml,
    ok,
    operator_lab,
    set_enrolled,
    wait_record,
    wait_until,
    zt_connections,
    ztunnel_sees,
)

pytestmark = [pytest.mark.root, requires_envoy()]

TD = "spiffe://cluster.local"
SERVER_ID = f"{TD}/ns/demo/sa/server"
ENVOY_CLIENT_ID = f"{TD}/ns/legacy/sa/envoy-client"
EXT_ID = f"{TD}/ns/external/sa/default"
BACKEND_PORT = 9000
IO = 15.0
MiB = 1024 * 1024

TOPOLOGY = """
nodes: [node1, node2]
namespaces:
  demo: {labels: {"istio.io/dataplane-mode": ambient}}
  legacy: {labels: {}}
  external: {labels: {}}
pods:
  - {name: client-1, node: node1, namespace: demo, serviceAccount: client, app: none}
  - {name: leaver-1, node: node1, namespace: demo, serviceAccount: client, app: none}
  - {name: server-2, node: node2, namespace: demo, serviceAccount: server, app: http}
  - {name: legacy-2, node: node2, namespace: legacy, serviceAccount: default, app: none}
  - {name: ext-2, node: node2, namespace: external, serviceAccount: default, app: none}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with operator_lab("mlh", TOPOLOGY, tmp_path_factory.mktemp("hardening")) as lab_:
        yield lab_


# --- backends: plain TCP servers inside a pod's netns, one thread per connection ----------

class Backend:
    """`handler(conn)` for every connection accepted on 0.0.0.0:`port` in netns `ns`."""

    def __init__(self, ns: str, port: int, handler):
        with netns.entered(ns):
            self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", port))
        self.sock.listen(256)
        self.sock.settimeout(0.2)
        self.handler = handler
        self.accepted = 0
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(IO)
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()
        for t in self.threads:
            t.join(5)


def rst_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def echo(conn: socket.socket) -> None:
    while chunk := conn.recv(65536):
        conn.sendall(chunk)
    conn.shutdown(socket.SHUT_WR)


def read_to_end(s: socket.socket) -> tuple[bytes, str]:
    """Everything readable and how the stream ended: "FIN" or "RST"."""
    got = bytearray()
    while True:
        try:
            chunk = s.recv(1 << 20)
        except ConnectionResetError:
            return bytes(got), "RST"
        if not chunk:
            return bytes(got), "FIN"
        got += chunk


def exchange(ns: str, addr: tuple[str, int], payload: bytes) -> tuple[bytes, str]:
    """Connect from netns `ns`, send, half-close, read to the end: (bytes, "FIN"|"RST").
    A reset may come as early as connect() itself (the refusal can beat its wake-up)."""
    try:
        with connect_from(ns, addr, timeout=IO) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            return read_to_end(s)
    except (ConnectionResetError, BrokenPipeError):
        return b"", "RST"


# --- Envoy at both ends -------------------------------------------------------------------

def hcm_of(boot: dict) -> dict:
    chain = boot["static_resources"]["listeners"][0]["filter_chains"][0]
    return chain["filters"][0]["typed_config"]


def envoy_server(lab, *, max_streams: int | None = None, max_connection_s: float | None = None,
                 log_level: str = "info") -> EnvoyProcess:
    """Envoy as ext-2's HBONE server, forwarding every tunnel to ext-2's backend port."""
    name, pods, pki, base = lab
    cert, key = pki.issue(EXT_ID, base / f"envoy-server-{uuid.uuid4().hex[:6]}")
    boot = eh.hbone_server_bootstrap(listen=("0.0.0.0", C.PORT_HBONE), cert_file=cert, key_file=key,
                                     root_file=pki.root_file, forward_to=("127.0.0.1", BACKEND_PORT))
    hcm = hcm_of(boot)
    if max_streams is not None:
        hcm["http2_protocol_options"]["max_concurrent_streams"] = max_streams
    if max_connection_s is not None:
        # Envoy drains a connection past this age: GOAWAY (NO_ERROR), open streams go on
        hcm["common_http_protocol_options"] = {"max_connection_duration": f"{max_connection_s}s"}
        hcm["drain_timeout"] = "60s"
    return EnvoyProcess(boot, name="hbone-server", netns=pods["ext-2"]["netns"], log_level=log_level)


class ExtEnrolled:
    """ext-2 counts as an HBONE workload for node1's ztunnel while the block runs."""

    def __init__(self, lab):
        self.name, pods = lab[0], lab[1]
        self.ext = pods["ext-2"]

    def __enter__(self):
        set_enrolled(self.name, self.ext, True)
        wait_until("node1's ztunnel to treat ext-2 as HBONE",
                   lambda: ztunnel_sees(self.name, "node1", self.ext["ip"], "HBONE"))
        return self

    def __exit__(self, *exc):
        set_enrolled(self.name, self.ext, False)
        wait_until("node1's ztunnel to treat ext-2 as TCP again",
                   lambda: ztunnel_sees(self.name, "node1", self.ext["ip"], "TCP"))


def envoy_client(lab, *, authority: str, cert_key: tuple[str, str] | None = None,
                 alpn: list[str] | None = ["h2"], log_level: str = "info") -> EnvoyProcess:
    """Envoy as an HBONE client in legacy-2, tunnelling to server-2:15008 with `authority`."""
    name, pods, pki, base = lab
    cert, key = cert_key or pki.issue(ENVOY_CLIENT_ID, base / f"envoy-client-{uuid.uuid4().hex[:6]}")
    boot = eh.hbone_client_bootstrap(listen=("127.0.0.1", 0),
                                     target_hbone=(pods["server-2"]["ip"], C.PORT_HBONE),
                                     target_authority=authority, cert_file=cert, key_file=key,
                                     root_file=pki.root_file, expected_peer_spiffe=SERVER_ID)
    tls_ctx = boot["static_resources"]["clusters"][0]["transport_socket"]["typed_config"]
    if alpn is None:
        del tls_ctx["common_tls_context"]["alpn_protocols"]
    else:
        tls_ctx["common_tls_context"]["alpn_protocols"] = alpn
    return EnvoyProcess(boot, name="hbone-client", netns=pods["legacy-2"]["netns"], log_level=log_level)


def through_envoy_client(lab, envoy: EnvoyProcess, payload: bytes, *, shut: bool = True
                         ) -> tuple[bytes, str]:
    """Send `payload` into the client Envoy's listener from legacy-2; what came back."""
    port = envoy.listener_port(eh.CLIENT_LISTENER)
    with connect_from(lab[1]["legacy-2"]["netns"], ("127.0.0.1", port), timeout=IO) as s:
        s.sendall(payload)
        if shut:
            s.shutdown(socket.SHUT_WR)
        return read_to_end(s)


def zt_stats(lab_name: str, node: str) -> dict[str, int]:
    code, body = labmod.http_get_in_netns(f"{lab_name}-{node}", C.PORT_ADMIN, "/stats")
    assert code == 200, body
    return json.loads(body)["counters"]


def zt_open(lab_name: str, node: str) -> list[dict]:
    code, body = labmod.http_get_in_netns(f"{lab_name}-{node}", C.PORT_ADMIN, "/connections")
    assert code == 200, body
    return json.loads(body)["open"]


def http_get_bytes(ip: str) -> bytes:
    return f"GET /hardening HTTP/1.1\r\nHost: {ip}:8080\r\nConnection: close\r\n\r\n".encode()


# --- 1 and 7: what our 15008 refuses during the TLS handshake -------------------------------

BAD_LEAVES = {
    "dns-san-only": dict(dns=["envoy-client.legacy.svc.cluster.local"]),
    "two-uri-sans": dict(uris=[ENVOY_CLIENT_ID, f"{TD}/ns/demo/sa/client"]),
    "foreign-trust-domain": dict(uris=["spiffe://evil.example/ns/legacy/sa/envoy-client"]),
    "uri-not-spiffe": dict(uris=["https://envoy-client.example/"]),
}


KIND_OF = {"dns-san-only": {"NO_URI_SAN"}, "two-uri-sans": {"MULTIPLE_URI_SANS"},
           "foreign-trust-domain": {"FOREIGN_TRUST_DOMAIN"}, "uri-not-spiffe": {"NOT_SPIFFE"}}


@pytest.mark.parametrize("kind", sorted(BAD_LEAVES))
def test_client_leaf_without_one_spiffe_id_of_our_domain_is_refused_in_tls(lab, kind):
    """Item 1 (and 7: a wrong trust domain): a leaf signed by the trusted root but with
    no SPIFFE URI SAN, two URI SANs, another trust domain or a non-SPIFFE URI gets a TLS
    alert during the handshake: no CONNECT is ever answered, the refusal is logged
    and counted."""
    name, pods, pki, base = lab
    s2, legacy = pods["server-2"], pods["legacy-2"]
    cert_key = pki.issue_leaf(base / f"bad-{kind}", **BAD_LEAVES[kind])
    before = zt_stats(name, "node2")
    since = datetime.now(timezone.utc).isoformat()
    with envoy_client(lab, authority=f"{s2['ip']}:8080", cert_key=cert_key,
                      log_level="debug") as envoy:
        got, end = through_envoy_client(lab, envoy, http_get_bytes(s2["ip"]))
        assert not got.startswith(b"HTTP/1.1 200"), got[:200]
        c = envoy.stats()
        up = f"cluster.{eh.CLIENT_CLUSTER}"
        assert c.get(f"{up}.ssl.connection_error", 0) >= 1, envoy.log_tail()
        # the alert came from OpenSSL inside the handshake; Envoy (BoringSSL) names it.
        # certificate_unknown is what Envoy and Istio's ztunnel send for these leaves.
        assert "ALERT_CERTIFICATE_UNKNOWN" in envoy.log(), envoy.log_tail(60)
    rec = wait_record(name, "node2", lambda r: r.get("error") == "TLS_FAILURE" and r["time"] > since
                      and r.get("src", "").startswith(legacy["ip"] + ":"))
    assert rec["dst_workload"] == "demo/server-2", rec
    after = zt_stats(name, "node2")
    assert after.get("failed.TLS_FAILURE", 0) > before.get("failed.TLS_FAILURE", 0)
    assert rec["tls_failure"] in KIND_OF[kind], rec
    assert after.get(f"tls_refused.{rec['tls_failure']}", 0) > before.get(f"tls_refused.{rec['tls_failure']}", 0)
    assert not any(r.get("direction") == "inbound" and r.get("status") == 200
                   and r.get("src") == legacy["ip"] and r.get("src_identity") in (None, "")
                   for r in zt_connections(name, "node2"))


def test_client_without_alpn_is_served_and_one_without_h2_gets_an_alert(lab):
    """Item 7: no ALPN offered -> accepted, HTTP/2 spoken (as Envoy and Istio's ztunnel
    do); ALPN offered without h2 -> no_application_protocol alert."""
    name, pods, _, _ = lab
    s2 = pods["server-2"]
    with envoy_client(lab, authority=f"{s2['ip']}:8080", alpn=None) as envoy:
        got, _ = through_envoy_client(lab, envoy, http_get_bytes(s2["ip"]))
        assert got.startswith(b"HTTP/1.1 200"), (got[:200], envoy.log_tail())
    with envoy_client(lab, authority=f"{s2['ip']}:8080", alpn=["http/1.1"], log_level="debug") as envoy:
        got, _ = through_envoy_client(lab, envoy, http_get_bytes(s2["ip"]))
        assert not got.startswith(b"HTTP/1.1 200")
        assert "ALERT_NO_APPLICATION_PROTOCOL" in envoy.log(), envoy.log_tail(60)


def test_inbound_access_record_counts_bytes_from_the_destinations_side(lab):
    """Item 7: bytes_received is what the client sent, bytes_sent what went back."""
    name, pods, _, _ = lab
    s2, legacy = pods["server-2"], pods["legacy-2"]
    request = http_get_bytes(s2["ip"]).replace(b"/hardening", b"/hardening-" + b"x" * 3000)
    with envoy_client(lab, authority=f"{s2['ip']}:8080") as envoy:
        got, end = through_envoy_client(lab, envoy, request)
        assert got.startswith(b"HTTP/1.1 200"), got[:200]
    rec = wait_record(name, "node2", lambda r: r.get("direction") == "inbound"
                      and r.get("src_identity") == ENVOY_CLIENT_ID and "bytes_sent" in r
                      and r.get("bytes_received") == len(request))
    assert rec["bytes_sent"] == len(got), rec
    assert rec["src"] == legacy["ip"]


# --- 2: nothing connects back into the ztunnel ------------------------------------------------

@pytest.mark.parametrize("port", C.POD_LISTENER_PORTS)
def test_connect_to_the_pods_own_mesh_ports_is_refused_and_never_loops(lab, port):
    """Item 2: over HBONE (a real Envoy client, and our own outbound from client-1) and
    as plaintext from an un-enrolled pod: 503 / reset, one record per attempt, and no
    connection left behind or growing after the client left."""
    name, pods, _, _ = lab
    s2, legacy, c1 = pods["server-2"], pods["legacy-2"], pods["client-1"]
    authority = f"{s2['ip']}:{port}"

    def records() -> list[dict]:
        return [r for r in zt_connections(name, "node2") if r.get("dst", "").endswith(f":{port}")
                and r.get("dst_workload") == "demo/server-2"]
    before = len(records())
    with envoy_client(lab, authority=authority) as envoy:
        got, end = through_envoy_client(lab, envoy, b"hello")
        assert got == b"", got[:100]
        assert envoy.stats().get(f"cluster.{eh.CLIENT_CLUSTER}.upstream_cx_connect_attempts_exceeded", 0) >= 1
    # our own mesh client: HBONE from node1's ztunnel
    assert exchange(c1["netns"], (s2["ip"], port), b"hello") == (b"", "RST")
    # plaintext from outside the mesh (15008 is the TLS listener: not a plaintext target)
    if port != C.PORT_HBONE:
        assert exchange(legacy["netns"], (s2["ip"], port), b"hello") == (b"", "RST")
    time.sleep(2)
    mine = records()[before:]
    attempts = 2 if port == C.PORT_HBONE else 3
    assert len(mine) == attempts, mine
    for r in mine:
        assert "ztunnel's own listener" in r.get("reason", ""), r
        assert r.get("status") in (503, None)
    assert not [o for o in zt_open(name, "node2") if o.get("dst", "").endswith(f":{port}")]


# --- 3 and 4: how a tunnel ends reaches the app exactly ----------------------------------------

def test_envoy_reset_reaches_our_app_as_a_reset_not_a_fin(lab):
    """Item 3, our outbound -> Envoy server: the backend promises 20 MiB and resets after
    8; Envoy resets the stream; client-1 must see ECONNRESET, never a clean end."""
    name, pods, _, _ = lab
    ext, c1 = pods["ext-2"], pods["client-1"]

    def truncated(conn):
        conn.recv(100)
        chunk = b"z" * (1 * MiB)
        for _ in range(8):
            conn.sendall(chunk)
        time.sleep(0.2)
        rst_close(conn)

    with Backend(ext["netns"], BACKEND_PORT, truncated), envoy_server(lab) as envoy, ExtEnrolled(lab):
        with connect_from(c1["netns"], (ext["ip"], BACKEND_PORT), timeout=IO) as s:
            s.sendall(b"send me 20 MiB")
            got, end = read_to_end(s)
        assert end == "RST", f"{len(got)} bytes, then a clean FIN: the truncation was hidden"
        assert len(got) < 20 * MiB
        envoy.wait_stat(f"http.{eh.SERVER_LISTENER}.downstream_rq_tx_reset")


def test_app_reset_reaches_envoy_as_rst_stream_connect_error(lab):
    """Item 3, Envoy client -> our inbound: the app resets its connection; our ztunnel
    answers with RST_STREAM CONNECT_ERROR (RFC 9113 §8.5), which Envoy's http2 codec
    logs as "stream N closed: 10" (CANCEL would be 8).  (How Envoy 1.40's tcp_proxy then
    closes its own downstream is Envoy's business: here it sends a FIN.)"""
    name, pods, _, _ = lab
    s2 = pods["server-2"]

    def resetter(conn):
        conn.recv(100)
        rst_close(conn)

    with Backend(s2["netns"], 9100, resetter), \
            envoy_client(lab, authority=f"{s2['ip']}:9100", log_level="debug") as envoy:
        got, end = through_envoy_client(lab, envoy, b"hello", shut=False)
        assert got == b""
        envoy.wait_stat(f"cluster.{eh.CLIENT_CLUSTER}.http2.rx_reset")
        closed = [ln for ln in envoy.log().splitlines() if "[http2]" in ln and " closed: " in ln]
        assert closed and all(ln.endswith("closed: 10") for ln in closed), (closed, envoy.log_tail(60))


@pytest.mark.parametrize("end", ["FIN", "RST"])
def test_server_first_greeting_then_close_reaches_the_app(lab, end):
    """Item 4: a backend greets and closes at once; Envoy sends the 200, the greeting and
    the end together.  client-1 gets the greeting, then the end as it happened."""
    name, pods, _, _ = lab
    ext, c1 = pods["ext-2"], pods["client-1"]
    greeting = b"220 hardening.example ESMTP ready\r\n"

    def greeter(conn):
        conn.sendall(greeting)
        if end == "RST":
            time.sleep(0.05)
            rst_close(conn)
        else:
            conn.shutdown(socket.SHUT_WR)
            time.sleep(0.5)

    with Backend(ext["netns"], BACKEND_PORT, greeter), envoy_server(lab), ExtEnrolled(lab):
        with connect_from(c1["netns"], (ext["ip"], BACKEND_PORT), timeout=IO) as s:
            if end == "FIN":
                s.shutdown(socket.SHUT_WR)
            got, how = read_to_end(s)
        assert got == greeting
        assert how == end


# --- 5 and 6: GOAWAY and the peer's stream limit ------------------------------------------------

def test_envoy_graceful_goaway_lets_open_tunnels_finish(lab):
    """Item 5: Envoy drains the connection (max_connection_duration -> GOAWAY NO_ERROR):
    the tunnel already open keeps working, and a new one goes to a new connection."""
    name, pods, _, _ = lab
    ext, c1 = pods["ext-2"], pods["client-1"]
    with Backend(ext["netns"], BACKEND_PORT, echo), envoy_server(lab, max_connection_s=1.0) as envoy, \
            ExtEnrolled(lab):
        first = connect_from(c1["netns"], (ext["ip"], BACKEND_PORT), timeout=IO)
        with first:
            first.sendall(b"before")
            assert first.recv(100) == b"before"
            envoy.wait_stat(f"http.{eh.SERVER_LISTENER}.downstream_cx_max_duration_reached", timeout=10)
            time.sleep(0.3)
            first.sendall(b"after the GOAWAY")
            assert first.recv(100) == b"after the GOAWAY"
            with connect_from(c1["netns"], (ext["ip"], BACKEND_PORT), timeout=IO) as second:
                second.sendall(b"new tunnel")
                second.shutdown(socket.SHUT_WR)
                assert read_to_end(second) == (b"new tunnel", "FIN")
            first.shutdown(socket.SHUT_WR)
            assert read_to_end(first) == (b"", "FIN")
        stats = envoy.stats()
        assert stats.get(f"http.{eh.SERVER_LISTENER}.downstream_cx_total", 0) >= 2


@pytest.mark.parametrize(("limit", "parallel"), [(10, 30), (100, 150)])
def test_pool_honours_the_peers_stream_limit(lab, limit, parallel):
    """Item 6: against an Envoy allowing `limit` streams per connection, `parallel`
    connections held open at once are all served, over several HBONE connections."""
    name, pods, _, _ = lab
    ext, c1 = pods["ext-2"], pods["client-1"]
    results: dict[int, object] = {}
    barrier = threading.Barrier(parallel)

    def one(i: int) -> None:
        try:
            with connect_from(c1["netns"], (ext["ip"], BACKEND_PORT), timeout=IO) as s:
                msg = f"conn-{i}-".encode() * 50
                s.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                barrier.wait(IO)   # every connection is open at the same time
                s.shutdown(socket.SHUT_WR)
                rest, end = read_to_end(s)
                results[i] = (got + rest == msg, end)
        except Exception as exc:  # noqa: BLE001 - the assertion below lists them
            results[i] = repr(exc)

    with Backend(ext["netns"], BACKEND_PORT, echo), envoy_server(lab, max_streams=limit) as envoy, \
            ExtEnrolled(lab):
        threads = [threading.Thread(target=one, args=(i,)) for i in range(parallel)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        bad = {i: r for i, r in results.items() if r != (True, "FIN")}
        assert len(results) == parallel and not bad, bad
        stats = envoy.stats()
        assert stats.get(f"http.{eh.SERVER_LISTENER}.downstream_cx_total", 0) >= -(-parallel // limit)
        assert stats.get(f"http.{eh.SERVER_LISTENER}.downstream_rq_2xx", 0) >= parallel


# --- 9: a pod that leaves the mesh takes its HBONE connections with it ----------------------------

def test_detach_closes_the_pods_pooled_hbone_connections(lab):
    name, pods, _, _ = lab
    leaver, s2 = pods["leaver-1"], pods["server-2"]
    with connect_from(leaver["netns"], (s2["ip"], 8080), timeout=IO) as s:
        s.sendall(http_get_bytes(s2["ip"]))
        got, _ = read_to_end(s)
    assert got.startswith(b"HTTP/1.1 200")

    def pooled() -> list:
        code, body = labmod.http_get_in_netns(f"{name}-node1", C.PORT_ADMIN, "/config_dump")
        return [p for p in json.loads(body)["pool"] if p["key"][3] == leaver["ip"]]

    def hbone_sockets() -> list[str]:
        out = ml("lab", "exec", "leaver-1", "--", "ss", "-Htn", "state", "established", lab=name)
        return [ln for ln in out.stdout.splitlines() if f":{C.PORT_HBONE}" in ln]

    assert pooled(), "the connection should have left a pooled HBONE link"
    assert hbone_sockets()
    ok(ml("detach", "leaver-1", lab=name))
    wait_until("leaver-1's pooled HBONE link to go", lambda: not pooled(), timeout=5)
    wait_until("leaver-1's HBONE socket to close", lambda: not hbone_sockets(), timeout=5)
