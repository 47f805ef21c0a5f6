"""L4 policy as a user drives it: `meshlane apply/get/delete` against the default lab,
real connects, real captures, the kernel's counters.  One lab for the module, torn down
even when a test fails; each test deletes the policies it applied."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from meshcore import constants as C
from meshcore import netns
from meshlane import lab as labmod
from slowpath import control_client
from tests.root.meshtest import Capture, http_probe, node_counters, running_lab

pytestmark = pytest.mark.root

ALLOW_CLIENT_8080 = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: demo}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/demo/sa/client"]}}]
    to: [{operation: {ports: ["8080"]}}]
"""

DENY_9090 = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-9090, namespace: demo}
spec:
  action: DENY
  rules:
  - to: [{operation: {ports: ["9090"]}}]
"""

DENY_CLIENT = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: demo}
spec:
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/demo/sa/client"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-plaintext, namespace: demo}
spec:
  action: DENY
  rules:
  - from: [{source: {notPrincipals: ["*"]}}]
"""


@pytest.fixture(scope="module")
def lab():
    with running_lab("mlp") as lab_:
        yield lab_


def meshlane(lab: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshlane.cli", *args, "--lab", lab], input=stdin,
                          capture_output=True, text=True, timeout=60)


def apply(lab: str, tmp_path, text: str, name: str = "policy.yaml") -> subprocess.CompletedProcess:
    f = tmp_path / name
    f.write_text(text)
    before = store_rev(lab)
    res = meshlane(lab, "apply", "-f", str(f))
    assert res.returncode == 0, res.stderr
    labmod.wait_policies(lab, before + 1)
    return res


def delete(lab: str, tmp_path, text: str) -> None:
    f = tmp_path / "delete.yaml"
    f.write_text(text)
    before = store_rev(lab)
    res = meshlane(lab, "delete", "-f", str(f))
    assert res.returncode == 0, res.stderr
    labmod.wait_policies(lab, before + 1)


def store_rev(lab: str) -> int:
    """The store's revision now: the next change (ours) gets a higher one, and agents
    report the revision of the last event they processed."""
    return control_client.call(str(labmod.LabPaths(lab).control_socket), "get", kind="Node")["rev"]


def get(lab: str, ns: str, src: str, ip: str, port: int = 8080) -> str:
    """One HTTP GET from `src`: 'ok', 'refused' (connect failed) or 'closed'."""
    return http_probe(ns, ip, port)[0]


def test_allow_for_the_client_principal_on_8080(lab, tmp_path):
    name, pods = lab
    c1, s2, legacy = pods["client-1"], pods["server-2"], pods["legacy-2"]
    assert get(name, legacy["netns"], "legacy-2", s2["ip"]) == "ok"   # no policy yet
    res = apply(name, tmp_path, ALLOW_CLIENT_8080)
    assert "authorizationpolicy.security.istio.io/allow-client created" in res.stdout
    try:
        assert get(name, c1["netns"], "client-1", s2["ip"]) == "ok"
        before = node_counters(name, "node2")["policy_in_deny"]
        assert get(name, legacy["netns"], "legacy-2", s2["ip"]) == "refused"   # plaintext: RST at SYN
        assert node_counters(name, "node2")["policy_in_deny"] == before + 1
        listing = meshlane(name, "get", "authorizationpolicies", "-n", "demo")
        assert listing.returncode == 0 and "allow-client" in listing.stdout and "ALLOW" in listing.stdout
        as_yaml = meshlane(name, "get", "ap", "allow-client", "-n", "demo", "-o", "yaml")
        assert "principals:" in as_yaml.stdout and "cluster.local/ns/demo/sa/client" in as_yaml.stdout
        zc = json.loads(meshlane(name, "zc", "policies", "-o", "json").stdout)
        assert [p["name"] for p in zc["node2"]["policies"]] == ["allow-client"]
    finally:
        delete(name, tmp_path, ALLOW_CLIENT_8080)
    # deleting the policy restores access; nothing was restarted
    assert get(name, legacy["netns"], "legacy-2", s2["ip"]) == "ok"


def test_deny_on_a_port_fails_at_connect_without_a_packet(lab, tmp_path):
    name, pods = lab
    c1, s2 = pods["client-1"], pods["server-2"]
    apply(name, tmp_path, DENY_9090)
    try:
        before = node_counters(name, "node1")
        with Capture(name + "-client-1", "eth0", tmp_path / "pod.pcap") as pod_cap, \
                Capture(name + "-node1", "ul0", tmp_path / "ul.pcap") as ul_cap:
            with netns.entered(c1["netns"]):
                s = socket.socket()
            with pytest.raises(ConnectionRefusedError):
                s.connect((s2["ip"], 9090))
            s.close()
        after = node_counters(name, "node1")
        # refused in the kernel (how fast is for `make bench`, not for a test)
        assert after["policy_out_deny"] == before["policy_out_deny"] + 1
        assert after["connect_redirected"] == before["connect_redirected"]   # no ztunnel hop
        # tcpdump's pcap holds a 24-byte file header and nothing else: not one packet
        assert len(pod_cap.data) == 24, f"{len(pod_cap.data)} bytes captured on client-1's eth0"
        assert len(ul_cap.data) == 24, f"{len(ul_cap.data)} bytes captured on node1's ul0"
        shown = json.loads(meshlane(name, "bpf", "policy", "get", "client-1", "-o", "json").stdout)
        row = next(r for r in shown["connect"] if r["peer"] == s2["ip"] and r["port"] == 9090)
        assert row["verdict"] == "DENY" and row["ruleName"] == "demo/deny-9090 rule 0 (DENY)"
        assert row["ruleHits"] >= 1 and shown["counters"]["policy_out_deny"] >= 1
        assert get(name, c1["netns"], "client-1", s2["ip"], 8080) == "ok"   # other ports unaffected
    finally:
        delete(name, tmp_path, DENY_9090)
    with netns.entered(c1["netns"]):
        s = socket.socket()
    s.settimeout(5)
    with s:   # the deny is gone: the connect reaches the ztunnel (and server-2 has no 9090)
        s.connect((s2["ip"], 9090))


