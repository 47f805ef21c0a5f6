"""`python -m bench.run [--quick]` (what `make bench` runs): the whole benchmark, one run.

Owns the run's life cycle: checks the command line and the machine, compiles connrate,
builds its own lab (bench/topology.yaml, lab name `bench<N>`), starts iperf3, sockperf
and connrate servers in the server pods (by PID, stopped by PID), opens the Envoy HBONE
tunnel of bench.peers for scenario 6, runs every scenario in round-robin rounds with the
order rotated each round, checks each scenario's path on the kernel counters, tears the
lab down, then runs the enrolment and sidecar-memory phases of bench.enrolment and
bench.peers, and hands everything to bench.report, which writes bench/results/.

Cleanup (servers, Envoy tunnel, lab) happens on every exit: success, failure, Ctrl-C or
SIGTERM.  Must not: touch addresses outside the lab's namespaces and loopback, or stop a
process it did not start.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import procstat, report, tools
from bench import scenarios as S

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
TOPOLOGY = BENCH_DIR / "topology.yaml"
DEFAULT_OUT = BENCH_DIR / "results"
FIXED_RATE = 1000          # req/s of the fixed-rate latency run
PAUSE_S = 0.5              # settle time between two tools
WARMUP_S = 1               # unrecorded connrate per scenario before round 1

EX_USAGE, EX_UNAVAILABLE, EX_CANTCREAT, EX_NOPERM, EX_INTERRUPTED = 64, 69, 73, 77, 130

FULL = {"rounds": 3, "bulk_s": 4, "omit_s": 1, "latency_s": 4, "conn_s": 4,
        "enrol_counts": [10, 100, 500], "sidecar_counts": [10, 100]}
QUICK = {"rounds": 1, "bulk_s": 1, "omit_s": 0, "latency_s": 1, "conn_s": 1,
         "enrol_counts": [10], "sidecar_counts": [10]}

NOTES = [
    ("Medians over rounds; peak RSS is the largest sample over all rounds. Scenarios alternate "
     "(round-robin, order rotated each round) so slow drifts of the machine hit all of them alike."),
    ("iperf3: receiver-side throughput of one TCP connection and of four in parallel; the first "
     "second(s) given as 'omitted' are not counted (slow start, tunnel set-up)."),
    ("sockperf paces --mps by spinning: during the fixed-rate runs its client keeps one of the "
     "machine's cores busy, which leaves the mesh processes less CPU than in unthrottled runs."),
    ("connrate: one connection at a time (connect, 1 byte each way, the server closes first, "
     "close); conn/s is completed connections per second of wall time."),
    ("Mesh processes per scenario: 3 and 5 the node1 agent and ztunnel, 4 both nodes' agents and "
     "ztunnels, 6 the Envoys of bench.peers; 1 and 2 none."),
    ("The machine is shared with other work: compare numbers from one run, and see the load "
     "average in the header."),
]


class UsageError(Exception):
    pass


@dataclass(kw_only=True)
class Config:
    rounds: int
    bulk_s: int
    omit_s: int
    latency_s: int
    conn_s: int
    enrol_counts: list[int]
    sidecar_counts: list[int]
    scenarios: list[int]
    out: Path
    lab: str
    quick: bool
    enrolment: bool = True
    sidecars: bool = True
    argv: list[str] = field(default_factory=list)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2 with usage; we want one line and 64
        raise UsageError(message)


def _int_range(lo: int, hi: int):
    def conv(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is outside {lo}..{hi}")
        return v
    return conv


def _int_list(lo: int, hi: int):
    one = _int_range(lo, hi)

    def conv(text: str) -> list[int]:
        vals = [one(x.strip()) for x in text.split(",") if x.strip()]
        if not vals:
            raise argparse.ArgumentTypeError("expected a comma-separated list of numbers")
        return sorted(set(vals))
    return conv


def parse_args(argv: list[str]) -> Config:
    p = _Parser(prog="python -m bench.run",
                description="meshlane benchmark: builds its own lab, runs every scenario and "
                            "writes bench/results/latest.{json,md} and PNG charts.")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round, 1 s per tool, 10 pods/sidecars in the memory phases")
    p.add_argument("--rounds", type=_int_range(1, 20))
    p.add_argument("--bulk-seconds", dest="bulk_s", type=_int_range(1, 120), help="iperf3 -t")
    p.add_argument("--omit-seconds", dest="omit_s", type=_int_range(0, 10), help="iperf3 -O")
    p.add_argument("--latency-seconds", dest="latency_s", type=_int_range(1, 120), help="sockperf -t")
    p.add_argument("--conn-seconds", dest="conn_s", type=_int_range(1, 120), help="connrate seconds")
    p.add_argument("--scenarios", type=_int_list(1, len(S.SCENARIOS)),
                   help="comma-separated subset of 1-6 (default: all)")
    p.add_argument("--enrol-counts", dest="enrol_counts", type=_int_list(1, 2000),
                   help="pod counts for bench.enrolment (default 10,100,500)")
    p.add_argument("--sidecar-counts", dest="sidecar_counts", type=_int_list(1, 1000),
                   help="sidecar counts for bench.peers.sidecar_memory (default 10,100)")
    p.add_argument("--no-enrolment", dest="enrolment", action="store_false", help="skip that phase")
    p.add_argument("--no-sidecars", dest="sidecars", action="store_false", help="skip that phase")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default bench/results)")
    p.add_argument("--lab", default=f"bench{os.getpid() % 100000}",
                   help="lab name, 1-16 lowercase letters and digits (default bench<pid>)")
    try:
        ns = p.parse_args(argv)
    except SystemExit as exc:  # --help
        raise SystemExit(0 if exc.code in (0, None) else EX_USAGE) from None
    base = dict(QUICK if ns.quick else FULL)
    for k in base:
        if getattr(ns, k, None) is not None:
            base[k] = getattr(ns, k)
    from meshlane.lab import LAB_NAME_RE
    if not LAB_NAME_RE.match(ns.lab):
        raise UsageError(f"--lab {ns.lab!r}: use 1-16 lowercase letters and digits")
    if ns.out.exists() and not ns.out.is_dir():
        raise UsageError(f"--out {ns.out}: exists and is not a directory")
    return Config(**base, scenarios=ns.scenarios or [s.id for s in S.SCENARIOS], out=ns.out,
                  lab=ns.lab, quick=ns.quick, enrolment=ns.enrolment, sidecars=ns.sidecars, argv=argv)


def progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --- header --------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def _source_commit() -> str | None:
    """The checked-out commit, read from .git's files (the work tree may differ from it)."""
    git = REPO / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).exists():
            return f"{(git / ref).read_text().strip()} ({ref.rsplit('/', 1)[-1]}; work tree may differ)"
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return f"{line.split()[0]} ({ref.rsplit('/', 1)[-1]}; work tree may differ)"
    except OSError:
        pass
    return None


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def header(cfg: Config, connrate_kind: str) -> dict:
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, "-m", "bench.run", *cfg.argv]))
    if os.environ.get("MAKELEVEL"):
        command = f"make bench  ->  {command}"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cores": os.cpu_count(), "cpu_model": _cpu_model(), "kernel": platform.release(),
        "memory_gib": _mem_gib(), "command": command, "source": _source_commit(),
        "quick": cfg.quick, "lab": cfg.lab,
        "durations": {"rounds": cfg.rounds, "bulk_s": cfg.bulk_s, "omit_s": cfg.omit_s,
                      "latency_s": cfg.latency_s, "conn_s": cfg.conn_s, "fixed_rate": FIXED_RATE,
                      "msg_bytes": tools.MSG_SIZE},
        "scenarios": cfg.scenarios,
        "enrolment_counts": cfg.enrol_counts if cfg.enrolment else [],
        "sidecar_counts": cfg.sidecar_counts if cfg.sidecars else [],
        "tools": {**tools.tool_versions(),
                  "connrate": "C (bench/connrate.c)" if connrate_kind == "c"
                  else "Python fallback (no C compiler; may limit scenarios 1/2)"},
        "commands": {
            "bulk": shlex.join(tools.iperf3_argv("<ip>", tools.PORT_IPERF, cfg.bulk_s, 1, cfg.omit_s)),
            "latency": shlex.join(tools.sockperf_argv("<ip>", tools.PORT_SOCKPERF, cfg.latency_s,
                                                      f"{FIXED_RATE}|max")),
            "conn": f"connrate client <ip> {tools.PORT_CONNRATE} {cfg.conn_s}"},
        "loadavg_start": _loadavg(),
    }


