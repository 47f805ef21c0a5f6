"""slowpath.tlsverify: the ctypes hooks on the SSL_CTX behind an ssl.SSLContext.

Generic policies here (not the mesh's rules, which test_tls_handshake_refusals covers):
every alert the binding promises reaches the peer under OpenSSL's name, OpenSSL's own
verdict on a chain is left alone, exceptions inside a policy refuse instead of escaping,
the callbacks outlive garbage collection, and a pointer that is not an SSL_CTX is a
ConfigError, never a crash.
"""
from __future__ import annotations

import gc
import ssl

import pytest

from meshcore.errors import ConfigError
from slowpath import tls, tlsverify
from slowpath.hbone.memory import TlsPipe
from slowpath.tlsverify import Alert, Refusal
from tests.unit.test_tls_handshake_refusals import (
    CLIENT,
    SERVER,
    TestCa,
    alert,
    plain_client,
    plain_server,
    shake,
    uri,
)


@pytest.fixture(scope="module")
def ca() -> TestCa:
    return TestCa()


@pytest.fixture(scope="module")
def leaves(ca):
    return ca.leaf([uri(CLIENT.uri)]), ca.leaf([uri(SERVER.uri)], name=SERVER)


def contexts(ca, leaves, tmp_path, **server_policy):
    client_leaf, server_leaf = leaves
    client = plain_client(ca, client_leaf, alpn=["h2"], tmp=tmp_path)
    server = plain_server(ca, server_leaf, alpn=["h2"], tmp=tmp_path)
    return client, tlsverify.install(server, **server_policy)


# --- finding the SSL_CTX ---------------------------------------------------------------------
def test_ssl_ctx_address_is_found_and_validated():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    address = tlsverify.ssl_ctx_address(ctx)
    assert address and address == tlsverify.ssl_ctx_address(ctx)
    assert address != tlsverify.ssl_ctx_address(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    assert ctx.options == ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).options  # restored


def test_not_a_context_is_a_config_error():
    with pytest.raises(ConfigError, match="not an ssl.SSLContext"):
        tlsverify.ssl_ctx_address(object())  # type: ignore[arg-type]


def test_wrong_offset_is_a_config_error_not_a_crash(monkeypatch):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # two words further on, CPython 3.11 keeps alpn_protocols_len (0 on a fresh context)
    monkeypatch.setattr(tlsverify, "_CTX_OFFSET", object.__basicsize__ + 16)
    with pytest.raises(ConfigError, match="no SSL_CTX pointer at offset"):
        tlsverify.ssl_ctx_address(ctx)


def test_unreadable_or_mismatching_pointer_is_a_config_error(monkeypatch):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert tlsverify._readable(tlsverify.ssl_ctx_address(ctx), tlsverify._CTX_PROBE)
    assert not tlsverify._readable(0x1000, 16)  # the zero page: EIO, not SIGSEGV
    monkeypatch.setattr(tlsverify, "_readable", lambda address, size: False)
    with pytest.raises(ConfigError, match="readable memory"):
        tlsverify.ssl_ctx_address(ctx)
    monkeypatch.undo()
    lib = tlsverify._lib()
    real = lib.SSL_CTX_get_options
    monkeypatch.setattr(lib, "SSL_CTX_get_options", lambda address: real(address) ^ 4)
    with pytest.raises(ConfigError, match="is not its SSL_CTX"):
        tlsverify.ssl_ctx_address(ctx)


def test_install_checks_its_preconditions():
    optional = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    optional.verify_mode = ssl.CERT_OPTIONAL
    with pytest.raises(ConfigError, match="CERT_REQUIRED"):
        tlsverify.install(optional, check_leaf=lambda der, alpn: None)
    with pytest.raises(ConfigError, match="server contexts only"):
        tlsverify.install(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT),
                          select_alpn=lambda offered: b"h2")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert not tlsverify.installed(ctx)
    tlsverify.install(ctx, check_leaf=lambda der, alpn: None)
    tlsverify.install(ctx, check_leaf=lambda der, alpn: None)  # twice is fine
    assert tlsverify.installed(ctx)
    assert ctx.verify_mode == ssl.CERT_REQUIRED  # mode kept


