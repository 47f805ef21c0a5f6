"""meshcore.l7parse: the L7 resources users apply (Service, Gateway, HTTPRoute,
DestinationRule, AuthorizationPolicy with targetRefs), their error paths, the models they
become, and the cross-object checks of `apply`."""
from __future__ import annotations

import copy
import ipaddress
import random

import pytest

from meshcore import l7
from meshcore import l7parse as P
from meshcore.errors import BadInputError

GW_API = "gateway.networking.k8s.io/v1"


# --- builders --------------------------------------------------------------------------------


def svc(name="echo", ns="demo", ports=None, selector=None, labels=None, **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, **({"labels": labels} if labels else {})},
            "spec": {"ports": ports if ports is not None else [{"name": "http", "port": 80, "targetPort": 8080}],
                     "selector": selector if selector is not None else {"app": name}, **spec}}


def gateway(name="waypoint", ns="demo", labels=None, annotations=None, **spec) -> dict:
    meta = {"name": name, "namespace": ns}
    if labels:
        meta["labels"] = labels
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": GW_API, "kind": "Gateway", "metadata": meta,
            "spec": {"gatewayClassName": "istio-waypoint",
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}], **spec}}


def route(rules=None, parents=None, name="r", ns="demo", annotations=None, **spec) -> dict:
    meta = {"name": name, "namespace": ns}
    if annotations is not None:
        meta["annotations"] = annotations
    body = {"parentRefs": parents if parents is not None else
            [{"group": "", "kind": "Service", "name": "echo", "port": 80}], **spec}
    if rules is not None:
        body["rules"] = rules
    return {"apiVersion": GW_API, "kind": "HTTPRoute", "metadata": meta, "spec": body}


def backend(name="echo", port=80, **kw) -> dict:
    out = {"name": name, **kw}
    if port is not None:
        out["port"] = port
    return out


def dr(host="echo", ns="demo", api="networking.istio.io/v1", **spec) -> dict:
    return {"apiVersion": api, "kind": "DestinationRule", "metadata": {"name": "cb", "namespace": ns},
            "spec": {"host": host, **spec}}


def policy(spec: dict, name="p", ns="demo", annotations=None) -> dict:
    meta = {"name": name, "namespace": ns}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": meta, "spec": spec}


def to_svc(*rules, action="ALLOW", target="echo", **spec) -> dict:
    return policy({"targetRefs": [{"kind": "Service", "group": "", "name": target}], "action": action,
                   "rules": list(rules), **spec})


def fails(obj, *paths: str, src="f.yaml", prefix="") -> BadInputError:
    """validate() refuses obj; every path fragment appears in the message."""
    with pytest.raises(BadInputError) as ei:
        P.validate(obj, src=src, prefix=prefix)
    msg = str(ei.value)
    assert msg.startswith(f"{src}: "), msg
    for p in paths:
        assert p in msg, (p, msg)
    return ei.value


def ok(obj, src="f.yaml") -> tuple[dict, list[str]]:
    return P.validate(obj, src=src)


def stored(obj: dict, vip: str | None = "10.96.0.10", created: str | None = None) -> dict:
    """What the control plane stores: the normalized object plus server fields."""
    norm = copy.deepcopy(ok(obj)[0])
    norm["metadata"]["resourceVersion"] = "7"
    norm["metadata"]["creationTimestamp"] = created or "2024-01-01T00:00:00.000000Z"
    if norm["kind"] == "Service" and vip:
        norm["spec"]["clusterIP"] = vip
    return norm


# --- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text,secs", [("500ms", 0.5), ("1s", 1.0), ("1m30s", 90.0), ("1h", 3600.0),
                                       ("1.5s", 1.5), ("0s", 0.0), ("0", 0.0), ("100ms", 0.1),
                                       ("1h1m1s1ms", 3661.001), ("2us", 2e-6), (".5s", 0.5)])
def test_parse_duration_accepts_gateway_and_istio_forms(text, secs):
    assert P.parse_duration(text, what="x") == pytest.approx(secs)


@pytest.mark.parametrize("text", ["", "5", "-1s", "+1s", "1d", "1.5", "s", "1 s", "1S", "1sec", "nan",
                                  "inf", 5, 1.5, None, True, [], "9" * 70 + "s"])
def test_parse_duration_refuses_everything_else_naming_what(text):
    with pytest.raises(BadInputError, match=r"^spec\.x: "):
        P.parse_duration(text, what="spec.x")


# --- Service -----------------------------------------------------------------------------------


def test_service_minimal_fills_defaults():
    norm, warns = ok({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
                      "spec": {"ports": [{"port": 80}], "selector": {"app": "echo"}}})
    assert norm == {"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "echo", "namespace": "default", "labels": {}},
                    "spec": {"type": "ClusterIP", "selector": {"app": "echo"},
                             "ports": [{"port": 80, "targetPort": 80, "protocol": "TCP"}]}}
    assert warns == []


def test_service_full_and_its_model():
    obj = svc(ports=[{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "appProtocol": "HTTP"},
                     {"name": "grpc-api", "port": 9090}],
              labels={"istio.io/use-waypoint": "waypoint", "app": "echo"},
              clusterIP="10.96.3.4", type="ClusterIP", sessionAffinity="None", ipFamilies=["IPv4"],
              ipFamilyPolicy="SingleStack", internalTrafficPolicy="Cluster", clusterIPs=["10.96.3.4"])
    obj["metadata"]["annotations"] = {"note": "anything at all: even spaces"}
    obj["metadata"]["uid"] = "abc"          # server fields from `kubectl get -o yaml` are dropped
    obj["status"] = {"loadBalancer": {}}
    norm, warns = ok(obj)
    assert warns == []
    assert norm["metadata"] == {"name": "echo", "namespace": "demo", "annotations": {"note": "anything at all: even spaces"},
                                "labels": {"istio.io/use-waypoint": "waypoint", "app": "echo"}}
    assert norm["spec"] == {"type": "ClusterIP", "clusterIP": "10.96.3.4", "selector": {"app": "echo"},
                            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP",
                                       "appProtocol": "HTTP"},
                                      {"name": "grpc-api", "port": 9090, "targetPort": 9090, "protocol": "TCP"}]}
    assert "status" not in norm
    s = P.service_of(norm)
    assert s.vip == ipaddress.IPv4Address("10.96.3.4") and s.key == "demo/echo"
    assert s.ports == (l7.ServicePort(port=80, target_port=8080, name="http", app_protocol="http"),
                       l7.ServicePort(port=9090, target_port=9090, name="grpc-api"))
    assert s.port(80).http and s.port(9090).http
    assert s.selector == (("app", "echo"),)
    assert s.labels == (("app", "echo"), ("istio.io/use-waypoint", "waypoint"))


def test_service_without_selector_warns():
    norm, warns = ok(svc(selector={}))
    assert "selector" not in norm["spec"]
    assert len(warns) == 1 and "no selector: no endpoints" in warns[0] and "Service demo/echo" in warns[0]
    obj = svc()
    del obj["spec"]["selector"]
    assert "no endpoints" in ok(obj)[1][0]
    stored_obj = stored(obj)
    assert P.service_of(stored_obj).selector == ()


def test_service_of_needs_a_vip():
    with pytest.raises(BadInputError, match=r"spec\.clusterIP: not set yet"):
        P.service_of(stored(svc(), vip=None))


