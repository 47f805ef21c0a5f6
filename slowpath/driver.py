"""The socket driver: asyncio transports around the sans-IO HBONE codec.

Owns all socket I/O of the ztunnel's data path:
  - `HboneLink`: one TCP connection carrying TLS (ssl.SSLObject over MemoryBIOs, so no
    SNI is ever sent and the handshake is ours to drive) and an HboneClient/HboneServer.
  - `Tunnel`: joins one app-side TCP connection to one CONNECT stream, with flow control
    both ways (app reads pause while the stream window is shut; DATA is acknowledged to
    the peer only once written onward), half-close as END_STREAM, abort as RST_STREAM.
  - `Pipe`: joins two plain TCP connections (passthrough, plaintext inbound).
Must not: decide policy or choose destinations; callers pass those in.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Callable

from meshcore import constants as C
from meshcore.identity import SpiffeId
from slowpath import tls
from slowpath.hbone import events as ev
from slowpath.hbone.codec import HboneClient, HboneConnection, HboneServer

log = logging.getLogger("meshlane.ztunnel")

READ_CHUNK = 256 * 1024


class AppSide(asyncio.Protocol):
    """A plain TCP connection (an app's, or an upstream the ztunnel opened)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.sink: Callable[[bytes], None] | None = None
        self.on_eof: Callable[[], None] | None = None
        self.on_lost: Callable[[Exception | None], None] | None = None
        self.on_drain: Callable[[], None] | None = None
        self.on_made: Callable[["AppSide"], None] | None = None
        self.write_paused = False
        self.early = bytearray()
        self.early_eof = False
        self.lost = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.on_made:
            self.on_made(self)

    def data_received(self, data: bytes) -> None:
        if self.sink:
            self.sink(data)
        else:
            self.early += data
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.on_eof:
            self.on_eof()
        else:
            self.early_eof = True
        return True  # keep the write side open: TCP half-close is part of the contract

    def connection_lost(self, exc) -> None:
        self.lost = True
        if self.on_lost:
            self.on_lost(exc)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.on_drain:
            self.on_drain()

    def attach(self, sink, on_eof, on_lost, on_drain) -> None:
        self.sink, self.on_eof, self.on_lost, self.on_drain = sink, on_eof, on_lost, on_drain
        if self.early:
            data, self.early = bytes(self.early), bytearray()
            sink(data)
        if self.early_eof:
            on_eof()
        if self.lost:
            on_lost(None)
        elif self.transport:
            self.transport.resume_reading()


class Pipe:
    """Two plain TCP connections joined: bytes, half-close and abort carried across."""

    def __init__(self, a: AppSide, b: AppSide, on_close: Callable[[int, int], None] | None = None):
        self.a, self.b = a, b
        self.bytes = {id(a): 0, id(b): 0}
        self.eofs = set()
        self.closed = False
        self.on_close = on_close
        for src, dst in ((a, b), (b, a)):
            src.attach(self._sink(src, dst), self._eof(src, dst), self._lost(src, dst),
                       self._drain(src, dst))

    def _sink(self, src: AppSide, dst: AppSide):
        def sink(data: bytes) -> None:
            self.bytes[id(src)] += len(data)
            dst.transport.write(data)
            if dst.write_paused:
                src.transport.pause_reading()
        return sink

    def _drain(self, src: AppSide, dst: AppSide):
        def drain() -> None:  # src can take writes again: let dst read
            if not dst.lost and dst.transport:
                dst.transport.resume_reading()
        return drain

    def _eof(self, src: AppSide, dst: AppSide):
        def eof() -> None:
            self.eofs.add(id(src))
            if dst.transport and dst.transport.can_write_eof() and not dst.lost:
                dst.transport.write_eof()
            if len(self.eofs) == 2:
                self._close(abort=False)
        return eof

    def _lost(self, src: AppSide, dst: AppSide):
        def lost(exc) -> None:
            self._close(abort=exc is not None or id(src) not in self.eofs)
        return lost

    def _close(self, abort: bool) -> None:
        if self.closed:
            return
        self.closed = True
        for side in (self.a, self.b):
            if side.transport and not side.lost:
                side.transport.abort() if abort else side.transport.close()
        if self.on_close:
            self.on_close(self.bytes[id(self.a)], self.bytes[id(self.b)])


class Tunnel:
    """One app connection <-> one HBONE stream."""

    def __init__(self, link: "HboneLink", stream_id: int, app: AppSide,
                 on_close: Callable[[int, int], None] | None = None):
        self.link, self.sid, self.app = link, stream_id, app
        self.pending = bytearray()
        self.app_eof = False
        self.peer_eof = False
        self.end_sent = False
        self.unacked = 0
        self.closed = False
        self.sent = 0
        self.received = 0
        self.on_close = on_close
        link.tunnels[stream_id] = self

    def start(self) -> None:
        """The stream is up: start moving bytes."""
        self.app.attach(self._from_app, self._app_eof, self._app_lost, self._app_drained)

    # app -> stream
    def _from_app(self, data: bytes) -> None:
        self.sent += len(data)
        if not self.pending and not self.closed:
            # nothing queued ahead of it: hand the chunk to the codec as it is, and queue
            # only what the stream window does not take (saves two copies per chunk)
            data = data[self.link.codec.send_data(self.sid, data):]
        self.pending += data
        self.pump()

    def pump(self) -> None:
        codec = self.link.codec
        while self.pending and not self.closed:
            n = codec.send_data(self.sid, bytes(self.pending[:READ_CHUNK]))
            if n <= 0:
                break
            del self.pending[:n]
        if self.app_eof and not self.pending and not self.end_sent and not self.closed:
            codec.end_stream(self.sid)
            self.end_sent = True
        self.link.flush()
        if self.app.transport and not self.app.lost:
            if self.pending:
                self.app.transport.pause_reading()
            else:
                self.app.transport.resume_reading()
        self._maybe_done()

    def _app_eof(self) -> None:
        self.app_eof = True
        self.pump()

    def _app_lost(self, exc) -> None:
        if not self.closed and not (self.end_sent and self.peer_eof):
            self.link.codec.reset_stream(self.sid)
            self.link.flush()
        self._finish()

    def _app_drained(self) -> None:
        if self.unacked:
            n, self.unacked = self.unacked, 0
            self.link.codec.ack_data(self.sid, n)
            self.link.flush()

    # stream -> app
    def on_data(self, data: bytes, flow_len: int) -> None:
        self.received += len(data)
        if self.app.lost:
            self.link.codec.ack_data(self.sid, flow_len)
            return
        self.app.transport.write(data)
        if self.app.write_paused:
            self.unacked += flow_len
        else:
            self.link.codec.ack_data(self.sid, flow_len)

    def on_end(self) -> None:
        self.peer_eof = True
        if self.app.transport and not self.app.lost and self.app.transport.can_write_eof():
            self.app.transport.write_eof()
        self._maybe_done()

    def on_reset(self) -> None:
        if self.app.transport and not self.app.lost:
            self.app.transport.abort()
        self._finish()

    def _maybe_done(self) -> None:
        if self.peer_eof and self.end_sent and not self.closed:
            if self.app.transport and not self.app.lost:
                self.app.transport.close()
            self._finish()

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.link.tunnels.pop(self.sid, None)
        self.link.stream_closed()
        if self.on_close:
            self.on_close(self.sent, self.received)


class HboneLink(asyncio.Protocol):
    """TLS 1.3 + HTTP/2 over one TCP connection, client or server side."""

    def __init__(self, *, context: ssl.SSLContext, server_side: bool,
                 expected_peer: SpiffeId | None = None,
                 trust_domain: str | None = None,
                 on_request: Callable[["HboneLink", ev.StreamRequested], None] | None = None,
                 on_idle: Callable[["HboneLink"], None] | None = None,
                 ping_interval: float = C.H2_PING_INTERVAL_S,
                 ping_timeout: float = C.H2_PING_TIMEOUT_S):
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.context = context
        self.server_side = server_side
        self.expected_peer = expected_peer
        self.trust_domain = trust_domain
        self.on_request = on_request
        self.on_idle = on_idle
        self.codec: HboneConnection = HboneServer() if server_side else HboneClient()
        self.transport: asyncio.Transport | None = None
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj: ssl.SSLObject | None = None
        self.handshaken = False
        self.ready: asyncio.Future = asyncio.get_event_loop().create_future()
        self.peer_identity: SpiffeId | None = None
        self.peer_addr: tuple[str, int] | None = None
        self.tunnels: dict[int, Tunnel] = {}
        self.pending_open: dict[int, asyncio.Future] = {}
        self.early: dict[int, list[tuple[bytes, int]]] = {}
        self.early_end: set[int] = set()
        self.dead = False
        self._keepalive: asyncio.TimerHandle | None = None
        self.idle_since: float | None = None  # set by the pool when the last stream ends
        self._ping_sent_at: float | None = None

    # --- transport callbacks ---------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer_addr = transport.get_extra_info("peername")
        self.sslobj = self.context.wrap_bio(self.incoming, self.outgoing,
                                            server_side=self.server_side, server_hostname=None)
        if not self.server_side:
            self._handshake()

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        if not self.handshaken:
            self._handshake()
            if not self.handshaken:
                return
        self._read()

    def eof_received(self) -> bool:
        self._die("peer closed the connection")
        return False

    def connection_lost(self, exc) -> None:
        self._die(f"connection lost: {exc}" if exc else "connection closed")

    # --- TLS ----------------------------------------------------------------------
    def _write_tls(self) -> None:
        out = self.outgoing.read()
        if out and self.transport and not self.transport.is_closing():
            self.transport.write(out)

    def _handshake(self) -> None:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._write_tls()
            return
        except (ssl.SSLError, OSError) as exc:
            self._write_tls()
            self._fail(tls.TlsIdentityError(f"TLS handshake with {self.peer_addr} failed: {exc}"))
            return
        self._write_tls()
        try:
            if self.server_side:
                self.peer_identity = tls.peer_identity(self.sslobj, **(
                    {"trust_domain": self.trust_domain} if self.trust_domain else {}))
            elif self.expected_peer is not None:
                self.peer_identity = tls.verify_peer_identity(self.sslobj, self.expected_peer)
        except Exception as exc:
            self._fail(exc)
            return
        if self.sslobj.selected_alpn_protocol() != "h2":
            self._fail(tls.TlsIdentityError(f"peer {self.peer_addr} did not negotiate ALPN h2"))
            return
        self.handshaken = True
        self.codec.initiate()
        self.flush()
        if not self.server_side:
            self._keepalive = asyncio.get_event_loop().call_later(self.ping_interval, self._ping)
        if not self.ready.done():
            self.ready.set_result(self)

    def _ping(self) -> None:
        """Every 10 s a PING; a peer that has not answered the last one for 20 s is gone
        (a half-dead pooled connection would otherwise swallow new streams)."""
        if self.dead:
            return
        now = asyncio.get_event_loop().time()
        if self._ping_sent_at is not None and now - self._ping_sent_at >= self.ping_timeout:
            log.warning("HBONE peer %s did not answer PING for %.0f s; closing", self.peer_addr,
                        now - self._ping_sent_at)
            self.close()
            return
        if self._ping_sent_at is None:
            self.codec.ping()
            self._ping_sent_at = now
            self.flush()
        self._keepalive = asyncio.get_event_loop().call_later(self.ping_interval, self._ping)

    def _fail(self, exc: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
        else:
            log.warning("%s", exc)
        if self.transport:
            self.transport.abort()

    def _read(self) -> None:
        chunks = []
        while True:
            try:
                chunk = self.sslobj.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                break
            except ssl.SSLError as exc:
                self._fail(exc)
                return
            if not chunk:
                break
            chunks.append(chunk)
        if chunks:
            for event in self.codec.receive_data(b"".join(chunks)):
                self._dispatch(event)
            self.flush()

    def flush(self) -> None:
        data = self.codec.data_to_send()
        if data and self.sslobj is not None and not self.dead:
            self.sslobj.write(data)
            self._write_tls()

    # --- HTTP/2 events --------------------------------------------------------------
    def _dispatch(self, e: ev.Event) -> None:
        if isinstance(e, ev.DataReceived):
            t = self.tunnels.get(e.stream_id)
            if t is not None:
                t.on_data(e.data, e.flow_controlled_length)
            else:
                self.early.setdefault(e.stream_id, []).append((e.data, e.flow_controlled_length))
        elif isinstance(e, ev.StreamEnded):
            t = self.tunnels.get(e.stream_id)
            if t is not None:
                t.on_end()
            else:
                self.early_end.add(e.stream_id)
        elif isinstance(e, ev.StreamReset):
            t = self.tunnels.get(e.stream_id)
            if t is not None:
                t.on_reset()
            self._resolve(e.stream_id, ConnectionResetError(f"stream reset ({e.error_code})"))
            self.early.pop(e.stream_id, None)
        elif isinstance(e, ev.WindowOpened):
            for t in list(self.tunnels.values()):
                if e.stream_id is None or t.sid == e.stream_id:
                    t.pump()
        elif isinstance(e, ev.StreamAccepted):
            self._resolve(e.stream_id, None)
        elif isinstance(e, ev.StreamRefused):
            self._resolve(e.stream_id, HboneRefused(e.status))
        elif isinstance(e, ev.StreamRequested):
            if self.on_request:
                self.on_request(self, e)
        elif isinstance(e, ev.RequestRejected):
            log.info("rejected HBONE request from %s: %s %s", self.peer_addr, e.status, e.reason)
        elif isinstance(e, ev.PingAcked):
            self._ping_sent_at = None
        elif isinstance(e, ev.ConnectionTerminated):
            self.flush()
            self._die(f"HTTP/2 connection terminated: {e.reason}")

    def _resolve(self, sid: int, exc: Exception | None) -> None:
        fut = self.pending_open.pop(sid, None)
        if fut is not None and not fut.done():
            fut.set_result(None) if exc is None else fut.set_exception(exc)

    def bind(self, sid: int, app: AppSide, on_close=None) -> Tunnel:
        """Attach an app connection to stream `sid`, replaying any early data."""
        t = Tunnel(self, sid, app, on_close)
        for data, n in self.early.pop(sid, []):
            t.on_data(data, n)
        if sid in self.early_end:
            self.early_end.discard(sid)
            t.on_end()
        t.start()
        return t

    async def open(self, authority: str, headers: list[tuple[str, str]]) -> int:
        """Client side: CONNECT and wait for the 200."""
        sid = self.codec.open_stream(authority, headers)
        fut = asyncio.get_event_loop().create_future()
        self.pending_open[sid] = fut
        self.flush()
        await fut
        return sid

    def stream_closed(self) -> None:
        if not self.tunnels and not self.pending_open and self.on_idle:
            self.on_idle(self)

    @property
    def load(self) -> int:
        return len(self.tunnels) + len(self.pending_open)

    def _die(self, why: str) -> None:
        if self.dead:
            return
        self.dead = True
        if self._keepalive is not None:
            self._keepalive.cancel()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        for sid in list(self.pending_open):
            self._resolve(sid, ConnectionError(why))
        for t in list(self.tunnels.values()):
            t.on_reset()
        if self.transport and not self.transport.is_closing():
            self.transport.close()
        if self.on_idle:
            self.on_idle(self)

    def close(self) -> None:
        if not self.dead:
            self.codec.close()
            self.flush()
        self._die("closed by us")


class HboneRefused(Exception):
    def __init__(self, status: int):
        super().__init__(f"HBONE CONNECT refused with status {status}")
        self.status = status
