"""What enrolling pods costs meshlane, for `make bench`.

``enrolment_cost(counts, workdir)``: for each N in `counts` a lab of its own (name
``mle<pid><N>``), N pods (no app) in namespace ``bench`` that is *not* ambient, spread
evenly over ceil(N / 240) nodes (240 = a node's pod limit).  Once the lab is up and idle:

1. memory (VmRSS, RssAnon, PSS) and CPU seconds (utime + stime) of every node agent and
   ztunnel, and of the control plane, with 0 pods enrolled;
2. the namespace is labelled ``istio.io/dataplane-mode: ambient`` through the control
   plane (the ``apply`` operation `meshlane apply -f` uses), and the clock runs until every
   pod's ``status.enrolled`` is true, read with control_client ``get`` (polled every
   0.1 s), then checked against every ztunnel's ``/config_dump`` (each pod listed as a
   local pod, i.e. its certificate issued and its listeners open);
3. the node agents' "enrolled ... (kernel attach X ms, total Y ms)" log lines written
   since the label give per-pod kernel attach and total times (and, from their
   timestamps, when each node's first and last pod was done);
4. after ``SETTLE_S``, memory and CPU of the same processes again: per node, the sum
   over nodes, and the CPU spent between the label and then.

The lab is torn down (``labmod.down``) whatever happens.  ``attach_100`` in the result
is the N=100 run's attach timing (the "time to attach 100 pods"), when 100 is a count.

    python -m bench.enrolment [--counts 10,100,500]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.peers import proc_memory
from meshcore import constants as C
from meshlane import lab as labmod
from meshlane import labnet, topology
from slowpath import control_client

__all__ = ["enrolment_cost", "topology_yaml"]

NAMESPACE = "bench"
POLL_S = 0.1
SETTLE_S = 2.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_ENROLLED_RE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*enrolled (\S+) "
    r"\(kernel attach ([\d.]+) ms, total ([\d.]+) ms\)")


def _lab_name(n: int) -> str:
    name = f"mle{os.getpid()}{n}"
    if len(name) > 16:
        name = f"mle{os.getpid() % 100000}{n}"[:16]
    return name


def topology_yaml(n: int) -> tuple[str, dict[str, int]]:
    """Topology text for N pods in the non-ambient namespace, round-robin over the fewest
    nodes that hold them; also {node: pod count}."""
    nodes = max(1, math.ceil(n / topology.MAX_PODS_PER_NODE))
    names = [f"node{i + 1}" for i in range(nodes)]
    per: dict[str, int] = dict.fromkeys(names, 0)
    lines = [f"nodes: [{', '.join(names)}]", "namespaces:", f"  {NAMESPACE}: {{labels: {{}}}}",
             "pods:"]
    for i in range(n):
        node = names[i % nodes]
        per[node] += 1
        lines.append(f"  - {{name: p{i}, node: {node}, namespace: {NAMESPACE}, "
                     f"serviceAccount: sa{i % 10}, app: none}}")
    return "\n".join(lines) + "\n", per


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime/stime are fields 14/15
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _sample(pids: dict[str, int]) -> dict[str, dict]:
    out = {}
    for name, pid in pids.items():
        m = proc_memory(pid)
        out[name] = {"pid": pid, "vmrss_mib": round(m["VmRSS"] / 1024, 1),
                     "rss_anon_mib": round(m["RssAnon"] / 1024, 1),
                     "pss_mib": round(m.get("Pss", 0) / 1024, 1),
                     "threads": m.get("Threads"),
                     "cpu_seconds": round(_cpu_seconds(pid), 2)}
    return out


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    v = sorted(values)
    return {"n": len(v), "mean": round(statistics.mean(v), 2), "median": round(statistics.median(v), 2),
            "p95": round(v[min(len(v) - 1, math.ceil(0.95 * len(v)) - 1)], 2),
            "max": round(v[-1], 2), "min": round(v[0], 2)}


def _enrolled_count(sock: str) -> int:
    objs = control_client.call(sock, "get", kind="Pod", namespace=NAMESPACE)["objects"]
    return sum(1 for o in objs if (o.get("status") or {}).get("enrolled"))


def _ztunnel_local_pods(lab: str, node: str) -> int:
    code, body = labmod.http_get_in_netns(labnet.node_netns(lab, node), C.PORT_ADMIN,
                                          "/config_dump", timeout=10)
    if code != 200:
        raise RuntimeError(f"ztunnel on {node}: /config_dump answered {code}")
    return sum(1 for p in json.loads(body)["localPods"] if p["uid"].startswith(f"{NAMESPACE}/"))


def _one(n: int, workdir: Path, timeout_s: float) -> dict:
    lab = _lab_name(n)
    paths = labmod.LabPaths(lab)
    text, per_node = topology_yaml(n)
    topo = workdir / f"topology-{n}.yaml"
    topo.write_text(text)
    res: dict[str, Any] = {"lab": lab, "pods": n, "nodes": len(per_node), "pods_per_node": per_node}
    t0 = time.monotonic()
    try:
        state = labmod.up(lab, str(topo))
        res["lab_up_seconds"] = round(time.monotonic() - t0, 2)
        sock = str(paths.control_socket)
        nodes = list(per_node)
        procs = {f"{kind}-{nd}": state["pids"][f"{kind}-{nd}"] for nd in nodes
                 for kind in ("node", "ztunnel")}
        procs["control"] = state["pids"]["control"]
        logs = {nd: paths.run / "logs" / f"node-{nd}.log" for nd in nodes}
        offsets = {nd: logs[nd].stat().st_size for nd in nodes}
        if _enrolled_count(sock) != 0:
            raise RuntimeError(f"lab {lab}: pods enrolled before the namespace was labelled")
        time.sleep(SETTLE_S)
        before = _sample(procs)

        # --- label the namespace ambient, as `meshlane apply -f` would ---------------------
        ns_obj = {"apiVersion": "v1", "kind": "Namespace",
                  "metadata": {"name": NAMESPACE,
                               "labels": {C.LABEL_DATAPLANE_MODE: C.DATAPLANE_AMBIENT}}}
        wall0 = time.time()
        t_label = time.monotonic()
        control_client.call(sock, "apply", objects=[ns_obj], src="bench.enrolment")
        deadline = t_label + timeout_s
        seen = 0
        while True:
            seen = _enrolled_count(sock)
            if seen >= n:
                break
            if time.monotonic() >= deadline:
                raise RuntimeError(f"only {seen}/{n} pods enrolled {timeout_s:.0f}s after the label")
            time.sleep(POLL_S)
        attach_s = time.monotonic() - t_label
        zt = {nd: _ztunnel_local_pods(lab, nd) for nd in nodes}
        if zt != per_node:
            raise RuntimeError(f"ztunnels hold {zt} local pods, expected {per_node}")
        time.sleep(SETTLE_S)
        after = _sample(procs)

        # --- node agent log lines since the label -------------------------------------------
        kernel, total, per_node_log = [], [], {}
        for nd in nodes:
            with open(logs[nd], "rb") as f:
                f.seek(offsets[nd])
                lines = f.read().decode(errors="replace").splitlines()
            stamps, k_nd = [], []
            for line in lines:
                m = _ENROLLED_RE.match(line)
                if m and m.group(2).startswith(f"{NAMESPACE}/"):
                    stamps.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
                    k_nd.append(float(m.group(3)))
                    kernel.append(float(m.group(3)))
                    total.append(float(m.group(4)))
            per_node_log[nd] = {
                "log_lines": len(k_nd),
                "first_enrolled_s": round(min(stamps) - wall0, 3) if stamps else None,
                "last_enrolled_s": round(max(stamps) - wall0, 3) if stamps else None,
                "kernel_attach_ms_median": round(statistics.median(k_nd), 2) if k_nd else None,
            }
        if len(kernel) != n:
            res["warning"] = f"{len(kernel)} enrol log lines for {n} pods"

        def node_view(sample: dict, nd: str) -> dict:
            a, z = sample[f"node-{nd}"], sample[f"ztunnel-{nd}"]
            return {"pods": per_node[nd], "node_agent": a, "ztunnel": z,
                    "vmrss_mib": round(a["vmrss_mib"] + z["vmrss_mib"], 1),
                    "pss_mib": round(a["pss_mib"] + z["pss_mib"], 1),
                    "cpu_seconds": round(a["cpu_seconds"] + z["cpu_seconds"], 2)}

        def totals(sample: dict) -> dict:
            keys = [k for k in sample if k != "control"]
            out = {f"{kind}_{field}": round(sum(sample[k][field] for k in keys
                                                if k.startswith(kind + "-")), 2)
                   for kind in ("node", "ztunnel") for field in ("vmrss_mib", "pss_mib", "cpu_seconds")}
            out["vmrss_mib"] = round(out["node_vmrss_mib"] + out["ztunnel_vmrss_mib"], 1)
            out["pss_mib"] = round(out["node_pss_mib"] + out["ztunnel_pss_mib"], 1)
            out["cpu_seconds"] = round(out["node_cpu_seconds"] + out["ztunnel_cpu_seconds"], 2)
            return out

        tb, ta = totals(before), totals(after)
        res.update({
            # flat headline numbers: node agents + ztunnels, all pods enrolled, summed over nodes
            "total_vmrss_mib": ta["vmrss_mib"],
            "total_pss_mib": ta["pss_mib"],
            "attach_seconds": round(attach_s, 3),
            "attach": {
                "pods": n,
                "seconds": round(attach_s, 3),
                "pods_per_second": round(n / attach_s, 1),
                "poll_interval_s": POLL_S,
                "kernel_attach_ms": _stats(kernel),
                "agent_total_ms": _stats(total),
                "per_node": per_node_log,
            },
            "idle_0_enrolled": {"per_node": {nd: node_view(before, nd) for nd in nodes},
                                "total": tb, "control": before["control"]},
            "enrolled": {"per_node": {nd: node_view(after, nd) for nd in nodes},
                         "total": ta, "control": after["control"]},
            "delta": {"vmrss_mib": round(ta["vmrss_mib"] - tb["vmrss_mib"], 1),
                      "pss_mib": round(ta["pss_mib"] - tb["pss_mib"], 1),
                      "vmrss_kib_per_pod": round((ta["vmrss_mib"] - tb["vmrss_mib"]) * 1024 / n, 1),
                      "cpu_seconds": round(ta["cpu_seconds"] - tb["cpu_seconds"], 2),
                      "control_cpu_seconds": round(after["control"]["cpu_seconds"]
                                                   - before["control"]["cpu_seconds"], 2)},
            "settle_seconds": SETTLE_S,
        })
    finally:
        t_down = time.monotonic()
        try:
            labmod.down(lab, quiet=True)
        except Exception as exc:  # noqa: BLE001 - reported, the measurement error matters more
            if labmod.LabPaths(lab).run.exists() or labnet.lab_netns(lab):
                res["teardown_error"] = str(exc)
        res["lab_down_seconds"] = round(time.monotonic() - t_down, 2)
        topo.unlink(missing_ok=True)
        res["wall_seconds"] = round(time.monotonic() - t0, 2)
    return res


def enrolment_cost(counts: list[int], workdir: Path) -> dict:
    """Enrolment time and node-agent + ztunnel memory/CPU for each N in `counts` (module
    docstring).  One lab per N, each torn down before the next starts and on failure."""
    for n in counts:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"pod count {n!r} must be a positive integer")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"namespace_label": f"{C.LABEL_DATAPLANE_MODE}={C.DATAPLANE_AMBIENT}",
                           "max_pods_per_node": topology.MAX_PODS_PER_NODE, "counts": {}}
    t0 = time.monotonic()
    for n in counts:
        out["counts"][str(n)] = _one(n, workdir, timeout_s=max(60.0, n * 0.5))
    if "100" in out["counts"]:
        out["attach_100"] = out["counts"]["100"]["attach"]
    out["wall_seconds"] = round(time.monotonic() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.enrolment")
    ap.add_argument("--counts", default="10,100,500")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-enrol-"))
    try:
        res = enrolment_cost([int(x) for x in args.counts.split(",")], work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    json.dump(res, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
