"""A waypoint's Envoy configuration, rendered from `meshcore.l7.WaypointView` (DESIGN.md §1, §4, §6).

Owns: pure functions that turn one waypoint's view into Envoy v3 resources, split into the
files Envoy reads through `path_config_source` subscriptions:

    bootstrap(node_id=, config_dir=, admin_port=)  static part: admin, CDS/LDS file sources,
                                                   the internal-listener extension, overload
    render(view, access_log=[, config_dir=])   {"cds.yaml", "lds.yaml", "rds/<file>.yaml": ...}
    secrets(cert_chain_pem=, key_pem=, root_pem=)  {"sds/workload.yaml", "sds/roots.yaml"}
    to_yaml(content)            file text Envoy reads back as written (see "Envoy facts")

Every file is a DiscoveryResponse-shaped dict ``{"version_info": sha256 of its resources,
"resources": [...]}`` with ``@type`` on each resource.  Envoy re-reads a file when a new
version is *renamed* into its watched directory (never on an in-place write).  Must not: do
I/O, start processes, know where files live beyond the paths it writes into the config.

Shape (Istio's waypoint is the model)::

  client ztunnel ──HBONE──► listener connect_terminate (0.0.0.0:15008)
      mTLS 1.3 (client cert of spiffe://<td>/ required, ALPN h2), HCM HTTP/2 CONNECT;
      set_filter_state (shared with the upstream connection, once):
          envoy.filters.listener.original_dst.local_ip  = :authority   (VIP:port)
          envoy.filters.listener.original_dst.remote_ip = peer address (client pod ip:port)
          io.meshlane.peer_principal                     = peer URI SAN (spiffe://...)
      route connect_matcher → cluster main_internal; anything else → 400
  ──internal──► listener main_internal (internal_listener, listener filter original_dst:
      local/remote address restored from that filter state), one filter chain per served
      (VIP, port), chosen by a filter_chain_matcher on destination IP, then port; no match:
      the default chain proxies to BlackHoleCluster (no endpoints), which closes the
      internal connection (the HBONE client got its 200 already and then sees the stream end).
        HTTP port: HCM codec AUTO (HTTP/1.1, h2c), RDS "inbound-vip|<port>|http|<host>",
          http_filters fixed: meshlane.rbac.deny, meshlane.rbac.allow,
          envoy.filters.http.fault, envoy.filters.http.local_ratelimit, router; JSON
          access log.  Authorization, fault and rate limit are per-virtual-host/per-route
          `typed_per_filter_config` in the route configs, so a policy or route change is
          an RDS update and never touches a listener (no drain).
        TCP port: [network RBAC deny/allow,] tcp_proxy → the Service's cluster.
      Pod IPs (`view.workloads`, a waypoint for workloads), any port: the listener adds the
      HTTP inspector (off on ports served only as TCP VIP ports; it gives up after
      DETECT_TIMEOUT_S and the connection goes on as TCP).  Per destination identity, chain
      "inbound-pod|http|<id>" when it saw HTTP/1.1 or h2c (HCM as above, RDS with one route
      to the cluster encap|<id>, policies that target the Gateway) else
      "inbound-pod|tcp|<id>" (network RBAC, tcp_proxy → encap|<id>).  Both first set the
      original_dst local_ip filter state again (shared with the upstream once) to the
      connection's own local address, and cluster encap|<id> (one internal endpoint) hands
      it to connect_originate|<id>, which dials exactly that pod IP:port.  HTTP upstream
      connections of encap are pooled per destination (that filter state is part of the pool
      key), never shared between two pods or ports.
  ──► cluster outbound|<port>||<svc>.<ns>.svc.cluster.local (STATIC)
        HBONE endpoint: envoy_internal_address {server_listener_name:
          connect_originate|<identity>, endpoint_id: <ip>:<targetPort>}, metadata
          envoy.filters.listener.original_dst {local: <ip>:<targetPort>} passed through
          by the internal_upstream transport socket (transport_socket_matches
          {tunnel: hbone}); plain endpoint (not enrolled): socket <ip>:<targetPort>.
  ──internal──► listener connect_originate|<td>/ns/<ns>/sa/<sa> (the identity without
      "spiffe://"; original_dst restores the local address from that metadata) → tcp_proxy,
      tunneling_config hostname %DOWNSTREAM_LOCAL_ADDRESS% → the cluster of that name (ORIGINAL_DST,
      port 15008, HTTP/2, mTLS 1.3 with the waypoint's certificate, no SNI, peer URI SAN
      = exactly that identity) ──HBONE──► the pod's ztunnel.

Certificates come from SDS files (secrets ``workload`` and ``roots``), so rotation is a
rename too.

Paths: ``render`` writes the paths of the rds/ and sds/ files into the listeners and
clusters.  By default they are relative (``config/rds/...``): Envoy resolves them against
its working directory, and meshlane's waypoint controller runs Envoy in the waypoint's
directory with the files in ``config/``.  Pass ``config_dir=`` (the same value as to
``bootstrap``) when Envoy runs elsewhere.

Precedence of HTTPRoute matches (Gateway API; the order of Envoy routes in a virtual host):
  1. path match type: Exact, then PathPrefix, then RegularExpression (Istio's order);
  2. longer path value first (PathPrefix compared without its trailing '/');
  3. a match with a method before one without;
  4. more header matches first;
  5. more query parameter matches first;
  6. the older HTTPRoute (`created`), then namespace/name;
  7. rule order, then match order inside the route.

Authorization (Istio semantics, one Envoy policy per Istio rule, named
``ns[<ns>]-policy[<name>]-rule[<i>]``): policies targeting the Gateway apply to every Service
of the waypoint and to pod-addressed traffic, those targeting a Service to its virtual hosts
(and TCP chains).  DENY policies go to ``meshlane.rbac.deny`` (action DENY), ALLOW policies to
``meshlane.rbac.allow`` (action ALLOW; with ALLOW policies in scope but no rule left, it
allows nothing); with none in scope the per-route config is absent and the listener's
rule-less RBAC config lets everything through.  Denied requests get 403 "RBAC: access
denied".  Principals and namespaces match the filter state io.meshlane.peer_principal
(``spiffe://`` prepended; namespaces by regex on ``/ns/<ns>/``); ipBlocks, source.ip and
remote.ip match ``remote_ip``.  TCP ports get network RBAC filters in their filter chain
(so a policy change in scope of a TCP port is a listener change, applied in place to that
chain only); there HTTP-only fields (methods, paths, hosts, request headers) drop the whole
rule of an ALLOW and are ignored in a DENY (Istio's TCP builder: a Gateway-wide DENY on a
header denies every TCP port of the waypoint).

Limits (documented, not errors): HTTPRoute `hostnames` are not matched (a waypoint's
virtual host is the Service's, domains ["*"]); a route's rate limit is one token bucket
per Envoy route (per rule and match), refilled to full every `per_s`; a backendRef to a
Service or port the view does not have gets 500 for its share of the traffic
(cluster_not_found_response_code) instead of a cluster; pod-addressed traffic gets no
HTTPRoute (routes attach to Services), no retries and no DestinationRule.

Envoy facts this relies on (checked with Envoy 1.40 by tests/root/test_waypoint_envoy.py):
  * a resource naming a `path_config_source` file that does not exist is refused: write
    sds/ and rds/ files before the lds.yaml/cds.yaml that name them;
  * on an internal listener, original_dst restores the remote address but the *direct*
    remote address stays ``envoy://internal_client_address/``: RBAC uses ``remote_ip``
    (the HCM has use_remote_address, so X-Forwarded-For is never trusted for it);
  * a cluster endpoint naming a connect_originate listener that LDS has not delivered yet
    is an immediate connect failure, retried on another endpoint by the default retry
    policy (connect-failure + previous_hosts);
  * Envoy parses these files with yaml-cpp, which reads plain ``y``/``n``/``on``/``off``...
    as booleans; PyYAML leaves ``y``/``n`` unquoted, so use ``to_yaml`` (or JSON text);
  * stat names turn ':' into '_', hence no ':' in route config names and no ``spiffe://``
    in connect_originate names (``http.<prefix>.rds.<route config>.version_text`` and
    ``cluster.<name>.*`` read back exactly).
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable
from typing import Any

import yaml

from meshcore import constants as C
from meshcore import l7
from meshcore.errors import BadInputError
from slowpath.envoy_hbone import (
    _HTTP_OPTS_KEY,
    _T,
    _TLS_SOCKET,
    _admin,
    _duration,
    _h2_options,
    _header,
    _socket_address,
)

__all__ = [
    "ADMIN_PORT",
    "CONNECT_ORIGINATE",
    "CONNECT_TERMINATE",
    "FAULT_FILTER",
    "MAIN_INTERNAL",
    "PEER_PRINCIPAL_KEY",
    "RATELIMITED_HEADER",
    "RATELIMIT_FILTER",
    "RBAC_ALLOW",
    "RBAC_DENY",
    "ROOTS_SECRET",
    "WORKLOAD_SECRET",
    "bootstrap",
    "cluster_name",
    "originate_name",
    "rds_file",
    "render",
    "route_config_name",
    "secrets",
    "to_yaml",
]

ADMIN_PORT = C.PORT_ADMIN

# Names that operators and tests look for in /config_dump and /stats.
CONNECT_TERMINATE = "connect_terminate"
MAIN_INTERNAL = "main_internal"
BLACKHOLE = "BlackHoleCluster"          # main_internal's default chain and its endpoint-less cluster
CONNECT_ORIGINATE = "connect_originate"
PEER_PRINCIPAL_KEY = "io.meshlane.peer_principal"
ORIGINAL_DST_LOCAL = "envoy.filters.listener.original_dst.local_ip"
ORIGINAL_DST_REMOTE = "envoy.filters.listener.original_dst.remote_ip"
ORIGINAL_DST_FILTER = "envoy.filters.listener.original_dst"
RBAC_DENY = "meshlane.rbac.deny"
RBAC_ALLOW = "meshlane.rbac.allow"
FAULT_FILTER = "envoy.filters.http.fault"
RATELIMIT_FILTER = "envoy.filters.http.local_ratelimit"
ROUTER_FILTER = "envoy.filters.http.router"
WORKLOAD_SECRET = "workload"
ROOTS_SECRET = "roots"
RATELIMITED_HEADER = "x-meshlane-ratelimited"
TUNNEL_MATCH = {"tunnel": "hbone"}      # endpoint metadata selecting the HBONE transport socket
DEFAULT_CONFIG_DIR = "config"           # relative: Envoy's working directory (see module doc)
CONNECT_TIMEOUT_S = 5.0
DEFAULT_RETRY_ON = "connect-failure,refused-stream,reset"
DEFAULT_RETRIES = 2
# pod-IP-addressed traffic: how long the HTTP inspector waits for a client's first bytes
# before the connection goes to the TCP chain (a server-first protocol)
DETECT_TIMEOUT_S = 1.0
MAX_DOWNSTREAM_CONNECTIONS = 100_000
_MAX_U32 = 2**32 - 1
H2_APP_PROTOCOLS = ("http2", "h2c", "grpc", "grpc-web", "kubernetes.io/h2c")

_TYPE = {
    "listener": _T + "config.listener.v3.Listener",
    "cluster": _T + "config.cluster.v3.Cluster",
    "route": _T + "config.route.v3.RouteConfiguration",
    "secret": _T + "extensions.transport_sockets.tls.v3.Secret",
    "hcm": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
    "tcp_proxy": _T + "extensions.filters.network.tcp_proxy.v3.TcpProxy",
    "set_filter_state": _T + "extensions.filters.http.set_filter_state.v3.Config",
    "network_set_filter_state": _T + "extensions.filters.network.set_filter_state.v3.Config",
    "http_inspector": _T + "extensions.filters.listener.http_inspector.v3.HttpInspector",
    "ip_input": _T + "extensions.matching.common_inputs.network.v3.DestinationIPInput",
    "port_input": _T + "extensions.matching.common_inputs.network.v3.DestinationPortInput",
    "alpn_input": _T + "extensions.matching.common_inputs.network.v3.ApplicationProtocolInput",
    "ip_matcher": "type.googleapis.com/xds.type.matcher.v3.IPMatcher",
    "string_value": "type.googleapis.com/google.protobuf.StringValue",
    "original_dst": _T + "extensions.filters.listener.original_dst.v3.OriginalDst",
    "internal_upstream": _T + "extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
    "raw_buffer": _T + "extensions.transport_sockets.raw_buffer.v3.RawBuffer",
    "rbac": _T + "extensions.filters.http.rbac.v3.RBAC",
    "rbac_per_route": _T + "extensions.filters.http.rbac.v3.RBACPerRoute",
    "network_rbac": _T + "extensions.filters.network.rbac.v3.RBAC",
    "fault": _T + "extensions.filters.http.fault.v3.HTTPFault",
    "local_ratelimit": _T + "extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
    "router": _T + "extensions.filters.http.router.v3.Router",
    "file_log": _T + "extensions.access_loggers.file.v3.FileAccessLog",
    "http_options": _T + "extensions.upstreams.http.v3.HttpProtocolOptions",
    "upstream_tls": _T + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
    "downstream_tls": _T + "extensions.transport_sockets.tls.v3.DownstreamTlsContext",
    "internal_listener": _T + "extensions.bootstrap.internal_listener.v3.InternalListener",
    "downstream_connections": _T + "extensions.resource_monitors.downstream_connections.v3."
                                   "DownstreamConnectionsConfig",
    "previous_hosts": _T + "extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate",
}

# One JSON line per request / TCP connection (keys as Istio's JSON access log where it has one).
HTTP_LOG_FORMAT = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "authority": "%REQ(:AUTHORITY)%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "duration": "%DURATION%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "route_name": "%ROUTE_NAME%",
    "downstream_local_address": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "peer_principal": f"%FILTER_STATE({PEER_PRINCIPAL_KEY}:PLAIN)%",
    "x_request_id": "%REQ(X-REQUEST-ID)%",
}
TCP_LOG_FORMAT = {
    "start_time": "%START_TIME%",
    "response_flags": "%RESPONSE_FLAGS%",
    "duration": "%DURATION%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "downstream_local_address": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "peer_principal": f"%FILTER_STATE({PEER_PRINCIPAL_KEY}:PLAIN)%",
}


# --- names --------------------------------------------------------------------------------------


def cluster_name(svc: l7.Service, port: int) -> str:
    """Istio's outbound cluster name: ``outbound|<port>||<name>.<ns>.svc.cluster.local``."""
    return f"outbound|{port}||{svc.host}"