def test_verify_mode_set_again_keeps_the_callback(ca, leaves, tmp_path):
    refusal = Refusal(kind="TEST", message="no", alert=Alert.BAD_CERTIFICATE)
    client, server = contexts(ca, leaves, tmp_path, check_leaf=lambda der, alpn: refusal)
    server.verify_mode = ssl.CERT_REQUIRED  # Python re-sets the mode with the callback kept
    out = shake(client, server)
    assert alert(out.client) == "SSLV3_ALERT_BAD_CERTIFICATE"


# --- alerts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sent,seen", [
    (Alert.CERTIFICATE_UNKNOWN, "SSLV3_ALERT_CERTIFICATE_UNKNOWN"),
    (Alert.BAD_CERTIFICATE, "SSLV3_ALERT_BAD_CERTIFICATE"),
    (Alert.HANDSHAKE_FAILURE, "SSLV3_ALERT_HANDSHAKE_FAILURE"),
    (Alert.INTERNAL_ERROR, "TLSV1_ALERT_INTERNAL_ERROR"),
])
def test_each_certificate_alert_reaches_the_peer(ca, leaves, tmp_path, sent, seen):
    """Guards decision 5: OpenSSL's X509-error-to-alert table still maps our codes."""
    refusal = Refusal(kind="TEST", message="no", alert=sent)
    client, server = contexts(ca, leaves, tmp_path, check_leaf=lambda der, alpn: refusal)
    out = shake(client, server)
    assert isinstance(out.server, ssl.SSLCertVerificationError)
    assert alert(out.client) == seen
    assert tlsverify.take_refusal(out.pipe.server.sslobj) == refusal
    assert tlsverify.take_refusal(out.pipe.server.sslobj) is None  # popped


def test_leaf_check_sees_the_leaf_and_the_selected_alpn(ca, leaves, tmp_path):
    seen = []
    client, server = contexts(ca, leaves, tmp_path,
                              check_leaf=lambda der, alpn: seen.append((der, alpn)))
    out = shake(client, server)
    assert (out.client, out.server) == (None, None)
    assert seen == [(out.pipe.server.sslobj.getpeercert(binary_form=True), b"h2")]


def test_chain_failure_is_openssls_own(ca, leaves, tmp_path):
    calls = []
    stranger = TestCa("stranger").leaf([uri(CLIENT.uri)])
    client = plain_client(ca, stranger, alpn=["h2"], tmp=tmp_path)
    server = tlsverify.install(plain_server(ca, leaves[1], alpn=["h2"], tmp=tmp_path),
                               check_leaf=lambda der, alpn: calls.append(der))
    out = shake(client, server)
    assert out.server.verify_code == 20  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    assert alert(out.client) == "TLSV1_ALERT_UNKNOWN_CA"
    assert calls == [] and tlsverify.take_refusal(out.pipe.server.sslobj) is None


def test_exception_in_leaf_check_refuses_with_internal_error(ca, leaves, tmp_path):
    def boom(der, alpn):
        raise ZeroDivisionError("policy bug")
    client, server = contexts(ca, leaves, tmp_path, check_leaf=boom)
    out = shake(client, server)
    assert alert(out.client) == "TLSV1_ALERT_INTERNAL_ERROR"
    refusal = tlsverify.take_refusal(out.pipe.server.sslobj)
    assert refusal.kind == tlsverify.KIND_INTERNAL
    assert "ZeroDivisionError: policy bug" in refusal.message


def test_alert_a_certificate_check_cannot_send_is_internal(ca, leaves, tmp_path):
    bad = Refusal(kind="TEST", message="no", alert=Alert.NO_APPLICATION_PROTOCOL)
    client, server = contexts(ca, leaves, tmp_path, check_leaf=lambda der, alpn: bad)
    out = shake(client, server)
    assert alert(out.client) == "TLSV1_ALERT_INTERNAL_ERROR"
    assert tlsverify.take_refusal(out.pipe.server.sslobj).kind == tlsverify.KIND_INTERNAL


