"""`meshlane node`: the node agent (istio-cni's node agent role).

Owns the node's BPF program set (compiled and pinned once per start), and enrolment:
it watches the control plane for pods scheduled on its node and for namespace labels,
decides who is enrolled (pod label istio.io/dataplane-mode wins: `none` keeps a pod
out, `ambient` takes it in; otherwise the namespace's label decides), and for each
change (1) hands the pod's netns fd to the ztunnel over ZDS, (2) attaches the pod in
the kernel, (3) records status.enrolled in the control plane.  Taking a pod out runs
the same steps backwards.  Never restarts or signals a pod's processes.
It also compiles L4 policy into the kernel (fastpath.policy) and keeps the same-node
fast path honest: after each compile, every live spliced flow that the new entries no
longer make FAST is unspliced (opt-out, waypoint, node switch) or closed (now denied).
Must not: proxy traffic or hold certificates.
"""
from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import socket
import threading
import time

from meshcore import authz
from meshcore import constants as C
from meshcore import l7, l7parse, netns
from meshcore.errors import MeshError, NotFoundError
from meshcore.identity import SpiffeId
from fastpath import fast as ffast
from fastpath import loader
from fastpath import policy as fpolicy
from fastpath import pod as fpod
from slowpath import control_client, zds
from slowpath.state import uid_of

log = logging.getLogger("meshlane.node")


def wants_ambient(pod: dict, namespaces: dict[str, dict]) -> bool:
    labels = pod["metadata"].get("labels") or {}
    mode = labels.get(C.LABEL_DATAPLANE_MODE)
    if mode == C.DATAPLANE_NONE:
        return False
    if mode == C.DATAPLANE_AMBIENT:
        return True
    ns = namespaces.get(pod["metadata"].get("namespace", "default"), {})
    return (ns.get("metadata", {}).get("labels") or {}).get(C.LABEL_DATAPLANE_MODE) == C.DATAPLANE_AMBIENT


def wants_fastpath(pod: dict, namespaces: dict[str, dict]) -> bool:
    """May this pod's same-node connections be spliced?  Not if it opted out with the
    annotation meshlane.io/fastpath: "false" (apps using splice(2) do not see sockmap
    data), nor if a waypoint serves it (istio.io/use-waypoint on the pod, or on its
    namespace unless the pod says `none`): L7 policy must see its traffic."""
    meta = pod["metadata"]
    if (meta.get("annotations") or {}).get(C.ANNOTATION_FASTPATH, "").lower() == "false":
        return False
    waypoint = (meta.get("labels") or {}).get(C.LABEL_USE_WAYPOINT)
    if waypoint is None:
        ns = namespaces.get(meta.get("namespace", "default"), {})
        waypoint = (ns.get("metadata", {}).get("labels") or {}).get(C.LABEL_USE_WAYPOINT)
    return waypoint in (None, "", "none")


