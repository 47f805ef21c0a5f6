"""HBONE codec: an HboneClient and an HboneServer pumped against each other in memory,
plus raw h2 peers for requests our own client would never send."""
from __future__ import annotations

import ipaddress
import random

import h2.config
import h2.connection
import h2.events
import pytest
from h2.settings import SettingCodes
from hyperframe.frame import Frame, GoAwayFrame, RstStreamFrame, SettingsFrame, WindowUpdateFrame

from meshcore import constants as C
from meshcore.errors import MeshError
from slowpath.hbone import (
    ConnectionDraining,
    ConnectionTerminated,
    DataReceived,
    Event,
    HboneClient,
    HboneError,
    HboneServer,
    PeerSettings,
    PingAcked,
    RequestRejected,
    StreamAccepted,
    StreamEnded,
    StreamRefused,
    StreamRequested,
    StreamReset,
    WindowOpened,
    format_authority,
    parse_authority,
)
from slowpath.hbone import codec
from slowpath.hbone.memory import CodecPipe

MiB = 1024 * 1024


def of(events, kind):
    return [e for e in events if isinstance(e, kind)]


@pytest.fixture
def pipe() -> CodecPipe:
    p = CodecPipe()
    c, s = p.pump()
    assert not of(c + s, ConnectionTerminated)
    return p


def open_accepted(pipe: CodecPipe, authority: str = "10.0.0.5:8080") -> int:
    sid = pipe.client.open_stream(authority)
    _, s = pipe.pump()
    assert of(s, StreamRequested)[0].stream_id == sid
    pipe.server.accept(sid)
    c, _ = pipe.pump()
    assert StreamAccepted(stream_id=sid) in c
    return sid


def parse_frames(data: bytes) -> list[Frame]:
    frames = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        frames.append(frame)
        data = data[9 + length:]
    return frames


# --- connection setup -----------------------------------------------------------------

def test_preamble_settings_and_connection_window_update_are_queued():
    client = HboneClient()
    client.initiate()
    out = client.data_to_send()
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    assert out.startswith(preface)
    frames = parse_frames(out[len(preface):])
    assert isinstance(frames[0], SettingsFrame)
    assert frames[0].settings[SettingCodes.INITIAL_WINDOW_SIZE] == C.H2_STREAM_WINDOW
    assert frames[0].settings[SettingCodes.ENABLE_PUSH] == 0
    updates = [f for f in frames if isinstance(f, WindowUpdateFrame)]
    assert [(f.stream_id, f.window_increment) for f in updates] == [(0, C.H2_CONNECTION_WINDOW - 65535)]
    with pytest.raises(HboneError):
        client.initiate()


def test_settings_are_advertised_to_the_peer(pipe):
    seen_by_server = pipe.server.h2_connection.remote_settings  # what the client sent
    seen_by_client = pipe.client.h2_connection.remote_settings  # what the server sent
    for seen in (seen_by_server, seen_by_client):
        assert seen.initial_window_size == 4 * MiB == C.H2_STREAM_WINDOW
        assert seen.max_frame_size == 1 * MiB == C.H2_MAX_FRAME_SIZE
        assert seen.enable_push == 0
    assert seen_by_client.max_concurrent_streams == 200 == C.H2_SERVER_MAX_CONCURRENT_STREAMS
    # connection-level windows grew to 16 MiB on both sides
    assert pipe.client.h2_connection.outbound_flow_control_window == 16 * MiB
    assert pipe.server.h2_connection.outbound_flow_control_window == 16 * MiB


# --- CONNECT --------------------------------------------------------------------------

def test_connect_with_headers_is_requested_then_accepted(pipe):
    sid = pipe.client.open_stream("10.0.0.5:8080", [
        ("baggage", "k8s.namespace.name=demo,k8s.pod.name=client-1"),
        ("forwarded", 'for="10.0.0.9:41000"'),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ("X-Unknown-Thing", "tolerated"),
    ])
    assert sid == 1
    c, s = pipe.pump()
    assert c == []
    [req] = s
    assert req == StreamRequested(
        stream_id=sid, authority="10.0.0.5:8080", host="10.0.0.5", port=8080,
        headers={
            "baggage": "k8s.namespace.name=demo,k8s.pod.name=client-1",
            "forwarded": 'for="10.0.0.9:41000"',
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "x-unknown-thing": "tolerated",
        })
    assert pipe.client.open_streams == 1 and pipe.server.open_streams == 1
    pipe.server.accept(sid)
    c, s = pipe.pump()
    assert c == [StreamAccepted(stream_id=sid)] and s == []
    with pytest.raises(HboneError):
        pipe.server.accept(sid)  # answered already


