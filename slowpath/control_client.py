"""Client of the control plane's API: JSON lines over a unix stream socket.

Used by the ztunnel (workload watch, CSR signing), the node agent and the CLI.  One
request per line, one answer per line ({"ok": true, ...} or {"ok": false, "error": ...,
"code": N}); `watch` keeps the connection open and streams change events.  The socket
file is root-only (0600): who can open it is who may act.
"""
from __future__ import annotations

import asyncio
import json
import socket

from meshcore.errors import MeshError, UnavailableError

MAX_LINE = 16 * 1024 * 1024


class ControlError(MeshError):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.exit_code = code


def _unavailable(path: str, exc: Exception) -> UnavailableError:
    return UnavailableError(f"control plane not reachable at {path}: {exc}",
                            hint="is `meshlane control` running (`meshlane lab status`)?")


def call(path: str, op: str, timeout: float = 30.0, **args) -> dict:
    """Blocking request/answer (CLI, node agent)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError as exc:
        s.close()
        raise _unavailable(path, exc) from None
    with s:
        s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise UnavailableError(f"control plane at {path} closed the connection during {op!r}")
            buf += chunk
    return _answer(json.loads(buf))


def _answer(msg: dict) -> dict:
    if not msg.get("ok"):
        raise ControlError(msg.get("error", "control plane error"), msg.get("code", 1))
    return msg


async def acall(path: str, op: str, **args) -> dict:
    try:
        reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE)
    except OSError as exc:
        raise _unavailable(path, exc) from None
    try:
        writer.write(json.dumps({"op": op, **args}).encode() + b"\n")
        await writer.drain()
        line = await reader.readline()
        if not line:
            raise UnavailableError(f"control plane at {path} closed the connection during {op!r}")
        return _answer(json.loads(line))
    finally:
        writer.close()


async def watch(path: str, kinds: list[str]):
    """Yield {"event": "snapshot", "objects": [...]} then {"event": "put"|"delete",
    "object": {...}} until the connection ends."""
    try:
        reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE)
    except OSError as exc:
        raise _unavailable(path, exc) from None
    try:
        writer.write(json.dumps({"op": "watch", "kinds": kinds}).encode() + b"\n")
        await writer.drain()
        while True:
            line = await reader.readline()
            if not line:
                return
            yield json.loads(line)
    finally:
        writer.close()
