"""The lab's topology: which nodes, pods and namespaces to build.

Loaded from YAML (`meshlane lab up --topology FILE`) or the built-in default, and
validated on construction: every error names the file, the field path and what to fix.
No I/O beyond reading the file.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from meshcore import constants as C
from meshcore import l7parse
from meshcore.errors import BadInputError, NotFoundError

MAX_PODS_PER_NODE = 240
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")


@dataclass(frozen=True, kw_only=True)
class NodeSpec:
    name: str
    index: int
    fastpath: bool = True   # the node-wide switch of the same-node kernel fast path

    @property
    def pod_cidr(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.244.{self.index}.0/24")

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.pod_cidr.network_address + 1

    @property
    def underlay_ip(self) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(f"10.250.0.{self.index}")


@dataclass(frozen=True, kw_only=True)
class PodSpec:
    name: str
    node: str
    namespace: str
    service_account: str
    app: str            # "http" (answers with the peer it saw) or "none"
    labels: dict = field(default_factory=dict)
    ports: tuple[int, ...] = (8080,)   # where the http app listens
    annotations: dict = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Topology:
    nodes: tuple[NodeSpec, ...]
    pods: tuple[PodSpec, ...]
    namespaces: dict[str, dict]   # name -> labels
    services: tuple[dict, ...] = ()   # Service objects, validated, applied at `lab up`

    def node(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        raise NotFoundError(f"no node {name!r} in the topology")


DEFAULT_YAML = """
nodes: [node1, node2]
namespaces:
  demo: {labels: {"istio.io/dataplane-mode": ambient}}
  legacy: {labels: {}}
pods:
  - {name: client-1, node: node1, namespace: demo, serviceAccount: client, app: none}
  - {name: server-1, node: node1, namespace: demo, serviceAccount: server, app: http, labels: {app: server}}
  - {name: server-2, node: node2, namespace: demo, serviceAccount: server, app: http, labels: {app: server}}
  - {name: legacy-2, node: node2, namespace: legacy, serviceAccount: default, app: none}
services:
  - {name: server, namespace: demo, ports: [{name: http, port: 80, targetPort: 8080}], selector: {app: server}}
