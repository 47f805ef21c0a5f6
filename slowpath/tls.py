"""TLS contexts for HBONE and the peer-identity checks that go with them (DESIGN.md §4-§5).

Owns building `ssl.SSLContext`s from a `WorkloadCert` and reading who is on the other
end.  It does no I/O on the network: callers wrap sockets, or `MemoryBIO`s for the
sans-IO HBONE codec, with these contexts.

Interop rules carried here: TLS 1.3 only, mutual, ALPN `h2`, no SNI (clients pass
`server_hostname=None`), hostname checks off because identities are URI SANs that
the caller checks with `verify_peer_identity` (client: the expected destination
identity) or `peer_identity` (server: chain + trust domain; who may connect is left to
authorization).

Cipher suites: Python's `ssl` cannot restrict TLS 1.3 suites (`set_ciphers` only
affects TLS <= 1.2, and there is no binding for `SSL_CTX_set_ciphersuites`).  OpenSSL's
default TLS 1.3 list is TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256,
TLS_AES_128_GCM_SHA256, so the AES-GCM suites ztunnel and Envoy offer are always agreed.

Key material never touches a file system: the key and certificate chain are handed to
OpenSSL through anonymous `memfd_create` files, opened by `/proc/self/fd/N` and closed
as soon as the context has loaded them.
"""
from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Iterator

from meshcore import constants as C
from meshcore.errors import BadInputError, ConfigError, MeshError
from meshcore.identity import SpiffeId
from slowpath.certs import WorkloadCert, peer_spiffe_from_der

ALPN_H2 = "h2"


class TlsIdentityError(MeshError):
    """The peer's certificate does not carry the identity it should.

    `reason` is the fixed string shared by metrics and access logs.
    """

    reason = "TLS_FAILURE"


@contextlib.contextmanager
def _memfile(name: str, data: bytes) -> Iterator[str]:
    """A `/proc/self/fd/N` path to an anonymous in-memory file holding `data`."""
    if not hasattr(os, "memfd_create"):
        raise ConfigError("os.memfd_create is unavailable: meshlane loads TLS keys "
                          "through memfd and needs Linux >= 3.17")
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _refuse_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise BadInputError("workload key is encrypted; ztunnel keys are generated in memory "
                        "and never encrypted")


def _configure(ctx: ssl.SSLContext, cert: WorkloadCert) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN_H2])
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cadata=cert.root_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError) as exc:
        raise BadInputError(f"trust bundle for {cert.spiffe} does not load: {exc}",
                            hint="check the CA's root-cert.pem") from None
    tag = f"meshlane-{cert.spiffe.namespace}-{cert.spiffe.service_account}"[:200]
    with _memfile(f"{tag}-chain", cert.cert_pem + b"\n" + cert.chain_pem) as chain_path, \
            _memfile(f"{tag}-key", cert.key_pem) as key_path:
        try:
            ctx.load_cert_chain(chain_path, key_path, password=_refuse_password)
        except ssl.SSLError as exc:
            raise BadInputError(f"certificate or key for {cert.spiffe} does not load: {exc}",
                                hint="does the key match the leaf?") from None
    return ctx


def server_context(cert: WorkloadCert) -> ssl.SSLContext:
    """HBONE server side (port 15008): serves leaf+chain, requires a client certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # No session tickets: HBONE connections are pooled and long-lived, and resumption
    # would only add bytes to every handshake.
    ctx.num_tickets = 0
    return _configure(ctx, cert)


def client_context(cert: WorkloadCert) -> ssl.SSLContext:
    """HBONE client side.  Wrap with `server_hostname=None` (no SNI), then call
    `verify_peer_identity` with the expected destination identity."""
    return _configure(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert)


def _peer(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId | None:
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise TlsIdentityError("peer presented no certificate",
                               hint="is the handshake complete, and mutual TLS on?")
    try:
        return peer_spiffe_from_der(der)
    except BadInputError as exc:
        raise TlsIdentityError(f"peer certificate has no usable SPIFFE ID: {exc.message}") from None


def verify_peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket,
                         expected: SpiffeId) -> SpiffeId:
    """Client side: the server must be exactly `expected`; returns it."""
    got = _peer(ssl_object)
    if got is None:
        raise TlsIdentityError(f"server presented no SPIFFE ID but {expected.uri} was expected")
    if got != expected:
        raise TlsIdentityError(f"server presented {got.uri} but {expected.uri} was expected",
                               hint="is the workload behind this address the one the "
                                    "service registry says it is?")
    return got


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket, *,
                  trust_domain: str = C.DEFAULT_TRUST_DOMAIN) -> SpiffeId | None:
    """Server side: the client's SPIFFE ID (None if its leaf has no URI SAN).

    The chain was verified by the handshake; this adds the trust-domain check.  Whether
    this identity may connect is for authorization to decide, not this function.
    """
    got = _peer(ssl_object)
    if got is not None and got.trust_domain != trust_domain:
        raise TlsIdentityError(f"client presented {got.uri} from trust domain "
                               f"{got.trust_domain!r}, but this mesh is {trust_domain!r}")
    return got