class ZdsServer:
    """One ztunnel connection at a time; every message is acknowledged."""

    def __init__(self, path: str, snapshot):
        self.path = path
        self.snapshot = snapshot          # () -> list[(info, netns path)]
        self.lock = threading.Lock()
        self.conn: socket.socket | None = None

    def start(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o077)
        try:
            self.sock.bind(self.path)
        finally:
            os.umask(old)
        self.sock.listen(4)
        threading.Thread(target=self._accept, name="zds-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            conn.settimeout(60)
            with self.lock:
                if self.conn is not None:
                    self.conn.close()
                self.conn = conn
                try:
                    for info, path in self.snapshot():
                        self._send_locked({"type": "add", "uid": info["uid"], "pod": info}, path)
                    self._send_locked({"type": "snapshot_end", "uid": None}, None)
                    log.info("ztunnel connected; snapshot sent")
                except OSError as exc:
                    log.warning("ZDS snapshot failed: %s", exc)
                    self.conn.close()
                    self.conn = None

    def _send_locked(self, msg: dict, netns_path: str | None) -> str | None:
        fd = netns.open_netns(netns_path) if netns_path else None
        try:
            zds.send(self.conn, msg, fd)
        finally:
            if fd is not None:
                os.close(fd)
        ack, _ = zds.recv(self.conn)
        if ack is None:
            raise OSError("ztunnel closed the ZDS connection")
        return ack.get("error")

    def send(self, msg: dict, netns_path: str | None = None) -> str | None:
        """Returns the ztunnel's error, None on success; raises OSError if not connected."""
        with self.lock:
            if self.conn is None:
                raise OSError("no ztunnel connected")
            try:
                return self._send_locked(msg, netns_path)
            except OSError:
                self.conn.close()
                self.conn = None
                raise


class NodeAgent:
    def __init__(self, *, node: str, pin_name: str, control_socket: str, zds_socket: str,
                 node_netns: str | None = None, fastpath: bool = True):
        self.node = node
        self.fastpath = fastpath   # node-wide switch of the same-node splice
        self.control_socket = control_socket
        self.node_netns = node_netns
        self.dp = loader.NodeDatapath(pin_name)
        self.pods: dict[str, dict] = {}        # uid -> Pod object (this node only)
        self.namespaces: dict[str, dict] = {}
        self.enrolled: dict[str, tuple[dict, str]] = {}  # uid -> (zds info, netns path)
        self.zds = ZdsServer(zds_socket, lambda: list(self.enrolled.values()))
        self.all_pods: dict[str, dict] = {}    # uid -> Pod object (every node: destinations)
        self.policies: dict[str, dict] = {}    # ns/name -> AuthorizationPolicy object
        self.gateways: dict[str, dict] = {}    # ns/name -> Gateway (which waypoints take pod traffic)
        self.rev = 0                           # store revision of the last event seen
        self.trust_domain = C.DEFAULT_TRUST_DOMAIN
        self.changed = asyncio.Event()
        self.policy_changed = asyncio.Event()
        self.synced = asyncio.Event()   # set by the first snapshot from the control plane

    def _on_event(self, msg: dict) -> None:
        self.rev = msg.get("rev", self.rev)
        self.policy_changed.set()
        if msg["event"] == "snapshot":
            self.pods = {uid_of(o): o for o in msg["objects"]
                         if o["kind"] == "Pod" and o.get("spec", {}).get("nodeName") == self.node}
            self.all_pods = {uid_of(o): o for o in msg["objects"] if o["kind"] == "Pod"}
            self.namespaces = {o["metadata"]["name"]: o for o in msg["objects"] if o["kind"] == "Namespace"}
            self.policies = {uid_of(o): o for o in msg["objects"] if o["kind"] == authz.KIND}
            self.gateways = {uid_of(o): o for o in msg["objects"] if o["kind"] == "Gateway"}
            self.synced.set()
        else:
            o = msg["object"]
            if o["kind"] == "Pod":
                if msg["event"] == "delete":
                    self.all_pods.pop(uid_of(o), None)
                else:
                    self.all_pods[uid_of(o)] = o
            if o["kind"] == authz.KIND:
                if msg["event"] == "delete":
                    self.policies.pop(uid_of(o), None)
                else:
                    self.policies[uid_of(o)] = o
            elif o["kind"] == "Gateway":
                if msg["event"] == "delete":
                    self.gateways.pop(uid_of(o), None)
                else:
                    self.gateways[uid_of(o)] = o
            elif o["kind"] == "Namespace":
                if msg["event"] == "delete":
                    self.namespaces.pop(o["metadata"]["name"], None)
                else:
                    self.namespaces[o["metadata"]["name"]] = o
            elif o["kind"] == "Pod" and o.get("spec", {}).get("nodeName") == self.node:
                if msg["event"] == "delete":
                    self.pods.pop(uid_of(o), None)
                else:
                    self.pods[uid_of(o)] = o
        self.changed.set()

    async def watch(self) -> None:
        while True:
            try:
                async for msg in control_client.watch(self.control_socket,
                                                      ["Pod", "Namespace", authz.KIND, "Gateway"]):
                    self._on_event(msg)
            except MeshError as exc:
                log.warning("control watch: %s; retrying", exc)
            await asyncio.sleep(0.5)

    def _desired(self) -> dict[str, dict]:
        return {uid: p for uid, p in self.pods.items()
                if wants_ambient(p, self.namespaces) and p.get("spec", {}).get("netns")
                and (p.get("status") or {}).get("podIP")}

    def enrol(self, pod: dict) -> None:
        uid = uid_of(pod)
        meta, spec, status = pod["metadata"], pod["spec"], pod["status"]
        key = fpod.pod_key(meta.get("namespace", "default"), meta["name"])
        info = {"uid": uid, "name": meta["name"], "namespace": meta.get("namespace", "default"),
                "serviceAccount": spec.get("serviceAccountName", "default"), "ip": status["podIP"]}
        path = spec["netns"]
        t0 = time.monotonic()
        self.enrolled[uid] = (info, path)
        try:
            err = self.zds.send({"type": "add", "uid": uid, "pod": info}, path)
            if err:
                log.warning("ztunnel could not take %s: %s (kernel still enrolls: fail closed)", uid, err)
        except OSError:
            log.info("no ztunnel connected yet; %s is enrolled in the kernel and waits for it", uid)
        try:
            took = fpod.attach_pod(self.dp, fpod.PodRef(
                key=key, pod_id=fpod.pod_number(key), netns=path, ip=status["podIP"],
                node_netns=spec.get("nodeNetns"), host_veth=spec.get("hostVeth")))
        except BaseException:
            # undo both halves: the ztunnel must not keep listening in a pod the kernel
            # does not redirect, and no pin of a half-attached pod may stay behind
            self.enrolled.pop(uid, None)
            fpod.detach_pod(self.dp, key, pod_netns=path if _exists(path) else None)
            try:
                self.zds.send({"type": "del", "uid": uid})
            except OSError:
                pass
            raise
        control_client.call(self.control_socket, "set_status", kind="Pod", name=meta["name"],
                            namespace=info["namespace"], status={"enrolled": True})
        log.info("enrolled %s (kernel attach %.1f ms, total %.1f ms)", uid, took * 1000,
                 (time.monotonic() - t0) * 1000)

    def unenrol(self, uid: str, pod: dict | None) -> None:
        info, path = self.enrolled.pop(uid, (None, None))
        ns, name = uid.split("/", 1)
        fpod.detach_pod(self.dp, fpod.pod_key(ns, name), pod_netns=path if path and
                        _exists(path) else None)
        try:
            self.zds.send({"type": "del", "uid": uid})
        except OSError:
            pass
        if pod is not None:
            try:
                control_client.call(self.control_socket, "set_status", kind="Pod", name=name,
                                    namespace=ns, status={"enrolled": False})
            except MeshError:
                pass
        log.info("unenrolled %s", uid)

    # --- L4 policy in the kernel ----------------------------------------------------------
    def _waypoints(self) -> dict[str, l7.Waypoint]:
        out = {}
        for key, o in self.gateways.items():
            try:
                wp = l7parse.waypoint_of(o)
            except MeshError:
                continue          # not a waypoint, or one the control plane would not take
            out[wp.key] = wp
        return out

    def _views(self) -> tuple[list[fpolicy.WorkloadView], list[fpolicy.LocalPod]]:
        views = {}
        waypoints = self._waypoints()
        ns_labels = {n: dict((o.get("metadata") or {}).get("labels") or {}) for n, o in self.namespaces.items()}
        for uid, o in self.all_pods.items():
            ip = (o.get("status") or {}).get("podIP")
            if not ip:
                continue
            meta, spec = o["metadata"], o.get("spec") or {}
            ns = meta.get("namespace", "default")
            labels = meta.get("labels") or {}
            status = o.get("status") or {}
            views[uid] = fpolicy.WorkloadView(
                uid=uid, namespace=ns, labels=tuple(sorted(labels.items())),
                ip=ipaddress.IPv4Address(ip),
                identity=SpiffeId(trust_domain=self.trust_domain, namespace=ns,
                                  service_account=spec.get("serviceAccountName", "default")),
                enrolled=bool(status.get("enrolled")),
                fastpath=wants_fastpath(o, self.namespaces),
                waypoint=not status.get("waypoint") and l7.waypoint_for_workload(
                    ns, labels, ns_labels.get(ns, {}), waypoints) is not None)
        local = [fpolicy.LocalPod(pod_id=fpod.pod_number(fpod.pod_key(*uid.split("/", 1))),
                                  workload=views[uid])
                 for uid in self.enrolled if uid in views]
        # a local pod is a destination as soon as it is enrolled here, even before its
        # status reached the store
        for lp in local:
            if not lp.workload.enrolled:
                w = lp.workload
                views[w.uid] = dataclasses.replace(w, enrolled=True)
        return list(views.values()), local

    def compile_policies(self) -> dict:
        t0 = time.monotonic()
        rev = self.rev
        policies = authz.policies_from_objects(self.policies.values())
        workloads, local = self._views()
        want_out = fpolicy.compile_out(policies, workloads, local, fastpath=self.fastpath)
        want_in = fpolicy.compile_in(policies, local)
        st = fpolicy.sync(self.dp.map_fds[C.MAP_POL_OUT], self.dp.map_fds[C.MAP_POL_IN], want_out, want_in)
        unspliced, closed = self.recheck_fast(want_out)
        took = (time.monotonic() - t0) * 1000
        if st.written or st.deleted or unspliced or closed:
            log.info("policy: %d policies -> %d connect entries, %d plaintext entries "
                     "(%d written, %d removed; fast flows: %d unspliced, %d closed) in %.1f ms",
                     len(policies), len(want_out), len(want_in), st.written, st.deleted,
                     unspliced, closed, took)
        return {"policyRevision": rev, "policies": len(policies), "connectEntries": len(want_out),
                "plaintextEntries": len(want_in), "fastpath": self.fastpath}

    def recheck_fast(self, want_out: dict) -> tuple[int, int]:
        """Live fast-path flows against the entries just written: still FAST -> kept;
        DENY -> both ends closed (policy changes close denied connections, as the
        ztunnel does for its own); anything else -> unspliced, the connection goes on as
        plain TCP.  Returns (unspliced, closed)."""
        fd = self.dp.map_fds[C.MAP_FAST]
        netns_of = {info["ip"]: path for info, path in self.enrolled.values()}
        unspliced = closed = 0
        for flow in ffast.read_flows(fd):
            e = fpolicy.verdict_for(want_out, flow.src_pod, flow.server[0], flow.server[1])
            if e is not None and e[0] == C.VERDICT_FAST:
                continue
            ffast.unsplice(fd, flow)
            if e is not None and e[0] == C.VERDICT_DENY:
                for ip, local, remote in ((flow.client[0], flow.client, flow.server),
                                          (flow.server[0], flow.server, flow.client)):
                    if ip in netns_of and _exists(netns_of[ip]):
                        ffast.destroy_socket(netns_of[ip], local, remote)
                closed += 1
                log.info("fast flow %s:%d -> %s:%d is now denied: closed", *flow.client, *flow.server)
            else:
                unspliced += 1
                log.info("fast flow %s:%d -> %s:%d no longer on the fast path: unspliced",
                         *flow.client, *flow.server)
        return unspliced, closed

    async def policy_loop(self) -> None:
        loop = asyncio.get_running_loop()
        published = None
        while True:
            await self.policy_changed.wait()
            self.policy_changed.clear()
            try:
                status = await loop.run_in_executor(None, self.compile_policies)
                if status != published:
                    await control_client.acall(self.control_socket, "set_status", kind="Node",
                                               name=self.node, status=status)
                    published = status
            except MeshError as exc:
                log.error("compiling policies failed: %s", exc)
                await asyncio.sleep(0.5)
                self.policy_changed.set()

    async def reconcile_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.changed.wait()
            self.changed.clear()
            desired = self._desired()
            for uid in list(self.enrolled):
                if uid not in desired:
                    await loop.run_in_executor(None, self.unenrol, uid, self.pods.get(uid))
            for uid, pod in desired.items():
                if uid not in self.enrolled:
                    try:
                        await loop.run_in_executor(None, self.enrol, pod)
                    except MeshError as exc:
                        log.error("enrolling %s failed: %s", uid, exc)
            self.policy_changed.set()

    async def run(self) -> None:
        t0 = time.monotonic()
        self.dp.load()
        log.info("node %s: BPF programs compiled and attached in %.2f s (pins under %s)",
                 self.node, time.monotonic() - t0, self.dp.root)
        self.zds.start()
        loop = asyncio.get_running_loop()
        try:
            self.trust_domain = (await control_client.acall(self.control_socket, "root"))["trustDomain"]
        except MeshError as exc:
            log.warning("cannot read the trust domain (%s); assuming %s", exc, self.trust_domain)
        # first snapshot, then reconcile: pods that are attached in the kernel already
        # (agent restart) are re-registered, not re-attached
        self._watch_task = loop.create_task(self.watch())  # held: tasks are weakly referenced
        await self.synced.wait()
        attached = set(fpod.attached_keys(self.dp))
        for uid, pod in self._desired().items():
            ns, name = uid.split("/", 1)
            if fpod.pod_key(ns, name) in attached:
                spec = pod["spec"]
                self.enrolled[uid] = ({"uid": uid, "name": name, "namespace": ns,
                                       "serviceAccount": spec.get("serviceAccountName", "default"),
                                       "ip": pod["status"]["podIP"]}, spec["netns"])
        wanted = {fpod.pod_key(*uid.split("/", 1)) for uid in self.enrolled}
        for key in attached - wanted:
            log.info("pod %s is attached in the kernel but no longer wanted: detaching", key)
            fpod.detach_pod(self.dp, key)
        self.changed.set()
        self._policy_task = loop.create_task(self.policy_loop())
        await self.reconcile_loop()


def _exists(path: str) -> bool:
    try:
        netns.resolve(path)
        return True
    except NotFoundError:
        return False