"""


def _fail(src: str, path: str, why: str) -> BadInputError:
    return BadInputError(f"{src}: {path}: {why}")


def _name(src: str, path: str, value) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise _fail(src, path, f"{value!r} is not a valid name (lowercase letters, digits, '-', "
                                "at most 32 characters)")
    return value


def parse(text: str, *, src: str = "<default>") -> Topology:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise BadInputError(f"{src}: not valid YAML at {where}: "
                            f"{getattr(exc, 'problem', exc)}") from None
    if not isinstance(doc, dict):
        raise _fail(src, "(top)", "expected a mapping with keys nodes, namespaces, pods")
    unknown = set(doc) - {"nodes", "namespaces", "pods", "services"}
    if unknown:
        raise _fail(src, sorted(unknown)[0], "unknown key (allowed: nodes, namespaces, pods, services)")
    raw_nodes = doc.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise _fail(src, "nodes", "expected a non-empty list of node names")
    if len(raw_nodes) > 200:
        raise _fail(src, "nodes", "at most 200 nodes")
    nodes = []
    for i, n in enumerate(raw_nodes):
        name = _name(src, f"nodes[{i}]", n if not isinstance(n, dict) else n.get("name"))
        if any(x.name == name for x in nodes):
            raise _fail(src, f"nodes[{i}]", f"duplicate node {name!r}")
        fastpath = True
        if isinstance(n, dict):
            extra = set(n) - {"name", "fastpath"}
            if extra:
                raise _fail(src, f"nodes[{i}].{sorted(extra)[0]}", "unknown key (allowed: name, fastpath)")
            fastpath = n.get("fastpath", True)
            if not isinstance(fastpath, bool):
                raise _fail(src, f"nodes[{i}].fastpath", "expected true or false")
        nodes.append(NodeSpec(name=name, index=i + 1, fastpath=fastpath))
    namespaces: dict[str, dict] = {}
    raw_ns = doc.get("namespaces") or {}
    if not isinstance(raw_ns, dict):
        raise _fail(src, "namespaces", "expected a mapping name -> {labels: {...}}")
    for ns, body in raw_ns.items():
        _name(src, f"namespaces.{ns}", ns)
        labels = (body or {}).get("labels", {}) if isinstance(body, dict) else None
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise _fail(src, f"namespaces.{ns}.labels", "expected a mapping of string labels")
        namespaces[ns] = dict(labels)
    raw_pods = doc.get("pods") or []
    if not isinstance(raw_pods, list):
        raise _fail(src, "pods", "expected a list")
    pods: list[PodSpec] = []
    node_names = {n.name for n in nodes}
    per_node: dict[str, int] = {}
    for i, p in enumerate(raw_pods):
        at = f"pods[{i}]"
        if not isinstance(p, dict):
            raise _fail(src, at, "expected a mapping with name, node, namespace, serviceAccount")
        extra = set(p) - {"name", "node", "namespace", "serviceAccount", "app", "labels", "ports",
                          "annotations"}
        if extra:
            raise _fail(src, f"{at}.{sorted(extra)[0]}", "unknown key")
        name = _name(src, f"{at}.name", p.get("name"))
        if any(x.name == name for x in pods):
            raise _fail(src, f"{at}.name", f"duplicate pod {name!r}")
        node = p.get("node")
        if node not in node_names:
            raise _fail(src, f"{at}.node", f"{node!r} is not one of the nodes {sorted(node_names)}")
        per_node[node] = per_node.get(node, 0) + 1
        if per_node[node] > MAX_PODS_PER_NODE:
            raise _fail(src, f"{at}.node", f"at most {MAX_PODS_PER_NODE} pods per node "
                        "(pod addresses are .9-.254 of the node's /24)")
        ns = _name(src, f"{at}.namespace", p.get("namespace", "default"))
        namespaces.setdefault(ns, {})
        sa = _name(src, f"{at}.serviceAccount", p.get("serviceAccount", "default"))
        app = p.get("app", "none")
        if app not in ("http", "none"):
            raise _fail(src, f"{at}.app", f"{app!r} is not one of http, none")
        labels = p.get("labels", {}) or {}
        if not isinstance(labels, dict):
            raise _fail(src, f"{at}.labels", "expected a mapping")
        annotations = p.get("annotations", {}) or {}
        if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
            raise _fail(src, f"{at}.annotations", "expected a mapping of string values "
                        "(quote \"false\" in YAML)")
        ports = p.get("ports", [8080])
        if (not isinstance(ports, list) or not ports or len(ports) > 8 or
                not all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 65535
                        and x not in (C.PORT_OUTBOUND, C.PORT_INBOUND_PLAIN, C.PORT_HBONE) for x in ports)):
            raise _fail(src, f"{at}.ports", "expected 1-8 port numbers 1-65535, none of 15001/15006/15008")
        pods.append(PodSpec(name=name, node=node, namespace=ns, service_account=sa, app=app,
                            labels={str(k): str(v) for k, v in labels.items()}, ports=tuple(ports),
                            annotations={str(k): v for k, v in annotations.items()}))
    raw_svcs = doc.get("services") or []
    if not isinstance(raw_svcs, list):
        raise _fail(src, "services", "expected a list of Services ({name, namespace, ports, selector})")
    services = []
    for i, raw in enumerate(raw_svcs):
        if not isinstance(raw, dict):
            raise _fail(src, f"services[{i}]", "expected a mapping {name, namespace, ports, selector, labels}")
        extra = set(raw) - {"name", "namespace", "ports", "selector", "labels", "clusterIP"}
        if extra:
            raise _fail(src, f"services[{i}].{sorted(extra)[0]}", "unknown key")
        obj = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": raw.get("name"), "namespace": raw.get("namespace", "default"),
                            "labels": raw.get("labels") or {}},
               "spec": {k: raw[k] for k in ("ports", "selector", "clusterIP") if k in raw}}
        services.append(l7parse.validate(obj, src=src, prefix=f"services[{i}].")[0])
        namespaces.setdefault(obj["metadata"]["namespace"], {})
    return Topology(nodes=tuple(nodes), pods=tuple(pods), namespaces=namespaces, services=tuple(services))


def load(path: str | None) -> Topology:
    if path is None:
        return parse(DEFAULT_YAML)
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"topology file {path} not found")
    return parse(p.read_text(), src=str(path))


def ambient(labels: dict) -> bool:
    return labels.get(C.LABEL_DATAPLANE_MODE) == C.DATAPLANE_AMBIENT