def test_connect_v6_authority(pipe):
    sid = pipe.client.open_stream("[fd00::5]:8080")
    _, s = pipe.pump()
    [req] = of(s, StreamRequested)
    assert (req.stream_id, req.host, req.port, req.authority) == (sid, "fd00::5", 8080, "[fd00::5]:8080")


def test_request_carries_only_method_and_authority_pseudo_headers():
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8",
                                                               validate_inbound_headers=False))
    client = HboneClient()
    client.initiate()
    raw.initiate_connection()
    raw.receive_data(client.data_to_send())
    client.open_stream("10.1.2.3:80", [("baggage", "a=b")])
    [req] = [e for e in raw.receive_data(client.data_to_send()) if isinstance(e, h2.events.RequestReceived)]
    assert req.headers == [(":method", "CONNECT"), (":authority", "10.1.2.3:80"), ("baggage", "a=b")]
    assert req.stream_ended is None  # open_stream must not end the stream


def test_open_stream_validates_locally(pipe):
    for bad in ("example.com:80", "10.0.0.1", "fd00::1:80", "10.0.0.1:0"):
        with pytest.raises(HboneError) as e:
            pipe.client.open_stream(bad)
        assert e.value.status == 400
    for header in ((":path", "/"), ("connection", "close"), ("x-bad", "a\r\nb"), ("", "v")):
        with pytest.raises(HboneError):
            pipe.client.open_stream("10.0.0.1:80", [header])
    assert pipe.client.open_streams == 0
    assert pipe.client.data_to_send() == b""  # nothing half-sent


def test_reject_401_is_refused_and_closed(pipe):
    sid = pipe.client.open_stream("10.0.0.5:8080")
    pipe.pump()
    pipe.server.reject(sid, 401)
    c, s = pipe.pump()
    assert c == [StreamRefused(stream_id=sid, status=401)]
    assert s == []  # the client's CANCEL of a rejected stream is not news to the driver
    assert pipe.client.open_streams == 0 and pipe.server.open_streams == 0
    pipe.server.reject(sid, 503)  # already answered: no-op, no raise
    with pytest.raises(HboneError):
        pipe.client.send_data(sid, b"x")
    with pytest.raises(HboneError):
        pipe.server.reject(sid, 200)  # 200 is accept(), not a rejection


def test_early_client_data_is_surfaced_and_dropped_after_reject(pipe):
    sid = pipe.client.open_stream("10.0.0.5:8080")
    assert pipe.client.send_data(sid, b"early bytes") == 11  # before the 200: allowed
    _, s = pipe.pump()
    assert [type(e) for e in s] == [StreamRequested, DataReceived]
    assert s[1].data == b"early bytes"
    with pytest.raises(HboneError):
        pipe.server.send_data(sid, b"no")  # server may not talk before accept()
    pipe.server.reject(sid, 503)
    # bytes the client had in flight when the 503 left arrive after it
    pipe.client.send_data(sid, b"z" * 50_000)
    s_in = pipe.client.data_to_send()
    c_in = pipe.server.data_to_send()
    assert pipe.server.receive_data(s_in) == []
    assert pipe.client.receive_data(c_in) == [StreamRefused(stream_id=sid, status=503)]
    pipe.pump()
    # the dropped bytes did not leak connection window: a new stream still gets it all
    sid2 = open_accepted(pipe)
    assert pipe.client.send_window(sid2) == 4 * MiB


