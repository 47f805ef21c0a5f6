"""Policy -> kernel map compiler (the node agent's half of L4 authorization).

The kernel decides what a node knows for certain, by partial evaluation of the very
evaluator the ztunnel runs (meshcore.authz.evaluate), so the two cannot disagree:

  mesh_pol_out  at connect() in an enrolled pod of this node.  The source identity is the
                pod's own (its netns is the proof); the destination is an enrolled
                workload the control plane placed at that IP.  With both fixed, a
                verdict only depends on the port: one entry per port some policy names,
                plus port 0 for every other port.  DENY fails the connect at once; ALLOW
                still goes through the ztunnel, whose peer checks the certificate again.
                FAST: the destination is enrolled on this node too, so both identities
                are certain and an allow is final: the connect stays direct and the two
                sockets are spliced (fastpath.fast).  Pairs where either pod opted out,
                the destination uses a waypoint, or the node switch is off keep ALLOW.
                A destination whose own-IP traffic goes through a waypoint (waypoint-for
                workload|all) gets no entries: its policies see the waypoint's identity.
  mesh_pol_in   at SYN time for plaintext into an enrolled pod of this node.  A plaintext
                peer has no identity, so the verdict depends on the source address and
                the port only: per port (and port 0), one LPM entry per source prefix any
                policy names, and 0.0.0.0/0.  DENY refuses with an RST.

Destinations no policy applies to get no entries (the ztunnel's path is unchanged);
HBONE (15008) is never decided here: it needs the peer certificate.

Must not: talk to the control plane (the node agent hands in policies and workloads).
"""
from __future__ import annotations

import ctypes
import ipaddress
import socket
import zlib
from dataclasses import dataclass
from typing import Iterable

from meshcore import abi
from meshcore import bpfsys as libbpf
from meshcore import constants as C
from meshcore.authz import Conn, Decision, Policy, evaluate, in_scope
from meshcore.identity import SpiffeId
from fastpath.loader import percpu_sum

V4 = ipaddress.IPv4Network
ANY4 = ipaddress.IPv4Network("0.0.0.0/0")


@dataclass(frozen=True)
class WorkloadView:
    """A workload as the compiler needs it (built by the node agent from Pod objects)."""
    uid: str
    namespace: str
    labels: tuple[tuple[str, str], ...]
    ip: ipaddress.IPv4Address
    identity: SpiffeId
    enrolled: bool
    fastpath: bool = True   # may take the same-node splice (no opt-out, no waypoint)
    # connections to its own IP go through a waypoint (waypoint-for workload|all): its
    # policies see the waypoint's identity, never the client's, so connect() decides nothing
    waypoint: bool = False


@dataclass(frozen=True)
class LocalPod:
    pod_id: int
    workload: WorkloadView


OutKey = tuple[int, str, int]        # (source pod id, destination ip, port or 0)
InKey = tuple[str, int, V4]          # (destination ip, port or 0, source prefix)
Entry = tuple[int, int]              # (VERDICT_*, rule id)


def rule_id(policy_key: str, index: int) -> int:
    """Stable id of one rule for the per-rule counters (survives recompiles and restarts)."""
    span = 0x7FFFFFFF - C.RULE_ID_FIRST
    return C.RULE_ID_FIRST + zlib.crc32(f"{policy_key}#{index}".encode()) % span


def rule_names(policies: Iterable[Policy]) -> dict[int, str]:
    names = {C.RULE_NO_ALLOW_MATCH: "(no ALLOW policy matched)",
             C.RULE_NO_ALLOW_POLICY: "(no ALLOW policy in scope)",
             C.RULE_NO_POLICY: "(no policy in scope)"}
    for p in policies:
        for r in p.rules:
            names[rule_id(p.key, r.index)] = f"{p.key} rule {r.index} ({p.action})"
    return names


def _entry(d: Decision) -> Entry:
    if d.policy is not None:
        rid = rule_id(d.policy, d.rule)
    else:
        rid = C.RULE_NO_ALLOW_POLICY if d.allow else C.RULE_NO_ALLOW_MATCH
    return (C.VERDICT_ALLOW if d.allow else C.VERDICT_DENY, rid)


def _mentioned(policies: list[Policy]) -> tuple[list[int], list[V4]]:
    ports: set[int] = set()
    nets: set[V4] = set()
    for p in policies:
        for r in p.rules:
            for clause in r.clauses:
                for m in clause:
                    ports.update(m.ports)
                    ports.update(m.not_ports)
                    nets.update(n for n in m.source_ips + m.not_source_ips if n.version == 4)
    ports.discard(0)
    return sorted(ports), sorted(nets)


def _other_port(ports: list[int]) -> int:
    """A port no policy names: every such port gets the same verdict."""
    taken = set(ports)
    return next(p for p in range(1, 65536) if p not in taken)


def _representative(net: V4, inner: list[V4]) -> ipaddress.IPv4Address | None:
    """An address of `net` outside every longer prefix in `inner` (None if they cover it):
    the LPM entry for `net` decides exactly those addresses."""
    if any(net.subnet_of(i) for i in inner):
        return None
    if not any(i.subnet_of(net) for i in inner):
        return net.network_address
    for half in net.subnets(prefixlen_diff=1):
        r = _representative(half, inner)
        if r is not None:
            return r
    return None