def _missing_cluster_name(namespace: str, name: str, port: int) -> str:
    return f"outbound|{port}||{l7.service_host(name, namespace)}"


def route_config_name(svc: l7.Service, port: int) -> str:
    """``inbound-vip|<port>|http|<host>``: no ':' (Envoy's stat names turn it into '_')."""
    return f"inbound-vip|{port}|http|{svc.host}"


def _tcp_chain_name(svc: l7.Service, port: int) -> str:
    return f"inbound-vip|{port}|tcp|{svc.host}"


def originate_name(identity: str) -> str:
    """Listener and cluster carrying HBONE to pods of `identity` (a spiffe:// URI)."""
    return f"{CONNECT_ORIGINATE}|{_identity_path(identity)}"


def _identity_path(identity: str) -> str:
    if not identity.startswith("spiffe://") or len(identity) <= 9 or any(c in identity for c in " \t\r\n"):
        raise BadInputError(f"endpoint identity {identity!r} is not a spiffe:// URI")
    # without "spiffe://": Envoy's stat names would turn its ':' into '_' (and drop "//")
    return identity.removeprefix("spiffe://")


def direct_route_config_name(identity: str) -> str:
    """``inbound-pod|http|<td>/ns/<ns>/sa/<sa>``: HTTP addressed to pods of `identity`."""
    return f"inbound-pod|http|{_identity_path(identity)}"


