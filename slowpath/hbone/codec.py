"""The HBONE codec: HTTP/2 CONNECT tunnels as a sans-IO state machine over h2.

Owns: the HTTP/2 side of HBONE (DESIGN.md §4) for one connection: ztunnel's settings,
the CONNECT request/response exchange and its validation, per-stream flow control,
half-close (END_STREAM) and abort (RST_STREAM), PING and GOAWAY.  Bytes go in through
`receive_data()`, which returns `events`; bytes to write come out of `data_to_send()`.

Must not: touch sockets, TLS, clocks or threads (the socket driver does I/O and PING
timing), decide policy (the driver calls `accept()`/`reject()` after authorization),
or trust any header for identity (the peer identity is the TLS certificate's).

Decisions worth knowing:

- h2's inbound header validation is off on the server and outbound validation is off
  on the client: h2 up to 4.3 insists on `:path` for every request including plain
  CONNECT, and with validation on a malformed request is a *connection* error (GOAWAY
  for every tunnel on it).  The codec validates CONNECT requests itself and answers a
  bad one with 400 on that stream only (plus RST_STREAM NO_ERROR, RFC 9113 §8.1, so
  the client stops sending), and validates the headers it sends itself.
- Early data: a client may send DATA before the 200 arrives.  The server surfaces it
  as `DataReceived` right after `StreamRequested`; the driver holds it (unacked, so
  flow control bounds it to one stream window) until the upstream connect succeeds.
  The other way round, DATA from the server before its `:status` is a protocol
  violation that h2 itself treats as a connection error: the client reports
  `ConnectionTerminated(error_code=PROTOCOL_ERROR, remote=False)` and sends GOAWAY.
  A server that streams bytes it never said it would is broken, and so are its other
  tunnels' guarantees; the pool dials a fresh connection.
- Once a stream is refused, rejected or reset (either side), anything still arriving
  for it is dropped silently, and the codec itself credits back its DATA, including
  bytes already delivered that the driver had not acked yet (later `ack_data()` calls
  for it are ignored), so aborted streams never leak connection window.  Sending
  END_STREAM/RST_STREAM on, or receiving them for, a closed stream never raises.
- Any protocol error from the peer becomes `ConnectionTerminated(remote=False)` with a
  GOAWAY queued; `receive_data()` never raises.
- GOAWAY from the peer: h2 treats any GOAWAY as the end of the connection, which would
  kill every tunnel on it when a peer merely drains (Envoy on listener updates or
  connection-age limits).  `_HboneH2` keeps h2 open on a NO_ERROR GOAWAY (RFC 9113
  §6.8): streams up to its last stream id carry on, ours above it are reported as
  `StreamReset(REFUSED_STREAM)` (never processed, safe to open elsewhere), the codec
  opens no new stream, and `ConnectionDraining` tells the driver to close the
  connection once its last stream ends.  A GOAWAY with an error code still ends the
  connection (`ConnectionTerminated`).  Our own `close()` is the abrupt kind; the
  driver drains its side by opening nothing more and closing when idle.
- Stream limits: a server's MAX_CONCURRENT_STREAMS (200 here) exceeded by a client is a
  *stream* error (RST_STREAM REFUSED_STREAM, RFC 9113 §5.1.2), not the connection
  error h2 raises, so one client racing our SETTINGS cannot take down its other
  tunnels.  Our client checks the peer's limit before opening (`HboneError`,
  h2_error_code REFUSED_STREAM); `stream_capacity` and `PeerSettings` let the pool
  honour the limit and its changes, and a REFUSED_STREAM reset is retryable.
"""
from __future__ import annotations

import logging
import os

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.settings import SettingCodes
from h2.errors import ErrorCodes

from meshcore import constants as C
from slowpath.hbone import events as ev
from slowpath.hbone import h2fast
from slowpath.hbone.authority import parse_authority
from slowpath.hbone.events import (
    H2_CANCEL,
    H2_CONNECT_ERROR,
    H2_INTERNAL_ERROR,
    H2_NO_ERROR,
    H2_PROTOCOL_ERROR,
    H2_REFUSED_STREAM,
    H2_STREAM_CLOSED,
    HboneError,
)

