"""HBONE: HTTP/2 CONNECT tunnels over mutual TLS 1.3 (DESIGN.md §4), sans-IO.

    events     what the codec reports (frozen dataclasses) and HboneError
    authority  the `ip:port` / `[v6]:port` destination in `:authority`
    codec      HboneClient / HboneServer over h2: bytes in, events out, bytes to send
    h2fast     h2's H2Connection with a copy-light data path (used by codec)
    memory     in-memory pipes (plain or TLS via MemoryBIO) for tests, no sockets

Must not: do socket I/O or decide policy; the ztunnel's driver modules do both.
"""
from slowpath.hbone.authority import format_authority, parse_authority
from slowpath.hbone.codec import HboneClient, HboneConnection, HboneServer
from slowpath.hbone.events import (
    ConnectionDraining,
    ConnectionTerminated,
    DataReceived,
    Event,
    HboneError,
    PeerSettings,
    PingAcked,
    RequestRejected,
    StreamAccepted,
    StreamEnded,
    StreamRefused,
    StreamRequested,
    StreamReset,
    WindowOpened,
)

__all__ = [
    "ConnectionDraining", "ConnectionTerminated", "DataReceived", "Event", "HboneClient",
    "HboneConnection", "HboneError", "HboneServer", "PeerSettings", "PingAcked", "RequestRejected", "StreamAccepted",
    "StreamEnded", "StreamRefused", "StreamRequested", "StreamReset", "WindowOpened",
    "format_authority", "parse_authority",
]