@pytest.mark.parametrize("mutate,path,words", [
    (lambda o: o["spec"].update(type="NodePort"), "spec.type", "ClusterIP"),
    (lambda o: o["spec"].update(type="LoadBalancer"), "spec.type", "ClusterIP"),
    (lambda o: o["spec"].update(clusterIP="None"), "spec.clusterIP", "headless"),
    (lambda o: o["spec"].update(clusterIP="10.0.0.1"), "spec.clusterIP", "outside"),
    (lambda o: o["spec"].update(clusterIP="10.96.0.0"), "spec.clusterIP", "outside"),
    (lambda o: o["spec"].update(clusterIP="fd00::1"), "spec.clusterIP", "not an IPv4"),
    (lambda o: o["spec"].update(clusterIP=5), "spec.clusterIP", "expected an IPv4"),
    (lambda o: o["spec"].update(clusterIP="10.96.0.5", clusterIPs=["10.96.0.6"]), "spec.clusterIPs[0]", "must equal"),
    (lambda o: o["spec"].update(ports=[]), "spec.ports", "must not be empty"),
    (lambda o: o["spec"].pop("ports"), "spec.ports", "required"),
    (lambda o: o["spec"].update(ports={"port": 80}), "spec.ports", "expected a list"),
    (lambda o: o["spec"].update(ports=[{"port": 0}]), "spec.ports[0].port", "out of range"),
    (lambda o: o["spec"].update(ports=[{"port": 70000}]), "spec.ports[0].port", "out of range"),
    (lambda o: o["spec"].update(ports=[{"port": "80"}]), "spec.ports[0].port", "without quotes"),
    (lambda o: o["spec"].update(ports=[{"port": True}]), "spec.ports[0].port", "expected a port"),
    (lambda o: o["spec"].update(ports=[{"port": 80, "targetPort": "http"}]), "spec.ports[0].targetPort", "needs a port number"),
    (lambda o: o["spec"].update(ports=[{"port": 80, "targetPort": "8080"}]), "spec.ports[0].targetPort", "needs a port number"),
    (lambda o: o["spec"].update(ports=[{"port": 80, "targetPort": 15001}]), "spec.ports[0].targetPort", "mesh port"),
    (lambda o: o["spec"].update(ports=[{"port": 80, "targetPort": 15006}]), "spec.ports[0].targetPort", "mesh port"),
    (lambda o: o["spec"].update(ports=[{"port": 15008}]), "spec.ports[0].port", "mesh port"),
    (lambda o: o["spec"].update(ports=[{"port": 80, "protocol": "UDP"}]), "spec.ports[0].protocol", "TCP only"),
    (lambda o: o["spec"].update(ports=[{"port": 80, "nodePort": 30000}]), "spec.ports[0].nodePort", "not supported"),
    (lambda o: o["spec"].update(ports=[{"port": 80, "prot": "TCP"}]), "spec.ports[0].prot", "unknown field"),
    (lambda o: o["spec"].update(ports=[{"port": 80, "appProtocol": 7}]), "spec.ports[0].appProtocol", "expected"),
    (lambda o: o["spec"].update(ports=[{"name": "a", "port": 80}, {"name": "b", "port": 80}]), "spec.ports[1].port", "already"),
    (lambda o: o["spec"].update(ports=[{"name": "a", "port": 80}, {"name": "a", "port": 81}]), "spec.ports[1].name", "already"),
    (lambda o: o["spec"].update(ports=[{"name": "a", "port": 80}, {"port": 81}]), "spec.ports[1].name", "more than one port"),
    (lambda o: o["spec"].update(ports=[{"name": "Http", "port": 80}]), "spec.ports[0].name", "not a valid name"),
    (lambda o: o["spec"].update(selector={"app": 5}), "spec.selector[app]", "quote it"),
    (lambda o: o["spec"].update(selector={"app": "a b"}), "spec.selector[app]", "label value"),
    (lambda o: o["spec"].update(selector=["app"]), "spec.selector", "mapping"),
    (lambda o: o["spec"].update(externalName="x.example.com"), "spec.externalName", "not supported by meshlane"),
    (lambda o: o["spec"].update(sessionAffinity="ClientIP"), "spec.sessionAffinity", "only 'None'"),
    (lambda o: o["spec"].update(colour="blue"), "spec.colour", "unknown field"),
    (lambda o: o.update(apiVersion="v2"), "apiVersion", "v1"),
    (lambda o: o["metadata"].update(name="Echo"), "metadata.name", "Service name"),
    (lambda o: o["metadata"].update(name="1echo"), "metadata.name", "starting with a letter"),
    (lambda o: o["metadata"].pop("name"), "metadata.name", "required"),
    (lambda o: o["metadata"].update(namespace="a.b"), "metadata.namespace", "namespace"),
    (lambda o: o["metadata"].update(lables={}), "metadata.lables", "unknown field"),
    (lambda o: o["metadata"].update(labels={"a": 1}), "metadata.labels[a]", "quote it"),
    (lambda o: o["metadata"].update(labels={"-bad": "x"}), "metadata.labels[-bad]", "not a valid key"),
    (lambda o: o["metadata"].update(annotations={"x": None}), "metadata.annotations[x]", "strings"),
    (lambda o: o.update(metadata="echo"), "metadata", "required"),
    (lambda o: o.pop("spec"), "spec", "required"),
    (lambda o: o.update(spec=[]), "spec", "mapping"),
    (lambda o: o.update(extra=1), "extra", "unknown field"),
])
def test_service_errors_name_the_field(mutate, path, words):
    obj = svc()
    mutate(obj)
    err = fails(obj, f"f.yaml: {path}: ", words)
    assert err.exit_code == 65


def test_a_trailing_newline_is_not_a_valid_name_or_value():
    fails(svc(name="echo\n"), "metadata.name")
    fails(svc(labels={"app": "x\n"}), "metadata.labels[app]")
    fails(route([{"timeouts": {"request": "10s\n"}}]), "spec.rules[0].timeouts.request")
    fails(route([{"matches": [{"headers": [{"name": "x-a\n", "value": "1"}]}]}]), "spec.rules[0].matches[0].headers[0].name")
    with pytest.raises(BadInputError):
        P.parse_duration("1s\n", what="x")


def test_prefix_goes_before_every_path():
    obj = svc(ports=[{"port": 0}])
    fails(obj, "f.yaml: docs[2].spec.ports[0].port: ", prefix="docs[2].")
    with pytest.raises(BadInputError, match=r"^f\.yaml: docs\[2\]: expected a mapping"):
        P.validate("nope", src="f.yaml", prefix="docs[2].")


def test_validate_refuses_other_kinds():
    fails({"kind": "Pod", "metadata": {"name": "x"}}, "f.yaml: kind: ", "'Pod'")
    fails({"kind": "AuthorizationPolicy"}, "kind")
    fails({"kind": ["Service"]}, "kind")
    fails(None, "f.yaml: (document): ")


# --- Gateway (waypoint) ------------------------------------------------------------------------


def test_gateway_minimal_and_model():
    obj = gateway()
    obj["status"] = {"conditions": [{"type": "Programmed", "status": "True"}]}
    norm, warns = ok(obj)
    assert warns == [] and "status" not in norm
    assert norm["spec"] == {"gatewayClassName": "istio-waypoint",
                            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}
    wp = P.waypoint_of(obj)              # a stored Gateway with status parses too
    assert wp == l7.Waypoint(namespace="demo", name="waypoint", waypoint_for="service", node=None)
    assert wp.takes_services and not wp.takes_workloads


def test_gateway_full():
    obj = gateway(labels={"istio.io/waypoint-for": "all"}, annotations={"meshlane.io/node": "node2"})
    obj["apiVersion"] = "gateway.networking.k8s.io/v1beta1"
    obj["spec"]["listeners"][0]["allowedRoutes"] = {"namespaces": {"from": "Same"},
                                                    "kinds": [{"group": GW_API.split("/")[0], "kind": "HTTPRoute"}]}
    norm, _ = ok(obj)
    assert norm["spec"]["listeners"][0]["allowedRoutes"]["namespaces"] == {"from": "Same"}
    assert P.waypoint_of(norm) == l7.Waypoint(namespace="demo", name="waypoint", waypoint_for="all", node="node2")
    assert ok(norm)[0] == norm


@pytest.mark.parametrize("mutate,path,words", [
    (lambda o: o["spec"].update(gatewayClassName="istio"), "spec.gatewayClassName", "only waypoints"),
    (lambda o: o["spec"].pop("gatewayClassName"), "spec.gatewayClassName", "only waypoints"),
    (lambda o: o["spec"].update(listeners=[]), "spec.listeners", "must not be empty"),
    (lambda o: o["spec"].pop("listeners"), "spec.listeners", "required"),
    (lambda o: o["spec"]["listeners"][0].update(port=80, protocol="HTTP"), "spec.listeners[0]", "exactly one listener"),
    (lambda o: o["spec"]["listeners"][0].update(protocol="TCP"), "spec.listeners[0]", "HBONE"),
    (lambda o: o["spec"]["listeners"].append({"name": "http", "port": 80, "protocol": "HTTP"}), "spec.listeners[1]", "exactly one"),
    (lambda o: o["spec"]["listeners"].append({"name": "m2", "port": 15008, "protocol": "HBONE"}), "spec.listeners[1]", "second"),
    (lambda o: o["spec"]["listeners"][0].update(hostname="x"), "spec.listeners[0].hostname", "not supported"),
    (lambda o: o["spec"]["listeners"][0].update(tls={}), "spec.listeners[0].tls", "not supported"),
    (lambda o: o["spec"]["listeners"][0].update(name="Mesh"), "spec.listeners[0].name", "not a valid name"),
    (lambda o: o["spec"]["listeners"][0].update(port="15008"), "spec.listeners[0].port", "without quotes"),
    (lambda o: o["spec"]["listeners"][0].update(allowedRoutes={"namespaces": {"from": "Some"}}),
     "spec.listeners[0].allowedRoutes.namespaces.from", "Same"),
    (lambda o: o["spec"].update(addresses=[]), "spec.addresses", "not supported"),
    (lambda o: o["spec"].update(infrastructure={}), "spec.infrastructure", "not supported"),
    (lambda o: o["metadata"].update(labels={"istio.io/waypoint-for": "everything"}),
     "metadata.labels[istio.io/waypoint-for]", "service, workload, all, none"),
    (lambda o: o["metadata"].update(annotations={"meshlane.io/node": "Node 2"}),
     "metadata.annotations[meshlane.io/node]", "node name"),
    (lambda o: o.update(apiVersion="gateway.networking.k8s.io/v1alpha2"), "apiVersion", "v1beta1"),
])
def test_gateway_errors_name_the_field(mutate, path, words):
    obj = gateway()
    mutate(obj)
    fails(obj, f"f.yaml: {path}: ", words)


def test_waypoint_of_raises_bad_input_for_a_foreign_gateway():
    with pytest.raises(BadInputError, match="only waypoints"):
        P.waypoint_of({**gateway(), "spec": {"gatewayClassName": "nginx", "listeners": []}})


# --- HTTPRoute ---------------------------------------------------------------------------------