def _open_keepalive(ns: str, ip: str) -> socket.socket:
    with netns.entered(ns):
        s = socket.socket()
    s.settimeout(5)
    s.connect((ip, 8080))
    s.sendall(f"GET / HTTP/1.1\r\nHost: {ip}\r\n\r\n".encode())
    assert s.recv(65536).startswith(b"HTTP/1.1 200")
    return s


def _closed_within(s: socket.socket, seconds: float) -> bool:
    s.settimeout(seconds)
    try:
        return s.recv(65536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_deny_closes_live_connections(lab, tmp_path):
    name, pods = lab
    c1, s2, legacy = pods["client-1"], pods["server-2"], pods["legacy-2"]
    hbone = _open_keepalive(c1["netns"], s2["ip"])        # through both ztunnels
    plain = _open_keepalive(legacy["netns"], s2["ip"])    # plaintext via 15006
    try:
        assert not _closed_within(hbone, 0.2) and not _closed_within(plain, 0.2)
        apply(name, tmp_path, DENY_CLIENT)
        assert _closed_within(hbone, 5), "the HBONE connection survived a DENY for its principal"
        assert _closed_within(plain, 5), "the plaintext connection survived a DENY for plaintext"
        assert get(name, c1["netns"], "client-1", s2["ip"]) == "refused"
    finally:
        hbone.close()
        plain.close()
        delete(name, tmp_path, DENY_CLIENT)
    assert get(name, c1["netns"], "client-1", s2["ip"]) == "ok"


def test_a_pod_sending_as_another_pod_is_dropped_and_counted(lab):
    name, pods = lab
    c1, s1, s2 = pods["client-1"], pods["server-1"], pods["server-2"]
    # client-1 claims server-1's address (a marked socket, so neither connect4 nor the
    # pod's egress program stops it first: the host-side veth must)
    subprocess.run(["ip", "-n", c1["netns"], "addr", "add", f"{s1['ip']}/32", "dev", "eth0", "nodad"],
                   check=True)
    try:
        before = node_counters(name, "node1")["spoof_dropped"]
        with netns.entered(c1["netns"]):
            s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, C.MARK_ZTUNNEL)
        s.settimeout(1.5)
        with s:
            s.bind((s1["ip"], 0))
            with pytest.raises(OSError):
                s.connect((s2["ip"], 8080))
        assert node_counters(name, "node1")["spoof_dropped"] > before
    finally:
        subprocess.run(["ip", "-n", c1["netns"], "addr", "del", f"{s1['ip']}/32", "dev", "eth0"], check=True)


def test_bad_input_is_refused_and_changes_nothing(lab, tmp_path):
    name, _ = lab
    apply(name, tmp_path, ALLOW_CLIENT_8080)
    try:
        good_then_bad = DENY_9090 + "---\n" + DENY_9090.replace("deny-9090", "bad").replace(
            '"9090"', '"70000"')
        for text, where in ((good_then_bad, "docs[1].spec.rules[0].to[0].operation.ports[0]"),
                            (ALLOW_CLIENT_8080.replace("action: ALLOW", "action: REJECT"), "spec.action"),
                            (ALLOW_CLIENT_8080.replace("rules:", "rulez:"), "spec.rulez"),
                            ("kind: [", "not valid YAML at line 1")):
            f = tmp_path / "bad.yaml"
            f.write_text(text)
            res = meshlane(name, "apply", "-f", str(f))
            assert res.returncode == C.EX_DATAERR, (res.returncode, res.stderr)
            assert res.stderr.startswith(f"meshlane: {f}: "), res.stderr
            assert where in res.stderr, res.stderr
            assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        objs = control_client.call(str(labmod.LabPaths(name).control_socket), "get",
                                   kind="AuthorizationPolicy")["objects"]
        assert [o["metadata"]["name"] for o in objs] == ["allow-client"]
        assert objs[0]["spec"]["action"] == "ALLOW"
        # warnings are stderr, the policy is still applied
        l7 = ALLOW_CLIENT_8080.replace("allow-client", "allow-l7").replace(
            'ports: ["8080"]', 'ports: ["8080"], methods: ["GET"]')
        f = tmp_path / "l7.yaml"
        f.write_text(l7)
        res = meshlane(name, "apply", "-f", str(f))
        assert res.returncode == 0
        assert "Warning:" in res.stderr and "demo/allow-l7: rule 0 dropped" in res.stderr
        assert "spec.rules[0].to[0].operation.methods" in res.stderr
        meshlane(name, "delete", "-f", str(f))
    finally:
        delete(name, tmp_path, ALLOW_CLIENT_8080)
