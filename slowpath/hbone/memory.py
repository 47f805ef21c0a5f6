"""In-memory transports for the HBONE codec: two peers wired back to back, no sockets.

Owns: `CodecPipe`, which shuttles `data_to_send()` of an HBONE client and server into
each other's `receive_data()`, optionally through `TlsPipe`, a pair of
`ssl.SSLObject`s over `MemoryBIO`s (real TLS 1.3 records, real certificate checks).
Shipped beside the codec for tests, benchmarks and the lab's self-checks.

Must not: open sockets, sleep, or make policy decisions; the caller answers
`StreamRequested` events itself, exactly as the socket driver would.
"""
from __future__ import annotations

import ssl

from slowpath.hbone.codec import HboneClient, HboneServer
from slowpath.hbone.events import Event

_READ_CHUNK = 1 << 20


class TlsEndpoint:
    """One side of a TLS connection over two MemoryBIOs."""

    def __init__(self, context: ssl.SSLContext, *, server_side: bool):
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        # server_hostname=None: HBONE sends no SNI (DESIGN.md §4).
        self.sslobj = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                       server_hostname=None)
        self.handshake_done = False

    def step_handshake(self) -> None:
        """Advance the handshake as far as the bytes received allow; raises
        `ssl.SSLError` if it failed (e.g. the peer's certificate did not verify)."""
        if self.handshake_done:
            return
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            return
        self.handshake_done = True

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self.sslobj.write(view)
            view = view[n:]

    def read_available(self) -> bytes:
        """All application bytes decryptable now (b"" if none; EOF on close_notify)."""
        chunks = []
        while True:
            try:
                chunk = self.sslobj.read(_READ_CHUNK)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


class TlsPipe:
    """A TLS client and server connected in memory."""

    def __init__(self, client_context: ssl.SSLContext, server_context: ssl.SSLContext):
        self.client = TlsEndpoint(client_context, server_side=False)
        self.server = TlsEndpoint(server_context, server_side=True)

    def _shuttle(self) -> bool:
        moved = False
        for src, dst in ((self.client, self.server), (self.server, self.client)):
            data = src.outgoing.read()
            if data:
                dst.incoming.write(data)
                moved = True
        return moved

    def handshake(self, max_rounds: int = 50) -> None:
        """Run both handshakes to completion.  Raises the first `ssl.SSLError`; its
        `side` attribute says which end failed ("client" or "server")."""
        for _ in range(max_rounds):
            for side, end in (("client", self.client), ("server", self.server)):
                try:
                    end.step_handshake()
                except ssl.SSLError as e:
                    e.side = side  # type: ignore[attr-defined]
                    self._shuttle()  # deliver the alert, so the other side can see it
                    raise
            moved = self._shuttle()
            if self.client.handshake_done and self.server.handshake_done and not moved:
                return
        raise RuntimeError("TLS handshake did not finish in memory (stuck?)")

    def exchange(self, to_server: bytes, to_client: bytes) -> tuple[bytes, bytes]:
        """Encrypt `to_server` on the client and `to_client` on the server, deliver
        the records, and return what each side decrypted: (server got, client got)."""
        if to_server:
            self.client.write(to_server)
        if to_client:
            self.server.write(to_client)
        got_server, got_client = [], []
        while True:
            moved = self._shuttle()
            got_server.append(self.server.read_available())
            got_client.append(self.client.read_available())
            if not moved:
                break
        return b"".join(got_server), b"".join(got_client)


class CodecPipe:
    """An `HboneClient` and an `HboneServer` talking in memory (through `tls` if given).

    `pump()` moves bytes until both sides are quiet and returns the new events of each
    side; all events are also kept in `client_events` / `server_events`.
    """

    def __init__(self, client: HboneClient | None = None, server: HboneServer | None = None,
                 *, tls: TlsPipe | None = None, initiate: bool = True):
        self.client = client if client is not None else HboneClient()
        self.server = server if server is not None else HboneServer()
        self.tls = tls
        self.client_events: list[Event] = []
        self.server_events: list[Event] = []
        if initiate:
            self.client.initiate()
            self.server.initiate()

    def pump(self, max_rounds: int = 10_000) -> tuple[list[Event], list[Event]]:
        new_client: list[Event] = []
        new_server: list[Event] = []
        for _ in range(max_rounds):
            c_out, s_out = self.client.data_to_send(), self.server.data_to_send()
            if self.tls is not None:
                s_in, c_in = self.tls.exchange(c_out, s_out)
            else:
                s_in, c_in = c_out, s_out
            if not s_in and not c_in and not c_out and not s_out:
                break
            if s_in:
                new_server += self.server.receive_data(s_in)
            if c_in:
                new_client += self.client.receive_data(c_in)
        else:
            raise RuntimeError("CodecPipe.pump did not settle (endless ping-pong?)")
        self.client_events += new_client
        self.server_events += new_server
        return new_client, new_server

