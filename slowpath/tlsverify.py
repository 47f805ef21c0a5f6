"""Peer checks inside the TLS handshake for Python's `ssl`, through OpenSSL callbacks.

Owns: the ctypes binding to the libssl that Python's own `_ssl` module runs on; finding
the `SSL_CTX *` behind an `ssl.SSLContext`; two callbacks installed on it (certificate
verify, ALPN select); and the record of why a handshake was refused (`take_refusal`).

Must not: decide what is acceptable (the caller passes that in: `slowpath.tls` holds the
mesh's rules), do I/O, or change anything else about a context (protocol versions, trust
store, key, ciphers stay as Python configured them).

Why it exists: Python's `ssl` has no certificate verify callback and no way to send an
alert.  Checking the peer's SPIFFE ID after the handshake means a bad peer is simply
disconnected; Envoy and Istio's ztunnel refuse it *during* the handshake with an alert,
and a client offering ALPN without `h2` gets `no_application_protocol` from rustls, where
Python's server silently proceeds without ALPN.  The callbacks below make OpenSSL itself
refuse and send the alert.

Decisions:
  1. ctypes, against the very library `_ssl` is linked to: dlopen `_ssl.__file__` and let
     dlsym find libssl/libcrypto symbols through its dependencies; refuse to work (a
     ConfigError) unless its `OpenSSL_version_num()` equals `ssl.OPENSSL_VERSION_NUMBER`.
     No compiler at install time, no second OpenSSL (pyOpenSSL/cryptography bundle their
     own, whose `SSL_CTX` is not the one Python's sockets use).
  2. The `SSL_CTX *` has no public accessor.  CPython's `PySSLContext` starts with
     `PyObject_HEAD; SSL_CTX *ctx;` (so in every CPython 3 to date), so it is read at
     offset `object.__basicsize__`.  Before anything is called through it: non-NULL and
     aligned; readable (probed through /proc/self/mem, which fails with EIO instead of
     crashing); `SSL_CTX_get_options` equals `ctx.options` and still does after one option
     bit is flipped through Python (and flipped back); `SSL_CTX_get_verify_mode` agrees
     with `ctx.verify_mode`.  Anything else is a ConfigError naming the Python build.
  3. The two callbacks are module-level CFUNCTYPE objects that live as long as the process,
     so no garbage collection can free code OpenSSL still points to.  What each context
     checks sits in `_policies`, keyed by `SSL_CTX` address and dropped (by
     weakref.finalize) when the SSLContext goes; a handshake on a context whose policy is
     missing is refused (fail closed).
  4. The verify callback leaves OpenSSL's verdict on the chain alone (preverify_ok=0 goes
     straight back) and looks at the leaf only at depth 0 with preverify_ok=1: OpenSSL
     walks the chain from the root down, so by then signatures, validity and the trust
     anchor of every certificate have been checked.  The verify mode Python set is kept;
     Python's own `verify_mode` setter keeps an installed callback.
  5. A refusal is an X509 error code chosen for the alert OpenSSL maps it to
     (`ssl_x509err2alert` in ssl/statem/statem_lib.c, the same in OpenSSL 1.1.1 to 3.x):
       certificate_unknown(46)  X509_V_ERR_UNSUPPORTED_NAME_SYNTAX (53): not in that
                                table, so the default; what Envoy and ztunnel send for a
                                SAN/trust-domain mismatch
       bad_certificate(42)      X509_V_ERR_CERT_REJECTED (28)
       handshake_failure(40)    X509_V_ERR_APPLICATION_VERIFICATION (50)
       internal_error(80)       X509_V_ERR_UNSPECIFIED (1)
     The ALPN select callback returns SSL_TLSEXT_ERR_ALERT_FATAL, for which OpenSSL sends
     no_application_protocol(120).  A client that offers no ALPN never reaches it.
  6. Why a handshake was refused is kept per connection under the `SSL`'s app data, which
     CPython sets to its `_ssl._SSLSocket` (so the key is `id(sslobj._sslobj)`); the
     pointer is only ever compared, never dereferenced.  `take_refusal` pops it; a later
     callback verdict on the same connection replaces it, and the table is bounded.
  7. No exception leaves a callback: a failure inside one refuses the handshake with
     internal_error (kind INTERNAL), never accepts.
  8. `_ssl` releases the GIL around SSL_do_handshake; CFUNCTYPE callbacks take it again
     while they run, so policies are plain Python.
  9. Calling `set_alpn_protocols` on a server context after `install` puts Python's own
     ALPN callback back; `slowpath.tls` configures everything first and installs last.
"""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import enum
import os
import ssl
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from meshcore.errors import ConfigError

