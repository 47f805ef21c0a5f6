"""The lab's network: namespaces, bridges, veths and the underlay (DESIGN.md §7).

Each node is a netns `<lab>-<node>` with bridge br0 (its pod CIDR's .1) and an underlay
interface ul0; each pod is a netns `<lab>-<pod>` with eth0, a veth whose other end (vpN)
sits on its node's bridge; the underlay is a netns `<lab>-underlay` with bridge ul0
joining every node's ul0.  Pods on different nodes reach each other only across the
underlay, where a capture shows what the mesh puts on the wire.

Only addresses inside these namespaces are used.  Everything is created with iproute2
(`ip -n`); teardown deletes the namespaces, which removes their interfaces.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass

from meshcore.errors import MeshError
from meshlane.topology import NodeSpec, Topology


@dataclass(frozen=True, kw_only=True)
class PodNet:
    name: str
    netns: str
    node: str
    node_netns: str
    ip: str
    host_veth: str
    index: int


def node_netns(lab: str, node: str) -> str:
    return f"{lab}-{node}"


def pod_netns(lab: str, pod: str) -> str:
    return f"{lab}-{pod}"


def underlay_netns(lab: str) -> str:
    return f"{lab}-underlay"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise MeshError(f"`ip {' '.join(args)}` failed: {res.stderr.strip()}")
    return res


def sysctl(ns: str, key: str, value: str) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    res = subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", f"echo {value} > {path}"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise MeshError(f"setting {key}={value} in {ns} failed: {res.stderr.strip()}")


def existing_netns() -> set[str]:
    res = ip("netns", "list", check=False)
    return {line.split()[0] for line in res.stdout.splitlines() if line.strip()}


def plan_pods(lab: str, topo: Topology) -> list[PodNet]:
    out, counters = [], {}
    for p in topo.pods:
        node = topo.node(p.node)
        counters[node.name] = counters.get(node.name, 0) + 1
        k = counters[node.name]
        out.append(PodNet(name=p.name, netns=pod_netns(lab, p.name), node=node.name,
                          node_netns=node_netns(lab, node.name),
                          ip=str(node.pod_cidr.network_address + 9 + k),
                          host_veth=f"vp{k}", index=k))
    return out


def build_node(lab: str, node: NodeSpec, topo: Topology) -> None:
    ns = node_netns(lab, node.name)
    ul = underlay_netns(lab)
    ip("netns", "add", ns)
    ip("-n", ns, "link", "set", "lo", "up")
    ip("-n", ns, "link", "add", "br0", "type", "bridge")
    ip("-n", ns, "addr", "add", f"{node.gateway}/24", "dev", "br0")
    ip("-n", ns, "link", "set", "br0", "up")
    sysctl(ns, "net.ipv4.ip_forward", "1")
    peer = f"n{node.index}"
    ip("-n", ul, "link", "add", peer, "type", "veth", "peer", "name", "ul0", "netns", ns)
    ip("-n", ul, "link", "set", peer, "master", "ul0", "up")
    ip("-n", ns, "addr", "add", f"{node.underlay_ip}/24", "dev", "ul0")
    ip("-n", ns, "link", "set", "ul0", "up")


def route_nodes(lab: str, topo: Topology) -> None:
    for node in topo.nodes:
        for other in topo.nodes:
            if other.name != node.name:
                ip("-n", node_netns(lab, node.name), "route", "add", str(other.pod_cidr),
                   "via", str(other.underlay_ip))


def build_pod(lab: str, pod: PodNet) -> None:
    ip("netns", "add", pod.netns)
    ip("-n", pod.netns, "link", "set", "lo", "up")
    ip("-n", pod.node_netns, "link", "add", pod.host_veth, "type", "veth", "peer", "name", "eth0",
       "netns", pod.netns)
    ip("-n", pod.node_netns, "link", "set", pod.host_veth, "master", "br0", "up")
    ip("-n", pod.netns, "addr", "add", f"{pod.ip}/24", "dev", "eth0")
    ip("-n", pod.netns, "link", "set", "eth0", "up")
    gw = pod.ip.rsplit(".", 1)[0] + ".1"
    ip("-n", pod.netns, "route", "add", "default", "via", gw)


def build(lab: str, topo: Topology) -> list[PodNet]:
    ul = underlay_netns(lab)
    ip("netns", "add", ul)
    ip("-n", ul, "link", "set", "lo", "up")
    ip("-n", ul, "link", "add", "ul0", "type", "bridge")
    ip("-n", ul, "link", "set", "ul0", "up")
    for node in topo.nodes:
        build_node(lab, node, topo)
    route_nodes(lab, topo)
    pods = plan_pods(lab, topo)
    for pod in pods:
        build_pod(lab, pod)
    return pods


def lab_netns(lab: str) -> list[str]:
    """Every netns that belongs to this lab (by name prefix), from /run/netns."""
    return sorted(n for n in existing_netns() if n.startswith(f"{lab}-"))


def teardown(lab: str, names: list[str]) -> list[str]:
    removed = []
    present = existing_netns()
    for ns in names:
        if ns in present:
            ip("netns", "del", ns, check=False)
            removed.append(ns)
    return removed
