"""The socket driver: asyncio transports around the sans-IO HBONE codec.

Owns all socket I/O of the ztunnel's data path:
  - `HboneLink`: one TCP connection carrying TLS (ssl.SSLObject over MemoryBIOs, so no
    SNI is ever sent and the handshake is ours to drive) and an HboneClient/HboneServer.
  - `Tunnel`: joins one app-side TCP connection to one CONNECT stream, with flow control
    both ways (app reads pause while the stream window is shut; DATA is acknowledged to
    the peer only once written onward), half-close as END_STREAM, abort as RST_STREAM.
  - `Pipe`: joins two plain TCP connections (passthrough, plaintext inbound).
Must not: decide policy or choose destinations; callers pass those in.

How a connection ends is carried across exactly (RFC 9113 §8.5, and what Envoy does):
  - a FIN is END_STREAM and END_STREAM is a FIN;
  - a TCP reset from the app is RST_STREAM CONNECT_ERROR; RST_STREAM from the peer (or
    the HBONE connection dying) is a TCP reset (SO_LINGER 0) to the app, so a truncated
    transfer never looks complete;
  - bytes already received are delivered first, in order, whatever the end: data that
    arrived before the tunnel was bound is replayed with its FIN or reset, and a reset
    waits (up to RESET_FLUSH_TIMEOUT_S) until the app's socket has taken every byte.
A graceful GOAWAY from the peer (`ConnectionDraining`) keeps the link's open tunnels;
the link takes no new stream and closes once idle.  `capacity` is what the pool may
still open here: the peer's MAX_CONCURRENT_STREAMS (one stream until its SETTINGS
arrive), our per-connection cap, and nothing while draining or after a refusal.

Data path costs (profiled in the netns lab): every socket gets TCP_NODELAY; the TLS
link reads into per-thread scratch buffers (BufferedProtocol, `SSLObject.read` into a
buffer) and the codec copies each payload byte once; app bytes go to the codec and on
into TLS by reference (no copies while queued for the stream window either).
`tune_allocator()` is for the ztunnel's start-up.
"""
from __future__ import annotations

import asyncio
import collections
import ctypes
import fcntl
import logging
import socket
import ssl
import struct
import termios
import threading
from typing import Callable

from meshcore import constants as C
from meshcore.identity import SpiffeId
from slowpath import tls
from slowpath.hbone import events as ev
from slowpath.hbone.codec import HboneClient, HboneConnection, HboneServer
from slowpath.hbone.events import (
    H2_CANCEL,
    H2_CONNECT_ERROR,
    H2_NO_ERROR,
    H2_REFUSED_STREAM,
    HboneError,
)

log = logging.getLogger("meshlane.ztunnel")

READ_CHUNK = 256 * 1024
# How long a reset waits for the app's socket to take the bytes already written to it
# (our buffer and the kernel's unacknowledged send queue) before the RST goes anyway.
RESET_FLUSH_TIMEOUT_S = 5.0
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def _nodelay(transport) -> None:
    """Turn Nagle off.  asyncio does it only for sockets whose `proto` is IPPROTO_TCP,
    and the ztunnel's sockets are made with proto 0 (and accepted ones inherit that):
    with Nagle on, every small write that follows another one waits for the peer's
    delayed ACK, 40 ms here, on every connection setup and request/response turn."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) \
            and sock.type == socket.SOCK_STREAM:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # already closed: nothing to tune


def _unsent(transport) -> int:
    """Bytes written to `transport` that the peer has not acknowledged yet: asyncio's
    buffer plus the kernel's send queue (SIOCOUTQ, which is TIOCOUTQ)."""
    n = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            n += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        except (OSError, ValueError):
            pass  # closed meanwhile
    return n