def test_route_minimal_defaults():
    norm, warns = ok(route())
    assert norm["spec"]["rules"] == [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                                      "backendRefs": []}]
    assert any("no backends" in w and "500" in w for w in warns)
    r = P.route_of(stored(route(), created="2024-05-05T00:00:00Z"))
    assert r.key == "demo/r" and r.created == "2024-05-05T00:00:00Z"
    assert r.parents == (l7.ParentRef(service="echo", port=80),)
    assert r.rules == (l7.RouteRule(index=0, matches=(l7.RouteMatch(),)),)
    assert r.fault is None and r.rate_limit is None and r.hostnames == ()
    assert P.route_of(ok(route())[0]).created == ""


def test_route_full_example_and_its_model():
    rules = [
        {"name": "api",
         "matches": [{"path": {"type": "Exact", "value": "/api/v1"},
                      "headers": [{"name": "x-user", "value": "alice"},
                                  {"type": "RegularExpression", "name": "x-id", "value": "^[0-9]+$"}],
                      "queryParams": [{"name": "debug", "value": "1"}], "method": "GET"},
                     {"path": {"type": "RegularExpression", "value": "^/v[0-9]+/.*"}}],
         "filters": [{"type": "RequestHeaderModifier",
                      "requestHeaderModifier": {"set": [{"name": "x-a", "value": "1"}],
                                                "add": [{"name": "x-b", "value": "2"}], "remove": ["x-c"]}},
                     {"type": "ResponseHeaderModifier",
                      "responseHeaderModifier": {"add": [{"name": "x-served-by", "value": "waypoint"}]}},
                     {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow", "port": 8080},
                                                                 "percent": 25}},
                     {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow2", "port": 80},
                                                                 "fraction": {"numerator": 1, "denominator": 8}}}],
         "backendRefs": [backend("echo-v1", weight=90), backend("echo-v2", weight=10)],
         "timeouts": {"request": "10s", "backendRequest": "2s"},
         "retry": {"codes": [503, 502], "attempts": 3, "backoff": "100ms"}},
        {"backendRefs": [backend("echo-v1")], "timeouts": {"request": "0s", "backendRequest": "0s"}},
    ]
    obj = route(rules, annotations={"fault.meshlane.io/abort-status": "503", "fault.meshlane.io/abort-percent": "12.5",
                                    "fault.meshlane.io/delay": "1.5s", "fault.meshlane.io/delay-percent": "50",
                                    "ratelimit.meshlane.io/requests": "10", "ratelimit.meshlane.io/per": "1m",
                                    "other.example.com/x": "free text"},
                hostnames=["echo.demo.svc.cluster.local", "*.example.com"])
    norm, warns = ok(obj)
    assert any("spec.hostnames: ignored" in w for w in warns)
    r = P.route_of(norm)
    assert r.hostnames == ("echo.demo.svc.cluster.local", "*.example.com")
    assert r.fault == l7.Fault(abort_status=503, abort_percent=12.5, delay_s=1.5, delay_percent=50.0)
    assert r.rate_limit == l7.RateLimit(requests=10, per_s=60.0)
    r0, r1 = r.rules
    assert r0.index == 0 and r1.index == 1
    assert r0.matches == (
        l7.RouteMatch(path_type="Exact", path="/api/v1", method="GET",
                      headers=(l7.StringMatch(type="Exact", name="x-user", value="alice"),
                               l7.StringMatch(type="RegularExpression", name="x-id", value="^[0-9]+$")),
                      query=(l7.StringMatch(type="Exact", name="debug", value="1"),)),
        l7.RouteMatch(path_type="RegularExpression", path="^/v[0-9]+/.*"))
    assert r0.backends == (l7.Backend(service="echo-v1", port=80, weight=90),
                           l7.Backend(service="echo-v2", port=80, weight=10))
    assert r0.request_headers == l7.HeaderMod(set=(("x-a", "1"),), add=(("x-b", "2"),), remove=("x-c",))
    assert r0.response_headers == l7.HeaderMod(add=(("x-served-by", "waypoint"),))
    assert r0.mirrors == (l7.Mirror(service="shadow", port=8080, percent=25.0),
                          l7.Mirror(service="shadow2", port=80, percent=12.5))
    assert (r0.timeout_s, r0.backend_timeout_s) == (10.0, 2.0)
    assert r0.retry == l7.Retry(attempts=3, codes=(503, 502), backoff_s=0.1)
    assert (r1.timeout_s, r1.backend_timeout_s, r1.retry) == (None, None, None)   # "0s": no timeout
    assert not r1.request_headers and not r1.response_headers
    # stored form parses to the same model and is stable
    assert ok(norm)[0] == norm
    assert P.route_of(norm) == r


def test_route_defaults_and_their_precedence():
    rules = [{"matches": [{"headers": [{"name": "x", "value": "y"}]}, {"path": {"value": "/p"}},
                          {"path": {"type": "Exact"}}],
              "backendRefs": [backend(weight=None), backend("echo2", weight=0), backend("echo3", weight=7)],
              "retry": {"codes": [503]}}]
    norm, _ = ok(route(rules))
    rule = norm["spec"]["rules"][0]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"},
                                "headers": [{"type": "Exact", "name": "x", "value": "y"}]},
                               {"path": {"type": "PathPrefix", "value": "/p"}},
                               {"path": {"type": "Exact", "value": "/"}}]
    assert [b["weight"] for b in rule["backendRefs"]] == [1, 0, 7]     # default 1; 0 stays 0
    m = P.route_of(norm).rules[0]
    assert m.retry == l7.Retry(attempts=P.DEFAULT_RETRY_ATTEMPTS, codes=(503,)) and P.DEFAULT_RETRY_ATTEMPTS == 2
    assert P.route_of(ok(route([{"retry": {"attempts": 0}}]))[0]).rules[0].retry == l7.Retry(attempts=0)
    assert P.route_of(ok(route([{"retry": {}}]))[0]).rules[0].retry == l7.Retry(attempts=2)
    # mirror: 100% unless percent or fraction; fraction's denominator defaults to 100
    mir = [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "s", "port": 80}}},
           {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "s", "port": 80},
                                                       "fraction": {"numerator": 5}}}]
    assert [x.percent for x in P.route_of(ok(route([{"filters": mir}]))[0]).rules[0].mirrors] == [100.0, 5.0]
    # fault and rate-limit defaults
    r = P.route_of(ok(route(annotations={"fault.meshlane.io/delay": "500ms", "ratelimit.meshlane.io/requests": "3"}))[0])
    assert r.fault == l7.Fault(delay_s=0.5) and r.fault.abort_status is None and r.fault.delay_percent == 100.0
    assert r.rate_limit == l7.RateLimit(requests=3, per_s=1.0)


def test_explicit_empty_matches_is_one_match_for_everything():
    r = P.route_of(ok(route([{"matches": [], "backendRefs": [backend()]}]))[0])
    assert r.rules[0].matches == (l7.RouteMatch(),)


@pytest.mark.parametrize("weight,words", [("90", "without quotes"), (1.5, "integers"), (90.0, "integers"),
                                          (True, "integers"), (-1, "out of range"), (1_000_001, "out of range"),
                                          ("ninety", "integers"), ([90], "integers")])
def test_weights_must_be_integers(weight, words):
    err = fails(route([{"backendRefs": [backend(weight=weight)]}]),
                "f.yaml: spec.rules[0].backendRefs[0].weight: ", "weights must be integers", words)
    assert "0-1000000" in str(err) or "out of range" in str(err)


def test_all_zero_weights_warn():
    _, warns = ok(route([{"backendRefs": [backend(weight=0)]}]))
    assert any("every weight is 0" in w for w in warns)


def test_backend_without_port_warns_gateway_api_requires_it():
    norm, warns = ok(route([{"backendRefs": [backend(port=None)]}]))
    assert any("spec.rules[0].backendRefs[0].port: no port" in w for w in warns)
    assert P.route_of(norm).rules[0].backends[0].port is None


GAMMA = "istio.io/use-waypoint"


@pytest.mark.parametrize("parents,path,words", [
    ([], "spec.parentRefs", "must not be empty"),
    (None, "spec.parentRefs", "required"),
    ([{"name": "echo"}], "spec.parentRefs[0].kind", "no kind means Gateway"),
    ([{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}], "spec.parentRefs[0].kind", GAMMA),
    ([{"kind": "Service", "name": "echo"}], "spec.parentRefs[0].group", 'group: ""'),
    ([{"group": "core", "kind": "Service", "name": "echo"}], "spec.parentRefs[0].group", "core group"),
    ([{"group": "", "kind": "ServiceEntry", "name": "echo"}], "spec.parentRefs[0].kind", "only Service parents"),
    ([{"group": "", "kind": "Service", "name": "Echo"}], "spec.parentRefs[0].name", "Service name"),
    ([{"group": "", "kind": "Service", "name": "echo", "namespace": "other"}], "spec.parentRefs[0].namespace",
     "own namespace"),
    ([{"group": "", "kind": "Service", "name": "echo", "sectionName": "http"}], "spec.parentRefs[0].sectionName",
     "use `port`"),
    ([{"group": "", "kind": "Service", "name": "echo", "port": "80"}], "spec.parentRefs[0].port", "without quotes"),
    ([{"group": "", "kind": "Service", "name": "echo", "prt": 80}], "spec.parentRefs[0].prt", "unknown field"),
    ([{"group": "", "kind": "Service", "name": "echo", "port": 80}] * 2, "spec.parentRefs[1]", "already a parent"),
    ([{"group": "", "kind": "Service", "name": "echo"}, {"group": "", "kind": "Service", "name": "echo", "port": 80}],
     "spec.parentRefs[1]", "once without a port"),
    ("echo", "spec.parentRefs", "expected a list"),
])
def test_parent_ref_errors(parents, path, words):
    obj = route()
    if parents is None:
        del obj["spec"]["parentRefs"]
    else:
        obj["spec"]["parentRefs"] = parents
    fails(obj, f"f.yaml: {path}: ", words)