def test_aborted_streams_do_not_leak_connection_window(pipe):
    """Bytes the driver was holding when a stream died are credited back by the codec:
    without that, three rejected streams with 4 MiB of early data each would leave the
    16 MiB connection window at 4 MiB for good."""
    conn_window = pipe.client.h2_connection  # the client's view of the server's window
    for i in range(3):
        sid = pipe.client.open_stream(f"10.0.0.5:{9000 + i}")
        assert pipe.client.send_data(sid, b"e" * (4 * MiB)) == 4 * MiB
        _, s = pipe.pump()
        assert sum(e.flow_controlled_length for e in of(s, DataReceived)) == 4 * MiB
        # the driver buffered those bytes (no ack) and then decides
        if i == 0:
            pipe.server.reject(sid, 401)
        elif i == 1:
            pipe.server.accept(sid)
            pipe.pump()
            pipe.server.reset_stream(sid)
        else:
            pipe.server.accept(sid)
            pipe.pump()
            pipe.client.reset_stream(sid)  # the peer aborts
        pipe.pump()
        pipe.server.ack_data(sid, 4 * MiB)  # late ack of a dead stream: ignored, no double credit
        pipe.pump()
    assert conn_window.outbound_flow_control_window >= 12 * MiB  # h2 credits in 8 MiB batches
    assert pipe.server.h2_connection.remote_flow_control_window(open_accepted(pipe)) == 4 * MiB


# --- malformed requests from a raw h2 client -------------------------------------------

def raw_client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding="utf-8",
        validate_outbound_headers=False, normalize_outbound_headers=False))
    conn.initiate_connection()
    return conn


def raw_exchange(raw, server, events):
    for _ in range(20):
        out = raw.data_to_send()
        if out:
            events += server.receive_data(out)
        back = server.data_to_send()
        if not out and not back:
            return
        if back:
            yield from raw.receive_data(back)


@pytest.mark.parametrize(("headers", "why"), [
    ([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "10.0.0.5:80")], "method GET"),
    ([(":method", "CONNECT"), (":authority", "10.0.0.5:80"), (":path", "/")], ":path"),
    ([(":method", "CONNECT"), (":authority", "10.0.0.5:80"), (":scheme", "https")], ":scheme"),
    ([(":method", "CONNECT"), (":authority", "10.0.0.5:80"), (":protocol", "websocket"),
      (":scheme", "https"), (":path", "/")], ":protocol"),
    ([(":method", "CONNECT"), (":authority", "svc.demo.svc.cluster.local:80")], "hostnames are not allowed"),
    ([(":method", "CONNECT"), (":authority", "10.0.0.5")], "missing port"),
    ([(":method", "CONNECT"), (":authority", "fd00::5:80")], "brackets"),
    ([(":method", "CONNECT"), (":authority", "10.0.0.5:65536")], "out of range"),
    ([(":method", "CONNECT")], "without :authority"),
    ([(":method", "CONNECT"), (":authority", "10.0.0.5:80"), ("connection", "close")], "connection-specific"),
])
def test_bad_request_is_answered_400_and_connection_survives(headers, why):
    server = HboneServer()
    server.initiate()
    raw = raw_client()
    events: list = []
    list(raw_exchange(raw, server, events))
    assert not of(events, ConnectionTerminated)
    events.clear()
    raw.send_headers(1, headers)
    got = list(raw_exchange(raw, server, events))
    [rejected] = events
    assert isinstance(rejected, RequestRejected)
    assert (rejected.stream_id, rejected.status) == (1, 400)
    assert why in rejected.reason
    [resp] = [e for e in got if isinstance(e, h2.events.ResponseReceived)]
    assert (":status", "400") in resp.headers
    assert any(isinstance(e, h2.events.StreamEnded) and e.stream_id == 1 for e in got)
    assert server.open_streams == 0
    # the rejection was a stream matter: the same connection still serves CONNECT
    raw.send_headers(3, [(":method", "CONNECT"), (":authority", "10.0.0.6:81")])
    list(raw_exchange(raw, server, events))
    assert isinstance(events[-1], StreamRequested) and events[-1].port == 81
    assert not any(isinstance(e, ConnectionTerminated) for e in events)


# --- data and flow control --------------------------------------------------------------

