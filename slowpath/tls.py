"""TLS contexts for HBONE and the peer-identity checks that go with them (DESIGN.md §4-§5).

Owns building `ssl.SSLContext`s from a `WorkloadCert`, the rules a peer must meet (checked
inside the handshake, through `slowpath.tlsverify`), and reading who is on the other end.
Must not: do network I/O (callers wrap sockets, or `MemoryBIO`s for the sans-IO HBONE
codec, with these contexts) or decide who may connect (authorization does).

Interop rules carried here: TLS 1.3 only, mutual, ALPN `h2`, no SNI (clients pass
`server_hostname=None`), hostname checks off because identities are URI SANs.

Decisions:
  1. Peers are refused *in* the handshake, with an alert, as Envoy and Istio's ztunnel do,
     not disconnected after it.  OpenSSL verifies the chain; then the leaf must carry
     exactly one URI SAN, a valid SPIFFE ID:
       kind                  refused by  alert sent            when
       NO_URI_SAN            both        certificate_unknown   the leaf has no URI SAN
       MULTIPLE_URI_SANS     both        certificate_unknown   more than one URI SAN
       NOT_SPIFFE            both        certificate_unknown   the URI SAN is no SPIFFE ID
       BAD_ENCODING          both        bad_certificate       the leaf does not parse
       FOREIGN_TRUST_DOMAIN  server      certificate_unknown   client from another mesh
       WRONG_IDENTITY        client      certificate_unknown   server is not `expected`
       NO_H2_OFFERED         server      no_application_protocol  ALPN offered, no h2
       H2_NOT_SELECTED       client      handshake_failure     server did not select h2
       INTERNAL              both        internal_error        the check itself failed
     certificate_unknown is what Envoy's SAN matcher (DefaultCertValidator: tls_alert
     defaults to SSL_AD_CERTIFICATE_UNKNOWN) and ztunnel's rustls verifiers
     (CertificateError::Other -> CertificateUnknown) send for these cases.
     no_application_protocol is rustls' answer to an ALPN offer without a common protocol.
  2. A client that offers no ALPN at all is accepted, and speaks h2 anyway (Envoy and
     ztunnel do the same).  A client context refuses a server that selects no ALPN or
     another one: every HBONE server selects h2 (ztunnel, Envoy, ours).  In TLS 1.3 the
     server's EncryptedExtensions (ALPN) arrive before its Certificate, so the check rides
     on the certificate callback; OpenSSL has no way to send no_application_protocol
     from a client, so handshake_failure it is.
  3. A server's trust domain is its own certificate's unless `server_context` is told
     otherwise (ztunnel's TrustDomainVerifier does the same).  A client context checks
     one expected identity (ztunnel builds its ClientConfig per destination identity
     too); `ClientContexts` keeps them per workload certificate.
  4. Why a handshake was refused reaches the caller through `handshake_error()`, to be
     called right after `do_handshake()` raised: a `TlsIdentityError` whose `kind` is one
     of the strings above (or UNTRUSTED_CHAIN / PEER_ALERT / HANDSHAKE for failures that
     were not our refusal) and whose `reason` is TLS_FAILURE, for counters and the access
     log alike.  `peer_identity` / `verify_peer_identity` stay as a second check after
     the handshake; for a handshake that passed the callbacks they cannot fail.
  5. Cipher suites: Python's `ssl` cannot restrict TLS 1.3 suites (`set_ciphers` only
     affects TLS <= 1.2, and there is no binding for `SSL_CTX_set_ciphersuites`).
     OpenSSL's default TLS 1.3 list is TLS_AES_256_GCM_SHA384,
     TLS_CHACHA20_POLY1305_SHA256, TLS_AES_128_GCM_SHA256, so the AES-GCM suites ztunnel
     and Envoy offer are always agreed.
  6. Key material never touches a file system: the key and certificate chain are handed
     to OpenSSL through anonymous `memfd_create` files, opened by `/proc/self/fd/N` and
     closed as soon as the context has loaded them.
"""
from __future__ import annotations

import collections
import contextlib
import os
import ssl
import threading
from collections.abc import Iterator