def test_parent_ref_gateway_hint_explains_gamma():
    err = fails(route(parents=[{"kind": "Gateway", "name": "waypoint"}]))
    assert "use-waypoint" in err.hint and "kind: Service" in err.hint


def test_parent_refs_several_ports_and_same_namespace_ok():
    parents = [{"group": "", "kind": "Service", "name": "echo", "port": 80, "namespace": "demo"},
               {"group": "", "kind": "Service", "name": "echo", "port": 81},
               {"group": "", "kind": "Service", "name": "other"}]
    r = P.route_of(ok(route(parents=parents))[0])
    assert r.parents == (l7.ParentRef(service="echo", port=80), l7.ParentRef(service="echo", port=81),
                         l7.ParentRef(service="other"))


def _rule_err(rule, path, *words, **kw):
    fails(route([rule], **kw), f"f.yaml: spec.rules[0].{path}: ", *words)


@pytest.mark.parametrize("rule,path,words", [
    ({"matches": [{"path": {"type": "Prefix", "value": "/"}}]}, "matches[0].path.type", "PathPrefix, Exact"),
    ({"matches": [{"path": {"value": "api"}}]}, "matches[0].path.value", "start with '/'"),
    ({"matches": [{"path": {"type": "Exact", "value": "a"}}]}, "matches[0].path.value", "start with '/'"),
    ({"matches": [{"path": {"value": "/a//b"}}]}, "matches[0].path.value", "'//'"),
    ({"matches": [{"path": {"value": "/a/../b"}}]}, "matches[0].path.value", "'/../'"),
    ({"matches": [{"path": {"value": "/a%2fb"}}]}, "matches[0].path.value", "%2f"),
    ({"matches": [{"path": {"value": "/a#b"}}]}, "matches[0].path.value", "'#'"),
    ({"matches": [{"path": {"value": "/a/."}}]}, "matches[0].path.value", "end with"),
    ({"matches": [{"path": {"value": "/a b"}}]}, "matches[0].path.value", "URL path characters"),
    ({"matches": [{"path": {"value": 5}}]}, "matches[0].path.value", "expected a path"),
    ({"matches": [{"path": {"type": "RegularExpression", "value": "(/"}}]}, "matches[0].path.value",
     "not a valid regular expression"),
    ({"matches": [{"path": {"type": "RegularExpression", "value": "/(?=x)"}}]}, "matches[0].path.value", "RE2"),
    ({"matches": [{"path": {"type": "RegularExpression", "value": r"/(a)\1"}}]}, "matches[0].path.value", "backreference"),
    ({"matches": [{"path": {"value": "/", "kind": "x"}}]}, "matches[0].path.kind", "unknown field"),
    ({"matches": [{"method": "get"}]}, "matches[0].method", "upper case"),
    ({"matches": [{"method": "PURGE"}]}, "matches[0].method", "GET, HEAD"),
    ({"matches": [{"headers": [{"name": ":authority", "value": "x"}]}]}, "matches[0].headers[0].name", "pseudo-headers"),
    ({"matches": [{"headers": [{"name": "x y", "value": "x"}]}]}, "matches[0].headers[0].name", "header name"),
    ({"matches": [{"headers": [{"name": "x", "value": ""}]}]}, "matches[0].headers[0].value", "must not be empty"),
    ({"matches": [{"headers": [{"name": "x", "value": "a\nb"}]}]}, "matches[0].headers[0].value", "control characters"),
    ({"matches": [{"headers": [{"name": "x", "value": "1", "type": "Prefix"}]}]}, "matches[0].headers[0].type",
     "Exact, RegularExpression"),
    ({"matches": [{"headers": [{"name": "X", "value": "1"}, {"name": "x", "value": "2"}]}]},
     "matches[0].headers[1].name", "already matched"),
    ({"matches": [{"headers": [{"type": "RegularExpression", "name": "x", "value": "[a"}]}]},
     "matches[0].headers[0].value", "regular expression"),
    ({"matches": [{"queryParams": [{"name": "q"}]}]}, "matches[0].queryParams[0].value", "required"),
    ({"matches": [{"queryParams": {"name": "q"}}]}, "matches[0].queryParams", "expected a list"),
    ({"matches": [{"pth": {}}]}, "matches[0].pth", "unknown field"),
    ({"matches": ["/"]}, "matches[0]", "mapping"),
    ({"backendRefs": [{"port": 80}]}, "backendRefs[0].name", "required"),
    ({"backendRefs": [backend(namespace="other")]}, "backendRefs[0].namespace", "ReferenceGrant"),
    ({"backendRefs": [backend(kind="ServiceImport")]}, "backendRefs[0].kind", "only kind Service"),
    ({"backendRefs": [backend(group="core")]}, "backendRefs[0].group", 'group: ""'),
    ({"backendRefs": [backend(port=0)]}, "backendRefs[0].port", "out of range"),
    ({"backendRefs": [backend(filters=[{"type": "RequestHeaderModifier"}])]}, "backendRefs[0].filters",
     "per-backend filters"),
    ({"backendRefs": [backend(wieght=1)]}, "backendRefs[0].wieght", "unknown field"),
    ({"backendRefs": [backend()] * 17}, "backendRefs", "at most 16"),
    ({"filters": [{"type": "URLRewrite", "urlRewrite": {}}]}, "filters[0].type", "URLRewrite is not supported"),
    ({"filters": [{"type": "RequestRedirect", "requestRedirect": {}}]}, "filters[0].type", "RequestRedirect is not supported"),
    ({"filters": [{"type": "ExtensionRef", "extensionRef": {}}]}, "filters[0].type", "ExtensionRef is not supported"),
    ({"filters": [{"type": "CORS", "cors": {}}]}, "filters[0].type", "CORS is not supported"),
    ({"filters": [{"type": "Magic"}]}, "filters[0].type", "not a Gateway API filter type"),
    ({"filters": [{"requestHeaderModifier": {}}]}, "filters[0].type", "not a Gateway API filter type"),
    ({"filters": [{"type": "RequestHeaderModifier"}]}, "filters[0].requestHeaderModifier", "required"),
    ({"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {},
                   "responseHeaderModifier": {}}]}, "filters[0].responseHeaderModifier", "does not go with"),
    ({"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {}}] * 2}, "filters[1].type",
     "may appear once"),
    ({"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "Host", "value": "x"}]}}]},
     "filters[0].requestHeaderModifier.set[0].name", "Host header"),
    ({"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"remove": [":path"]}}]},
     "filters[0].requestHeaderModifier.remove[0]", "pseudo-headers"),
    ({"filters": [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {"add": [{"name": "a b", "value": "x"}]}}]},
     "filters[0].responseHeaderModifier.add[0].name", "header name"),
    ({"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
        "set": [{"name": "x-a", "value": "1"}], "remove": ["X-A"]}}]},
     "filters[0].requestHeaderModifier.remove[0]", "one action per header"),
    ({"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-a"}]}}]},
     "filters[0].requestHeaderModifier.set[0].value", "required"),
    ({"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"replace": []}}]},
     "filters[0].requestHeaderModifier.replace", "unknown field"),
    ({"filters": [{"type": "RequestMirror", "requestMirror": {"percent": 5}}]}, "filters[0].requestMirror.backendRef",
     "required"),
    ({"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "s", "namespace": "x"}}}]},
     "filters[0].requestMirror.backendRef.namespace", "own"),
    ({"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "s"}, "percent": 101}}]},
     "filters[0].requestMirror.percent", "out of range"),
    ({"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "s"}, "percent": 50,
                                                               "fraction": {"numerator": 1}}}]},
     "filters[0].requestMirror", "not both"),
    ({"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "s"},
                                                               "fraction": {"numerator": 3, "denominator": 2}}}]},
     "filters[0].requestMirror.fraction", "larger than"),
    ({"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "s"},
                                                               "fraction": {"numerator": 1, "denominator": 0}}}]},
     "filters[0].requestMirror.fraction.denominator", "out of range"),
    ({"timeouts": {"request": "1.5s"}}, "timeouts.request", "GEP-2257"),
    ({"timeouts": {"request": "10"}}, "timeouts.request", "GEP-2257"),
    ({"timeouts": {"request": "1d"}}, "timeouts.request", "GEP-2257"),
    ({"timeouts": {"request": 10}}, "timeouts.request", "duration string"),
    ({"timeouts": {"request": "1s", "backendRequest": "2s"}}, "timeouts.backendRequest", "longer than"),
    ({"timeouts": {"idle": "1s"}}, "timeouts.idle", "unknown field"),
    ({"retry": {"codes": [200]}}, "retry.codes[0]", "400-599"),
    ({"retry": {"codes": ["503"]}}, "retry.codes[0]", "without quotes"),
    ({"retry": {"codes": [503, 503]}}, "retry.codes[1]", "twice"),
    ({"retry": {"attempts": -1}}, "retry.attempts", "0-100"),
    ({"retry": {"attempts": 101}}, "retry.attempts", "0-100"),
    ({"retry": {"attempts": "3"}}, "retry.attempts", "without quotes"),
    ({"retry": {"backoff": "0s"}}, "retry.backoff", "at least 1ms"),
    ({"retry": {"backoff": "0.1s"}}, "retry.backoff", "GEP-2257"),
    ({"retry": {"perTryTimeout": "1s"}}, "retry.perTryTimeout", "unknown field"),
    ({"retry": 3}, "retry", "mapping"),
    ({"sessionPersistence": {}}, "sessionPersistence", "not supported by meshlane"),
    ({"name": "Rule_1"}, "name", "not a valid name"),
    ({"backendref": []}, "backendref", "unknown field"),
])
def test_rule_errors(rule, path, words):
    _rule_err(rule, path, words)


