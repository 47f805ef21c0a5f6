"""The load tools: how each is started, and how its output becomes numbers.

Owns: the command lines of iperf3 (bulk throughput, `-J`), sockperf (ping-pong latency
over TCP, 1 KiB messages, `--full-rtt` so percentiles are round trips in microseconds)
and connrate (new connections per second, bench/connrate.c compiled into bench/build/,
or bench/connrate_fallback.py when there is no C compiler); their servers; and the
parsers.  A runner never raises for a tool that failed: it returns {"error": ...} so
one bad measurement is reported, not fatal.

Must not: choose scenarios or decide what a result means (scenarios.py, report.py).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BUILD_DIR = BENCH_DIR / "build"

PORT_IPERF = 5201
PORT_SOCKPERF = 11111
PORT_CONNRATE = 7070
SERVER_PORTS = (PORT_IPERF, PORT_SOCKPERF, PORT_CONNRATE)

MSG_SIZE = 1024          # sockperf message size (1 KiB requests and responses)
TOOL_SLACK_S = 30        # a tool that runs this much longer than asked is killed


def in_netns(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


# --- connrate ------------------------------------------------------------------------
def build_connrate() -> tuple[list[str], str]:
    """Compile bench/connrate.c into bench/build/connrate if needed.  Returns (argv
    prefix, which) with which = "c" or "python" (the fallback, when no compiler)."""
    src, exe = BENCH_DIR / "connrate.c", BUILD_DIR / "connrate"
    if exe.exists() and exe.stat().st_mtime >= src.stat().st_mtime:
        return [str(exe)], "c"
    cc = next((c for c in ("cc", "gcc", "gcc-12", "clang") if shutil.which(c)), None)
    if cc:
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        res = subprocess.run([cc, "-O2", "-Wall", "-o", str(exe), str(src)],
                             capture_output=True, text=True, check=False)
        if res.returncode == 0:
            return [str(exe)], "c"
        print(f"bench: compiling {src} with {cc} failed, using the Python connrate:\n"
              f"{res.stderr.strip()}", file=sys.stderr)
    return [sys.executable, str(BENCH_DIR / "connrate_fallback.py")], "python"


# --- servers -------------------------------------------------------------------------
def server_commands(connrate: list[str]) -> dict[str, tuple[list[str], int]]:
    """name -> (argv, port) of the servers every server pod runs, on 0.0.0.0."""
    return {
        "iperf3": (["iperf3", "-s", "-p", str(PORT_IPERF)], PORT_IPERF),
        "sockperf": (["sockperf", "server", "--tcp", "-i", "0.0.0.0", "-p", str(PORT_SOCKPERF)],
                     PORT_SOCKPERF),
        "connrate": ([*connrate, "server", str(PORT_CONNRATE)], PORT_CONNRATE),
    }


def tool_versions() -> dict[str, str]:
    out = {}
    for name, argv in (("iperf3", ["iperf3", "--version"]), ("sockperf", ["sockperf", "--version"])):
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            out[name] = (res.stdout + res.stderr).strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired, IndexError):
            out[name] = "unknown"
    return out


def _run(argv: list[str], timeout: float) -> tuple[int, str, str]:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return -1, out, f"timed out after {timeout:.0f}s"
    return res.returncode, res.stdout, res.stderr


# --- iperf3 --------------------------------------------------------------------------
def iperf3_argv(ip: str, port: int, seconds: float, streams: int, omit: int) -> list[str]:
    return ["iperf3", "-c", ip, "-p", str(port), "-t", f"{seconds:g}", "-O", str(omit),
            "-P", str(streams), "-J"]


def parse_iperf3(text: str) -> dict:
    """iperf3 -J output -> {"gbps", "retransmits", "seconds"}; receiver-side rate."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return {"error": "iperf3 printed no JSON: " + text.strip()[-200:]}
    if doc.get("error"):
        return {"error": f"iperf3: {doc['error']}"}
    end = doc.get("end") or {}
    recv = end.get("sum_received") or {}
    sent = end.get("sum_sent") or {}
    if "bits_per_second" not in recv:
        return {"error": "iperf3 JSON has no end.sum_received.bits_per_second"}
    return {"gbps": recv["bits_per_second"] / 1e9, "retransmits": sent.get("retransmits"),
            "seconds": recv.get("seconds")}