def _direct_tcp_name(identity: str) -> str:
    return f"inbound-pod|tcp|{_identity_path(identity)}"


def encap_name(identity: str) -> str:
    """Cluster into the connect_originate listener of `identity`, the destination being
    the connection's own (original) local address: pod-IP-addressed traffic."""
    return f"encap|{_identity_path(identity)}"


def rds_file(route_config: str) -> str:
    """The file (relative to the config dir) holding route configuration `route_config`."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", route_config)
    if safe != route_config:   # two names that sanitise alike must not share a file
        safe += "-" + hashlib.sha256(route_config.encode()).hexdigest()[:8]
    return f"rds/{safe}.yaml"


# --- YAML text ------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


# Envoy parses YAML with yaml-cpp, which reads these plain scalars as booleans or null
# (YAML 1.1), while PyYAML writes "y", "n", ... unquoted: a header value "y" or a
# principal suffix "n" would reach Envoy as `true`/`false` and the file would be refused.
_YAML_SPECIAL = re.compile(r"^(y|n|yes|no|on|off|true|false|null|~)$", re.IGNORECASE)


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    if not value or _YAML_SPECIAL.match(value):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _represent_str)


def to_yaml(content: Any) -> str:
    """YAML text of a rendered file that Envoy reads back as written: no aliases, PEMs as
    literal blocks, and every string yaml-cpp would take for a bool or null quoted.
    (Writing ``json.dumps(content)`` into the .yaml file is equally safe.)"""
    return yaml.dump(content, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


# --- small builders -------------------------------------------------------------------------------


def _typed(kind: str, **fields: Any) -> dict:
    return {"@type": _TYPE[kind], **fields}


def _file_source(config_dir: str, rel: str) -> dict:
    """A ConfigSource reading `<config_dir>/<rel>`, reloaded on a rename into its directory."""
    path = f"{config_dir.rstrip('/')}/{rel}" if config_dir else rel
    directory = path.rsplit("/", 1)[0] if "/" in path else "."
    return {"path_config_source": {"path": path, "watched_directory": {"path": directory}},
            "resource_api_version": "V3"}


def _discovery(resources: list[dict]) -> dict:
    digest = hashlib.sha256(json.dumps(resources, sort_keys=True).encode()).hexdigest()
    return {"version_info": digest, "resources": resources}


def _percent(pct: float) -> dict:
    """A FractionalPercent in millionths (0.0001 % steps)."""
    value = max(0.0, min(100.0, float(pct)))
    return {"numerator": round(value * 10_000), "denominator": "MILLION"}


def _re2_escape(text: str) -> str:
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", text)


def _raw_buffer() -> dict:
    return {"name": "envoy.transport_sockets.raw_buffer", "typed_config": _typed("raw_buffer")}


def _access_log(path: str, fmt: dict) -> list[dict]:
    return [{"name": "envoy.access_loggers.file",
             "typed_config": _typed("file_log", path=path,
                                    log_format={"json_format": fmt, "omit_empty_values": False})}]


def _sds(name: str, config_dir: str) -> dict:
    return {"name": name, "sds_config": _file_source(config_dir, f"sds/{name}.yaml")}


def _tls_common(config_dir: str, san_matchers: list[dict]) -> dict:
    """TLS 1.3 only, ALPN h2, certificate and roots from SDS, URI SAN matchers on top."""
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3",
                       "tls_maximum_protocol_version": "TLSv1_3"},
        "alpn_protocols": ["h2"],
        "tls_certificate_sds_secret_configs": [_sds(WORKLOAD_SECRET, config_dir)],
        "combined_validation_context": {
            "default_validation_context": {
                "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": m} for m in san_matchers],
            },
            "validation_context_sds_secret_config": _sds(ROOTS_SECRET, config_dir),
        },
    }


def _high_circuit_breakers() -> dict:
    # Envoy's default of 1024 per threshold would turn load into 503 UO; Istio lifts them too.
    return {"thresholds": [{"max_connections": _MAX_U32, "max_pending_requests": _MAX_U32,
                            "max_requests": _MAX_U32, "max_retries": _MAX_U32}]}


# --- bootstrap -------------------------------------------------------------------------------------


def bootstrap(*, node_id: str, config_dir: str, admin_port: int = ADMIN_PORT) -> dict:
    """The static part: admin on 127.0.0.1:`admin_port`, CDS and LDS from
    `<config_dir>/cds.yaml` and `<config_dir>/lds.yaml` (reloaded when a new file is
    renamed into `config_dir`), the internal-listener extension, a downstream connection
    limit (overload manager)."""
    if not node_id or not isinstance(node_id, str):
        raise BadInputError("node_id: a non-empty string is required")
    if not config_dir or not isinstance(config_dir, str):
        raise BadInputError("config_dir: a directory path is required")
    if not isinstance(admin_port, int) or isinstance(admin_port, bool) or not 0 <= admin_port <= 65535:
        raise BadInputError(f"admin_port: {admin_port!r} is not a port 0..65535")
    return {
        "node": {"id": node_id, "cluster": "meshlane-waypoint"},
        "admin": _admin("127.0.0.1", admin_port),
        "dynamic_resources": {
            "cds_config": _file_source(config_dir, "cds.yaml"),
            "lds_config": _file_source(config_dir, "lds.yaml"),
        },
        "bootstrap_extensions": [{"name": "envoy.bootstrap.internal_listener",
                                  "typed_config": _typed("internal_listener")}],
        "overload_manager": {
            "resource_monitors": [{
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": _typed("downstream_connections",
                                       max_active_downstream_connections=MAX_DOWNSTREAM_CONNECTIONS),
            }],
        },
    }


# --- secrets -----------------------------------------------------------------------------------------


def secrets(*, cert_chain_pem: str, key_pem: str, root_pem: str) -> dict[str, dict]:
    """SDS files: ``sds/workload.yaml`` (secret ``workload``: the waypoint's certificate
    chain, leaf first, and key) and ``sds/roots.yaml`` (secret ``roots``: trust anchors).
    Rotating is renaming new versions in (roots first when the CA changes)."""
    for what, pem in (("cert_chain_pem", cert_chain_pem), ("key_pem", key_pem), ("root_pem", root_pem)):
        if not isinstance(pem, str) or "-----BEGIN" not in pem:
            raise BadInputError(f"{what}: not a PEM text")
    workload = {"@type": _TYPE["secret"], "name": WORKLOAD_SECRET,
                "tls_certificate": {"certificate_chain": {"inline_string": cert_chain_pem},
                                    "private_key": {"inline_string": key_pem}}}
    roots = {"@type": _TYPE["secret"], "name": ROOTS_SECRET,
             "validation_context": {"trusted_ca": {"inline_string": root_pem}}}
    return {f"sds/{WORKLOAD_SECRET}.yaml": _discovery([workload]),
            f"sds/{ROOTS_SECRET}.yaml": _discovery([roots])}


# --- render ------------------------------------------------------------------------------------------


class _Ctx:
    """What one render pass has seen: the clusters routes need, the identities they reach."""

    def __init__(self, view: l7.WaypointView, config_dir: str, access_log: str) -> None:
        self.view = view
        self.config_dir = config_dir
        self.access_log = access_log
        self.svc_by_key: dict[str, l7.Service] = {}
        for s in (*view.all_services, *view.services):
            self.svc_by_key.setdefault(s.key, s)
        self.clusters: dict[str, tuple[l7.Service, l7.ServicePort]] = {}

    def cluster_for(self, namespace: str, name: str, port: int) -> str:
        """The cluster name of (Service, port), registering it when the view has both."""
        svc = self.svc_by_key.get(f"{namespace}/{name}")
        sp = svc.port(port) if svc is not None else None
        if svc is None or sp is None:
            return _missing_cluster_name(namespace, name, port)
        cname = cluster_name(svc, port)
        self.clusters.setdefault(cname, (svc, sp))
        return cname


def render(view: l7.WaypointView, *, access_log: str,
           config_dir: str = DEFAULT_CONFIG_DIR) -> dict[str, dict]:
    """Every dynamic file of `view`'s waypoint, keyed by path relative to the config dir:
    ``cds.yaml``, ``lds.yaml`` and one ``rds/<route config>.yaml`` per HTTP (Service, port).
    `access_log` is the file Envoy appends JSON lines to; `config_dir` is how the files
    refer to each other (see the module docstring)."""
    if not access_log or not isinstance(access_log, str):
        raise BadInputError("access_log: a file path is required")
    ctx = _Ctx(view, config_dir, access_log)
    td = view.trust_domain
    files: dict[str, dict] = {}
    chains: list[dict] = []
    vip_ports: dict[str, dict[int, str]] = {}       # VIP -> port -> chain name
    tcp_ports: set[int] = set()                     # ports served only as TCP
    http_ports: set[int] = set()
    for svc in sorted(view.services, key=lambda s: s.key):
        for sp in sorted(svc.ports, key=lambda p: p.port):
            ports = vip_ports.setdefault(str(ipaddress.ip_address(svc.vip)), {})
            if sp.port in ports:
                continue        # two Services cannot share VIP:port; the first one wins
            if sp.http:
                rc = _route_config(ctx, svc, sp)
                files[rds_file(rc["name"])] = _discovery([rc])
                chains.append(_http_chain(ctx, rc["name"]))
                http_ports.add(sp.port)
            else:
                chains.append(_tcp_chain(ctx, _tcp_chain_name(svc, sp.port), _policies_for(view, svc),
                                         ctx.cluster_for(svc.namespace, svc.name, sp.port)))
                tcp_ports.add(sp.port)
            ports[sp.port] = chains[-1]["name"]

    # pod-IP-addressed traffic (waypoint_for workload|all): any port, HTTP told from TCP by
    # the HTTP inspector, one pair of chains per destination identity
    pod_chains: dict[str, tuple[str, list[str]]] = {}     # identity -> (http chain, ips)
    taken = set(vip_ports)
    for w in sorted(view.workloads, key=lambda e: (e.identity, e.ip)):
        ip = str(ipaddress.ip_address(w.ip))
        if ip in taken:
            continue            # a VIP, or a pod listed twice
        taken.add(ip)
        if w.identity not in pod_chains:
            rc = _direct_route_config(view, w.identity)
            files[rds_file(rc["name"])] = _discovery([rc])
            chains.append(_http_chain(ctx, rc["name"], forward_local=True))
            chains.append(_tcp_chain(ctx, _direct_tcp_name(w.identity), _policies_for(view, None),
                                     encap_name(w.identity), forward_local=True))
            pod_chains[w.identity] = (rc["name"], [])
        pod_chains[w.identity][1].append(ip)

    clusters = [_outbound_cluster(ctx, svc, sp, cname) for cname, (svc, sp) in sorted(ctx.clusters.items())]
    identities = sorted({e.identity for _, (svc, _sp) in sorted(ctx.clusters.items())
                         for e in view.endpoints_of(svc.key) if e.hbone} | set(pod_chains))
    listeners = [_connect_terminate(config_dir, td),
                 _main_internal(chains, vip_ports, pod_chains, sniff_off=sorted(tcp_ports - http_ports))]
    listeners += [_connect_originate_listener(i) for i in identities]
    clusters = [_main_internal_cluster(), _blackhole_cluster(),
                *[_connect_originate_cluster(i, config_dir) for i in identities],
                *[_encap_cluster(i) for i in sorted(pod_chains)], *clusters]
    files["cds.yaml"] = _discovery([{"@type": _TYPE["cluster"], **c} for c in clusters])
    files["lds.yaml"] = _discovery([{"@type": _TYPE["listener"], **lst} for lst in listeners])
    return {k: files[k] for k in ["cds.yaml", "lds.yaml", *sorted(k for k in files if k.startswith("rds/"))]}


# --- listeners ---------------------------------------------------------------------------------------


def _set_state(key: str, value: str, factory: str | None = None) -> dict:
    entry: dict[str, Any] = {"object_key": key,
                             "format_string": {"text_format_source": {"inline_string": value}},
                             "shared_with_upstream": "ONCE"}
    if factory:
        entry["factory_key"] = factory
    return entry


def _connect_terminate(config_dir: str, trust_domain: str) -> dict:
    tls = _typed("downstream_tls", require_client_certificate=True,
                 common_tls_context=_tls_common(config_dir, [{"prefix": f"spiffe://{trust_domain}/"}]))
    route_config = {
        "name": CONNECT_TERMINATE,
        "virtual_hosts": [{
            "name": CONNECT_TERMINATE,
            "domains": ["*"],
            "routes": [
                {"name": "connect", "match": {"connect_matcher": {}},
                 "route": {"cluster": MAIN_INTERNAL, "timeout": "0s",
                           "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]}},
                {"name": "not_connect", "match": {"prefix": "/"}, "direct_response": {"status": 400}},
            ],
        }],
    }
    set_state = _typed("set_filter_state", on_request_headers=[
        _set_state(ORIGINAL_DST_LOCAL, "%REQ(:AUTHORITY)%"),
        _set_state(ORIGINAL_DST_REMOTE, "%DOWNSTREAM_REMOTE_ADDRESS%"),
        _set_state(PEER_PRINCIPAL_KEY, "%DOWNSTREAM_PEER_URI_SAN%", "envoy.string"),
    ])
    hcm = _typed(
        "hcm", stat_prefix=CONNECT_TERMINATE, codec_type="HTTP2",
        http2_protocol_options=_h2_options(server=True),
        upgrade_configs=[{"upgrade_type": "CONNECT"}],
        stream_idle_timeout="0s",
        route_config=route_config,
        http_filters=[
            {"name": "envoy.filters.http.set_filter_state", "typed_config": set_state},
            {"name": ROUTER_FILTER, "typed_config": _typed("router")},
        ],
    )
    return {
        "name": CONNECT_TERMINATE,
        "stat_prefix": CONNECT_TERMINATE,
        "address": _socket_address("0.0.0.0", C.PORT_HBONE),
        "filter_chains": [{
            "name": CONNECT_TERMINATE,
            "transport_socket": {"name": _TLS_SOCKET, "typed_config": tls},
            "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
        }],
    }


def _original_dst_listener_filter() -> dict:
    return {"name": ORIGINAL_DST_FILTER, "typed_config": _typed("original_dst")}


def _main_internal(chains: list[dict], vip_ports: dict[str, dict[int, str]],
                   pod_chains: dict[str, tuple[str, list[str]]], *, sniff_off: list[int]) -> dict:
    listener: dict[str, Any] = {
        "name": MAIN_INTERNAL,
        "stat_prefix": MAIN_INTERNAL,
        "internal_listener": {},
        "listener_filters": [_original_dst_listener_filter()],
        "filter_chains": chains,
        # A destination that is not served (and a waypoint that serves nothing yet, which
        # Envoy would refuse as a listener without chains) is closed at once.
        "default_filter_chain": {"name": BLACKHOLE, "filters": [{
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": _typed("tcp_proxy", stat_prefix=BLACKHOLE, cluster=BLACKHOLE)}]},
    }
    if chains:
        listener["filter_chain_matcher"] = _chain_matcher(vip_ports, pod_chains)
    if pod_chains:
        inspector: dict[str, Any] = {"name": "envoy.filters.listener.http_inspector",
                                     "typed_config": _typed("http_inspector")}
        if sniff_off:   # a VIP port that is TCP only: no waiting for a server-first protocol
            rules = [{"destination_port_range": {"start": p, "end": p + 1}} for p in sniff_off]
            inspector["filter_disabled"] = rules[0] if len(rules) == 1 else {"or_match": {"rules": rules}}
        listener["listener_filters"].append(inspector)
        listener["listener_filters_timeout"] = _duration(DETECT_TIMEOUT_S)
        listener["continue_on_listener_filters_timeout"] = True
    return listener


def _to_chain(name: str) -> dict:
    return {"action": {"name": name, "typed_config": {"@type": _TYPE["string_value"], "value": name}}}


def _input(kind: str) -> dict:
    return {"name": kind, "typed_config": _typed(kind)}


def _ranges(ips: Iterable[str]) -> list[dict]:
    out = []
    for ip in ips:
        addr = ipaddress.ip_address(ip)
        out.append({"address_prefix": str(addr), "prefix_len": addr.max_prefixlen})
    return out


def _chain_matcher(vip_ports: dict[str, dict[int, str]], pod_chains: dict[str, tuple[str, list[str]]]) -> dict:
    """Destination IP first, then: a VIP's port -> its chain; a pod IP -> the HTTP chain of
    its identity when the HTTP inspector saw HTTP/1.1 or h2c, else the TCP chain.  (The
    filter_chain_match fields cannot express this: they pick the port before the IP, so a
    pod chain for every port would lose to a VIP chain on the same port.)  A matcher-only
    change drains no connection."""
    ranges = []
    for vip in sorted(vip_ports):
        ranges.append({"ranges": _ranges([vip]), "on_match": {"matcher": {"matcher_tree": {
            "input": _input("port_input"),
            "exact_match_map": {"map": {str(p): _to_chain(n) for p, n in sorted(vip_ports[vip].items())}}}}}})
    for identity in sorted(pod_chains):
        http_chain, ips = pod_chains[identity]
        ranges.append({"ranges": _ranges(ips), "on_match": {"matcher": {
            "matcher_tree": {"input": _input("alpn_input"),
                             "exact_match_map": {"map": {"'http/1.1'": _to_chain(http_chain),
                                                         "'h2c'": _to_chain(http_chain)}}},
            "on_no_match": _to_chain(_direct_tcp_name(identity))}}})
    return {"matcher_tree": {"input": _input("ip_input"),
                             "custom_match": {"name": "ip", "typed_config": _typed("ip_matcher",
                                                                                    range_matchers=ranges)}}}


def _forward_local() -> dict:
    """Hand the connection's local address (the pod IP:port original_dst restored) to the
    next internal listener (connect_originate), which dials it: what an encap cluster needs."""
    return {"name": "envoy.filters.network.set_filter_state", "typed_config": _typed(
        "network_set_filter_state", on_new_connection=[_set_state(ORIGINAL_DST_LOCAL, "%DOWNSTREAM_LOCAL_ADDRESS%")])}


def _http_chain(ctx: _Ctx, rc_name: str, *, forward_local: bool = False) -> dict:
    rbac_noop = _typed("rbac")          # no `rules`: the filter does nothing unless a route says so
    hcm = _typed(
        "hcm", stat_prefix=rc_name, codec_type="AUTO",
        rds={"route_config_name": rc_name, "config_source": _file_source(ctx.config_dir, rds_file(rc_name))},
        http_filters=[
            {"name": RBAC_DENY, "typed_config": rbac_noop},
            {"name": RBAC_ALLOW, "typed_config": rbac_noop},
            {"name": FAULT_FILTER, "typed_config": _typed("fault")},
            {"name": RATELIMIT_FILTER, "typed_config": _typed("local_ratelimit", stat_prefix="meshlane_ratelimit")},
            {"name": ROUTER_FILTER, "typed_config": _typed("router")},
        ],
        # the peer is the client (original_dst restored it); never trust X-Forwarded-For
        use_remote_address=True,
        preserve_external_request_id=True,    # the client's x-request-id is the trace's
        normalize_path=True,
        access_log=_access_log(ctx.access_log, HTTP_LOG_FORMAT),
    )
    filters = [_forward_local()] if forward_local else []
    return {"name": rc_name,
            "filters": [*filters, {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}


def _tcp_chain(ctx: _Ctx, name: str, policies: tuple[list[l7.L7Policy], list[l7.L7Policy]], cluster: str,
               *, forward_local: bool = False) -> dict:
    filters = []
    deny, allow = policies
    if deny:
        rules = _rbac_rules("DENY", deny, tcp=True)
        if rules["policies"]:
            filters.append({"name": "envoy.filters.network.rbac",
                            "typed_config": _typed("network_rbac", stat_prefix=f"{name}.deny.", rules=rules)})
    if allow:
        filters.append({"name": "envoy.filters.network.rbac",
                        "typed_config": _typed("network_rbac", stat_prefix=f"{name}.allow.",
                                               rules=_rbac_rules("ALLOW", allow, tcp=True))})
    if forward_local:
        filters.append(_forward_local())
    filters.append({"name": "envoy.filters.network.tcp_proxy",
                    "typed_config": _typed("tcp_proxy", stat_prefix=name, cluster=cluster,
                                           # another endpoint when one cannot be reached
                                           max_connect_attempts=1 + DEFAULT_RETRIES,
                                           access_log=_access_log(ctx.access_log, TCP_LOG_FORMAT))})
    return {"name": name, "filters": filters}


def _connect_originate_listener(identity: str) -> dict:
    name = originate_name(identity)
    return {
        "name": name,
        "stat_prefix": name,
        "internal_listener": {},
        "listener_filters": [_original_dst_listener_filter()],
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": _typed("tcp_proxy", stat_prefix=name, cluster=name,
                                   tunneling_config={"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"}),
        }]}],
    }


# --- clusters ----------------------------------------------------------------------------------------


def _main_internal_cluster() -> dict:
    return {
        "name": MAIN_INTERNAL,
        "type": "STATIC",
        "connect_timeout": _duration(CONNECT_TIMEOUT_S),
        "load_assignment": {"cluster_name": MAIN_INTERNAL, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"envoy_internal_address": {"server_listener_name": MAIN_INTERNAL}}}}]}]},
        "transport_socket": {"name": "envoy.transport_sockets.internal_upstream",
                             "typed_config": _typed("internal_upstream", transport_socket=_raw_buffer())},
        "circuit_breakers": _high_circuit_breakers(),
    }


def _connect_originate_cluster(identity: str, config_dir: str) -> dict:
    name = originate_name(identity)
    tls = _typed("upstream_tls", common_tls_context=_tls_common(config_dir, [{"exact": identity}]))
    return {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": _duration(CONNECT_TIMEOUT_S),
        "original_dst_lb_config": {"upstream_port_override": C.PORT_HBONE},
        "circuit_breakers": _high_circuit_breakers(),
        "typed_extension_protocol_options": {_HTTP_OPTS_KEY: _typed(
            "http_options",
            common_http_protocol_options={"idle_timeout": _duration(C.POOL_IDLE_TIMEOUT_S)},
            explicit_http_config={"http2_protocol_options": _h2_options(server=False)})},
        # No "sni": HBONE sends no server name.
        "transport_socket": {"name": _TLS_SOCKET, "typed_config": tls},
    }


def _blackhole_cluster() -> dict:
    return {"name": BLACKHOLE, "type": "STATIC", "connect_timeout": _duration(CONNECT_TIMEOUT_S),
            "load_assignment": {"cluster_name": BLACKHOLE, "endpoints": []}}


def _encap_cluster(identity: str) -> dict:
    """Into connect_originate|<identity>; the destination is the filter state the chain
    set (`_forward_local`).  HTTP goes upstream in the protocol it came in."""
    name = encap_name(identity)
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": _duration(CONNECT_TIMEOUT_S),
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"envoy_internal_address": {"server_listener_name": originate_name(identity)}}}}]}]},
        "transport_socket": {"name": "envoy.transport_sockets.internal_upstream",
                             "typed_config": _typed("internal_upstream", transport_socket=_raw_buffer())},
        "circuit_breakers": _high_circuit_breakers(),
        "typed_extension_protocol_options": {_HTTP_OPTS_KEY: _typed(
            "http_options", common_http_protocol_options={"idle_timeout": "3600s"},
            use_downstream_protocol_config={"http_protocol_options": {}, "http2_protocol_options": {}})},
    }


def _destination_rule(view: l7.WaypointView, svc: l7.Service) -> l7.DestinationRule | None:
    return next((d for d in sorted(view.destination_rules, key=lambda d: d.key)
                 if d.namespace == svc.namespace and d.service == svc.name), None)


def _endpoint(e: l7.Endpoint, target_port: int) -> dict:
    addr = f"{e.ip}:{target_port}" if ":" not in e.ip else f"[{e.ip}]:{target_port}"
    if not e.hbone:
        return {"endpoint": {"address": _socket_address(str(ipaddress.ip_address(e.ip)), target_port)}}
    return {
        "endpoint": {"address": {"envoy_internal_address": {
            "server_listener_name": originate_name(e.identity), "endpoint_id": addr}}},
        "metadata": {"filter_metadata": {
            ORIGINAL_DST_FILTER: {"local": addr},
            "envoy.transport_socket_match": dict(TUNNEL_MATCH),
        }},
    }


def _outbound_cluster(ctx: _Ctx, svc: l7.Service, sp: l7.ServicePort, name: str) -> dict:
    endpoints = [_endpoint(e, sp.target_port) for e in ctx.view.endpoints_of(svc.key)]
    dr = _destination_rule(ctx.view, svc)
    proto = (sp.app_protocol or sp.name.split("-", 1)[0].lower() or "").lower()
    http_cfg = {"http2_protocol_options": {}} if proto in H2_APP_PROTOCOLS else {"http_protocol_options": {}}
    common: dict[str, Any] = {"idle_timeout": "3600s"}
    breakers = _high_circuit_breakers()
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "lb_policy": "ROUND_ROBIN",
        "connect_timeout": _duration(CONNECT_TIMEOUT_S),
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}] if endpoints else []},
        "circuit_breakers": breakers,
        # plaintext unless the endpoint is an HBONE one (metadata tunnel: hbone)
        "transport_socket": _raw_buffer(),
        "transport_socket_matches": [{
            "name": "hbone",
            "match": dict(TUNNEL_MATCH),
            "transport_socket": {"name": "envoy.transport_sockets.internal_upstream", "typed_config": _typed(
                "internal_upstream",
                passthrough_metadata=[{"kind": {"host": {}}, "name": ORIGINAL_DST_FILTER}],
                transport_socket=_raw_buffer())},
        }],
    }
    if dr is not None:
        th = breakers["thresholds"][0]
        for attr in ("max_connections", "max_pending_requests", "max_requests", "max_retries"):
            if getattr(dr, attr) is not None:
                th[attr] = getattr(dr, attr)
        if dr.max_requests_per_connection is not None:
            common["max_requests_per_connection"] = dr.max_requests_per_connection
        if dr.outlier is not None:
            o = dr.outlier
            od: dict[str, Any] = {
                "interval": _duration(o.interval_s),
                "base_ejection_time": _duration(o.base_ejection_s),
                "max_ejection_percent": o.max_ejection_percent,
                "enforcing_consecutive_5xx": 100 if o.consecutive_5xx else 0,
                "enforcing_consecutive_gateway_failure": 100 if o.consecutive_gateway_errors else 0,
                "enforcing_success_rate": 0,
            }
            if o.consecutive_5xx:
                od["consecutive_5xx"] = o.consecutive_5xx
            if o.consecutive_gateway_errors:
                od["consecutive_gateway_failure"] = o.consecutive_gateway_errors
            cluster["outlier_detection"] = od
    cluster["typed_extension_protocol_options"] = {_HTTP_OPTS_KEY: _typed(
        "http_options", common_http_protocol_options=common, explicit_http_config=http_cfg)}
    return cluster


# --- routes -------------------------------------------------------------------------------------------


def _attached(view: l7.WaypointView, svc: l7.Service, port: int) -> list[l7.HTTPRoute]:
    return [r for r in view.routes if r.namespace == svc.namespace
            and any(p.service == svc.name and p.port in (None, port) for p in r.parents)]


def _created_key(created: str) -> tuple:
    if created.isdigit():
        return (0, int(created), "")
    return (1, 0, created) if created else (2, 0, "")


def _prefix_value(path: str) -> str:
    return path.rstrip("/") or "/"


def _match_precedence(m: l7.RouteMatch) -> tuple:
    rank = {"Exact": 0, "PathPrefix": 1, "RegularExpression": 2}.get(m.path_type, 3)
    length = len(_prefix_value(m.path)) if m.path_type == "PathPrefix" else len(m.path)
    return (rank, -length, 0 if m.method else 1, -len(m.headers), -len(m.query))


def _string_match(sm: l7.StringMatch) -> dict:
    if sm.type == "RegularExpression":
        return {"safe_regex": {"regex": sm.value}}
    return {"exact": sm.value}


def _envoy_match(m: l7.RouteMatch) -> dict:
    out: dict[str, Any] = {}
    if m.path_type == "Exact":
        out["path"] = m.path
    elif m.path_type == "RegularExpression":
        out["safe_regex"] = {"regex": m.path}
    else:
        value = _prefix_value(m.path)
        # path_separated_prefix is element-aware (/foo matches /foo, /foo/x, not /foobar)
        # but refuses "/" and a trailing "/": those become a plain prefix / a stripped value.
        if value == "/":
            out["prefix"] = "/"
        else:
            out["path_separated_prefix"] = value
    headers = [{"name": h.name.lower(), "string_match": _string_match(h)} for h in m.headers]
    if m.method:
        headers.append({"name": ":method", "string_match": {"exact": m.method}})
    if headers:
        out["headers"] = headers
    if m.query:
        out["query_parameters"] = [{"name": q.name, "string_match": _string_match(q)} for q in m.query]
    return out


def _retry_policy(rule: l7.RouteRule | None) -> dict:
    retry = rule.retry if rule is not None else None
    policy: dict[str, Any] = {
        "retry_on": DEFAULT_RETRY_ON,
        "num_retries": DEFAULT_RETRIES,
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                                  "typed_config": _typed("previous_hosts")}],
        "host_selection_retry_max_attempts": "5",
    }
    if retry is not None:
        policy["num_retries"] = retry.attempts
        if retry.codes:
            policy["retry_on"] = DEFAULT_RETRY_ON + ",retriable-status-codes"
            policy["retriable_status_codes"] = list(retry.codes)
        if retry.backoff_s:
            policy["retry_back_off"] = {"base_interval": _duration(retry.backoff_s)}
    if rule is not None and rule.backend_timeout_s:
        policy["per_try_timeout"] = _duration(rule.backend_timeout_s)
    return policy


def _header_mods(mod: l7.HeaderMod) -> tuple[list[dict], list[str]]:
    add = [_header(k, v) for k, v in mod.set]
    add += [{"header": {"key": k, "value": v}, "append_action": "APPEND_IF_EXISTS_OR_ADD"} for k, v in mod.add]
    return add, [h.lower() for h in mod.remove]


def _fault_config(f: l7.Fault) -> dict | None:
    cfg: dict[str, Any] = {}
    if f.abort_status is not None:
        cfg["abort"] = {"http_status": f.abort_status, "percentage": _percent(f.abort_percent)}
    if f.delay_s is not None:
        cfg["delay"] = {"fixed_delay": _duration(f.delay_s), "percentage": _percent(f.delay_percent)}
    return _typed("fault", **cfg) if cfg else None


def _ratelimit_config(rl: l7.RateLimit) -> dict:
    hundred = {"default_value": {"numerator": 100, "denominator": "HUNDRED"},
               "runtime_key": "meshlane_ratelimit_enabled"}
    return _typed(
        "local_ratelimit", stat_prefix="meshlane_ratelimit",
        token_bucket={"max_tokens": rl.requests, "tokens_per_fill": rl.requests,
                      "fill_interval": _duration(rl.per_s)},
        filter_enabled=hundred,
        filter_enforced={**hundred, "runtime_key": "meshlane_ratelimit_enforced"},
        response_headers_to_add=[_header(RATELIMITED_HEADER, "true")],
    )


def _route_entry(ctx: _Ctx, svc: l7.Service, port: int, hr: l7.HTTPRoute | None,
                 rule: l7.RouteRule | None, match: l7.RouteMatch, name: str) -> dict:
    route: dict[str, Any] = {"name": name, "match": _envoy_match(match)}
    if rule is None:          # no HTTPRoute: the Service itself
        route["route"] = {"cluster": ctx.cluster_for(svc.namespace, svc.name, port), "timeout": "0s",
                          "retry_policy": _retry_policy(None)}
        return route
    ns = hr.namespace if hr is not None else svc.namespace
    weighted = [(ctx.cluster_for(ns, b.service, b.port or port), b.weight) for b in rule.backends if b.weight > 0]
    if not weighted:
        route["direct_response"] = {"status": 500}   # Gateway API: no (usable) backend
    else:
        merged: dict[str, int] = {}
        for cname, weight in weighted:   # two refs to one backend: one entry, weights summed
            merged[cname] = merged.get(cname, 0) + weight
        timeout = rule.timeout_s
        if timeout is None and rule.retry is None and rule.backend_timeout_s:
            timeout = rule.backend_timeout_s
        action: dict[str, Any] = {
            "weighted_clusters": {"clusters": [{"name": c, "weight": w} for c, w in merged.items()]},
            "cluster_not_found_response_code": "INTERNAL_SERVER_ERROR",
            "timeout": _duration(timeout) if timeout else "0s",
            "retry_policy": _retry_policy(rule),
        }
        mirrors = []
        for mirror in rule.mirrors:
            mirror_ns = hr.namespace if hr is not None else svc.namespace
            cname = ctx.cluster_for(mirror_ns, mirror.service, mirror.port or port)
            if cname not in ctx.clusters:
                continue      # nothing to mirror to
            pol: dict[str, Any] = {"cluster": cname}
            if mirror.percent < 100:
                pol["runtime_fraction"] = {"default_value": _percent(mirror.percent)}
            mirrors.append(pol)
        if mirrors:
            action["request_mirror_policies"] = mirrors
        route["route"] = action
    req_add, req_rm = _header_mods(rule.request_headers)
    resp_add, resp_rm = _header_mods(rule.response_headers)
    if req_add:
        route["request_headers_to_add"] = req_add
    if req_rm:
        route["request_headers_to_remove"] = req_rm
    if resp_add:
        route["response_headers_to_add"] = resp_add
    if resp_rm:
        route["response_headers_to_remove"] = resp_rm
    per_filter: dict[str, Any] = {}
    if hr is not None and hr.fault is not None and (fc := _fault_config(hr.fault)) is not None:
        per_filter[FAULT_FILTER] = fc
    if hr is not None and hr.rate_limit is not None:
        per_filter[RATELIMIT_FILTER] = _ratelimit_config(hr.rate_limit)
    if per_filter:
        route["typed_per_filter_config"] = per_filter
    return route


def _route_config(ctx: _Ctx, svc: l7.Service, sp: l7.ServicePort) -> dict:
    name = route_config_name(svc, sp.port)
    attached = _attached(ctx.view, svc, sp.port)
    entries = []
    for hr in attached:
        for rule in hr.rules:
            for mi, m in enumerate(rule.matches):
                key = (_match_precedence(m), _created_key(hr.created), hr.namespace, hr.name, rule.index, mi)
                entries.append((key, hr, rule, m, f"{hr.namespace}.{hr.name}.{rule.index}.{mi}"))
    entries.sort(key=lambda e: e[0])
    if entries:
        routes = [_route_entry(ctx, svc, sp.port, hr, rule, m, rname) for _, hr, rule, m, rname in entries]
    else:
        routes = [_route_entry(ctx, svc, sp.port, None, None, l7.RouteMatch(), "default")]
    vhost: dict[str, Any] = {"name": f"{svc.host}:{sp.port}", "domains": ["*"], "routes": routes}
    _authorize(vhost, _policies_for(ctx.view, svc))
    return {"@type": _TYPE["route"], "name": name, "virtual_hosts": [vhost], "validate_clusters": False}


def _direct_route_config(view: l7.WaypointView, identity: str) -> dict:
    """HTTP addressed to a pod IP: no HTTPRoute applies (they attach to Services), only the
    policies that target the Gateway; the request goes on to the address it was sent to."""
    name = direct_route_config_name(identity)
    vhost: dict[str, Any] = {"name": name, "domains": ["*"], "routes": [{
        "name": "direct", "match": {"prefix": "/"},
        "route": {"cluster": encap_name(identity), "timeout": "0s"}}]}
    _authorize(vhost, _policies_for(view, None))
    return {"@type": _TYPE["route"], "name": name, "virtual_hosts": [vhost], "validate_clusters": False}


def _authorize(vhost: dict, policies: tuple[list[l7.L7Policy], list[l7.L7Policy]]) -> None:
    deny, allow = policies
    per_filter = {}
    if deny:
        rules = _rbac_rules("DENY", deny, tcp=False)
        if rules["policies"]:
            per_filter[RBAC_DENY] = _typed("rbac_per_route", rbac={"rules": rules})
    if allow:
        per_filter[RBAC_ALLOW] = _typed("rbac_per_route", rbac={"rules": _rbac_rules("ALLOW", allow, tcp=False)})
    if per_filter:
        vhost["typed_per_filter_config"] = per_filter


# --- L7 authorization ------------------------------------------------------------------------------


def _policies_for(view: l7.WaypointView,
                  svc: l7.Service | None) -> tuple[list[l7.L7Policy], list[l7.L7Policy]]:
    """(DENY, ALLOW) policies in scope of `svc`'s traffic, or of pod-addressed traffic
    (`svc` None): those targeting the Gateway, and those targeting the Service."""
    wp = view.waypoint
    scoped = [p for p in sorted(view.policies, key=lambda p: p.key)
              if any((kind == "Gateway" and name == wp.name and p.namespace == wp.namespace)
                     or (svc is not None and kind == "Service" and name == svc.name
                         and p.namespace == svc.namespace)
                     for kind, name in p.targets)]
    return [p for p in scoped if p.action == "DENY"], [p for p in scoped if p.action == "ALLOW"]


def _istio_string(value: str, *, prefix: str = "") -> dict:
    """Istio's string forms: `*` present, `x*` prefix, `*x` suffix, else exact."""
    if value == "*":
        return {"safe_regex": {"regex": ".+"}}
    if value.endswith("*"):
        return {"prefix": prefix + value[:-1]} if prefix + value[:-1] else {"safe_regex": {"regex": ".+"}}
    if value.startswith("*"):
        return {"suffix": value[1:]}
    return {"exact": prefix + value}