def test_backend_request_may_exceed_a_disabled_request_timeout():
    r = P.route_of(ok(route([{"timeouts": {"request": "0s", "backendRequest": "5s"}}]))[0])
    assert (r.rules[0].timeout_s, r.rules[0].backend_timeout_s) == (None, 5.0)


@pytest.mark.parametrize("spec_update,path,words", [
    ({"rules": []}, "spec.rules", "must not be empty"),
    ({"rules": {"x": 1}}, "spec.rules", "expected a list"),
    ({"rules": [{"name": "a"}, {"name": "a"}]}, "spec.rules[1].name", "already"),
    ({"rules": [{}] * 17}, "spec.rules", "at most 16"),
    ({"rules": [{"matches": [{}] * 64}, {"matches": [{}] * 64}, {"matches": [{}]}]}, "spec.rules", "at most 128"),
    ({"hostnames": ["10.0.0.1:80"]}, "spec.hostnames[0]", "not a hostname"),
    ({"hostnames": ["Echo"]}, "spec.hostnames[0]", "not a hostname"),
    ({"useDefaultGateways": "All"}, "spec.useDefaultGateways", "unknown field"),
])
def test_route_spec_errors(spec_update, path, words):
    obj = route()
    obj["spec"].update(spec_update)
    fails(obj, f"f.yaml: {path}: ", words)


@pytest.mark.parametrize("ann,path,words", [
    ({"fault.meshlane.io/abort": "503"}, "metadata.annotations[fault.meshlane.io/abort]", "unknown meshlane annotation"),
    ({"ratelimit.meshlane.io/rps": "5"}, "metadata.annotations[ratelimit.meshlane.io/rps]", "unknown meshlane annotation"),
    ({"fault.meshlane.io/abort-status": "600"}, "metadata.annotations[fault.meshlane.io/abort-status]", "200-599"),
    ({"fault.meshlane.io/abort-status": "abc"}, "metadata.annotations[fault.meshlane.io/abort-status]", "200-599"),
    ({"fault.meshlane.io/abort-status": 503}, "metadata.annotations[fault.meshlane.io/abort-status]", "quote it"),
    ({"fault.meshlane.io/abort-percent": "50"}, "metadata.annotations[fault.meshlane.io/abort-percent]",
     "needs fault.meshlane.io/abort-status"),
    ({"fault.meshlane.io/delay-percent": "50"}, "metadata.annotations[fault.meshlane.io/delay-percent]",
     "needs fault.meshlane.io/delay"),
    ({"fault.meshlane.io/abort-status": "503", "fault.meshlane.io/abort-percent": "101"},
     "metadata.annotations[fault.meshlane.io/abort-percent]", "0-100"),
    ({"fault.meshlane.io/abort-status": "503", "fault.meshlane.io/abort-percent": "-1"},
     "metadata.annotations[fault.meshlane.io/abort-percent]", "0-100"),
    ({"fault.meshlane.io/abort-status": "503", "fault.meshlane.io/abort-percent": "nan"},
     "metadata.annotations[fault.meshlane.io/abort-percent]", "0-100"),
    ({"fault.meshlane.io/delay": "soon"}, "metadata.annotations[fault.meshlane.io/delay]", "not a duration"),
    ({"fault.meshlane.io/delay": "0s"}, "metadata.annotations[fault.meshlane.io/delay]", "longer than 0"),
    ({"ratelimit.meshlane.io/requests": "0"}, "metadata.annotations[ratelimit.meshlane.io/requests]", "positive"),
    ({"ratelimit.meshlane.io/requests": "2.5"}, "metadata.annotations[ratelimit.meshlane.io/requests]", "positive"),
    ({"ratelimit.meshlane.io/per": "1s"}, "metadata.annotations[ratelimit.meshlane.io/per]",
     "needs ratelimit.meshlane.io/requests"),
    ({"ratelimit.meshlane.io/requests": "5", "ratelimit.meshlane.io/per": "0s"},
     "metadata.annotations[ratelimit.meshlane.io/per]", "longer than 0"),
])
def test_route_annotation_errors(ann, path, words):
    fails(route(annotations=ann), f"f.yaml: {path}: ", words)


def test_fault_delay_accepts_gateway_and_istio_forms():
    for text, secs in (("2s", 2.0), ("1.5s", 1.5), ("250ms", 0.25), ("1m", 60.0)):
        r = P.route_of(ok(route(annotations={"fault.meshlane.io/delay": text}))[0])
        assert r.fault.delay_s == secs


def test_route_annotation_percent_forms():
    r = P.route_of(ok(route(annotations={"fault.meshlane.io/abort-status": "200",
                                         "fault.meshlane.io/abort-percent": "0"}))[0])
    assert r.fault == l7.Fault(abort_status=200, abort_percent=0.0)


# --- DestinationRule ---------------------------------------------------------------------------


def test_destination_rule_minimal():
    norm, warns = ok(dr())
    assert warns == [] and norm["spec"] == {"host": "echo"}
    assert P.destination_rule_of(norm) == l7.DestinationRule(namespace="demo", name="cb", service="echo")


def test_destination_rule_full():
    tp = {"connectionPool": {"tcp": {"maxConnections": 10, "connectTimeout": "250ms"},
                             "http": {"http1MaxPendingRequests": 1, "http2MaxRequests": 100,
                                      "maxRequestsPerConnection": 5, "maxRetries": 3}},
          "outlierDetection": {"consecutive5xxErrors": 2, "consecutiveGatewayErrors": 1, "interval": "1s",
                               "baseEjectionTime": "1m", "maxEjectionPercent": 100}}
    for api in P.DESTINATION_RULE_API:
        norm, warns = ok(dr("echo.demo.svc.cluster.local", api=api, trafficPolicy=tp))
        assert any("connectTimeout" in w and "not applied" in w for w in warns)
        assert P.destination_rule_of(norm) == l7.DestinationRule(
            namespace="demo", name="cb", service="echo", max_connections=10, max_pending_requests=1,
            max_requests=100, max_retries=3, max_requests_per_connection=5,
            outlier=l7.Outlier(consecutive_5xx=2, consecutive_gateway_errors=1, interval_s=1.0,
                               base_ejection_s=60.0, max_ejection_percent=100))


def test_destination_rule_defaults_follow_istiod():
    tp = {"connectionPool": {"tcp": {"maxConnections": 0}, "http": {"http2MaxRequests": 0}},
          "outlierDetection": {"consecutive5xxErrors": 0, "maxEjectionPercent": 0}}
    d = P.destination_rule_of(ok(dr(trafficPolicy=tp))[0])
    assert d.max_connections is None and d.max_requests is None          # 0 means unset
    assert d.outlier == l7.Outlier(consecutive_5xx=0)                    # 0 disables; 10% default kept
    assert d.outlier.interval_s == 10.0 and d.outlier.base_ejection_s == 30.0
    assert P.destination_rule_of(ok(dr(trafficPolicy={"outlierDetection": {}}))[0]).outlier == l7.Outlier()


@pytest.mark.parametrize("host", ["echo.demo", "echo.demo.svc"])
def test_destination_rule_short_hosts_warn_that_istio_reads_them_as_fqdn(host):
    norm, warns = ok(dr(host))
    assert P.destination_rule_of(norm).service == "echo"
    assert len(warns) == 1 and "spec.host" in warns[0] and "full name" in warns[0]


