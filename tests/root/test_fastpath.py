"""Same-node fast path, end to end: real BPF programs in this kernel, a lab of real network
namespaces, the node agent and ztunnel as processes.

A connection between two enrolled pods of one node that policy allows is left direct at
connect() and its two sockets are spliced by sk_msg: payload goes socket to socket and
never crosses the pod's veth.  Checked here: the splice (counters, zero payload bytes on
the wire, data intact), `zc connections`, its removal on a policy change (DENY closes,
a waypoint label unsplices and the connection carries on over TCP), detach with a live
spliced connection and unread spliced data (nothing lost), the opt-out annotation and the
node-wide switch.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from fastpath import fast
from fastpath import loader
from fastpath.loader import NodeDatapath
from meshcore import constants as C
from meshcore import netns
from meshlane import lab as labmod
from meshlane.demo import pcap_payloads
from slowpath import control_client
from tests.root.meshtest import Capture, node_counters, running_lab

pytestmark = [pytest.mark.root]

TOPOLOGY = """
nodes: [node1, node2]
namespaces:
  demo: {labels: {"istio.io/dataplane-mode": ambient}}
pods:
  - {name: client-1, node: node1, namespace: demo, serviceAccount: client, app: none}
  - {name: server-1, node: node1, namespace: demo, serviceAccount: server, app: http}
  - {name: splice-1, node: node1, namespace: demo, serviceAccount: server, app: http,
     annotations: {"meshlane.io/fastpath": "false"}}
  - {name: server-2, node: node2, namespace: demo, serviceAccount: server, app: http}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    topo = tmp_path_factory.mktemp("fast") / "topology.yaml"
    topo.write_text(TOPOLOGY)
    with running_lab("fp", str(topo)) as (name, pods):
        yield name, pods


class Sink:
    """A server inside a pod: accepts one connection, hashes what it reads until EOF
    (optionally pausing before it starts reading), answers with the digest."""

    def __init__(self, pod: dict, port: int, *, pause: threading.Event | None = None):
        with netns.entered(pod["netns"]):
            self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((pod["ip"], port))
        self.listener.listen(4)
        self.listener.settimeout(15)
        self.pause = pause
        self.digest = hashlib.sha256()
        self.count = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(30)
                if self.pause is not None:
                    self.pause.wait(30)
                while True:
                    data = conn.recv(1 << 16)
                    if not data:
                        break
                    self.digest.update(data)
                    self.count += len(data)
                conn.sendall(self.digest.hexdigest().encode())
        except BaseException as exc:  # reported by result()
            self.error = exc
        finally:
            self.listener.close()

    def result(self) -> tuple[int, str]:
        self.thread.join(30)
        assert self.error is None, f"sink failed: {self.error!r}"
        return self.count, self.digest.hexdigest()


def dial(pod: dict, ip: str, port: int) -> socket.socket:
    with netns.entered(pod["netns"]):
        s = socket.socket()
    s.settimeout(10)
    s.connect((ip, port))
    return s


def finish(s: socket.socket) -> str:
    s.shutdown(socket.SHUT_WR)
    answer = b""
    while len(answer) < 64:
        data = s.recv(64)
        if not data:
            break
        answer += data
    s.close()
    return answer.decode()


def flows(lab: str, node: str = "node1") -> list[fast.Flow]:
    return fast.read_pinned(NodeDatapath(labmod.LabPaths(lab).pin_name(node)).maps_dir)


