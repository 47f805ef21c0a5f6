"""The kernel half on its own: real programs in this kernel, real namespaces.

The ztunnel's part (listening on 15001/15006, reading the original destination, the
transparent connect to the app) is played here by plain sockets, so each kernel hook is
checked directly: connect4 + sockops + getpeername4, sk_lookup steering, the in-pod egress
fail-closed program, host-side anti-spoofing, and detach/unpin leaving nothing behind.
"""
from __future__ import annotations

import ctypes
import socket
import subprocess
import threading

import pytest

from meshcore import constants as C
from meshcore import netns
from fastpath import abi, loader
from meshcore import bpfsys as libbpf
from fastpath import pod as fpod

pytestmark = pytest.mark.root

IP_TRANSPARENT = 19


def sock_in(ns: str, *opts) -> socket.socket:
    with netns.entered(ns):
        s = socket.socket()
    s.settimeout(5)
    for level, opt, val in opts:
        s.setsockopt(level, opt, val)
    return s


def listener_in(ns: str, addr: tuple[str, int]) -> socket.socket:
    s = sock_in(ns, (socket.SOL_SOCKET, socket.SO_REUSEADDR, 1))
    s.bind(addr)
    s.listen(16)
    return s


@pytest.fixture
def two_nodes(lab_network):
    lab, topo, pods = lab_network
    dps = {}
    try:
        for node in ("node1", "node2"):
            dp = loader.NodeDatapath(f"{lab}-{node}")
            dp.load()
            dps[node] = dp
        yield lab, pods, dps
    finally:
        for dp in dps.values():
            for key in fpod.attached_keys(dp):
                fpod.detach_pod(dp, key)
            dp.close()
            loader.unpin_node(dp.node)


def attach(dp, pod, pod_id):
    return fpod.attach_pod(dp, fpod.PodRef(key=f"p{pod_id}", pod_id=pod_id, netns=pod.netns, ip=pod.ip,
                                           node_netns=pod.node_netns, host_veth=pod.host_veth))


