"""Workload state as the ztunnel knows it (ztunnel's state.rs role).

Owns the map from pod IP to workload (name, namespace, service account, node, whether it
is enrolled and so speaks HBONE), fed by the control plane's watch of Pods; and the L7
view it needs to pick a destination: Services by VIP (with their endpoints), namespace
labels, waypoints and their pods.  Pure data: no sockets, no policy.
"""
from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from meshcore import constants as C
from meshcore import l7, l7parse
from meshcore.errors import MeshError
from meshcore.identity import SpiffeId

log = logging.getLogger("meshlane.state")


def uid_of(obj: dict) -> str:
    """`namespace/name` of a namespaced object as the control plane stores it."""
    m = obj["metadata"]
    return f"{m.get('namespace', 'default')}/{m['name']}"


@dataclass(frozen=True, kw_only=True)
class Workload:
    name: str
    namespace: str
    service_account: str
    node: str
    ip: ipaddress.IPv4Address
    enrolled: bool
    trust_domain: str = C.DEFAULT_TRUST_DOMAIN
    labels: tuple[tuple[str, str], ...] = ()
    waypoint: bool = False      # a waypoint's pod (its Envoy speaks HBONE itself)

    @property
    def uid(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def spiffe(self) -> SpiffeId:
        return SpiffeId(trust_domain=self.trust_domain, namespace=self.namespace,
                        service_account=self.service_account)

    @property
    def protocol(self) -> str:
        return "HBONE" if self.enrolled or self.waypoint else "TCP"

    def to_json(self) -> dict:
        return {"name": self.name, "namespace": self.namespace, "serviceAccount": self.service_account,
                "node": self.node, "ip": str(self.ip), "protocol": self.protocol,
                "identity": self.spiffe.uri}

    @classmethod
    def from_pod(cls, obj: dict, trust_domain: str = C.DEFAULT_TRUST_DOMAIN) -> "Workload | None":
        status = obj.get("status") or {}
        ip = status.get("podIP")
        if not ip:
            return None
        meta, spec = obj["metadata"], obj.get("spec") or {}
        return cls(name=meta["name"], namespace=meta.get("namespace", "default"),
                   service_account=spec.get("serviceAccountName", "default"),
                   node=spec.get("nodeName", ""), ip=ipaddress.IPv4Address(ip),
                   enrolled=bool(status.get("enrolled")), trust_domain=trust_domain,
                   labels=tuple(sorted((meta.get("labels") or {}).items())),
                   waypoint=bool(status.get("waypoint")))


class WorkloadStore:
    def __init__(self, trust_domain: str = C.DEFAULT_TRUST_DOMAIN):
        self.trust_domain = trust_domain
        self.by_ip: dict[ipaddress.IPv4Address, Workload] = {}
        self.by_uid: dict[str, Workload] = {}
        self.synced = False
        # per-connection lookups, rebuilt lazily after any workload change
        self._selected: dict[tuple, tuple[Workload, ...]] = {}   # (namespace, selector) -> endpoints
        self._waypoint_pods: dict[tuple[str, str], Workload] | None = None

    def _changed(self) -> None:
        self._selected.clear()
        self._waypoint_pods = None

    def replace_all(self, pods: list[dict]) -> None:
        self.by_ip.clear()
        self.by_uid.clear()
        self._changed()
        for p in pods:
            self.put(p)
        self.synced = True

    def put(self, pod: dict) -> None:
        uid = uid_of(pod)
        self.delete(uid)
        self._changed()
        w = Workload.from_pod(pod, self.trust_domain)
        if w is not None:
            self.by_ip[w.ip] = w
            self.by_uid[uid] = w

    def delete(self, uid: str) -> None:
        old = self.by_uid.pop(uid, None)
        if old is not None:
            self._changed()
            if self.by_ip.get(old.ip) is old:
                del self.by_ip[old.ip]

    def find(self, ip) -> Workload | None:
        try:
            return self.by_ip.get(ipaddress.IPv4Address(str(ip)))
        except ValueError:
            return None

    def endpoints(self, svc: l7.Service) -> tuple[Workload, ...]:
        """The pods a Service selects (waypoint pods never), in a stable order.  Asked on
        every connection to a VIP: the answer is kept until a workload changes."""
        key = (svc.namespace, svc.selector)
        got = self._selected.get(key)
        if got is None:
            got = tuple(sorted((w for w in self.by_uid.values()
                                if not w.waypoint and svc.selects(w.namespace, dict(w.labels))),
                               key=lambda w: w.uid))
            self._selected[key] = got
        return got

    def waypoint_pod(self, wp: l7.Waypoint) -> Workload | None:
        if self._waypoint_pods is None:
            self._waypoint_pods = {}
            for w in sorted(self.by_uid.values(), key=lambda w: w.uid):
                gw = dict(w.labels).get(l7.LABEL_GATEWAY_NAME)
                if w.waypoint and gw:
                    self._waypoint_pods.setdefault((w.namespace, gw), w)
        return self._waypoint_pods.get((wp.namespace, wp.name))


class ServiceStore:
    """Services (by VIP), waypoints and namespace labels from the control plane."""

    def __init__(self):
        self.services: dict[str, l7.Service] = {}
        self.by_vip: dict[ipaddress.IPv4Address, l7.Service] = {}
        self.waypoints: dict[str, l7.Waypoint] = {}
        self.ns_labels: dict[str, dict] = {}

    def replace_all(self, objs: list[dict]) -> None:
        self.services.clear()
        self.by_vip.clear()
        self.waypoints.clear()
        self.ns_labels.clear()
        for o in objs:
            self.put(o)

    def put(self, obj: dict) -> None:
        kind, meta = obj.get("kind"), obj["metadata"]
        if kind == "Namespace":
            self.ns_labels[meta["name"]] = dict(meta.get("labels") or {})
            return
        self.delete(obj)
        try:
            if kind == "Service":
                svc = l7parse.service_of(obj)
                self.services[svc.key] = svc
                self.by_vip[svc.vip] = svc
            elif kind == "Gateway":
                wp = l7parse.waypoint_of(obj)
                self.waypoints[wp.key] = wp
        except MeshError as exc:   # validated at apply; an old or foreign object: skip it
            log.warning("ignoring %s %s: %s", kind, uid_of(obj), exc)

    def delete(self, obj: dict) -> None:
        kind, key = obj.get("kind"), (uid_of(obj) if obj.get("kind") != "Namespace" else None)
        if kind == "Namespace":
            self.ns_labels.pop(obj["metadata"]["name"], None)
        elif kind == "Service":
            old = self.services.pop(key, None)
            if old is not None and self.by_vip.get(old.vip) is old:
                del self.by_vip[old.vip]
        elif kind == "Gateway":
            self.waypoints.pop(key, None)

    def at(self, ip) -> l7.Service | None:
        try:
            return self.by_vip.get(ipaddress.IPv4Address(str(ip)))
        except ValueError:
            return None

    def waypoint_for(self, svc: l7.Service) -> l7.Waypoint | None:
        return l7.waypoint_for_service(svc, self.ns_labels.get(svc.namespace, {}), self.waypoints)

    def waypoint_for_workload(self, w: Workload) -> l7.Waypoint | None:
        """The waypoint for traffic addressed to `w`'s own IP: only an enrolled pod's
        (the waypoint reaches it over HBONE), never a waypoint's own pod."""
        if not w.enrolled or w.waypoint:
            return None
        return l7.waypoint_for_workload(w.namespace, dict(w.labels), self.ns_labels.get(w.namespace, {}),
                                        self.waypoints)