def cli(lab: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshlane.cli", *args, "--lab", lab],
                          capture_output=True, text=True, timeout=60)


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def test_same_node_connection_is_spliced(lab, tmp_path):
    name, pods = lab
    c1, s1 = pods["client-1"], pods["server-1"]
    payload = os.urandom(8 << 20)
    sink = Sink(s1, 9100)
    before = node_counters(name, "node1")
    with Capture(c1["netns"], "eth0", tmp_path / "veth.pcap") as cap:
        s = dial(c1, s1["ip"], 9100)
        assert s.getpeername() == (s1["ip"], 9100)   # direct: no 15001 in sight
        for i in range(0, len(payload), 1 << 16):
            s.sendall(payload[i:i + (1 << 16)])
        zc = cli(name, "zc", "connections", "--node", "node1", "-o", "json")
        answer = finish(s)
    assert answer == hashlib.sha256(payload).hexdigest()
    assert sink.result()[0] == len(payload)
    d = delta(node_counters(name, "node1"), before)
    assert d["connect_fast"] == 1 and d["connect_redirected"] == 0, d
    assert d["fast_syn_passed"] == 1 and d["fast_spliced"] == 2, d
    assert d["fast_tcp_fallback"] == 0, d
    assert d["fast_bytes_redirected"] >= len(payload) + 64, d
    # on client-1's eth0: the handshake and the FIN, not one payload byte
    segs = [(sp, dp, p) for sp, dp, p in pcap_payloads(cap.path) if 9100 in (sp, dp)]
    assert segs, "the capture saw nothing of the connection (is it live?)"
    assert sum(len(p) for _, _, p in segs) == 0, f"{sum(len(p) for _, _, p in segs)} payload bytes on the veth"
    # the open connection as `zc connections` listed it
    assert zc.returncode == 0, zc.stderr
    rows = [r for r in json.loads(zc.stdout) if r["protocol"] == "FAST" and r["dst"] == f"{s1['ip']}:9100"]
    assert len(rows) == 1 and rows[0]["state"] == "spliced", zc.stdout
    assert rows[0]["src_identity"] == "spiffe://cluster.local/ns/demo/sa/client"
    assert rows[0]["flow"]["rule"] == C.RULE_NO_POLICY
    # the flow is forgotten once both ends closed
    deadline = time.monotonic() + 5
    while any(f.server == (s1["ip"], 9100) for f in flows(name)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(f.server == (s1["ip"], 9100) for f in flows(name))


def _apply(name: str, obj: dict) -> None:
    sock = str(labmod.LabPaths(name).control_socket)
    rev = control_client.call(sock, "apply", objects=[obj], src="test")["rev"]
    labmod.wait_policies(name, rev, 15)


def _delete(name: str, obj: dict) -> None:
    sock = str(labmod.LabPaths(name).control_socket)
    rev = control_client.call(sock, "delete_objects", objects=[obj])["rev"]
    labmod.wait_policies(name, rev, 15)


def test_policy_change_closes_a_denied_spliced_connection(lab):
    name, pods = lab
    c1, s1 = pods["client-1"], pods["server-1"]
    Sink(s1, 9101)
    s = dial(c1, s1["ip"], 9101)
    s.sendall(b"x" * 1000)
    time.sleep(0.2)
    flow = [f for f in flows(name) if f.server == (s1["ip"], 9101)]
    assert flow and flow[0].spliced, flow
    deny = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "fp-deny-9101", "namespace": "demo"},
            "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9101"]}}]}]}}
    before = node_counters(name, "node1")
    _apply(name, deny)
    try:
        # the node agent aborted both ends: the client sees the connection end
        s.settimeout(5)
        with pytest.raises(OSError):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                s.sendall(b"y" * 1000)
                if s.recv(64) == b"":
                    raise ConnectionResetError("EOF")
                time.sleep(0.05)
        assert not any(f.server == (s1["ip"], 9101) for f in flows(name))
        # and a new connect is refused in the kernel, before any packet
        with netns.entered(c1["netns"]):
            t = socket.socket()
        with t, pytest.raises(ConnectionRefusedError):
            t.connect((s1["ip"], 9101))
        assert delta(node_counters(name, "node1"), before)["policy_out_deny"] == 1
    finally:
        s.close()
        _delete(name, deny)


