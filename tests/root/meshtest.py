"""Helpers the root-tier tests share: real workload certificates from a lab's CA and a
bare HTTP/2 CONNECT, so a test can speak HBONE to a ztunnel as any pod would."""
from __future__ import annotations

import contextlib
import json
import errno
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from meshcore import constants as C
from meshcore import netns
from fastpath.loader import NodeDatapath
from meshlane import lab as labmod
from slowpath import certs, control_client

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def running_lab(prefix: str, topology: str | None = None, *, cacerts: str | None = None):
    """A lab of our own (name `<prefix><pid>`), torn down even when the test fails.
    Yields (name, {pod name: pod})."""
    name = f"{prefix}{os.getpid() % 10000}"
    try:
        state = labmod.up(name, topology, cacerts=cacerts)
        yield name, {p["name"]: p for p in state["pods"]}
    finally:
        try:
            labmod.down(name, quiet=True)
        except Exception:
            pass


@contextlib.contextmanager
def operator_lab(prefix: str, topology: str, base: Path):
    """A lab whose CA is an operator's own (tests.operator_pki, Istio `cacerts` layout
    under `base`), so the test can issue certificates, good and bad, for outside peers
    such as Envoy.  Yields (name, {pod name: pod}, the OperatorPki, base)."""
    from tests.operator_pki import OperatorPki
    pki = OperatorPki(base / "cacerts")
    topo = base / "topology.yaml"
    topo.write_text(topology)
    with running_lab(prefix, str(topo), cacerts=str(pki.dir)) as (name, pods):
        yield name, pods, pki, base


def node_counters(lab: str, node: str) -> dict[str, int]:
    return NodeDatapath(labmod.LabPaths(lab).pin_name(node)).counters()


def http_probe(ns: str, ip: str, port: int) -> tuple[str, float]:
    """A plain connect() and one GET from inside netns `ns`: ("refused" | "ok" | "closed",
    seconds the connect took).  "refused" is a connect that failed (ECONNREFUSED from
    the kernel policy or an RST; EPERM from a cgroup program)."""
    with netns.entered(ns):
        s = socket.socket()
    s.settimeout(5)
    with s:
        t0 = time.perf_counter()
        try:
            s.connect((ip, port))
        except ConnectionRefusedError:
            return "refused", time.perf_counter() - t0
        except PermissionError as exc:
            if exc.errno == errno.EPERM:
                return "refused", time.perf_counter() - t0
            raise
        took = time.perf_counter() - t0
        try:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode())
            data = s.recv(64)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
    return ("ok" if data.startswith(b"HTTP/1.1 200") else "closed"), took


def node_cert(name: str, node: str, namespace: str, pod: str, sa: str) -> certs.WorkloadCert:
    """A real workload certificate from the lab's CA, asked for as that node would."""
    return labmod.workload_cert(name, node, namespace, pod, sa)


def tls_to(ns: str, ip: str, ctx: ssl.SSLContext, *, mark: int | None = None) -> ssl.SSLSocket:
    """TLS to ip:15008 from inside netns `ns`; `mark` 0x539 lets an enrolled pod's socket
    past connect4, as the ztunnel's own sockets are."""
    with netns.entered(ns):
        raw = socket.socket()
    if mark is not None:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    raw.settimeout(5)
    raw.connect((ip, C.PORT_HBONE))
    return ctx.wrap_socket(raw, server_hostname=None)


def connect_status(sock: ssl.SSLSocket, authority: str, method: str = "CONNECT") -> int:
    """Send one request on a fresh HTTP/2 connection with plain h2 (so the request can be
    one our codec would refuse to send) and return the :status of the answer."""
    import h2.config
    import h2.connection
    import h2.events
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, validate_inbound_headers=False))
    conn.initiate_connection()
    headers = [(":method", method), (":authority", authority)]
    if method != "CONNECT":
        headers += [(":scheme", "https"), (":path", "/")]
    conn.send_headers(1, headers)
    sock.sendall(conn.data_to_send())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        data = sock.recv(65536)
        if not data:
            break
        for e in conn.receive_data(data):
            if isinstance(e, h2.events.ResponseReceived) and e.stream_id == 1:
                return int(dict(e.headers)[b":status"])
        pending = conn.data_to_send()
        if pending:
            sock.sendall(pending)
    raise AssertionError(f"no answer to {method} {authority}")




class Capture:
    """tcpdump on a lab interface, for the duration of a with-block."""

    def __init__(self, ns: str, iface: str, path: Path):
        self.ns, self.iface, self.path = ns, iface, path

    def __enter__(self):
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, "tcpdump", "--immediate-mode", "-i", self.iface, "-U",
                                      "-s", "0", "-w", str(self.path), "tcp"],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        line = self.proc.stderr.readline().decode()
        assert "listening" in line, line
        return self

    def __exit__(self, *exc):
        time.sleep(0.3)
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(5)
        self.data = self.path.read_bytes()