from cryptography import x509

from meshcore import constants as C
from meshcore.errors import BadInputError, ConfigError, MeshError
from meshcore.identity import SpiffeId, validate_trust_domain
from slowpath import certs, tlsverify
from slowpath.certs import WorkloadCert, peer_spiffe_from_der
from slowpath.tlsverify import Alert, Refusal

ALPN_H2 = "h2"
# The alert for a leaf that is not the one SPIFFE ID wanted (decision 1).  Envoy and
# ztunnel send certificate_unknown; Alert.BAD_CERTIFICATE would be the other defensible
# choice, and this is the one line to change for it.
IDENTITY_ALERT = Alert.CERTIFICATE_UNKNOWN

# Refusal kinds (decision 1): counter labels shared with the access log's reason.
NO_URI_SAN = "NO_URI_SAN"
MULTIPLE_URI_SANS = "MULTIPLE_URI_SANS"
NOT_SPIFFE = "NOT_SPIFFE"
BAD_ENCODING = "BAD_ENCODING"
FOREIGN_TRUST_DOMAIN = "FOREIGN_TRUST_DOMAIN"
WRONG_IDENTITY = "WRONG_IDENTITY"
NO_H2_OFFERED = "NO_H2_OFFERED"
H2_NOT_SELECTED = "H2_NOT_SELECTED"
INTERNAL = tlsverify.KIND_INTERNAL
# Handshake failures that were not our refusal (decision 4).
UNTRUSTED_CHAIN = "UNTRUSTED_CHAIN"
PEER_ALERT = "PEER_ALERT"
HANDSHAKE = "HANDSHAKE"
# A second check after the handshake failed (peer_identity / verify_peer_identity).
IDENTITY = "IDENTITY"
KINDS = (NO_URI_SAN, MULTIPLE_URI_SANS, NOT_SPIFFE, BAD_ENCODING, FOREIGN_TRUST_DOMAIN,
         WRONG_IDENTITY, NO_H2_OFFERED, H2_NOT_SELECTED, INTERNAL, UNTRUSTED_CHAIN,
         PEER_ALERT, HANDSHAKE, IDENTITY)


class TlsIdentityError(MeshError):
    """The TLS handshake failed, or the peer's certificate does not carry the identity it
    should.

    `reason` is the fixed error string shared by metrics and access logs (TLS_FAILURE);
    `kind` says which rule failed (one of `KINDS`); `refusal` is set when our side
    refused the handshake and says which alert it sent.
    """

    reason = "TLS_FAILURE"

    def __init__(self, message: str, *, hint: str | None = None, kind: str = IDENTITY,
                 refusal: Refusal | None = None):
        super().__init__(message, hint=hint)
        self.kind = kind
        self.refusal = refusal


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


# --- the rules, run inside the handshake -------------------------------------------------
def _clip(text: str, limit: int = 200) -> str:
    # a peer chooses its SANs: keep what reaches the log short
    return text if len(text) <= limit else text[:limit] + "..."


def _sans_for_humans(cert: x509.Certificate) -> str:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no SAN extension"
    except ValueError:
        return "an unreadable SAN extension"
    shown = []
    for name in list(names)[:4]:
        label = {x509.DNSName: "DNS", x509.UniformResourceIdentifier: "URI",
                 x509.IPAddress: "IP", x509.RFC822Name: "email"}.get(type(name), "other")
        shown.append(f"{label}:{_clip(str(name.value))}")
    more = f" and {len(names) - 4} more" if len(names) > 4 else ""
    return "SANs " + ", ".join(shown) + more if shown else "an empty SAN extension"


