"""From raw per-round measurements to bench/results/latest.{json,md} and PNG charts.

Owns: the summary (median over rounds of every metric, peak RSS as the maximum), the
ratios between scenarios, the markdown table, and the charts (matplotlib, Agg backend,
imported only here and only when writing).  Input is the `raw` dict that bench/run.py
builds; nothing here measures or talks to the lab.

Must not: hide a failed path check.  An invalid scenario keeps its numbers, marked
"invalid" in every table and ratio that uses it.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.scenarios import BY_ID, RATIOS

MIB = 1024 * 1024
LAT_KEYS = ("lat_1000", "lat_max")
TOOLS = ("tput_1", "tput_4", "lat_1000", "lat_max", "conn")


def _median(values):
    vals = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(vals) if vals else None


def _max(values):
    vals = [v for v in values if isinstance(v, (int, float))]
    return max(vals) if vals else None


# --- summary -------------------------------------------------------------------------
def summarise(raw: dict) -> dict:
    """scenario id (str) -> medians over rounds, path status, errors."""
    out = {}
    for sid, runs in raw["scenarios"].items():
        sc = BY_ID[int(sid)]
        m = {"id": sc.id, "key": sc.key, "title": sc.title, "client": sc.client, "server": sc.server,
             "rounds": len(runs)}
        if not runs:
            m["status"] = raw.get("unavailable", {}).get(sid, "not run")
            out[sid] = m
            continue
        for key in ("tput_1", "tput_4"):
            m[f"{key}_gbps"] = _median(r["tools"].get(key, {}).get("gbps") for r in runs)
        for key in LAT_KEYS:
            for p in ("p50_us", "p90_us", "p99_us", "rate"):
                m[f"{key}_{p}"] = _median(r["tools"].get(key, {}).get(p) for r in runs)
        m["conn_rate"] = _median(r["tools"].get("conn", {}).get("rate") for r in runs)
        m["conn_p50_us"] = _median((r["tools"].get("conn", {}).get("lat_us") or {}).get("p50") for r in runs)
        m["conn_errors"] = sum((r["tools"].get("conn", {}).get("errors") or 0) for r in runs)
        procs = sorted({p for r in runs for t in r["tools"].values() for p in (t.get("procs") or {})})
        m["procs"] = {}
        for p in procs:
            cpu = [sum((t.get("procs") or {}).get(p, {}).get("cpu_s") or 0 for t in r["tools"].values())
                   for r in runs]
            rss = [(t.get("procs") or {}).get(p, {}).get("peak_rss_bytes") for r in runs
                   for t in r["tools"].values()]
            m["procs"][p] = {"cpu_s": _median(cpu), "peak_rss_bytes": _max(rss)}
        m["mesh_cpu_s"] = sum(v["cpu_s"] or 0 for v in m["procs"].values()) if procs else None
        m["mesh_peak_rss_bytes"] = (sum(v["peak_rss_bytes"] or 0 for v in m["procs"].values())
                                    if procs else None)
        statuses = [r["path"]["status"] for r in runs]
        m["status"] = ("invalid" if "invalid" in statuses else
                       "fast path not available" if "fast path not available" in statuses else
                       "error" if "error" in statuses else "ok")
        m["path_details"] = [r["path"]["detail"] for r in runs]
        m["errors"] = [f"round {r['round']}: {k}: {t['error']}" for r in runs
                       for k, t in r["tools"].items() if t.get("error")]
        m["retries"] = [f"round {r['round']}: {k}: retried once after: {t['retried_after']}"
                        for r in runs for k, t in r["tools"].items() if t.get("retried_after")]
        out[sid] = m
    return out


def _ratio(a, b):
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def _diff(a, b):
    return a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None


def ratios(summary: dict) -> list[dict]:
    rows = []
    for a, b in RATIOS:
        sa, sb = summary.get(str(a)), summary.get(str(b))
        if not sa or not sb:
            continue
        row = {"scenario": a, "baseline": b, "label": f"{a} vs {b}",
               "valid": sa.get("status") in ("ok", "fast path not available") and
               sb.get("status") in ("ok", "fast path not available"),
               "note": ", ".join(f"{x}: {summary[str(x)].get('status')}" for x in (a, b)
                                 if summary[str(x)].get("status") != "ok")}
        for k in ("tput_1_gbps", "tput_4_gbps", "conn_rate"):
            row[f"{k}_ratio"] = _ratio(sa.get(k), sb.get(k))
        for k in LAT_KEYS:
            row[f"{k}_p50_ratio"] = _ratio(sa.get(f"{k}_p50_us"), sb.get(f"{k}_p50_us"))
            row[f"{k}_p50_added_us"] = _diff(sa.get(f"{k}_p50_us"), sb.get(f"{k}_p50_us"))
        rows.append(row)
    return rows


def added_latency_vs_envoy(summary: dict) -> dict:
    """meshlane's added p50 (4 - 2) against Envoy's (6 - 2), per latency run."""
    out = {}
    s2, s4, s6 = (summary.get(k, {}) for k in ("2", "4", "6"))
    for k in LAT_KEYS:
        ml = _diff(s4.get(f"{k}_p50_us"), s2.get(f"{k}_p50_us"))
        ev = _diff(s6.get(f"{k}_p50_us"), s2.get(f"{k}_p50_us"))
        out[k] = {"meshlane_added_us": ml, "envoy_added_us": ev, "meshlane_over_envoy": _ratio(ml, ev)}
    return out


# --- memory: agent+ztunnel for N pods vs N sidecars -----------------------------------
def _dig(obj, path: str):
    """obj["a"]["b"]... for path "a.b...", None when any step is missing."""
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def memory_comparison(enrolment, sidecars, counts: list[int]) -> list[dict]:
    """Per N present in both results: node agents + ztunnels with N pods enrolled
    (bench.enrolment `counts.N.total_vmrss_mib` / `total_pss_mib`) against N Envoy
    sidecars (bench.peers `counts.N.total_vmrss_mib` / `total_pss_mib`), MiB."""
    rows = []
    for n in counts:
        e, c = _dig(enrolment, f"counts.{n}"), _dig(sidecars, f"counts.{n}")
        if not isinstance(e, dict) or not isinstance(c, dict):
            continue
        row = {"count": n}
        for kind in ("vmrss", "pss"):
            mesh = _num(e.get(f"total_{kind}_mib"))
            side = _num(c.get(f"total_{kind}_mib"))
            if side is None:
                side = _num(_dig(c, f"{kind}.sum_mib"))
            row[f"mesh_{kind}_mib"], row[f"sidecars_{kind}_mib"] = mesh, side
            row[f"sidecars_over_mesh_{kind}"] = _ratio(side, mesh)
        rows.append(row)
    return rows


# --- formatting ----------------------------------------------------------------------
def _f(v, fmt="{:.2f}", none="–"):
    return none if v is None else fmt.format(v)


def _us(v):
    return _f(v, "{:.0f}")


def _x(v):
    return _f(v, "{:.2f}×")


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list) and all(isinstance(x, (int, float, str)) for x in obj):
        yield prefix, ", ".join(str(x) for x in obj)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def markdown(doc: dict) -> str:
    h, summary = doc["header"], doc["summary"]
    d = h["durations"]
    L = [f"# meshlane bench, {h['date']}", "",
         "| | |", "|---|---|",
         f"| date | {h['date']} |",
         f"| machine | {h['cores']} cores, {h['cpu_model']}, kernel {h['kernel']}, "
         f"{h['memory_gib']:.0f} GiB |",
         f"| command | `{h['command']}` |",
         f"| source | {h.get('source') or 'unknown'} |",
         f"| durations | {d['rounds']} round(s), scenario order rotated each round; "
         f"iperf3 {d['bulk_s']:g} s (+{d['omit_s']} s omitted) with 1 and 4 streams; "
         f"sockperf ping-pong {d['latency_s']:g} s at {d['fixed_rate']} req/s and unthrottled, "
         f"{d['msg_bytes']} B messages; connrate {d['conn_s']:g} s |",
         f"| tools | {h['tools'].get('iperf3')}; {h['tools'].get('sockperf')}; "
         f"connrate: {h['tools'].get('connrate')} |",
         f"| load average | {h['loadavg_start']} at start, {h.get('loadavg_end', '?')} at end |",
         f"| wall time | {h.get('wall_s', 0):.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in h.get('phases_s', {}).items())}) |",
         ""]
    L += [f"## Pod to pod (median of {d['rounds']} round(s))", "",
          "| # | scenario | path | Gbit/s 1 stream | Gbit/s 4 streams | RTT µs p50 / p90 / p99 at "
          f"{d['fixed_rate']}/s | RTT µs p50 / p90 / p99 unthrottled | req/s unthrottled | conn/s (p50 ms each) | "
          "mesh CPU s | mesh peak RSS MiB |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for sid in sorted(summary, key=int):
        m = summary[sid]
        if not m.get("rounds"):
            L.append(f"| {sid} | {m['title']} | {m.get('status')} | | | | | | | | |")
            continue
        lat = ["/".join(_us(m.get(f"{k}_{p}")) for p in ("p50_us", "p90_us", "p99_us")) for k in LAT_KEYS]
        L.append(f"| {sid} | {m['title']} | {m['status']} | {_f(m.get('tput_1_gbps'))} | "
                 f"{_f(m.get('tput_4_gbps'))} | {lat[0]} | {lat[1]} | {_f(m.get('lat_max_rate'), '{:.0f}')} | "
                 f"{_f(m.get('conn_rate'), '{:.0f}')} ({_f((m.get('conn_p50_us') or 0) / 1000, '{:.2f}')}) | "
                 f"{_f(m.get('mesh_cpu_s'), '{:.1f}')} | "
                 f"{_f(m['mesh_peak_rss_bytes'] / MIB if m.get('mesh_peak_rss_bytes') else None, '{:.0f}')} |")
    L += ["", "RTT = sockperf ping-pong round trip of one 1 KiB request and its 1 KiB response "
          "(`--full-rtt`, microseconds). Mesh CPU s = utime+stime of the node agents, ztunnels or "
          "Envoys carrying the scenario, summed over all its tools in one round; peak RSS = the "
          "largest VmRSS sampled at 10 Hz.", ""]
    L += ["## Ratios", "",
          "Throughput and conn/s: scenario / baseline (1.00× = as fast). Latency: p50 ratio and "
          "added p50 = scenario p50 − baseline p50.", "",
          "| comparison | Gbit/s 1 stream | Gbit/s 4 streams | conn/s | p50 at fixed rate | added p50 µs "
          "at fixed rate | p50 unthrottled | added p50 µs unthrottled | note |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["ratios"]:
        a, b = BY_ID[r["scenario"]], BY_ID[r["baseline"]]
        L.append(f"| {r['label']}: {a.title} vs {b.title} | {_x(r['tput_1_gbps_ratio'])} | "
                 f"{_x(r['tput_4_gbps_ratio'])} | {_x(r['conn_rate_ratio'])} | {_x(r['lat_1000_p50_ratio'])} | "
                 f"{_f(r['lat_1000_p50_added_us'], '{:+.0f}')} | {_x(r['lat_max_p50_ratio'])} | "
                 f"{_f(r['lat_max_p50_added_us'], '{:+.0f}')} | {r['note'] or ''} |")
    ae = doc.get("added_latency_vs_envoy", {})
    if ae:
        L += ["", "Added p50 latency over the cross-node baseline (2), meshlane HBONE (4) vs Envoy (6):", ""]
        for k, label in (("lat_1000", f"at {d['fixed_rate']} req/s"), ("lat_max", "unthrottled")):
            v = ae.get(k, {})
            L.append(f"- {label}: meshlane {_f(v.get('meshlane_added_us'), '{:+.0f}')} µs, Envoy "
                     f"{_f(v.get('envoy_added_us'), '{:+.0f}')} µs (meshlane / Envoy = "
                     f"{_x(v.get('meshlane_over_envoy'))})")
    L += ["", "## Path checks (kernel counters before/after each scenario, client's node)", "",
          "| # | status | detail (per round) |", "|---|---|---|"]
    for sid in sorted(summary, key=int):
        m = summary[sid]
        L.append(f"| {sid} | {m.get('status')} | {'<br>'.join(m.get('path_details') or []) or ''} |")
    L += ["", "## Mesh processes per scenario (median CPU s per round, peak RSS)", "",
          "| # | process | CPU s | peak RSS MiB |", "|---|---|---|---|"]
    for sid in sorted(summary, key=int):
        for p, v in (summary[sid].get("procs") or {}).items():
            L.append(f"| {sid} | {p} | {_f(v['cpu_s'])} | "
                     f"{_f(v['peak_rss_bytes'] / MIB if v['peak_rss_bytes'] else None, '{:.0f}')} |")
    L += ["", "## Enrolment cost (bench.enrolment)", ""]
    L += _table(doc.get("enrolment"), ENROL_COLUMNS)
    L += ["", "## Envoy sidecars, memory (bench.peers)", ""]
    L += _table(doc.get("sidecars"), SIDECAR_COLUMNS)
    L += ["", "## Memory: meshlane node agent + ztunnel with N pods vs N Envoy sidecars", "",
          "VmRSS counts shared pages (Envoy's binary, Python's libraries) in every process; PSS "
          "shares them out.", ""]
    if doc.get("memory"):
        L += ["| N | agent + ztunnel VmRSS MiB | N sidecars VmRSS MiB | sidecars / meshlane | "
              "agent + ztunnel PSS MiB | N sidecars PSS MiB | sidecars / meshlane |", "|---|---|---|---|---|---|---|"]
        for r in doc["memory"]:
            L.append(f"| {r['count']} | {_f(r['mesh_vmrss_mib'], '{:.0f}')} | {_f(r['sidecars_vmrss_mib'], '{:.0f}')} | "
                     f"{_x(r['sidecars_over_mesh_vmrss'])} | {_f(r['mesh_pss_mib'], '{:.0f}')} | "
                     f"{_f(r['sidecars_pss_mib'], '{:.0f}')} | {_x(r['sidecars_over_mesh_pss'])} |")
    else:
        L.append("not available (needs the enrolment and the sidecar results for a common N)")
    errs = [(sid, e) for sid in sorted(summary, key=int)
            for e in (summary[sid].get("errors") or []) + (summary[sid].get("retries") or [])]
    if errs or doc.get("problems"):
        L += ["", "## Problems", ""]
        L += [f"- scenario {sid}: {e}" for sid, e in errs]
        L += [f"- {p}" for p in doc.get("problems", [])]
    L += ["", "## Notes", ""] + [f"- {n}" for n in doc.get("notes", [])]
    if doc.get("charts"):
        L += ["", "## Charts", ""] + [f"![{Path(c).stem}]({Path(c).name})" for c in doc["charts"]]
    return "\n".join(L) + "\n"


ENROL_COLUMNS = (
    ("nodes", "nodes", "{}"),
    ("time to enrol all, s", "attach.seconds", "{:.2f}"),
    ("pods/s", "attach.pods_per_second", "{:.1f}"),
    ("kernel attach ms (median)", "attach.kernel_attach_ms.median", "{:.1f}"),
    ("agent per pod ms (median)", "attach.agent_total_ms.median", "{:.1f}"),
    ("agent + ztunnel VmRSS MiB, 0 enrolled", "idle_0_enrolled.total.vmrss_mib", "{:.0f}"),
    ("VmRSS MiB, all enrolled", "total_vmrss_mib", "{:.0f}"),
    ("PSS MiB, all enrolled", "total_pss_mib", "{:.0f}"),
    ("VmRSS KiB per pod", "delta.vmrss_kib_per_pod", "{:.0f}"),
    ("enrol CPU s", "delta.cpu_seconds", "{:.2f}"),
)
SIDECAR_COLUMNS = (
    ("ready", "ready", "{}"),
    ("start s", "start_seconds", "{:.1f}"),
    ("VmRSS MiB, all", "vmrss.sum_mib", "{:.0f}"),
    ("VmRSS MiB per Envoy (median)", "vmrss.median_mib", "{:.1f}"),
    ("PSS MiB, all", "pss.sum_mib", "{:.0f}"),
    ("PSS MiB per Envoy (median)", "pss.median_mib", "{:.1f}"),
    ("RssAnon MiB per Envoy (median)", "rss_anon.median_mib", "{:.1f}"),
)


def _table(result, columns) -> list[str]:
    """One row per N of a helper's `counts`; the full result stays in latest.json."""
    if result is None:
        return ["not run"]
    if isinstance(result, str):
        return [result]
    counts = result.get("counts") if isinstance(result, dict) else None
    if not isinstance(counts, dict) or not counts:
        rows = list(_flatten(result))[:40]
        return ["| key | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    L = ["| N | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    notes = []
    for n in sorted(counts, key=lambda k: int(k) if str(k).isdigit() else 0):
        row = counts[n]
        cells = []
        for _title, path, fmt in columns:
            v = _dig(row, path)
            cells.append("–" if v is None else fmt.format(v) if _num(v) is not None else str(v))
        L.append(f"| {n} | " + " | ".join(cells) + " |")
        for k in ("warning", "error", "teardown_error"):
            if isinstance(row, dict) and row.get(k):
                notes.append(f"- N={n}: {k}: {row[k]}")
    return L + ([""] + notes if notes else [])


# --- charts --------------------------------------------------------------------------
def charts(doc: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = doc["summary"]
    ids = [sid for sid in sorted(summary, key=int) if summary[sid].get("rounds")]
    if not ids:
        return []
    labels = [f"{sid}\n{summary[sid]['key']}" + ("\n(invalid)" if summary[sid]["status"] == "invalid" else "")
              for sid in ids]
    made = []

    def bars(ax, series: dict[str, list], ylabel: str, log: bool = False):
        n = len(series)
        width = 0.8 / max(n, 1)
        for i, (name, vals) in enumerate(series.items()):
            xs = [j + (i - (n - 1) / 2) * width for j in range(len(ids))]
            ax.bar(xs, [v if v is not None else 0 for v in vals], width, label=name)
        ax.set_xticks(range(len(ids)), labels, fontsize=8)
        ax.set_ylabel(ylabel)
        if log and any(v for vals in series.values() for v in vals if v):
            ax.set_yscale("log")
        if n > 1:
            ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(str(path))

    fig, ax = plt.subplots(figsize=(9, 4.5))
    bars(ax, {"1 stream": [summary[s].get("tput_1_gbps") for s in ids],
              "4 streams": [summary[s].get("tput_4_gbps") for s in ids]}, "Gbit/s (iperf3)")
    ax.set_title("Bulk throughput, pod to pod")
    save(fig, "throughput.png")

    rate = doc["header"]["durations"]["fixed_rate"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, k, title in ((axes[0], "lat_1000", f"at {rate} req/s"), (axes[1], "lat_max", "unthrottled")):
        bars(ax, {p: [summary[s].get(f"{k}_{p}_us") for s in ids] for p in ("p50", "p90", "p99")},
             "round trip, µs (log)", log=True)
        ax.set_title(f"1 KiB request/response latency, {title}")
    save(fig, "latency.png")

    fig, ax = plt.subplots(figsize=(9, 4.5))
    bars(ax, {"conn/s": [summary[s].get("conn_rate") for s in ids]}, "new connections / s")
    ax.set_title("Connection rate (connect, 1 byte each way, close)")
    save(fig, "connrate.png")

    def by_kind(field: str, scale: float) -> dict[str, list]:
        kinds = {"node agents": "node-", "ztunnels": "ztunnel-", "Envoys": "envoy:"}
        return {k: [sum((v[field] or 0) / scale for p, v in (summary[s].get("procs") or {}).items()
                        if p.startswith(prefix)) for s in ids] for k, prefix in kinds.items()}

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, field, scale, ylabel, title in (
            (axes[0], "cpu_s", 1, "CPU seconds per round", "Mesh processes: CPU (utime+stime)"),
            (axes[1], "peak_rss_bytes", MIB, "MiB", "Mesh processes: peak RSS")):
        bottom = [0.0] * len(ids)
        for kind, vals in by_kind(field, scale).items():
            ax.bar(range(len(ids)), vals, 0.6, bottom=bottom, label=kind)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(len(ids)), labels, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.margins(y=0.15)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    save(fig, "resources.png")

    if doc.get("memory"):
        rows = doc["memory"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs = range(len(rows))
        series = (("meshlane agent + ztunnel, VmRSS", "mesh_vmrss_mib"), ("Envoy sidecars, VmRSS", "sidecars_vmrss_mib"),
                  ("meshlane agent + ztunnel, PSS", "mesh_pss_mib"), ("Envoy sidecars, PSS", "sidecars_pss_mib"))
        for i, (label, key) in enumerate(series):
            ax.bar([x + (i - 1.5) * 0.2 for x in xs], [r[key] or 0 for r in rows], 0.2, label=label)
        ax.set_xticks(list(xs), [f"{r['count']} pods" for r in rows])
        ax.set_ylabel("MiB")
        ax.set_title("Memory: node proxy vs per-pod sidecars")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        save(fig, "memory.png")
    return made


def write(doc: dict, out: Path) -> list[Path]:
    """Fill in summary, ratios and memory; write charts, latest.json and latest.md."""
    out.mkdir(parents=True, exist_ok=True)
    doc["summary"] = summarise(doc["raw"])
    doc["ratios"] = ratios(doc["summary"])
    doc["added_latency_vs_envoy"] = added_latency_vs_envoy(doc["summary"])
    doc["memory"] = memory_comparison(doc.get("enrolment"), doc.get("sidecars"),
                                      sorted(set(doc["header"]["enrolment_counts"]) |
                                             set(doc["header"]["sidecar_counts"])))
    try:
        doc["charts"] = charts(doc, out)
    except ImportError as exc:
        doc.setdefault("problems", []).append(f"no charts: matplotlib is missing ({exc}); "
                                              "`.venv/bin/pip install -e '.[bench]'`")
        doc["charts"] = []
    paths = [out / "latest.json", out / "latest.md"]
    paths[0].write_text(json.dumps(doc, indent=1, default=str) + "\n")
    paths[1].write_text(markdown(doc))
    return paths + [Path(c) for c in doc["charts"]]


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.report [RESULTS.json]`: re-render latest.md and the charts from a
    results file (default bench/results/latest.json) without measuring again."""
    import sys
    argv = sys.argv[1:] if argv is None else argv
    src = Path(argv[0]) if argv else Path(__file__).resolve().parent / "results" / "latest.json"
    if len(argv) > 1 or not src.is_file():
        print(f"bench.report: usage: python -m bench.report [RESULTS.json] ({src} not found)"
              if not src.is_file() else "bench.report: usage: python -m bench.report [RESULTS.json]",
              file=sys.stderr)
        return 64
    try:
        doc = json.loads(src.read_text())
        if not isinstance(doc, dict) or "raw" not in doc or "header" not in doc:
            raise ValueError("not a bench results file (no header/raw)")
    except ValueError as exc:
        print(f"bench.report: {src}: {exc}", file=sys.stderr)
        return 65
    for p in write(doc, src.parent):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
