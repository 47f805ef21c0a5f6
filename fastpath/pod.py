"""Per-pod enrolment in the kernel: map entries and BPF links, no compile.

attach_pod() makes a pod's traffic the mesh's:
  - mesh_pods[netns cookie]      connect4/sockops act on the pod's sockets
  - sk_lookup link on its netns  inbound SYNs go to the ztunnel's listeners
  - tcx egress on its eth0       fail closed: only the ztunnel's SYNs leave
  - tcx ingress on the host veth anti-spoofing; mesh_veth[ifindex] = pod IP
  - in-pod policy routing        replies to the ztunnel's spoofed-source connections
                                 (mark 0x1000) are delivered over lo, see constants.py
Every link is pinned under /sys/fs/bpf/meshlane/<node>/pods/<ns>_<name>/ so it outlives
the agent; detach_pod() undoes each step and tolerates steps that were never done, so a
half-finished attach is always cleaned up by detach.  Detach first unsplices the pod's
same-node fast-path flows (fastpath.fast): they go on as plain TCP, nothing is lost.
Must not: create or delete namespaces or interfaces (the lab / CNI does that).
"""
from __future__ import annotations

import ctypes
import errno
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from meshcore import constants as C
from meshcore import netns
from meshcore.errors import NotFoundError
from fastpath import abi
from fastpath import fast
from fastpath import policy as fpolicy
from meshcore import bpfsys as libbpf
from fastpath.loader import NodeDatapath


@dataclass(frozen=True, kw_only=True)
class PodRef:
    """What the kernel side needs to know about one pod."""
    key: str              # pin directory name, unique on the node ("<ns>_<name>")
    pod_id: int
    netns: str            # name under /run/netns or a path (/proc/PID/ns/net)
    ip: str
    ifname: str = "eth0"  # the pod's interface, inside its netns
    node_netns: str | None = None   # where the host-side veth lives (None: our netns)
    host_veth: str | None = None    # host-side veth name, for anti-spoofing