def push_all(pipe, sender, receiver, sid, payload):
    """Send payload like a driver would: retry after WindowOpened; the receiver acks
    what it consumed.  Returns (received bytes, short-write count, frame sizes)."""
    sender_events = pipe.client_events if sender is pipe.client else pipe.server_events
    got, shorts, frame_sizes = [], 0, []
    offset = 0
    while offset < len(payload):
        want = len(payload) - offset
        n = sender.send_data(sid, payload[offset:])
        assert 0 <= n <= want
        if n < want:
            shorts += 1
            assert sender.send_window(sid) == 0
        offset += n
        mark = len(sender_events)
        c, s = pipe.pump()
        for e in (s if receiver is pipe.server else c):
            if isinstance(e, DataReceived):
                got.append(e.data)
                frame_sizes.append(len(e.data))
                receiver.ack_data(sid, e.flow_controlled_length)
        if n < want:
            pipe.pump()  # carry the WINDOW_UPDATEs back
            assert WindowOpened(stream_id=sid) in sender_events[mark:] or \
                WindowOpened(stream_id=None) in sender_events[mark:]
            assert sender.send_window(sid) > 0
    return b"".join(got), shorts, frame_sizes


def test_large_transfer_both_ways_with_flow_control(pipe):
    sid = open_accepted(pipe)
    rng = random.Random(15008)
    up = rng.randbytes(9 * MiB + 12345)
    down = rng.randbytes(5 * MiB + 1)

    # Nothing is acked yet: exactly one stream window goes out, the rest waits.
    first = pipe.client.send_data(sid, up)
    assert first == 4 * MiB < len(up)
    assert pipe.client.send_window(sid) == 0
    assert pipe.client.send_data(sid, up[first:]) == 0
    _, s = pipe.pump()
    unacked = of(s, DataReceived)
    assert b"".join(e.data for e in unacked) == up[:first]
    assert pipe.client.send_window(sid) == 0  # receiving is not consuming
    for e in unacked:
        pipe.server.ack_data(sid, e.flow_controlled_length)
    c, _ = pipe.pump()
    assert WindowOpened(stream_id=sid) in c
    # h2 batches WINDOW_UPDATEs (at least half a window at a time), so not all 4 MiB
    # need be back yet; what matters is that acking opened the window.
    assert 2 * MiB <= pipe.client.send_window(sid) <= 4 * MiB

    rest, shorts, sizes = push_all(pipe, pipe.client, pipe.server, sid, up[first:])
    assert rest == up[first:]  # intact and in order
    assert shorts >= 1
    assert max(sizes) <= C.H2_MAX_FRAME_SIZE

    back, shorts, sizes = push_all(pipe, pipe.server, pipe.client, sid, down)
    assert back == down
    assert shorts >= 1
    assert max(sizes) <= C.H2_MAX_FRAME_SIZE


def test_end_stream_both_ways_is_a_half_close(pipe):
    sid = open_accepted(pipe)
    pipe.client.send_data(sid, b"request")
    pipe.client.end_stream(sid)
    _, s = pipe.pump()
    assert s == [DataReceived(stream_id=sid, data=b"request", flow_controlled_length=7),
                 StreamEnded(stream_id=sid)]
    # half-closed: the other direction still flows
    assert pipe.server.send_data(sid, b"response") == 8
    pipe.server.end_stream(sid)
    c, _ = pipe.pump()
    assert c == [DataReceived(stream_id=sid, data=b"response", flow_controlled_length=8),
                 StreamEnded(stream_id=sid)]
    assert pipe.client.open_streams == 0 and pipe.server.open_streams == 0
    # closing what is closed is harmless and silent
    for side in (pipe.client, pipe.server):
        side.end_stream(sid)
        side.reset_stream(sid)
        side.ack_data(sid, 10)
    assert pipe.pump() == ([], [])


@pytest.mark.parametrize("who", ["client", "server"])
def test_rst_stream_surfaces_as_stream_reset(pipe, who):
    sid = open_accepted(pipe)
    resetter = getattr(pipe, who)
    resetter.reset_stream(sid, 0x8)
    c, s = pipe.pump()
    other, mine = (s, c) if who == "client" else (c, s)
    assert other == [StreamReset(stream_id=sid, error_code=0x8)]
    assert mine == []
    with pytest.raises(HboneError):
        resetter.send_data(sid, b"late")


