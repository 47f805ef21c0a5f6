"""How tunnels end, against a scriptable HTTP/2 peer: real TCP on loopback, real TLS 1.3,
our client HboneLink, and a raw h2 server that does what Envoy and Istio's ztunnel do
(RST_STREAM with CONNECT_ERROR, a greeting and a reset before the client has bound the
stream, a graceful GOAWAY, a small MAX_CONCURRENT_STREAMS, REFUSED_STREAM).

Each test here failed before issue 12's fixes: a reset reached the app as a clean FIN,
early data was dropped on reset, GOAWAY killed every tunnel, and the stream limit and
REFUSED_STREAM were ignored.
"""
from __future__ import annotations

import asyncio
import socket
import struct
from datetime import timedelta

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from meshcore.identity import SpiffeId
from meshlane.ca import CertificateAuthority
from slowpath import certs, tls
from slowpath.driver import AppSide, HboneLink, Pipe, StreamRetry

CLIENT = SpiffeId(namespace="demo", service_account="client")
SERVER = SpiffeId(namespace="demo", service_account="server")
IO = 10.0


def workload(ca: CertificateAuthority, spiffe: SpiffeId) -> certs.WorkloadCert:
    key = certs.generate_key()
    leaf = ca.sign_csr(certs.make_csr(key, spiffe), expected=spiffe, ttl=timedelta(hours=1))
    return certs.WorkloadCert.from_pems(spiffe=spiffe, key_pem=certs.key_to_pem(key), cert_pem=leaf,
                                        chain_pem=ca.chain_pem, root_pem=ca.root_pem)


@pytest.fixture(scope="module")
def pki():
    ca = CertificateAuthority.self_signed()
    return workload(ca, CLIENT), workload(ca, SERVER)


