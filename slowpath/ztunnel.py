"""`meshlane ztunnel`: the node's slow-path proxy (mTLS + HBONE), one per node.

Owns, for every enrolled pod of its node (handed over by the node agent through ZDS):
listeners inside the pod's netns on 127.0.0.1:15001 (outbound, redirected by connect4),
0.0.0.0:15006 (plaintext inbound) and 0.0.0.0:15008 (HBONE), the pod's workload
certificate (CSR to the control plane, renewed at half-life), and the connections:

  outbound  original destination from mesh_orig_dst.  A Service VIP: through the
            Service's waypoint if it uses one (HBONE to the waypoint pod, :authority
            VIP:port), else to one of its endpoints picked at random (port -> targetPort).
            Enrolled workload whose waypoint takes workload traffic (waypoint-for
            workload|all): the same, :authority its IP:port.  Other enrolled workload:
            HBONE CONNECT to <dst ip>:15008 from a socket in the
            source pod (mark 0x539), pooled per (src identity, dst identity, dst, src
            ip); otherwise plain TCP passthrough from the pod.
  inbound   15008: mTLS, CONNECT -> L4 authorization on the peer certificate's identity
            -> transparent connect to the app (source = the client's pod IP) -> 200, or
            400/401/503; 15006: plaintext, authorized as a peer without identity, then
            forwarded the same way.  A policy change re-checks every live inbound
            connection and closes those now denied.

Readiness on 127.0.0.1:15021 and admin (config_dump, connections) on 127.0.0.1:15000,
inside the node's netns when one is given.  Must not: load or attach BPF programs
(the node agent does), or read identity from anything but the peer certificate.
"""
from __future__ import annotations

import asyncio
import collections
import ctypes
import json
import logging
import os
import random
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from ipaddress import ip_address
from pathlib import Path

from meshcore import abi, authz, bpfsys, netns
from meshcore import constants as C
from meshcore.errors import MeshError
from meshcore.identity import SpiffeId
from slowpath import certs, control_client, tls, zds
from slowpath.driver import (
    AppSide,
    HboneLink,
    HboneRefused,
    Pipe,
    StreamRetry,
    abort_with_rst,
    tune_allocator,
)
from slowpath.hbone.authority import format_authority
from slowpath.hbone import events as ev
from slowpath.state import ServiceStore, Workload, WorkloadStore, uid_of

log = logging.getLogger("meshlane.ztunnel")
access = logging.getLogger("meshlane.access")
# what decides where a connection to a Service VIP goes (its endpoints or its waypoint);
# not control.L7_KINDS, which are the kinds `apply` validates with meshcore.l7parse
SERVICE_KINDS = ("Service", "Gateway", "Namespace")

IP_TRANSPARENT = 19


@dataclass
class LocalPod:
    uid: str
    name: str
    namespace: str
    service_account: str
    ip: str
    netns_fd: int
    cookie: int
    spiffe: SpiffeId
    cert: certs.WorkloadCert | None = None
    client_ctxs: tls.ClientContexts | None = None   # one per destination identity
    server_ctx: object = None
    servers: list = field(default_factory=list)
    renew_handle: asyncio.TimerHandle | None = None
    inbound_links: set = field(default_factory=set)   # HBONE links accepted on its 15008


class OwnPortError(MeshError):
    """A connection asked for a port the ztunnel itself serves in the pod."""


