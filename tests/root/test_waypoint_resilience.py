"""Waypoint resilience end to end: DestinationRule circuit breaking and outlier detection,
HTTPRoute request mirroring, in a real lab with a real Envoy waypoint.

One lab serves the module (prefix "wpr", so it runs beside the other labs).  demo has a
client, `slow` (one pod, for the circuit breaker), `od` (two pods, one made to fail by
the lab app's /fail-on/<pod>, for outlier detection), `web` and `shadow` (the mirror's
primary and its mirror).  Every resource goes in through the CLI; what Envoy did is read
back both from the answers the client got and from the waypoint's admin API (/clusters,
/stats), so each test fails when the feature is not in effect.
"""
from __future__ import annotations

import collections
import json
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

from meshlane import waypointd
from tests.envoy_util import requires_envoy
from tests.root.meshtest import http_call, ml, ok, running_lab, settle

pytestmark = [pytest.mark.root, requires_envoy()]

TOPOLOGY = """
nodes: [node1, node2]
namespaces:
  demo: {labels: {"istio.io/dataplane-mode": ambient}}
pods:
  - {name: client-1, node: node1, namespace: demo, serviceAccount: client, app: none}
  - {name: slow-1, node: node2, namespace: demo, serviceAccount: slow, app: http, labels: {app: slow}}
  - {name: od-a, node: node1, namespace: demo, serviceAccount: od, app: http, labels: {app: od}}
  - {name: od-b, node: node2, namespace: demo, serviceAccount: od, app: http, labels: {app: od}}
  - {name: web-1, node: node1, namespace: demo, serviceAccount: web, app: http, labels: {app: web}}
  - {name: shadow-1, node: node2, namespace: demo, serviceAccount: shadow, app: http, labels: {app: shadow}}
services:
  - {name: slow, namespace: demo, ports: [{name: http, port: 80, targetPort: 8080}], selector: {app: slow}}
  - {name: od, namespace: demo, ports: [{name: http, port: 80, targetPort: 8080}], selector: {app: od}}
  - {name: web, namespace: demo, ports: [{name: http, port: 80, targetPort: 8080}], selector: {app: web}}
  - {name: shadow, namespace: demo, ports: [{name: http, port: 80, targetPort: 8080}], selector: {app: shadow}}
"""

U32 = 2**32 - 1


def cluster(svc: str) -> str:
    return f"outbound|80||{svc}.demo.svc.cluster.local"


@pytest.fixture(scope="module")
def rlab(tmp_path_factory):
    topo = tmp_path_factory.mktemp("wpr") / "topology.yaml"
    topo.write_text(TOPOLOGY)
    with running_lab("wpr", str(topo)) as (name, pods):
        lab = Lab(name, pods, tmp_path_factory.mktemp("wprfiles"))
        ok(lab.cli("waypoint", "apply", "-n", "demo", "--enroll-namespace"))
        yield lab


class Lab:
    def __init__(self, name: str, pods: dict, files: Path):
        self.name, self.pods, self.files = name, pods, files
        self.vips: dict[str, str] = {}
        self._netns: str | None = None

    def cli(self, *args: str, timeout: float = 90):
        return ml(*args, lab=self.name, timeout=timeout)

    def vip(self, svc: str) -> str:
        if svc not in self.vips:
            out = ok(self.cli("get", "services", svc, "-n", "demo", "-o", "json")).stdout
            self.vips[svc] = json.loads(out)["spec"]["clusterIP"]
        return self.vips[svc]

    def apply(self, obj: dict, name: str = "obj.yaml"):
        f = self.files / name
        f.write_text(yaml.safe_dump(obj))
        return self.cli("apply", "-f", str(f))

    def get(self, svc: str, path: str = "/", *, headers: dict | None = None,
            timeout: float = 10.0) -> tuple[int, dict, bytes]:
        return http_call(self.pods["client-1"]["netns"], self.vip(svc), 80, "GET", path,
                         headers=headers, timeout=timeout)

    def pod_get(self, pod: str, path: str) -> dict:
        """Straight to a pod's app (pod-addressed traffic does not take the waypoint)."""
        status, _, body = http_call(self.pods["client-1"]["netns"], self.pods[pod]["ip"], 8080, "GET", path)
        assert status == 200, (status, body[:300])
        return json.loads(body)

    def admin(self, path: str) -> str:
        """GET on the waypoint Envoy's admin API (inside the waypoint pod's netns)."""
        if self._netns is None:
            gw = json.loads(ok(self.cli("get", "gateways", "waypoint", "-n", "demo", "-o", "json")).stdout)
            self._netns = gw["status"]["meshlane"]["netns"]
        code, body = waypointd.admin_get(self._netns, path)
        assert code == 200, (path, code, body[:300])
        return body

    def stats(self, name: str, what: str) -> dict[str, int]:
        """`cluster.<name>.<stat>` values whose stat matches the regex `what`."""
        body = self.admin("/stats?format=json&filter=" + quote(what, safe=""))
        prefix = f"cluster.{name}."
        return {s["name"][len(prefix):]: s["value"] for s in json.loads(body)["stats"]
                if s.get("name", "").startswith(prefix) and "value" in s}

    def clusters(self, name: str) -> list[str]:
        """The `/clusters` lines of one cluster (without the `<name>::` prefix)."""
        return [ln[len(name) + 2:] for ln in self.admin("/clusters").splitlines() if ln.startswith(name + "::")]