def _ifindex(name: str, where: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise NotFoundError(f"interface {name!r} not found in {where}",
                            hint="is the pod's veth set up?") from None


def _ctx(ref: str | None):
    if ref is None:
        import contextlib
        return contextlib.nullcontext()
    return netns.entered(ref)


def _pin_link(link_fd: int, path: Path) -> None:
    try:
        if path.exists():
            path.unlink()
        libbpf.obj_pin(link_fd, str(path))
    finally:
        os.close(link_fd)


def _pod_routing(add: bool) -> None:
    """Inside the pod's netns (the caller entered it).

    tcp_fwmark_accept: the app's accepted socket inherits the mark of the ztunnel's SYN;
    fwmark_reflect: the kernel's own RSTs (closed port) carry it too, so a refused
    connect reaches the ztunnel at once instead of leaking out of eth0."""
    for key in ("tcp_fwmark_accept", "fwmark_reflect"):
        with open(f"/proc/sys/net/ipv4/{key}", "w") as f:
            f.write("1" if add else "0")
    ipr = IPRoute()
    try:
        ops = [
            ("rule", dict(fwmark=C.MARK_INBOUND_BIT, fwmask=C.MARK_INBOUND_BIT,
                          table=C.INBOUND_ROUTE_TABLE, priority=C.INBOUND_RULE_PRIORITY)),
            ("route", dict(dst="0.0.0.0/0", type="local", oif=1, scope="host",
                           table=C.INBOUND_ROUTE_TABLE)),
        ]
        for kind, kw in (ops if add else reversed(ops)):
            try:
                getattr(ipr, kind)("add" if add else "del", **kw)
            except NetlinkError as exc:
                if add and exc.code == errno.EEXIST:
                    continue
                if not add and exc.code in (errno.ENOENT, errno.ESRCH):
                    continue
                raise
    finally:
        ipr.close()


def attach_pod(dp: NodeDatapath, pod: PodRef) -> float:
    """Enrol one pod; returns the seconds it took."""
    t0 = time.monotonic()
    pdir = dp.pods_dir / pod.key
    pdir.mkdir(parents=True, exist_ok=True)
    cookie = netns.cookie_of(pod.netns)
    ip32 = abi.ip_to_be32(pod.ip)

    # inbound steering and fail-closed egress first, so the pod is never half-open
    with netns.entered(pod.netns):
        nsfd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            link = libbpf.link_create(dp.prog_fds["mesh_sk_lookup"], nsfd, libbpf.ATTACH_SK_LOOKUP,
                                      f"sk_lookup to netns {pod.netns}")
        finally:
            os.close(nsfd)
        _pin_link(link, pdir / "sk_lookup")
        ifindex = _ifindex(pod.ifname, f"netns {pod.netns}")
        link = libbpf.link_create(dp.prog_fds["mesh_pod_egress"], ifindex, libbpf.ATTACH_TCX_EGRESS,
                                  f"tcx egress to {pod.ifname} in {pod.netns}")
        _pin_link(link, pdir / "egress")
        _pod_routing(add=True)

    if pod.host_veth:
        with _ctx(pod.node_netns):
            hidx = _ifindex(pod.host_veth, f"netns {pod.node_netns or 'of the agent'}")
            link = libbpf.link_create(dp.prog_fds["mesh_veth_ingress"], hidx,
                                      libbpf.ATTACH_TCX_INGRESS, f"tcx ingress to {pod.host_veth}")
            _pin_link(link, pdir / "veth_ingress")
        libbpf.map_update(dp.map_fds["mesh_veth"], ctypes.c_uint32(hidx),
                          abi.VethInfo(pod_ip=ip32, pod_id=pod.pod_id), "mesh_veth")
        (pdir / "veth_ifindex").mkdir(exist_ok=True)
        (pdir / "veth_ifindex" / str(hidx)).mkdir(exist_ok=True)

    # last: the connect4 redirect, which needs the ztunnel's 15001 to be useful
    libbpf.map_update(dp.map_fds["mesh_pods"], ctypes.c_uint64(cookie),
                      abi.PodInfo(ip=ip32, flags=C.POD_F_ENROLLED, pod_id=pod.pod_id), "mesh_pods")
    (pdir / "netns_cookie").mkdir(exist_ok=True)
    (pdir / "netns_cookie" / str(cookie)).mkdir(exist_ok=True)
    return time.monotonic() - t0


def detach_pod(dp: NodeDatapath, key: str, *, pod_netns: str | None = None) -> bool:
    """Undo attach_pod.  Works from the pins alone (the netns may already be gone).
    Returns False if nothing was attached."""
    pdir = dp.pods_dir / key
    if not pdir.exists():
        return False
    _unsplice_pod(dp, pdir)
    for sub, mapname, ctype in (("netns_cookie", "mesh_pods", ctypes.c_uint64),
                                ("veth_ifindex", "mesh_veth", ctypes.c_uint32)):
        d = pdir / sub
        if d.exists():
            for entry in d.iterdir():
                libbpf.map_delete(dp.map_fds[mapname], ctype(int(entry.name)))
                entry.rmdir()
            d.rmdir()
    for name in ("egress", "sk_lookup", "veth_ingress"):
        pin = pdir / name
        if pin.exists():
            fd = libbpf.obj_get(str(pin))
            try:
                libbpf.link_detach(fd, str(pin))
            except libbpf.BpfError:
                pass  # netns or interface already gone: the link is defunct
            finally:
                os.close(fd)
            pin.unlink()
    if pod_netns is not None:
        try:
            with netns.entered(pod_netns):
                _pod_routing(add=False)
        except NotFoundError:
            pass
    pdir.rmdir()
    return True


def _unsplice_pod(dp: NodeDatapath, pdir: Path) -> None:
    """Before anything else is undone: no fast-path entry may name the pod any more
    (no new flow is approved to or from it) and its live flows leave the splice."""
    d = pdir / "netns_cookie"
    if not d.exists():
        return
    for entry in d.iterdir():
        info = abi.PodInfo()
        if not libbpf.map_lookup(dp.map_fds[C.MAP_PODS], ctypes.c_uint64(int(entry.name)), info):
            continue
        ip = str(abi.be32_to_ip(info.ip))
        out_fd = dp.map_fds[C.MAP_POL_OUT]
        for k, (action, _) in fpolicy.read_out(out_fd).items():
            if action == C.VERDICT_FAST and (k[0] == info.pod_id or k[1] == ip):
                libbpf.map_delete(out_fd, fpolicy.out_key(k))
        fast.unsplice_ip(dp.map_fds[C.MAP_FAST], ip)


def attached_keys(dp: NodeDatapath) -> list[str]:
    if not dp.pods_dir.exists():
        return []
    return sorted(p.name for p in dp.pods_dir.iterdir() if p.is_dir())


def pod_key(namespace: str, name: str) -> str:
    """Pin directory name of a pod: '_' appears in neither namespace nor pod names."""
    return f"{namespace}_{name}"


def pod_number(key: str) -> int:
    import zlib
    return zlib.crc32(key.encode()) & 0x7FFFFFFF