def _principal_matcher(value: str) -> dict:
    return {"filter_state": {"key": PEER_PRINCIPAL_KEY, "string_match": _istio_string(value, prefix="spiffe://")}}


def _namespace_matcher(value: str) -> dict:
    if value == "*":
        ns = "[^/]+"
    elif value.endswith("*"):
        ns = _re2_escape(value[:-1]) + "[^/]*"
    elif value.startswith("*"):
        ns = "[^/]*" + _re2_escape(value[1:])
    else:
        ns = _re2_escape(value)
    return {"filter_state": {"key": PEER_PRINCIPAL_KEY,
                             "string_match": {"safe_regex": {"regex": f"spiffe://[^/]+/ns/{ns}/.*"}}}}


def _cidr(value: str) -> dict:
    net = ipaddress.ip_network(value, strict=False)
    return {"address_prefix": str(net.network_address), "prefix_len": net.prefixlen}


def _or_ids(ids: list[dict]) -> dict:
    return ids[0] if len(ids) == 1 else {"or_ids": {"ids": ids}}


def _and_ids(ids: list[dict]) -> dict:
    if not ids:
        return {"any": True}
    return ids[0] if len(ids) == 1 else {"and_ids": {"ids": ids}}


def _or_rules(rules: list[dict]) -> dict:
    return rules[0] if len(rules) == 1 else {"or_rules": {"rules": rules}}