KIND_INTERNAL = "INTERNAL"


class Alert(enum.IntEnum):
    """TLS alert descriptions (RFC 8446 §6) a refusal can send."""

    HANDSHAKE_FAILURE = 40
    BAD_CERTIFICATE = 42
    CERTIFICATE_UNKNOWN = 46
    INTERNAL_ERROR = 80
    NO_APPLICATION_PROTOCOL = 120


# Decision 5: the X509 verify error that makes OpenSSL send each alert.
X509_V_ERR_UNSPECIFIED = 1
X509_V_ERR_CERT_REJECTED = 28
X509_V_ERR_APPLICATION_VERIFICATION = 50
X509_V_ERR_UNSUPPORTED_NAME_SYNTAX = 53
_X509_ERROR_FOR = {
    Alert.CERTIFICATE_UNKNOWN: X509_V_ERR_UNSUPPORTED_NAME_SYNTAX,
    Alert.BAD_CERTIFICATE: X509_V_ERR_CERT_REJECTED,
    Alert.HANDSHAKE_FAILURE: X509_V_ERR_APPLICATION_VERIFICATION,
    Alert.INTERNAL_ERROR: X509_V_ERR_UNSPECIFIED,
}

# <openssl/ssl.h>
SSL_VERIFY_PEER = 0x01
SSL_VERIFY_FAIL_IF_NO_PEER_CERT = 0x02
SSL_TLSEXT_ERR_OK = 0
SSL_TLSEXT_ERR_ALERT_FATAL = 2


@dataclass(frozen=True, kw_only=True)
class Refusal:
    """Why our side refused a handshake.

    `kind` is a fixed string (a counter label), `message` says what the peer presented
    and what was wanted, `alert` is what was sent, `peer` the peer's identity when one
    could be read (else None).
    """

    kind: str
    message: str
    alert: Alert
    peer: object | None = None


# check_leaf(leaf DER, ALPN protocol selected so far or None) -> None to accept
LeafCheck = Callable[[bytes, "bytes | None"], "Refusal | None"]
# select_alpn(the client's offer, in order) -> the protocol to select, or a refusal
AlpnSelect = Callable[[list[bytes]], "bytes | Refusal"]


@dataclass(frozen=True)
class _Policy:
    check_leaf: LeafCheck | None
    select_alpn: AlpnSelect | None


# --- the binding --------------------------------------------------------------------
_VERIFY_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
# int (*)(SSL *, const unsigned char **out, unsigned char *outlen,
#         const unsigned char *in, unsigned int inlen, void *arg)
_ALPN_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                            ctypes.POINTER(ctypes.c_ubyte), ctypes.c_void_p, ctypes.c_uint,
                            ctypes.c_void_p)

_SIGNATURES = {
    # name: (restype, argtypes)
    "OpenSSL_version_num": (ctypes.c_ulong, []),
    "SSL_CTX_get_options": (ctypes.c_uint64, [ctypes.c_void_p]),
    "SSL_CTX_get_verify_mode": (ctypes.c_int, [ctypes.c_void_p]),
    "SSL_CTX_get_verify_callback": (ctypes.c_void_p, [ctypes.c_void_p]),
    "SSL_CTX_set_verify": (None, [ctypes.c_void_p, ctypes.c_int, _VERIFY_CB]),
    "SSL_CTX_set_alpn_select_cb": (None, [ctypes.c_void_p, _ALPN_CB, ctypes.c_void_p]),
    "SSL_get_SSL_CTX": (ctypes.c_void_p, [ctypes.c_void_p]),
    "SSL_get_ex_data": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int]),
    "SSL_get_ex_data_X509_STORE_CTX_idx": (ctypes.c_int, []),
    "SSL_get0_alpn_selected": (None, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                      ctypes.POINTER(ctypes.c_uint)]),
    "X509_STORE_CTX_get_ex_data": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int]),
    "X509_STORE_CTX_get_error_depth": (ctypes.c_int, [ctypes.c_void_p]),
    "X509_STORE_CTX_get_current_cert": (ctypes.c_void_p, [ctypes.c_void_p]),
    "X509_STORE_CTX_set_error": (None, [ctypes.c_void_p, ctypes.c_int]),
    "i2d_X509": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p]),
}


