"""What the HBONE codec tells its driver, and the error it raises.

Owns: the event vocabulary of `slowpath.hbone.codec` (small frozen keyword-only
dataclasses, one per thing that happened on the wire) and `HboneError`, the one
exception the codec raises at its caller.  Error codes are HTTP/2 wire codes
(RFC 9113 §7: 0x0 NO_ERROR, 0x1 PROTOCOL_ERROR, 0x5 STREAM_CLOSED, 0x7 REFUSED_STREAM,
0x8 CANCEL, ...), statuses are HTTP statuses, so a log line can quote them verbatim.

Must not: import h2, do I/O, or hold state.  Events are values: the driver may keep,
compare or log them freely.

`HboneError` lives here rather than in `codec` so that `authority` (which the codec
imports) can raise it without an import cycle; `codec.HboneError` is the same class.

    MeshError (meshcore.errors)
     └── HboneError      .status (HTTP status or None), .h2_error_code (int or None)
"""
from __future__ import annotations

from dataclasses import dataclass

from meshcore.errors import MeshError

# HTTP/2 error codes the codec itself uses (RFC 9113 §7).
H2_NO_ERROR = 0x0
H2_PROTOCOL_ERROR = 0x1
H2_INTERNAL_ERROR = 0x2
H2_STREAM_CLOSED = 0x5
H2_REFUSED_STREAM = 0x7
H2_CANCEL = 0x8
H2_CONNECT_ERROR = 0xA       # RFC 9113 §8.5: the tunnel's TCP connection was reset or failed


class HboneError(MeshError):
    """An HBONE request or stream operation failed.

    `status` is the HTTP status a server answers (or would answer) for this problem,
    e.g. 400 for a malformed `:authority`; `h2_error_code` is the HTTP/2 error code
    when the failure is at the HTTP/2 layer (stream closed, too many streams, ...).
    Either may be None.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        h2_error_code: int | None = None,
        hint: str | None = None,
    ):
        super().__init__(message, hint=hint)
        self.status = status
        self.h2_error_code = h2_error_code


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    """Base of everything `HboneConnection.receive_data()` returns."""


# --- server side ---------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class StreamRequested(Event):
    """A valid CONNECT arrived; answer it with `accept()` or `reject()`.

    `authority` is the raw `:authority`, `host`/`port` its parsed form (`host` is the
    IP address as text, v6 without brackets).  `headers` holds the regular (non-pseudo)
    headers with lower-case names; repeated names are joined with ", ".  The peer's
    identity is *not* here: it comes from the TLS certificate only.
    """
    stream_id: int
    authority: str
    host: str
    port: int
    headers: dict[str, str]


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestRejected(Event):
    """The codec answered a malformed request itself (status 400); for logging only."""
    stream_id: int
    status: int
    reason: str


# --- client side ---------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class StreamAccepted(Event):
    """The server answered our CONNECT with 200: the tunnel is up."""
    stream_id: int


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamRefused(Event):
    """The server answered our CONNECT with a non-200 status.

    The codec has already reset the stream (CANCEL); nothing more will be reported for
    it.  `status` is 0 when the peer sent a `:status` that is not a number.
    """
    stream_id: int
    status: int


# --- both sides ----------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class DataReceived(Event):
    """Tunnel payload.  Call `ack_data(stream_id, flow_controlled_length)` once it has
    been written onward; until then it keeps counting against the peer's window."""
    stream_id: int
    data: bytes
    flow_controlled_length: int


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamEnded(Event):
    """The peer sent END_STREAM: a clean FIN (half-close) of its direction."""
    stream_id: int


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamReset(Event):
    """The stream was aborted: the peer sent RST_STREAM with `error_code` (Envoy does
    this on an abortive close).  Nothing more will be reported for the stream.

    `error_code == H2_REFUSED_STREAM` on a stream we opened means the peer never
    processed it (RFC 9113 §8.7): the peer refused it (its stream limit), or a graceful
    GOAWAY's last stream id was below it.  Opening it again elsewhere is safe.
    """
    stream_id: int
    error_code: int


@dataclass(frozen=True, kw_only=True, slots=True)
class WindowOpened(Event):
    """The send window grew: retry pending `send_data()` calls.

    `stream_id=None` means the connection window (or the peer's initial stream window)
    grew, which can unblock every stream.
    """
    stream_id: int | None


@dataclass(frozen=True, kw_only=True, slots=True)
class ConnectionTerminated(Event):
    """The connection is finished; every stream on it is dead.

    `remote=True`: the peer sent GOAWAY (`last_stream_id` is the highest stream it
    processed; client streams above it were never seen and may be retried elsewhere).
    `remote=False`: the peer broke the protocol; the codec queued a GOAWAY with
    `error_code` (flush `data_to_send()`, then close the socket), `last_stream_id` is
    None.
    """
    error_code: int
    last_stream_id: int | None
    reason: str
    remote: bool = True


@dataclass(frozen=True, kw_only=True, slots=True)
class ConnectionDraining(Event):
    """The peer sent a graceful GOAWAY (NO_ERROR): it is draining (Envoy on listener
    updates or connection-age limits, a ztunnel shutting down).  Streams up to
    `last_stream_id` carry on until they end; ours above it were never seen and have
    already been reported as `StreamReset(error_code=H2_REFUSED_STREAM)`.  No new
    stream can be opened here: open it on another connection, and close this one once
    its last stream is done.  May come more than once, the id only ever going down.
    """
    last_stream_id: int
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerSettings(Event):
    """The peer's SETTINGS arrived (the first one, or a change): its stream limit may
    have moved.  `max_concurrent_streams` is the peer's current limit."""
    max_concurrent_streams: int


@dataclass(frozen=True, kw_only=True, slots=True)
class PingAcked(Event):
    """The peer acknowledged the PING whose 8-byte payload `ping()` returned."""
    payload: bytes