def _and_rules(rules: list[dict]) -> dict:
    if not rules:
        return {"any": True}
    return rules[0] if len(rules) == 1 else {"and_rules": {"rules": rules}}


def _field_ids(values: Iterable[str], not_values: Iterable[str], make) -> list[dict]:
    """[one-of(values)] and [none-of(not_values)] as principal ids."""
    out = []
    values, not_values = list(values), list(not_values)
    if values:
        out.append(_or_ids([make(v) for v in values]))
    if not_values:
        out.append({"not_id": _or_ids([make(v) for v in not_values])})
    return out


def _field_rules(values: Iterable, not_values: Iterable, make) -> list[dict]:
    out = []
    values, not_values = list(values), list(not_values)
    if values:
        out.append(_or_rules([make(v) for v in values]))
    if not_values:
        out.append({"not_rule": _or_rules([make(v) for v in not_values])})
    return out


def _source_principal(s: l7.L7Source) -> dict:
    ids = _field_ids(s.principals, s.not_principals, _principal_matcher)
    ids += _field_ids(s.namespaces, s.not_namespaces, _namespace_matcher)
    ids += _field_ids(s.ip_blocks, s.not_ip_blocks, lambda c: {"remote_ip": _cidr(c)})
    return _and_ids(ids)


def _header_matcher(name: str, value: str) -> dict:
    if value == "*":
        return {"header": {"name": name, "present_match": True}}
    return {"header": {"name": name, "string_match": _istio_string(value)}}