def estimate_s(cfg: Config) -> float:
    per = 2 * (cfg.bulk_s + cfg.omit_s + 1) + 2 * (cfg.latency_s + 2) + cfg.conn_s + 5 * PAUSE_S
    return 40 + len(cfg.scenarios) * (WARMUP_S + 1 + cfg.rounds * per)


# --- the run -------------------------------------------------------------------------
class Bench:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.servers: list[tuple[str, subprocess.Popen]] = []
        self.pods: dict[str, dict] = {}
        self.lab_pids: dict[str, int] = {}
        self.tunnel = None
        self.envoy_pids: dict[str, int] = {}
        self.workdir = tools.BUILD_DIR / f"work-{cfg.lab}"
        self.logdir = self.workdir / "logs"

    # servers ---------------------------------------------------------------------------
    def start_servers(self, connrate: list[str], pods: list[str]) -> None:
        self.logdir.mkdir(parents=True, exist_ok=True)
        cmds = tools.server_commands(connrate)
        for pod in pods:
            ns = self.pods[pod]["netns"]
            for name, (argv, _port) in cmds.items():
                with open(self.logdir / f"{pod}-{name}.log", "ab") as log:
                    proc = subprocess.Popen(tools.in_netns(ns, argv), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
                self.servers.append((f"{pod}/{name}", proc))
        for pod in pods:
            ns = self.pods[pod]["netns"]
            for name, (_argv, port) in cmds.items():
                self._wait_listening(pod, ns, name, port)

    def _wait_listening(self, pod: str, ns: str, name: str, port: int) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            res = subprocess.run(tools.in_netns(ns, ["ss", "-Hltn", f"sport = :{port}"]),
                                 capture_output=True, text=True, check=False)
            if res.stdout.strip():
                return
            dead = [n for n, p in self.servers if n == f"{pod}/{name}" and p.poll() is not None]
            if dead:
                break
            time.sleep(0.1)
        log = self.logdir / f"{pod}-{name}.log"
        tail = log.read_text(errors="replace").strip()[-300:] if log.exists() else ""
        raise RuntimeError(f"{name} server in pod {pod} is not listening on port {port}"
                           + (f": {tail}" if tail else ""))

    def stop_servers(self) -> None:
        for _name, proc in self.servers:
            if proc.poll() is None:
                proc.terminate()
        for name, proc in self.servers:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                progress(f"server {name} (pid {proc.pid}) ignored SIGTERM; killing it")
                proc.kill()
                proc.wait(timeout=3)
        self.servers.clear()

    # Envoy peer ------------------------------------------------------------------------
    def open_envoy_tunnel(self, stack: contextlib.ExitStack, unavailable: dict) -> None:
        sc = S.BY_ID[6]
        try:
            peers = importlib.import_module("bench.peers")
            tunnel_fn = peers.envoy_hbone_tunnel
        except (ImportError, AttributeError) as exc:
            unavailable["6"] = f"not available: bench.peers.envoy_hbone_tunnel ({exc})"
            progress(f"scenario 6 {unavailable['6']}")
            return
        progress("starting the Envoy HBONE tunnel (bench.peers) for scenario 6")
        try:
            self.tunnel = stack.enter_context(tunnel_fn(
                self.cfg.lab, self.pods[sc.client], self.pods[sc.server], list(tools.SERVER_PORTS),
                self.workdir / "envoy"))
            missing = [p for p in tools.SERVER_PORTS if p not in self.tunnel.listen]
            if missing:
                raise RuntimeError(f"the tunnel has no listener for ports {missing}")
            self.envoy_pids = dict(self.tunnel.pids)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - the peer failing must not sink the other scenarios
            self.tunnel = None
            unavailable["6"] = f"Envoy tunnel failed: {exc!r}"
            progress(f"scenario 6: {unavailable['6']}")

    # one scenario ----------------------------------------------------------------------
    def target(self, sc: S.Scenario, port: int) -> tuple[str, int]:
        if sc.envoy:
            return "127.0.0.1", self.tunnel.listen[port]
        return self.pods[sc.server]["ip"], port

    def measure(self, sc: S.Scenario, rnd: int, connrate: list[str]) -> dict:
        cfg = self.cfg
        ns = self.pods[sc.client]["netns"]
        pids = S.mesh_pids(sc, self.lab_pids, self.envoy_pids)
        ip_i, port_i = self.target(sc, tools.PORT_IPERF)
        ip_s, port_s = self.target(sc, tools.PORT_SOCKPERF)
        ip_c, port_c = self.target(sc, tools.PORT_CONNRATE)
        plan = [
            ("tput_1", lambda: tools.run_iperf3(ns, ip_i, port_i, cfg.bulk_s, 1, cfg.omit_s)),
            ("tput_4", lambda: tools.run_iperf3(ns, ip_i, port_i, cfg.bulk_s, 4, cfg.omit_s)),
            ("lat_1000", lambda: tools.run_sockperf(ns, ip_s, port_s, cfg.latency_s, str(FIXED_RATE))),
            ("lat_max", lambda: tools.run_sockperf(ns, ip_s, port_s, cfg.latency_s, "max")),
            ("conn", lambda: tools.run_connrate(connrate, ns, ip_c, port_c, cfg.conn_s)),
        ]
        before, cerr = self._counters()
        streams0 = self._envoy_streams() if sc.envoy else None
        results = {}
        for key, fn in plan:
            res = self._attempt(fn, pids)
            if res.get("error"):  # one retry, on the record: a flaky path is a finding
                first = res["error"]
                time.sleep(1)
                res = self._attempt(fn, pids)
                res["retried_after"] = first
            results[key] = res
            time.sleep(PAUSE_S)
        after, cerr2 = self._counters()
        streams1 = self._envoy_streams() if sc.envoy else None
        out = {"round": rnd, "tools": results}
        if before is None or after is None:
            out["path"] = {"status": "error", "detail": f"kernel counters unreadable: {cerr or cerr2}"}
        else:
            delta = S.deltas(before, after)
            out["counters_delta"] = {n: {k: v for k, v in d.items() if v} for n, d in delta.items()}
            streams = streams1 - streams0 if streams0 is not None and streams1 is not None else None
            if sc.envoy:
                out["envoy_connect_streams"] = streams
            out["path"] = S.check_path(sc, delta, results["conn"].get("ok"), streams)
        return out

    @staticmethod
    def _attempt(fn, pids: dict[str, int]) -> dict:
        with procstat.Watch(pids) as w:
            res = fn()
        res["procs"] = w.result()
        return res

    def _envoy_streams(self) -> int | None:
        try:
            return S.envoy_streams(self.tunnel.stats("server"))
        except Exception:  # noqa: BLE001 - the path check reports it as unreadable
            return None

    def _counters(self):
        try:
            return S.read_counters(self.cfg.lab), None
        except Exception as exc:  # noqa: BLE001 - reported as the path check's error
            return None, repr(exc)

    @staticmethod
    def _brief(res: dict) -> str:
        t = res["tools"]

        def g(k, f, unit=""):
            v = t.get(k, {})
            return "ERR" if v.get("error") else f.format(v.get(unit)) if v.get(unit) is not None else "?"
        return (f"{g('tput_1', '{:.2f}', 'gbps')}/{g('tput_4', '{:.2f}', 'gbps')} Gbit/s, "
                f"p50 {g('lat_1000', '{:.0f}', 'p50_us')}/{g('lat_max', '{:.0f}', 'p50_us')} µs, "
                f"{g('conn', '{:.0f}', 'rate')} conn/s, path {res['path']['status']}")

    # the whole run ---------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        t_start = time.monotonic()
        connrate, kind = tools.build_connrate()
        doc = {"header": header(cfg, kind), "notes": list(NOTES), "problems": [],
               "raw": {"scenarios": {str(i): [] for i in cfg.scenarios}, "unavailable": {},
                       "rounds": [], "warmup": {}}}
        raw = doc["raw"]
        phases = doc["header"]["phases_s"] = {}
        progress(f"{len(cfg.scenarios)} scenarios x {cfg.rounds} round(s); pod-to-pod part about "
                 f"{estimate_s(cfg) / 60:.0f} min, then the enrolment and sidecar phases")
        from meshlane import lab as labmod

        t0 = time.monotonic()
        with contextlib.ExitStack() as stack:
            progress(f"building lab {cfg.lab!r} from {TOPOLOGY.relative_to(REPO)}")
            stack.callback(self._lab_down, cfg.lab)
            state = labmod.up(cfg.lab, str(TOPOLOGY))
            self.pods = {p["name"]: p for p in state["pods"]}
            self.lab_pids = dict(state["pids"])
            doc["header"]["lab_ready_s"] = state.get("ready_seconds")
            stack.callback(self.stop_servers)
            wanted = [S.BY_ID[i] for i in cfg.scenarios]
            self.start_servers(connrate, list(dict.fromkeys(s.server for s in wanted)))
            if 6 in cfg.scenarios:
                self.open_envoy_tunnel(stack, raw["unavailable"])
            runnable = [s for s in wanted if not (s.envoy and self.tunnel is None)]
            phases["setup"] = time.monotonic() - t0

            t0 = time.monotonic()
            for sc in runnable:  # unrecorded: first tunnels, certificates, caches
                ip, port = self.target(sc, tools.PORT_CONNRATE)
                w = tools.run_connrate(connrate, self.pods[sc.client]["netns"], ip, port, WARMUP_S)
                raw["warmup"][str(sc.id)] = w
                if w.get("error"):
                    progress(f"warm-up of scenario {sc.id} failed: {w['error']}")
            for rnd in range(1, cfg.rounds + 1):
                k = (rnd - 1) % len(runnable) if runnable else 0
                order = runnable[k:] + runnable[:k]
                tr = time.monotonic()
                for sc in order:
                    progress(f"round {rnd}/{cfg.rounds}: scenario {sc.id} ({sc.title})")
                    res = self.measure(sc, rnd, connrate)
                    raw["scenarios"][str(sc.id)].append(res)
                    progress(f"  {self._brief(res)}")
                raw["rounds"].append({"round": rnd, "order": [s.id for s in order],
                                      "seconds": round(time.monotonic() - tr, 1)})
            phases["pod-to-pod"] = time.monotonic() - t0
            t0 = time.monotonic()
        phases["teardown"] = time.monotonic() - t0
        failed = any(t.get("error") or t.get("retried_after") for runs in raw["scenarios"].values()
                     for r in runs for t in r["tools"].values())
        if failed:
            doc["problems"].append(f"server logs kept in {self.logdir}")
        else:
            shutil.rmtree(self.logdir, ignore_errors=True)

        workdir = self.workdir
        if cfg.enrolment:
            t0 = time.monotonic()
            progress(f"enrolment phase (bench.enrolment, counts {cfg.enrol_counts})")
            doc["enrolment"] = self._external("enrolment", "enrolment_cost", cfg.enrol_counts,
                                              workdir / "enrolment", doc)
            phases["enrolment"] = time.monotonic() - t0
        if cfg.sidecars:
            t0 = time.monotonic()
            progress(f"sidecar memory phase (bench.peers, counts {cfg.sidecar_counts})")
            doc["sidecars"] = self._external("peers", "sidecar_memory", cfg.sidecar_counts,
                                             workdir / "sidecars", doc)
            phases["sidecars"] = time.monotonic() - t0
        doc["header"]["phases_s"] = {k: round(v, 1) for k, v in phases.items()}
        doc["header"]["wall_s"] = round(time.monotonic() - t_start, 1)
        doc["header"]["loadavg_end"] = _loadavg()
        _prune_empty(self.workdir)  # kept logs stay
        return doc

    @staticmethod
    def _external(module: str, fn_name: str, counts: list[int], workdir: Path, doc: dict):
        try:
            fn = getattr(importlib.import_module(f"bench.{module}"), fn_name)
        except (ImportError, AttributeError) as exc:
            msg = f"not available: bench.{module}.{fn_name} ({exc})"
            progress(msg)
            return msg
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            return fn(counts, workdir)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - one phase failing must not lose the others
            msg = f"bench.{module}.{fn_name} failed: {exc!r}"
            doc["problems"].append(msg)
            progress(msg)
            return msg

    @staticmethod
    def _lab_down(name: str) -> None:
        from meshlane import lab as labmod
        progress(f"tearing down lab {name!r}")
        try:
            labmod.down(name, quiet=True)
        except Exception as exc:  # noqa: BLE001 - nothing to tear down, or a partial up
            progress(f"lab down: {exc}")


def _prune_empty(top: Path) -> None:
    """Remove `top` and the directories under it that are empty, bottom-up."""
    if not top.is_dir():
        return
    for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()
    with contextlib.suppress(OSError):
        top.rmdir()


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_args(argv)
    except UsageError as exc:
        print(f"bench: {exc} (see `python -m bench.run --help`)", file=sys.stderr)
        return EX_USAGE
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, BPF): run `sudo make bench`", file=sys.stderr)
        return EX_NOPERM
    missing = [t for t in ("ip", "ss", "iperf3", "sockperf") if not shutil.which(t)]
    if missing:
        print(f"bench: missing tools: {', '.join(missing)} (run `make deps`)", file=sys.stderr)
        return EX_UNAVAILABLE
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Ctrl-C also when started in the background, where SIGINT arrives ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    bench = Bench(cfg)
    try:
        doc = bench.run()
    except KeyboardInterrupt:
        shutil.rmtree(bench.workdir, ignore_errors=True)
        progress("interrupted: lab and servers cleaned up, no results written")
        return EX_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        code = getattr(exc, "exit_code", 1)
        progress(f"failed: {exc}" + (f" (server logs in {bench.logdir})" if bench.logdir.exists() else ""))
        return code if isinstance(code, int) else 1
    try:
        paths = report.write(doc, cfg.out)
    except OSError as exc:
        progress(f"cannot write results to {cfg.out}: {exc}")
        return EX_CANTCREAT
    md = (cfg.out / "latest.md").read_text()
    table = md.split("## Pod to pod", 1)[-1].split("## Path checks", 1)[0]
    print("## Pod to pod" + table.rstrip())
    progress(f"wrote {', '.join(str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in paths)}"
             f" in {doc['header']['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