def compile_out(policies: list[Policy], workloads: Iterable[WorkloadView],
                local: Iterable[LocalPod], *, fastpath: bool = True) -> dict[OutKey, Entry]:
    """`fastpath` is the node-wide switch of the same-node splice."""
    out: dict[OutKey, Entry] = {}
    local = list(local)
    local_uids = {lp.workload.uid for lp in local}
    dests = [w for w in workloads if w.enrolled and w.ip.version == 4]
    for d in dests:
        if d.waypoint:
            continue
        scoped = in_scope(policies, d.namespace, dict(d.labels))
        d_fast = fastpath and d.fastpath and d.uid in local_uids
        if not scoped and not d_fast:
            continue
        ports, _ = _mentioned(scoped)
        other = _other_port(ports)
        for src in local:
            if src.workload.uid == d.uid:
                continue   # connect4 never redirects a pod's connects to itself
            fast = d_fast and src.workload.fastpath
            if not scoped:
                out[(src.pod_id, str(d.ip), 0)] = (C.VERDICT_FAST, C.RULE_NO_POLICY)
                continue
            for port in ports + [0]:
                conn = Conn(src_ip=src.workload.ip, dst_ip=d.ip, dst_port=port or other,
                            src_identity=src.workload.identity)
                action, rid = _entry(evaluate(scoped, conn))
                if fast and action == C.VERDICT_ALLOW:
                    action = C.VERDICT_FAST
                out[(src.pod_id, str(d.ip), port)] = (action, rid)
    return out


def verdict_for(entries: dict[OutKey, Entry], src_pod: int, dst_ip: str, port: int) -> Entry | None:
    """The entry connect4 would find for this connect (exact port, then port 0)."""
    return entries.get((src_pod, dst_ip, port)) or entries.get((src_pod, dst_ip, 0))


def compile_in(policies: list[Policy], local: Iterable[LocalPod]) -> dict[InKey, Entry]:
    out: dict[InKey, Entry] = {}
    for lp in local:
        d = lp.workload
        scoped = in_scope(policies, d.namespace, dict(d.labels))
        if not scoped:
            continue
        ports, nets = _mentioned(scoped)
        other = _other_port(ports)
        prefixes = sorted(set(nets) | {ANY4}, key=lambda n: (n.prefixlen, n))
        for net in prefixes:
            rep = _representative(net, [n for n in prefixes if n != net and n.subnet_of(net)])
            if rep is None:
                continue
            for port in ports + [0]:
                conn = Conn(src_ip=rep, dst_ip=d.ip, dst_port=port or other, src_identity=None)
                out[(str(d.ip), port, net)] = _entry(evaluate(scoped, conn))
    return out


# --- kernel maps ---------------------------------------------------------------------------

def out_key(k: OutKey) -> abi.PolOutKey:
    return abi.PolOutKey(src_pod=k[0], dst_ip=abi.ip_to_be32(k[1]), dst_port=k[2])


def _in_key(k: InKey) -> abi.PolInKey:
    net = k[2]
    return abi.PolInKey(prefixlen=64 + net.prefixlen, dst_ip=abi.ip_to_be32(k[0]),
                        dst_port=socket.htonl(k[1]), src_ip=abi.ip_to_be32(net.network_address))


def _verdict(e: Entry) -> abi.Verdict:
    return abi.Verdict(rule=e[1], action=e[0])


def read_out(fd: int) -> dict[OutKey, Entry]:
    got = {}
    for k in list(libbpf.map_keys(fd, abi.PolOutKey)):
        v = abi.Verdict()
        if libbpf.map_lookup(fd, k, v):
            got[(k.src_pod, str(abi.be32_to_ip(k.dst_ip)), k.dst_port)] = (v.action, v.rule)
    return got


def read_in(fd: int) -> dict[InKey, Entry]:
    got = {}
    for k in list(libbpf.map_keys(fd, abi.PolInKey)):
        v = abi.Verdict()
        if libbpf.map_lookup(fd, k, v):
            net = ipaddress.IPv4Network((abi.be32_to_ip(k.src_ip), k.prefixlen - 64))
            got[(str(abi.be32_to_ip(k.dst_ip)), socket.ntohl(k.dst_port), net)] = (v.action, v.rule)
    return got


@dataclass
class SyncStats:
    written: int = 0
    deleted: int = 0


def sync(out_fd: int, in_fd: int, want_out: dict[OutKey, Entry],
         want_in: dict[InKey, Entry]) -> SyncStats:
    """Make the two maps hold exactly the wanted entries.  New and changed entries are
    written before stale ones are removed, so a key never passes through "no entry"
    (which would mean "no policy") on its way from one verdict to another."""
    st = SyncStats()
    for fd, want, have, mk in ((out_fd, want_out, read_out(out_fd), out_key),
                               (in_fd, want_in, read_in(in_fd), _in_key)):
        for k, e in want.items():
            if have.get(k) != e:
                libbpf.map_update(fd, mk(k), _verdict(e), "policy map")
                st.written += 1
        for k in have.keys() - want.keys():
            libbpf.map_delete(fd, mk(k))
            st.deleted += 1
    return st


def rule_hits(fd: int, ids: Iterable[int]) -> dict[int, int]:
    return {rid: percpu_sum(fd, ctypes.c_uint32(rid)) for rid in ids}