def _host_matcher(value: str) -> dict:
    """Istio matches hosts case-insensitively, with or without a :port suffix."""
    if value == "*":
        return {"header": {"name": ":authority", "present_match": True}}
    if value.endswith("*"):
        regex = f"(?i){_re2_escape(value[:-1])}.*"
    elif value.startswith("*"):
        regex = f"(?i).*{_re2_escape(value[1:])}(:[0-9]+)?"
    else:
        regex = f"(?i){_re2_escape(value)}(:[0-9]+)?"
    return {"header": {"name": ":authority", "string_match": {"safe_regex": {"regex": regex}}}}


def _path_matcher(value: str) -> dict:
    return {"url_path": {"path": _istio_string(value)}}


def _operation_permission(op: l7.L7Operation, *, tcp: bool) -> dict:
    rules = []
    if not tcp:
        rules += _field_rules(op.methods, op.not_methods, lambda m: _header_matcher(":method", m))
        rules += _field_rules(op.paths, op.not_paths, _path_matcher)
        rules += _field_rules(op.hosts, op.not_hosts, _host_matcher)
    rules += _field_rules(op.ports, op.not_ports, lambda p: {"destination_port": int(p)})
    return _and_rules(rules)


def _http_only(op: l7.L7Operation) -> bool:
    return bool(op.methods or op.not_methods or op.paths or op.not_paths or op.hosts or op.not_hosts)


