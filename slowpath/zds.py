"""ZDS: how the node agent hands enrolled pods' network namespaces to the ztunnel.

A unix SOCK_SEQPACKET socket owned by the node agent.  Each message is one JSON object;
an `add` carries the pod's netns fd with SCM_RIGHTS.  On connect the agent sends a
snapshot (`add`... then `snapshot_end`); later `add`/`del` as pods come and go.  The
ztunnel answers every message with {"type": "ack", "uid": ..., "error": null|str}.
Because the ztunnel holds the fd, it can create sockets in the pod without entering
any path, and it can restart and get everything again from a fresh snapshot.
"""
from __future__ import annotations

import json
import socket

MAX_MSG = 64 * 1024


def send(sock: socket.socket, msg: dict, fd: int | None = None) -> None:
    data = json.dumps(msg).encode()
    if fd is None:
        sock.send(data)
    else:
        socket.send_fds(sock, [data], [fd])


def recv(sock: socket.socket) -> tuple[dict | None, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MSG, 4)
    if not data:
        for fd in fds:
            import os
            os.close(fd)
        return None, []
    return json.loads(data), fds
