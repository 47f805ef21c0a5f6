"""The `meshlane` command line as a user runs it: subprocesses, exit codes, stderr.

Every error must be one line `meshlane: ...` on stderr with a sysexits-style code
(64 usage, 65 bad input, 66 not found, 69 agent unavailable), never a traceback, and a
failed command must leave nothing half-configured.  One small lab (one node, an
enrolled and a legacy pod) serves the module; the last test tears it down through the
CLI and checks that nothing of it is left.  Labs of other names are never touched.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.root.meshtest import fails, ml, ok

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
RUN_ROOT = Path("/run/meshlane")
PIN_ROOT = Path("/sys/fs/bpf/meshlane")

EX_USAGE, EX_DATAERR, EX_NOINPUT = 64, 65, 66

SMALL = """\
nodes: [node1]
namespaces:
  demo: {labels: {"istio.io/dataplane-mode": ambient}}
  legacy: {labels: {}}
pods:
  - {name: client-1, node: node1, namespace: demo, serviceAccount: client, app: none}
  - {name: legacy-1, node: node1, namespace: legacy, serviceAccount: default, app: none}
"""

TAG = os.getpid() % 10000
ABSENT = f"mln{TAG}"   # a lab name that is never brought up




def netns_with_prefix(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.strip() and ln.startswith(prefix)]


def leftovers(lab: str) -> list[str]:
    """Anything `lab` could have left behind: namespaces, pins, run state."""
    left = netns_with_prefix(f"{lab}-")
    left += [str(p) for p in PIN_ROOT.glob(f"{lab}-*")] if PIN_ROOT.exists() else []
    if (RUN_ROOT / lab).exists():
        left.append(str(RUN_ROOT / lab))
    return left


def running(pid: int, lab: str) -> bool:
    """PID is alive (not a zombie) and still one of the lab's processes (not a reused PID)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z" and lab in cmdline


def status(lab: str) -> dict:
    return json.loads(ok(ml("lab", "status", "-o", "json", lab=lab)).stdout)


def pod_status(lab: str, pod: str) -> dict:
    return next(p for p in status(lab)["pods"] if p["name"] == pod)


def workloads(lab: str) -> list[dict]:
    return json.loads(ok(ml("zc", "workloads", "-o", "json", lab=lab)).stdout)