@pytest.mark.parametrize("mutate,path,words", [
    (lambda o: o["spec"].update(host="echo.other.svc.cluster.local"), "spec.host", "namespace other"),
    (lambda o: o["spec"].update(host="echo.other"), "spec.host", "namespace other"),
    (lambda o: o["spec"].update(host="*.demo.svc.cluster.local"), "spec.host", "wildcard"),
    (lambda o: o["spec"].update(host="echo.demo.svc.cluster"), "spec.host", "not a Service of this namespace"),
    (lambda o: o["spec"].update(host="www.example.com"), "spec.host", "not a Service of this namespace"),
    (lambda o: o["spec"].update(host="Echo"), "spec.host", "not a Service"),
    (lambda o: o["spec"].pop("host"), "spec.host", "required"),
    (lambda o: o["spec"].update(host=3), "spec.host", "expected"),
    (lambda o: o["spec"].update(subsets=[]), "spec.subsets", "not supported by meshlane"),
    (lambda o: o["spec"].update(exportTo=["."]), "spec.exportTo", "not supported by meshlane"),
    (lambda o: o["spec"].update(workloadSelector={}), "spec.workloadSelector", "not supported by meshlane"),
    (lambda o: o["spec"].update(trafficPolicy={"loadBalancer": {"simple": "ROUND_ROBIN"}}),
     "spec.trafficPolicy.loadBalancer", "not supported by meshlane"),
    (lambda o: o["spec"].update(trafficPolicy={"tls": {}}), "spec.trafficPolicy.tls", "not supported by meshlane"),
    (lambda o: o["spec"].update(trafficPolicy={"portLevelSettings": []}), "spec.trafficPolicy.portLevelSettings",
     "not supported by meshlane"),
    (lambda o: o["spec"].update(trafficPolicy={"connectionPool": {}}), "spec.trafficPolicy.connectionPool",
     "tcp or http"),
    (lambda o: o["spec"].update(trafficPolicy={"connectionPool": {"tcp": {"maxConnections": -1}}}),
     "spec.trafficPolicy.connectionPool.tcp.maxConnections", "out of range"),
    (lambda o: o["spec"].update(trafficPolicy={"connectionPool": {"tcp": {"maxConnections": "10"}}}),
     "spec.trafficPolicy.connectionPool.tcp.maxConnections", "without quotes"),
    (lambda o: o["spec"].update(trafficPolicy={"connectionPool": {"tcp": {"connectTimeout": "0.5ms"}}}),
     "spec.trafficPolicy.connectionPool.tcp.connectTimeout", "at least 1ms"),
    (lambda o: o["spec"].update(trafficPolicy={"connectionPool": {"tcp": {"tcpKeepalive": {}}}}),
     "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive", "not supported by meshlane"),
    (lambda o: o["spec"].update(trafficPolicy={"connectionPool": {"http": {"h2UpgradePolicy": "UPGRADE"}}}),
     "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy", "not supported by meshlane"),
    (lambda o: o["spec"].update(trafficPolicy={"connectionPool": {"http": {"maxRetries": 1.5}}}),
     "spec.trafficPolicy.connectionPool.http.maxRetries", "no fractions"),
    (lambda o: o["spec"].update(trafficPolicy={"connectionPool": {"http": {"maxRetrys": 1}}}),
     "spec.trafficPolicy.connectionPool.http.maxRetrys", "unknown field"),
    (lambda o: o["spec"].update(trafficPolicy={"outlierDetection": {"maxEjectionPercent": 101}}),
     "spec.trafficPolicy.outlierDetection.maxEjectionPercent", "0-100"),
    (lambda o: o["spec"].update(trafficPolicy={"outlierDetection": {"interval": "10"}}),
     "spec.trafficPolicy.outlierDetection.interval", "not a duration"),
    (lambda o: o["spec"].update(trafficPolicy={"outlierDetection": {"interval": "1.0005s"}}),
     "spec.trafficPolicy.outlierDetection.interval", "whole milliseconds"),
    (lambda o: o["spec"].update(trafficPolicy={"outlierDetection": {"baseEjectionTime": "0s"}}),
     "spec.trafficPolicy.outlierDetection.baseEjectionTime", "at least 1ms"),
    (lambda o: o["spec"].update(trafficPolicy={"outlierDetection": {"consecutiveErrors": 5}}),
     "spec.trafficPolicy.outlierDetection.consecutiveErrors", "consecutive5xxErrors"),
    (lambda o: o["spec"].update(trafficPolicy={"outlierDetection": {"minHealthPercent": 5}}),
     "spec.trafficPolicy.outlierDetection.minHealthPercent", "not supported by meshlane"),
    (lambda o: o["spec"].update(trafficPolicy={"outlierDetection": {"consecutive5xxErrors": -1}}),
     "spec.trafficPolicy.outlierDetection.consecutive5xxErrors", "out of range"),
    (lambda o: o.update(apiVersion="networking.istio.io/v2"), "apiVersion", "networking.istio.io/v1"),
])
def test_destination_rule_errors(mutate, path, words):
    obj = dr()
    mutate(obj)
    fails(obj, f"f.yaml: {path}: ", words)


# --- AuthorizationPolicy at the waypoint -------------------------------------------------------


def test_l7_policy_conversion():
    pol = to_svc({"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client", "*-admin"],
                                       "notNamespaces": ["kube-system"], "ipBlocks": ["10.0.0.7"],
                                       "remoteIpBlocks": ["192.168.1.0/24"], "notIpBlocks": ["10.0.0.9/32"],
                                       "notRemoteIpBlocks": ["172.16.5.5/16"]}},
                           {"source": {"serviceAccounts": ["client", "other/bot"], "notServiceAccounts": ["x/y"]}}],
                  "to": [{"operation": {"methods": ["GET", "HEAD"], "paths": ["/api/*", "*.png", "*"],
                                        "notPaths": ["/admin"], "hosts": ["echo.demo"], "ports": ["8080"],
                                        "notPorts": ["9090"], "notMethods": ["DELETE"], "notHosts": ["x"]}}],
                  "when": [{"key": "request.headers[x-token]", "values": ["secret"]},
                           {"key": "source.ip", "notValues": ["10.1.2.3"]},
                           {"key": "remote.ip", "values": ["10.2.0.0/16"]},
                           {"key": "source.namespace", "values": ["demo"]},
                           {"key": "source.principal", "values": ["*"]},
                           {"key": "destination.port", "values": ["80"]},
                           {"key": "source.serviceAccount", "values": ["client"]}]},
                 {})
    assert P.check_l7_policy(pol, src="p.yaml") == []
    p = P.l7_policy_of(pol)
    assert p.key == "demo/p" and p.action == "ALLOW" and p.targets == (("Service", "echo"),)
    r0, r1 = p.rules
    assert r1 == l7.L7Rule()                                  # `{}` matches everything
    assert r0.sources == (
        l7.L7Source(principals=("cluster.local/ns/demo/sa/client", "*-admin"), not_namespaces=("kube-system",),
                    ip_blocks=("10.0.0.7/32", "192.168.1.0/24"), not_ip_blocks=("10.0.0.9/32", "172.16.0.0/16")),
        l7.L7Source(principals=("cluster.local/ns/demo/sa/client", "cluster.local/ns/other/sa/bot"),
                    not_principals=("cluster.local/ns/x/sa/y",)))
    assert r0.operations == (l7.L7Operation(methods=("GET", "HEAD"), not_methods=("DELETE",),
                                            paths=("/api/*", "*.png", "*"), not_paths=("/admin",),
                                            hosts=("echo.demo",), not_hosts=("x",), ports=(8080,),
                                            not_ports=(9090,)),)
    assert r0.conditions == (
        l7.L7Condition(key="request.headers[x-token]", values=("secret",)),
        l7.L7Condition(key="source.ip", not_values=("10.1.2.3/32",)),
        l7.L7Condition(key="remote.ip", values=("10.2.0.0/16",)),
        l7.L7Condition(key="source.namespace", values=("demo",)),
        l7.L7Condition(key="source.principal", values=("*",)),
        l7.L7Condition(key="destination.port", values=("80",)),
        l7.L7Condition(key="source.principal", values=("cluster.local/ns/demo/sa/client",)))


def test_service_accounts_use_the_given_trust_domain():
    pol = to_svc({"from": [{"source": {"serviceAccounts": ["client"]}}]})
    assert P.l7_policy_of(pol, trust_domain="example.org").rules[0].sources[0].principals == \
        ("example.org/ns/demo/sa/client",)


def test_allow_rule_with_request_principals_is_dropped_and_warned():
    pol = to_svc({"from": [{"source": {"requestPrincipals": ["*"], "principals": ["a/ns/b/sa/c"]}}]},
                 {"to": [{"operation": {"methods": ["GET"]}}]})
    warns = P.check_l7_policy(pol, src="p.yaml")
    assert len(warns) == 1
    assert warns[0].startswith("p.yaml: AuthorizationPolicy demo/p: rule 0 dropped")
    assert "spec.rules[0].from[0].source.requestPrincipals" in warns[0] and "narrower" in warns[0]
    p = P.l7_policy_of(pol)
    assert p.rules == (l7.L7Rule(operations=(l7.L7Operation(methods=("GET",)),)),)


def test_deny_keeps_the_rule_without_the_field():
    pol = to_svc({"from": [{"source": {"notRequestPrincipals": ["*"], "namespaces": ["other"]}}],
                  "to": [{"operation": {"paths": ["/admin*"]}}],
                  "when": [{"key": "request.auth.claims[group]", "values": ["guest"]},
                           {"key": "request.headers[x-a]", "values": ["1"]}]}, action="DENY")
    warns = P.check_l7_policy(pol, src="p.yaml")
    assert len(warns) == 1 and "broader" in warns[0]
    assert "spec.rules[0].when[0] (key request.auth.claims[group])" in warns[0]
    (rule,) = P.l7_policy_of(pol).rules
    assert rule.sources == (l7.L7Source(namespaces=("other",)),)
    assert rule.conditions == (l7.L7Condition(key="request.headers[x-a]", values=("1",)),)
    assert rule.operations == (l7.L7Operation(paths=("/admin*",)),)


def test_deny_entry_left_empty_matches_any_source():
    pol = to_svc({"from": [{"source": {"principals": ["a/ns/b/sa/c"]}}, {"source": {"trustDomains": ["td"]}}],
                  "to": [{"operation": {"methods": ["DELETE"]}}]}, action="DENY")
    assert "trustDomains" in P.check_l7_policy(pol, src="p.yaml")[0]
    (rule,) = P.l7_policy_of(pol).rules
    assert rule.sources == () and rule.operations == (l7.L7Operation(methods=("DELETE",)),)


@pytest.mark.parametrize("key", ["request.auth.principal", "request.auth.audiences", "request.auth.presenter",
                                 "request.auth.claims[iss]", "source.trustDomain", "destination.ip",
                                 "connection.sni", "experimental.envoy.filters.a.b[c]"])