class _Lib:
    """libssl/libcrypto functions, bound once."""

    def __init__(self) -> None:
        import _ssl
        path = getattr(_ssl, "__file__", None)  # None: _ssl is built into the interpreter
        where = path or "the python executable"
        try:
            dll = ctypes.CDLL(path)
        except OSError as exc:
            raise ConfigError(f"cannot dlopen {where} to reach its OpenSSL: {exc}") from None
        for name, (restype, argtypes) in _SIGNATURES.items():
            try:
                fn = getattr(dll, name)
            except AttributeError:
                raise ConfigError(
                    f"{name} is not visible through {where}: this Python's _ssl does not "
                    "link OpenSSL dynamically, so meshlane cannot check peers inside the "
                    "TLS handshake", hint="use a Python built against the system OpenSSL "
                    "(Debian/Ubuntu's python3)") from None
            fn.restype, fn.argtypes = restype, argtypes
            setattr(self, name, fn)
        got = self.OpenSSL_version_num()
        if got != ssl.OPENSSL_VERSION_NUMBER:
            raise ConfigError(f"{where} resolves OpenSSL {got:#x}, but the ssl module runs on "
                              f"{ssl.OPENSSL_VERSION_NUMBER:#x} ({ssl.OPENSSL_VERSION})")
        self.ssl_idx = self.SSL_get_ex_data_X509_STORE_CTX_idx()
        if self.ssl_idx < 0:
            raise ConfigError("OpenSSL gave no ex_data index for the SSL of an X509_STORE_CTX")


_lib_lock = threading.Lock()
_lib_instance: _Lib | None = None


def _lib() -> _Lib:
    global _lib_instance
    with _lib_lock:
        if _lib_instance is None:
            _lib_instance = _Lib()
        return _lib_instance


# Decision 2: where CPython keeps the SSL_CTX pointer in a PySSLContext, and how much of
# the SSL_CTX must be readable before OpenSSL is asked about it (sizeof(SSL_CTX) is over
# 1 KiB in OpenSSL 1.1.1 and 3.x).
_CTX_OFFSET = object.__basicsize__
_CTX_PROBE = 512


def _readable(address: int, size: int) -> bool:
    """Whether `size` bytes at `address` of this process can be read (no crash if not)."""
    try:
        fd = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True  # cannot probe here; the option/verify-mode checks below still run
    try:
        return len(os.pread(fd, size, address)) == size
    except OSError:
        return False
    finally:
        os.close(fd)


def _expected_verify_mode(ctx: ssl.SSLContext) -> int:
    return {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: SSL_VERIFY_PEER,
            ssl.CERT_REQUIRED: SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT}[ctx.verify_mode]


def ssl_ctx_address(ctx: ssl.SSLContext) -> int:
    """The `SSL_CTX *` behind `ctx`, validated (decision 2); ConfigError if it cannot be."""
    import _ssl
    lib = _lib()
    build = f"CPython {sys.version.split()[0]} ({sys.executable})"
    if not isinstance(ctx, _ssl._SSLContext):
        raise ConfigError(f"{type(ctx).__name__} is not an ssl.SSLContext")
    offset = _CTX_OFFSET
    if _ssl._SSLContext.__basicsize__ < offset + ctypes.sizeof(ctypes.c_void_p):
        raise ConfigError(f"{build}: _ssl._SSLContext is too small to hold an SSL_CTX pointer "
                          "where meshlane expects it")
    address = ctypes.c_void_p.from_address(id(ctx) + offset).value or 0
    if address < 0x10000 or address % ctypes.alignment(ctypes.c_void_p):
        raise ConfigError(f"{build}: no SSL_CTX pointer at offset {offset} of SSLContext "
                          f"(found {address:#x}); the PySSLContext layout differs from what "
                          "meshlane knows")
    if not _readable(address, _CTX_PROBE):
        raise ConfigError(f"{build}: SSLContext field at offset {offset} ({address:#x}) does "
                          "not point to readable memory; the PySSLContext layout differs")
    mismatch = f"{build}: the pointer at offset {offset} of SSLContext is not its SSL_CTX"
    if (lib.SSL_CTX_get_options(address) != ctx.options
            or lib.SSL_CTX_get_verify_mode(address) & 3 != _expected_verify_mode(ctx)):
        raise ConfigError(mismatch)
    # Proof of identity: an option flipped through Python shows through the pointer.
    original = ctx.options
    ctx.options = original ^ ssl.OP_NO_RENEGOTIATION
    try:
        seen = lib.SSL_CTX_get_options(address)
    finally:
        ctx.options = original
    if (seen != original ^ ssl.OP_NO_RENEGOTIATION
            or lib.SSL_CTX_get_options(address) != original):
        raise ConfigError(mismatch)
    return address


