"""`python -m bench.l7 [--quick]` (`make bench-l7`): HTTP request latency through L7 waypoints.

Builds a lab of its own (two nodes, lab name `bl7<N>`), sends sequential HTTP/1.1 GETs
from a client pod's netns (a socket created inside the netns, used from this thread) and
measures, per scenario, a keep-alive series (one connection, many requests) and a
new-connection series (connect, one request, close):

  phase 1 (no waypoint)                     phase 2 (waypoint on node1)
    0 mesh-free: legacy client -> plain pod   0 and 1 again (baselines of the phase)
    1 enrolled client -> plain pod            3 waypoint: client -> VIP of echo:80
      (ztunnel passthrough)                   4 waypoint + HTTPRoute (weighted backendRef +
    2 HBONE: client -> VIP of echo:80           RequestHeaderModifier) + L7 DENY on DELETE,
      (ztunnel picks the endpoint)              on Service echo2 (the same pod as echo)

Scenarios of a phase run in rounds with the order rotated each round.  Each scenario's path
is checked before it is measured (ztunnel access records, headers the waypoint adds, the
DENY answering 403).  The lab is torn down on every exit (success, failure, Ctrl-C,
SIGTERM).  Traffic goes only to addresses inside the lab's namespaces.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "results"
EX_USAGE, EX_UNAVAILABLE, EX_NOPERM, EX_INTERRUPTED = 64, 69, 77, 130

FULL = {"rounds": 5, "requests": 200, "conn_requests": 100, "warmup": 20}
QUICK = {"rounds": 2, "requests": 40, "conn_requests": 15, "warmup": 5}

TOPOLOGY = """
nodes: [node1, node2]
namespaces:
  demo: {labels: {"istio.io/dataplane-mode": ambient}}
  legacy: {labels: {}}
pods:
  - {name: client, node: node1, namespace: demo, serviceAccount: client, app: none}
  - {name: lclient, node: node1, namespace: legacy, serviceAccount: client, app: none}
  - {name: echo, node: node2, namespace: demo, serviceAccount: echo, app: http, labels: {app: echo}}
  - {name: plain, node: node2, namespace: legacy, serviceAccount: plain, app: http, labels: {app: plain}}
services:
  - {name: echo, namespace: demo, ports: [{name: http, port: 80, targetPort: 8080}], selector: {app: echo}}
  - {name: echo2, namespace: demo, ports: [{name: http, port: 80, targetPort: 8080}], selector: {app: echo}}