def test_unenforceable_when_keys(key):
    value = "10.0.0.1" if key == "destination.ip" else "x"
    allow = to_svc({"when": [{"key": key, "values": [value]}]})
    assert P.check_l7_policy(allow, src="p.yaml") and P.l7_policy_of(allow).rules == ()
    deny = to_svc({"when": [{"key": key, "values": [value]}]}, action="DENY")
    assert P.l7_policy_of(deny).rules == (l7.L7Rule(),)


def test_allow_without_rules_allows_nothing_and_targets():
    pol = policy({"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"},
                                 {"kind": "Service", "name": "echo"}, {"kind": "Service", "group": "core", "name": "e2"},
                                 {"kind": "Service", "name": "echo"}]})
    p = P.l7_policy_of(pol)
    assert p.rules == () and p.targets == (("Gateway", "waypoint"), ("Service", "echo"), ("Service", "e2"))
    single = policy({"targetRef": {"kind": "Service", "group": "", "name": "echo"}, "rules": [{}]})
    assert P.l7_policy_of(single).targets == (("Service", "echo"),)
    assert P.l7_policy_of(single).rules == (l7.L7Rule(),)


def test_policies_the_waypoint_ignores():
    assert P.l7_policy_of(policy({"selector": {"matchLabels": {"app": "x"}}, "rules": [{}]})) is None
    assert P.l7_policy_of(policy({"rules": [{}]})) is None
    assert P.check_l7_policy(policy({"rules": [{}]}), src="p.yaml") == []
    for action in ("AUDIT", "CUSTOM"):
        spec = {"targetRefs": [{"kind": "Service", "name": "echo"}], "action": action, "rules": [{}]}
        if action == "CUSTOM":
            spec["provider"] = {"name": "ext"}
        assert P.l7_policy_of(policy(spec)) is None
        assert any(action in w for w in P.check_l7_policy(policy(spec), src="p.yaml"))
    dry = policy({"targetRefs": [{"kind": "Service", "name": "echo"}], "action": "DENY", "rules": [{}]},
                 annotations={"istio.io/dry-run": "true"})
    assert P.l7_policy_of(dry) is None
    assert any("dry-run" in w for w in P.check_l7_policy(dry, src="p.yaml"))


@pytest.mark.parametrize("spec,path,words", [
    ({"targetRefs": [{"kind": "GatewayClass", "group": "gateway.networking.k8s.io", "name": "istio-waypoint"}]},
     "spec.targetRefs[0].kind", "Gateway"),
    ({"targetRefs": [{"kind": "ServiceEntry", "group": "networking.istio.io", "name": "x"}]},
     "spec.targetRefs[0].kind", "Service"),
    ({"targetRefs": [{"kind": "Gateway", "name": "waypoint"}]}, "spec.targetRefs[0].group",
     "gateway.networking.k8s.io"),
    ({"targetRefs": [{"kind": "Service", "group": "apps", "name": "echo"}]}, "spec.targetRefs[0].group", "core group"),
    ({"targetRefs": [{"kind": "Service", "name": "echo", "namespace": "other"}]}, "spec.targetRefs[0].namespace",
     "must not be set"),
    ({"targetRefs": [{"kind": "Service", "name": "Echo"}]}, "spec.targetRefs[0].name", "not a valid name"),
    ({"targetRef": {"kind": "Pod", "name": "x"}}, "spec.targetRef.kind", "Gateway"),
    ({"targetRefs": [{"kind": "Service", "name": "echo"}], "rules": [{"to": [{"operation": {"methods": ["get"]}}]}]},
     "spec.rules[0].to[0].operation.methods[0]", "upper case"),
    ({"targetRefs": [{"kind": "Service", "name": "echo"}], "rules": [{"to": [{"operation": {"notMethods": ["G E"]}}]}]},
     "spec.rules[0].to[0].operation.notMethods[0]", "HTTP method"),
    ({"targetRefs": [{"kind": "Service", "name": "echo"}], "rules": [{"to": [{"operation": {"paths": ["api/*"]}}]}]},
     "spec.rules[0].to[0].operation.paths[0]", "starts with '/'"),
    ({"targetRefs": [{"kind": "Service", "name": "echo"}], "rules": [{"to": [{"operation": {"notPaths": ["/{*}/x"]}}]}]},
     "spec.rules[0].to[0].operation.notPaths[0]", "templates"),
    ({"targetRefs": [{"kind": "Service", "name": "echo"}], "rules": [{"when": [{"key": "remote.ip", "values": ["x"]}]}]},
     "spec.rules[0].when[0].values[0]", "bad IP"),
    ({"targetRefs": [{"kind": "Service", "name": "echo"}],
      "rules": [{"when": [{"key": "request.headers[a b]", "values": ["x"]}]}]}, "spec.rules[0].when[0].key", "header name"),
    ({"targetRefs": [{"kind": "Service", "name": "echo"}],
      "rules": [{"when": [{"key": "source.serviceAccount", "values": ["a/b/c"]}]}]},
     "spec.rules[0].when[0].values[0]", "namespace/serviceAccount"),
    ({"targetRefs": [{"kind": "Service", "name": "echo"}], "rules": [{"when": [{"key": "request.method",
                                                                                  "values": ["GET"]}]}]},
     "spec.rules[0].when[0].key", "unknown attribute"),
])
def test_check_l7_policy_errors(spec, path, words):
    with pytest.raises(BadInputError) as ei:
        P.check_l7_policy(policy(spec), src="p.yaml", prefix="docs[1].")
    msg = str(ei.value)
    assert f"p.yaml: docs[1].{path}: " in msg and words in msg, msg


def test_check_l7_policy_runs_authz_validation_too():
    with pytest.raises(BadInputError, match=r"spec.rules\[0\].from\[0\].source.ipBlocks\[0\]"):
        P.check_l7_policy(to_svc({"from": [{"source": {"ipBlocks": ["nope"]}}]}), src="p.yaml")
    with pytest.raises(BadInputError):
        P.l7_policy_of({"kind": "AuthorizationPolicy"})


# --- check_refs ----------------------------------------------------------------------------------


def world_of(*objs) -> list[dict]:
    return [stored(o) if o.get("kind") != "Namespace" else o for o in objs]


NS_WP = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo", "labels": {GAMMA: "waypoint"}}}


def refs(new: list[dict], *others: dict) -> list[str]:
    new_norm = [stored(o) for o in new]
    return P.check_refs(new_norm, world_of(*others) + new_norm, src="r.yaml")


def refs_fail(new: list[dict], *others: dict) -> BadInputError:
    with pytest.raises(BadInputError) as ei:
        refs(new, *others)
    return ei.value


def test_check_refs_accepts_a_good_route_without_warnings():
    r = route([{"backendRefs": [backend("v1"), backend("v2", port=8080)]}])
    assert refs([r], NS_WP, gateway(), svc("echo"), svc("v1"),
                svc("v2", ports=[{"name": "alt", "port": 8080}])) == []


def test_check_refs_missing_parent():
    err = refs_fail([route(parents=[{"group": "", "kind": "Service", "name": "nosuch", "port": 80}])], svc("echo"))
    msg = str(err)
    assert msg.startswith("r.yaml: HTTPRoute demo/r: spec.parentRefs[0].name: ") and "Service demo/nosuch" in msg
    assert "meshlane get services -n demo" in err.hint and err.exit_code == 65


def test_check_refs_parent_port_missing():
    err = refs_fail([route(parents=[{"group": "", "kind": "Service", "name": "echo", "port": 81}])], svc("echo"))
    assert "HTTPRoute demo/r: spec.parentRefs[0].port: " in str(err) and "no port 81 (it has 80)" in str(err)


def test_check_refs_missing_backend_and_backend_port():
    err = refs_fail([route([{"backendRefs": [backend("echo"), backend("gone")]}])], svc("echo"))
    assert "spec.rules[0].backendRefs[1].name: Service demo/gone does not exist" in str(err)
    err = refs_fail([route([{}, {"backendRefs": [backend("echo", port=90)]}])], svc("echo"))
    assert "spec.rules[1].backendRefs[0].port: Service demo/echo has no port 90" in str(err)


def test_check_refs_mirror_backends():
    mirror = {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow", "port": 80}}}
    hdr = {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "a", "value": "b"}]}}
    err = refs_fail([route([{"filters": [hdr, mirror], "backendRefs": [backend()]}])], svc("echo"))
    assert "spec.rules[0].filters[1].requestMirror.backendRef.name: Service demo/shadow does not exist" in str(err)
    bad_port = copy.deepcopy(mirror)
    bad_port["requestMirror"]["backendRef"]["port"] = 81
    err = refs_fail([route([{"filters": [bad_port]}])], svc("echo"), svc("shadow"))
    assert "spec.rules[0].filters[0].requestMirror.backendRef.port: Service demo/shadow has no port 81" in str(err)