class RawPeer:
    """One HTTP/2 server connection driven by the test: `events` collects h2 events,
    `conn` is the h2 connection, `send()` flushes what the test queued."""

    def __init__(self, reader, writer, max_streams: int | None):
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8", validate_inbound_headers=False))
        settings = {SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20}
        if max_streams is not None:
            settings[SettingCodes.MAX_CONCURRENT_STREAMS] = max_streams
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values=settings)
        self.conn.initiate_connection()
        self.events: list = []
        self.changed = asyncio.Event()
        self.send()

    def send(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    async def run(self) -> None:
        while data := await self.reader.read(65536):
            for e in self.conn.receive_data(data):
                if isinstance(e, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                self.events.append(e)
            self.send()
            self.changed.set()

    async def wait_for(self, pred, what: str):
        for _ in range(int(IO / 0.01)):
            found = [e for e in self.events if pred(e)]
            if found:
                return found
            await asyncio.sleep(0.01)
        raise AssertionError(f"peer never saw {what}; events: {self.events}")


async def raw_server(pki, *, max_streams: int | None = None):
    peers: list[RawPeer] = []
    ready = asyncio.Event()

    async def handle(reader, writer):
        peer = RawPeer(reader, writer, max_streams)
        peers.append(peer)
        ready.set()
        try:
            await peer.run()
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            writer.close()
    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls.server_context(pki[1]))
    return srv, srv.sockets[0].getsockname()[1], peers


async def dial(pki, port) -> HboneLink:
    loop = asyncio.get_running_loop()
    _, link = await loop.create_connection(
        lambda: HboneLink(context=tls.client_context(pki[0]), server_side=False, expected_peer=SERVER),
        "127.0.0.1", port)
    await asyncio.wait_for(link.ready, IO)
    return link


async def app_pair():
    """(our AppSide inside the tunnel, the app's socket as a plain blocking-free socket)."""
    loop = asyncio.get_running_loop()
    holder = {}
    srv = await loop.create_server(lambda: holder.setdefault("side", AppSide()), "127.0.0.1", 0)
    app = socket.create_connection(srv.sockets[0].getsockname())
    app.setblocking(False)
    while "side" not in holder or holder["side"].transport is None:
        await asyncio.sleep(0.01)
    holder["side"].transport.pause_reading()
    srv.close()
    return holder["side"], app


async def read_to_end(app: socket.socket) -> tuple[bytes, str]:
    """Everything the app can read, and how it ended: "FIN" or "RST"."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    while True:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(app, 1 << 20), IO)
        except ConnectionResetError:
            return bytes(got), "RST"
        if not chunk:
            return bytes(got), "FIN"
        got += chunk


def rst(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def is_request(e) -> bool:
    return isinstance(e, h2.events.RequestReceived)


@pytest.mark.parametrize("code", [ErrorCodes.CONNECT_ERROR, ErrorCodes.INTERNAL_ERROR, ErrorCodes.CANCEL])
def test_peer_reset_reaches_the_app_as_a_tcp_reset_after_every_byte(pki, code):
    """Envoy resets the stream mid-transfer: the app reads every byte sent before the
    reset, then ECONNRESET, never a clean EOF that would make a truncated transfer
    look complete."""
    async def main():
        srv, port, peers = await raw_server(pki)
        link = await dial(pki, port)
        side, app = await app_pair()
        sid, answer = link.start_open("10.0.0.5:80", [])
        [req] = await peers[0].wait_for(is_request, "CONNECT")
        peer = peers[0]
        peer.conn.send_headers(req.stream_id, [(":status", "200")])
        payload = bytes(range(256)) * 4096  # 1 MiB, within the stream window
        peer.conn.send_data(req.stream_id, payload[:16384])
        peer.send()
        await asyncio.wait_for(answer, IO)
        link.bind(sid, side)
        for off in range(16384, len(payload), 16384):
            peer.conn.send_data(req.stream_id, payload[off:off + 16384])
        peer.conn.reset_stream(req.stream_id, error_code=code)
        peer.send()
        got, end = await read_to_end(app)
        assert len(got) == len(payload) and got == payload
        assert end == "RST"
        app.close()
        link.close()
        srv.close()
    asyncio.run(main())


def test_app_reset_becomes_rst_stream_connect_error(pki):
    async def main():
        srv, port, peers = await raw_server(pki)
        link = await dial(pki, port)
        side, app = await app_pair()
        sid, answer = link.start_open("10.0.0.5:80", [])
        [req] = await peers[0].wait_for(is_request, "CONNECT")
        peers[0].conn.send_headers(req.stream_id, [(":status", "200")])
        peers[0].send()
        await asyncio.wait_for(answer, IO)
        link.bind(sid, side)
        app.send(b"hello")
        await peers[0].wait_for(lambda e: isinstance(e, h2.events.DataReceived), "DATA")
        rst(app)
        [reset] = await peers[0].wait_for(lambda e: isinstance(e, h2.events.StreamReset), "RST_STREAM")
        assert reset.error_code == ErrorCodes.CONNECT_ERROR  # RFC 9113 §8.5, not CANCEL
        link.close()
        srv.close()
    asyncio.run(main())


@pytest.mark.parametrize("end", ["RST", "FIN"])
def test_greeting_before_bind_is_delivered_then_the_end_as_it_happened(pki, end):
    """A server-first backend that greets and closes at once: the 200, the greeting and
    the end arrive together, before the client bound the stream to the app."""
    async def main():
        srv, port, peers = await raw_server(pki)
        link = await dial(pki, port)
        side, app = await app_pair()
        sid, answer = link.start_open("10.0.0.5:25", [])
        [req] = await peers[0].wait_for(is_request, "CONNECT")
        peer = peers[0]
        peer.conn.send_headers(req.stream_id, [(":status", "200")])
        peer.conn.send_data(req.stream_id, b"220 greetings\r\n", end_stream=(end == "FIN"))
        if end == "RST":
            peer.conn.reset_stream(req.stream_id, error_code=ErrorCodes.CONNECT_ERROR)
        peer.send()
        await asyncio.wait_for(answer, IO)
        await asyncio.sleep(0.1)   # everything has arrived and waits for bind()
        link.bind(sid, side)
        if end == "FIN":
            app.shutdown(socket.SHUT_WR)
        got, how = await read_to_end(app)
        assert got == b"220 greetings\r\n"
        assert how == end
        app.close()
        link.close()
        srv.close()
    asyncio.run(main())


def test_graceful_goaway_lets_open_tunnels_finish_and_closes_when_idle(pki):
    async def main():
        srv, port, peers = await raw_server(pki)
        link = await dial(pki, port)
        side, app = await app_pair()
        sid, answer = link.start_open("10.0.0.5:80", [])
        [req] = await peers[0].wait_for(is_request, "CONNECT")
        peer = peers[0]
        peer.conn.send_headers(req.stream_id, [(":status", "200")])
        peer.send()
        await asyncio.wait_for(answer, IO)
        link.bind(sid, side)
        # Envoy draining: GOAWAY NO_ERROR, last stream = ours, written by hand so the
        # raw peer's h2 state stays open for the stream it promised to finish
        from hyperframe.frame import GoAwayFrame
        peer.writer.write(GoAwayFrame(0, last_stream_id=req.stream_id, error_code=0).serialize())
        for _ in range(100):
            if link.draining:
                break
            await asyncio.sleep(0.01)
        assert link.draining and not link.dead
        assert link.capacity == 0, "a draining link takes no new stream"
        with pytest.raises(StreamRetry):
            link.start_open("10.0.0.5:81", [])
        app.send(b"still here")
        [data] = await peer.wait_for(lambda e: isinstance(e, h2.events.DataReceived), "DATA")
        assert data.data == b"still here"
        peer.conn.send_data(req.stream_id, b"bye", end_stream=True)
        peer.send()
        app.shutdown(socket.SHUT_WR)
        got, how = await read_to_end(app)
        assert (got, how) == (b"bye", "FIN")
        for _ in range(100):
            if link.dead:
                break
            await asyncio.sleep(0.01)
        assert link.dead, "the drained link closes once its last stream ended"
        app.close()
        srv.close()
    asyncio.run(main())


def test_capacity_follows_the_peers_stream_limit_and_refusals(pki):
    async def main():
        srv, port, peers = await raw_server(pki, max_streams=3)
        link = await dial(pki, port)
        # before the peer's SETTINGS: one stream only
        if not link.settings_seen.done():
            assert link.capacity == 1
        assert await asyncio.wait_for(link.settings_seen, IO) == 3
        opened = []
        while link.capacity:
            opened.append(link.start_open(f"10.0.0.5:{80 + len(opened)}", []))
        assert len(opened) == 3
        reqs = await peers[0].wait_for(is_request, "CONNECT")
        # the peer refuses one (as Envoy does above its limit): retryable, and the link
        # counts as full until one of our streams ends
        peers[0].conn.reset_stream(reqs[0].stream_id, error_code=ErrorCodes.REFUSED_STREAM)
        peers[0].send()
        with pytest.raises(StreamRetry):
            await asyncio.wait_for(opened[0][1], IO)
        assert link.capacity == 0
        peers[0].conn.send_headers(reqs[1].stream_id, [(":status", "503")], end_stream=True)
        peers[0].send()
        with pytest.raises(Exception):
            await asyncio.wait_for(opened[1][1], IO)
        await asyncio.sleep(0.05)
        # the peer lowers its limit: our view follows
        peers[0].conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 1})
        peers[0].send()
        for _ in range(100):
            if link.codec.h2_connection.remote_settings.max_concurrent_streams == 1:
                break
            await asyncio.sleep(0.01)
        assert link.capacity == 0  # one stream still open, limit 1
        link.close()
        srv.close()
    asyncio.run(main())


def test_a_peer_allowing_no_streams_is_recognised(pki):
    """MAX_CONCURRENT_STREAMS 0: the pool must not dial connection after connection."""
    async def main():
        srv, port, peers = await raw_server(pki, max_streams=0)
        link = await dial(pki, port)
        assert await asyncio.wait_for(link.settings_seen, IO) == 0
        assert link.capacity == 0 and link.refuses_streams
        link.close()
        assert not link.refuses_streams
        srv.close()
    asyncio.run(main())


def test_pipe_carries_a_reset_across_after_the_bytes(pki):
    """Plain TCP (passthrough, plaintext inbound): a reset on one side reaches the other
    as a reset, after every byte the pipe took from the reset side, even when the other
    app reads them only later (they wait in our buffers, not lost to the RST)."""
    async def main():
        loop = asyncio.get_running_loop()
        a_side, a_app = await app_pair()
        b_side, b_app = await app_pair()
        pipe = Pipe(a_side, b_side)
        a_app.setblocking(True)

        def writer():
            try:
                a_app.sendall(b"x" * (8 << 20))
            except OSError:
                pass
        sending = loop.run_in_executor(None, writer)
        await asyncio.sleep(0.5)          # b's app has not read yet: the pipe is backed up
        rst(a_app)
        await sending
        await asyncio.sleep(0.2)
        got, how = await read_to_end(b_app)
        assert how == "RST"
        assert len(got) == pipe.bytes[id(a_side)] > 0
        b_app.close()
    asyncio.run(main())