def _leaf_identity(der: bytes, role: str) -> SpiffeId | Refusal:
    """The one SPIFFE ID a peer leaf carries, or why it has none.  `role` names the peer
    ("client" or "server") in messages."""
    try:
        cert = x509.load_der_x509_certificate(der)
        uris = certs.uri_sans(cert)
    except ValueError as exc:
        return Refusal(kind=BAD_ENCODING, alert=Alert.BAD_CERTIFICATE,
                       message=f"{role} certificate does not parse: {exc}")
    if not uris:
        return Refusal(kind=NO_URI_SAN, alert=IDENTITY_ALERT,
                       message=f"{role} certificate carries no URI SAN "
                               f"({_sans_for_humans(cert)}); a mesh peer is named by exactly "
                               "one SPIFFE ID")
    if len(uris) > 1:
        return Refusal(kind=MULTIPLE_URI_SANS, alert=IDENTITY_ALERT,
                       message=f"{role} certificate carries {len(uris)} URI SANs "
                               f"({', '.join(map(_clip, uris[:4]))}); a SPIFFE leaf has "
                               "exactly one")
    try:
        return SpiffeId.parse(uris[0])
    except BadInputError as exc:
        return Refusal(kind=NOT_SPIFFE, alert=IDENTITY_ALERT,
                       message=f"{role} certificate's URI SAN is not a SPIFFE ID: "
                               f"{_clip(exc.message, 400)}")


def _server_rules(trust_domain: str) -> tlsverify.LeafCheck:
    def check_client(der: bytes, _alpn: bytes | None) -> Refusal | None:
        got = _leaf_identity(der, "client")
        if isinstance(got, Refusal):
            return got
        if got.trust_domain != trust_domain:
            return Refusal(kind=FOREIGN_TRUST_DOMAIN, alert=IDENTITY_ALERT, peer=got,
                           message=f"client presented {got.uri} from trust domain "
                                   f"{got.trust_domain!r}, but this mesh is {trust_domain!r}")
        return None
    return check_client


def _client_rules(expected: SpiffeId | None) -> tlsverify.LeafCheck:
    def check_server(der: bytes, alpn: bytes | None) -> Refusal | None:
        got = _leaf_identity(der, "server")
        if isinstance(got, Refusal):
            return got
        if expected is not None and got != expected:
            return Refusal(kind=WRONG_IDENTITY, alert=IDENTITY_ALERT, peer=got,
                           message=f"server presented {got.uri} but {expected.uri} was expected")
        if alpn != ALPN_H2.encode():
            what = "selected no ALPN protocol" if alpn is None else f"selected ALPN {alpn!r}"
            return Refusal(kind=H2_NOT_SELECTED, alert=Alert.HANDSHAKE_FAILURE, peer=got,
                           message=f"server {what}; HBONE needs h2")
        return None
    return check_server


def _select_h2(offered: list[bytes]) -> bytes | Refusal:
    if ALPN_H2.encode() in offered:
        return ALPN_H2.encode()
    names = ", ".join(p.decode("ascii", "backslashreplace") for p in offered[:8])
    return Refusal(kind=NO_H2_OFFERED, alert=Alert.NO_APPLICATION_PROTOCOL,
                   message=f"client offered ALPN [{names}] without h2")


# --- contexts ------------------------------------------------------------------------------
def server_context(cert: WorkloadCert, *, trust_domain: str | None = None) -> ssl.SSLContext:
    """HBONE server side (port 15008): serves leaf+chain and requires a client certificate
    whose single SPIFFE ID is in `trust_domain` (default: `cert`'s own).  A client that
    offers ALPN without h2 is refused; one that offers none is accepted."""
    td = validate_trust_domain(trust_domain) if trust_domain is not None \
        else cert.spiffe.trust_domain
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # No session tickets: HBONE connections are pooled and long-lived, and resumption
    # would only add bytes to every handshake (and would skip the client checks).
    ctx.num_tickets = 0
    _configure(ctx, cert)
    return tlsverify.install(ctx, check_leaf=_server_rules(td), select_alpn=_select_h2)


def client_context(cert: WorkloadCert, *, expected: SpiffeId | None = None) -> ssl.SSLContext:
    """HBONE client side.  Wrap with `server_hostname=None` (no SNI).

    The server must select ALPN h2 and present a single SPIFFE ID; with `expected`, it
    must be exactly that identity, else the handshake is refused.  Without `expected`,
    call `verify_peer_identity` after the handshake (or use `ClientContexts`)."""
    ctx = _configure(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert)
    return tlsverify.install(ctx, check_leaf=_client_rules(expected))


