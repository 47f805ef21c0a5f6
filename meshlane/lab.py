"""`meshlane lab`: one machine playing a small cluster (DESIGN.md §7).

Owns the lab's life cycle: `up` validates the topology, builds the network (labnet),
starts the control plane, a node agent and a ztunnel per node, registers namespaces,
nodes and pods, starts the pods' apps and waits until the ambient pods are enrolled;
`down` stops exactly the processes it started (by PID), removes every BPF pin of the
lab's nodes, deletes the lab's namespaces and its run directory.  A failed `up` is
rolled back the same way, so nothing is ever left half-configured.

Run state lives in /run/meshlane/<lab>/ (lab.json, sockets, tokens, logs, CA state).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from meshcore import constants as C
from meshcore import netns
from meshcore.errors import MeshError, NeedsRootError, NotFoundError, UnavailableError, UsageError
from fastpath import loader
from meshlane import labnet, topology
from slowpath import control_client

RUN_ROOT = Path(os.environ.get("MESHLANE_RUN_ROOT", "/run/meshlane"))
DEFAULT_LAB = "ml"


def progress(msg: str) -> None:
    print(f"meshlane: {msg}", file=sys.stderr, flush=True)


# One word: `<lab>-` must not be a prefix of another lab's namespaces and pins (lab `ml`
# would otherwise tear down lab `ml-x`), and the name becomes a path under RUN_ROOT, so
# `/` or `..` must never reach `down`'s rmtree.
LAB_NAME_RE = re.compile(r"^[a-z0-9]{1,16}$")


@dataclass
class LabPaths:
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not LAB_NAME_RE.match(self.name):
            raise UsageError(f"lab name {self.name!r} is not valid",
                             hint="use 1-16 lowercase letters and digits, e.g. --lab ml2")

    @property
    def run(self) -> Path:
        return RUN_ROOT / self.name

    @property
    def state(self) -> Path:
        return self.run / "lab.json"

    @property
    def control_socket(self) -> Path:
        return self.run / "control.sock"

    def node_dir(self, node: str) -> Path:
        return self.run / "nodes" / node

    def pin_name(self, node: str) -> str:
        return f"{self.name}-{node}"


def load_state(lab: str) -> dict:
    p = LabPaths(lab)
    if not p.state.exists():
        raise NotFoundError(f"lab {lab!r} is not up (no {p.state})", hint="start it with `meshlane lab up`")
    return json.loads(p.state.read_text())


def _spawn(args: list[str], log: Path, *, netns_name: str | None = None) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = (["ip", "netns", "exec", netns_name] if netns_name else []) + args
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd="/")
    return proc.pid


def _py(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshlane.cli", *args]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def stop_pid(pid: int, timeout: float = 5.0) -> None:
    if not _alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def wait_for(what: str, check, timeout: float, log: Path | None = None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            got = check()
            if got:
                return got
        except Exception as exc:  # noqa: BLE001 - reported below if it never succeeds
            last = exc
        time.sleep(0.1)
    tail = ""
    if log and log.exists():
        tail = "; last log lines:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    raise UnavailableError(f"timed out after {timeout:.0f}s waiting for {what}"
                           + (f" ({last})" if last else "") + tail)


def http_get_in_netns(ns: str, port: int, path: str, timeout: float = 2.0, *,
                      ip: str = "127.0.0.1") -> tuple[int, str]:
    """One HTTP/1.1 GET from inside netns `ns` to ip:port; (status, body)."""
    with netns.entered(ns):
        s = socket.socket()
    s.settimeout(timeout)
    with s:
        s.connect((ip, port))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


def wait_policies(lab: str, rev: int, timeout: float = 20, *, ztunnels: bool = True) -> None:
    """Wait until every node agent has compiled, and every ztunnel runs, the policies of
    store revision `rev` (or later).  ztunnels=False: the node agents only (for changes
    the ztunnels do not watch, such as Namespace labels)."""
    paths = LabPaths(lab)
    nodes = [n["netns"] for n in load_state(lab)["nodes"]]

    def applied() -> bool:
        objs = control_client.call(str(paths.control_socket), "get", kind="Node")["objects"]
        if not all((o.get("status") or {}).get("policyRevision", 0) >= rev for o in objs):
            return False
        for ns in nodes if ztunnels else []:
            code, body = http_get_in_netns(ns, C.PORT_ADMIN, "/config_dump")
            if code != 200 or json.loads(body)["policyRevision"] < rev:
                return False
        return True
    wait_for(f"store revision {rev} applied by every node agent and ztunnel", applied, timeout)


def start_control(paths: LabPaths, cacerts: str | None = None) -> int:
    args = ["control", "--state-dir", str(paths.run / "control"), "--socket", str(paths.control_socket)]
    if cacerts:
        args += ["--cacerts", cacerts]
    pid = _spawn(_py(*args), paths.run / "logs" / "control.log")
    wait_for("the control plane socket", lambda: control_client.call(str(paths.control_socket), "root"),
             30, paths.run / "logs" / "control.log")
    return pid


def start_node_agent(paths: LabPaths, node: str, *, fastpath: bool = True) -> int:
    nd = paths.node_dir(node)
    return _spawn(_py("node", "--name", node, "--pin-name", paths.pin_name(node),
                      "--control", str(paths.control_socket), "--zds", str(nd / "zds.sock"),
                      "--node-netns", labnet.node_netns(paths.name, node),
                      "--fastpath" if fastpath else "--no-fastpath"),
                  paths.run / "logs" / f"node-{node}.log")


def start_ztunnel(paths: LabPaths, node: str) -> int:
    nd = paths.node_dir(node)
    return _spawn(_py("ztunnel", "--node", node, "--control", str(paths.control_socket),
                      "--zds", str(nd / "zds.sock"), "--token-file", str(nd / "token"),
                      "--maps-dir", str(loader.pin_dir(paths.pin_name(node)) / "maps"),
                      "--node-netns", labnet.node_netns(paths.name, node)),
                  paths.run / "logs" / f"ztunnel-{node}.log")


def start_waypointd(paths: LabPaths) -> int:
    return _spawn(_py("waypointd", "--lab", paths.name), paths.run / "logs" / "waypointd.log")


def ztunnel_ready(paths: LabPaths, node: str) -> bool:
    code, _ = http_get_in_netns(labnet.node_netns(paths.name, node), C.PORT_READY, "/healthz/ready")
    return code == 200


def pod_object(p: topology.PodSpec, net: labnet.PodNet) -> dict:
    return {"kind": "Pod",
            "metadata": {"name": p.name, "namespace": p.namespace, "labels": dict(p.labels),
                         "annotations": dict(p.annotations)},
            "spec": {"nodeName": p.node, "serviceAccountName": p.service_account,
                     "netns": net.netns, "nodeNetns": net.node_netns, "hostVeth": net.host_veth},
            "status": {"podIP": net.ip, "enrolled": False}}


LAB_BOOTSTRAP_TTL_S = 300   # used at once; short, so a token left behind is soon worthless


def join_node(sock: str, name: str, node_dir: Path, *, spec: dict, description: str = "") -> None:
    """Join one node as an operator would: a bootstrap token bound to the node's name
    (`meshlane token create --node NAME`), handed to the node, which registers with it
    and keeps the node token it gets in `node_dir/token` (0600; the ztunnel and the
    waypoint controller read it for `sign`)."""
    node_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    boot = control_client.call(sock, "create_token", node=name, ttl_seconds=LAB_BOOTSTRAP_TTL_S,
                               description=description)["token"]
    token = control_client.call(sock, "register_node", name=name, bootstrap_token=boot, spec=spec)["token"]
    fd = os.open(node_dir / "token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)


def up(lab: str, topology_path: str | None, *, cacerts: str | None = None) -> dict:
    if os.geteuid() != 0:
        raise NeedsRootError("`meshlane lab up` needs root (namespaces, BPF)", hint="run with sudo")
    topo = topology.load(topology_path)  # validate before touching anything
    if cacerts is not None:
        from meshlane.ca import CertificateAuthority
        CertificateAuthority.from_cacerts_dir(cacerts)  # a bad plug-in CA fails here, not later
        cacerts = str(Path(cacerts).resolve())
    paths = LabPaths(lab)
    leftovers = labnet.lab_netns(lab)
    if paths.state.exists() or leftovers:
        raise UsageError(f"lab {lab!r} is already up ({len(leftovers)} namespaces, state in {paths.run})",
                         hint="run `meshlane lab down` first, or pick another name with --lab")
    paths.run.mkdir(parents=True, exist_ok=True, mode=0o700)
    state = {"name": lab, "topology": topology_path, "pids": {}, "apps": {}, "pods": [],
             "nodes": [{"name": n.name, "netns": labnet.node_netns(lab, n.name), "underlay": "ul0",
                        "underlayIP": str(n.underlay_ip), "podCIDR": str(n.pod_cidr),
                        "pinDir": str(loader.pin_dir(paths.pin_name(n.name)))} for n in topo.nodes]}
    t0 = time.monotonic()
    try:
        progress(f"building lab {lab!r}: {len(topo.nodes)} nodes, {len(topo.pods)} pods")
        nets = {n.name: n for n in labnet.build(lab, topo)}
        state["pods"] = [dict(name=p.name, node=p.node, namespace=p.namespace,
                              serviceAccount=p.service_account, ip=nets[p.name].ip,
                              netns=nets[p.name].netns, app=p.app) for p in topo.pods]
        _save(paths, state)
        state["pids"]["control"] = start_control(paths, cacerts)
        _save(paths, state)
        sock = str(paths.control_socket)
        for ns, labels in topo.namespaces.items():
            control_client.call(sock, "put", object={"kind": "Namespace",
                                                     "metadata": {"name": ns, "labels": labels}})
        for n in topo.nodes:
            join_node(sock, n.name, paths.node_dir(n.name),
                      spec={"podCIDR": str(n.pod_cidr), "netns": labnet.node_netns(lab, n.name)},
                      description=f"lab {lab} up")
        for p in topo.pods:
            control_client.call(sock, "put", object=pod_object(p, nets[p.name]))
        if topo.services:
            control_client.call(sock, "apply", objects=list(topo.services), src=topology_path or "<default>")
        progress("starting node agents (compiling BPF) and ztunnels")
        for n in topo.nodes:
            state["pids"][f"node-{n.name}"] = start_node_agent(paths, n.name, fastpath=n.fastpath)
            state["pids"][f"ztunnel-{n.name}"] = start_ztunnel(paths, n.name)
            _save(paths, state)
        state["pids"]["waypointd"] = start_waypointd(paths)
        _save(paths, state)
        for p in topo.pods:
            if p.app == "http":
                net = nets[p.name]
                ports = [a for port in p.ports for a in ("--port", str(port))]
                state["apps"][p.name] = _spawn([sys.executable, "-m", "meshlane.labapp", "--name", p.name,
                                                *ports], paths.run / "logs" / f"app-{p.name}.log",
                                               netns_name=net.netns)
        _save(paths, state)
        for n in topo.nodes:
            wait_for(f"ztunnel on {n.name} to be ready", lambda n=n: ztunnel_ready(paths, n.name), 90,
                     paths.run / "logs" / f"ztunnel-{n.name}.log")
        wait_for_enrolment(paths, topo, 60)
        specs = {p.name: p for p in topo.pods}
        for name, pid in state["apps"].items():
            net = nets[name]
            for port in specs[name].ports:
                wait_for(f"the app of {name} on port {port}",
                         lambda net=net, port=port: _port_open(net.netns, net.ip, port), 20,
                         paths.run / "logs" / f"app-{name}.log")
    except BaseException:
        progress("lab up failed; rolling back")
        try:
            down(lab, quiet=True)
        except Exception as exc:  # pragma: no cover - best effort, the original error matters
            progress(f"rollback problem: {exc}")
        raise
    state["ready_seconds"] = round(time.monotonic() - t0, 2)
    _save(paths, state)
    return state


def _port_open(ns: str, ip: str, port: int) -> bool:
    with netns.entered(ns):
        s = socket.socket()
    s.settimeout(1)
    with s:
        # a marked socket: the readiness probe must not itself go through the mesh
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, C.MARK_ZTUNNEL)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for_enrolment(paths: LabPaths, topo: topology.Topology, timeout: float) -> None:
    want = {f"{p.namespace}/{p.name}" for p in topo.pods
            if (p.labels.get(C.LABEL_DATAPLANE_MODE) == C.DATAPLANE_AMBIENT or
                (topology.ambient(topo.namespaces.get(p.namespace, {})) and
                 p.labels.get(C.LABEL_DATAPLANE_MODE) != C.DATAPLANE_NONE))}

    def done():
        pods = control_client.call(str(paths.control_socket), "get", kind="Pod")["objects"]
        enrolled = {f"{o['metadata']['namespace']}/{o['metadata']['name']}" for o in pods
                    if (o.get("status") or {}).get("enrolled")}
        return want <= enrolled
    wait_for(f"pods {sorted(want)} to be enrolled", done, timeout,
             paths.run / "logs" / f"node-{topo.nodes[0].name}.log")


def _save(paths: LabPaths, state: dict) -> None:
    tmp = paths.state.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(paths.state)


def down(lab: str, *, quiet: bool = False) -> dict:
    if os.geteuid() != 0:
        raise NeedsRootError("`meshlane lab down` needs root", hint="run with sudo")
    paths = LabPaths(lab)
    state = json.loads(paths.state.read_text()) if paths.state.exists() else None
    nets = labnet.lab_netns(lab)
    if state is None and not nets and not paths.run.exists():
        raise NotFoundError(f"lab {lab!r} is not up: nothing to tear down")
    stopped = []
    if state:
        for name, pid in list(state.get("apps", {}).items()) + list(state.get("pids", {}).items()):
            stop_pid(pid)
            stopped.append(name)
    from meshlane import waypointd
    stopped += [f"envoy-{pid}" for pid in waypointd.stop_all(lab)]  # if the controller left any
    pins = []
    node_names = [n["name"] for n in (state or {}).get("nodes", [])]
    for root in sorted(Path(C.PIN_ROOT).glob(f"{lab}-*")) if Path(C.PIN_ROOT).exists() else []:
        node = root.name[len(lab) + 1:]
        if state is None or node in node_names:
            pins += loader.unpin_node(root.name)
    removed = labnet.teardown(lab, labnet.lab_netns(lab))
    if paths.run.exists():
        shutil.rmtree(paths.run)
    try:
        RUN_ROOT.rmdir()  # only when no other lab is left
    except OSError:
        pass
    if not quiet:
        progress(f"lab {lab!r} down: stopped {len(stopped)} processes, removed {len(removed)} "
                 f"namespaces and {len(pins)} BPF pins")
    return {"stopped": stopped, "namespaces": removed, "pins": len(pins)}


def status(lab: str) -> dict:
    state = load_state(lab)
    paths = LabPaths(lab)
    try:
        pods = {f"{o['metadata']['namespace']}/{o['metadata']['name']}": o for o in
                control_client.call(str(paths.control_socket), "get", kind="Pod")["objects"]}
        control_up = True
    except MeshError:
        pods, control_up = {}, False
    out_pods = []
    for p in state["pods"]:
        obj = pods.get(f"{p['namespace']}/{p['name']}")
        out_pods.append({**{k: p[k] for k in ("name", "node", "namespace", "serviceAccount", "ip", "netns")},
                         "enrolled": bool(obj and (obj.get("status") or {}).get("enrolled")),
                         "present": obj is not None})
    procs = {name: {"pid": pid, "running": _alive(pid)} for name, pid in
             list(state["pids"].items()) + list(state["apps"].items())}
    return {"name": lab, "controlPlane": control_up,
            "nodes": [{k: n[k] for k in ("name", "netns", "underlay", "podCIDR", "underlayIP")}
                      for n in state["nodes"]],
            "pods": out_pods, "processes": procs}


def resolve_pod(lab: str, pod: str) -> dict:
    state = load_state(lab)
    for p in state["pods"]:
        if p["name"] == pod:
            return p
    raise NotFoundError(f"no pod {pod!r} in lab {lab!r}",
                        hint=f"pods: {', '.join(p['name'] for p in state['pods'])}")


def workload_cert(lab: str, node: str, namespace: str, pod: str, service_account: str):
    """A real workload certificate (a `slowpath.certs.WorkloadCert`) from the lab's CA for
    spiffe://<trust domain>/ns/<namespace>/sa/<service_account>, asked for as `node`
    would: a fresh key, a CSR, and the node's own token.  The CA is node-scoped, so `pod`
    must be a pod of `namespace` scheduled on `node`, and `service_account` must be its
    service account (the CA signs the pod's identity, and from_pems checks the match).
    For tests and benchmarks that stand in for a node's proxy (e.g. a real Envoy)."""
    from meshcore.identity import SpiffeId
    from slowpath import certs

    paths = LabPaths(lab)
    token = (paths.node_dir(node) / "token").read_text().strip()
    trust_domain = control_client.call(str(paths.control_socket), "root").get(
        "trustDomain", C.DEFAULT_TRUST_DOMAIN)
    spiffe = SpiffeId(trust_domain=trust_domain, namespace=namespace,
                      service_account=service_account)
    key = certs.generate_key()
    ans = control_client.call(str(paths.control_socket), "sign", node=node, token=token,
                              namespace=namespace, pod=pod,
                              csr=certs.make_csr(key, spiffe).decode())
    return certs.WorkloadCert.from_pems(spiffe=spiffe, key_pem=certs.key_to_pem(key),
                                        cert_pem=ans["cert"].encode(),
                                        chain_pem=ans["chain"].encode(),
                                        root_pem=ans["root"].encode())
