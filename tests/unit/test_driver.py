"""The socket driver on loopback: real TCP, real TLS 1.3, the real codec, no root.

A client HboneLink tunnels app bytes to a server HboneLink, which connects each stream
to an echo server; checks data both ways, half-close, refusal and the PING keepalive.
"""
from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from meshcore.identity import SpiffeId
from meshlane.ca import CertificateAuthority
from slowpath import certs, tls
from slowpath.driver import AppSide, HboneLink, HboneRefused

CLIENT = SpiffeId(namespace="demo", service_account="client")
SERVER = SpiffeId(namespace="demo", service_account="server")


def workload(ca: CertificateAuthority, spiffe: SpiffeId) -> certs.WorkloadCert:
    key = certs.generate_key()
    leaf = ca.sign_csr(certs.make_csr(key, spiffe), expected=spiffe, ttl=timedelta(hours=1))
    return certs.WorkloadCert.from_pems(spiffe=spiffe, key_pem=certs.key_to_pem(key), cert_pem=leaf,
                                        chain_pem=ca.chain_pem, root_pem=ca.root_pem)


@pytest.fixture(scope="module")
def pki():
    ca = CertificateAuthority.self_signed()
    return workload(ca, CLIENT), workload(ca, SERVER)


async def start(pki, *, refuse: int | None = None):
    loop = asyncio.get_running_loop()
    client_cert, server_cert = pki

    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        writer.close()
    echo_srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    echo_port = echo_srv.sockets[0].getsockname()[1]
    seen = {}

    def on_request(link, e):
        seen["peer"] = link.peer_identity
        seen["authority"] = e.authority

        async def go():
            if refuse:
                link.codec.reject(e.stream_id, refuse)
                link.flush()
                return
            _, up = await loop.create_connection(AppSide, "127.0.0.1", echo_port)
            link.codec.accept(e.stream_id)
            link.flush()
            link.bind(e.stream_id, up)
        loop.create_task(go())
    hbone = await loop.create_server(lambda: HboneLink(context=tls.server_context(server_cert),
                                                       server_side=True, on_request=on_request),
                                     "127.0.0.1", 0)
    return echo_srv, hbone, hbone.sockets[0].getsockname()[1], seen


async def dial(pki, port, **kw) -> HboneLink:
    loop = asyncio.get_running_loop()
    _, link = await loop.create_connection(
        lambda: HboneLink(context=tls.client_context(pki[0]), server_side=False, expected_peer=SERVER, **kw),
        "127.0.0.1", port)
    await asyncio.wait_for(link.ready, 5)
    return link


async def app_pair():
    """A connected socket pair: (our AppSide inside the tunnel, the 'app' stream)."""
    loop = asyncio.get_running_loop()
    holder = {}
    srv = await loop.create_server(lambda: holder.setdefault("side", AppSide()), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.sockets[0].getsockname()[1])
    while "side" not in holder or holder["side"].transport is None:
        await asyncio.sleep(0.01)
    holder["side"].transport.pause_reading()
    srv.close()
    return holder["side"], reader, writer


def test_tunnel_carries_bytes_both_ways_and_half_close(pki):
    async def main():
        echo_srv, hbone, port, seen = await start(pki)
        link = await dial(pki, port)
        side, reader, writer = await app_pair()
        sid = await link.open("127.0.0.1:9", [("forwarded", 'for="127.0.0.1:1"')])
        link.bind(sid, side)
        payload = bytes(range(256)) * 8192  # 2 MiB: crosses several flow-control windows
        writer.write(payload)
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(-1), 20)  # read to EOF: half-close came back
        assert got == payload
        assert seen["peer"] == CLIENT and seen["authority"] == "127.0.0.1:9"
        assert link.peer_identity == SERVER
        writer.close()
        link.close()
        hbone.close()
        echo_srv.close()
    asyncio.run(main())


def test_refused_connect_raises_with_status(pki):
    async def main():
        echo_srv, hbone, port, _ = await start(pki, refuse=401)
        link = await dial(pki, port)
        with pytest.raises(HboneRefused) as info:
            await asyncio.wait_for(link.open("127.0.0.1:9", []), 5)
        assert info.value.status == 401
        assert not link.dead, "one refused stream does not cost the connection"
        link.close()
        hbone.close()
        echo_srv.close()
    asyncio.run(main())


def test_wrong_server_identity_fails_ready(pki):
    async def main():
        echo_srv, hbone, port, _ = await start(pki)
        loop = asyncio.get_running_loop()
        _, link = await loop.create_connection(
            lambda: HboneLink(context=tls.client_context(pki[0]), server_side=False,
                              expected_peer=SpiffeId(namespace="other", service_account="x")),
            "127.0.0.1", port)
        with pytest.raises(tls.TlsIdentityError):
            await asyncio.wait_for(link.ready, 5)
        hbone.close()
        echo_srv.close()
    asyncio.run(main())


def test_keepalive_pings_a_live_peer_and_drops_a_dead_one(pki):
    async def main():
        echo_srv, hbone, port, _ = await start(pki)
        live = await dial(pki, port, ping_interval=0.1, ping_timeout=0.3)
        await asyncio.sleep(1.0)
        assert not live.dead, "a peer that answers PINGs stays pooled"
        live.close()

        # a peer that finishes TLS and then goes silent
        server_ctx = tls.server_context(pki[1])

        async def silent(reader, writer):
            await asyncio.sleep(5)
            writer.close()
        dead_srv = await asyncio.start_server(silent, "127.0.0.1", 0, ssl=server_ctx)
        dead = await dial(pki, dead_srv.sockets[0].getsockname()[1], ping_interval=0.1, ping_timeout=0.3)
        for _ in range(40):
            if dead.dead:
                break
            await asyncio.sleep(0.05)
        assert dead.dead, "a peer that never answers PING is closed"
        dead_srv.close()
        hbone.close()
        echo_srv.close()
    asyncio.run(main())