def test_redirect_original_dst_and_transparent_inbound(two_nodes):
    lab, pods, dps = two_nodes
    c1, s2 = pods["client-1"], pods["server-2"]
    t1 = attach(dps["node1"], c1, 1)
    t2 = attach(dps["node2"], s2, 1)
    print(f"attach times: {t1 * 1000:.1f} ms, {t2 * 1000:.1f} ms")

    app = listener_in(s2.netns, ("0.0.0.0", 8080))
    plain = listener_in(s2.netns, ("0.0.0.0", C.PORT_INBOUND_PLAIN))
    outbound = listener_in(c1.netns, ("127.0.0.1", C.PORT_OUTBOUND))
    libbpf.map_update(dps["node2"].map_fds["mesh_listen"],
                      abi.ListenKey(ip=abi.ip_to_be32(s2.ip), kind=C.LISTENER_PLAIN),
                      ctypes.c_uint64(plain.fileno()), "mesh_listen")
    c1_cookie = netns.cookie_of(c1.netns)
    seen = {}

    def play_ztunnel_outbound():
        conn, peer = outbound.accept()
        val = abi.Dst()
        seen["found"] = libbpf.map_lookup(dps["node1"].map_fds["mesh_orig_dst"],
                                          abi.OrigKey(netns=c1_cookie, port=peer[1]), val)
        seen["orig"] = val.endpoint()
        up = sock_in(c1.netns, (socket.SOL_SOCKET, socket.SO_MARK, C.MARK_ZTUNNEL))
        up.connect((str(seen["orig"][0]), seen["orig"][1]))
        conn.sendall(b"reply-from-mesh")
        up.sendall(b"hello")
        conn.close()
        up.close()

    def play_ztunnel_inbound():
        conn, peer = plain.accept()
        seen["inbound_peer"], seen["inbound_local"] = peer, conn.getsockname()
        t = sock_in(s2.netns, (socket.SOL_IP, IP_TRANSPARENT, 1),
                    (socket.SOL_SOCKET, socket.SO_MARK, C.MARK_INBOUND))
        t.bind((peer[0], 0))
        key = abi.PassKey(remote_ip=abi.ip_to_be32(peer[0]), local_ip=abi.ip_to_be32(s2.ip),
                          remote_port=socket.htons(t.getsockname()[1]))
        libbpf.map_update(dps["node2"].map_fds["mesh_inb_pass"], key, ctypes.c_uint32(1), "pass")
        t.connect(conn.getsockname())
        libbpf.map_delete(dps["node2"].map_fds["mesh_inb_pass"], key)
        t.sendall(conn.recv(100))
        t.close()
        conn.close()

    threads = [threading.Thread(target=f, daemon=True)
               for f in (play_ztunnel_outbound, play_ztunnel_inbound)]
    for th in threads:
        th.start()
    a = sock_in(c1.netns)
    a.connect((s2.ip, 8080))
    assert a.getpeername() == (s2.ip, 8080), "getpeername4 must show the dialled address"
    assert a.recv(100) == b"reply-from-mesh"
    app.settimeout(5)
    conn, peer = app.accept()
    assert peer[0] == c1.ip, "the app must see the client pod's IP"
    assert conn.recv(100) == b"hello"
    for th in threads:
        th.join(5)
    assert seen["found"] and seen["orig"] == (__import__("ipaddress").IPv4Address(s2.ip), 8080)
    assert seen["inbound_local"] == (s2.ip, 8080)
    n1, n2 = dps["node1"].counters(), dps["node2"].counters()
    assert n1["connect_redirected"] == 1 and n1["orig_dst_published"] == 1
    assert n1["getpeer_restored"] >= 1 and n1["connect_ztunnel_skip"] == 1
    assert n2["lookup_plain"] == 1, "sk_lookup steers the plaintext SYN once, not the ztunnel's own"
    for s in (app, plain, outbound, a, conn):
        s.close()


def test_no_ztunnel_listener_means_refused(two_nodes):
    lab, pods, dps = two_nodes
    c1, s2 = pods["client-1"], pods["server-2"]
    attach(dps["node1"], c1, 1)
    attach(dps["node2"], s2, 1)
    app = listener_in(s2.netns, ("0.0.0.0", 8080))
    # outbound: nothing on 15001 -> the app's connect fails at once, nothing leaves the pod
    a = sock_in(c1.netns)
    with pytest.raises(ConnectionRefusedError):
        a.connect((s2.ip, 8080))
    # inbound: plaintext to an enrolled pod without its ztunnel is refused (fail closed)
    legacy = pods["legacy-2"]
    b = sock_in(legacy.netns)
    b.settimeout(2)
    with pytest.raises((ConnectionRefusedError, TimeoutError)):
        b.connect((s2.ip, 8080))
    assert dps["node2"].counters()["lookup_no_listener"] >= 1
    for s in (app, a, b):
        s.close()


def test_egress_drops_syn_that_bypassed_connect4(two_nodes):
    lab, pods, dps = two_nodes
    c1, s1 = pods["client-1"], pods["server-1"]
    attach(dps["node1"], c1, 1)
    app = listener_in(s1.netns, ("0.0.0.0", 8080))
    # take the pod out of mesh_pods only: connect4 no longer redirects, but the pod's
    # egress program is still attached and must stop the plain SYN
    assert libbpf.map_delete(dps["node1"].map_fds["mesh_pods"],
                             ctypes.c_uint64(netns.cookie_of(c1.netns)))
    a = sock_in(c1.netns)
    a.settimeout(1.5)
    with pytest.raises((TimeoutError, OSError)):
        a.connect((s1.ip, 8080))
    assert dps["node1"].counters()["egress_syn_dropped"] >= 1
    # a ztunnel-marked socket still gets out
    z = sock_in(c1.netns, (socket.SOL_SOCKET, socket.SO_MARK, C.MARK_ZTUNNEL))
    z.connect((s1.ip, 8080))
    for s in (app, a, z):
        s.close()


