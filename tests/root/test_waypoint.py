"""Waypoints end to end: a real lab (BPF, netns, ztunnels), a real Envoy waypoint pod.

One lab serves the module.  demo has two versions of `echo` (v1 on node1, v2 on node2),
`other` and a client on each node, and Services over them.  The tests run in file order:
Services without a waypoint, then `meshlane waypoint apply --enroll-namespace`, routes,
filters, authorization, a live route update, bad input, bypass refusal, label removal
and deleting the waypoint.  Everything goes through the CLI as a user types it.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from meshlane import lab as labmod
from meshlane import labnet
from tests.envoy_util import requires_envoy
from tests.root.meshtest import (fails, http_call, ml, ok, running_lab, settle, wait_record,
                                 while_requests_flow)

pytestmark = [pytest.mark.root, requires_envoy()]

TOPOLOGY = """
nodes: [node1, node2]
namespaces:
  demo: {labels: {"istio.io/dataplane-mode": ambient}}
pods:
  - {name: client-1, node: node1, namespace: demo, serviceAccount: client, app: none}
  - {name: client-2, node: node2, namespace: demo, serviceAccount: client, app: none}
  - {name: echo-v1, node: node1, namespace: demo, serviceAccount: echo, app: http,
     labels: {app: echo, version: v1}}
  - {name: echo-v2, node: node2, namespace: demo, serviceAccount: echo, app: http,
     labels: {app: echo, version: v2}}
  - {name: other-1, node: node2, namespace: demo, serviceAccount: other, app: http,
     labels: {app: other}}
services:
  - {name: echo, namespace: demo, ports: [{name: http, port: 80, targetPort: 8080}], selector: {app: echo}}
  - {name: echo-v1, namespace: demo, ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: echo, version: v1}}
  - {name: echo-v2, namespace: demo, ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: echo, version: v2}}
  - {name: other, namespace: demo, ports: [{name: http, port: 80, targetPort: 8080}], selector: {app: other}}