def destination_rule(name: str, host: str, traffic_policy: dict) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": name, "namespace": "demo"},
            "spec": {"host": host, "trafficPolicy": traffic_policy}}


def pod_of(resp: tuple[int, dict, bytes]) -> str:
    return resp[1].get("x-pod", "")


# --- the waypoint ------------------------------------------------------------------------------


def test_the_waypoint_carries_the_namespace(rlab):
    gw = json.loads(ok(rlab.cli("get", "gateways", "waypoint", "-n", "demo", "-o", "json")).stdout)
    assert gw["status"]["meshlane"]["adminPort"] == waypointd.ADMIN_PORT

    def via_envoy() -> bool:
        status, headers, body = rlab.get("slow", "/")
        return status == 200 and "x-forwarded-proto" in json.loads(body)["headers"]
    _settle(rlab, via_envoy)
    for svc in ("slow", "od", "web", "shadow"):
        assert any(ln.startswith("default_priority::max_connections::") for ln in rlab.clusters(cluster(svc))), svc


# --- circuit breaking --------------------------------------------------------------------------


def _burst(rlab: Lab, n: int, path: str) -> list[tuple[int, str, str]]:
    """`n` requests at once (one connection each) -> [(status, x-envoy-overloaded, x-pod)]."""
    start = threading.Barrier(n)
    out: list = [None] * n

    def one(i: int) -> None:
        start.wait()
        try:
            status, headers, _ = rlab.get("slow", path, timeout=15)
            out[i] = (status, headers.get("x-envoy-overloaded", ""), headers.get("x-pod", ""))
        except OSError as exc:
            out[i] = (repr(exc), "", "")
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_circuit_breaker_sheds_a_burst_with_503_overloaded(rlab):
    name = cluster("slow")
    # defaults first: Envoy's own limits are lifted, a burst of 10 is all served
    before = rlab.stats(name, "upstream_rq_pending_overflow$").get("upstream_rq_pending_overflow", 0)
    ok(rlab.apply(destination_rule("slow-cb", "slow.demo.svc.cluster.local", {
        "connectionPool": {"tcp": {"maxConnections": 1},
                           "http": {"http1MaxPendingRequests": 1, "maxRequestsPerConnection": 1}}}), "cb.yaml"))
    _settle(rlab, lambda: {"default_priority::max_connections::1", "default_priority::max_pending_requests::1"}
            <= set(rlab.clusters(name)))
    results = _burst(rlab, 10, "/delay/1500")
    codes = collections.Counter(r[0] for r in results)
    assert set(codes) <= {200, 503}, results
    served = [r for r in results if r[0] == 200]
    shed = [r for r in results if r[0] == 503]
    # one connection and one pending request (per worker at most, Envoy runs two): the
    # rest of the burst is refused at once
    assert served and len(shed) >= 5, results
    assert all(r[2] == "slow-1" for r in served), results
    assert all(r[1] == "true" and r[2] == "" for r in shed), results
    overflow = rlab.stats(name, "upstream_rq_pending_overflow$")["upstream_rq_pending_overflow"]
    assert overflow - before >= len(shed), (overflow, before, results)

    # without the DestinationRule the same burst is all served
    ok(rlab.cli("delete", "destinationrule", "slow-cb", "-n", "demo"))
    _settle(rlab, lambda: f"default_priority::max_connections::{U32}" in rlab.clusters(name))
    results = _burst(rlab, 10, "/delay/1500")
    assert [r[0] for r in results] == [200] * 10, results
    assert rlab.stats(name, "upstream_rq_pending_overflow$")["upstream_rq_pending_overflow"] == overflow


# --- outlier detection -------------------------------------------------------------------------