def run_iperf3(ns: str, ip: str, port: int, seconds: float, streams: int, omit: int) -> dict:
    code, out, err = _run(in_netns(ns, iperf3_argv(ip, port, seconds, streams, omit)),
                          seconds + omit + TOOL_SLACK_S)
    res = parse_iperf3(out)
    if "error" in res and code != 0 and err.strip():
        res["error"] += f" ({err.strip()[-200:]})"
    return res


# --- sockperf ------------------------------------------------------------------------
def sockperf_argv(ip: str, port: int, seconds: float, mps: str) -> list[str]:
    return ["sockperf", "ping-pong", "--tcp", "-i", ip, "-p", str(port), "-m", str(MSG_SIZE),
            "-t", f"{seconds:g}", "--mps", mps, "--full-rtt"]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PCT = re.compile(r"percentile\s+([0-9.]+)\s*=\s*([0-9.]+)")
_VALID = re.compile(r"\[Valid Duration\]\s*RunTime=([0-9.]+)\s*sec;\s*SentMessages=(\d+);\s*"
                    r"ReceivedMessages=(\d+)")
_SUMMARY = re.compile(r"Summary:\s*(Round trip|Latency) is\s*([0-9.]+)\s*(\w+)")


def parse_sockperf(text: str) -> dict:
    """sockperf ping-pong output -> round-trip percentiles in microseconds.

    Units are checked, not assumed: the summary line must read "Round trip is X usec"
    (--full-rtt).  Without --full-rtt sockperf reports half the round trip ("Latency
    is"), which would halve every number, so that is an error here."""
    text = _ANSI.sub("", text)
    summ = _SUMMARY.search(text)
    if not summ:
        return {"error": "sockperf printed no summary: " + text.strip()[-200:]}
    kind, avg, unit = summ.groups()
    if kind != "Round trip":
        return {"error": "sockperf reported one-way latency (was --full-rtt dropped?)"}
    scale = {"usec": 1.0, "msec": 1000.0, "sec": 1e6, "nsec": 1e-3}.get(unit)
    if scale is None:
        return {"error": f"sockperf reported unknown unit {unit!r}"}
    pcts = {float(p): float(v) * scale for p, v in _PCT.findall(text)}
    want = {50.0: "p50_us", 90.0: "p90_us", 99.0: "p99_us"}
    if not all(p in pcts for p in want):
        return {"error": "sockperf printed no p50/p90/p99 (too few observations?)"}
    out = {key: pcts[p] for p, key in want.items()}
    out["avg_us"] = float(avg) * scale
    m = re.search(r"<MAX> observation\s*=\s*([0-9.]+)", text)
    if m:
        out["max_us"] = float(m.group(1)) * scale
    v = _VALID.search(text)
    if v:
        secs, _sent, recv = float(v.group(1)), int(v.group(2)), int(v.group(3))
        out["observations"] = recv
        out["rate"] = recv / secs if secs else 0.0
    return out


def run_sockperf(ns: str, ip: str, port: int, seconds: float, mps: str) -> dict:
    code, out, err = _run(in_netns(ns, sockperf_argv(ip, port, seconds, mps)), seconds + TOOL_SLACK_S)
    res = parse_sockperf(out + "\n" + err)
    if "error" in res and code != 0:
        res["error"] += f" (exit {code})"
    return res


# --- connrate ------------------------------------------------------------------------
def parse_connrate(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(doc, dict) and "rate" in doc:
            out = {"rate": float(doc["rate"]), "ok": doc.get("ok"), "errors": doc.get("errors"),
                   "lat_us": doc.get("lat_us"), "tool": doc.get("tool")}
            if doc.get("errors"):
                out["first_error"] = doc.get("first_error")
            if not doc.get("ok"):
                out["error"] = f"connrate: no connection succeeded ({doc.get('first_error')})"
            return out
    return {"error": "connrate printed no result: " + text.strip()[-200:]}


def run_connrate(connrate: list[str], ns: str, ip: str, port: int, seconds: float) -> dict:
    _code, out, err = _run(in_netns(ns, [*connrate, "client", ip, str(port), f"{seconds:g}"]),
                          seconds + TOOL_SLACK_S)
    res = parse_connrate(out)
    if "error" in res and err.strip():
        res["error"] += f" ({err.strip()[-200:]})"
    return res
