"""The mesh doing its job end to end: real lab, real BPF, real mTLS, real captures.

One lab (default topology) for the module, started through `meshlane.lab.up` exactly as
`meshlane lab up` does, and torn down even when a test fails.
"""
from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import uuid
from datetime import timedelta

import pytest

from meshcore import constants as C
from meshcore import netns
from meshcore.identity import SpiffeId
from fastpath import loader
from meshlane import lab as labmod
from meshlane.ca import CertificateAuthority
from slowpath import certs, control_client, tls
from tests.root.meshtest import Capture, running_lab, wait_record, connect_status as _connect_status, node_cert as _node_cert, tls_to as _tls_to

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab():
    with running_lab("mle") as lab_:
        yield lab_


def http_get(ns: str, ip: str, port: int = 8080, path: str = "/", timeout: float = 5.0) -> dict:
    code, body = labmod.http_get_in_netns(ns, port, path, timeout, ip=ip)
    assert code == 200, (code, body)
    return json.loads(body)


def test_cross_node_request_is_mtls_on_the_underlay(lab, tmp_path):
    name, pods = lab
    c1, s2 = pods["client-1"], pods["server-2"]
    marker = f"meshlane-secret-{uuid.uuid4().hex}"
    with Capture(f"{name}-node1", "ul0", tmp_path / "ul.pcap") as cap:
        answer = http_get(c1["netns"], s2["ip"], path=f"/{marker}")
    assert answer["pod"] == "server-2" and answer["path"] == f"/{marker}"
    assert answer["peer"].split(":")[0] == c1["ip"], "server-2 must see client-1's pod IP"
    assert len(cap.data) > 1000, "the capture saw the tunnel"
    assert marker.encode() not in cap.data, "plaintext of the request crossed the underlay"
    assert b"GET /" not in cap.data
    # the tunnel itself went to the destination pod's 15008
    assert (15008).to_bytes(2, "big") in cap.data

    rec = wait_record(name, "node2", lambda r: r.get("direction") == "inbound" and
                      r.get("protocol") == "HBONE" and r.get("status") == 200)
    assert rec["src_identity"] == "spiffe://cluster.local/ns/demo/sa/client"
    assert rec["dst_identity"] == "spiffe://cluster.local/ns/demo/sa/server"
    out = wait_record(name, "node1", lambda r: r.get("direction") == "outbound" and
                      r.get("protocol") == "HBONE" and r.get("dst") == f"{s2['ip']}:8080")
    assert out["src_identity"] == "spiffe://cluster.local/ns/demo/sa/client"


def test_plaintext_into_the_mesh_goes_through_15006(lab):
    name, pods = lab
    legacy, s1 = pods["legacy-2"], pods["server-1"]
    answer = http_get(legacy["netns"], s1["ip"])
    assert answer["pod"] == "server-1"
    assert answer["peer"].split(":")[0] == legacy["ip"]
    rec = wait_record(name, "node1", lambda r: r.get("direction") == "inbound" and
                      r.get("protocol") == "TCP" and r.get("src", "").startswith(legacy["ip"] + ":"))
    assert rec["src_identity"] is None and rec["dst_workload"] == "demo/server-1"


def test_client_to_outside_the_mesh_is_passthrough(lab):
    name, pods = lab
    c1, legacy = pods["client-1"], pods["legacy-2"]
    with netns.entered(legacy["netns"]):
        srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 9090))
    srv.listen(4)
    srv.settimeout(5)
    got = {}

    def serve():
        conn, peer = srv.accept()
        got["peer"] = peer
        conn.sendall(conn.recv(100).upper())
        conn.close()
    th = threading.Thread(target=serve, daemon=True)
    th.start()
    with netns.entered(c1["netns"]):
        s = socket.socket()
    s.settimeout(5)
    s.connect((legacy["ip"], 9090))
    s.sendall(b"passthrough")
    assert s.recv(100) == b"PASSTHROUGH"
    assert s.getpeername() == (legacy["ip"], 9090), "getpeername shows the dialled address"
    s.close()
    th.join(5)
    srv.close()
    assert got["peer"][0] == c1["ip"]
    wait_record(name, "node1", lambda r: r.get("protocol") == "PASSTHROUGH" and
                r.get("dst") == f"{legacy['ip']}:9090")