def abort_with_rst(transport) -> None:
    """Close at once with a TCP reset (SO_LINGER 0): what is unsent is dropped."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
    transport.abort()


def reset_after_flush(transport, timeout: float = RESET_FLUSH_TIMEOUT_S) -> None:
    """The other end aborted: let the app have every byte already written to its
    socket, then reset it.  Reading stops at once (what the app still sends has
    nowhere to go); after `timeout` the RST goes even if the app never read."""
    if transport is None or transport.is_closing():
        return
    transport.pause_reading()
    loop = asyncio.get_event_loop()
    deadline = loop.time() + timeout

    def step(delay: float) -> None:
        if transport.is_closing():
            return
        if _unsent(transport) and loop.time() < deadline:
            loop.call_later(delay, step, min(delay * 2, 0.05))
            return
        abort_with_rst(transport)
    step(0.001)


def tune_allocator(mmap_threshold: int = 8 << 20, trim_threshold: int = 32 << 20) -> bool:
    """Keep glibc from handing the data path's buffers back to the kernel after every
    use.  Each read, TLS record batch and DATA payload is a transient allocation of
    64 KiB - 1 MiB; with glibc's defaults those are mmap()ed or trimmed off the heap
    top when freed and the next one faults fresh zeroed pages in again, which cost
    the sending ztunnel about 40% of its CPU per byte here.  Process-wide, so the
    ztunnel calls it once at start-up; returns False where there is no glibc mallopt.
    Costs up to `trim_threshold` bytes of free heap kept resident."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc <malloc.h>
    return bool(mallopt(m_mmap_threshold, mmap_threshold)) and \
        bool(mallopt(m_trim_threshold, trim_threshold))


class _Scratch(threading.local):
    """Per-thread buffers for the TLS link's reads: what the transport receives and
    what TLS decrypts are consumed (copied onward) before the call that filled them
    returns, so one pair per thread (one event loop) serves every link."""

    def __init__(self) -> None:
        self.recv = memoryview(bytearray(READ_CHUNK))
        self.plain = memoryview(bytearray(READ_CHUNK))


_scratch = _Scratch()


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
        self.lost_exc: Exception | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        _nodelay(transport)
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
        self.lost_exc = exc
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
            on_lost(self.lost_exc)
        elif self.transport:
            self.transport.resume_reading()


class Pipe:
    """Two plain TCP connections joined: bytes, half-close and reset carried across.

    `on_close(from_a, from_b)` gets the bytes each side sent."""

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
                self._finish()
        return eof

    def _lost(self, src: AppSide, dst: AppSide):
        def lost(exc) -> None:
            if self.closed:
                return
            if exc is not None or id(src) not in self.eofs:
                # src was reset (or went without its FIN): dst gets what src sent, then RST
                reset_after_flush(dst.transport)
                self._finish(leave=dst)
            else:
                self._finish()
        return lost

    def _finish(self, leave: AppSide | None = None) -> None:
        """Close both sides (FIN after what is queued), except `leave`, which a reset
        is already taking care of."""
        if self.closed:
            return
        self.closed = True
        for side in (self.a, self.b):
            if side is not leave and side.transport and not side.lost and not side.transport.is_closing():
                side.transport.close()
        if self.on_close:
            self.on_close(self.bytes[id(self.a)], self.bytes[id(self.b)])


class Tunnel:
    """One app connection <-> one HBONE stream.

    `on_close(from_app, from_peer)` gets the bytes each way."""

    def __init__(self, link: "HboneLink", stream_id: int, app: AppSide,
                 on_close: Callable[[int, int], None] | None = None):
        self.link, self.sid, self.app = link, stream_id, app
        # app bytes the stream window did not take yet: immutable chunks (bytes, or
        # memoryviews of bytes), handed to the codec by reference when it opens again
        self.pending: collections.deque = collections.deque()
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
        if type(data) is not bytes:
            data = bytes(data)  # kept by reference below: must not change under us
        self.sent += len(data)
        if not self.pending and not self.closed:
            # nothing queued ahead of it: hand the chunk to the codec as it is (it keeps
            # a reference, no copy), and queue only what the stream window does not take
            try:
                n = self.link.codec.send_data(self.sid, data)
            except HboneError:
                n = 0  # finished in the codec; its StreamReset/ConnectionTerminated follows
            if n < len(data):
                self.pending.append(memoryview(data)[n:] if n else data)
        elif data:
            self.pending.append(data)
        self.pump()

    def pump(self) -> None:
        codec = self.link.codec
        pending = self.pending
        while pending and not self.closed:
            chunk = pending[0]
            try:
                n = codec.send_data(self.sid, chunk)
            except HboneError:
                # The codec has already finished this stream (a RST_STREAM or GOAWAY later
                # in the batch being dispatched): the event saying so comes next.
                break
            if n <= 0:
                break
            if n < len(chunk):
                pending[0] = memoryview(chunk)[n:]
            else:
                pending.popleft()
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
            # RFC 9113 §8.5: the app's connection was reset or failed -> CONNECT_ERROR;
            # CANCEL only when we dropped it ourselves
            self.link.codec.reset_stream(self.sid, H2_CONNECT_ERROR if exc is not None else H2_CANCEL)
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

    def on_reset(self, error_code: int = H2_CANCEL) -> None:
        """The peer sent RST_STREAM (or the link died): the app gets what it was already
        sent, then a TCP reset.  RST_STREAM NO_ERROR after the peer's END_STREAM is
        only "stop sending" (RFC 9113 §8.1): the app sees the FIN it already had."""
        if self.closed:
            return
        self.pending.clear()
        app = self.app
        if app.transport and not app.lost:
            if error_code == H2_NO_ERROR and self.peer_eof:
                app.transport.close()
            else:
                reset_after_flush(app.transport)
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


