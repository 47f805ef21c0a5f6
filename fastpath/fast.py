"""The same-node fast path's live flows: read them, unsplice them, close them.

The kernel approves a flow at connect() (mesh_fast, keyed by the client's 4-tuple) and
splices its two sockets through mesh_fast_sk (bpf/sockops.c, bpf/sk_msg.c).  The node
agent uses this module to act on flows that already exist:

  unsplice   delete the flow entry: sk_msg passes every later send of both ends to TCP
             and the connection goes on as a plain TCP connection.  Bytes already
             redirected stay queued for the app (the sockets stay in the sockhash until
             they close; deleting a socket from a sockhash would discard them).
  close      SOCK_DESTROY both ends through inet_diag (`ss -K`), inside each pod's netns:
             the apps see ECONNABORTED, as with any connection a policy change denies.

Must not: decide policy (the node agent compares flows with the compiled verdicts).
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from meshcore import abi
from meshcore import bpfsys as libbpf
from meshcore import constants as C
from meshcore import netns

DIR_NAMES = {C.FAST_DIR_UNDECIDED: "idle", C.FAST_DIR_SPLICED: "spliced", C.FAST_DIR_TCP: "tcp"}


@dataclass(frozen=True)
class Flow:
    client: tuple[str, int]
    server: tuple[str, int]
    rule: int
    src_pod: int
    client_in: bool
    server_in: bool
    dirs: tuple[int, int]          # FAST_DIR_* of client->server, server->client
    bytes: tuple[int, int]         # redirected payload per direction

    @property
    def key(self) -> abi.FastKey:
        return flow_key(self.client, self.server)

    @property
    def spliced(self) -> bool:
        return self.client_in and self.server_in and C.FAST_DIR_TCP not in self.dirs

    def to_json(self) -> dict:
        return {"client": f"{self.client[0]}:{self.client[1]}",
                "server": f"{self.server[0]}:{self.server[1]}", "rule": self.rule,
                "inSockhash": {"client": self.client_in, "server": self.server_in},
                "direction": {"clientToServer": DIR_NAMES.get(self.dirs[0], "?"),
                              "serverToClient": DIR_NAMES.get(self.dirs[1], "?")},
                "bytesSpliced": {"clientToServer": self.bytes[0], "serverToClient": self.bytes[1]}}


def flow_key(client: tuple[str, int], server: tuple[str, int]) -> abi.FastKey:
    return abi.FastKey(local_ip=abi.ip_to_be32(client[0]), remote_ip=abi.ip_to_be32(server[0]),
                       local_port=client[1], remote_port=server[1])


def read_flows(fd: int) -> list[Flow]:
    out = []
    for k in list(libbpf.map_keys(fd, abi.FastKey)):
        v = abi.FastFlow()
        if not libbpf.map_lookup(fd, k, v):
            continue   # closed meanwhile
        client, server = k.endpoints()
        out.append(Flow(client=client, server=server, rule=v.rule, src_pod=v.src_pod,
                        client_in=bool(v.client_in), server_in=bool(v.server_in),
                        dirs=(v.dir[0], v.dir[1]), bytes=(v.bytes[0], v.bytes[1])))
    return out


def read_pinned(maps_dir: Path) -> list[Flow]:
    """The flows of a node, from its pinned mesh_fast (for readers outside the agent)."""
    fd = libbpf.obj_get(str(maps_dir / C.MAP_FAST))
    try:
        return read_flows(fd)
    finally:
        os.close(fd)


def unsplice(fd: int, flow: Flow) -> bool:
    return libbpf.map_delete(fd, flow.key)


def unsplice_ip(fd: int, ip: str) -> list[Flow]:
    """Unsplice every flow with `ip` at either end (a pod leaving the mesh)."""
    gone = [f for f in read_flows(fd) if ip in (f.client[0], f.server[0])]
    for f in gone:
        unsplice(fd, f)
    return gone


def unsplice_all(fd: int) -> int:
    flows = read_flows(fd)
    for f in flows:
        unsplice(fd, f)
    return len(flows)


def destroy_socket(pod_netns: str, local: tuple[str, int], remote: tuple[str, int]) -> None:
    """Abort the TCP socket (local -> remote) living in `pod_netns` (SOCK_DESTROY)."""
    with netns.entered(pod_netns):
        # the child inherits this thread's netns
        subprocess.run(["ss", "-K", "-t", "-n", "state", "all",
                        "src", f"{local[0]}:{local[1]}", "dst", f"{remote[0]}:{remote[1]}"],
                       capture_output=True, check=False, timeout=10)
