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

import json
import socket
import threading
import uuid

import pytest

from meshcore import constants as C
from meshcore import netns
from slowpath import envoy_hbone as eh
from tests.envoy_util import EnvoyProcess, requires_envoy
from tests.root.meshtest import (
    connect_from,
    operator_lab,
    read_all,
    set_enrolled,
    wait_record,
    wait_until,
    ztunnel_sees,
)

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


# --- lab ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interop(tmp_path_factory):
    with operator_lab("mli", TOPOLOGY, tmp_path_factory.mktemp("interop")) as lab_:
        yield lab_


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
            set_enrolled(lab, ext, True)
            try:
                wait_until("node1's ztunnel to treat ext-2 as HBONE",
                      lambda: ztunnel_sees(lab, "node1", ext["ip"], "HBONE"))
                payload = f"ping-through-envoy-{uuid.uuid4().hex}".encode() * 50
                with connect_from(c1["netns"], (ext["ip"], ECHO_PORT)) as s:
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                    echoed = read_all(s)
                assert echoed == payload, (len(echoed), len(payload), envoy.log_tail())
                wait_until("the echo server to finish", lambda: payload in echo.received)
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
                set_enrolled(lab, ext, False)
            wait_until("node1's ztunnel to treat ext-2 as plain TCP again",
                  lambda: ztunnel_sees(lab, "node1", ext["ip"], "TCP"))
        assert envoy.proc is not None and envoy.proc.poll() is not None
    finally:
        echo.close()