def _condition(cond: l7.L7Condition, *, tcp: bool) -> tuple[list[dict], list[dict]] | None:
    """(permission rules, principal ids) of one `when` entry; None when TCP cannot see it."""
    key = cond.key
    if key.startswith("request.headers["):
        if tcp:
            return None
        name = key[len("request.headers["):-1].lower()
        return _field_rules(cond.values, cond.not_values, lambda v: _header_matcher(name, v)), []
    if key == "destination.port":
        return _field_rules(cond.values, cond.not_values, lambda p: {"destination_port": int(p)}), []
    if key == "source.principal":
        return [], _field_ids(cond.values, cond.not_values, _principal_matcher)
    if key == "source.namespace":
        return [], _field_ids(cond.values, cond.not_values, _namespace_matcher)
    if key == "source.ip":
        return [], _field_ids(cond.values, cond.not_values, lambda c: {"remote_ip": _cidr(c)})
    if key == "remote.ip":
        return [], _field_ids(cond.values, cond.not_values, lambda c: {"remote_ip": _cidr(c)})
    raise BadInputError(f"AuthorizationPolicy: `when` key {key!r} is not supported by the waypoint")


def _rule_policy(rule: l7.L7Rule, action: str, *, tcp: bool) -> dict | None:
    """One Envoy policy for one Istio rule; None: the rule can never match (an ALLOW rule
    with HTTP-only fields at a TCP port)."""
    ops = list(rule.operations)
    if tcp and action == "ALLOW" and (any(_http_only(op) for op in ops)
                                      or any(c.key.startswith("request.headers[") for c in rule.conditions)):
        return None
    perms, ids = [], []
    if ops:
        perms.append(_or_rules([_operation_permission(op, tcp=tcp) for op in ops]))
    if rule.sources:
        ids.append(_or_ids([_source_principal(s) for s in rule.sources]))
    for cond in rule.conditions:
        got = _condition(cond, tcp=tcp)
        if got is None:
            continue          # DENY at TCP: an HTTP-only `when` is ignored (broader)
        perms += got[0]
        ids += got[1]
    return {"permissions": [_and_rules(perms)], "principals": [_and_ids(ids)]}


def _rbac_rules(action: str, policies: list[l7.L7Policy], *, tcp: bool) -> dict:
    out: dict[str, dict] = {}
    for p in policies:
        for i, rule in enumerate(p.rules):
            pol = _rule_policy(rule, action, tcp=tcp)
            if pol is not None:
                out[f"ns[{p.namespace}]-policy[{p.name}]-rule[{i}]"] = pol
    return {"action": action, "policies": out}