__all__ = ["HboneError", "HboneConnection", "HboneClient", "HboneServer", "H2_CONNECT_ERROR"]

log = logging.getLogger(__name__)

_DEFAULT_WINDOW = 65535  # RFC 9113 §6.9.2: every connection starts with this window
_PSEUDO_ALLOWED = frozenset({b":method", b":authority"})
# RFC 9113 §8.2.2: connection-specific fields make a request malformed.
_CONNECTION_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)

# Stream phases, as the codec (not h2) sees them.
_OPENING = "opening"      # client: CONNECT sent, no :status yet
_REQUESTED = "requested"  # server: StreamRequested emitted, accept()/reject() pending
_OPEN = "open"            # 200 exchanged: a tunnel
_DEAD = "dead"            # refused, rejected or reset: drop whatever still arrives


class _GracefulGoaway(h2.events.Event):
    """h2-level event of `_HboneH2`: the peer sent GOAWAY with NO_ERROR."""

    def __init__(self, last_stream_id: int, additional_data: bytes | None) -> None:
        self.last_stream_id = last_stream_id
        self.additional_data = additional_data


class _HboneH2(h2fast.H2Connection):
    """h2 with the two protocol decisions HBONE needs that h2 makes differently (see
    the module docstring): a graceful GOAWAY keeps the connection, and a client over
    our stream limit gets a stream error.  Everything else is h2's own behaviour."""

    def _receive_goaway_frame(self, frame):
        if frame.error_code != ErrorCodes.NO_ERROR:
            return super()._receive_goaway_frame(frame)
        # RFC 9113 §6.8: the connection stays usable for streams up to last_stream_id;
        # h2's state machine is left open so their DATA, END_STREAM and RST still flow.
        return [], [_GracefulGoaway(frame.last_stream_id, frame.additional_data or None)]

    def _receive_headers_frame(self, frame):
        if (self.config.client_side or frame.stream_id in self.streams
                or self.open_inbound_streams < self.local_settings.max_concurrent_streams):
            return super()._receive_headers_frame(frame)
        # Over our limit.  Decode the block anyway (the HPACK state is shared by the
        # whole connection), let the stream exist for an instant so h2 knows its id
        # was used, then refuse it on its own.
        headers = h2.connection._decode_headers(self.decoder, frame.data)
        self.state_machine.process_input(h2.connection.ConnectionInputs.RECV_HEADERS)
        stream = self._get_or_create_stream(frame.stream_id, h2.connection.AllowedStreamIDs.ODD)
        stream.receive_headers(headers, "END_STREAM" in frame.flags, self.config.header_encoding)
        self.reset_stream(frame.stream_id, error_code=ErrorCodes.REFUSED_STREAM)
        self.refused_over_limit += 1
        return [], []

    refused_over_limit = 0  # streams refused for exceeding MAX_CONCURRENT_STREAMS


def _h2_code(code: object) -> int:
    try:
        return int(code)  # h2 gives ErrorCodes (an IntEnum) or a bare int
    except (TypeError, ValueError):
        return H2_INTERNAL_ERROR


def _check_outbound_header(name: str, value: str) -> tuple[str, str]:
    if not isinstance(name, str) or not isinstance(value, str):
        raise HboneError(f"header {name!r}: name and value must be str", status=400)
    lname = name.lower()
    if not lname or lname.startswith(":"):
        raise HboneError(
            f"header {name!r}: extra headers cannot be pseudo-headers or empty", status=400,
            hint="the codec sets :method and :authority itself",
        )
    if lname in _CONNECTION_HEADERS or (lname == "te" and value.strip() != "trailers"):
        raise HboneError(f"header {name!r} is connection-specific; not allowed in HTTP/2", status=400)
    if any(ch in name for ch in " \t\r\n\0:") or any(ch in value for ch in "\r\n\0"):
        raise HboneError(f"header {name!r}: illegal character in name or value", status=400)
    return lname, value