class ClientContexts:
    """The client contexts of one workload certificate, one per expected server identity,
    built on first use and kept (least recently used dropped beyond `max_size`).

    Build a new one when the certificate is renewed; contexts already handed out stay
    valid for the connections using them.
    """

    def __init__(self, cert: WorkloadCert, *, max_size: int = 256):
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.cert = cert
        self.max_size = max_size
        self._lock = threading.Lock()
        self._contexts: collections.OrderedDict[SpiffeId, ssl.SSLContext] = \
            collections.OrderedDict()

    def get(self, expected: SpiffeId) -> ssl.SSLContext:
        with self._lock:
            ctx = self._contexts.get(expected)
            if ctx is not None:
                self._contexts.move_to_end(expected)
                return ctx
        ctx = client_context(self.cert, expected=expected)
        with self._lock:
            ctx = self._contexts.setdefault(expected, ctx)
            self._contexts.move_to_end(expected)
            while len(self._contexts) > self.max_size:
                self._contexts.popitem(last=False)
        return ctx

    def __len__(self) -> int:
        return len(self._contexts)


# --- after a failed handshake ----------------------------------------------------------------
def take_refusal(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> Refusal | None:
    """Why our side refused this handshake (None if it did not).  Pops the record."""
    return tlsverify.take_refusal(ssl_object)


def _peer_alert(exc: BaseException) -> str | None:
    """The alert the peer sent, as OpenSSL names it (e.g. SSLV3_ALERT_CERTIFICATE_UNKNOWN),
    or None.  Python's reason table predates some alerts (3.11 has no name for
    no_application_protocol: reason None, message "[SSL] tlsv1 alert no application
    protocol"), so the message is read when the reason is missing."""
    if not isinstance(exc, ssl.SSLError):
        return None
    if exc.reason:
        return exc.reason if "ALERT" in exc.reason else None
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    text = text.split("] ", 1)[-1].split(" (", 1)[0].strip()
    if "alert" not in text:
        return None
    return text.upper().replace(" ", "_")


def handshake_error(ssl_object: ssl.SSLObject | ssl.SSLSocket | None, exc: BaseException, *,
                    peer: object = None) -> TlsIdentityError:
    """The error to report for a handshake that raised `exc`.  Call it once, right after
    `do_handshake()` raised (it consumes the refusal record).  `peer` (e.g. the peer's
    address) goes into the message."""
    who = f" with {peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 \
        else (f" with {peer}" if peer else "")
    refusal = take_refusal(ssl_object) if ssl_object is not None else None
    if refusal is not None:
        return TlsIdentityError(f"TLS handshake{who} refused: {refusal.message}",
                                hint=f"sent TLS alert {refusal.alert.name.lower()}",
                                kind=refusal.kind, refusal=refusal)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TlsIdentityError(f"TLS handshake{who} failed: the peer's certificate chain "
                                f"did not verify: {exc.verify_message}",
                                hint="is the peer's CA in this mesh's trust bundle?",
                                kind=UNTRUSTED_CHAIN)
    alert = _peer_alert(exc)
    if alert is not None:
        return TlsIdentityError(f"TLS handshake{who} refused by the peer: {alert}",
                                hint="the peer did not accept our certificate or ALPN; "
                                     "its logs say why", kind=PEER_ALERT)
    return TlsIdentityError(f"TLS handshake{who} failed: {exc}", kind=HANDSHAKE)


# --- after a completed handshake ---------------------------------------------------------------
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
    """Client side: the server must be exactly `expected`; returns it.  A context made
    with `client_context(cert, expected=...)` already refused anything else."""
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
    """Server side: the client's SPIFFE ID (None if its leaf has no URI SAN, which
    `server_context` refuses in the handshake).

    The chain was verified by the handshake; this adds the trust-domain check.  Whether
    this identity may connect is for authorization to decide, not this function.
    """
    got = _peer(ssl_object)
    if got is not None and got.trust_domain != trust_domain:
        raise TlsIdentityError(f"client presented {got.uri} from trust domain "
                               f"{got.trust_domain!r}, but this mesh is {trust_domain!r}")
    return got