class Ztunnel:
    def __init__(self, *, node: str, control_socket: str, zds_socket: str, token: str,
                 maps_dir: str, node_netns: str | None = None,
                 trust_domain: str = C.DEFAULT_TRUST_DOMAIN):
        self.node = node
        self.control_socket = control_socket
        self.zds_socket = zds_socket
        self.token = token
        self.maps_dir = Path(maps_dir)
        self.node_netns = node_netns
        self.trust_domain = trust_domain
        self.workloads = WorkloadStore(trust_domain)
        self.services = ServiceStore()
        self.policy_objs: dict[str, dict] = {}
        self.policies: list[authz.Policy] = []
        self.policy_rev = 0
        self.policy_synced = False
        self.live: dict[int, tuple[LocalPod, authz.Conn, AppSide]] = {}  # inbound, for re-checks
        self.pods: dict[str, LocalPod] = {}
        self.pool: dict[tuple, list[HboneLink]] = {}
        self.dialing: dict[tuple, asyncio.Future] = {}
        self.recent = collections.deque(maxlen=500)
        self.counters: collections.Counter = collections.Counter()  # admin /stats
        self.open: dict[int, dict] = {}   # live connections (admin /connections), by serial
        self._serial = 0
        self.zds_synced = False
        self.map_fds: dict[str, int] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro) -> asyncio.Task:
        """create_task, holding a reference: the loop keeps only weak ones."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- kernel maps (pinned by the node agent) --------------------------------------
    def _map(self, name: str) -> int:
        fd = self.map_fds.get(name)
        if fd is None:
            fd = bpfsys.obj_get(str(self.maps_dir / name))
            self.map_fds[name] = fd
        return fd

    def original_dst(self, pod: LocalPod, client_port: int) -> tuple[str, int] | None:
        key = abi.OrigKey(netns=pod.cookie, port=client_port)
        val = abi.Dst()
        fd = self._map(C.MAP_ORIG_DST)
        if not bpfsys.map_lookup(fd, key, val):
            return None
        bpfsys.map_delete(fd, key)
        ip, port = val.endpoint()
        return str(ip), port

    # --- access log ---------------------------------------------------------------------
    def record(self, **fields) -> None:
        """Write one access record; a failed connection also counts under its error
        kind (admin /stats: `failed.<kind>`), so a log line and a counter agree."""
        if fields.get("error"):
            self.counters[f"failed.{fields['error']}"] += 1
        fields.setdefault("time", datetime.now(timezone.utc).isoformat())
        self.recent.append(fields)
        access.info(json.dumps(fields, sort_keys=True))

    def opened(self, desc: dict, started: float, *, inbound: bool = False):
        """List a connection as open (admin /connections) and return its close callback,
        `closed(request_bytes, response_bytes)` (client -> server, server -> client),
        which forgets it and writes its access record: `desc` plus bytes and duration.
        The record counts from the reporting workload's side: outbound, the request is
        what it sent (bytes_sent); inbound, what it received (bytes_received)."""
        self._serial += 1
        serial = self._serial
        self.open[serial] = dict(desc, since=datetime.now(timezone.utc).isoformat())

        def closed(request: int, response: int) -> None:
            self.open.pop(serial, None)
            sent, received = (response, request) if inbound else (request, response)
            self.record(**desc, bytes_sent=sent, bytes_received=received,
                        duration_ms=round((time.monotonic() - started) * 1000, 2))
        return closed

    # --- pods ---------------------------------------------------------------------------
    async def add_pod(self, info: dict, fd: int) -> None:
        uid = info["uid"]
        old = self.pods.get(uid)
        if old is not None:
            if os.fstat(old.netns_fd).st_ino == os.fstat(fd).st_ino and old.servers:
                os.close(fd)
                return
            await self.remove_pod(uid)
        cookie = netns.cookie_of(fd)
        spiffe = SpiffeId(trust_domain=self.trust_domain, namespace=info["namespace"],
                          service_account=info["serviceAccount"])
        pod = LocalPod(uid=uid, name=info["name"], namespace=info["namespace"],
                       service_account=info["serviceAccount"], ip=info["ip"], netns_fd=fd,
                       cookie=cookie, spiffe=spiffe)
        try:
            await self._issue_cert(pod)
            await self._listen(pod)
        except BaseException:
            for s in pod.servers:
                s.close()
            os.close(fd)
            raise
        self.pods[uid] = pod
        log.info("pod %s enrolled: listening on 15001/15006/15008 in its netns as %s", uid, spiffe.uri)

    async def remove_pod(self, uid: str) -> bool:
        pod = self.pods.pop(uid, None)
        if pod is None:
            return False
        for s in pod.servers:
            s.close()
        if pod.renew_handle:
            pod.renew_handle.cancel()
        links = self._retire_links_of(pod)
        os.close(pod.netns_fd)
        log.info("pod %s removed (%d HBONE connection(s) closing: now if idle, else when their "
                 "last stream ends)", uid, links)
        return True

    def _retire_links_of(self, pod: LocalPod) -> int:
        """A pod left the mesh: none of its HBONE connections (pooled from it, or
        accepted on its 15008) takes a new stream, and each closes once idle, so no
        socket keeps its netns alive.  Returns how many there were."""
        links = list(pod.inbound_links)
        pod.inbound_links.clear()
        for key in [k for k in self.pool if k[3] == pod.ip]:
            links += self.pool.pop(key)
        for link in links:
            link.retire()
        return len(links)

    async def _issue_cert(self, pod: LocalPod) -> None:
        key = certs.generate_key()
        csr = certs.make_csr(key, pod.spiffe)
        ans = await control_client.acall(self.control_socket, "sign", node=self.node, token=self.token,
                                         namespace=pod.namespace, pod=pod.name, csr=csr.decode())
        cert = certs.WorkloadCert.from_pems(spiffe=pod.spiffe, key_pem=certs.key_to_pem(key),
                                            cert_pem=ans["cert"].encode(),
                                            chain_pem=ans["chain"].encode(),
                                            root_pem=ans["root"].encode())
        pod.cert = cert
        pod.client_ctxs = tls.ClientContexts(cert)
        pod.server_ctx = tls.server_context(cert, trust_domain=self.trust_domain)
        delay = max(1.0, (cert.renew_at - datetime.now(timezone.utc)).total_seconds())
        pod.renew_handle = self.loop.call_later(delay, self._renew, pod.uid)

    def _renew(self, uid: str) -> None:
        pod = self.pods.get(uid)
        if pod is None:
            return

        async def renew():
            try:
                await self._issue_cert(pod)
                log.info("renewed certificate of %s (valid until %s)", uid, pod.cert.not_after)
            except Exception as exc:
                log.warning("renewing the certificate of %s failed: %s; retrying in 10s", uid, exc)
                pod.renew_handle = self.loop.call_later(10, self._renew, uid)
        self.spawn(renew())

    def _socket_in(self, pod: LocalPod, *, mark: int | None = None,
                   transparent: bool = False) -> socket.socket:
        """A non-blocking TCP socket that belongs to the pod's netns."""
        with netns.entered(pod.netns_fd):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        if transparent:
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        s.setblocking(False)
        return s

    async def _dial_from(self, pod: LocalPod, dst: tuple[str, int]) -> socket.socket:
        """Connect from inside the pod as the ztunnel (mark 0x539: connect4 and the
        pod's egress program let it through); 10 s to connect."""
        s = self._socket_in(pod, mark=C.MARK_ZTUNNEL)
        try:
            await asyncio.wait_for(self.loop.sock_connect(s, dst), 10)
        except BaseException:
            s.close()
            raise
        return s

    async def _listen(self, pod: LocalPod) -> None:
        specs = [("127.0.0.1", C.PORT_OUTBOUND, self._paused_factory(self._outbound, pod), None),
                 ("0.0.0.0", C.PORT_INBOUND_PLAIN, self._paused_factory(self._plain_in, pod), C.LISTENER_PLAIN),
                 ("0.0.0.0", C.PORT_HBONE, self._hbone_factory(pod), C.LISTENER_HBONE)]
        for addr, port, factory, kind in specs:
            s = self._socket_in(pod)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((addr, port))
            except OSError as exc:
                s.close()
                raise MeshError(f"cannot listen on {addr}:{port} in pod {pod.uid}: {exc}",
                                hint="is another ztunnel (or the app) already bound there?") from None
            s.listen(1024)
            server = await self.loop.create_server(factory, sock=s, backlog=1024)
            pod.servers.append(server)
            if kind is not None:
                key = abi.ListenKey(ip=abi.ip_to_be32(pod.ip), kind=kind)
                bpfsys.map_update(self._map(C.MAP_LISTENERS), key, ctypes.c_uint64(s.fileno()),
                                  f"{C.MAP_LISTENERS} for {pod.uid}:{port}")

    # --- outbound -----------------------------------------------------------------------
    def _paused_factory(self, handler, pod: LocalPod):
        """Protocol factory for a plain listener: each accepted connection is paused
        until `handler(pod, app)` has decided where its bytes go."""
        def factory():
            app = AppSide()
            app.on_made = lambda a: (a.transport.pause_reading(), self.spawn(handler(pod, a)))
            return app
        return factory

    async def _outbound(self, pod: LocalPod, app: AppSide) -> None:
        peer = app.transport.get_extra_info("peername")
        dst = self.original_dst(pod, peer[1])
        if dst is None:
            log.warning("outbound connection from %s port %d has no original destination; closing",
                        pod.uid, peer[1])
            abort_with_rst(app.transport)
            return
        try:
            svc = self.services.at(dst[0])
            if svc is not None:
                await self._to_service(pod, app, peer[1], dst, svc)
                return
            target = self.workloads.find(dst[0])
            wp = self.services.waypoint_for_workload(target) if target is not None else None
            if wp is not None:
                await self._via_waypoint(pod, app, peer[1], dst, wp, what=f"workload {target.uid}")
            elif target is not None and target.enrolled:
                await self._hbone_out(pod, app, peer[1], dst, target)
            else:
                await self._passthrough(pod, app, dst)
        except Exception as exc:
            self.record(direction="outbound", src=pod.uid, dst=f"{dst[0]}:{dst[1]}",
                        error=type(exc).__name__, reason=str(exc))
            if app.transport and not app.lost:
                abort_with_rst(app.transport)

    async def _to_service(self, pod: LocalPod, app: AppSide, client_port: int,
                          dst: tuple[str, int], svc) -> None:
        """A connection to a Service VIP: to its waypoint (which load balances and applies
        L7 policy), else straight to a random endpoint.  Fails closed (the app sees a
        reset) when the port is not the Service's, the waypoint has no pod yet, or there
        is no endpoint."""
        sp = svc.port(dst[1])
        if sp is None:
            return self._refuse(pod, app, dst, f"Service {svc.key} has no port {dst[1]}", service=svc.key)
        wp = self.services.waypoint_for(svc)
        if wp is not None:
            await self._via_waypoint(pod, app, client_port, dst, wp, what=f"Service {svc.key}",
                                     service=svc.key)
            return
        eps = self.workloads.endpoints(svc)
        if not eps:
            return self._refuse(pod, app, dst, f"Service {svc.key} has no endpoints", service=svc.key)
        ep = random.choice(eps)
        ep_dst = (str(ep.ip), sp.target_port)
        if ep.enrolled:
            await self._hbone_out(pod, app, client_port, ep_dst, ep, extra={"service": svc.key})
        else:
            await self._passthrough(pod, app, ep_dst, extra={"service": svc.key})

    def _refuse(self, pod: LocalPod, app: AppSide, dst: tuple[str, int], reason: str, **extra) -> None:
        self.record(direction="outbound", src=pod.uid, src_identity=pod.spiffe.uri,
                    dst=f"{dst[0]}:{dst[1]}", **extra, error="NO_ROUTE", reason=reason)
        abort_with_rst(app.transport)

    async def _via_waypoint(self, pod: LocalPod, app: AppSide, client_port: int, dst: tuple[str, int],
                            wp, *, what: str, **extra) -> None:
        """HBONE to `wp`'s pod asking for `dst` (a VIP:port or a pod's IP:port): the
        waypoint applies L7 policy and picks the endpoint.  No pod yet: refused."""
        wpod = self.workloads.waypoint_pod(wp)
        if wpod is None:
            return self._refuse(pod, app, dst, f"waypoint {wp.key} of {what} has no running pod",
                                **extra, waypoint=wp.key)
        await self._hbone_out(pod, app, client_port, dst, wpod, extra={**extra, "waypoint": wp.key})

    async def _passthrough(self, pod: LocalPod, app: AppSide, dst: tuple[str, int], *,
                           extra: dict | None = None) -> None:
        s = await self._dial_from(pod, dst)
        _, up = await self.loop.create_connection(AppSide, sock=s)
        started = time.monotonic()
        Pipe(app, up, on_close=self.opened(dict(
            direction="outbound", protocol="PASSTHROUGH", src=pod.uid, src_identity=pod.spiffe.uri,
            dst=f"{dst[0]}:{dst[1]}", **(extra or {})), started))

    async def _link_for(self, pod: LocalPod, target: Workload, deadline: float) -> HboneLink:
        """A pooled link to `target` with a free stream slot, dialling another when every
        link is full.  The slot is only as good as the caller's next synchronous step:
        it must call `start_open` before awaiting anything."""
        key = (pod.spiffe.uri, target.spiffe.uri, str(target.ip), pod.ip)
        while True:
            links = self.pool.get(key, [])
            for link in links:
                if link.capacity > 0:
                    return link
            if any(link.refuses_streams for link in links):
                # more connections would not help: do not dial until the deadline
                raise ConnectionError(f"HBONE peer {target.ip}:{C.PORT_HBONE} ({target.uid}) allows "
                                      "no streams (SETTINGS_MAX_CONCURRENT_STREAMS 0)")
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no HBONE stream slot to {target.ip}:{C.PORT_HBONE} ({target.uid}) "
                                   f"in time: {len(links)} connection(s), all at the peer's stream limit")
            # a fresh link takes one stream until the peer's SETTINGS say how many
            fresh = [link for link in links if not link.dead and not link.draining
                     and not link.settings_seen.done()]
            if fresh:
                try:
                    await asyncio.wait_for(asyncio.shield(fresh[0].settings_seen), remaining)
                except TimeoutError:
                    raise TimeoutError(f"HBONE peer {target.ip}:{C.PORT_HBONE} ({target.uid}) sent no "
                                       "HTTP/2 SETTINGS") from None
                except ConnectionError:
                    pass
                continue
            pending = self.dialing.get(key)
            if pending is not None:
                await asyncio.shield(pending)
                continue
            fut = self.loop.create_future()
            self.dialing[key] = fut
            try:
                link = await self._dial(pod, target, key)
                if pod.uid in self.pods:
                    self.pool.setdefault(key, []).append(link)
                else:
                    link.retire()  # the pod left while we dialled
                    raise ConnectionError(f"pod {pod.uid} left the mesh")
            finally:
                self.dialing.pop(key, None)
                fut.set_result(None)

    async def _dial(self, pod: LocalPod, target: Workload, key: tuple) -> HboneLink:
        where = f"{target.ip}:{C.PORT_HBONE} ({target.uid})"
        try:
            s = await self._dial_from(pod, (str(target.ip), C.PORT_HBONE))
        except TimeoutError:
            raise TimeoutError(f"TCP connect to {where} not done in 10 s") from None
        _, link = await self.loop.create_connection(
            lambda: HboneLink(context=pod.client_ctxs.get(target.spiffe), server_side=False,
                              expected_peer=target.spiffe, on_idle=self._idle(key)), sock=s)
        try:
            await asyncio.wait_for(link.ready, 10)
        except TimeoutError:
            link.close()
            raise TimeoutError(f"TLS/HTTP2 handshake with {where} not done in 10 s") from None
        return link

    def _idle(self, key: tuple):
        def on_idle(link: HboneLink) -> None:
            if link.dead:
                links = self.pool.get(key, [])
                if link in links:
                    links.remove(link)
                return
            link.idle_since = time.monotonic()
            self.loop.call_later(C.POOL_IDLE_TIMEOUT_S, self._close_if_idle, key, link)
        return on_idle

    def _close_if_idle(self, key: tuple, link: HboneLink) -> None:
        if not link.dead and link.load == 0 and link.idle_since is not None and \
                time.monotonic() - link.idle_since >= C.POOL_IDLE_TIMEOUT_S - 1:
            link.close()

    async def _hbone_out(self, pod: LocalPod, app: AppSide, client_port: int,
                         dst: tuple[str, int], target: Workload, *, extra: dict | None = None) -> None:
        """One HBONE stream to `target` (its 15008) asking for `dst` (the :authority):
        the workload itself, or a waypoint asked for a Service VIP."""
        headers = [
            ("forwarded", f'for="{pod.ip}:{client_port}"'),
            ("baggage", f"k8s.namespace.name={pod.namespace},k8s.pod.name={pod.name},"
                        f"service.name={pod.service_account}"),
            ("traceparent", f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"),
        ]
        authority = format_authority(dst[0], dst[1])
        started = time.monotonic()
        deadline = self.loop.time() + 15
        attempt = 0
        while True:
            attempt += 1
            link = await self._link_for(pod, target, deadline)
            try:
                sid, answer = link.start_open(authority, headers)   # takes the slot now
                await asyncio.wait_for(asyncio.shield(answer), max(0.0, deadline - self.loop.time()))
                break
            except StreamRetry as exc:
                # never processed by the peer (its stream limit, or it is draining)
                if attempt >= C.HBONE_OPEN_ATTEMPTS:
                    raise StreamRetry(f"CONNECT {authority} to {target.ip}:{C.PORT_HBONE} refused "
                                      f"{attempt} times: {exc}") from None
                log.info("CONNECT %s to %s: %s; retrying on another connection", authority,
                         target.uid, exc)
            except TimeoutError:
                link.cancel_open(sid)
                raise TimeoutError(f"no answer to CONNECT {dst[0]}:{dst[1]} from {target.ip}:{C.PORT_HBONE} "
                                   f"({target.uid}) in 15 s") from None
            except HboneRefused as exc:
                self.record(direction="outbound", protocol="HBONE", src=pod.uid, src_identity=pod.spiffe.uri,
                            dst=f"{dst[0]}:{dst[1]}", dst_identity=target.spiffe.uri, status=exc.status,
                            error="CONNECT", **(extra or {}))
                abort_with_rst(app.transport)
                return
        link.bind(sid, app, on_close=self.opened(dict(
            direction="outbound", protocol="HBONE", src=pod.uid, src_identity=pod.spiffe.uri,
            dst=f"{dst[0]}:{dst[1]}", dst_identity=target.spiffe.uri, status=200, **(extra or {})),
            started))

    # --- authorization ----------------------------------------------------------------------
    def authorize(self, pod: LocalPod, conn: authz.Conn) -> authz.Decision:
        w = self.workloads.by_uid.get(pod.uid)
        if w is None:
            # its labels decide which selector policies apply: without them, fail closed
            return authz.Decision(False, "workload-unknown")
        return authz.evaluate(authz.in_scope(self.policies, pod.namespace, dict(w.labels)), conn)

    def _track(self, pod: LocalPod, conn: authz.Conn, up: AppSide, on_close):
        """Remember a live inbound connection until it closes (policy re-checks)."""
        key = id(up)
        self.live[key] = (pod, conn, up)

        def closed(*a):
            self.live.pop(key, None)
            on_close(*a)
        return closed

    def set_policies(self, objs: dict[str, dict], rev: int) -> None:
        self.policy_objs = objs
        self.policies = authz.policies_from_objects(objs.values())
        self.policy_rev = rev
        self.recheck()

    def recheck(self) -> None:
        """Close every live inbound connection the current policies deny."""
        for key, (pod, conn, up) in list(self.live.items()):
            d = self.authorize(pod, conn)
            if not d.allow:
                log.info("policy change: closing %s -> %s:%d of %s (%s)", conn.principal or conn.src_ip,
                         conn.dst_ip, conn.dst_port, pod.uid, d)
                self.record(direction="inbound", src=str(conn.src_ip), src_identity=
                            conn.src_identity.uri if conn.src_identity else None, dst_workload=pod.uid,
                            dst=f"{conn.dst_ip}:{conn.dst_port}", error="POLICY", reason=str(d),
                            policy=d.policy, closed_by_policy_change=True)
                self.live.pop(key, None)
                if up.transport and not up.lost:
                    abort_with_rst(up.transport)

    # --- inbound ------------------------------------------------------------------------
    async def _connect_app(self, pod: LocalPod, src_ip: str, port: int) -> AppSide:
        """Connect to the app in `pod` as if from `src_ip` (the app sees the client).
        Never to a port the ztunnel itself serves there: that would loop back into us."""
        if port in C.POD_LISTENER_PORTS:
            raise OwnPortError(f"port {port} of {pod.ip} is the ztunnel's own listener in pod {pod.uid}, "
                               "not an app port: refused (it would loop back into the ztunnel)")
        s = self._socket_in(pod, mark=C.MARK_INBOUND, transparent=True)
        try:
            s.bind((src_ip, 0))
            key = abi.PassKey(remote_ip=abi.ip_to_be32(src_ip), local_ip=abi.ip_to_be32(pod.ip),
                              remote_port=socket.htons(s.getsockname()[1]))
            fd = self._map(C.MAP_INB_PASS)
            bpfsys.map_update(fd, key, ctypes.c_uint32(1), C.MAP_INB_PASS)
            try:
                await asyncio.wait_for(self.loop.sock_connect(s, (pod.ip, port)), 10)
            finally:
                bpfsys.map_delete(fd, key)
        except BaseException:
            s.close()
            raise
        _, up = await self.loop.create_connection(AppSide, sock=s)
        return up

    async def _plain_in(self, pod: LocalPod, app: AppSide) -> None:
        peer = app.transport.get_extra_info("peername")
        local = app.transport.get_extra_info("sockname")
        started = time.monotonic()
        if local[1] in C.POD_LISTENER_PORTS:
            self.record(direction="inbound", protocol="TCP", src=f"{peer[0]}:{peer[1]}", src_identity=None,
                        dst=f"{local[0]}:{local[1]}", dst_workload=pod.uid, error="CONNECT",
                        reason=f"port {local[1]} is the ztunnel's own listener, not an app port")
            abort_with_rst(app.transport)
            return
        conn = authz.Conn(src_ip=ip_address(peer[0]), dst_ip=ip_address(pod.ip), dst_port=local[1])
        decision = self.authorize(pod, conn)
        if not decision.allow:
            self.record(direction="inbound", protocol="TCP", src=f"{peer[0]}:{peer[1]}", src_identity=None,
                        dst=f"{local[0]}:{local[1]}", dst_workload=pod.uid, error="POLICY",
                        reason=str(decision), policy=decision.policy)
            abort_with_rst(app.transport)
            return
        try:
            up = await self._connect_app(pod, peer[0], local[1])
        except Exception as exc:
            self.record(direction="inbound", protocol="TCP", src=f"{peer[0]}:{peer[1]}",
                        dst=f"{local[0]}:{local[1]}", dst_workload=pod.uid, error="CONNECT",
                        reason=str(exc))
            abort_with_rst(app.transport)
            return
        Pipe(app, up, on_close=self._track(pod, conn, up, self.opened(dict(
            direction="inbound", protocol="TCP", src=f"{peer[0]}:{peer[1]}", src_identity=None,
            dst=f"{local[0]}:{local[1]}", dst_workload=pod.uid), started, inbound=True)))

    def _hbone_factory(self, pod: LocalPod):
        def factory():
            link = HboneLink(context=pod.server_ctx, server_side=True, trust_domain=self.trust_domain,
                             on_request=lambda link, e: self.spawn(self._hbone_in(pod, link, e)),
                             on_idle=self._inbound_idle(pod),
                             on_failure=lambda link, exc: self._tls_refused(pod, link, exc))
            pod.inbound_links.add(link)
            return link
        return factory

    def _tls_refused(self, pod: LocalPod, link: HboneLink, exc: Exception) -> None:
        """A peer failed the TLS handshake on the pod's 15008; when our checks refused it
        (no single SPIFFE ID of this trust domain, no h2), OpenSSL sent the alert."""
        peer = link.peer_addr or ("?", 0)
        kind = getattr(exc, "kind", tls.HANDSHAKE)
        self.counters[f"tls_refused.{kind}"] += 1
        log.warning("refused HBONE peer %s:%s at %s's 15008 (%s): %s", peer[0], peer[1], pod.uid, kind, exc)
        claimed = getattr(getattr(exc, "refusal", None), "peer", None)   # what its leaf said, if readable
        self.record(direction="inbound", protocol="HBONE", src=f"{peer[0]}:{peer[1]}",
                    src_identity=getattr(claimed, "uri", None) or (str(claimed) if claimed else None),
                    dst_workload=pod.uid,
                    dst_identity=pod.spiffe.uri, error="TLS_FAILURE", tls_failure=kind, reason=str(exc))

    def _inbound_idle(self, pod: LocalPod):
        def on_idle(link: HboneLink) -> None:
            if link.dead:
                pod.inbound_links.discard(link)
        return on_idle

    async def _hbone_in(self, pod: LocalPod, link: HboneLink, e: ev.StreamRequested) -> None:
        peer_ip = link.peer_addr[0]
        src_id = link.peer_identity.uri if link.peer_identity else None
        common = dict(direction="inbound", protocol="HBONE", src=peer_ip, src_identity=src_id,
                      dst=e.authority, dst_workload=pod.uid, dst_identity=pod.spiffe.uri)
        if e.host != pod.ip:
            link.reject(e.stream_id, 503)
            self.record(**common, status=503, error="CONNECT", reason="no such workload here")
            return
        if e.port in C.POD_LISTENER_PORTS:
            # as Istio's ztunnel: the mesh's own ports are never a tunnel's destination
            link.reject(e.stream_id, 503)
            self.record(**common, status=503, error="CONNECT",
                        reason=f"port {e.port} is the ztunnel's own listener, not an app port")
            return
        conn = authz.Conn(src_ip=ip_address(peer_ip), dst_ip=ip_address(pod.ip), dst_port=e.port,
                          src_identity=link.peer_identity)
        decision = self.authorize(pod, conn)
        if not decision.allow:
            link.reject(e.stream_id, 401)
            self.record(**common, status=401, error="POLICY", reason=str(decision), policy=decision.policy)
            return
        started = time.monotonic()
        try:
            up = await self._connect_app(pod, peer_ip, e.port)
        except Exception as exc:
            link.reject(e.stream_id, 503)
            self.record(**common, status=503, error="CONNECT", reason=str(exc))
            return
        if link.awaiting_answer(e.stream_id):
            desc = dict(common, status=200)
        else:  # the client gave up while we connected: it gets no 200, the app its bytes + RST
            desc = dict(common, error="CONNECT", reason="the client reset the stream before the answer")
        closed = self._track(pod, conn, up, self.opened(desc, started, inbound=True))
        # the Tunnel counts (from the app = the response, from the peer = the request)
        link.accept(e.stream_id, up, on_close=lambda from_app, from_peer: closed(from_peer, from_app))

    # --- control plane watch -------------------------------------------------------------
    async def watch_workloads(self) -> None:
        while not self.stopping:
            try:
                async for msg in control_client.watch(self.control_socket, ["Pod", authz.KIND, *SERVICE_KINDS]):
                    rev = msg.get("rev", self.policy_rev)
                    if msg["event"] == "snapshot":
                        self.workloads.replace_all([o for o in msg["objects"] if o["kind"] == "Pod"])
                        self.services.replace_all([o for o in msg["objects"] if o["kind"] in SERVICE_KINDS])
                        self.set_policies({uid_of(o): o for o in msg["objects"] if o["kind"] == authz.KIND}, rev)
                        self.policy_synced = True
                        continue
                    o = msg["object"]
                    if o["kind"] in SERVICE_KINDS:
                        (self.services.put if msg["event"] == "put" else self.services.delete)(o)
                    elif o["kind"] == authz.KIND:
                        objs = dict(self.policy_objs)
                        if msg["event"] == "delete":
                            objs.pop(uid_of(o), None)
                        else:
                            objs[uid_of(o)] = o
                        self.set_policies(objs, rev)
                    elif msg["event"] == "put":
                        self.workloads.put(o)
                        self.policy_rev = rev
                        self.recheck()  # labels may bring a pod under a selector
                    elif msg["event"] == "delete":
                        self.workloads.delete(uid_of(o))
                        self.policy_rev = rev
            except MeshError as exc:
                log.warning("workload watch: %s; retrying", exc)
            self.workloads.synced = False
            self.policy_synced = False
            await asyncio.sleep(0.5)

    # --- ZDS (node agent hands us pods) ---------------------------------------------------
    def zds_thread(self) -> None:
        while not self.stopping:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                sock.connect(self.zds_socket)
            except OSError:
                sock.close()
                time.sleep(0.3)
                continue
            log.info("connected to the node agent at %s", self.zds_socket)
            seen: set[str] = set()
            try:
                while True:
                    msg, fds = zds.recv(sock)
                    if msg is None:
                        break
                    kind, uid, err = msg.get("type"), msg.get("uid"), None
                    try:
                        if kind == "add":
                            seen.add(uid)
                            self._run(self.add_pod(msg["pod"], fds[0]))
                        elif kind == "del":
                            self._run(self.remove_pod(uid))
                        elif kind == "snapshot_end":
                            for stale in set(self.pods) - seen:
                                self._run(self.remove_pod(stale))
                            self.zds_synced = True
                    except Exception as exc:
                        err = str(exc)
                        log.warning("ZDS %s %s failed: %s", kind, uid, exc)
                    zds.send(sock, {"type": "ack", "uid": uid, "of": kind, "error": err})
            except OSError as exc:
                log.warning("ZDS connection lost: %s", exc)
            finally:
                sock.close()
            self.zds_synced = False
            time.sleep(0.3)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    # --- admin / readiness ------------------------------------------------------------------
    def config_dump(self) -> dict:
        return {
            "node": self.node,
            "workloads": [w.to_json() for w in sorted(self.workloads.by_uid.values(), key=lambda w: w.uid)],
            "localPods": [{"uid": p.uid, "ip": p.ip, "identity": p.spiffe.uri,
                           "certExpires": p.cert.not_after.isoformat() if p.cert else None}
                          for p in self.pods.values()],
            "pool": [{"key": list(k), "connections": len(v), "streams": sum(l.load for l in v)}
                     for k, v in self.pool.items() if v],
            "policyRevision": self.policy_rev,
            "policies": [p.to_json() for p in sorted(self.policies, key=lambda p: p.key)],
            "services": [self._service_json(s) for _, s in sorted(self.services.services.items())],
        }

    def _service_json(self, svc) -> dict:
        wp = self.services.waypoint_for(svc)
        return {"name": svc.name, "namespace": svc.namespace, "vip": str(svc.vip),
                "ports": [{"port": p.port, "targetPort": p.target_port} for p in svc.ports],
                "endpoints": [w.uid for w in self.workloads.endpoints(svc)],
                "waypoint": wp.key if wp else None}

    def ready(self) -> bool:
        return self.zds_synced and self.workloads.synced and self.policy_synced

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await reader.readline()).decode(errors="replace").split()
            while (await reader.readline()).strip():
                pass
            path = line[1] if len(line) > 1 else "/"
            if path.startswith("/healthz/ready"):
                code, body = (200, "ready\n") if self.ready() else (503, "not ready\n")
            elif path.startswith("/config_dump"):
                code, body = 200, json.dumps(self.config_dump(), indent=1) + "\n"
            elif path.startswith("/stats"):
                code, body = 200, json.dumps({"counters": dict(sorted(self.counters.items()))},
                                             indent=1) + "\n"
            elif path.startswith("/connections"):
                code, body = 200, json.dumps({"open": list(self.open.values()),
                                              "recent": list(self.recent)}, indent=1) + "\n"
            else:
                code, body = 404, "not found\n"
            data = body.encode()
            writer.write(f"HTTP/1.1 {code} {'OK' if code == 200 else 'ERR'}\r\nContent-Length: "
                         f"{len(data)}\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n".encode()
                         + data)
            await writer.drain()
        except (ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    async def _serve_admin(self) -> None:
        for port in (C.PORT_READY, C.PORT_ADMIN):
            if self.node_netns:
                with netns.entered(self.node_netns):
                    s = socket.socket()
            else:
                s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen(64)
            s.setblocking(False)
            await asyncio.start_server(self._http, sock=s)

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        tune_allocator()   # reuse the data path's large buffers instead of re-faulting them
        await self._serve_admin()
        self.spawn(self.watch_workloads())
        threading.Thread(target=self.zds_thread, name="zds", daemon=True).start()
        log.info("ztunnel for node %s started", self.node)
        await asyncio.Event().wait()