class HboneConnection:
    """One HTTP/2 connection carrying HBONE tunnels; see the module docstring.

    Use `HboneClient` or `HboneServer`.  Call `initiate()` once, then feed every byte
    read from TLS to `receive_data()` and write `data_to_send()` after every call.
    """

    def __init__(self, *, client_side: bool):
        self.client_side = client_side
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,  # bytes in and out; we decode ourselves
            validate_outbound_headers=not client_side,
            validate_inbound_headers=client_side,
            normalize_inbound_headers=True,
        )
        self._conn = _HboneH2(config=config)
        settings = {
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.INITIAL_WINDOW_SIZE: C.H2_STREAM_WINDOW,
            SettingCodes.MAX_FRAME_SIZE: C.H2_MAX_FRAME_SIZE,
            SettingCodes.MAX_HEADER_LIST_SIZE: self._conn.DEFAULT_MAX_HEADER_LIST_SIZE,
        }
        if not client_side:
            settings[SettingCodes.MAX_CONCURRENT_STREAMS] = C.H2_SERVER_MAX_CONCURRENT_STREAMS
        # Replacing local_settings before initiate_connection() is how h2 takes initial
        # values: they go into the first SETTINGS frame and apply from the start (the
        # peer cannot exceed the RFC defaults before it has seen them anyway).
        self._conn.local_settings = h2.settings.Settings(client=client_side, initial_values=settings)
        self._conn.max_inbound_frame_size = C.H2_MAX_FRAME_SIZE
        self._streams: dict[int, str] = {}
        # Flow-controlled bytes handed to the driver in DataReceived and not yet acked.
        # When a stream is aborted the codec credits them back itself (the driver drops
        # its buffer then), so aborted streams never leak connection window.
        self._unacked: dict[int, int] = {}
        self._initiated = False
        self._terminated = False
        # The peer's graceful GOAWAY: the last of our streams it will process (None:
        # not draining).  Only ever goes down.
        self._drain_last_id: int | None = None
        self._peer_settings_seen = False

    # --- connection ------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the preamble (client), SETTINGS, and the WINDOW_UPDATE that grows the
        connection window from 64 KiB to 16 MiB.  Call exactly once."""
        if self._initiated:
            raise HboneError("initiate() called twice on one HBONE connection")
        self._initiated = True
        self._conn.initiate_connection()
        self._conn.increment_flow_control_window(C.H2_CONNECTION_WINDOW - _DEFAULT_WINDOW)

    def data_to_send(self) -> bytes:
        """Everything queued for the peer since the last call (may be empty)."""
        return self._conn.data_to_send()

    def data_to_send_pieces(self) -> list:
        """The same bytes as `data_to_send()`, as a list of buffers (bytes, bytearray
        or memoryview over immutable bytes) to write in order: large DATA payloads are
        referenced rather than copied into one string."""
        return self._conn.pieces_to_send()

    @property
    def terminated(self) -> bool:
        """True once GOAWAY was sent or received (or a protocol error ended it)."""
        return self._terminated

    @property
    def draining(self) -> bool:
        """True once the peer sent a graceful GOAWAY: no new streams here."""
        return self._drain_last_id is not None

    @property
    def peer_settings_seen(self) -> bool:
        """True once the peer's first SETTINGS frame arrived (its limits are known)."""
        return self._peer_settings_seen

    @property
    def stream_capacity(self) -> int:
        """How many more streams `open_stream()` may open now under the peer's
        MAX_CONCURRENT_STREAMS (0 once closed or draining).  Before the peer's SETTINGS
        arrive, h2 assumes no limit: see `peer_settings_seen`."""
        if self._terminated or self._drain_last_id is not None:
            return 0
        return max(0, self._conn.remote_settings.max_concurrent_streams - self._conn.open_outbound_streams)

    @property
    def refused_over_limit(self) -> int:
        """Streams the peer opened beyond our MAX_CONCURRENT_STREAMS (each refused)."""
        return self._conn.refused_over_limit

    @property
    def open_streams(self) -> int:
        """Streams h2 counts against MAX_CONCURRENT_STREAMS (open or half-closed)."""
        return self._conn.open_outbound_streams + self._conn.open_inbound_streams

    @property
    def h2_connection(self) -> h2.connection.H2Connection:
        """The wrapped h2 connection, for inspection (settings, windows) in tests and
        diagnostics.  Driving it directly bypasses the codec's stream bookkeeping."""
        return self._conn

    def ping(self) -> bytes:
        """Queue a PING; returns its 8-byte payload (matched by `PingAcked.payload`)."""
        payload = os.urandom(8)
        try:
            self._conn.ping(payload)
        except h2.exceptions.ProtocolError as e:
            raise HboneError("cannot PING: the HBONE connection is closed",
                             h2_error_code=_h2_code(e.error_code)) from None
        return payload

    def close(self, error_code: int = H2_NO_ERROR) -> None:
        """Queue GOAWAY.  The connection is finished afterwards (h2 sends nothing more
        and rejects further frames), so flush `data_to_send()` and close the socket."""
        if self._terminated:
            return
        self._terminated = True
        try:
            self._conn.close_connection(error_code=error_code)
        except h2.exceptions.ProtocolError:
            pass  # already closed underneath us: nothing to send

    # --- receiving -------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[ev.Event]:
        """Feed bytes read from the peer; returns what happened.  Never raises for
        anything the peer sends: protocol errors become `ConnectionTerminated`."""
        if self._terminated:
            return []  # h2 would only raise on frames after GOAWAY; nothing to learn
        try:
            h2_events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            # Events of earlier frames in this same chunk are lost with the exception;
            # the connection is dead either way.
            code = _h2_code(e.error_code)
            self._goaway_if_h2_did_not(code)
            return self._terminate(code, f"HTTP/2 protocol error from peer: {e}")
        except Exception as e:  # a bug in h2 or here must not kill the driver's loop
            log.exception("HBONE codec failed on received data")
            self._goaway_if_h2_did_not(H2_INTERNAL_ERROR)
            return self._terminate(H2_INTERNAL_ERROR, f"internal error in HBONE codec: {e!r}")
        out: list[ev.Event] = []
        woken: set[int | None] = set()
        for event in h2_events:
            for mine in self._translate(event):
                if isinstance(mine, ev.WindowOpened):
                    # One WindowOpened per stream per batch is enough to wake a writer.
                    if mine.stream_id in woken:
                        continue
                    woken.add(mine.stream_id)
                out.append(mine)
        self._prune()
        return out

    def _goaway_if_h2_did_not(self, code: int) -> None:
        # h2 queues GOAWAY for errors in frames, but not for a bad client preface
        # (rejected before its try block) nor for non-protocol exceptions.
        if self._conn.state_machine.state == h2.connection.ConnectionState.CLOSED:
            return
        try:
            self._conn.close_connection(error_code=code)
        except Exception:
            pass

    def _terminate(self, code: int, reason: str) -> list[ev.Event]:
        self._terminated = True
        self._streams.clear()
        self._unacked.clear()
        return [ev.ConnectionTerminated(error_code=code, last_stream_id=None, reason=reason, remote=False)]

    def _translate(self, event: h2.events.Event) -> list[ev.Event]:
        if isinstance(event, h2.events.DataReceived):
            return self._on_data(event)
        if isinstance(event, h2.events.StreamEnded):
            if self._streams.get(event.stream_id) in (_OPEN, _REQUESTED, _OPENING):
                return [ev.StreamEnded(stream_id=event.stream_id)]
            return []
        if isinstance(event, h2.events.StreamReset):
            phase = self._streams.get(event.stream_id)
            if phase is None or phase == _DEAD:
                return []
            self._kill(event.stream_id)
            return [ev.StreamReset(stream_id=event.stream_id, error_code=_h2_code(event.error_code))]
        if isinstance(event, h2.events.WindowUpdated):
            if not event.stream_id:
                return [ev.WindowOpened(stream_id=None)]
            if self._streams.get(event.stream_id) in (_OPEN, _REQUESTED, _OPENING):
                return [ev.WindowOpened(stream_id=event.stream_id)]
            return []
        if isinstance(event, h2.events.RemoteSettingsChanged):
            changed = event.changed_settings
            grew = SettingCodes.INITIAL_WINDOW_SIZE in changed and (
                (changed[SettingCodes.INITIAL_WINDOW_SIZE].new_value or 0)
                > (changed[SettingCodes.INITIAL_WINDOW_SIZE].original_value or 0))
            out: list[ev.Event] = []
            if grew or SettingCodes.MAX_FRAME_SIZE in changed:
                out.append(ev.WindowOpened(stream_id=None))
            if not self._peer_settings_seen or SettingCodes.MAX_CONCURRENT_STREAMS in changed:
                self._peer_settings_seen = True
                out.append(ev.PeerSettings(
                    max_concurrent_streams=self._conn.remote_settings.max_concurrent_streams))
            return out
        if isinstance(event, _GracefulGoaway):
            return self._on_graceful_goaway(event)
        if isinstance(event, h2.events.PingAckReceived):
            return [ev.PingAcked(payload=bytes(event.ping_data))]
        if isinstance(event, h2.events.ConnectionTerminated):
            self._terminated = True
            self._streams.clear()
            self._unacked.clear()
            data = event.additional_data
            reason = (data.decode("utf-8", "replace") if data else
                      f"peer sent GOAWAY ({_h2_code(event.error_code):#x})")
            return [ev.ConnectionTerminated(error_code=_h2_code(event.error_code),
                                            last_stream_id=event.last_stream_id, reason=reason)]
        if isinstance(event, h2.events.RequestReceived):
            return self._on_request(event)
        if isinstance(event, h2.events.ResponseReceived):
            return self._on_response(event)
        # SettingsAcknowledged, PingReceived (h2 answers it), PriorityUpdated,
        # InformationalResponseReceived (1xx), TrailersReceived (StreamEnded follows),
        # UnknownFrameReceived, AlternativeServiceAvailable: nothing for the driver.
        return []

    def _on_graceful_goaway(self, event: _GracefulGoaway) -> list[ev.Event]:
        last = event.last_stream_id
        if self._drain_last_id is not None:
            last = min(last, self._drain_last_id)
        self._drain_last_id = last
        out: list[ev.Event] = []
        # Our streams above `last` were never processed: refused, retryable.  (Only
        # streams we initiated are covered by the peer's last stream id.)
        mine = 1 if self.client_side else 0
        for sid, phase in sorted(self._streams.items()):
            if sid > last and sid % 2 == mine and phase in (_OPENING, _OPEN):
                self._reset(sid, H2_REFUSED_STREAM)
                self._kill(sid)
                out.append(ev.StreamReset(stream_id=sid, error_code=H2_REFUSED_STREAM))
        data = event.additional_data
        reason = (data.decode("utf-8", "replace") if data else "peer sent GOAWAY (NO_ERROR): draining")
        out.append(ev.ConnectionDraining(last_stream_id=last, reason=reason))
        return out

    def _on_data(self, event: h2.events.DataReceived) -> list[ev.Event]:
        sid, n = event.stream_id, event.flow_controlled_length
        phase = self._streams.get(sid)
        if not event.data and phase != _OPENING:
            # Empty DATA carrying END_STREAM (a FIN), or padding only: nothing for the
            # driver to consume, so give back any padding's window here.
            self._ack(sid, n)
            return []
        if phase in (_OPEN, _REQUESTED):
            self._unacked[sid] = self._unacked.get(sid, 0) + n
            return [ev.DataReceived(stream_id=sid, data=bytes(event.data), flow_controlled_length=n)]
        self._ack(sid, n)  # nobody will consume it: give the window back now
        if phase == _OPENING:
            # DATA before the :status.  h2 (4.x) already rejects this as a connection
            # error before we get here; should a version let it through, abort at
            # least this stream rather than forward unauthorized bytes.
            self._reset(sid, H2_PROTOCOL_ERROR)
            self._kill(sid)
            return [ev.StreamReset(stream_id=sid, error_code=H2_PROTOCOL_ERROR)]
        return []

    def _on_request(self, event: h2.events.RequestReceived) -> list[ev.Event]:
        return []  # only servers accept requests; see HboneServer

    def _on_response(self, event: h2.events.ResponseReceived) -> list[ev.Event]:
        return []  # only clients get responses; see HboneClient

    def _prune(self) -> None:
        # Forget streams h2 has closed, so the table stays as small as the live set.
        streams = self._conn.streams
        for sid in [s for s in self._streams if s not in streams or streams[s].closed]:
            del self._streams[sid]

    # --- sending ---------------------------------------------------------------------

    def _sendable(self, stream_id: int, what: str) -> None:
        if self._terminated:
            raise HboneError(f"cannot {what} on stream {stream_id}: the HBONE connection is closed",
                             h2_error_code=H2_STREAM_CLOSED)
        phase = self._streams.get(stream_id)
        if phase == _REQUESTED:
            raise HboneError(f"cannot {what} on stream {stream_id} before accept()")
        if phase not in (_OPEN, _OPENING):
            raise HboneError(f"cannot {what} on stream {stream_id}: it is closed or unknown",
                             h2_error_code=H2_STREAM_CLOSED)

    def send_window(self, stream_id: int) -> int:
        """Bytes `send_data()` would accept on this stream now (0 if closed)."""
        if self._terminated:
            return 0
        try:
            return max(0, self._conn.local_flow_control_window(stream_id))
        except h2.exceptions.ProtocolError:
            return 0

    def send_data(self, stream_id: int, data: bytes) -> int:
        """Queue as much of `data` as flow control allows, in frames of at most the
        peer's MAX_FRAME_SIZE.  Returns how many bytes were taken; keep the rest and
        retry after `WindowOpened`.  Raises `HboneError` if the stream cannot send."""
        self._sendable(stream_id, "send data")
        # Frames keep a reference to their payload until `data_to_send()`: slices of
        # immutable bytes can be referenced as they are, anything mutable is copied.
        immutable = type(data) is bytes or (type(data) is memoryview and type(data.obj) is bytes)
        view = memoryview(data)
        total = len(view)
        sent = 0
        try:
            window = self._conn.local_flow_control_window(stream_id)
            frame = self._conn.max_outbound_frame_size
            while sent < total and window > 0:
                n = min(total - sent, window, frame)
                if immutable:
                    chunk = data if n == total else view[sent:sent + n]
                else:
                    chunk = view[sent:sent + n].tobytes()
                self._conn.send_data(stream_id, chunk)
                sent += n
                window -= n
        except h2.exceptions.ProtocolError as e:  # includes StreamClosedError
            if sent:
                return sent
            raise HboneError(f"cannot send data on stream {stream_id}: {e}",
                             h2_error_code=_h2_code(e.error_code)) from None
        return sent

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction (empty DATA with END_STREAM): the clean FIN.
        A no-op if the stream or the connection is already closed."""
        if self._terminated or self._streams.get(stream_id) == _DEAD:
            return
        if self._streams.get(stream_id) == _REQUESTED:
            raise HboneError(f"cannot end stream {stream_id} before accept() or reject()")
        try:
            self._conn.end_stream(stream_id)
        except h2.exceptions.ProtocolError:
            pass  # already closed (h2: StreamClosedError) or already half-closed by us
        self._prune()

    def reset_stream(self, stream_id: int, error_code: int = H2_CANCEL) -> None:
        """Abort the stream with RST_STREAM (the abortive close).  A no-op if the stream
        or the connection is already closed.  Late DATA for it is acknowledged by h2."""
        if self._terminated:
            return
        self._reset(stream_id, error_code)
        self._kill(stream_id)
        self._prune()

    def _kill(self, stream_id: int) -> None:
        """Mark the stream aborted and credit back what the driver will now never ack.
        Call after any RST_STREAM went out, so h2 only updates the connection window."""
        if stream_id in self._streams:
            self._streams[stream_id] = _DEAD
        credit = self._unacked.pop(stream_id, 0)
        if credit:
            self._ack(stream_id, credit)

    def _reset(self, stream_id: int, error_code: int) -> None:
        try:
            self._conn.reset_stream(stream_id, error_code=error_code)
        except h2.exceptions.ProtocolError:
            pass  # already closed: RFC 9113 §5.4.2 forbids answering RST with RST anyway

    def ack_data(self, stream_id: int, n: int) -> None:
        """The driver consumed `n` flow-controlled bytes of this stream (they were
        written onward): let the peer send more.  h2 batches the WINDOW_UPDATEs.

        Capped at what was delivered and not yet acked; a no-op once the stream was
        reset or rejected (the codec credited its bytes back then)."""
        if self._terminated:
            return
        outstanding = self._unacked.get(stream_id, 0)
        n = min(n, outstanding)
        if n <= 0:
            return
        if n == outstanding:
            del self._unacked[stream_id]
        else:
            self._unacked[stream_id] = outstanding - n
        self._ack(stream_id, n)

    def _ack(self, stream_id: int, n: int) -> None:
        try:
            self._conn.acknowledge_received_data(n, stream_id)
        except h2.exceptions.ProtocolError:
            pass  # connection closing: the window no longer matters


class HboneClient(HboneConnection):
    """The dialling side: opens one CONNECT stream per proxied TCP connection."""

    def __init__(self) -> None:
        super().__init__(client_side=True)

    def open_stream(self, authority: str, extra_headers: list[tuple[str, str]] | tuple = ()) -> int:
        """Send CONNECT `authority` (`ip:port` / `[v6]:port`) with only `:method` and
        `:authority` pseudo-headers plus `extra_headers` (baggage, forwarded,
        traceparent, ...).  Returns the stream id; the answer arrives as
        `StreamAccepted` or `StreamRefused`.  The stream stays open for data.

        Raises `HboneError`: status 400 for a bad authority or header, h2_error_code
        REFUSED_STREAM when the server's MAX_CONCURRENT_STREAMS is reached (open a new
        connection), STREAM_CLOSED when the connection is closed.
        """
        parse_authority(authority)
        headers = [(":method", "CONNECT"), (":authority", authority)]
        headers += [_check_outbound_header(k, v) for k, v in extra_headers]
        if self._terminated:
            raise HboneError(f"cannot open a stream to {authority}: the HBONE connection is closed",
                             h2_error_code=H2_STREAM_CLOSED, hint="open a new connection")
        if self._drain_last_id is not None:
            raise HboneError(f"cannot open a stream to {authority}: the peer is draining this "
                             "connection (GOAWAY)", h2_error_code=H2_REFUSED_STREAM,
                             hint="open another HBONE connection")
        limit = self._conn.remote_settings.max_concurrent_streams
        if self._conn.open_outbound_streams >= limit:
            raise HboneError(
                f"cannot open a stream to {authority}: the peer allows {limit} concurrent streams",
                h2_error_code=H2_REFUSED_STREAM, hint="open another HBONE connection")
        try:
            stream_id = self._conn.get_next_available_stream_id()
            self._conn.send_headers(
                stream_id, [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers])
        except UnicodeEncodeError:
            raise HboneError("extra header names and values must be latin-1 text", status=400) from None
        except h2.exceptions.ProtocolError as e:
            raise HboneError(f"cannot open a stream to {authority}: {e}",
                             h2_error_code=_h2_code(e.error_code)) from None
        self._streams[stream_id] = _OPENING
        return stream_id

    def _on_response(self, event: h2.events.ResponseReceived) -> list[ev.Event]:
        sid = event.stream_id
        if self._streams.get(sid) != _OPENING:
            return []  # we reset it meanwhile (or a duplicate answer h2 let through)
        status_raw = dict(event.headers or []).get(b":status", b"")
        try:
            status = int(status_raw)
        except ValueError:
            status = 0
        if status == 200:
            self._streams[sid] = _OPEN
            return [ev.StreamAccepted(stream_id=sid)]
        # DESIGN.md §4: any non-200 is a failure; close our half too.
        self._reset(sid, H2_CANCEL)
        self._kill(sid)
        return [ev.StreamRefused(stream_id=sid, status=status)]


class HboneServer(HboneConnection):
    """The listening side: validates CONNECT requests; the driver authorizes and
    answers them with `accept()` or `reject()`."""

    def __init__(self) -> None:
        super().__init__(client_side=False)

    def accept(self, stream_id: int) -> None:
        """Answer `:status 200`: the upstream connection is up, the tunnel is open.
        Raises `HboneError` if the stream was reset meanwhile (check the events)."""
        if self._terminated or self._streams.get(stream_id) != _REQUESTED:
            raise HboneError(
                f"cannot accept stream {stream_id}: it is not awaiting an answer "
                "(already answered, reset by the peer, or the connection is closed)",
                h2_error_code=H2_STREAM_CLOSED)
        try:
            self._conn.send_headers(stream_id, [(b":status", b"200")])
        except h2.exceptions.ProtocolError as e:
            self._kill(stream_id)
            raise HboneError(f"cannot accept stream {stream_id}: {e}",
                             h2_error_code=_h2_code(e.error_code)) from None
        self._streams[stream_id] = _OPEN

    def reject(self, stream_id: int, status: int) -> None:
        """Answer `status` (4xx/5xx: 401 denied, 503 no workload or connect failed)
        with END_STREAM.  A no-op if the stream is already gone."""
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise HboneError(f"reject() needs a 4xx or 5xx HTTP status, got {status!r}")
        if self._terminated or self._streams.get(stream_id) != _REQUESTED:
            return
        self._answer_and_close(stream_id, status)
        self._prune()

    def _answer_and_close(self, stream_id: int, status: int) -> None:
        try:
            self._conn.send_headers(stream_id, [(b":status", str(status).encode())], end_stream=True)
        except h2.exceptions.ProtocolError:
            pass  # closed underneath us: nothing to answer
        else:
            stream = self._conn.streams.get(stream_id)
            if stream is not None and not stream.closed:
                # The client may still be sending: ask it to stop without error
                # (RFC 9113 §8.1) so its bytes do not pile up against our window.
                self._reset(stream_id, H2_NO_ERROR)
        self._streams[stream_id] = _DEAD  # also for _on_request, which never listed it
        self._kill(stream_id)

    def _on_request(self, event: h2.events.RequestReceived) -> list[ev.Event]:
        sid = event.stream_id
        try:
            authority, host, port, headers = self._validate_request(event.headers or [])
        except HboneError as e:
            self._answer_and_close(sid, 400)
            return [ev.RequestRejected(stream_id=sid, status=400, reason=e.message)]
        self._streams[sid] = _REQUESTED
        return [ev.StreamRequested(stream_id=sid, authority=authority, host=host, port=port, headers=headers)]

    @staticmethod
    def _validate_request(raw: list[tuple[bytes, bytes]]) -> tuple[str, str, int, dict[str, str]]:
        pseudo: dict[bytes, bytes] = {}
        headers: dict[str, str] = {}
        seen_regular = False
        for name, value in raw:
            name, value = bytes(name), bytes(value)
            if name.startswith(b":"):
                if seen_regular:
                    raise HboneError(f"pseudo-header {name!r} after regular headers")
                if name in pseudo:
                    raise HboneError(f"duplicate pseudo-header {name.decode('latin-1')}")
                pseudo[name] = value
                continue
            seen_regular = True
            try:
                key = name.decode("ascii").lower()
            except UnicodeDecodeError:
                raise HboneError(f"header name {name!r} is not ASCII") from None
            text = value.decode("latin-1")  # lossless; HTTP field values are octets
            if key in _CONNECTION_HEADERS or (key == "te" and text.strip() != "trailers"):
                raise HboneError(f"connection-specific header {key!r} is not allowed in HTTP/2")
            sep = "; " if key == "cookie" else ", "
            headers[key] = headers[key] + sep + text if key in headers else text
        method = pseudo.get(b":method")
        if method != b"CONNECT":
            shown = method.decode("latin-1") if method is not None else "(none)"
            raise HboneError(f"method {shown} is not allowed: HBONE only accepts CONNECT")
        extra = sorted(k.decode("latin-1") for k in pseudo if k not in _PSEUDO_ALLOWED)
        if extra:
            raise HboneError(f"pseudo-headers {', '.join(extra)} not allowed: HBONE uses plain CONNECT "
                             "with only :method and :authority")
        if b":authority" not in pseudo:
            raise HboneError("CONNECT without :authority")
        authority = pseudo[b":authority"].decode("latin-1")
        ip, port = parse_authority(authority)
        return authority, str(ip), port, headers
