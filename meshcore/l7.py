"""The L7 model: Services, waypoints and what users attach to them (DESIGN.md §6).

Kubernetes `Service`, Gateway API `Gateway` (class istio-waypoint) and `HTTPRoute`, Istio
`DestinationRule` (circuit breaking) and `AuthorizationPolicy` with `targetRefs` (L7
authorization in the waypoint).  `meshcore.l7parse` turns applied YAML into these
frozen values (every error names the field path); the control plane stores the
normalized objects, the ztunnel reads Services and waypoints to pick where a connection
goes, and `slowpath.waypoint_envoy` renders them into a waypoint's Envoy configuration.

Pure data: no I/O.  Durations are seconds (float); percentages 0-100 (float).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from meshcore import constants as C

SERVICE_CIDR = ipaddress.IPv4Network("10.96.0.0/16")   # VIPs the control plane hands out
WAYPOINT_CLASS = "istio-waypoint"
GATEWAY_API = ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1")
LABEL_WAYPOINT_FOR = "istio.io/waypoint-for"           # on the Gateway: service|workload|all|none
LABEL_GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"   # on a waypoint's pod
WAYPOINT_FOR = ("service", "workload", "all", "none")
ANNOTATION_NODE = "meshlane.io/node"                   # on the Gateway: the lab node to run on

# Fault injection and local rate limiting are HTTPRoute annotations (Gateway API has no
# field for either; Istio users find them in VirtualService `fault` and an EnvoyFilter).
ANN_FAULT_ABORT = "fault.meshlane.io/abort-status"           # "503"
ANN_FAULT_ABORT_PCT = "fault.meshlane.io/abort-percent"      # "100" (default)
ANN_FAULT_DELAY = "fault.meshlane.io/delay"                  # "500ms", "2s"
ANN_FAULT_DELAY_PCT = "fault.meshlane.io/delay-percent"      # "100" (default)
ANN_RATELIMIT_REQUESTS = "ratelimit.meshlane.io/requests"    # "10": token bucket size and refill
ANN_RATELIMIT_PER = "ratelimit.meshlane.io/per"              # "1m" (default "1s"): refill interval
ROUTE_ANNOTATIONS = (ANN_FAULT_ABORT, ANN_FAULT_ABORT_PCT, ANN_FAULT_DELAY, ANN_FAULT_DELAY_PCT,
                     ANN_RATELIMIT_REQUESTS, ANN_RATELIMIT_PER)

HTTP_PROTOCOLS = ("http", "http2", "h2c", "grpc", "grpc-web", "kubernetes.io/h2c")


def service_host(name: str, namespace: str) -> str:
    return f"{name}.{namespace}.svc.cluster.local"


# --- Service ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ServicePort:
    port: int
    target_port: int
    name: str = ""
    app_protocol: str | None = None   # as written (lower-cased); None: not declared

    @property
    def http(self) -> bool:
        """Does the waypoint treat this port as HTTP?  Declared appProtocol first, then
        Istio's port-name convention (`http`, `http-*`, `grpc*`); `tcp` or any other
        declaration means TCP; undeclared ports are HTTP (the waypoint serves HTTP)."""
        proto = self.app_protocol or self.name.split("-", 1)[0].lower() or None
        if proto is None:
            return True
        return proto in HTTP_PROTOCOLS


@dataclass(frozen=True, kw_only=True)
class Service:
    namespace: str
    name: str
    vip: ipaddress.IPv4Address
    ports: tuple[ServicePort, ...]
    selector: tuple[tuple[str, str], ...]     # sorted matchLabels; () selects nothing
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def host(self) -> str:
        return service_host(self.name, self.namespace)

    def port(self, number: int) -> ServicePort | None:
        return next((p for p in self.ports if p.port == number), None)

    def selects(self, namespace: str, labels: dict) -> bool:
        return bool(self.selector) and namespace == self.namespace and \
            all(labels.get(k) == v for k, v in self.selector)

    def label(self, key: str) -> str | None:
        return dict(self.labels).get(key)


# --- waypoints (Gateway, class istio-waypoint) ------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Waypoint:
    namespace: str
    name: str
    waypoint_for: str = "service"       # which traffic it takes: service|workload|all|none
    node: str | None = None             # lab node to run on (annotation); None: the first node

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def service_account(self) -> str:
        return self.name                # as Istio: the waypoint runs as SA <gateway name>

    @property
    def takes_services(self) -> bool:
        return self.waypoint_for in ("service", "all")

    @property
    def takes_workloads(self) -> bool:
        return self.waypoint_for in ("workload", "all")


# --- HTTPRoute ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class StringMatch:
    type: str                 # Exact | RegularExpression (headers, query params)
    name: str
    value: str


@dataclass(frozen=True, kw_only=True)
class RouteMatch:
    path_type: str = "PathPrefix"        # PathPrefix | Exact | RegularExpression
    path: str = "/"
    headers: tuple[StringMatch, ...] = ()
    query: tuple[StringMatch, ...] = ()
    method: str | None = None


@dataclass(frozen=True, kw_only=True)
class Backend:
    service: str              # a Service of the route's namespace
    port: int | None          # None: the parent's port (the port the request came in on)
    weight: int = 1


@dataclass(frozen=True, kw_only=True)
class HeaderMod:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)


@dataclass(frozen=True, kw_only=True)
class Mirror:
    service: str
    port: int | None
    percent: float = 100.0


@dataclass(frozen=True, kw_only=True)
class Retry:
    attempts: int                     # retries after the first try
    codes: tuple[int, ...] = ()       # HTTP statuses that are retried (plus connect failures)
    backoff_s: float | None = None


@dataclass(frozen=True, kw_only=True)
class RouteRule:
    index: int
    matches: tuple[RouteMatch, ...]             # never empty: a rule without matches gets PathPrefix /
    backends: tuple[Backend, ...] = ()          # empty: 500 (Gateway API)
    timeout_s: float | None = None              # timeouts.request: whole request incl. retries
    backend_timeout_s: float | None = None      # timeouts.backendRequest: each try
    retry: Retry | None = None
    request_headers: HeaderMod = field(default_factory=HeaderMod)
    response_headers: HeaderMod = field(default_factory=HeaderMod)
    mirrors: tuple[Mirror, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Fault:
    abort_status: int | None = None
    abort_percent: float = 100.0
    delay_s: float | None = None
    delay_percent: float = 100.0


@dataclass(frozen=True, kw_only=True)
class RateLimit:
    requests: int            # bucket size, refilled to full every `per_s`
    per_s: float = 1.0


@dataclass(frozen=True, kw_only=True)
class ParentRef:
    service: str             # only Services (of the route's namespace) are parents
    port: int | None = None  # None: every port of the Service


@dataclass(frozen=True, kw_only=True)
class HTTPRoute:
    namespace: str
    name: str
    parents: tuple[ParentRef, ...]
    rules: tuple[RouteRule, ...]
    hostnames: tuple[str, ...] = ()
    fault: Fault | None = None
    rate_limit: RateLimit | None = None
    created: str = ""        # creationTimestamp-ish ordering key for ties (the store's revision)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# --- DestinationRule (circuit breaking) --------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Outlier:
    consecutive_5xx: int | None = None
    consecutive_gateway_errors: int | None = None
    interval_s: float = 10.0
    base_ejection_s: float = 30.0
    max_ejection_percent: int = 10


@dataclass(frozen=True, kw_only=True)
class DestinationRule:
    namespace: str
    name: str
    service: str                       # the Service (same namespace) its host names
    max_connections: int | None = None          # connectionPool.tcp.maxConnections
    max_pending_requests: int | None = None     # connectionPool.http.http1MaxPendingRequests
    max_requests: int | None = None             # connectionPool.http.http2MaxRequests
    max_retries: int | None = None              # connectionPool.http.maxRetries
    max_requests_per_connection: int | None = None
    outlier: Outlier | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# --- L7 AuthorizationPolicy (targetRefs) ------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class L7Source:
    """One `from.source` entry: every non-empty field must match (values OR-ed)."""
    principals: tuple[str, ...] = ()        # Istio forms: exact, `*`, `x*`, `*x` (no spiffe://)
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()         # CIDRs (ipBlocks and remoteIpBlocks alike)
    not_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class L7Operation:
    """One `to.operation` entry."""
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()             # Istio forms: exact, `*`, `x*`, `*x`
    not_paths: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class L7Condition:
    key: str                                # request.headers[x-foo], source.principal, ...
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class L7Rule:
    sources: tuple[L7Source, ...] = ()      # empty: any source
    operations: tuple[L7Operation, ...] = ()  # empty: any request
    conditions: tuple[L7Condition, ...] = ()  # all must hold


@dataclass(frozen=True, kw_only=True)
class L7Policy:
    namespace: str
    name: str
    action: str                             # ALLOW | DENY
    targets: tuple[tuple[str, str], ...]    # (kind, name): ("Gateway", wp) or ("Service", svc)
    rules: tuple[L7Rule, ...]               # ALLOW with no rules allows nothing

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# --- what one waypoint's Envoy serves ------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    pod: str                  # namespace/name
    ip: str
    identity: str             # spiffe://... of the pod (HBONE peer to verify)
    hbone: bool = True        # enrolled (reachable over HBONE on 15008); False: plain TCP


@dataclass(frozen=True, kw_only=True)
class WaypointView:
    """Everything the renderer needs for one waypoint, already resolved by the caller."""
    waypoint: Waypoint
    trust_domain: str = C.DEFAULT_TRUST_DOMAIN
    services: tuple[Service, ...] = ()              # the Services this waypoint serves
    all_services: tuple[Service, ...] = ()          # every Service of the namespace (backends)
    endpoints: tuple[tuple[str, tuple[Endpoint, ...]], ...] = ()   # service key -> endpoints
    # enrolled pods whose pod-IP-addressed traffic this waypoint takes (waypoint_for
    # workload|all); `pod`, `ip` and `identity` are used, `hbone` is always True
    workloads: tuple[Endpoint, ...] = ()
    routes: tuple[HTTPRoute, ...] = ()
    destination_rules: tuple[DestinationRule, ...] = ()
    policies: tuple[L7Policy, ...] = ()

    def endpoints_of(self, service_key: str) -> tuple[Endpoint, ...]:
        return dict(self.endpoints).get(service_key, ())


# --- who uses which waypoint (shared by the ztunnel and the waypoint controller) -------------

LABEL_USE_WAYPOINT_NS = "istio.io/use-waypoint-namespace"


def use_waypoint(labels: dict, namespace: str, ns_labels: dict) -> tuple[str, str] | None:
    """(namespace, name) of the waypoint an object asks for: its own
    `istio.io/use-waypoint` label wins (`none` opts out), else its namespace's.
    `istio.io/use-waypoint-namespace` next to the label names another namespace."""
    for lab in (labels, ns_labels):
        name = (lab or {}).get(C.LABEL_USE_WAYPOINT)
        if name is not None:
            if name in ("", "none"):
                return None
            return (lab.get(LABEL_USE_WAYPOINT_NS) or namespace, name)
    return None


def waypoint_for_service(svc: Service, ns_labels: dict,
                         waypoints: dict[str, Waypoint]) -> Waypoint | None:
    """The waypoint that takes traffic addressed to `svc` (its VIP), if any.
    `waypoints` is keyed by `namespace/name`."""
    want = use_waypoint(dict(svc.labels), svc.namespace, ns_labels)
    wp = waypoints.get(f"{want[0]}/{want[1]}") if want else None
    return wp if wp is not None and wp.takes_services else None


def waypoint_for_workload(namespace: str, labels: dict, ns_labels: dict,
                          waypoints: dict[str, Waypoint]) -> Waypoint | None:
    """The waypoint that takes traffic addressed to a pod's own IP, if any."""
    want = use_waypoint(labels, namespace, ns_labels)
    wp = waypoints.get(f"{want[0]}/{want[1]}") if want else None
    return wp if wp is not None and wp.takes_workloads else None