def test_rst_and_end_for_closed_streams_do_not_raise(pipe):
    sid = open_accepted(pipe)
    pipe.client.end_stream(sid)
    pipe.server.end_stream(sid)
    pipe.pump()
    rst = RstStreamFrame(sid)
    rst.error_code = 0x8
    assert pipe.server.receive_data(rst.serialize()) == []
    assert pipe.client.receive_data(rst.serialize()) == []
    # crossing RST_STREAMs on a live stream
    sid = open_accepted(pipe)
    pipe.client.reset_stream(sid)
    pipe.server.reset_stream(sid)
    assert pipe.pump() == ([], [])
    assert not pipe.client.terminated and not pipe.server.terminated
    assert open_accepted(pipe) > sid  # connection still good


def test_server_data_before_200_is_a_connection_error(pipe):
    healthy = open_accepted(pipe)
    sid = pipe.client.open_stream("10.0.0.5:8080")
    pipe.pump()
    # a misbehaving server, bypassing the codec, sends tunnel bytes before :status
    pipe.server.h2_connection.send_data(sid, b"not yet!")
    c, s = pipe.pump()
    [term] = c
    assert isinstance(term, ConnectionTerminated)
    assert (term.error_code, term.remote) == (0x1, False)
    assert not of(c, DataReceived)  # the bytes were never handed to the driver
    [peer_term] = s
    assert isinstance(peer_term, ConnectionTerminated) and peer_term.error_code == 0x1
    assert peer_term.remote and peer_term.last_stream_id == 0  # the client accepted no server streams
    assert pipe.client.terminated
    with pytest.raises(HboneError):
        pipe.client.send_data(healthy, b"x")


def test_accept_after_peer_reset_raises(pipe):
    sid = pipe.client.open_stream("10.0.0.5:8080")
    pipe.pump()
    pipe.client.reset_stream(sid)
    _, s = pipe.pump()
    assert s == [StreamReset(stream_id=sid, error_code=0x8)]
    with pytest.raises(HboneError) as e:
        pipe.server.accept(sid)
    assert e.value.h2_error_code == 0x5
    pipe.server.reject(sid, 503)  # no-op


def test_150_concurrent_streams_on_one_connection(pipe):
    ids = [pipe.client.open_stream(f"10.0.{i // 250}.{i % 250 + 1}:{8000 + i}") for i in range(150)]
    assert len(set(ids)) == 150
    _, s = pipe.pump()
    reqs = of(s, StreamRequested)
    assert [r.stream_id for r in reqs] == ids
    assert [r.port for r in reqs] == [8000 + i for i in range(150)]
    for sid in ids:
        pipe.server.accept(sid)
    c, _ = pipe.pump()
    assert len(of(c, StreamAccepted)) == 150
    assert pipe.client.open_streams == 150 and pipe.server.open_streams == 150
    for i, sid in enumerate(ids):
        pipe.client.send_data(sid, f"hello {i}".encode())
        pipe.server.send_data(sid, f"world {i}".encode())
    c, s = pipe.pump()
    assert {e.stream_id: e.data for e in of(s, DataReceived)} == {
        sid: f"hello {i}".encode() for i, sid in enumerate(ids)}
    assert {e.stream_id: e.data for e in of(c, DataReceived)} == {
        sid: f"world {i}".encode() for i, sid in enumerate(ids)}
    for sid in ids:
        pipe.client.end_stream(sid)
        pipe.server.end_stream(sid)
    c, s = pipe.pump()
    assert len(of(c, StreamEnded)) == len(of(s, StreamEnded)) == 150
    assert pipe.client.open_streams == 0 and pipe.server.open_streams == 0


def test_client_stops_at_the_servers_stream_limit(pipe):
    for i in range(200):
        pipe.client.open_stream(f"10.0.0.1:{1000 + i}")
    with pytest.raises(HboneError) as e:
        pipe.client.open_stream("10.0.0.1:999")
    assert e.value.h2_error_code == 0x7  # REFUSED_STREAM: go open another connection
    assert "another" in str(e.value)
    _, s = pipe.pump()
    assert len(of(s, StreamRequested)) == 200
    assert not of(s, ConnectionTerminated)