# --- per-context policies and per-connection refusals ----------------------------------
_policies: dict[int, _Policy] = {}
_addresses: weakref.WeakKeyDictionary[ssl.SSLContext, int] = weakref.WeakKeyDictionary()
_REFUSALS_KEPT = 4096
_refusals: collections.OrderedDict[int, Refusal] = collections.OrderedDict()


def _forget_policy(address: int, policy: _Policy) -> None:
    if _policies.get(address) is policy:
        del _policies[address]


def _record(ssl_ptr: int | None, refusal: Refusal | None) -> None:
    """Remember (or, with None, forget) the refusal of the connection behind `ssl_ptr`."""
    lib = _lib_instance
    key = lib.SSL_get_ex_data(ssl_ptr, 0) if (lib is not None and ssl_ptr) else None
    if not key:
        return
    _refusals.pop(key, None)
    if refusal is not None:
        _refusals[key] = refusal
        while len(_refusals) > _REFUSALS_KEPT:
            _refusals.popitem(last=False)


def take_refusal(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> Refusal | None:
    """Why our side refused this connection's handshake, or None (not refused by a
    callback: e.g. the chain did not verify, or the peer refused us).  Pops the record:
    call it once, right after `do_handshake()` raised."""
    inner = getattr(ssl_object, "_sslobj", None)
    if inner is None:
        return None
    return _refusals.pop(id(inner), None)


def _internal(exc: BaseException | str) -> Refusal:
    what = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return Refusal(kind=KIND_INTERNAL, message=f"internal error in the TLS peer check: {what}",
                   alert=Alert.INTERNAL_ERROR)


def _policy_of(lib: _Lib, ssl_ptr: int | None) -> _Policy | None:
    return _policies.get(lib.SSL_get_SSL_CTX(ssl_ptr)) if ssl_ptr else None


def _leaf_der(lib: _Lib, store: int) -> bytes:
    x509 = lib.X509_STORE_CTX_get_current_cert(store)
    if not x509:
        raise RuntimeError("no current certificate at depth 0")
    size = lib.i2d_X509(x509, None)
    if size <= 0:
        raise RuntimeError("i2d_X509 failed on the peer's leaf")
    buf = ctypes.create_string_buffer(size)
    cursor = ctypes.c_void_p(ctypes.addressof(buf))  # i2d_X509 advances it
    if lib.i2d_X509(x509, ctypes.byref(cursor)) != size:
        raise RuntimeError("i2d_X509 wrote an unexpected length")
    return buf.raw


def _alpn_selected(lib: _Lib, ssl_ptr: int) -> bytes | None:
    data, size = ctypes.c_void_p(), ctypes.c_uint()
    lib.SSL_get0_alpn_selected(ssl_ptr, ctypes.byref(data), ctypes.byref(size))
    return ctypes.string_at(data.value, size.value) if data.value and size.value else None


def _on_verify(preverify_ok: int, store: int | None) -> int:
    if not preverify_ok:
        return 0  # OpenSSL refused the chain: its error code and alert stand
    lib, ssl_ptr = _lib_instance, None
    try:
        if lib.X509_STORE_CTX_get_error_depth(store) != 0:
            return 1  # intermediates and anchor: only the leaf names the peer
        ssl_ptr = lib.X509_STORE_CTX_get_ex_data(store, lib.ssl_idx)
        policy = _policy_of(lib, ssl_ptr)
        if policy is None:
            refusal = _internal("this SSL_CTX has no registered peer policy")
        elif policy.check_leaf is None:
            refusal = None
        else:
            refusal = policy.check_leaf(_leaf_der(lib, store), _alpn_selected(lib, ssl_ptr))
            if refusal is not None and refusal.alert not in _X509_ERROR_FOR:
                refusal = _internal(f"a certificate check cannot send alert {refusal.alert!r}")
    except BaseException as exc:  # noqa: BLE001 - nothing may escape into OpenSSL
        refusal = _internal(exc)
    try:
        _record(ssl_ptr, refusal)
    except BaseException:  # noqa: BLE001, S110 - only the record is lost, the verdict stands
        pass
    if refusal is None:
        return 1
    try:
        lib.X509_STORE_CTX_set_error(store, _X509_ERROR_FOR[refusal.alert])
    except BaseException:  # noqa: BLE001, S110 - returning 0 refuses regardless
        pass
    return 0


def _parse_alpn(wire: bytes) -> list[tuple[int, bytes]]:
    """(offset, name) of each entry of an ALPN protocol_name_list (RFC 7301 §3.1)."""
    out, i = [], 0
    while i < len(wire):
        n = wire[i]
        if n == 0 or i + 1 + n > len(wire):
            raise ValueError(f"malformed ALPN list {wire!r}")
        out.append((i + 1, wire[i + 1:i + 1 + n]))
        i += 1 + n
    return out


def _on_alpn(ssl_ptr, out, outlen, in_ptr, inlen, _arg) -> int:
    lib = _lib_instance
    try:
        policy = _policy_of(lib, ssl_ptr)
        if policy is None or policy.select_alpn is None:
            raise RuntimeError("this SSL_CTX has no registered ALPN policy")
        offered = _parse_alpn(ctypes.string_at(in_ptr, inlen))
        verdict = policy.select_alpn([name for _, name in offered])
        if isinstance(verdict, Refusal):
            refusal = verdict
        else:
            offset = next((off for off, name in offered if name == verdict), None)
            if offset is None:
                raise RuntimeError(f"ALPN policy chose {verdict!r}, which was not offered")
            out[0] = in_ptr + offset  # OpenSSL copies the selection before `in` goes away
            outlen[0] = len(verdict)
            _record(ssl_ptr, None)
            return SSL_TLSEXT_ERR_OK
    except BaseException as exc:  # noqa: BLE001 - nothing may escape into OpenSSL
        refusal = _internal(exc)
    try:
        # whatever the policy asked for, this is the one alert OpenSSL sends from here
        _record(ssl_ptr, dataclasses.replace(refusal, alert=Alert.NO_APPLICATION_PROTOCOL))
    except BaseException:  # noqa: BLE001, S110 - only the record is lost, the verdict stands
        pass
    return SSL_TLSEXT_ERR_ALERT_FATAL  # OpenSSL sends no_application_protocol


# Decision 3: created once, referenced by the module for the life of the process.
_VERIFY_CALLBACK = _VERIFY_CB(_on_verify)
_ALPN_CALLBACK = _ALPN_CB(_on_alpn)


def install(ctx: ssl.SSLContext, *, check_leaf: LeafCheck | None = None,
            select_alpn: AlpnSelect | None = None) -> ssl.SSLContext:
    """Make `ctx`'s handshakes run `check_leaf` on the peer's leaf once its chain has
    verified, and (server contexts) `select_alpn` on a client's ALPN offer.

    A `Refusal` from either aborts the handshake with its alert and is kept for
    `take_refusal`.  A client that offers no ALPN is not asked about.  Call this after
    every other setting of `ctx` (decision 9).  Returns `ctx`.
    """
    if check_leaf is None and select_alpn is None:
        return ctx
    lib = _lib()
    address = ssl_ctx_address(ctx)
    current = lib.SSL_CTX_get_verify_callback(address)
    ours = ctypes.cast(_VERIFY_CALLBACK, ctypes.c_void_p).value
    if current and current != ours:
        raise ConfigError("this SSLContext already has a certificate verify callback that "
                          "meshlane did not install")
    if check_leaf is not None:
        if ctx.verify_mode != ssl.CERT_REQUIRED:
            raise ConfigError("a leaf check needs verify_mode CERT_REQUIRED: with a "
                              "certificate optional, a peer without one would skip it")
        lib.SSL_CTX_set_verify(address, lib.SSL_CTX_get_verify_mode(address), _VERIFY_CALLBACK)
    if select_alpn is not None:
        if ctx.protocol != ssl.PROTOCOL_TLS_SERVER:
            raise ConfigError("ALPN selection applies to server contexts only")
        lib.SSL_CTX_set_alpn_select_cb(address, _ALPN_CALLBACK, None)
    policy = _Policy(check_leaf=check_leaf, select_alpn=select_alpn)
    _policies[address] = policy
    _addresses[ctx] = address
    weakref.finalize(ctx, _forget_policy, address, policy)
    return ctx


def installed(ctx: ssl.SSLContext) -> bool:
    """Whether `install` hooked `ctx` (for tests and start-up self-checks)."""
    address = _addresses.get(ctx)
    return address is not None and address in _policies