def eventually(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


class RawNetns:
    """A netns of our own (not a lab pod), removed on exit even when the test fails."""

    def __init__(self, name: str, ifname: str, ip: str):
        self.name, self.ifname, self.ip = name, ifname, ip

    def __enter__(self):
        def ip(*args):
            subprocess.run(["ip", *args], check=True, capture_output=True)
        ip("netns", "add", self.name)
        try:
            ip("-n", self.name, "link", "set", "lo", "up")
            # this kernel has no `dummy` link type: a veth pair kept inside the netns
            # stands in for it (nothing leaves the namespace)
            ip("-n", self.name, "link", "add", self.ifname, "type", "veth", "peer", "name", "p0")
            ip("-n", self.name, "addr", "add", f"{self.ip}/24", "dev", self.ifname)
            ip("-n", self.name, "link", "set", self.ifname, "up")
            ip("-n", self.name, "link", "set", "p0", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


@pytest.fixture(scope="module")
def topo_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("topo") / "small.yaml"
    p.write_text(SMALL)
    return p


@pytest.fixture(scope="module")
def lab(topo_file):
    name = f"mlc{TAG}"
    assert not leftovers(name), f"lab {name} exists already: {leftovers(name)}"
    try:
        ok(ml("lab", "up", "--topology", str(topo_file), lab=name, timeout=150))
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", f"{name}-raw"], capture_output=True)
        ml("lab", "down", lab=name)  # 66 when test_lab_down got there first
        assert not leftovers(name)


@pytest.fixture
def absent():
    assert not leftovers(ABSENT)
    yield ABSENT
    assert not leftovers(ABSENT), "a failed command left state behind"


# --- 1. life cycle ----------------------------------------------------------------------

def test_status_has_the_documented_fields(lab):
    st = status(lab)
    assert st["name"] == lab and st["controlPlane"] is True
    [node] = st["nodes"]
    assert {k: node[k] for k in ("name", "netns", "underlay", "podCIDR")} == {
        "name": "node1", "netns": f"{lab}-node1", "underlay": "ul0", "podCIDR": "10.244.1.0/24"}
    pods = {p["name"]: p for p in st["pods"]}
    assert set(pods) == {"client-1", "legacy-1"}
    for p in pods.values():
        assert {"name", "node", "namespace", "serviceAccount", "ip", "enrolled"} <= set(p)
        assert p["node"] == "node1" and p["ip"].startswith("10.244.1.")
    assert (pods["client-1"]["namespace"], pods["client-1"]["serviceAccount"]) == ("demo", "client")
    assert pods["client-1"]["enrolled"] is True
    assert pods["legacy-1"]["enrolled"] is False
    assert all(p["running"] for p in st["processes"].values()), st["processes"]
    as_yaml = yaml.safe_load(ok(ml("lab", "status", "-o", "yaml", lab=lab)).stdout)
    assert as_yaml["nodes"] == st["nodes"]
    short = ok(ml("lab", "status", lab=lab)).stdout.splitlines()
    assert short[0].split() == ["POD", "NODE", "NAMESPACE", "SERVICEACCOUNT", "IP", "ENROLLED"]


def test_second_up_is_refused_and_the_lab_keeps_running(lab, topo_file):
    before = status(lab)
    line = fails(ml("lab", "up", "--topology", str(topo_file), lab=lab), EX_USAGE,
                 repr(lab), "lab down")
    assert "already up" in line
    after = status(lab)
    assert after["controlPlane"] is True
    assert after["processes"] == before["processes"]
    assert all(p["running"] for p in after["processes"].values())
    assert [p["enrolled"] for p in after["pods"]] == [p["enrolled"] for p in before["pods"]]


# --- 2. bad input -------------------------------------------------------------------------

def test_attach_unknown_pod_is_not_found(lab):
    fails(ml("attach", "no-such-pod", lab=lab), EX_NOINPUT, "no-such-pod", "client-1")


def test_detach_of_a_pod_not_attached_is_a_usage_error(lab):
    # 64: the pod exists and the input is well formed; the command does not apply to it
    fails(ml("detach", "legacy-1", lab=lab), EX_USAGE, "legacy/legacy-1", "not attached")
    assert pod_status(lab, "legacy-1")["enrolled"] is False


@pytest.mark.parametrize("labels", [("bad",), ("=x",), ("ok=1", "alsobad")])
def test_label_with_a_bad_argument_is_a_usage_error(lab, labels):
    fails(ml("label", "namespace", "demo", *labels, lab=lab), EX_USAGE, "label")


def test_label_of_an_unknown_namespace_is_not_found_and_creates_nothing(lab):
    fails(ml("label", "namespace", "nosuchns", "a=b", lab=lab), EX_NOINPUT, "nosuchns")
    got = ml("label", "namespace", "nosuchns", "a=b", lab=lab)  # still absent the second time
    assert got.returncode == EX_NOINPUT


def test_label_usage_errors_come_before_lab_lookup(absent):
    fails(ml("label", "namespace", "demo", "bad", lab=absent), EX_USAGE, "'bad'")
    fails(ml("label", "deployment", "x", "a=b", lab=absent), EX_USAGE)


BAD_TOPOLOGIES = {
    "invalid-yaml": ("nodes: [node1\npods: []\n", ["not valid YAML", "line"]),
    "unknown-key": ("nodes: [node1]\ncolour: blue\n", ["colour", "unknown key"]),
    "unknown-pod-key": ("nodes: [node1]\npods:\n  - {name: a, node: node1, colour: blue}\n",
                        ["pods[0].colour", "unknown key"]),
    "pod-on-unlisted-node": ("nodes: [node1]\npods:\n  - {name: a, node: node9}\n",
                             ["pods[0].node", "node9"]),
    "duplicate-pod": ("nodes: [node1]\npods:\n  - {name: a, node: node1}\n  - {name: a, node: node1}\n",
                      ["pods[1].name", "duplicate pod 'a'"]),
    "bad-node-name": ("nodes: [Node_1]\n", ["nodes[0]", "Node_1"]),
    "bad-pod-name": ("nodes: [node1]\npods:\n  - {name: Client.1, node: node1}\n",
                     ["pods[0].name", "Client.1"]),
}


@pytest.mark.parametrize("case", sorted(BAD_TOPOLOGIES))
def test_malformed_topology_is_refused_before_anything_is_built(absent, tmp_path, case):
    text, needles = BAD_TOPOLOGIES[case]
    f = tmp_path / f"{case}.yaml"
    f.write_text(text)
    fails(ml("lab", "up", "--topology", str(f), lab=absent), EX_DATAERR, str(f), *needles)
    assert not leftovers(absent)


def test_missing_topology_file_is_not_found(absent, tmp_path):
    fails(ml("lab", "up", "--topology", str(tmp_path / "nope.yaml"), lab=absent), EX_NOINPUT,
          "nope.yaml")


@pytest.mark.parametrize("name", ["Bad Name", "a/b", "..", "ml-x"])
def test_invalid_lab_name_is_refused(absent, topo_file, name):
    # every command checks the name first: `/`, `..` or a prefix of another lab's
    # namespaces never reach the file system (only harmless commands are run here)
    fails(ml("lab", "status", lab=name), EX_USAGE, "lab name")
    fails(ml("zc", "workloads", lab=name), EX_USAGE, "lab name")
    if name not in ("..",):
        fails(ml("lab", "up", "--topology", str(topo_file), lab=name), EX_USAGE, "lab name")
    assert not (RUN_ROOT / "a").exists() and not netns_with_prefix(f"{name}-")


@pytest.mark.parametrize("args", [("lab", "status"), ("lab", "status", "-o", "json"),
                                  ("zc", "workloads"), ("zc", "workloads", "-o", "json"),
                                  ("attach", "client-1"), ("lab", "exec", "client-1", "--", "true")])
def test_commands_on_a_lab_that_is_not_up(absent, args):
    fails(ml(*args, lab=absent), EX_NOINPUT, repr(absent), "not up", "lab up")


def test_unknown_node_is_a_usage_error(lab):
    fails(ml("zc", "workloads", "--node", "node9", lab=lab), EX_USAGE, "node9")
    fails(ml("bpf", "counters", "--node", "node9", lab=lab), EX_USAGE, "node9")


# --- 3. attach / detach ---------------------------------------------------------------------

def test_attach_and_detach_a_lab_pod_are_idempotent(lab):
    pin = PIN_ROOT / f"{lab}-node1" / "pods" / "demo_client-1"
    try:
        ok(ml("detach", "client-1", lab=lab))
        assert pod_status(lab, "client-1")["enrolled"] is False
        assert not pin.exists()
        fails(ml("detach", "client-1", lab=lab), EX_USAGE, "demo/client-1", "not attached")

        ok(ml("attach", "client-1", lab=lab))
        assert pod_status(lab, "client-1")["enrolled"] is True
        assert pin.is_dir()
        again = ok(ml("attach", "client-1", lab=lab))
        assert "already attached" in again.stderr
        assert pod_status(lab, "client-1")["enrolled"] is True
    finally:
        if not pod_status(lab, "client-1")["enrolled"]:
            ml("attach", "client-1", lab=lab)


def test_attach_and_detach_a_netns_of_our_own(lab):
    raw = f"{lab}-raw"
    pins = PIN_ROOT / f"{lab}-node1" / "pods"
    with RawNetns(raw, "eth0", "10.244.1.200"):
        ok(ml("attach", raw, "--node", "node1", "-n", "demo", "--service-account", "raw", lab=lab))

        def listed():
            return next((w for w in workloads(lab) if w["name"] == raw), None)
        w = eventually(listed)
        assert w is not None, workloads(lab)
        assert (w["namespace"], w["ip"], w["node"], w["protocol"]) == ("demo", "10.244.1.200", "node1", "HBONE")
        assert w["identity"] == "spiffe://cluster.local/ns/demo/sa/raw"
        assert (pins / f"demo_{raw}").is_dir()
        again = ok(ml("attach", raw, "--node", "node1", "-n", "demo", lab=lab))
        assert "already attached" in again.stderr

        ok(ml("detach", raw, lab=lab))  # no -n: found in the namespace it was attached in
        assert not (pins / f"demo_{raw}").exists()
        assert eventually(lambda: listed() is None)
        fails(ml("detach", raw, lab=lab), EX_USAGE, raw, "not attached")
    assert raw not in netns_with_prefix(raw)


def test_attach_of_a_netns_without_eth0_is_refused_and_leaves_nothing(lab):
    # the node agent puts the pod's egress program on eth0: a netns without one could
    # never be enrolled, so the CLI says so at once instead of timing out
    raw = f"{lab}-raw"
    with RawNetns(raw, "d0", "10.244.1.201"):
        fails(ml("attach", raw, "--node", "node1", "-n", "demo", lab=lab), EX_DATAERR, raw, "eth0")
        assert all(w["name"] != raw for w in workloads(lab))
        assert not (PIN_ROOT / f"{lab}-node1" / "pods" / f"demo_{raw}").exists()


def test_attach_of_something_that_is_not_a_netns(lab, tmp_path):
    f = tmp_path / "not-a-netns"
    f.write_text("")
    fails(ml("attach", str(f), "--node", "node1", lab=lab), EX_DATAERR, str(f), "not a network namespace")
    fails(ml("attach", "/proc/999999999/ns/net", lab=lab), EX_NOINPUT, "/proc/999999999/ns/net")
    fails(ml("attach", "client-1", "--node", "node9", "-n", "legacy", lab=lab), EX_NOINPUT, "client-1")


# --- 1. life cycle, the end: down removes everything, twice is an error ----------------------
# (last in the module: it takes the module's lab down)

def test_lab_down_removes_everything_and_a_second_down_fails(lab):
    state = json.loads((RUN_ROOT / lab / "lab.json").read_text())
    pids = list(state["pids"].values()) + list(state["apps"].values())
    assert pids and all(running(pid, lab) for pid in pids)
    assert netns_with_prefix(f"{lab}-") and list(PIN_ROOT.glob(f"{lab}-*"))

    ok(ml("lab", "down", lab=lab))
    assert netns_with_prefix(f"{lab}-") == []
    assert not PIN_ROOT.exists() or list(PIN_ROOT.glob(f"{lab}-*")) == []
    assert [pid for pid in pids if running(pid, lab)] == []
    assert not (RUN_ROOT / lab).exists()

    fails(ml("lab", "down", lab=lab), EX_NOINPUT, repr(lab), "not up")
    fails(ml("lab", "status", lab=lab), EX_NOINPUT, repr(lab), "not up")
