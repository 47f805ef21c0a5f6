"""`make demo`: build the default lab and show the mesh doing its job, in a few lines.

Starts the lab (or reuses a running one), sends an HTTP request from client-1 (node1) to
server-2 (node2) while capturing on node1's underlay interface, and prints: that the
request worked and whom the server saw; what the capture held (only TLS to 15008, none of
the request's bytes); the identities each side presented.  Then the same-node fast path,
an L4 DENY decided at connect(), and a waypoint (Envoy) applying an L7 policy to the
Service `server`; the policy and the waypoint are removed again.  Leaves the lab running.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from meshcore import constants as C
from meshcore import netns
from meshcore.errors import MeshError
from meshlane import lab as labmod


def pcap_payloads(path: Path) -> list[tuple[int, int, bytes]]:
    """(src port, dst port, TCP payload) of each IPv4/TCP packet in a pcap file."""
    data = path.read_bytes()
    out, off = [], 24
    while off + 16 <= len(data):
        incl = struct.unpack_from("<I", data, off + 8)[0]
        pkt = data[off + 16: off + 16 + incl]
        off += 16 + incl
        if len(pkt) < 34 or pkt[12:14] != b"\x08\x00" or pkt[23] != 6:
            continue
        ihl = (pkt[14] & 0x0F) * 4
        tcp = pkt[14 + ihl:]
        sport, dport = struct.unpack_from("!HH", tcp, 0)
        out.append((sport, dport, tcp[(tcp[12] >> 4) * 4:]))
    return out


DEMO_DENY = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
             "metadata": {"name": "demo-deny-9090", "namespace": "demo"},
             "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9090"]}}]}]}}


def _policy_step(name: str, c1: dict, s2: dict) -> tuple[str, bool]:
    """Apply a DENY on port 9090, connect to it once, remove it again."""
    from fastpath.loader import NodeDatapath
    from slowpath import control_client
    sock = str(labmod.LabPaths(name).control_socket)
    dp = NodeDatapath(labmod.LabPaths(name).pin_name("node1"))
    rev = control_client.call(sock, "apply", objects=[DEMO_DENY], src="demo")["rev"]
    try:
        labmod.wait_policies(name, rev, 10)
        before = dp.counters()["policy_out_deny"]
        with netns.entered(c1["netns"]):
            s = socket.socket()
        with s:
            t0 = time.perf_counter()
            try:
                s.connect((s2["ip"], 9090))
                outcome = "CONNECTED (not denied!)"
            except ConnectionRefusedError:
                outcome = "refused"
            took = (time.perf_counter() - t0) * 1000
        after = dp.counters()["policy_out_deny"]
    finally:
        control_client.call(sock, "delete_objects", objects=[DEMO_DENY])
    return (f"policy    with DENY demo/demo-deny-9090 applied, client-1's connect to server-2:9090 was "
            f"{outcome} in {took:.2f} ms at connect() in node1's kernel (policy_out_deny {before} -> "
            f"{after}, no packet sent); policy removed again"), outcome == "refused" and after == before + 1


DEMO_NO_DELETE = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                  "metadata": {"name": "demo-no-delete", "namespace": "demo"},
                  "spec": {"targetRefs": [{"kind": "Service", "group": "", "name": "server"}],
                           "action": "DENY", "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]}}


def _cli(name: str, *args: str) -> None:
    res = subprocess.run([sys.executable, "-m", "meshlane.cli", *args, "--lab", name],
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise MeshError(f"`meshlane {' '.join(args)}` failed: {res.stderr.strip()}")


def _waypoint_step(name: str, c1: dict) -> tuple[str, bool]:
    """Service `server` through a waypoint: GET is served, DELETE refused by an L7 policy."""
    from slowpath import control_client
    sock = str(labmod.LabPaths(name).control_socket)
    vip = control_client.call(sock, "get", kind="Service", namespace="demo",
                              name="server")["objects"][0]["spec"]["clusterIP"]

    def call(method: str) -> tuple[int, dict]:
        with netns.entered(c1["netns"]):
            s = socket.socket()
        s.settimeout(5)
        with s:
            s.connect((vip, 80))
            s.sendall(f"{method} /demo HTTP/1.1\r\nHost: server.demo\r\nConnection: close\r\n\r\n".encode())
            resp = b""
            while chunk := s.recv(65536):
                resp += chunk
        head, _, body = resp.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 "):
            raise ConnectionError("closed without an HTTP answer")   # config on its way
        status = int(head.split(b" ")[1])
        return status, (json.loads(body) if status == 200 else {})

    _cli(name, "waypoint", "apply", "-n", "demo")
    try:
        _cli(name, "label", "service", "server", "-n", "demo", "istio.io/use-waypoint=waypoint")
        control_client.call(sock, "apply", objects=[DEMO_NO_DELETE], src="demo")
        deadline = time.monotonic() + 20
        got, denied = (0, {}), 0
        while time.monotonic() < deadline:
            try:
                got, denied = call("GET"), call("DELETE")[0]
            except OSError:
                pass
            # through Envoy (it adds x-forwarded-proto) and the policy is in place
            if got[0] == 200 and "x-forwarded-proto" in got[1].get("headers", {}) and denied == 403:
                break
            time.sleep(0.3)
        gw = control_client.call(sock, "get", kind="Gateway", namespace="demo", name="waypoint")["objects"][0]
        info = (gw.get("status") or {}).get("meshlane") or {}
        seen = ""
        for node in ("node1", "node2"):
            code, body = labmod.http_get_in_netns(f"{name}-{node}", C.PORT_ADMIN, "/connections")
            conns = json.loads(body) if code == 200 else {}
            # Envoy keeps its upstream connections: the tunnel may still be open
            recs = [r for r in conns.get("recent", []) + conns.get("open", [])
                    if r.get("direction") == "inbound" and r.get("src") == info.get("ip")
                    and r.get("status") == 200]
            seen = recs[-1]["src_identity"] if recs else seen
    finally:
        for cleanup in (lambda: control_client.call(sock, "delete_objects", objects=[DEMO_NO_DELETE]),
                        lambda: _cli(name, "label", "service", "server", "-n", "demo", "istio.io/use-waypoint-"),
                        lambda: _cli(name, "waypoint", "delete", "-n", "demo", "waypoint")):
            try:
                cleanup()
            except MeshError as exc:
                print(f"meshlane: demo cleanup: {exc}", file=sys.stderr)
    ok = got[0] == 200 and denied == 403 and seen == info.get("identity")
    return (f"waypoint  Service server ({vip}:80) through waypoint demo/waypoint (Envoy pid "
            f"{info.get('envoyPid')}, pod {info.get('pod')}): GET -> {got[0]} from "
            f"{got[1].get('pod', '?')}, DELETE -> {denied} (L7 DENY demo/demo-no-delete); the "
            f"server's ztunnel saw peer {seen or '?'}; waypoint and policy removed again"), ok


def _fast_step(name: str, c1: dict, s1: dict) -> tuple[str, bool]:
    """client-1 -> server-1 on the same node: spliced in node1's kernel."""
    from fastpath.loader import NodeDatapath
    dp = NodeDatapath(labmod.LabPaths(name).pin_name("node1"))
    before = dp.counters()
    with netns.entered(c1["netns"]):
        s = socket.socket()
    s.settimeout(10)
    with s:
        s.connect((s1["ip"], 8080))
        s.sendall(b"GET / HTTP/1.1\r\nHost: server-1\r\nConnection: close\r\n\r\n")
        resp = b""
        while chunk := s.recv(65536):
            resp += chunk
    after = dp.counters()
    d = {k: after[k] - before[k] for k in after}
    ok = resp.startswith(b"HTTP/1.1 200") and d["connect_fast"] == 1 and d["fast_spliced"] == 2
    return (f"fastpath  client-1 -> server-1 (both on node1): {resp.split(b' ')[1].decode()}; "
            f"connect left direct, both sockets spliced (fast_spliced +{d['fast_spliced']}), "
            f"{d['fast_bytes_redirected']} payload bytes socket to socket, none through the ztunnel "
            f"(connect_redirected +{d['connect_redirected']})"), ok


