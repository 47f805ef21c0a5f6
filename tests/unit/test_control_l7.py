"""The control plane's side of L7 resources (VIPs, creation times, cross-references at
apply) and the ztunnel's view of them (which endpoint or waypoint a VIP leads to)."""
from __future__ import annotations

import pytest

from meshcore.errors import BadInputError
from meshlane.control import ControlPlane
from slowpath.state import ServiceStore, WorkloadStore


def svc(name: str, ns: str = "demo", selector: dict | None = None, labels: dict | None = None, **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}],
                     "selector": selector if selector is not None else {"app": name}, **spec}}


def httproute(name: str, parent: str, backend: str, ns: str = "demo") -> dict:
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": 80}],
                     "rules": [{"backendRefs": [{"name": backend, "port": 80}]}]}}


@pytest.fixture
def cp(tmp_path):
    return ControlPlane(state_dir=tmp_path / "state", socket_path=tmp_path / "sock")


def stored(cp, kind, name, ns="demo"):
    return cp.store.get(kind, ns, name)


def test_vips_are_allocated_kept_and_immutable(cp):
    cp.op_apply([svc("a"), svc("b")])
    a, b = stored(cp, "Service", "a"), stored(cp, "Service", "b")
    assert a["spec"]["clusterIP"] == "10.96.0.10" and b["spec"]["clusterIP"] == "10.96.0.11"
    ans = cp.op_apply([svc("a")])                      # re-applied as written: nothing changes
    assert ans["results"][0]["result"] == "unchanged"
    cp.op_apply([svc("a", selector={"app": "x"})])     # an update keeps the VIP
    assert stored(cp, "Service", "a")["spec"]["clusterIP"] == "10.96.0.10"
    with pytest.raises(BadInputError, match=r"spec.clusterIP: field is immutable"):
        cp.op_apply([svc("a", clusterIP="10.96.1.1")])
    with pytest.raises(BadInputError, match=r"10.96.0.11 is already the VIP of Service demo/b"):
        cp.op_apply([svc("c", clusterIP="10.96.0.11")])
    cp.op_apply([svc("c", clusterIP="10.96.3.3")])
    assert stored(cp, "Service", "c")["spec"]["clusterIP"] == "10.96.3.3"


def test_creation_time_survives_updates(cp):
    cp.op_apply([svc("a")])
    first = stored(cp, "Service", "a")["metadata"]["creationTimestamp"]
    cp.op_apply([svc("a", labels={"x": "y"})])
    again = stored(cp, "Service", "a")["metadata"]
    assert again["creationTimestamp"] == first and again["labels"] == {"x": "y"}


def test_a_route_to_a_missing_service_is_refused_and_nothing_changes(cp):
    cp.op_apply([svc("echo"), svc("v1"), httproute("r", "echo", "v1")])
    rev = cp.store.rev
    with pytest.raises(BadInputError, match=r"spec.rules\[0\].backendRefs\[0\].name"):
        cp.op_apply([httproute("r", "echo", "gone")])
    with pytest.raises(BadInputError, match=r"spec.parentRefs\[0\].name"):
        cp.op_apply([httproute("r2", "nosuch", "v1")])
    assert cp.store.rev == rev
    assert stored(cp, "HTTPRoute", "r")["spec"]["rules"][0]["backendRefs"][0]["name"] == "v1"
    # a Service and the route to it may come in one apply
    cp.op_apply([svc("v2"), httproute("r", "echo", "v2")])
    assert stored(cp, "HTTPRoute", "r")["spec"]["rules"][0]["backendRefs"][0]["name"] == "v2"


def pod(name: str, ip: str, labels: dict, *, ns: str = "demo", enrolled: bool = True,
        waypoint: bool = False) -> dict:
    return {"kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": "node1", "serviceAccountName": "sa"},
            "status": {"podIP": ip, "enrolled": enrolled, "waypoint": waypoint}}