def zt_connections(lab: str, node: str) -> list[dict]:
    """The ztunnel's access records of `node` (closed connections, newest last)."""
    code, body = labmod.http_get_in_netns(f"{lab}-{node}", C.PORT_ADMIN, "/connections")
    assert code == 200, body
    return json.loads(body)["recent"]


def while_requests_flow(request, steps, *, workers: int, pause: float) -> list[tuple[float, object]]:
    """Run `request()` (returning an HTTP status) over and over in `workers` threads while
    each of `steps` is called in turn, `pause` seconds apart (and before the first);
    [(time, status, or repr of the error)] of every request made."""
    import http.client
    results: list = []
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                results.append((time.monotonic(), request()))
            except (OSError, http.client.HTTPException) as exc:
                results.append((time.monotonic(), repr(exc)))
    threads = [threading.Thread(target=loop) for _ in range(workers)]
    for t in threads:
        t.start()
    try:
        time.sleep(pause)
        for step in steps:
            step()
            time.sleep(pause)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return results


def settle(lab: str, cond, timeout: float = 15.0) -> None:
    """Wait until `cond()` holds (OSError and AssertionError count as not yet): what is
    applied reaches the waypoint's Envoy asynchronously.  On timeout, the assertion
    carries the last error and the tail of the lab's waypointd log."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except (OSError, AssertionError) as exc:
            last = exc
        time.sleep(0.2)
    log = labmod.LabPaths(lab).run / "logs" / "waypointd.log"
    tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
    raise AssertionError(f"condition not reached in {timeout}s ({last!r}); waypointd log:\n" + "\n".join(tail))


def wait_record(lab: str, node: str, pred, timeout: float = 8.0) -> dict:
    """The first access record on `node` that `pred` accepts, waiting up to `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        for r in zt_connections(lab, node):
            if pred(r):
                return r
        if time.monotonic() >= deadline:
            raise AssertionError(f"no matching access record on {node}: "
                                 f"{zt_connections(lab, node)[-5:]}")
        time.sleep(0.1)


# --- the CLI as a user runs it ---------------------------------------------------------

def ml(*args: str, lab: str | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    args = list(args)
    if lab is not None:  # before a `--`: what follows it is the command of `lab exec`
        at = args.index("--") if "--" in args else len(args)
        args[at:at] = ["--lab", lab]
    cmd = [sys.executable, "-m", "meshlane.cli", *args]
    env = {k: v for k, v in os.environ.items() if k != "MESHLANE_LAB"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr}"
    assert "Traceback" not in res.stdout + res.stderr
    return res


def fails(res: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The house error shape: exit `code`, one stderr line `meshlane: ...`, no traceback."""
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    assert res.returncode == code, f"exit {res.returncode}, want {code}: {out}"
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"want one stderr line, got {lines}"
    assert lines[0].startswith("meshlane: "), lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


# --- HTTP from inside a pod ------------------------------------------------------------------

def http_call(ns: str, ip: str, port: int, method: str = "GET", path: str = "/", *,
              headers: dict | None = None, body: bytes | None = None,
              timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 request from a socket created in netns `ns` (so connect() is the
    pod's own and the mesh sees it); (status, lower-cased headers, body)."""
    import http.client
    with netns.entered(ns):
        s = socket.socket()
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
        conn = http.client.HTTPConnection(ip, port, timeout=timeout)
        conn.sock = s
        conn.request(method, path, body=body, headers={"Connection": "close", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        s.close()


# --- plain sockets from inside a pod, and the lab's view of a pod ----------------------------

def connect_from(ns: str, addr: tuple[str, int], timeout: float = 10.0) -> socket.socket:
    """A TCP connection made from a socket created in netns `ns`."""
    with netns.entered(ns):
        s = socket.socket()
    s.settimeout(timeout)
    try:
        s.connect(addr)
    except BaseException:
        s.close()
        raise
    return s


def read_all(s: socket.socket) -> bytes:
    """Read to EOF (a reset raises ConnectionResetError)."""
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


def set_enrolled(lab: str, pod: dict, value: bool) -> None:
    """Say in the Pod object's status whether the pod speaks HBONE (an outside peer
    such as an Envoy brought into the mesh)."""
    control_client.call(str(labmod.LabPaths(lab).control_socket), "set_status", kind="Pod",
                        name=pod["name"], namespace=pod["namespace"], status={"enrolled": value})


def ztunnel_sees(lab: str, node: str, ip: str, protocol: str) -> bool:
    """Whether `node`'s ztunnel treats the workload at `ip` as `protocol` (HBONE|TCP)."""
    code, body = labmod.http_get_in_netns(f"{lab}-{node}", C.PORT_ADMIN, "/config_dump")
    assert code == 200
    return any(w["ip"] == ip and w["protocol"] == protocol for w in json.loads(body)["workloads"])


def wait_until(what: str, check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