def test_exception_in_alpn_policy_refuses(ca, leaves, tmp_path):
    def boom(offered):
        raise RuntimeError("alpn bug")
    client, server = contexts(ca, leaves, tmp_path, select_alpn=boom)
    out = shake(client, server)
    assert alert(out.client) == "TLSV1_ALERT_NO_APPLICATION_PROTOCOL"
    refusal = tlsverify.take_refusal(out.pipe.server.sslobj)
    assert refusal.kind == tlsverify.KIND_INTERNAL
    assert refusal.alert == Alert.NO_APPLICATION_PROTOCOL  # what was actually sent


def test_alpn_policy_choosing_what_was_not_offered_refuses(ca, leaves, tmp_path):
    client, server = contexts(ca, leaves, tmp_path, select_alpn=lambda offered: b"h3")
    out = shake(client, server)
    assert alert(out.client) == "TLSV1_ALERT_NO_APPLICATION_PROTOCOL"
    assert "not offered" in tlsverify.take_refusal(out.pipe.server.sslobj).message


def test_context_without_policy_fails_closed(ca, leaves, tmp_path):
    client, server = contexts(ca, leaves, tmp_path, check_leaf=lambda der, alpn: None)
    address = tlsverify.ssl_ctx_address(server)
    policy = tlsverify._policies.pop(address)
    try:
        out = shake(client, server)
        assert alert(out.client) == "TLSV1_ALERT_INTERNAL_ERROR"
        assert tlsverify.take_refusal(out.pipe.server.sslobj).kind == tlsverify.KIND_INTERNAL
    finally:
        tlsverify._policies[address] = policy


def test_parse_alpn():
    assert tlsverify._parse_alpn(b"\x02h2\x08http/1.1") == [(1, b"h2"), (4, b"http/1.1")]
    with pytest.raises(ValueError):
        tlsverify._parse_alpn(b"\x05h2")


# --- lifetime -----------------------------------------------------------------------------------
def test_callbacks_survive_garbage_collection(ca):
    client_leaf = ca.leaf([uri(CLIENT.uri)])
    bad_leaf = ca.leaf([uri("https://not.spiffe/")])
    server_leaf = ca.leaf([uri(SERVER.uri)], name=SERVER)

    def pipes():
        # the contexts are made and dropped in here; only the SSLObjects (which hold
        # their contexts, and so the SSL_CTX) leave the function
        return (TlsPipe(tls.client_context(client_leaf, expected=SERVER),
                        tls.server_context(server_leaf)),
                TlsPipe(tls.client_context(bad_leaf), tls.server_context(server_leaf)))

    good, bad = pipes()
    for _ in range(3):
        gc.collect()
    good.handshake()
    assert good.client.sslobj.selected_alpn_protocol() == "h2"
    with pytest.raises(ssl.SSLError) as info:
        bad.handshake()
    assert info.value.side == "server"
    assert tls.handshake_error(bad.server.sslobj, info.value).kind == tls.NOT_SPIFFE


def test_policies_go_with_their_contexts(ca):
    leaf = ca.leaf([uri(SERVER.uri)], name=SERVER)
    gc.collect()
    before = len(tlsverify._policies)
    made = [tls.server_context(leaf) for _ in range(20)]
    assert len(tlsverify._policies) == before + 20
    del made
    gc.collect()
    assert len(tlsverify._policies) == before
    # fresh contexts, possibly at the old addresses, still work and still refuse
    bad = ca.leaf([uri("https://not.spiffe/")])
    out = shake(tls.client_context(bad), tls.server_context(leaf))
    assert tls.handshake_error(out.pipe.server.sslobj, out.server).kind == tls.NOT_SPIFFE


def test_refusal_record_is_bounded(monkeypatch, ca, leaves, tmp_path):
    monkeypatch.setattr(tlsverify, "_REFUSALS_KEPT", 3)
    refusal = Refusal(kind="TEST", message="no", alert=Alert.BAD_CERTIFICATE)
    client, server = contexts(ca, leaves, tmp_path, check_leaf=lambda der, alpn: refusal)
    outs = [shake(client, server) for _ in range(5)]
    assert len(tlsverify._refusals) <= 3
    assert tlsverify.take_refusal(outs[-1].pipe.server.sslobj) == refusal
    assert tlsverify.take_refusal(outs[0].pipe.server.sslobj) is None  # dropped, oldest first
    tlsverify._refusals.clear()
    assert tlsverify.take_refusal(None) is None