def test_check_refs_backend_without_port_needs_the_parent_ports():
    two = [{"name": "http", "port": 80}, {"name": "alt", "port": 81}]
    only80 = svc("v1")
    # parent port 80, backend has 80: fine
    refs([route([{"backendRefs": [backend("v1", port=None)]}])], svc("echo", ports=two), only80)
    # parent without a port: every port of the parent Service must exist on the backend
    portless = [{"group": "", "kind": "Service", "name": "echo"}]
    err = refs_fail([route([{"backendRefs": [backend("v1", port=None)]}], parents=portless)],
                    svc("echo", ports=two), only80)
    assert "spec.rules[0].backendRefs[0].port: " in str(err) and "no port 81" in str(err)
    assert "explicit port" in err.hint
    refs([route([{"backendRefs": [backend("v1", port=None)]}], parents=portless)],
         svc("echo", ports=two), svc("v1", ports=two))
    # mirrors follow the same rule
    mirror = {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "v1"}}}
    err = refs_fail([route([{"filters": [mirror]}], parents=portless)], svc("echo", ports=two), only80)
    assert "spec.rules[0].filters[0].requestMirror.backendRef.port" in str(err)


def test_check_refs_a_service_and_its_route_in_one_apply_and_doc_prefix():
    new = [stored(svc("v9")), stored(route([{"backendRefs": [backend("v9")]}]))]
    P.check_refs(new, world_of(svc("echo")) + new, src="r.yaml")
    bad = [stored(svc("v9")), stored(route([{"backendRefs": [backend("nope")]}]))]
    with pytest.raises(BadInputError, match=r"^r\.yaml: docs\[1\]: HTTPRoute demo/r: spec\.rules\[0\]"
                                            r"\.backendRefs\[0\]\.name: Service demo/nope"):
        P.check_refs(bad, world_of(svc("echo")) + bad, src="r.yaml")


def test_check_refs_routes_only_see_their_own_namespace():
    err = refs_fail([route(ns="other")], svc("echo"))
    assert "Service other/echo does not exist" in str(err)


def test_check_refs_waypoint_warnings():
    warns = refs([route()], svc("echo"))
    assert len(warns) == 1 and "does not use a waypoint" in warns[0] and warns[0].startswith("r.yaml: HTTPRoute demo/r:")
    warns = refs([route()], svc("echo", labels={GAMMA: "wp"}))
    assert len(warns) == 1 and "waypoint demo/wp, which does not exist" in warns[0]
    assert refs([route()], svc("echo", labels={GAMMA: "wp"}), gateway("wp")) == []
    assert refs([route()], NS_WP, gateway(), svc("echo")) == []
    warns = refs([route()], NS_WP, gateway(), svc("echo", labels={GAMMA: "none"}))
    assert "does not use a waypoint" in warns[0]


def test_check_refs_warns_for_destination_rules_and_policy_targets():
    warns = P.check_refs([stored(dr("gone"))], world_of(dr("gone")), src="d.yaml")
    assert warns == [("d.yaml: DestinationRule demo/cb: spec.host: Service demo/gone does not exist (yet); "
                      "the rule applies once it does")]
    assert P.check_refs([stored(dr())], world_of(svc("echo"), dr()), src="d.yaml") == []
    pol = policy({"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"},
                                 {"kind": "Service", "name": "echo"}], "rules": [{}]})
    warns = P.check_refs([pol], [pol], src="p.yaml")
    assert len(warns) == 2 and "Gateway demo/waypoint" in warns[0] and "Service demo/echo" in warns[1]
    assert P.check_refs([pol], [pol] + world_of(gateway(), svc("echo")), src="p.yaml") == []


def test_check_refs_warns_when_an_apply_breaks_a_stored_route():
    old_route = stored(route([{"backendRefs": [backend("v1", port=8080)]}]))
    v1 = stored(svc("v1"))                      # port 80 only: the stored route wants 8080
    warns = P.check_refs([v1], world_of(NS_WP, gateway(), svc("echo")) + [old_route, v1], src="s.yaml")
    assert len(warns) == 1 and "HTTPRoute demo/r (stored)" in warns[0] and "no port 8080" in warns[0]
    # an unrelated apply says nothing about it
    assert P.check_refs([stored(svc("x"))], world_of(svc("echo"), svc("x")) + [old_route], src="s.yaml") == []


def test_check_refs_tolerates_garbage_in_the_world():
    world = [None, 5, {"kind": "Service"}, {"kind": "Service", "metadata": {"name": ["x"]}},
             {"kind": "Service", "metadata": {"name": "echo", "namespace": "demo"}, "spec": "broken"},
             {"kind": "Namespace", "metadata": {"name": "demo", "labels": {GAMMA: ["x"]}}},
             {"kind": "HTTPRoute", "metadata": {"name": "junk", "namespace": "demo"}, "spec": 5}]
    new = [stored(route([{"backendRefs": [backend("echo", port=1234)]}]))]
    # the broken Service exists (its ports are unknown, so no port errors)
    warns = P.check_refs(new, world + new + [stored(svc("x"))], src="r.yaml")
    assert all(isinstance(w, str) for w in warns)
    assert P.check_refs([None, {"kind": "Service"}], [], src="r.yaml") == []
    assert P.check_refs("nope", "nope", src="r.yaml") == []


# --- wrong types everywhere ----------------------------------------------------------------------

ODD = [None, 0, -1, 1.5, True, "", "x", "/", [], [None], [{}], {}, {"x": None}, {"name": ["x"]}, ["x", 1],
       float("nan"), 10**30, {"type": ["x"]}]


def _mutations(obj, path=()):
    """Every (path, container) in a nested structure."""
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _mutations(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _mutations(v, path + (i,))


def _set(obj, path, value):
    obj = copy.deepcopy(obj)
    if not path:
        return value
    cur = obj
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = value
    return obj


FULL_ROUTE = route([{"name": "a", "matches": [{"path": {"type": "Exact", "value": "/x"}, "method": "GET",
                                                "headers": [{"name": "h", "value": "v"}],
                                                "queryParams": [{"type": "RegularExpression", "name": "q", "value": "v"}]}],
                     "filters": [{"type": "RequestHeaderModifier",
                                  "requestHeaderModifier": {"set": [{"name": "a", "value": "b"}], "remove": ["c"]}},
                                 {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "s", "port": 80},
                                                                             "fraction": {"numerator": 1}}}],
                     "backendRefs": [backend(weight=3)], "timeouts": {"request": "1s"},
                     "retry": {"codes": [503], "attempts": 1, "backoff": "5ms"}}],
                   annotations={"fault.meshlane.io/abort-status": "503", "ratelimit.meshlane.io/requests": "1"},
                   hostnames=["a.b"])
FULL_DR = dr(trafficPolicy={"connectionPool": {"tcp": {"maxConnections": 1, "connectTimeout": "1s"},
                                               "http": {"maxRetries": 1}},
                            "outlierDetection": {"interval": "1s", "maxEjectionPercent": 5}})
FULL_SVC = svc(ports=[{"name": "a", "port": 80, "targetPort": 81, "protocol": "TCP", "appProtocol": "http"}],
               clusterIP="10.96.0.20", labels={"a": "b"})
FULL_GW = gateway(labels={"istio.io/waypoint-for": "all"}, annotations={"meshlane.io/node": "n1"})


@pytest.mark.parametrize("base", [FULL_ROUTE, FULL_DR, FULL_SVC, FULL_GW], ids=["route", "dr", "svc", "gw"])
def test_wrong_types_anywhere_give_bad_input_only(base):
    ok(base)
    rng = random.Random(1234)
    for path in list(_mutations(base)):
        for value in rng.sample(ODD, 6):
            obj = _set(base, path, value)
            try:
                norm, _ = P.validate(obj, src="fuzz.yaml")
            except BadInputError as exc:
                assert str(exc).startswith("fuzz.yaml: ")
                continue
            # accepted: the stored form must parse again, to the same thing
            assert P.validate(norm, src="fuzz.yaml")[0] == norm
            kind = norm["kind"]
            if kind == "Service":
                norm["spec"].setdefault("clusterIP", "10.96.0.99")
            reader = {"Service": P.service_of, "Gateway": P.waypoint_of, "HTTPRoute": P.route_of,
                      "DestinationRule": P.destination_rule_of}[kind]
            reader(norm)


FULL_POLICY = to_svc({"from": [{"source": {"principals": ["a"], "ipBlocks": ["10.0.0.0/8"],
                                           "requestPrincipals": ["*"]}}],
                      "to": [{"operation": {"methods": ["GET"], "paths": ["/x"], "ports": ["80"]}}],
                      "when": [{"key": "request.headers[x]", "values": ["y"]},
                               {"key": "source.serviceAccount", "notValues": ["sa"]}]}, action="DENY")


def test_wrong_types_in_policies_give_bad_input_only():
    rng = random.Random(99)
    for path in list(_mutations(FULL_POLICY)):
        for value in rng.sample(ODD, 6) + ["²"]:
            obj = _set(FULL_POLICY, path, value)
            for call in (P.check_l7_policy, P.l7_policy_of):
                try:
                    call(obj, **({"src": "fuzz.yaml"} if call is P.check_l7_policy else {}))
                except BadInputError:
                    pass
            try:
                P.check_refs([obj], [obj], src="fuzz.yaml")
            except BadInputError:
                pass


@pytest.mark.parametrize("fn", [P.service_of, P.waypoint_of, P.route_of, P.destination_rule_of])
@pytest.mark.parametrize("obj", [None, 5, "x", {}, {"kind": "Service"}, {"kind": "HTTPRoute", "metadata": {}},
                                 {"kind": "Gateway", "metadata": {"name": "x"}, "spec": None}])
def test_readers_raise_bad_input_for_garbage(fn, obj):
    with pytest.raises(BadInputError):
        fn(obj)
