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
from collections.abc import Iterable
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
    # A bridge without an address of its own takes the lowest MAC of its ports and
    # changes it when a port comes or goes (a waypoint pod at run time): every pod's ARP
    # entry for its gateway would then point at a MAC that no longer answers, and traffic
    # leaving the node would stall until the entry is re-resolved (seconds).
    ip("-n", ns, "link", "add", "br0", "address", mac_for(str(node.gateway)), "type", "bridge")
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


# --- extra pods added while the lab runs (waypoints) -------------------------------------
# The topology numbers its pods .10-.249 of each node's pod CIDR; .250-.254 are kept for
# pods the lab adds at run time (a waypoint's Envoy), with host veths `vw<last octet>`.
EXTRA_POD_OCTETS = range(250, 255)


def netns_addresses(ns: str) -> set[str]:
    """Every IPv4 address configured inside netns `ns` (empty if it is gone)."""
    res = ip("-n", ns, "-4", "-o", "addr", "show", check=False)
    out = set()
    for line in res.stdout.splitlines():
        words = line.split()
        if "inet" in words:
            out.add(words[words.index("inet") + 1].split("/")[0])
    return out


def netns_links(ns: str) -> set[str]:
    """Interface names inside netns `ns` (without the `@peer` suffix)."""
    res = ip("-n", ns, "-o", "link", "show", check=False)
    return {line.split(":")[1].strip().split("@")[0] for line in res.stdout.splitlines()
            if line.count(":") >= 2}


def free_extra_address(lab: str, node: str, pod_cidr: str, taken: Iterable[str] = ()) -> tuple[str, str]:
    """(ip, host veth) for one more pod on `node`: the first of .250-.254 of its pod CIDR
    that no netns of the lab uses, that is not in `taken` (addresses the caller has
    handed out but maybe not built yet) and whose veth name is free on the node."""
    import ipaddress
    net = ipaddress.IPv4Network(pod_cidr)
    used = set(taken)
    for ns in lab_netns(lab):
        used |= netns_addresses(ns)
    links = netns_links(node_netns(lab, node))
    for octet in EXTRA_POD_OCTETS:
        addr = str(net.network_address + octet)
        veth = f"vw{octet}"
        if addr not in used and veth not in links:
            return addr, veth
    first, last = net.network_address + EXTRA_POD_OCTETS[0], net.network_address + EXTRA_POD_OCTETS[-1]
    raise MeshError(f"node {node!r} has no free address for another waypoint pod: {first}-{last} "
                    f"are all in use ({len(EXTRA_POD_OCTETS)} per node)",
                    hint="delete a waypoint on that node or put this one on another node "
                         "(annotation meshlane.io/node)")


def mac_for(ip_addr: str) -> str:
    """A locally administered MAC derived from an IPv4 address (02:4d:4c + its last three
    bytes): stable across re-creations of a pod with that address."""
    b = [int(x) for x in ip_addr.split(".")]
    return "02:4d:4c:%02x:%02x:%02x" % (b[1], b[2], b[3])


def add_pod(lab: str, node: str, name: str, ip_addr: str, host_veth: str) -> PodNet:
    """Build one more pod netns `<lab>-<name>` on `node` (veth `host_veth` on its bridge,
    eth0 = ip_addr/24, default route via the bridge).  A failure leaves nothing behind."""
    pod = PodNet(name=name, netns=pod_netns(lab, name), node=node, node_netns=node_netns(lab, node),
                 ip=ip_addr, host_veth=host_veth, index=int(ip_addr.rsplit(".", 1)[1]))
    present = existing_netns()
    if pod.node_netns not in present:
        raise MeshError(f"node netns {pod.node_netns} does not exist", hint="is the lab up?")
    if pod.netns in present:
        raise MeshError(f"netns {pod.netns} already exists",
                        hint=f"remove it with `ip netns del {pod.netns}` if nothing uses it")
    try:
        build_pod(lab, pod)
        # a MAC that follows the address: a pod re-created with the same address (a
        # waypoint deleted and applied again, or moved back) keeps its MAC, so peers'
        # neighbour entries stay right instead of stalling ~5 s on a stale one
        ip("-n", pod.netns, "link", "set", "eth0", "address", mac_for(ip_addr))
    except BaseException:
        ip("netns", "del", pod.netns, check=False)  # takes eth0 and so its veth peer along
        ip("-n", pod.node_netns, "link", "del", pod.host_veth, check=False)
        raise
    return pod


def remove_pod(lab: str, name: str) -> bool:
    """Delete pod netns `<lab>-<name>` (its veth pair goes with it); False if absent."""
    return bool(teardown(lab, [pod_netns(lab, name)]))