# --- connection-level events ------------------------------------------------------------

def test_ping_is_acked_with_its_payload(pipe):
    payload = pipe.client.ping()
    assert len(payload) == 8
    c, _ = pipe.pump()
    assert c == [PingAcked(payload=payload)]


def goaway(last_stream_id: int, error_code: int = 0, data: bytes = b"") -> bytes:
    return GoAwayFrame(0, last_stream_id=last_stream_id, error_code=error_code,
                       additional_data=data).serialize()


def test_graceful_goaway_lets_open_streams_finish_and_refuses_the_rest(pipe):
    """A draining peer (GOAWAY NO_ERROR, last id 1): stream 1 carries on both ways and
    ends cleanly; stream 3, above the last id, is refused (retryable) at once; no new
    stream can be opened on the connection."""
    first = open_accepted(pipe)
    second = pipe.client.open_stream("10.0.0.5:8081")
    pipe.pump()
    events = pipe.client.receive_data(goaway(first, data=b"draining"))
    assert events == [StreamReset(stream_id=second, error_code=0x7),
                      ConnectionDraining(last_stream_id=first, reason="draining")]
    assert pipe.client.draining and not pipe.client.terminated
    assert pipe.client.stream_capacity == 0
    with pytest.raises(HboneError) as e:
        pipe.client.open_stream("10.0.0.5:8082")
    assert e.value.h2_error_code == 0x7 and "draining" in str(e.value)
    pipe.client.send_data(first, b"ping")
    pipe.server.send_data(first, b"pong")
    c, s = pipe.pump()
    assert [d.data for d in of(s, DataReceived) if d.stream_id == first] == [b"ping"]
    assert [d.data for d in of(c, DataReceived)] == [b"pong"]
    pipe.client.end_stream(first)
    pipe.server.end_stream(first)
    c, s = pipe.pump()
    assert StreamEnded(stream_id=first) in c and StreamEnded(stream_id=first) in s
    assert not of(c + s, ConnectionTerminated)
    assert pipe.client.open_streams == 0
    # a second GOAWAY may only lower the id; its default reason names the drain
    assert pipe.client.receive_data(goaway(5)) == [
        ConnectionDraining(last_stream_id=first, reason="peer sent GOAWAY (NO_ERROR): draining")]


def test_goaway_with_an_error_terminates_and_later_calls_are_safe(pipe):
    sid = open_accepted(pipe)
    events = pipe.client.receive_data(goaway(sid, error_code=0x2))
    assert events == [ConnectionTerminated(error_code=0x2, last_stream_id=sid,
                                           reason="peer sent GOAWAY (0x2)")]
    assert pipe.client.terminated
    with pytest.raises(HboneError):
        pipe.client.open_stream("10.0.0.1:80")
    with pytest.raises(HboneError):
        pipe.client.send_data(sid, b"x")
    pipe.client.end_stream(sid)
    pipe.client.reset_stream(sid)
    pipe.client.close()
    assert pipe.client.send_window(sid) == 0
    assert pipe.client.receive_data(b"\x00" * 30) == []


def test_our_close_sends_goaway_and_the_server_drains(pipe):
    sid = open_accepted(pipe)
    pipe.client.close()
    _, s = pipe.pump()
    assert s == [ConnectionDraining(last_stream_id=0, reason="peer sent GOAWAY (NO_ERROR): draining")]
    assert pipe.client.terminated and not pipe.server.terminated
    pipe.server.end_stream(sid)   # the server may still finish its side
    pipe.server.reset_stream(sid)