def test_outlier_detection_ejects_the_failing_endpoint(rlab):
    name, bad_ip = cluster("od"), rlab.pods["od-a"]["ip"]
    path = "/fail-on/od-a"
    # without a DestinationRule od-a stays in rotation however often it fails
    seen = collections.Counter((r[0], pod_of(r)) for r in (rlab.get("od", path) for _ in range(12)))
    assert seen[(503, "od-a")] >= 3 and seen[(200, "od-b")] >= 3 and sum(seen.values()) == 12, seen
    ok(rlab.apply(destination_rule("od-outlier", "od", {
        "outlierDetection": {"consecutive5xxErrors": 2, "interval": "1s", "baseEjectionTime": "30s",
                             "maxEjectionPercent": 50}}), "od.yaml"))
    _settle(rlab, lambda: any(ln.startswith("outlier::") for ln in rlab.clusters(name)))
    assert rlab.stats(name, "outlier_detection.ejections_enforced_total$").get(
        "outlier_detection.ejections_enforced_total", 0) == 0

    # od-a answers 503 until two in a row got it ejected; then od-b takes everything
    first: list = []

    def ejected() -> bool:
        first.append(rlab.get("od", path))
        return any(f"{bad_ip}:8080::health_flags::/failed_outlier_check" in ln for ln in rlab.clusters(name))
    _settle(rlab, ejected, timeout=10)
    failures = [r for r in first if r[0] == 503]
    assert failures and all(pod_of(r) == "od-a" for r in failures), [(r[0], pod_of(r)) for r in first]
    after = [rlab.get("od", path) for _ in range(20)]
    assert [(r[0], pod_of(r)) for r in after] == [(200, "od-b")] * 20
    st = rlab.stats(name, r"outlier_detection\.(ejections_enforced_total|ejections_active|"
                          r"ejections_enforced_consecutive_5xx)$")
    assert st["outlier_detection.ejections_enforced_total"] >= 1, st
    assert st["outlier_detection.ejections_enforced_consecutive_5xx"] >= 1, st
    assert st["outlier_detection.ejections_active"] == 1, st
    ok(rlab.cli("delete", "destinationrule", "od-outlier", "-n", "demo"))
    _settle(rlab, lambda: not any(ln.startswith("outlier::") for ln in rlab.clusters(name)))


# --- request mirroring ---------------------------------------------------------------------------


def test_mirror_copies_every_request_to_the_shadow_service(rlab):
    ok(rlab.apply({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "web", "namespace": "demo"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                 "rules": [{"backendRefs": [{"name": "web", "port": 80}],
                            "filters": [{"type": "RequestMirror",
                                         "requestMirror": {"backendRef": {"name": "shadow", "port": 80}}}]}]}},
        "mirror.yaml"))
    probes = iter(range(1000))

    def mirrored() -> bool:
        key = f"probe-{next(probes)}"
        assert rlab.get("web", "/", headers={"x-count": key})[0] == 200
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            if rlab.pod_get("shadow-1", f"/seen/{key}")["seen"]:
                return True
            time.sleep(0.05)
        return False
    _settle(rlab, mirrored)

    # the shadow fails every request it gets (/fail-on/shadow-1); the client never sees it
    key, n = f"run-{time.monotonic_ns()}", 10
    answers = [rlab.get("web", "/fail-on/shadow-1", headers={"x-count": key}) for _ in range(n)]
    for i, (status, headers, body) in enumerate(answers, 1):
        data = json.loads(body)
        assert (status, headers.get("x-pod"), data["pod"], data["count"]) == (200, "web-1", "web-1", i), data
    deadline = time.monotonic() + 10
    while (shadow := rlab.pod_get("shadow-1", f"/seen/{key}"))["seen"] < n and time.monotonic() < deadline:
        time.sleep(0.1)
    primary = rlab.pod_get("web-1", f"/seen/{key}")
    assert primary["seen"] == n and shadow["seen"] == n, (primary, shadow)
    # Envoy marks a mirrored request by suffixing its authority with "-shadow"
    assert primary["hosts"] and not any(h.endswith("-shadow") for h in primary["hosts"]), primary
    assert shadow["hosts"] and all(h.endswith("-shadow") for h in shadow["hosts"]), shadow
    assert rlab.stats(cluster("shadow"), r"upstream_rq_503$").get("upstream_rq_503", 0) >= n

    # without the filter nothing more is mirrored
    ok(rlab.cli("delete", "httproute", "web", "-n", "demo"))
    key2 = f"after-{time.monotonic_ns()}"
    _settle(rlab, lambda: not any("request_mirror_policies" in ln for ln in [rlab.admin(
        "/config_dump?resource=dynamic_route_configs")]))
    for _ in range(5):
        assert rlab.get("web", "/", headers={"x-count": key2})[0] == 200
    time.sleep(0.5)
    assert rlab.pod_get("web-1", f"/seen/{key2}")["seen"] == 5
    assert rlab.pod_get("shadow-1", f"/seen/{key2}")["seen"] == 0


# --- helpers ---------------------------------------------------------------------------------


def _settle(rlab: Lab, cond, timeout: float = 15.0) -> None:
    settle(rlab.name, cond, timeout)
