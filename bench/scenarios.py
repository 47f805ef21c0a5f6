"""The bench's scenarios and the proof that each took the path it claims.

Owns: the table of scenarios (client pod, server pod, which mesh processes carry the
traffic, which path is expected), and the check of the nodes' kernel counters
(`mesh_counters`, read through fastpath.loader) before and after a scenario ran:

  none     (1, 2)     the client's node redirected nothing and spliced nothing
  envoy    (6)        as "none", and the server Envoy accepted at least one HBONE CONNECT
                      stream per connrate connection (its /stats, through bench.peers)
  fast     (3)        `connect_fast` moved (at least once per connrate connection) and
                      `connect_redirected` did not; while the counter does not exist
                      the scenario is recorded as "fast path not available" (it then ran
                      through the ztunnel, which must show in `connect_redirected`)
  ztunnel  (4, 5)     `connect_redirected` moved (at least once per connrate
                      connection) and `connect_fast` did not

A failed check marks the scenario "invalid" in the results; nothing is hidden.
Must not: run load tools or decide how results are summarised.
"""
from __future__ import annotations

from dataclasses import dataclass

FAST_COUNTER = "connect_fast"
REDIRECT_COUNTER = "connect_redirected"


@dataclass(frozen=True, kw_only=True)
class Scenario:
    id: int
    key: str
    title: str
    client: str
    server: str
    expect: str                     # "none" | "fast" | "ztunnel" | "envoy"
    mesh_nodes: tuple[str, ...]     # nodes whose agent + ztunnel carry the traffic
    envoy: bool = False             # traffic goes through bench.peers' Envoy tunnel


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(id=1, key="plain-same", title="no mesh, same node", client="c-plain", server="s-plain",
             expect="none", mesh_nodes=()),
    Scenario(id=2, key="plain-cross", title="no mesh, cross node", client="c-plain", server="s-plain2",
             expect="none", mesh_nodes=()),
    Scenario(id=3, key="mesh-fast", title="meshlane fast path, same node", client="c-fast",
             server="s-fast", expect="fast", mesh_nodes=("node1",)),
    Scenario(id=4, key="mesh-hbone", title="meshlane HBONE, cross node", client="c-fast",
             server="s-mesh2", expect="ztunnel", mesh_nodes=("node1", "node2")),
    Scenario(id=5, key="mesh-ztunnel", title="meshlane, fast path off, same node (ztunnel)",
             client="c-slow", server="s-slow", expect="ztunnel", mesh_nodes=("node1",)),
    Scenario(id=6, key="envoy-hbone", title="Envoy node proxy, HBONE, cross node", client="c-envoy",
             server="s-envoy2", expect="envoy", mesh_nodes=(), envoy=True),
)
BY_ID = {s.id: s for s in SCENARIOS}
SERVER_PODS = tuple(dict.fromkeys(s.server for s in SCENARIOS))
NODES = ("node1", "node2")

# Ratios the report computes: (scenario, baseline).
RATIOS: tuple[tuple[int, int], ...] = ((3, 1), (5, 1), (4, 2), (6, 2), (4, 6))


def mesh_pids(sc: Scenario, lab_pids: dict[str, int], envoy_pids: dict[str, int]) -> dict[str, int]:
    """The processes whose CPU and RSS belong to this scenario."""
    out = {}
    for node in sc.mesh_nodes:
        for kind in ("node", "ztunnel"):
            name = f"{kind}-{node}"
            if name in lab_pids:
                out[name] = lab_pids[name]
    if sc.envoy:
        out.update({f"envoy:{k}": v for k, v in envoy_pids.items()})
    return out


def read_counters(lab: str) -> dict[str, dict[str, int]]:
    """node -> counters of the lab's pinned `mesh_counters` map; raises on failure."""
    from fastpath.loader import NodeDatapath
    from meshlane import lab as labmod
    return {node: NodeDatapath(labmod.LabPaths(lab).pin_name(node)).counters() for node in NODES}


def deltas(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {node: {k: after[node][k] - before.get(node, {}).get(k, 0) for k in after[node]}
            for node in after}


def envoy_streams(server_stats: dict[str, int]) -> int:
    """HBONE CONNECT streams the server Envoy accepted (its HTTP connection managers'
    downstream_rq_total, the admin listener left out)."""
    return sum(v for k, v in server_stats.items()
               if k.startswith("http.") and k.endswith(".downstream_rq_total") and not k.startswith("http.admin."))


def check_path(sc: Scenario, delta: dict[str, dict[str, int]], conns: int | None,
               envoy_streams_delta: int | None = None) -> dict:
    """{"status": "ok" | "invalid" | "fast path not available", "detail": str}.
    `delta` is per node (the client is always on node1); `conns` = connections connrate
    completed in this run (None when connrate failed); `envoy_streams_delta` = CONNECT
    streams the server Envoy accepted meanwhile (scenario 6; None if unreadable)."""
    d = delta.get("node1", {})
    has_fast = FAST_COUNTER in d
    fast, redir = d.get(FAST_COUNTER, 0), d.get(REDIRECT_COUNTER, 0)
    seen = f"{REDIRECT_COUNTER} +{redir}" + (f", {FAST_COUNTER} +{fast}" if has_fast else "")
    at_least = conns or 1

    if sc.expect in ("none", "envoy"):
        if redir or fast:
            return {"status": "invalid", "detail": f"the client's node touched the connections ({seen})"}
        if sc.expect == "none":
            return {"status": "ok", "detail": f"no mesh on the client's node ({seen})"}
        if envoy_streams_delta is None:
            return {"status": "invalid", "detail": f"the server Envoy's stats were unreadable ({seen})"}
        if envoy_streams_delta < at_least:
            return {"status": "invalid", "detail": f"server Envoy saw {envoy_streams_delta} CONNECT "
                                                   f"streams for {at_least} connections ({seen})"}
        return {"status": "ok", "detail": f"through Envoy: {envoy_streams_delta} HBONE CONNECT streams, "
                                          f"no mesh on the client's node ({seen})"}
    if sc.expect == "fast":
        if not has_fast:
            if redir >= at_least:
                return {"status": "fast path not available",
                        "detail": f"no {FAST_COUNTER} counter in this build; ran via the ztunnel ({seen})"}
            return {"status": "invalid", "detail": f"no {FAST_COUNTER} counter and too few redirects "
                                                   f"for {at_least} connections ({seen})"}
        if fast >= at_least and not redir:
            return {"status": "ok", "detail": f"spliced in the kernel ({seen})"}
        return {"status": "invalid", "detail": f"expected >= {at_least} fast connects and no redirect ({seen})"}
    if sc.expect == "ztunnel":
        if redir >= at_least and not fast:
            return {"status": "ok", "detail": f"through the ztunnel ({seen})"}
        return {"status": "invalid", "detail": f"expected >= {at_least} redirects and no fast connect ({seen})"}
    raise ValueError(f"unknown expectation {sc.expect!r}")
