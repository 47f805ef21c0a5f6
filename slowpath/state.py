"""Workload state as the ztunnel knows it (ztunnel's state.rs role).

Owns the map from pod IP to workload (name, namespace, service account, node, whether it
is enrolled and so speaks HBONE), fed by the control plane's watch of Pods.  Pure data:
no sockets, no policy.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from meshcore import constants as C
from meshcore.identity import SpiffeId


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

    @property
    def uid(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def spiffe(self) -> SpiffeId:
        return SpiffeId(trust_domain=self.trust_domain, namespace=self.namespace,
                        service_account=self.service_account)

    @property
    def protocol(self) -> str:
        return "HBONE" if self.enrolled else "TCP"

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
                   labels=tuple(sorted((meta.get("labels") or {}).items())))


class WorkloadStore:
    def __init__(self, trust_domain: str = C.DEFAULT_TRUST_DOMAIN):
        self.trust_domain = trust_domain
        self.by_ip: dict[ipaddress.IPv4Address, Workload] = {}
        self.by_uid: dict[str, Workload] = {}
        self.synced = False

    def replace_all(self, pods: list[dict]) -> None:
        self.by_ip.clear()
        self.by_uid.clear()
        for p in pods:
            self.put(p)
        self.synced = True

    def put(self, pod: dict) -> None:
        uid = uid_of(pod)
        self.delete(uid)
        w = Workload.from_pod(pod, self.trust_domain)
        if w is not None:
            self.by_ip[w.ip] = w
            self.by_uid[uid] = w

    def delete(self, uid: str) -> None:
        old = self.by_uid.pop(uid, None)
        if old is not None and self.by_ip.get(old.ip) is old:
            del self.by_ip[old.ip]

    def find(self, ip) -> Workload | None:
        try:
            return self.by_ip.get(ipaddress.IPv4Address(str(ip)))
        except ValueError:
            return None