def test_client_over_the_stream_limit_is_refused_per_stream():
    """A client that ignores our MAX_CONCURRENT_STREAMS (or races our SETTINGS) gets
    REFUSED_STREAM for the extra stream only; its other tunnels and the HPACK state
    survive (RFC 9113 §5.1.2)."""
    server = HboneServer()
    server.initiate()
    raw = raw_client()
    events: list = []
    list(raw_exchange(raw, server, events))
    limit = C.H2_SERVER_MAX_CONCURRENT_STREAMS
    # ignore the limit the server advertised
    raw.remote_settings[SettingCodes.MAX_CONCURRENT_STREAMS] = 10 * limit
    raw.remote_settings.acknowledge()
    for i in range(limit + 2):
        raw.send_headers(1 + 2 * i, [(":method", "CONNECT"), (":authority", f"10.0.0.5:{1000 + i}"),
                                     ("x-pad", "same value each time, from the HPACK table")])
    got = list(raw_exchange(raw, server, events))
    assert len(of(events, StreamRequested)) == limit
    assert not of(events, ConnectionTerminated)
    resets = [e for e in got if isinstance(e, h2.events.StreamReset)]
    assert [(r.stream_id, r.error_code) for r in resets] == [(1 + 2 * limit, 7), (3 + 2 * limit, 7)]
    assert server.refused_over_limit == 2
    # a slot frees up: the next stream is served, its headers decoded correctly
    server.reject(1, 503)
    list(raw_exchange(raw, server, events))
    raw.send_headers(5 + 2 * limit, [(":method", "CONNECT"), (":authority", "10.0.0.7:7"),
                                     ("x-pad", "same value each time, from the HPACK table")])
    events.clear()
    list(raw_exchange(raw, server, events))
    [req] = of(events, StreamRequested)
    assert req.authority == "10.0.0.7:7"
    assert req.headers["x-pad"] == "same value each time, from the HPACK table"


def test_peer_settings_report_the_stream_limit_and_its_changes():
    p = CodecPipe()
    c, s = p.pump()
    assert PeerSettings(max_concurrent_streams=C.H2_SERVER_MAX_CONCURRENT_STREAMS) in c
    assert p.client.peer_settings_seen
    assert p.client.stream_capacity == C.H2_SERVER_MAX_CONCURRENT_STREAMS
    p.server.h2_connection.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 3})
    c, _ = p.pump()
    assert PeerSettings(max_concurrent_streams=3) in c
    p.client.open_stream("10.0.0.1:1")
    assert p.client.stream_capacity == 2


def test_garbage_instead_of_preface_terminates_without_raising():
    server = HboneServer()
    server.initiate()
    server.data_to_send()
    events = server.receive_data(b"GET / HTTP/1.1\r\nHost: 10.0.0.5\r\n\r\n")
    [term] = events
    assert isinstance(term, ConnectionTerminated)
    assert term.remote is False and term.error_code == 0x1  # PROTOCOL_ERROR
    goaways = [f for f in parse_frames(server.data_to_send()) if isinstance(f, GoAwayFrame)]
    assert [g.error_code for g in goaways] == [0x1]
    assert server.receive_data(b"more garbage") == []