def test_waypoint_label_unsplices_and_the_connection_carries_on(lab, tmp_path):
    name, pods = lab
    c1, s1 = pods["client-1"], pods["server-1"]
    sock = str(labmod.LabPaths(name).control_socket)
    sink = Sink(s1, 9102)
    first, second = os.urandom(1 << 20), os.urandom(1 << 20)
    s = dial(c1, s1["ip"], 9102)
    s.sendall(first)
    time.sleep(0.2)
    assert [f for f in flows(name) if f.server == (s1["ip"], 9102)][0].spliced
    rev = control_client.call(sock, "label", kind="Namespace", name="demo",
                              set={C.LABEL_USE_WAYPOINT: "waypoint"}, remove=[], overwrite=True)["rev"]
    try:
        labmod.wait_policies(name, rev, 15, ztunnels=False)
        assert not any(f.server == (s1["ip"], 9102) for f in flows(name)), "still spliced"
        before = node_counters(name, "node1")
        with Capture(c1["netns"], "eth0", tmp_path / "tcp.pcap") as cap:
            s.sendall(second)
            answer = finish(s)
        assert answer == hashlib.sha256(first + second).hexdigest()
        assert sink.result()[0] == 2 << 20
        # the rest went over TCP, through the veth
        assert delta(node_counters(name, "node1"), before)["fast_bytes_redirected"] == 0
        on_wire = sum(len(p) for sp, dp, p in pcap_payloads(cap.path) if 9102 in (sp, dp))
        assert on_wire > 0, "no payload on the veth after the splice ended"   # tcpdump may drop some
        # new connections to a pod behind a waypoint go through the ztunnel
        before = node_counters(name, "node1")
        code, _ = labmod.http_get_in_netns(c1["netns"], 8080, "/", ip=s1["ip"])
        assert code == 200
        d = delta(node_counters(name, "node1"), before)
        assert d["connect_redirected"] == 1 and d["connect_fast"] == 0, d
    finally:
        rev = control_client.call(sock, "label", kind="Namespace", name="demo", set={},
                                  remove=[C.LABEL_USE_WAYPOINT], overwrite=True)["rev"]
        labmod.wait_policies(name, rev, 15, ztunnels=False)


def test_detach_with_unread_spliced_data_loses_nothing(lab, tmp_path):
    """server-1 is detached while a spliced connection has data queued for its app that
    the app has not read yet: every byte still arrives, in order, and the connection
    goes on over TCP."""
    name, pods = lab
    c1, s1 = pods["client-1"], pods["server-1"]
    pause = threading.Event()
    sink = Sink(s1, 9103, pause=pause)
    first, second = os.urandom(256 << 10), os.urandom(4 << 20)
    s = dial(c1, s1["ip"], 9103)
    s.sendall(first)   # spliced onto the server socket's queue; the app is not reading
    time.sleep(0.2)
    flow = [f for f in flows(name) if f.server == (s1["ip"], 9103)]
    assert flow and flow[0].spliced and flow[0].bytes[0] == len(first), flow
    res = cli(name, "detach", "server-1")
    try:
        assert res.returncode == 0, res.stderr
        assert not any(f.server == (s1["ip"], 9103) for f in flows(name))
        before = node_counters(name, "node1")
        with Capture(c1["netns"], "eth0", tmp_path / "after.pcap") as cap:
            sender = threading.Thread(target=s.sendall, args=(second,), daemon=True)
            sender.start()
            pause.set()    # the app starts reading: queued spliced bytes first, then TCP
            sender.join(30)
            answer = finish(s)
        assert answer == hashlib.sha256(first + second).hexdigest(), "data lost or reordered"
        assert sink.result()[0] == len(first) + len(second)
        assert delta(node_counters(name, "node1"), before)["fast_bytes_redirected"] == 0
        on_wire = sum(len(p) for sp, dp, p in pcap_payloads(cap.path) if 9103 in (sp, dp))
        assert on_wire > 0, "no payload on the veth after the splice ended"   # tcpdump may drop some
    finally:
        pause.set()
        res = cli(name, "attach", "server-1")
        assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("dst", ["splice-1", "server-2"], ids=["opted-out pod", "cross node"])