"""

WAYPOINT_ID = "spiffe://cluster.local/ns/demo/sa/waypoint"
CLIENT_ID = "spiffe://cluster.local/ns/demo/sa/client"
EX_DATAERR = 65


@pytest.fixture(scope="module")
def wlab(tmp_path_factory):
    topo = tmp_path_factory.mktemp("wp") / "topology.yaml"
    topo.write_text(TOPOLOGY)
    with running_lab("wpt", str(topo)) as (name, pods):
        yield Lab(name, pods, tmp_path_factory.mktemp("wpfiles"))


class Lab:
    def __init__(self, name: str, pods: dict, files: Path):
        self.name, self.pods, self.files = name, pods, files
        self.vips: dict[str, str] = {}

    def cli(self, *args: str, timeout: float = 90):
        return ml(*args, lab=self.name, timeout=timeout)

    def vip(self, svc: str) -> str:
        if svc not in self.vips:   # VIPs are immutable: ask the CLI once
            out = ok(self.cli("get", "services", svc, "-n", "demo", "-o", "json")).stdout
            self.vips[svc] = json.loads(out)["spec"]["clusterIP"]
        return self.vips[svc]

    def apply(self, text: str, name: str = "obj.yaml"):
        f = self.files / name
        f.write_text(text)
        return self.cli("apply", "-f", str(f))

    def get(self, path: str = "/", *, pod: str = "client-1", svc: str = "echo", method: str = "GET",
            headers: dict | None = None) -> tuple[int, dict, bytes]:
        return http_call(self.pods[pod]["netns"], self.vip(svc), 80, method, path, headers=headers)

    def gateway(self) -> dict:
        return json.loads(ok(self.cli("get", "gateways", "waypoint", "-n", "demo", "-o", "json")).stdout)


def answered_by(resp: tuple[int, dict, bytes]) -> str:
    status, headers, body = resp
    assert status == 200, (status, body[:300])
    return json.loads(body)["pod"]


def route(name: str, parent: str, rules: list, annotations: dict | None = None) -> str:
    meta = {"name": name, "namespace": "demo"}
    if annotations:
        meta["annotations"] = annotations
    return yaml.safe_dump({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                           "metadata": meta,
                           "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent,
                                                    "port": 80}],
                                    "rules": rules}})


def weighted(v1: int, v2: int) -> list:
    return [{"backendRefs": [{"name": "echo-v1", "port": 80, "weight": v1},
                             {"name": "echo-v2", "port": 80, "weight": v2}]}]


# --- without a waypoint ------------------------------------------------------------------------


def test_service_vip_is_load_balanced_by_the_ztunnel(wlab):
    seen = collections.Counter(answered_by(wlab.get("/")) for _ in range(40))
    assert set(seen) == {"echo-v1", "echo-v2"}, seen
    rec = wait_record(wlab.name, "node1", lambda r: r.get("service") == "demo/echo"
                      and r.get("direction") == "outbound")
    assert "waypoint" not in rec
    # a port the Service does not have is refused by the ztunnel (the app sees a reset)
    with pytest.raises(OSError):
        http_call(wlab.pods["client-1"]["netns"], wlab.vip("echo"), 81)


# --- with a waypoint -----------------------------------------------------------------------------


def test_waypoint_apply_runs_envoy_in_its_own_pod(wlab):
    res = ok(wlab.cli("waypoint", "apply", "-n", "demo", "--enroll-namespace"))
    assert "programmed" in res.stderr
    gw = wlab.gateway()
    info = gw["status"]["meshlane"]
    assert info["identity"] == WAYPOINT_ID
    assert os.path.exists(f"/run/netns/{info['netns']}")
    assert Path(f"/proc/{info['envoyPid']}/exe").resolve().name == "envoy"
    listed = ok(wlab.cli("waypoint", "list", "-n", "demo")).stdout
    assert "waypoint" in listed and info["ip"] in listed
    # traffic to the namespace's Services now goes through it
    assert answered_by(wlab.get("/")) in ("echo-v1", "echo-v2")
    rec = wait_record(wlab.name, "node1", lambda r: r.get("waypoint") == "demo/waypoint")
    assert rec["dst_identity"] == WAYPOINT_ID


def test_weighted_split_90_10(wlab):
    ok(wlab.apply(route("echo", "echo", weighted(90, 10))))
    _settle(wlab, lambda: _share_v1(wlab, 40) >= 0.7)
    seen = collections.Counter(answered_by(wlab.get("/")) for _ in range(400))
    share = seen["echo-v1"] / 400
    assert 0.85 <= share <= 0.95, seen


def test_destination_ztunnel_sees_the_waypoint_identity(wlab):
    # echo-v2 runs on node2: its ztunnel logs the inbound tunnel's peer
    wlab.get("/")  # at least one more request
    for _ in range(20):
        if answered_by(wlab.get("/")) == "echo-v2":
            break
    # the newest inbound tunnel into echo-v2 came from the waypoint, with its identity
    rec = wait_record(wlab.name, "node2", lambda r: r.get("direction") == "inbound"
                      and r.get("dst_workload") == "demo/echo-v2"
                      and r.get("src") == wlab.gateway()["status"]["meshlane"]["ip"])
    assert rec["src_identity"] == WAYPOINT_ID and rec["status"] == 200, rec


def test_path_match_routes_to_a_second_service(wlab):
    rules = [{"matches": [{"path": {"type": "PathPrefix", "value": "/other"}}],
              "backendRefs": [{"name": "other", "port": 80}]}] + weighted(90, 10)
    ok(wlab.apply(route("echo", "echo", rules)))
    _settle(wlab, lambda: answered_by(wlab.get("/other/x")) == "other-1")
    assert all(answered_by(wlab.get("/other/x")) == "other-1" for _ in range(10))
    # path elements: /otherwise is not under /other
    assert all(answered_by(wlab.get("/otherwise")) != "other-1" for _ in range(10))


def test_retry_turns_503_then_200_into_200(wlab):
    no_retry = [{"matches": [{"path": {"type": "PathPrefix", "value": "/flaky"}}],
                 "backendRefs": [{"name": "echo-v1", "port": 80}]}]
    ok(wlab.apply(route("flaky", "echo-v1", no_retry)))
    # the route is in Envoy once /flaky reaches echo-v1 (n=0: never a 503); "/" is now a 404,
    # as Gateway API wants for a request that matches no rule of the Service's routes
    _settle(wlab, lambda: wlab.get("/flaky/warm/0", svc="echo-v1")[0] == 200)
    assert wlab.get("/flaky/a/1", svc="echo-v1")[0] == 503     # without a retry policy: the 503 shows
    with_retry = [dict(no_retry[0], retry={"codes": [503], "attempts": 2, "backoff": "10ms"})]
    ok(wlab.apply(route("flaky", "echo-v1", with_retry)))
    _settle(wlab, lambda: wlab.get("/flaky/probe-" + str(time.monotonic()) + "/1", svc="echo-v1")[0] == 200)
    assert wlab.get("/flaky/b/1", svc="echo-v1")[0] == 200


def test_request_timeout_gives_504(wlab):
    rules = [{"matches": [{"path": {"type": "PathPrefix", "value": "/delay"}}],
              "backendRefs": [{"name": "echo-v1", "port": 80}], "timeouts": {"request": "500ms"}}]
    ok(wlab.apply(route("slow", "echo-v1", rules)))
    _settle(wlab, lambda: wlab.get("/delay/2000", svc="echo-v1")[0] == 504)
    # the backend would answer 200 after 2 s: a 504 is the route's timeout firing
    status, _, body = wlab.get("/delay/2000", svc="echo-v1")
    assert (status, body) == (504, b"upstream request timeout")
    assert wlab.get("/delay/10", svc="echo-v1")[0] == 200


def test_fault_abort_returns_the_configured_status(wlab):
    ok(wlab.apply(route("other", "other", [{"backendRefs": [{"name": "other", "port": 80}]}],
                        annotations={"fault.meshlane.io/abort-status": "418"})))
    _settle(wlab, lambda: wlab.get("/", svc="other")[0] == 418)
    assert [wlab.get("/", svc="other")[0] for _ in range(5)] == [418] * 5


def test_rate_limit_answers_429_after_its_budget(wlab):
    ok(wlab.apply(route("other", "other", [{"backendRefs": [{"name": "other", "port": 80}]}],
                        annotations={"ratelimit.meshlane.io/requests": "5",
                                     "ratelimit.meshlane.io/per": "1h"})))
    _settle(wlab, lambda: wlab.get("/", svc="other")[0] == 429)   # drains the bucket
    assert wlab.get("/", svc="other")[0] == 429
    ok(wlab.apply(route("other", "other", [{"backendRefs": [{"name": "other", "port": 80}]}])))
    _settle(wlab, lambda: wlab.get("/", svc="other")[0] == 200)


def test_l7_deny_on_delete_refuses_that_method_only(wlab):
    # /delay/1 is a path echo-v1's routes carry (the "slow" route): the DENY is configured
    # on those routes, and a path no rule matches has no route at all (Gateway API: 404)
    ok(wlab.apply(yaml.safe_dump({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-delete", "namespace": "demo"},
        "spec": {"targetRefs": [{"kind": "Service", "group": "", "name": "echo-v1"}],
                 "action": "DENY", "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]}})))
    _settle(wlab, lambda: wlab.get("/delay/1", svc="echo-v1", method="DELETE")[0] == 403)
    assert wlab.get("/delay/1", svc="echo-v1", method="DELETE")[0] == 403
    for m in ("GET", "POST", "PUT"):
        assert wlab.get("/delay/1", svc="echo-v1", method=m)[0] == 200, m
    ok(wlab.cli("delete", "authorizationpolicy", "no-delete", "-n", "demo"))
    _settle(wlab, lambda: wlab.get("/delay/1", svc="echo-v1", method="DELETE")[0] == 200)


def test_route_update_while_requests_flow_drops_nothing(wlab):
    pid = wlab.gateway()["status"]["meshlane"]["envoyPid"]
    results = while_requests_flow(
        lambda: wlab.get("/")[0],
        [lambda v1=v1, v2=v2: ok(wlab.apply(route("echo", "echo", weighted(v1, v2))))
         for v1, v2 in ((0, 100), (100, 0), (50, 50), (0, 100))],
        workers=4, pause=1.0)
    bad = [r for r in results if r[1] != 200]
    assert len(results) > 50 and not bad, (len(results), bad[:5])
    # the last update (all to v2) took effect, and Envoy was never restarted
    _settle(wlab, lambda: answered_by(wlab.get("/")) == "echo-v2")
    assert all(answered_by(wlab.get("/")) == "echo-v2" for _ in range(10))
    assert wlab.gateway()["status"]["meshlane"]["envoyPid"] == pid


def test_bad_input_is_refused_with_the_field_path(wlab):
    bad_parent = route("bad", "nosuch", weighted(1, 1))
    fails(wlab.apply(bad_parent, "bad1.yaml"), EX_DATAERR, "spec.parentRefs[0].name", "nosuch")
    bad_weight = route("echo", "echo", weighted(90, 10)).replace("weight: 90", "weight: ninety")
    fails(wlab.apply(bad_weight, "bad2.yaml"), EX_DATAERR, "spec.rules[0].backendRefs[0].weight")
    missing = route("echo", "echo", [{"backendRefs": [{"name": "gone", "port": 80}]}])
    fails(wlab.apply(missing, "bad3.yaml"), EX_DATAERR, "spec.rules[0].backendRefs[0].name", "gone")
    # the route that was working still is
    assert all(answered_by(wlab.get("/")) == "echo-v2" for _ in range(5))


def test_waypoint_status_shows_stats_and_access_log(wlab):
    out = json.loads(ok(wlab.cli("waypoint", "status", "-n", "demo", "-o", "json")).stdout)
    assert any(k.endswith("downstream_rq_2xx") and v > 0 for k, v in out["httpStats"].items()), out
    assert out["accessLog"] and isinstance(out["accessLog"][-1], dict), out["accessLog"][-3:]


def test_bypass_is_refused_once_the_destination_asks(wlab):
    v1 = labmod.resolve_pod(wlab.name, "echo-v1")["ip"]
    client = wlab.pods["client-1"]["netns"]
    assert http_call(client, v1, 8080)[0] == 200        # direct to the pod: allowed so far
    ok(wlab.apply(yaml.safe_dump({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "only-waypoint", "namespace": "demo"},
        "spec": {"selector": {"matchLabels": {"app": "echo"}}, "action": "ALLOW",
                 "rules": [{"from": [{"source": {"principals": [WAYPOINT_ID.removeprefix("spiffe://")]}}]}]}})))

    def refused() -> bool:
        try:
            return http_call(client, v1, 8080, timeout=3)[0] != 200
        except OSError:
            return True
    _settle(wlab, refused)
    assert refused()
    assert answered_by(wlab.get("/")) == "echo-v2"     # through the waypoint: still served
    ok(wlab.cli("delete", "authorizationpolicy", "only-waypoint", "-n", "demo"))
    _settle(wlab, lambda: not refused())


def test_waypoint_for_all_takes_pod_addressed_traffic(wlab):
    """`--for all`: a connection to a pod's own IP goes through the waypoint too (here from
    a pod on the same node, where the kernel would otherwise splice it), so a destination
    that admits only the waypoint still serves it, and the Gateway's L7 policies apply."""
    v1 = labmod.resolve_pod(wlab.name, "echo-v1")["ip"]
    client = wlab.pods["client-1"]["netns"]            # node1, as echo-v1
    ok(wlab.cli("waypoint", "apply", "-n", "demo", "--for", "all"))
    ok(wlab.apply(yaml.safe_dump({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "only-waypoint", "namespace": "demo"},
        "spec": {"selector": {"matchLabels": {"app": "echo"}}, "action": "ALLOW",
                 "rules": [{"from": [{"source": {"principals": [WAYPOINT_ID.removeprefix("spiffe://")]}}]}]}})))
    ok(wlab.apply(yaml.safe_dump({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-x-block", "namespace": "demo"},
        "spec": {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
                 "action": "DENY",
                 "rules": [{"when": [{"key": "request.headers[x-block]", "values": ["yes"]}]}]}}), "gwdeny.yaml"))

    def direct(headers=None):
        return http_call(client, v1, 8080, "GET", "/direct", headers=headers, timeout=3)
    _settle(wlab, lambda: direct()[0] == 200 and direct({"x-block": "yes"})[0] == 403)
    status, _, body = direct()
    assert status == 200 and json.loads(body)["pod"] == "echo-v1"
    assert json.loads(body)["headers"].get("x-forwarded-proto") == "http", "an Envoy handled it"
    assert direct({"x-block": "yes"})[0] == 403
    out = wait_record(wlab.name, "node1", lambda r: r.get("direction") == "outbound"
                      and r.get("dst") == f"{v1}:8080" and r.get("waypoint") == "demo/waypoint")
    assert out["dst_identity"] == WAYPOINT_ID and out["status"] == 200, out
    # back to Service traffic only: the pod-addressed connection goes direct and is refused
    ok(wlab.cli("waypoint", "apply", "-n", "demo", "--for", "service"))

    def refused() -> bool:
        try:
            return direct()[0] != 200
        except OSError:
            return True
    _settle(wlab, refused)
    for name in ("only-waypoint", "no-x-block"):
        ok(wlab.cli("delete", "authorizationpolicy", name, "-n", "demo"))
    _settle(wlab, lambda: direct()[0] == 200)