class HboneLink(asyncio.BufferedProtocol):
    """TLS 1.3 + HTTP/2 over one TCP connection, client or server side."""

    def __init__(self, *, context: ssl.SSLContext, server_side: bool,
                 expected_peer: SpiffeId | None = None,
                 trust_domain: str | None = None,
                 on_request: Callable[["HboneLink", ev.StreamRequested], None] | None = None,
                 on_idle: Callable[["HboneLink"], None] | None = None,
                 on_failure: Callable[["HboneLink", Exception], None] | None = None,
                 ping_interval: float = C.H2_PING_INTERVAL_S,
                 ping_timeout: float = C.H2_PING_TIMEOUT_S):
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.context = context
        self.server_side = server_side
        self.expected_peer = expected_peer
        self.trust_domain = trust_domain
        self.on_request = on_request
        self.on_idle = on_idle
        self.on_failure = on_failure
        self.codec: HboneConnection = HboneServer() if server_side else HboneClient()
        self.transport: asyncio.Transport | None = None
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj: ssl.SSLObject | None = None
        self.handshaken = False
        loop = asyncio.get_event_loop()
        self.ready: asyncio.Future = loop.create_future()
        # resolved when the peer's first SETTINGS arrive (its stream limit is known)
        self.settings_seen: asyncio.Future = loop.create_future()
        self.peer_identity: SpiffeId | None = None
        self.peer_addr: tuple[str, int] | None = None
        self.tunnels: dict[int, Tunnel] = {}
        self.pending_open: dict[int, asyncio.Future] = {}
        # what arrived for a stream before it was bound to an app connection, replayed
        # in order by bind(): data, then END_STREAM and/or RST_STREAM (its error code)
        self.early: dict[int, list[tuple[bytes, int]]] = {}
        self.early_end: set[int] = set()
        self.early_reset: dict[int, int] = {}
        self.dead = False
        self.draining = False   # the peer's graceful GOAWAY, or retire(): no new streams
        self._refused = False   # the peer refused a stream: full until one of ours ends
        self._keepalive: asyncio.TimerHandle | None = None
        self.idle_since: float | None = None  # set by the pool when the last stream ends
        self._ping_sent_at: float | None = None
        for fut in (self.ready, self.settings_seen):
            fut.add_done_callback(_consume_exception)

    # --- transport callbacks ---------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        _nodelay(transport)
        self.peer_addr = transport.get_extra_info("peername")
        self.sslobj = self.context.wrap_bio(self.incoming, self.outgoing,
                                            server_side=self.server_side, server_hostname=None)
        if not self.server_side:
            self._handshake()

    # BufferedProtocol: the transport reads into a per-thread buffer, which goes straight
    # into the TLS BIO (no bytes object per read).
    def get_buffer(self, sizehint: int) -> memoryview:
        return _scratch.recv

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_scratch.recv[:nbytes])

    def data_received(self, data) -> None:
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
            self._write_tls()  # the alert, if OpenSSL made one
            self._fail(tls.handshake_error(self.sslobj, exc, peer=self.peer_addr), graceful=True)
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
        alpn = self.sslobj.selected_alpn_protocol()
        # A client that offered no ALPN at all still speaks h2 (as Envoy and Istio's
        # ztunnel accept); a server must have chosen h2.
        if alpn != tls.ALPN_H2 and not (self.server_side and alpn is None):
            self._fail(tls.TlsIdentityError(f"peer {self.peer_addr} did not negotiate ALPN h2 "
                                            f"(got {alpn!r})"))
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

    def _fail(self, exc: Exception, *, graceful: bool = False) -> None:
        """The handshake failed.  `graceful`: OpenSSL queued an alert, which a close()
        still delivers (abort() would drop it)."""
        if not self.ready.done():
            self.ready.set_exception(exc)
        else:
            log.warning("%s", exc)
        if self.on_failure:
            self.on_failure(self, exc)
        if self.transport:
            self.transport.close() if graceful else self.transport.abort()

    def _read(self) -> None:
        """Decrypt everything readable into the scratch buffer (one record per
        SSLObject.read) and feed it to the codec, which copies what it keeps."""
        plain = _scratch.plain
        size = len(plain)
        got_any = False
        while not self.dead:
            filled, more = 0, True
            while filled < size:
                try:
                    n = self.sslobj.read(size - filled, plain[filled:])
                except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                    more = False
                    break
                except ssl.SSLError as exc:
                    self._fail(exc)
                    return
                if not n:
                    more = False
                    break
                filled += n
            if filled:
                got_any = True
                for event in self.codec.receive_data(plain[:filled]):
                    self._dispatch(event)
            if not more:
                break
        if got_any:
            self.flush()

    def flush(self) -> None:
        pieces = self.codec.data_to_send_pieces()
        if pieces and self.sslobj is not None and not self.dead:
            for piece in pieces:  # large payloads by reference: encrypted straight from them
                self.sslobj.write(piece)
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
            self._on_reset(e.stream_id, e.error_code)
        elif isinstance(e, ev.WindowOpened):
            for t in list(self.tunnels.values()):
                if e.stream_id is None or t.sid == e.stream_id:
                    t.pump()
        elif isinstance(e, ev.StreamAccepted):
            self._resolve(e.stream_id, None)
        elif isinstance(e, ev.StreamRefused):
            self._resolve(e.stream_id, HboneRefused(e.status))
            self._maybe_idle()
        elif isinstance(e, ev.StreamRequested):
            if self.on_request:
                self.on_request(self, e)
        elif isinstance(e, ev.RequestRejected):
            log.info("rejected HBONE request from %s: %s %s", self.peer_addr, e.status, e.reason)
        elif isinstance(e, ev.PingAcked):
            self._ping_sent_at = None
        elif isinstance(e, ev.PeerSettings):
            if not self.settings_seen.done():
                self.settings_seen.set_result(e.max_concurrent_streams)
        elif isinstance(e, ev.ConnectionDraining):
            log.info("HBONE peer %s is draining (GOAWAY, last stream %d): %d open stream(s) finish "
                     "here, new ones go to another connection", self.peer_addr, e.last_stream_id, self.load)
            self.retire()
        elif isinstance(e, ev.ConnectionTerminated):
            self.flush()
            self._die(f"HTTP/2 connection terminated: {e.reason}")

    def _on_reset(self, sid: int, code: int) -> None:
        t = self.tunnels.get(sid)
        if t is not None:
            t.on_reset(code)
            return
        fut = self.pending_open.get(sid)
        if fut is not None:
            # no answer yet, so nothing was delivered for it
            if code == H2_REFUSED_STREAM:
                self._refused = True
                exc: Exception = StreamRetry(f"peer {self.peer_addr} refused the stream (REFUSED_STREAM): "
                                             "not processed, safe to open elsewhere")
            else:
                exc = ConnectionResetError(f"stream reset by {self.peer_addr} before the answer "
                                           f"(error code {code:#x})")
            self.early.pop(sid, None)
            self.early_end.discard(sid)
            self._resolve(sid, exc)
            self._maybe_idle()
        else:
            # answered (or, server side, requested) but not bound yet: bind() replays it
            self.early_reset[sid] = code

    def _resolve(self, sid: int, exc: Exception | None) -> None:
        fut = self.pending_open.pop(sid, None)
        if fut is not None and not fut.done():
            fut.set_result(None) if exc is None else fut.set_exception(exc)

    def bind(self, sid: int, app: AppSide, on_close=None) -> Tunnel:
        """Attach an app connection to stream `sid`, replaying what arrived for it
        before: data in order, then END_STREAM, then a reset."""
        t = Tunnel(self, sid, app, on_close)
        for data, n in self.early.pop(sid, []):
            t.on_data(data, n)
        if sid in self.early_end:
            self.early_end.discard(sid)
            t.on_end()
        reset = self.early_reset.pop(sid, None)
        if reset is not None:
            t.on_reset(reset)
        elif self.dead:
            t.on_reset(H2_CANCEL)
        else:
            t.start()
        return t

    # --- server side ----------------------------------------------------------------
    def awaiting_answer(self, sid: int) -> bool:
        """Whether `accept(sid, ...)` would answer 200 (the client has not reset it)."""
        return not self.dead and sid not in self.early_reset

    def accept(self, sid: int, app: AppSide, on_close=None) -> Tunnel:
        """Answer 200 to stream `sid` and join it to `app` (the upstream connection).
        If the client reset the stream (or the link died) while we connected, no 200
        goes out: `app` gets the bytes the client sent, then a reset."""
        if not self.dead and sid not in self.early_reset:
            try:
                self.codec.accept(sid)
            except HboneError:
                self.early_reset.setdefault(sid, H2_CANCEL)
            self.flush()
        return self.bind(sid, app, on_close)

    def reject(self, sid: int, status: int) -> None:
        """Answer `status` (400/401/503) to stream `sid` and forget what it sent."""
        self.early.pop(sid, None)
        self.early_end.discard(sid)
        self.early_reset.pop(sid, None)
        if not self.dead:
            self.codec.reject(sid, status)
            self.flush()

    # --- client side ----------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """How many more streams the pool may open here now: bounded by the peer's
        MAX_CONCURRENT_STREAMS (one stream until its SETTINGS arrive) and by
        POOL_MAX_STREAMS_PER_CONN; 0 while draining, dead, or after the peer refused
        a stream, until one of ours ends."""
        if self.dead or not self.handshaken or self.draining or self._refused:
            return 0
        if not self.codec.peer_settings_seen:
            return max(0, 1 - self.load)
        return max(0, min(C.POOL_MAX_STREAMS_PER_CONN - self.load, self.codec.stream_capacity))

    @property
    def refuses_streams(self) -> bool:
        """The live peer's SETTINGS allow no stream at all (MAX_CONCURRENT_STREAMS 0)."""
        return (not self.dead and self.codec.peer_settings_seen
                and self.codec.h2_connection.remote_settings.max_concurrent_streams == 0)

    def start_open(self, authority: str, headers: list[tuple[str, str]]) -> tuple[int, asyncio.Future]:
        """Client side: send CONNECT now (the stream slot is taken before the caller
        awaits anything) and return (stream id, future of the answer).  The future
        raises HboneRefused (non-200), StreamRetry (REFUSED_STREAM: never processed)
        or ConnectionError."""
        try:
            sid = self.codec.open_stream(authority, headers)
        except HboneError as exc:
            if exc.h2_error_code in (H2_REFUSED_STREAM,) or self.codec.terminated:
                raise StreamRetry(str(exc)) from None
            raise
        fut = asyncio.get_event_loop().create_future()
        fut.add_done_callback(_consume_exception)   # a caller that gave up reads no answer
        self.pending_open[sid] = fut
        self.flush()
        return sid, fut

    def cancel_open(self, sid: int) -> None:
        """Give up waiting for the answer to stream `sid` (RST_STREAM CANCEL)."""
        self.codec.reset_stream(sid, H2_CANCEL)
        self.flush()
        self.early.pop(sid, None)
        self.early_end.discard(sid)
        self.early_reset.pop(sid, None)
        self._resolve(sid, ConnectionAbortedError(f"CONNECT on stream {sid} cancelled"))
        self._maybe_idle()

    async def open(self, authority: str, headers: list[tuple[str, str]]) -> int:
        """Client side: CONNECT and wait for the 200."""
        sid, fut = self.start_open(authority, headers)
        await fut
        return sid

    def stream_closed(self) -> None:
        """One of our streams ended: a slot is free again."""
        self._refused = False
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not self.tunnels and not self.pending_open:
            if self.draining and not self.dead:
                self.close()
            elif self.on_idle:
                self.on_idle(self)

    def retire(self) -> None:
        """Take no new streams; close now if idle, else once the last stream ends."""
        self.draining = True
        if not self.dead and self.load == 0:
            self.close()

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
        if not self.settings_seen.done():
            self.settings_seen.set_exception(ConnectionError(why))
        for sid in list(self.pending_open):
            self._resolve(sid, ConnectionError(why))
        for t in list(self.tunnels.values()):
            t.on_reset(H2_CANCEL)
        if self.transport and not self.transport.is_closing():
            self.transport.close()
        if self.on_idle:
            self.on_idle(self)

    def close(self) -> None:
        if not self.dead:
            self.codec.close()
            self.flush()
        self._die("closed by us")


def _consume_exception(fut: asyncio.Future) -> None:
    # nobody may be waiting on ready/settings_seen when they fail: no "never retrieved"
    if not fut.cancelled():
        fut.exception()


class StreamRetry(ConnectionError):
    """The peer did not process the stream (REFUSED_STREAM, or above a graceful
    GOAWAY's last stream id; RFC 9113 §8.7): open it again on another connection."""


class HboneRefused(Exception):
    def __init__(self, status: int):
        super().__init__(f"HBONE CONNECT refused with status {status}")
        self.status = status
