"""Envoy bootstraps that speak HBONE (DESIGN.md §4): the two ends of a tunnel.

Owns: pure functions that turn frozen, keyword-only specs into Envoy v3 bootstrap dicts
(YAML-serialisable, static resources only) for

* an HBONE *client*: plain TCP in on ``listen``, each connection carried as one HTTP/2
  ``CONNECT`` stream over mutual TLS 1.3 to ``target_hbone`` (normally ``<pod ip>:15008``);
* an HBONE *server*: mTLS + HTTP/2 on ``listen``, each ``CONNECT`` stream forwarded as a
  byte stream to a fixed address or to the ``:authority`` it names;

and ``render_yaml``.  Meant for tests that check meshlane's own HBONE code against a real
Envoy peer, for waypoint rendering, and wherever an Envoy should stand in for a ztunnel
end.  This module does no I/O: it never opens the certificate files it names (Envoy
reads them), never starts Envoy, never touches sockets.  Running Envoy is the caller's job.

Wire shape (checked against Envoy 1.40 by tests/root/test_envoy_hbone_configs.py):

client side (``hbone_client_bootstrap``)
    listener ``hbone_client`` → ``tcp_proxy`` with ``tunneling_config``:
    ``hostname`` = target_authority (sent as ``:authority``; Envoy sends only
    ``:method CONNECT`` + ``:authority``, no ``:scheme``/``:path``, i.e. classic RFC 7540
    CONNECT), plus request headers

    * ``forwarded: for=<downstream ip>`` (IPv6: ``for="[ip]"``), like ztunnel: the
      address of the app connection, no port;
    * any ``source_headers`` verbatim, e.g. ``baggage`` built by :func:`istio_baggage`
      (ztunnel's format) or a fixed ``traceparent``.  Envoy's tcp_proxy has no tracer,
      so it cannot mint a fresh W3C ``traceparent`` per connection; without one in
      ``source_headers`` none is sent.  Peers must not require it.

    cluster ``hbone_upstream`` (STATIC, the one ``target_hbone`` endpoint) with
    ``HttpProtocolOptions.explicit_http_config.http2_protocol_options`` (ztunnel's window
    sizes, PING keepalive, ≤ 100 streams per connection) and an ``UpstreamTlsContext``:
    TLS 1.3 only, ALPN ``[h2]``, *no* ``sni`` field (so no SNI is sent), the workload
    certificate, and ``validation_context`` with ``trusted_ca`` and
    ``match_typed_subject_alt_names: [{san_type: URI, matcher: {exact: <spiffe id>}}]``.

server side (``hbone_server_bootstrap``)
    listener ``hbone_server``, one filter chain with a ``DownstreamTlsContext``:
    ``require_client_certificate: true``, TLS 1.3 only, ALPN ``[h2]``, ``trusted_ca`` and
    (when ``trust_domain`` is set) a URI-SAN *prefix* match ``spiffe://<td>/`` so only
    peers of the trust domain get in.  HTTP connection manager with ``codec_type: HTTP2``,
    ``http2_protocol_options.allow_connect: true``, ``upgrade_configs: [{upgrade_type:
    CONNECT}]``, ``stream_idle_timeout: 0s`` (tunnels may idle), and routes:

    * ``match: {connect_matcher: {}}`` → the forward cluster with
      ``upgrade_configs: [{upgrade_type: CONNECT, connect_config: {}}]`` and
      ``timeout: 0s``: Envoy opens a TCP connection upstream and only then answers
      ``200``; a failed upstream connect gives ``503``;
    * anything else (not CONNECT) → ``direct_response`` ``400``.

    Upstream choice: ``forward_to`` given → STATIC cluster ``hbone_forward`` with that
    one endpoint.  ``forward_to=None`` → ``ORIGINAL_DST`` cluster ``hbone_authority``
    (``lb_policy: CLUSTER_PROVIDED``) with ``original_dst_lb_config: {use_http_header:
    true, http_header_name: ":authority"}``: Envoy connects to whatever *numeric*
    ``ip:port`` the ``:authority`` names (a name that is not an address gives 503).
    That lets any peer holding a certificate of the trust domain reach any address the
    Envoy can reach; put it only where that is acceptable (a test, or behind network
    policy).  No authorization is applied by this config.

Both listeners set ``stat_prefix`` (default: the listener name), so TLS stats read
``listener.hbone_server.ssl.*`` whatever port is bound (with port 0 Envoy would otherwise
name them ``listener.127.0.0.1_0.*``); the client's TLS stats are
``cluster.hbone_upstream.ssl.*`` (``ssl.fail_verify_san`` on a SAN mismatch).  A non-200
CONNECT answer makes the client Envoy reset the app connection (TCP RST) and count
``cluster.hbone_upstream.upstream_cx_connect_attempts_exceeded``.

Limits: TLS 1.3 cipher suites cannot be chosen in Envoy (BoringSSL enables
AES-128-GCM, AES-256-GCM and ChaCha20 for 1.3; ``cipher_suites`` only affects ≤ 1.2), and
Envoy has no knob for the HTTP/2 max frame size, so ztunnel's 1 MiB frame setting is not
mirrored.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Mapping

import yaml

from meshcore import constants as C
from meshcore.errors import BadInputError

__all__ = [
    "HboneClientSpec",
    "HboneServerSpec",
    "client_bootstrap",
    "server_bootstrap",
    "hbone_client_bootstrap",
    "hbone_server_bootstrap",
    "istio_baggage",
    "format_authority",
    "render_yaml",
    "CLIENT_LISTENER",
    "CLIENT_CLUSTER",
    "SERVER_LISTENER",
    "SERVER_FORWARD_CLUSTER",
    "SERVER_AUTHORITY_CLUSTER",
]

Addr = tuple[str, int]

# Names that tests and operators look for in Envoy's admin output / stats.
CLIENT_LISTENER = "hbone_client"
CLIENT_CLUSTER = "hbone_upstream"
SERVER_LISTENER = "hbone_server"
SERVER_FORWARD_CLUSTER = "hbone_forward"
SERVER_AUTHORITY_CLUSTER = "hbone_authority"

_T = "type.googleapis.com/envoy."
_TLS_SOCKET = "envoy.transport_sockets.tls"
_HTTP_OPTS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


# --- validation helpers ------------------------------------------------------------------


def _ip(value: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise BadInputError(f"{what}: {value!r} is not an IP address") from None


def _port(value: int, what: str, *, allow_zero: bool = False) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadInputError(f"{what}: port {value!r} is not an integer")
    lo = 0 if allow_zero else 1
    if not lo <= value <= 65535:
        raise BadInputError(f"{what}: port {value} out of range {lo}..65535")
    return value


def _addr(value: Addr, what: str, *, allow_zero: bool = False) -> Addr:
    try:
        ip, port = value
    except (TypeError, ValueError):
        raise BadInputError(f"{what}: expected (ip, port), got {value!r}") from None
    return (_ip(ip, what), _port(port, what, allow_zero=allow_zero))


def _path(value: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise BadInputError(f"{what}: a file path is required")
    return value


def _spiffe(value: str, what: str) -> str:
    if not isinstance(value, str) or not value.startswith("spiffe://") or len(value) <= 9:
        raise BadInputError(f"{what}: {value!r} is not a spiffe:// URI")
    return value


def format_authority(ip: str, port: int) -> str:
    """``ip:port`` as HBONE puts it in ``:authority`` (``[v6]:port``)."""
    ip = _ip(ip, "authority")
    port = _port(port, "authority")
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _check_authority(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise BadInputError(f"target_authority: {value!r} is not ip:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ipaddress.ip_address(_ip(host, "target_authority")).version != 6:
            raise BadInputError(f"target_authority: {value!r} brackets a non-IPv6 address")
    elif ":" in host:
        raise BadInputError(f"target_authority: IPv6 must be bracketed, got {value!r}")
    return format_authority(host, int(port))


def istio_baggage(
    *,
    cluster: str,
    namespace: str,
    workload_name: str,
    workload_type: str = "deployment",
    service_name: str | None = None,
    service_version: str = "latest",
) -> str:
    """The ``baggage`` value ztunnel sends on CONNECT (source workload metadata):
    ``k8s.cluster.name=…,k8s.namespace.name=…,k8s.<type>.name=…,service.name=…,
    service.version=…``."""
    parts = {
        "k8s.cluster.name": cluster,
        "k8s.namespace.name": namespace,
        f"k8s.{workload_type}.name": workload_name,
        "service.name": service_name or workload_name,
        "service.version": service_version,
    }
    for k, v in parts.items():
        if not v or any(ch in v for ch in ",;= \t\r\n"):
            raise BadInputError(f"baggage: {k}={v!r} is empty or has a reserved character")
    return ",".join(f"{k}={v}" for k, v in parts.items())


# --- specs -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class HboneClientSpec:
    """Inputs of an HBONE client Envoy.

    ``cert_file`` is the workload certificate PEM, leaf first, followed by any
    intermediates (Envoy's ``certificate_chain``); ``root_file`` the trust anchors used
    to verify the server.  ``expected_peer_spiffe`` must equal the server's URI SAN.
    """

    listen: Addr
    target_hbone: Addr
    target_authority: str
    cert_file: str
    key_file: str
    root_file: str
    expected_peer_spiffe: str
    source_headers: Mapping[str, str] | None = None
    admin_port: int = 0
    admin_address: str = "127.0.0.1"
    stat_prefix: str = CLIENT_LISTENER
    node_id: str = "meshlane-hbone-client"
    connect_timeout_s: float = 5.0
    idle_timeout_s: float | None = None  # tcp_proxy idle timeout; None = Envoy's 1 h

    def __post_init__(self) -> None:
        object.__setattr__(self, "listen", _addr(self.listen, "listen", allow_zero=True))
        object.__setattr__(self, "target_hbone", _addr(self.target_hbone, "target_hbone"))
        object.__setattr__(self, "target_authority", _check_authority(self.target_authority))
        for name in ("cert_file", "key_file", "root_file"):
            _path(getattr(self, name), name)
        _spiffe(self.expected_peer_spiffe, "expected_peer_spiffe")
        _ip(self.admin_address, "admin_address")
        _port(self.admin_port, "admin_port", allow_zero=True)
        headers = dict(self.source_headers or {})
        for k, v in headers.items():
            if not k or k != k.lower() or k.startswith(":") or k == "host":
                raise BadInputError(f"source_headers: {k!r} must be a lower-case regular header")
            if not isinstance(v, str) or any(ch in v for ch in "\r\n\0"):
                raise BadInputError(f"source_headers: value of {k!r} is not a header value")
        object.__setattr__(self, "source_headers", headers)


@dataclass(frozen=True, kw_only=True)
class HboneServerSpec:
    """Inputs of an HBONE server Envoy.

    ``forward_to=None`` forwards each tunnel to the address in its ``:authority``.
    ``trust_domain`` restricts clients to URI SANs under ``spiffe://<td>/``; ``None``
    accepts any certificate that chains to ``root_file``.
    """

    listen: Addr
    cert_file: str
    key_file: str
    root_file: str
    forward_to: Addr | None = None
    trust_domain: str | None = C.DEFAULT_TRUST_DOMAIN
    admin_port: int = 0
    admin_address: str = "127.0.0.1"
    stat_prefix: str = SERVER_LISTENER
    node_id: str = "meshlane-hbone-server"
    connect_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "listen", _addr(self.listen, "listen", allow_zero=True))
        if self.forward_to is not None:
            object.__setattr__(self, "forward_to", _addr(self.forward_to, "forward_to"))
        for name in ("cert_file", "key_file", "root_file"):
            _path(getattr(self, name), name)
        if self.trust_domain is not None and (
            not self.trust_domain or "/" in self.trust_domain or ":" in self.trust_domain
        ):
            raise BadInputError(f"trust_domain: {self.trust_domain!r} is not a trust domain")
        _ip(self.admin_address, "admin_address")
        _port(self.admin_port, "admin_port", allow_zero=True)


# --- building blocks -----------------------------------------------------------------------


def _duration(seconds: float) -> str:
    if seconds < 0:
        raise BadInputError(f"duration {seconds} is negative")
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


def _socket_address(ip: str, port: int) -> dict:
    return {"socket_address": {"address": ip, "port_value": port}}


def _admin(address: str, port: int) -> dict:
    return {"address": _socket_address(address, port)}


def _h2_options(*, server: bool) -> dict:
    opts: dict[str, Any] = {
        "initial_stream_window_size": C.H2_STREAM_WINDOW,
        "initial_connection_window_size": C.H2_CONNECTION_WINDOW,
        "connection_keepalive": {
            "interval": _duration(C.H2_PING_INTERVAL_S),
            "timeout": _duration(C.H2_PING_TIMEOUT_S),
        },
    }
    if server:
        opts["allow_connect"] = True
        opts["max_concurrent_streams"] = C.H2_SERVER_MAX_CONCURRENT_STREAMS
    else:
        # Upstream: the pool opens another connection past this many active streams.
        opts["max_concurrent_streams"] = C.POOL_MAX_STREAMS_PER_CONN
    return opts


def _common_tls(cert_file: str, key_file: str, root_file: str, san_matchers: list[dict]) -> dict:
    validation: dict[str, Any] = {"trusted_ca": {"filename": root_file}}
    if san_matchers:
        validation["match_typed_subject_alt_names"] = [
            {"san_type": "URI", "matcher": m} for m in san_matchers
        ]
    return {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "alpn_protocols": ["h2"],
        "tls_certificates": [
            {
                "certificate_chain": {"filename": cert_file},
                "private_key": {"filename": key_file},
            }
        ],
        "validation_context": validation,
    }


def _endpoint_cluster(name: str, addr: Addr, connect_timeout_s: float) -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": _duration(connect_timeout_s),
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(*addr)}}]}],
        },
    }


def _header(key: str, value: str) -> dict:
    return {
        "header": {"key": key, "value": value},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    }


# --- the bootstraps --------------------------------------------------------------------------


def client_bootstrap(spec: HboneClientSpec) -> dict:
    """Bootstrap for an HBONE client Envoy (see the module docstring for the shape)."""
    listen_ip = spec.listen[0]
    if ipaddress.ip_address(listen_ip).version == 6:
        forwarded = 'for="[%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%]"'
    else:
        forwarded = "for=%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"
    # source_headers may replace the default forwarded value.
    headers = [_header(k, v) for k, v in {"forwarded": forwarded, **spec.source_headers}.items()]

    tcp_proxy: dict[str, Any] = {
        "@type": _T + "extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": spec.stat_prefix,
        "cluster": CLIENT_CLUSTER,
        "tunneling_config": {
            "hostname": spec.target_authority,
            "headers_to_add": headers,
        },
    }
    if spec.idle_timeout_s is not None:
        tcp_proxy["idle_timeout"] = _duration(spec.idle_timeout_s)

    cluster = _endpoint_cluster(CLIENT_CLUSTER, spec.target_hbone, spec.connect_timeout_s)
    cluster["typed_extension_protocol_options"] = {
        _HTTP_OPTS_KEY: {
            "@type": _T + "extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"idle_timeout": _duration(C.POOL_IDLE_TIMEOUT_S)},
            "explicit_http_config": {"http2_protocol_options": _h2_options(server=False)},
        }
    }
    cluster["transport_socket"] = {
        "name": _TLS_SOCKET,
        "typed_config": {
            "@type": _T + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            # No "sni": HBONE sends no server name.
            "common_tls_context": _common_tls(
                spec.cert_file,
                spec.key_file,
                spec.root_file,
                [{"exact": spec.expected_peer_spiffe}],
            ),
        },
    }

    return {
        "node": {"id": spec.node_id, "cluster": "meshlane"},
        "admin": _admin(spec.admin_address, spec.admin_port),
        "static_resources": {
            "listeners": [
                {
                    "name": CLIENT_LISTENER,
                    "stat_prefix": spec.stat_prefix,
                    "address": _socket_address(*spec.listen),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.tcp_proxy",
                                    "typed_config": tcp_proxy,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [cluster],
        },
    }


def server_bootstrap(spec: HboneServerSpec) -> dict:
    """Bootstrap for an HBONE server Envoy (see the module docstring for the shape)."""
    if spec.forward_to is not None:
        upstream_name = SERVER_FORWARD_CLUSTER
        upstream = _endpoint_cluster(SERVER_FORWARD_CLUSTER, spec.forward_to, spec.connect_timeout_s)
    else:
        upstream_name = SERVER_AUTHORITY_CLUSTER
        upstream = {
            "name": SERVER_AUTHORITY_CLUSTER,
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": _duration(spec.connect_timeout_s),
            "original_dst_lb_config": {"use_http_header": True, "http_header_name": ":authority"},
        }

    san = [{"prefix": f"spiffe://{spec.trust_domain}/"}] if spec.trust_domain else []
    downstream_tls = {
        "@type": _T + "extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": _common_tls(spec.cert_file, spec.key_file, spec.root_file, san),
    }

    route_config = {
        "name": "hbone",
        "virtual_hosts": [
            {
                "name": "hbone",
                "domains": ["*"],
                "routes": [
                    {
                        "name": "connect",
                        "match": {"connect_matcher": {}},
                        "route": {
                            "cluster": upstream_name,
                            "timeout": "0s",
                            "upgrade_configs": [
                                {"upgrade_type": "CONNECT", "connect_config": {}}
                            ],
                        },
                    },
                    {
                        "name": "not_connect",
                        "match": {"prefix": "/"},
                        "direct_response": {"status": 400},
                    },
                ],
            }
        ],
    }

    hcm = {
        "@type": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": spec.stat_prefix,
        "codec_type": "HTTP2",
        "http2_protocol_options": _h2_options(server=True),
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "stream_idle_timeout": "0s",
        "route_config": route_config,
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _T + "extensions.filters.http.router.v3.Router"},
            }
        ],
    }

    return {
        "node": {"id": spec.node_id, "cluster": "meshlane"},
        "admin": _admin(spec.admin_address, spec.admin_port),
        "static_resources": {
            "listeners": [
                {
                    "name": SERVER_LISTENER,
                    "stat_prefix": spec.stat_prefix,
                    "address": _socket_address(*spec.listen),
                    "filter_chains": [
                        {
                            "transport_socket": {"name": _TLS_SOCKET, "typed_config": downstream_tls},
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ],
                        }
                    ],
                }
            ],
            "clusters": [upstream],
        },
    }


def hbone_client_bootstrap(
    *,
    listen: Addr,
    target_hbone: Addr,
    target_authority: str,
    cert_file: str,
    key_file: str,
    root_file: str,
    expected_peer_spiffe: str,
    source_headers: Mapping[str, str] | None = None,
    admin_port: int = 0,
    admin_address: str = "127.0.0.1",
    stat_prefix: str = CLIENT_LISTENER,
    node_id: str = "meshlane-hbone-client",
    connect_timeout_s: float = 5.0,
    idle_timeout_s: float | None = None,
) -> dict:
    """Keyword form of ``client_bootstrap(HboneClientSpec(...))``."""
    return client_bootstrap(
        HboneClientSpec(
            listen=listen,
            target_hbone=target_hbone,
            target_authority=target_authority,
            cert_file=cert_file,
            key_file=key_file,
            root_file=root_file,
            expected_peer_spiffe=expected_peer_spiffe,
            source_headers=source_headers,
            admin_port=admin_port,
            admin_address=admin_address,
            stat_prefix=stat_prefix,
            node_id=node_id,
            connect_timeout_s=connect_timeout_s,
            idle_timeout_s=idle_timeout_s,
        )
    )


def hbone_server_bootstrap(
    *,
    listen: Addr,
    cert_file: str,
    key_file: str,
    root_file: str,
    forward_to: Addr | None = None,
    trust_domain: str | None = C.DEFAULT_TRUST_DOMAIN,
    admin_port: int = 0,
    admin_address: str = "127.0.0.1",
    stat_prefix: str = SERVER_LISTENER,
    node_id: str = "meshlane-hbone-server",
    connect_timeout_s: float = 5.0,
) -> dict:
    """Keyword form of ``server_bootstrap(HboneServerSpec(...))``."""
    return server_bootstrap(
        HboneServerSpec(
            listen=listen,
            cert_file=cert_file,
            key_file=key_file,
            root_file=root_file,
            forward_to=forward_to,
            trust_domain=trust_domain,
            admin_port=admin_port,
            admin_address=admin_address,
            stat_prefix=stat_prefix,
            node_id=node_id,
            connect_timeout_s=connect_timeout_s,
        )
    )


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def parse_stats(text: str) -> dict[str, int]:
    """Counters and gauges from the text of Envoy's admin ``/stats`` (histograms left out)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.rpartition(": ")
        if sep and value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def render_yaml(bootstrap: Mapping[str, Any]) -> str:
    """Stable YAML text of a bootstrap (keys in insertion order, no aliases)."""
    return yaml.dump(dict(bootstrap), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