def main() -> int:
    name = os.environ.get("MESHLANE_LAB", labmod.DEFAULT_LAB)
    try:
        if labmod.LabPaths(name).state.exists():
            labmod.progress(f"lab {name!r} is already up; reusing it")
        else:
            labmod.up(name, None)
        pods = {p["name"]: p for p in labmod.load_state(name)["pods"]}
        c1, s2 = pods["client-1"], pods["server-2"]
        marker = f"demo-{uuid.uuid4().hex[:12]}"
        pcap = Path(tempfile.mkdtemp(prefix="meshlane-demo-")) / "underlay.pcap"
        cap = subprocess.Popen(["ip", "netns", "exec", f"{name}-node1", "tcpdump", "--immediate-mode",
                                "-Z", "root", "-i", "ul0", "-U", "-s", "0", "-w", str(pcap), "tcp"],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        cap.stderr.readline()
        with netns.entered(c1["netns"]):
            s = socket.socket()
        s.settimeout(10)
        t0 = time.monotonic()
        with s:
            s.connect((s2["ip"], 8080))
            s.sendall(f"GET /{marker} HTTP/1.1\r\nHost: server-2\r\nConnection: close\r\n\r\n".encode())
            resp = b""
            while chunk := s.recv(65536):
                resp += chunk
        took = (time.monotonic() - t0) * 1000
        time.sleep(0.3)
        cap.send_signal(signal.SIGINT)
        cap.wait(5)
        answer = json.loads(resp.partition(b"\r\n\r\n")[2])
        pkts = pcap_payloads(pcap)
        payload = [(sp, dp, p) for sp, dp, p in pkts if p]
        only_hbone = all(C.PORT_HBONE in (sp, dp) for sp, dp, _ in pkts)
        tls_records = sum(1 for _, _, p in payload if p[:1] in (b"\x16", b"\x17", b"\x14", b"\x15"))
        leaked = any(marker.encode() in p for _, _, p in payload)
        code, body = labmod.http_get_in_netns(f"{name}-node2", C.PORT_ADMIN, "/connections")
        inbound = [r for r in json.loads(body)["recent"] if r.get("direction") == "inbound"
                   and r.get("protocol") == "HBONE" and r.get("status") == 200
                   and r.get("dst") == f"{s2['ip']}:8080"]
        rec = inbound[-1] if inbound else {}
        print(f"request   client-1 ({c1['ip']}, node1) -> server-2 ({s2['ip']}:8080, node2): "
              f"{resp.split(b' ')[1].decode()} in {took:.1f} ms; server-2 saw peer {answer['peer']}")
        print(f"underlay  {len(pkts)} packets on node1's ul0, {len(payload)} with payload, "
              f"{'all' if only_hbone else 'NOT all'} to/from port {C.PORT_HBONE}; "
              f"{tls_records} start a TLS record; request bytes seen in clear: {'YES' if leaked else 'no'}")
        print(f"identity  client presented {rec.get('src_identity')}; "
              f"server presented {rec.get('dst_identity')} (node2's ztunnel log)")
        line, spliced = _fast_step(name, c1, pods["server-1"])
        print(line)
        line, denied = _policy_step(name, c1, s2)
        print(line)
        line, l7_ok = _waypoint_step(name, c1)
        print(line)
        print(f"lab       still running: `meshlane lab status`, `meshlane zc workloads`, "
              f"`meshlane lab exec client-1 -- curl http://{s2['ip']}:8080/`; "
              f"tear down with `meshlane lab down`")
        pcap.unlink(missing_ok=True)
        pcap.parent.rmdir()
        return 0 if (not leaked and only_hbone and answer.get("pod") == "server-2" and denied
                     and spliced and l7_ok) else 1
    except MeshError as exc:
        print(f"meshlane: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
