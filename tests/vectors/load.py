"""The shared L4 authorization vectors (l4_authz.yaml): one world of workloads, cases of
(policies, connection -> expected verdict).  The ztunnel's evaluator (tests/unit) and the
kernel path in a real lab (tests/root) both run every case."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
PORTS = (8080, 9090, 7070)


@dataclass(frozen=True)
class Check:
    case: str
    src: str
    dst: str
    port: int
    expect: str   # allow | deny

    @property
    def id(self) -> str:
        return f"{self.case}:{self.src}->{self.dst}:{self.port}"


def load() -> dict:
    doc = yaml.safe_load((HERE / "l4_authz.yaml").read_text())
    doc["by_name"] = {w["name"]: w for w in doc["workloads"]}
    return doc


def checks(case: dict) -> list[Check]:
    return [Check(case["name"], c["from"], c["to"], int(c["port"]), c["expect"]) for c in case["checks"]]


def invalid() -> list[dict]:
    doc = yaml.safe_load((HERE / "l4_authz_invalid.yaml").read_text())
    return doc.get("cases") or doc.get("invalid") if isinstance(doc, dict) else doc


def topology_yaml(doc: dict) -> str:
    """The vectors' world as a `meshlane lab up --topology` file."""
    nss = sorted({w["namespace"] for w in doc["workloads"]})
    ambient = {w["namespace"] for w in doc["workloads"] if w["enrolled"]}
    topo = {"nodes": sorted({w["node"] for w in doc["workloads"]}),
            "namespaces": {ns: {"labels": {"istio.io/dataplane-mode": "ambient"} if ns in ambient else {}}
                           for ns in nss},
            "pods": [{"name": w["name"], "node": w["node"], "namespace": w["namespace"],
                      "serviceAccount": w["serviceAccount"], "app": "http", "labels": w.get("labels") or {},
                      "ports": list(PORTS)} for w in doc["workloads"]]}
    return yaml.safe_dump(topo, sort_keys=False)