def test_garbage_frame_mid_connection_terminates_client(pipe):
    open_accepted(pipe)
    # a DATA frame on stream 0 is a connection error (RFC 9113 §6.1)
    events = pipe.client.receive_data(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
    assert len(events) == 1 and isinstance(events[0], ConnectionTerminated)
    assert events[0].error_code == 0x1 and not events[0].remote
    _, s = pipe.pump()  # the server learns through the GOAWAY the client queued
    [term] = of(s, ConnectionTerminated)
    assert term.remote and term.error_code == 0x1


def test_random_bytes_never_raise_out_of_receive_data():
    rng = random.Random(1539)
    outcomes = set()
    for i in range(300):
        p = CodecPipe()
        p.pump()
        victim = p.server if i % 2 else p.client
        blob = rng.randbytes(rng.randrange(1, 64))
        events = victim.receive_data(blob)  # must not raise, whatever the bytes
        assert all(isinstance(e, Event) for e in events)
        outcomes.add(victim.terminated)
        assert isinstance(victim.receive_data(rng.randbytes(16)), list)
    assert True in outcomes  # most garbage is fatal; a short prefix may just be buffered


def test_byte_at_a_time_delivery():
    client, server = HboneClient(), HboneServer()
    client.initiate()
    server.initiate()
    c_events, s_events = [], []

    def trickle():
        for src, dst, sink in ((client, server, s_events), (server, client, c_events)):
            for b in src.data_to_send():
                sink.extend(dst.receive_data(bytes([b])))

    trickle()
    trickle()
    sid = client.open_stream("[fd00::7]:443", [("baggage", "x=y")])
    client.send_data(sid, b"early")
    client.end_stream(sid)
    trickle()
    # h2 reassembles frames, so a trickle yields the same events as one big read
    assert s_events[-3:] == [
        StreamRequested(stream_id=sid, authority="[fd00::7]:443", host="fd00::7", port=443,
                        headers={"baggage": "x=y"}),
        DataReceived(stream_id=sid, data=b"early", flow_controlled_length=5),
        StreamEnded(stream_id=sid),
    ]
    server.accept(sid)
    trickle()
    assert c_events[-1] == StreamAccepted(stream_id=sid)


# --- errors and authority ---------------------------------------------------------------

def test_hbone_error_is_a_mesh_error_and_importable_from_codec():
    assert codec.HboneError is HboneError
    e = HboneError("nope", status=400, h2_error_code=None)
    assert isinstance(e, MeshError) and e.status == 400 and e.h2_error_code is None


@pytest.mark.parametrize(("text", "ip", "port"), [
    ("10.0.0.5:8080", "10.0.0.5", 8080),
    ("0.0.0.0:1", "0.0.0.0", 1),
    ("255.255.255.255:65535", "255.255.255.255", 65535),
    ("[fd00::5]:8080", "fd00::5", 8080),
    ("[::1]:15008", "::1", 15008),
    ("[::ffff:10.0.0.1]:80", "::ffff:10.0.0.1", 80),
    ("[FD00:0:0::5]:443", "fd00::5", 443),
])
def test_parse_authority_accepts(text, ip, port):
    got_ip, got_port = parse_authority(text)
    assert got_ip == ipaddress.ip_address(ip) and got_port == port
    assert isinstance(got_ip, (ipaddress.IPv4Address, ipaddress.IPv6Address))


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty"),
    ("example.com:80", "hostnames"),
    ("localhost:80", "hostnames"),
    ("10.0.0.5", "missing port"),
    ("10.0.0.5:", "missing port"),
    ("10.0.0.5:0", "out of range"),
    ("10.0.0.5:65536", "out of range"),
    ("10.0.0.5:99999", "out of range"),
    ("10.0.0.5:+80", "not a decimal"),
    ("10.0.0.5:8_0", "not a decimal"),
    ("10.0.0.5:١٢", "not a decimal"),
    ("10.0.0.5:123456", "not a decimal"),
    ("fd00::5:80", "brackets"),
    ("fd00::5", "brackets"),
    ("[fd00::5]", "missing ':port'"),
    ("[fd00::5:80", "without matching"),
    ("[1.2.3.4]:80", "not an IPv6"),
    ("[fe80::1%eth0]:80", "zone"),
    (" 10.0.0.5:80", "whitespace"),
    ("10.0.0.5:80 ", "whitespace"),
    ("10.0.0.5 :80", "whitespace"),
    ("010.0.0.5:80", "not an IP"),
    ("10.0.0.256:80", "not an IP"),
])
def test_parse_authority_rejects(text, why):
    with pytest.raises(HboneError) as e:
        parse_authority(text)
    assert e.value.status == 400
    assert why in str(e.value)


@pytest.mark.parametrize(("ip", "port", "text"), [
    (ipaddress.IPv4Address("10.0.0.5"), 8080, "10.0.0.5:8080"),
    (ipaddress.IPv6Address("fd00:0::5"), 8080, "[fd00::5]:8080"),
    ("::1", 15008, "[::1]:15008"),
    ("192.168.1.1", 65535, "192.168.1.1:65535"),
])
def test_format_authority_round_trips(ip, port, text):
    assert format_authority(ip, port) == text
    assert parse_authority(text) == (ipaddress.ip_address(ip), port)


@pytest.mark.parametrize(("ip", "port"), [("10.0.0.5", 0), ("10.0.0.5", 70000), ("host", 80),
                                          ("fe80::1%eth0", 80), ("10.0.0.5", True)])
def test_format_authority_rejects(ip, port):
    with pytest.raises(HboneError):
        format_authority(ip, port)
