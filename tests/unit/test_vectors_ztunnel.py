"""The shared L4 vectors against the ztunnel's evaluator (Ztunnel.authorize, the code
that answers 401 on a CONNECT and closes plaintext on 15006), with the workloads and
policies fed in exactly as the control plane's watch delivers them."""
from __future__ import annotations

import ipaddress

import pytest

from meshcore import authz
from meshcore.identity import SpiffeId
from slowpath.ztunnel import LocalPod, Ztunnel
from tests.vectors import load as vectors

DOC = vectors.load()
CASES = DOC["cases"]


def pod_object(w: dict) -> dict:
    return {"kind": "Pod", "metadata": {"name": w["name"], "namespace": w["namespace"],
                                        "labels": w.get("labels") or {}},
            "spec": {"nodeName": w["node"], "serviceAccountName": w["serviceAccount"]},
            "status": {"podIP": w["ip"], "enrolled": w["enrolled"]}}


def ztunnel_verdict(zt: Ztunnel, src: dict, dst: dict, port: int) -> str:
    if not dst["enrolled"]:
        return "allow"   # no ztunnel in front of it: passthrough, no policy applies
    pod = LocalPod(uid=f"{dst['namespace']}/{dst['name']}", name=dst["name"], namespace=dst["namespace"],
                   service_account=dst["serviceAccount"], ip=dst["ip"], netns_fd=-1, cookie=0,
                   spiffe=SpiffeId(namespace=dst["namespace"], service_account=dst["serviceAccount"]))
    ident = SpiffeId(namespace=src["namespace"], service_account=src["serviceAccount"]) if src["enrolled"] else None
    conn = authz.Conn(src_ip=ipaddress.ip_address(src["ip"]), dst_ip=ipaddress.ip_address(dst["ip"]),
                      dst_port=port, src_identity=ident)
    return "allow" if zt.authorize(pod, conn).allow else "deny"


def test_the_vectors_are_many_and_cover_the_fields():
    n_checks = sum(len(c["checks"]) for c in CASES)
    assert len(CASES) >= 60 and n_checks >= 120, (len(CASES), n_checks)
    tags = {t for c in CASES for t in c.get("covers", [])}
    for field in ("principals", "notPrincipals", "namespaces", "notNamespaces", "serviceAccounts",
                  "notServiceAccounts", "ipBlocks", "notIpBlocks", "ports", "notPorts",
                  "when-source.ip", "when-source.namespace", "when-source.principal",
                  "when-destination.ip", "when-destination.port", "when-notValues", "when-l7-key",
                  "l7-allow", "l7-deny", "plaintext", "deny-beats-allow", "allow-no-rules",
                  "allow-empty-rule", "deny-empty-rule", "empty-entry", "scope-mesh",
                  "scope-selector-root", "scope-selector-empty", "scope-selector-empty-labels",
                  "dry-run", "targetRefs", "audit", "custom", "non-enrolled-dest"):
        assert field in tags, f"no vector covers {field}"
    assert {c["expect"] for case in CASES for c in case["checks"]} == {"allow", "deny"}


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_vector_against_the_ztunnel(case):
    zt = Ztunnel(node="node1", control_socket="/nonexistent", zds_socket="/nonexistent", token="",
                 maps_dir="/nonexistent")
    zt.workloads.replace_all([pod_object(w) for w in DOC["workloads"]])
    objs = {}
    for p in case["policies"]:
        parsed = authz.parse(p, src=case["name"])   # what `apply` accepts
        objs[f"{p['metadata'].get('namespace', 'default')}/{p['metadata']['name']}"] = parsed.object
    zt.set_policies(objs, rev=1)
    bad = []
    for chk in vectors.checks(case):
        got = ztunnel_verdict(zt, DOC["by_name"][chk.src], DOC["by_name"][chk.dst], chk.port)
        if got != chk.expect:
            bad.append(f"{chk.id}: expected {chk.expect}, ztunnel says {got}")
    assert not bad, f"{case['name']} ({case.get('why', '')}):\n" + "\n".join(bad)


INVALID = vectors.invalid() if (vectors.HERE / "l4_authz_invalid.yaml").exists() else []


@pytest.mark.parametrize("bad", INVALID, ids=[b["name"] for b in INVALID])
def test_invalid_inputs_are_refused_with_file_path_and_reason(bad, tmp_path):
    """What `meshlane apply` runs: the file reader, then the control plane's validation."""
    from meshcore.errors import BadInputError
    from meshlane import resources
    from meshlane.control import ControlPlane
    f = tmp_path / "policy.yaml"
    f.write_text(bad["text"])
    cp = ControlPlane(state_dir=tmp_path / "state", socket_path=tmp_path / "s.sock")
    with pytest.raises(BadInputError) as e:
        name, docs = resources.read_docs(str(f))
        cp.op_apply(docs, src=name)
    msg = str(e.value)
    assert msg.startswith(f"{f}: "), msg
    if bad["path"]:
        assert f": {bad['path']}: " in msg or msg.startswith(f"{f}: {bad['path']}: "), (bad["path"], msg)
    assert bad["reason"].lower() in msg.lower(), (bad["reason"], msg)
    assert cp.store.list(kind="AuthorizationPolicy") == []