def test_removing_the_label_sends_traffic_directly_again(wlab):
    ok(wlab.cli("label", "namespace", "demo", "istio.io/use-waypoint-"))
    seen = set()

    def direct() -> bool:
        seen.add(answered_by(wlab.get("/")))
        return len(seen) == 2    # the route (all to v2) no longer applies: both versions answer
    _settle(wlab, direct)
    rec = wait_record(wlab.name, "node2", lambda r: r.get("direction") == "inbound"
                      and r.get("dst_workload") == "demo/echo-v2" and r.get("src_identity") == CLIENT_ID)
    assert rec["status"] == 200


def test_deleting_the_waypoint_cleans_up(wlab):
    info = wlab.gateway()["status"]["meshlane"]
    ok(wlab.cli("waypoint", "delete", "-n", "demo", "waypoint"))
    _settle(wlab, lambda: not Path(f"/proc/{info['envoyPid']}").exists())
    assert not os.path.exists(f"/run/netns/{info['netns']}")
    assert not Path(info["dir"]).exists()
    pods = json.loads(ok(wlab.cli("get", "pods", "-n", "demo", "-o", "json")).stdout)
    assert info["pod"] not in {p["metadata"]["name"] for p in pods}
    ns_list = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert info["netns"] not in ns_list
    # the node's bridge kept its own MAC when the waypoint's veth left it (were it to
    # change, pods' ARP entries for their gateway would go stale and traffic to other
    # nodes would stall): requests to both endpoints, echo-v2 being across nodes
    link = subprocess.run(["ip", "-n", f"{wlab.name}-node1", "-o", "link", "show", "br0"],
                          capture_output=True, text=True, check=True).stdout
    assert f"link/ether {labnet.mac_for('10.244.1.1')} " in link, link
    assert {answered_by(wlab.get("/")) for _ in range(12)} <= {"echo-v1", "echo-v2"}


# --- helpers ---------------------------------------------------------------------------------


def _share_v1(wlab: Lab, n: int) -> float:
    return sum(answered_by(wlab.get("/")) == "echo-v1" for _ in range(n)) / n


def _settle(wlab: Lab, cond, timeout: float = 15.0) -> None:
    settle(wlab.name, cond, timeout)