def test_anti_spoofing_drops_foreign_source(two_nodes):
    lab, pods, dps = two_nodes
    c1, s1 = pods["client-1"], pods["server-1"]
    attach(dps["node1"], c1, 1)
    app = listener_in(s1.netns, ("0.0.0.0", 8080))
    spoofed = "10.244.1.99"  # inside client-1's own namespace: an address that is not its own
    subprocess.run(["ip", "-n", c1.netns, "addr", "add", f"{spoofed}/32", "dev", "eth0"], check=True)
    before = dps["node1"].counters()["spoof_dropped"]
    z = sock_in(c1.netns, (socket.SOL_SOCKET, socket.SO_MARK, C.MARK_ZTUNNEL))
    z.settimeout(1.5)
    z.bind((spoofed, 0))
    with pytest.raises((TimeoutError, OSError)):
        z.connect((s1.ip, 8080))
    assert dps["node1"].counters()["spoof_dropped"] > before
    for s in (app, z):
        s.close()


def test_detach_and_unpin_leave_nothing(two_nodes):
    lab, pods, dps = two_nodes
    c1, s1 = pods["client-1"], pods["server-1"]
    dp = dps["node1"]
    attach(dp, c1, 1)
    assert (dp.pods_dir / "p1" / "sk_lookup").exists()
    assert fpod.detach_pod(dp, "p1", pod_netns=c1.netns) is True
    assert fpod.detach_pod(dp, "p1", pod_netns=c1.netns) is False  # idempotent
    assert not (dp.pods_dir / "p1").exists()
    assert list(libbpf.map_keys(dp.map_fds["mesh_pods"], ctypes.c_uint64)) == []
    assert list(libbpf.map_keys(dp.map_fds["mesh_veth"], ctypes.c_uint32)) == []
    rules = subprocess.run(["ip", "-n", c1.netns, "rule"], capture_output=True, text=True).stdout
    assert "fwmark" not in rules
    # traffic is plain TCP again: a direct connect reaches the app, no redirect counted
    app = listener_in(s1.netns, ("0.0.0.0", 8080))
    a = sock_in(c1.netns)
    a.connect((s1.ip, 8080))
    assert a.getpeername() == (s1.ip, 8080)
    before = dp.counters()["connect_redirected"]
    assert before == 0
    a.close()
    app.close()
    dp.close()
    loader.unpin_node(dp.node)
    assert not loader.pin_dir(dp.node).exists()


def test_ctypes_mirrors_match_the_layout_clang_gave_the_maps(two_nodes):
    """The structs in meshcore.abi against the key/leaf types bcc derived from clang."""
    lab, pods, dps = two_nodes
    b = dps["node1"].bpf
    expect = {"mesh_pods": (ctypes.c_uint64, abi.PodInfo),
              "mesh_sk_dst": (ctypes.c_uint64, abi.Dst),
              "mesh_orig_dst": (abi.OrigKey, abi.Dst),
              "mesh_inb_pass": (abi.PassKey, ctypes.c_uint32),
              "mesh_veth": (ctypes.c_uint32, abi.VethInfo),
              "mesh_pol_out": (abi.PolOutKey, abi.Verdict),
              "mesh_pol_in": (abi.PolInKey, abi.Verdict)}
    for name, (key, leaf) in expect.items():
        table = b[name.encode()]
        for ours, theirs in ((key, table.Key), (leaf, table.Leaf)):
            assert ctypes.sizeof(ours) == ctypes.sizeof(theirs), (name, ours)
            if hasattr(ours, "_fields_"):
                got = [(f[0], getattr(theirs, f[0]).offset) for f in theirs._fields_ if not f[0].startswith("__pad")]
                want = [(f[0], getattr(ours, f[0]).offset) for f in ours._fields_]
                assert got == want, (name, got, want)