def test_through_the_ztunnel_when_not_eligible(lab, dst):
    """splice-1 is annotated meshlane.io/fastpath: "false"; server-2 is on another node."""
    name, pods = lab
    c1, d = pods["client-1"], pods[dst]
    before = node_counters(name, "node1")
    code, body = labmod.http_get_in_netns(c1["netns"], 8080, "/", ip=d["ip"])
    assert code == 200 and json.loads(body)["pod"] == dst
    moved = delta(node_counters(name, "node1"), before)
    assert moved["connect_fast"] == 0 and moved["connect_redirected"] == 1, moved
    assert moved["fast_spliced"] == 0, moved


def test_node_switch_turns_the_fast_path_off(tmp_path):
    topo = tmp_path / "topology.yaml"
    topo.write_text("""
nodes: [{name: node1, fastpath: false}]
namespaces: {demo: {labels: {"istio.io/dataplane-mode": ambient}}}
pods:
  - {name: client-1, node: node1, namespace: demo, serviceAccount: client, app: none}
  - {name: server-1, node: node1, namespace: demo, serviceAccount: server, app: http}
""")
    with running_lab("fpoff", str(topo)) as (name, pods):
        before = node_counters(name, "node1")
        code, _ = labmod.http_get_in_netns(pods["client-1"]["netns"], 8080, "/", ip=pods["server-1"]["ip"])
        assert code == 200
        d = delta(node_counters(name, "node1"), before)
        assert d["connect_fast"] == 0 and d["connect_redirected"] == 1, d
        node = control_client.call(str(labmod.LabPaths(name).control_socket), "get", kind="Node",
                                   name="node1")["objects"][0]
        assert node["status"]["fastpath"] is False


def test_unload_with_a_live_spliced_connection_loses_nothing(tmp_path):
    """The node agent stops and its pins are removed (uninstall) while a spliced
    connection has unread data queued: the flows are unspliced first, every byte
    arrives, and the connection carries on over TCP."""
    topo = tmp_path / "topology.yaml"
    topo.write_text("""
nodes: [node1]
namespaces: {demo: {labels: {"istio.io/dataplane-mode": ambient}}}
pods:
  - {name: client-1, node: node1, namespace: demo, serviceAccount: client, app: none}
  - {name: server-1, node: node1, namespace: demo, serviceAccount: server, app: none}
""")
    with running_lab("fpunl", str(topo)) as (name, pods):
        c1, s1 = pods["client-1"], pods["server-1"]
        pause = threading.Event()
        sink = Sink(s1, 9104, pause=pause)
        first, second = os.urandom(256 << 10), os.urandom(2 << 20)
        s = dial(c1, s1["ip"], 9104)
        try:
            s.sendall(first)
            time.sleep(0.2)
            assert [f for f in flows(name) if f.server == (s1["ip"], 9104)][0].spliced
            state = labmod.load_state(name)
            labmod.stop_pid(state["pids"]["node-node1"])
            pin = labmod.LabPaths(name).pin_name("node1")
            removed = loader.unpin_node(pin)
            assert removed and not loader.pin_dir(pin).exists()
            with Capture(c1["netns"], "eth0", tmp_path / "after.pcap") as cap:
                sender = threading.Thread(target=s.sendall, args=(second,), daemon=True)
                sender.start()
                pause.set()
                sender.join(30)
                answer = finish(s)
            assert answer == hashlib.sha256(first + second).hexdigest(), "data lost or reordered"
            assert sink.result()[0] == len(first) + len(second)
            # no longer spliced: the rest crossed the veth as TCP
            assert sum(len(p) for sp, dp, p in pcap_payloads(cap.path) if 9104 in (sp, dp)) > 0
        finally:
            pause.set()
            s.close()