# --- refusals at the HBONE listener ----------------------------------------------------

def test_hbone_refuses_foreign_root_wrong_san_and_bad_requests(lab):
    name, pods = lab
    legacy, s2 = pods["legacy-2"], pods["server-2"]
    good = _node_cert(name, "node2", "legacy", "legacy-2", "default")

    # a client certificate from another root: the handshake is refused
    other = CertificateAuthority.self_signed()
    key = certs.generate_key()
    spiffe = SpiffeId(namespace="legacy", service_account="default")
    leaf = other.sign_csr(certs.make_csr(key, spiffe), expected=spiffe, ttl=timedelta(hours=1))
    foreign = certs.WorkloadCert.from_pems(spiffe=spiffe, key_pem=certs.key_to_pem(key), cert_pem=leaf,
                                           chain_pem=other.chain_pem, root_pem=good.root_pem)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        s = _tls_to(legacy["netns"], s2["ip"], tls.client_context(foreign))
        s.sendall(b"\0" * 10)
        s.recv(10) or (_ for _ in ()).throw(ConnectionError("closed by server"))

    # the server is not who we expected: our side refuses it
    s = _tls_to(legacy["netns"], s2["ip"], tls.client_context(good))
    with pytest.raises(tls.TlsIdentityError):
        tls.verify_peer_identity(s, SpiffeId(namespace="demo", service_account="client"))
    assert tls.verify_peer_identity(s, SpiffeId(namespace="demo", service_account="server"))

    # a valid peer: bad method and bad authority get 400 on their stream; a good CONNECT
    # to a port with nothing behind it gets 503; a good one to 8080 gets 200
    assert _connect_status(s, f"{s2['ip']}:8080", method="GET") == 400
    s.close()
    for authority, want in (("server-2:8080", 400), (f"{s2['ip']}", 400),
                            (f"{s2['ip']}:1", 503), (f"{s2['ip']}:8080", 200)):
        s = _tls_to(legacy["netns"], s2["ip"], tls.client_context(good))
        assert _connect_status(s, authority) == want, authority
        s.close()


def test_connect_garbage_does_not_hurt_the_listener(lab):
    name, pods = lab
    legacy, s2 = pods["legacy-2"], pods["server-2"]
    with netns.entered(legacy["netns"]):
        raw = socket.socket()
    raw.settimeout(5)
    raw.connect((s2["ip"], C.PORT_HBONE))
    raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
    try:
        raw.recv(100)  # a TLS alert or a close, never a hang
    except (ConnectionError, TimeoutError, OSError):
        pass
    raw.close()
    assert http_get(pods["client-1"]["netns"], s2["ip"])["pod"] == "server-2"


def test_node_cannot_get_identity_of_another_nodes_pod(lab):
    name, pods = lab
    with pytest.raises(control_client.ControlError, match="scheduled on 'node1'"):
        _node_cert(name, "node2", "demo", "client-1", "client")


def test_ztunnel_down_fails_closed_and_restart_recovers(lab, tmp_path):
    name, pods = lab
    c1, s2 = pods["client-1"], pods["server-2"]
    paths = labmod.LabPaths(name)
    state = json.loads(paths.state.read_text())
    labmod.stop_pid(state["pids"]["ztunnel-node1"])
    marker = f"meshlane-down-{uuid.uuid4().hex}"
    with Capture(f"{name}-node1", "ul0", tmp_path / "down.pcap") as cap:
        with netns.entered(c1["netns"]):
            s = socket.socket()
        s.settimeout(3)
        with pytest.raises(ConnectionRefusedError):
            s.connect((s2["ip"], 8080))
        s.close()
        # even a socket that slips past connect4 cannot leave the pod unencrypted
        with netns.entered(c1["netns"]):
            raw = socket.socket()
        raw.settimeout(1.5)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x1)
    assert marker.encode() not in cap.data
    assert not any(b"GET" in chunk for chunk in [cap.data])
    # restart: no re-enrolment, traffic flows again
    before = loader.NodeDatapath(paths.pin_name("node1")).counters()
    state["pids"]["ztunnel-node1"] = labmod.start_ztunnel(paths, "node1")
    paths.state.write_text(json.dumps(state))
    labmod.wait_for("ztunnel restart", lambda: labmod.ztunnel_ready(paths, "node1"), 30)
    assert http_get(c1["netns"], s2["ip"])["peer"].split(":")[0] == c1["ip"]
    after = loader.NodeDatapath(paths.pin_name("node1")).counters()
    assert after["connect_redirected"] > before["connect_redirected"]
    assert (loader.pin_dir(paths.pin_name("node1")) / "pods" / "demo_client-1").exists()


