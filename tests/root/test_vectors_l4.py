"""The shared L4 vectors through a real lab: real connects against the kernel's compiled
entries, and real HBONE CONNECTs (with each source's own certificate) against the
destination ztunnel.

For every check of every case (tests/vectors/l4_authz.yaml):
  kernel   a plain connect() from the source pod's netns to the destination.  Refused at
           once = the kernel denied (at connect() for an enrolled source, at SYN time for
           a plaintext one); the node's policy counters say whether an entry allowed it.
  ztunnel  for enrolled sources: CONNECT from the source pod (mark 0x539, so the source's
           kernel stays out of it) to the destination's 15008: 200 or 401.
  end to end  the connect's outcome must be the expected verdict (an HTTP answer, or no
           connection / a closed one).
And across all checks: the kernel never allowed what the ztunnel denied, and never
denied what the vectors allow.
"""
from __future__ import annotations


import pytest

from meshcore import constants as C
from meshlane import lab as labmod
from slowpath import control_client, tls
from tests.root.meshtest import connect_status, http_probe, node_cert, node_counters, running_lab, tls_to
from tests.vectors import load as vectors

pytestmark = pytest.mark.root

DOC = vectors.load()


@pytest.fixture(scope="module")
def vlab(tmp_path_factory):
    topo = tmp_path_factory.mktemp("vec") / "topology.yaml"
    topo.write_text(vectors.topology_yaml(DOC))
    with running_lab("mlv", str(topo)) as (name, pods):
        for w in DOC["workloads"]:   # the vectors' addresses are the lab's
            assert pods[w["name"]]["ip"] == w["ip"], (w["name"], pods[w["name"]]["ip"])
        yield name, pods


def _counters(lab: str) -> dict[str, dict[str, int]]:
    return {n: node_counters(lab, n) for n in ("node1", "node2")}


def _apply(lab: str, policies: list[dict], previous: list[dict]) -> None:
    sock = str(labmod.LabPaths(lab).control_socket)
    rev = None
    if previous:
        rev = control_client.call(sock, "delete_objects", objects=previous)["rev"]
    if policies:
        rev = control_client.call(sock, "apply", objects=policies, src="vectors")["rev"]
    if rev is not None:  # else nothing changed
        labmod.wait_policies(lab, rev)


@pytest.fixture(scope="module")
def certs_of(vlab):
    lab, pods = vlab
    cache = {}

    def get(w: dict):
        if w["name"] not in cache:
            cert = node_cert(lab, w["node"], w["namespace"], w["name"], w["serviceAccount"])
            cache[w["name"]] = tls.client_context(cert)
        return cache[w["name"]]
    return get


def _hbone_status(lab: str, src: dict, dst: dict, port: int, ctx) -> int:
    s = tls_to(f"{lab}-{src['name']}", dst["ip"], ctx, mark=C.MARK_ZTUNNEL)
    with s:
        return connect_status(s, f"{dst['ip']}:{port}")


def test_vectors_through_the_kernel_and_the_ztunnel(vlab, certs_of):
    lab, pods = vlab
    by = DOC["by_name"]
    previous: list[dict] = []
    failures, kernel_over_ztunnel, decided, total, probed = [], [], 0, 0, 0
    kinds: dict[str, int] = {}
    slowest_deny = 0.0
    for case in DOC["cases"]:
        _apply(lab, case["policies"], previous)
        previous = [{"kind": p["kind"], "metadata": {"name": p["metadata"]["name"],
                                                     "namespace": p["metadata"].get("namespace", "default")}}
                    for p in case["policies"]]
        for chk in vectors.checks(case):
            total += 1
            src, dst = by[chk.src], by[chk.dst]
            before = _counters(lab)
            outcome, took = http_probe(f"{lab}-{chk.src}", dst["ip"], chk.port)
            after = _counters(lab)
            moved = {k for n in after for k in after[n] if after[n][k] != before[n][k]}
            # fast: same node, allowed for certain, spliced without the ztunnel
            kernel = ("deny" if outcome == "refused" else "fast" if "connect_fast" in moved
                      else "allow" if moved & {"policy_out_allow", "policy_in_allow"} else "none")
            if kernel == "deny":
                slowest_deny = max(slowest_deny, took)
            if kernel != "none":
                decided += 1
            kinds[kernel] = kinds.get(kernel, 0) + 1
            zt = None
            if src["enrolled"] and dst["enrolled"]:
                status = _hbone_status(lab, src, dst, chk.port, certs_of(src))
                zt = {200: "allow", 401: "deny"}.get(status, f"status {status}")
                probed += 1
            e2e = "allow" if outcome == "ok" else "deny"
            problems = []
            if e2e != chk.expect:
                problems.append(f"end to end {e2e} ({outcome})")
            if kernel == "deny" and chk.expect != "deny":
                problems.append("kernel denied an allowed connection")
            if zt is not None and zt != chk.expect:
                problems.append(f"ztunnel {zt}")
            if kernel in ("allow", "fast") and zt == "deny":
                kernel_over_ztunnel.append(chk.id)
            if dst["enrolled"] and case["policies"] and kernel == "none" and _in_scope(case, dst):
                problems.append("kernel had no entry although a policy applies")
            if problems:
                failures.append(f"{chk.id} expected {chk.expect}: {'; '.join(problems)}")
    print(f"{total} checks: kernel decided {decided} ({kinds}), ztunnel probed {probed}; "
          f"slowest kernel denial {slowest_deny * 1000:.2f} ms")
    assert not kernel_over_ztunnel, f"kernel allowed what the ztunnel denied: {kernel_over_ztunnel}"
    assert not failures, f"{len(failures)} of {total} checks failed:\n" + "\n".join(failures)
    assert decided > total // 2, (decided, total)
    assert kinds.get("fast", 0) > 0, kinds   # the world has same-node enrolled pairs


def _in_scope(case: dict, dst: dict) -> bool:
    from meshcore import authz
    pols = [authz.parse(p).policy for p in case["policies"]]
    return bool(authz.in_scope([p for p in pols if p], dst["namespace"], dst.get("labels") or {}))