def gateway(name: str, ns: str = "demo", waypoint_for: str | None = None) -> dict:
    labels = {"istio.io/waypoint-for": waypoint_for} if waypoint_for else {}
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"gatewayClassName": "istio-waypoint",
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}


def test_ztunnel_view_endpoints_and_waypoints():
    wl = WorkloadStore()
    wl.replace_all([pod("e1", "10.244.1.10", {"app": "echo"}), pod("e2", "10.244.2.10", {"app": "echo"}),
                    pod("x", "10.244.1.11", {"app": "other"}),
                    pod("wp-1", "10.244.1.250", {"app": "echo", "gateway.networking.k8s.io/gateway-name": "wp"},
                        waypoint=True, enrolled=False)])
    echo = svc("echo")
    echo["spec"]["clusterIP"] = "10.96.0.10"
    other = svc("other", labels={"istio.io/use-waypoint": "none"})
    other["spec"]["clusterIP"] = "10.96.0.11"
    st = ServiceStore()
    st.replace_all([echo, other, gateway("wp"),
                    {"kind": "Namespace", "metadata": {"name": "demo", "labels": {}}}])
    s = st.at("10.96.0.10")
    assert s is not None and s.key == "demo/echo" and st.at("10.96.9.9") is None
    assert [w.name for w in wl.endpoints(s)] == ["e1", "e2"]     # never the waypoint's pod
    assert st.waypoint_for(s) is None
    st.put({"kind": "Namespace", "metadata": {"name": "demo", "labels": {"istio.io/use-waypoint": "wp"}}})
    wp = st.waypoint_for(s)
    assert wp is not None and wp.key == "demo/wp"
    assert wl.waypoint_pod(wp).ip.exploded == "10.244.1.250"
    assert st.waypoint_for(st.at("10.96.0.11")) is None          # the Service opted out
    st.put(gateway("wp", waypoint_for="workload"))                # takes no Service traffic
    assert st.waypoint_for(s) is None
    st.delete(echo)
    assert st.at("10.96.0.10") is None


def test_ztunnel_lookups_follow_workload_changes():
    """endpoints() and waypoint_pod() are answered from a cache: every Pod change shows."""
    wl = WorkloadStore()
    wl.replace_all([pod("e1", "10.244.1.10", {"app": "echo"})])
    echo = svc("echo")
    echo["spec"]["clusterIP"] = "10.96.0.10"
    st = ServiceStore()
    st.replace_all([echo, gateway("wp", waypoint_for="all")])
    s, wp = st.at("10.96.0.10"), st.waypoints["demo/wp"]
    assert [w.name for w in wl.endpoints(s)] == ["e1"] and wl.waypoint_pod(wp) is None
    wl.put(pod("e2", "10.244.2.10", {"app": "echo"}))
    wl.put(pod("wp-1", "10.244.1.250", {"gateway.networking.k8s.io/gateway-name": "wp"}, waypoint=True))
    assert [w.name for w in wl.endpoints(s)] == ["e1", "e2"]
    assert wl.waypoint_pod(wp).name == "wp-1"
    wl.put(pod("e1", "10.244.1.10", {"app": "not-echo"}))          # relabelled
    wl.delete("demo/wp-1")
    assert [w.name for w in wl.endpoints(s)] == ["e2"] and wl.waypoint_pod(wp) is None
    # pod-IP traffic: only an enrolled pod that (or whose namespace) uses a workload waypoint
    e2 = wl.find("10.244.2.10")
    assert st.waypoint_for_workload(e2) is None
    st.put({"kind": "Namespace", "metadata": {"name": "demo", "labels": {"istio.io/use-waypoint": "wp"}}})
    assert st.waypoint_for_workload(e2).key == "demo/wp"
    wl.put(pod("e3", "10.244.2.11", {"app": "echo"}, enrolled=False))
    assert st.waypoint_for_workload(wl.find("10.244.2.11")) is None
    st.put(gateway("wp", waypoint_for="service"))
    assert st.waypoint_for_workload(e2) is None