def test_detach_makes_traffic_plain_and_leaves_no_state(lab, tmp_path):
    name, pods = lab
    c1, s2 = pods["client-1"], pods["server-2"]
    paths = labmod.LabPaths(name)
    sock = str(paths.control_socket)
    control_client.call(sock, "label", kind="Pod", namespace="demo", name="client-1",
                        set={C.LABEL_DATAPLANE_MODE: C.DATAPLANE_NONE}, remove=[], overwrite=True)
    try:
        labmod.wait_for("client-1 unenrolled", lambda: not control_client.call(
            sock, "get", kind="Pod", namespace="demo", name="client-1")["objects"][0]["status"]["enrolled"], 20)
        pod_pins = loader.pin_dir(paths.pin_name("node1")) / "pods" / "demo_client-1"
        assert not pod_pins.exists(), "no per-pod pins remain"
        # no listeners remain in the pod
        with netns.entered(c1["netns"]):
            probe = socket.socket()
        probe.settimeout(2)
        assert probe.connect_ex(("127.0.0.1", C.PORT_OUTBOUND)) != 0, "15001 must be gone"
        probe.close()
        rules = subprocess.run(["ip", "-n", c1["netns"], "rule"], capture_output=True, text=True).stdout
        assert "fwmark" not in rules
        marker = f"meshlane-plain-{uuid.uuid4().hex}"
        with Capture(f"{name}-node1", "ul0", tmp_path / "plain.pcap") as cap:
            # server-2 is still in the mesh: plaintext from client-1 arrives via its 15006
            answer = http_get(c1["netns"], s2["ip"], path=f"/{marker}")
        assert answer["peer"].split(":")[0] == c1["ip"]
        assert marker.encode() in cap.data, "after detach client-1 speaks plain TCP"
    finally:
        control_client.call(sock, "label", kind="Pod", namespace="demo", name="client-1",
                            set={}, remove=[C.LABEL_DATAPLANE_MODE], overwrite=True)
        labmod.wait_for("client-1 re-enrolled", lambda: control_client.call(
            sock, "get", kind="Pod", namespace="demo", name="client-1")["objects"][0]["status"]["enrolled"], 20)


def test_namespace_label_enrols_and_unenrols_without_restarting(lab):
    name, pods = lab
    legacy, s1 = pods["legacy-2"], pods["server-1"]
    paths = labmod.LabPaths(name)
    sock = str(paths.control_socket)
    resident = subprocess.Popen(["ip", "netns", "exec", legacy["netns"], "sleep", "120"])

    def enrolled() -> bool:
        return bool(control_client.call(sock, "get", kind="Pod", namespace="legacy",
                                        name="legacy-2")["objects"][0]["status"]["enrolled"])
    assert not enrolled()
    control_client.call(sock, "label", kind="Namespace", name="legacy",
                        set={C.LABEL_DATAPLANE_MODE: C.DATAPLANE_AMBIENT}, remove=[], overwrite=False)
    try:
        labmod.wait_for("legacy-2 enrolled by its namespace label", enrolled, 20)
        answer = http_get(legacy["netns"], s1["ip"])
        assert answer["peer"].split(":")[0] == legacy["ip"]
        wait_record(name, "node1", lambda r: r.get("direction") == "inbound" and r.get("protocol") == "HBONE"
                    and r.get("src_identity") == "spiffe://cluster.local/ns/legacy/sa/default")
    finally:
        control_client.call(sock, "label", kind="Namespace", name="legacy", set={},
                            remove=[C.LABEL_DATAPLANE_MODE], overwrite=False)
    labmod.wait_for("legacy-2 unenrolled", lambda: not enrolled(), 20)
    assert http_get(legacy["netns"], s1["ip"])["pod"] == "server-1"
    try:
        assert resident.poll() is None, "enrolment never restarts or stops a pod's processes"
    finally:
        resident.kill()
        resident.wait()