"""

SCENARIOS = {
    "s0": "0 mesh-free (legacy client -> plain pod)",
    "s1": "1 no mesh, enrolled client -> plain pod (ztunnel passthrough)",
    "s2": "2 ztunnel HBONE (VIP, no waypoint)",
    "s3": "3 waypoint (VIP via Envoy)",
    "s4": "4 waypoint + HTTPRoute + L7 DENY",
}
PHASES = {"1": ["s0", "s1", "s2"], "2": ["s0", "s1", "s3", "s4"]}


class UsageError(Exception):
    pass


class BenchError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 64, no usage dump
        raise UsageError(message)


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {v}")
    return v


def parse_args(argv: list[str]) -> dict:
    ap = _Parser(prog="python -m bench.l7", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~30 s smoke run")
    ap.add_argument("--rounds", type=_positive, help=f"rounds per phase (default {FULL['rounds']})")
    ap.add_argument("--requests", type=_positive,
                    help=f"keep-alive requests per scenario and round (default {FULL['requests']})")
    ap.add_argument("--conn-requests", type=_positive,
                    help=f"new-connection requests per scenario and round (default {FULL['conn_requests']})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default bench/results)")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    a = ap.parse_args(argv)
    cfg = dict(QUICK if a.quick else FULL)
    for k in ("rounds", "requests", "conn_requests"):
        if getattr(a, k) is not None:
            cfg[k] = getattr(a, k)
    cfg.update(quick=a.quick, out=a.out, write=not a.no_write)
    return cfg


def progress(msg: str) -> None:
    print(f"bench-l7: {msg}", file=sys.stderr, flush=True)


# --- HTTP from inside a pod ------------------------------------------------------------------

def _pod_socket(ns: str) -> socket.socket:
    from meshcore import netns
    with netns.entered(ns):
        s = socket.socket()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(10)
    return s


def _request(host: str, path: str = "/bench", method: str = "GET", close: bool = False) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: bench-l7\r\n{extra}\r\n".encode()


def _read_response(s: socket.socket, buf: bytearray) -> tuple[int, dict, bytes]:
    """One response from `s` (Content-Length framing; the lab app and Envoy both send it).
    `buf` carries bytes read past the response over to the next call."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        chunk = s.recv(65536)
        if not chunk:
            raise BenchError("connection closed before a response")
        buf += chunk
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[:end + 4]
    status = int(head[0].split(" ", 2)[1])
    headers = {}
    for line in head[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0"))
    while len(buf) < n:
        chunk = s.recv(65536)
        if not chunk:
            raise BenchError("connection closed inside a response body")
        buf += chunk
    body = bytes(buf[:n])
    del buf[:n]
    return status, headers, body


def one_request(ns: str, ip: str, port: int, method: str = "GET", path: str = "/bench") -> tuple[int, dict, bytes]:
    s = _pod_socket(ns)
    with s:
        s.connect((ip, port))
        s.sendall(_request(ip, path, method, close=True))
        return _read_response(s, bytearray())


def keepalive_series(ns: str, ip: str, port: int, n: int, warmup: int) -> tuple[list[float], float]:
    """`n` sequential GETs on one connection after `warmup` unrecorded ones:
    (latencies in ms, wall seconds of the recorded ones)."""
    s = _pod_socket(ns)
    req = _request(ip)
    buf = bytearray()
    out = []
    with s:
        s.connect((ip, port))
        for _ in range(warmup):
            s.sendall(req)
            _read_response(s, buf)
        t_start = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            s.sendall(req)
            status, _, _ = _read_response(s, buf)
            out.append((time.perf_counter() - t0) * 1e3)
            if status != 200:
                raise BenchError(f"{ip}:{port} answered {status} in the keep-alive series")
        wall = time.perf_counter() - t_start
    return out, wall


def newconn_series(ns: str, ip: str, port: int, n: int) -> tuple[list[float], float]:
    """`n` requests, each on a new connection (connect, GET, response, close); the socket is
    created in the netns before the clock starts."""
    req = _request(ip, close=True)
    out = []
    wall = 0.0
    for _ in range(n):
        s = _pod_socket(ns)
        t0 = time.perf_counter()
        with s:
            s.connect((ip, port))
            s.sendall(req)
            status, _, _ = _read_response(s, bytearray())
        dt_ = time.perf_counter() - t0
        wall += dt_
        out.append(dt_ * 1e3)
        if status != 200:
            raise BenchError(f"{ip}:{port} answered {status} in the new-connection series")
    return out, wall


# --- the lab ----------------------------------------------------------------------------------

def cli(lab: str, *args: str, timeout: float = 120) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MESHLANE_LAB"}
    res = subprocess.run([sys.executable, "-m", "meshlane.cli", *args, "--lab", lab], capture_output=True,
                         text=True, timeout=timeout, cwd=REPO, env=env)
    if res.returncode != 0:
        raise BenchError(f"`meshlane {' '.join(args)}` failed ({res.returncode}): "
                         f"{(res.stderr or res.stdout).strip().splitlines()[-1:]}")
    return res.stdout + res.stderr


def zt_records(lab: str, node: str) -> list[dict]:
    from meshcore import constants as C
    from meshlane import lab as labmod
    code, body = labmod.http_get_in_netns(f"{lab}-{node}", C.PORT_ADMIN, "/connections")
    if code != 200:
        raise BenchError(f"ztunnel admin of {node} answered {code}")
    return json.loads(body)["recent"]


def wait_until(what: str, cond, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
        except (OSError, BenchError) as exc:
            last = exc
        time.sleep(0.2)
    raise BenchError(f"{what}: not seen within {timeout:.0f}s" + (f" (last error: {last})" if last else ""))


class Run:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.lab = f"bl7{os.getpid() % 10000}"
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-l7-"))
        self.pods: dict[str, dict] = {}
        self.vips: dict[str, str] = {}
        self.checks: list[str] = []
        self.waypoint = ""

    def target(self, sc: str) -> tuple[str, str, int]:
        """(client netns, ip, port) of a scenario."""
        if sc == "s0":
            return self.pods["lclient"]["netns"], self.pods["plain"]["ip"], 8080
        if sc == "s1":
            return self.pods["client"]["netns"], self.pods["plain"]["ip"], 8080
        if sc == "s4":
            return self.pods["client"]["netns"], self.vips["echo2"], 80
        return self.pods["client"]["netns"], self.vips["echo"], 80

    def apply(self, obj: dict, name: str) -> None:
        f = self.tmp / name
        f.write_text(yaml.safe_dump(obj))
        cli(self.lab, "apply", "-f", str(f))

    # path checks: each scenario goes where its name says
    def check(self, sc: str) -> None:
        ns, ip, port = self.target(sc)
        status, headers, body = one_request(ns, ip, port)
        if status != 200:
            raise BenchError(f"scenario {sc}: {status} from {ip}:{port}")
        doc = json.loads(body)
        via_envoy = "x-forwarded-proto" in doc["headers"]
        want_envoy = sc in ("s3", "s4")
        if via_envoy != want_envoy:
            raise BenchError(f"scenario {sc}: {'an' if via_envoy else 'no'} Envoy on the path (headers {doc['headers']})")
        if sc == "s0":
            # mesh-free: the server sees the legacy client's own address, and no ztunnel logs it
            if doc["peer"].split(":")[0] != self.pods["lclient"]["ip"]:
                raise BenchError(f"s0: peer {doc['peer']}")
            self.checks.append(f"s0: answered by {doc['pod']}, peer {doc['peer']} (the legacy client), no Envoy headers")
            return
        if sc == "s1":
            dst = f"{ip}:{port}"
            rec = wait_until("s1 passthrough record on node1", lambda: next(
                (r for r in reversed(zt_records(self.lab, "node1")) if r.get("dst") == dst
                 and r.get("protocol") == "PASSTHROUGH"), None), 8)
            self.checks.append(f"s1: node1 ztunnel record protocol={rec.get('protocol')} dst={rec.get('dst')} "
                               f"(enrolled client -> non-enrolled pod is redirected to the ztunnel and passed through)")
            return
        if sc == "s2":
            rec = wait_until("s2 HBONE record on node1", lambda: next(
                (r for r in reversed(zt_records(self.lab, "node1")) if r.get("service") == "demo/echo"
                 and r.get("direction") == "outbound" and "waypoint" not in r), None), 8)
            self.checks.append(f"s2: node1 ztunnel record protocol={rec.get('protocol')} service=demo/echo "
                               f"dst={rec.get('dst')}, no waypoint; answered by {doc['pod']}")
            return
        svc = "demo/echo2" if sc == "s4" else "demo/echo"
        rec = wait_until(f"{sc} waypoint record on node1", lambda: next(
            (r for r in reversed(zt_records(self.lab, "node1")) if r.get("waypoint") == "demo/waypoint"
             and r.get("service") == svc), None), 8)
        line = (f"{sc}: node1 ztunnel record service={svc} waypoint=demo/waypoint "
                f"dst_identity={rec.get('dst_identity')}; "
                f"x-forwarded-proto={doc['headers'].get('x-forwarded-proto')}")
        if sc == "s4":
            if doc["headers"].get("x-bench-filter") != "on":
                raise BenchError(f"s4: the route's header filter is not applied ({doc['headers']})")
            st = one_request(ns, ip, port, "DELETE")[0]
            if st != 403:
                raise BenchError(f"s4: DELETE answered {st}, want 403")
            line += f"; x-bench-filter=on added by the route; DELETE -> {st}"
        self.checks.append(line)

    def measure_phase(self, phase: str) -> list[dict]:
        scs = PHASES[phase]
        c = self.cfg
        rows = []
        for r in range(c["rounds"]):
            order = scs[r % len(scs):] + scs[:r % len(scs)]
            for sc in order:
                ns, ip, port = self.target(sc)
                ka, ka_wall = keepalive_series(ns, ip, port, c["requests"], c["warmup"])
                nc, nc_wall = newconn_series(ns, ip, port, c["conn_requests"])
                rows.append({"phase": phase, "round": r + 1, "scenario": sc, "keepalive": ka,
                             "keepalive_wall_s": ka_wall, "newconn": nc, "newconn_wall_s": nc_wall})
            progress(f"phase {phase}: round {r + 1}/{c['rounds']} done ({' '.join(order)})")
        return rows

    def run(self) -> dict:
        from meshcore.errors import NotFoundError
        from meshlane import lab as labmod
        t_all = time.monotonic()
        topo = self.tmp / "topology.yaml"
        topo.write_text(TOPOLOGY)
        header = machine()
        header["loadavg_start"] = _loadavg()
        rows: list[dict] = []
        try:
            t0 = time.monotonic()
            progress(f"building lab {self.lab}")
            state = labmod.up(self.lab, str(topo))
            header["lab_up_s"] = round(time.monotonic() - t0, 1)
            self.pods = {p["name"]: p for p in state["pods"]}
            for svc in ("echo", "echo2"):
                self.vips[svc] = _vip(self.lab, svc)
            for sc in PHASES["1"]:
                self.check(sc)
            rows += self.measure_phase("1")

            progress("applying the waypoint")
            t0 = time.monotonic()
            out = cli(self.lab, "waypoint", "apply", "-n", "demo", "--enroll-namespace")
            self.waypoint = next((ln for ln in out.splitlines() if "programmed" in ln), out.strip())
            ns, ip, port = self.target("s3")
            wait_until("traffic to echo through the waypoint", lambda: "x-forwarded-proto" in
                       json.loads(one_request(ns, ip, port)[2])["headers"])
            self.apply({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                        "metadata": {"name": "echo2", "namespace": "demo"},
                        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "echo2", "port": 80}],
                                 "rules": [{"filters": [{"type": "RequestHeaderModifier",
                                                         "requestHeaderModifier": {
                                                             "add": [{"name": "x-bench-filter", "value": "on"}]}}],
                                            "backendRefs": [{"name": "echo2", "port": 80, "weight": 100}]}]}},
                       "route.yaml")
            self.apply({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                        "metadata": {"name": "no-delete", "namespace": "demo"},
                        "spec": {"targetRefs": [{"kind": "Service", "group": "", "name": "echo2"}],
                                 "action": "DENY", "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]}},
                       "authz.yaml")
            ns, ip, port = self.target("s4")
            wait_until("route and DENY in the waypoint", lambda: one_request(ns, ip, port, "DELETE")[0] == 403
                       and json.loads(one_request(ns, ip, port)[2])["headers"].get("x-bench-filter") == "on")
            header["waypoint_setup_s"] = round(time.monotonic() - t0, 1)
            for sc in PHASES["2"]:
                self.check(sc)
            rows += self.measure_phase("2")
        finally:
            # no second Ctrl-C / SIGTERM in the middle of the teardown
            old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
            old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                labmod.down(self.lab, quiet=True)
            except NotFoundError:
                pass    # `up` failed and already rolled back
            except Exception as exc:  # noqa: BLE001 - report, the original error matters
                progress(f"lab down problem: {exc}")
            finally:
                signal.signal(signal.SIGINT, old_int)
                signal.signal(signal.SIGTERM, old_term)
        header["loadavg_end"] = _loadavg()
        header["wall_s"] = round(time.monotonic() - t_all, 1)
        leftovers = leftover_check(self.lab)
        return {"header": header, "config": {k: v for k, v in self.cfg.items() if k not in ("out", "write")},
                "lab": self.lab, "waypoint": self.waypoint, "checks": self.checks,
                "summary": summarize(rows), "rounds": rows, "leftovers": leftovers}


def _vip(lab: str, svc: str) -> str:
    out = cli(lab, "get", "services", svc, "-n", "demo", "-o", "json")
    start = out.index("{")
    return json.JSONDecoder().raw_decode(out[start:])[0]["spec"]["clusterIP"]


def leftover_check(lab: str) -> dict:
    """What of the lab is still there after `down` (should be nothing)."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    netns_left = [ln.split()[0] for ln in ns if ln.startswith(f"{lab}-")]
    pin_root = Path("/sys/fs/bpf/meshlane")
    pins = [p.name for p in pin_root.glob(f"{lab}-*")] if pin_root.exists() else []
    envoys = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "envoy" in cmd and lab in cmd:
                envoys.append(int(d.name))
    return {"netns": netns_left, "bpf_pins": pins, "envoy_pids": envoys}


# --- statistics and report ----------------------------------------------------------------------

def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    k = min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))  # nearest rank
    return s[k]


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for phase, scs in PHASES.items():
        for mode in ("keepalive", "newconn"):
            per = {}
            for sc in scs:
                rs = [r for r in rows if r["phase"] == phase and r["scenario"] == sc]
                if not rs:
                    continue
                xs = [x for r in rs for x in r[mode]]
                wall = sum(r[f"{mode}_wall_s"] for r in rs)
                per[sc] = {"phase": phase, "scenario": sc, "name": SCENARIOS[sc], "mode": mode,
                           "n": len(xs), "median_ms": statistics.median(xs), "p99_ms": _pct(xs, 99),
                           "rps": len(xs) / wall if wall else 0.0,
                           "round_medians_ms": [statistics.median(r[mode]) for r in rs]}
            for sc, d in per.items():
                for base in ("s0", "s1"):
                    b = per.get(base)
                    if b:
                        d[f"x_median_vs_{base}"] = d["median_ms"] / b["median_ms"]
                        d[f"x_p99_vs_{base}"] = d["p99_ms"] / b["p99_ms"]
                        d[f"x_rps_vs_{base}"] = d["rps"] / b["rps"]
                out.append(d)
    return out


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from tests.envoy_util import envoy_binary
    envoy = subprocess.run([envoy_binary() or "envoy", "--version"], capture_output=True, text=True).stdout.strip().split()
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": shlex.join([sys.executable.replace(str(REPO) + "/", ""), "-m", "bench.l7", *sys.argv[1:]]),
            "cores": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "envoy": envoy[-1] if envoy else "?"}


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def markdown(doc: dict) -> str:
    h, c = doc["header"], doc["config"]
    lines = ["# L7 waypoint HTTP benchmark (bench.l7)", "",
             "| | |", "|---|---|",
             f"| command | `{h['command']}` |",
             f"| date | {h['date']} |",
             f"| machine | {h['cores']} cores, {h['cpu_model']}, kernel {h['kernel']} |",
             f"| software | Python {h['python']}, Envoy {h['envoy']} |",
             f"| load average | {h['loadavg_start']} at start, {h['loadavg_end']} at end |",
             f"| run | {'quick, ' if c['quick'] else ''}{c['rounds']} rounds per phase; per scenario and round "
             f"{c['requests']} keep-alive GETs (after {c['warmup']} unrecorded) + {c['conn_requests']} "
             f"new-connection GETs |",
             f"| timing | lab up {h.get('lab_up_s', '?')} s, waypoint + route + policy ready "
             f"{h.get('waypoint_setup_s', '?')} s, whole run {h['wall_s']} s |",
             f"| waypoint | {doc['waypoint']} |", ""]
    for mode, title in (("keepalive", "Keep-alive: sequential GETs on one connection"),
                        ("newconn", "New connection per request: connect + GET + response + close")):
        lines += [f"## {title}", "",
                  "| phase | scenario | n | median ms | p99 ms | req/s | median x s0 | p99 x s0 | req/s x s0 "
                  "| median x s1 | round medians ms |",
                  "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
        for d in doc["summary"]:
            if d["mode"] != mode:
                continue
            lines.append(f"| {d['phase']} | {d['name']} | {d['n']} | {d['median_ms']:.3f} | {d['p99_ms']:.3f} | "
                         f"{d['rps']:.0f} | {d.get('x_median_vs_s0', 0):.2f} | {d.get('x_p99_vs_s0', 0):.2f} | "
                         f"{d.get('x_rps_vs_s0', 0):.2f} | {d.get('x_median_vs_s1', 0):.2f} | "
                         f"{', '.join(f'{m:.3f}' for m in d['round_medians_ms'])} |")
        lines.append("")
    lines += ["## Notes", "",
              "- Topology: client and lclient on node1 (lclient in the non-enrolled namespace `legacy`), "
              "echo (enrolled, `demo`) and plain (`legacy`) on node2; Services echo and echo2 select the same "
              "echo pod. Every scenario crosses nodes.",
              "- s0 is the truly mesh-free baseline (neither pod enrolled). s1 is the brief's 'no mesh' "
              "(non-enrolled server) but its client is enrolled: connect4 redirects it to the node1 ztunnel, "
              "which opens a plain TCP connection to the pod (PASSTHROUGH), so s1 includes one ztunnel hop. "
              "Ratios 'x s0' are against s0 of the same phase, 'x s1' against s1 of the same phase.",
              "- Phase 1 (no waypoint) and phase 2 (waypoint) each rotate their scenarios per round; "
              "s0 and s1 are measured in both phases. s3 and s4 share one waypoint Envoy; s4 goes to Service "
              "echo2, which has an HTTPRoute (weighted backendRef, weight 100, + RequestHeaderModifier add) "
              "and an AuthorizationPolicy DENY on DELETE targeting it.",
              "- Latency is client-side wall time per request (perf_counter), one request in flight; req/s is "
              "requests / summed time of the recorded requests (sequential, so ~1000/mean latency). "
              "p99 is nearest-rank over all rounds' samples.",
              "- The machine is shared with other work: compare numbers within one run.", "",
              "## Path checks (before measuring)", ""]
    lines += [f"- {c_}" for c_ in doc["checks"]]
    lo = doc["leftovers"]
    lines += ["", "## Cleanup after the run", "",
              f"- netns of the lab left: {lo['netns'] or 'none'}; BPF pins left: {lo['bpf_pins'] or 'none'}; "
              f"envoy processes of the lab left: {lo['envoy_pids'] or 'none'}", ""]
    return "\n".join(lines)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"bench-l7: {exc} (see `python -m bench.l7 --help`)", file=sys.stderr)
        return EX_USAGE
    if os.geteuid() != 0:
        print("bench-l7: needs root (network namespaces, BPF)", file=sys.stderr)
        return EX_NOPERM
    from tests.envoy_util import envoy_binary
    if not envoy_binary():
        print("bench-l7: no envoy binary (run `make deps`)", file=sys.stderr)
        return EX_UNAVAILABLE
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    run = Run(cfg)
    try:
        doc = run.run()
    except KeyboardInterrupt:
        progress("interrupted: lab torn down, no results written")
        return EX_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        progress(f"failed: {type(exc).__name__}: {exc}")
        return 1
    finally:
        shutil.rmtree(run.tmp, ignore_errors=True)
    md = markdown(doc)
    print(md)
    if cfg["write"]:
        cfg["out"].mkdir(parents=True, exist_ok=True)
        (cfg["out"] / "l7-latest.md").write_text(md)
        (cfg["out"] / "l7-latest.json").write_text(json.dumps(doc, indent=1))
        progress(f"wrote {cfg['out'] / 'l7-latest.md'} and l7-latest.json in {doc['header']['wall_s']} s")
    lo = doc["leftovers"]
    if lo["netns"] or lo["bpf_pins"] or lo["envoy_pids"]:
        progress(f"WARNING: lab leftovers after down: {lo}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
