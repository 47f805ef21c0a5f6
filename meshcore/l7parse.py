"""L7 resources as users apply them: validation, and conversion into `meshcore.l7` values.

Owns the accepted shape of Kubernetes `Service`, Gateway API `Gateway` (class
istio-waypoint) and `HTTPRoute` (GAMMA: attached to Services), Istio `DestinationRule`
(circuit breaking only) and the waypoint's reading of an `AuthorizationPolicy` with
`targetRefs`; the duration formats; and the cross-object checks `apply` runs.

One parser per kind serves both directions:
  - `validate(obj)` at apply time -> (the normalized object the control plane stores,
    warnings).  Normalized = apiVersion, kind, metadata {name, namespace, labels,
    annotations}, spec with defaults filled the way the Kubernetes API server fills them
    (targetPort = port, protocol TCP, path match PathPrefix "/", weight 1, ...); status
    and server-owned metadata are dropped.  validate(validate(x)) == validate(x).
  - `service_of`, `waypoint_of`, `route_of`, `destination_rule_of`, `l7_policy_of` run the
    same parser over a stored object and return the frozen model.
  - `check_l7_policy` (extra checks for a targetRefs AuthorizationPolicy) and `check_refs`
    (routes name Services that exist, with ports they have) complete `apply`.

Errors: BadInputError("<src>: <prefix><field path>: <what is wrong and what is allowed>"),
the first problem only; `prefix` is e.g. "docs[2]." for the third document of a file.
Warnings: "<src>: <Kind> <ns>/<name>: <prefix><path>: <message>".

Must not: do I/O, look at the store, or let any exception but BadInputError escape,
whatever it is given (wrong types anywhere are errors that name the field).

Decisions where Istio / Gateway API leave room or meshlane differs (numbered so the tests
and the renderer can point at them):
  1. HTTPRoute `retry.attempts` defaults to 2 (GEP-1731 leaves it to the implementation;
     istiod uses 2).  `attempts: 0` is kept as Retry(attempts=0): retries disabled.
  2. `timeouts.request`/`backendRequest` of "0s" mean no timeout (None).
  3. A backendRef or mirror backendRef without `port` means "the port the request came in
     on".  Gateway API's CRD refuses a Service reference without a port, so validate()
     warns; check_refs() refuses it unless every parent port exists on the backend.
  4. parentRefs follow Gateway API defaulting: no `kind` means Gateway, no `group` means
     gateway.networking.k8s.io, so a Service parent needs `group: ""` and `kind: Service`
     (istiod ignores anything else as an unsupported parent).  "core" is not accepted as a
     route's group for the same reason; it is accepted in AuthorizationPolicy targetRefs,
     where istiod canonicalizes "" to "core".
  5. DestinationRule integer limits of 0 mean unset (istiod only applies values > 0);
     `maxEjectionPercent: 0` leaves Envoy's default of 10.  `consecutive5xxErrors: 0`
     is kept as 0 (istiod disables that detector).  Durations must be >= 1ms in whole
     milliseconds (istiod's rule).
  6. DestinationRule hosts "<svc>.<ns>" and "<svc>.<ns>.svc" are accepted, with a warning:
     istiod reads a host containing a dot as a full name, so in Istio they would not
     match the Service.
  7. AuthorizationPolicy fields the waypoint cannot enforce (requestPrincipals, trust
     domains, `request.auth.*`, `source.trustDomain`, `destination.ip`, `connection.sni`,
     `experimental.*` keys) fail closed: in an ALLOW the rule is dropped; in a DENY only
     the field (or `when` entry) is dropped, so the DENY is broader, and a `from`/`to`
     entry left with nothing matches anything.  (At L4, authz mirrors istiod instead:
     there an entry with only L7 fields never matches.)  serviceAccounts (and the
     `source.serviceAccount` key) become principals `<trust domain>/ns/<ns>/sa/<sa>`,
     trust domain cluster.local unless l7_policy_of is told otherwise.
"""
from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from fractions import Fraction
from typing import NamedTuple

from meshcore import authz, l7
from meshcore import constants as C
from meshcore.errors import BadInputError

KINDS = ("Service", "Gateway", "HTTPRoute", "DestinationRule")
SERVICE_API = ("v1",)
DESTINATION_RULE_API = ("networking.istio.io/v1", "networking.istio.io/v1beta1",
                        "networking.istio.io/v1alpha3")
GATEWAY_GROUP = "gateway.networking.k8s.io"
MESH_PORTS = (C.PORT_OUTBOUND, C.PORT_INBOUND_PLAIN, C.PORT_HBONE)
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
PATH_TYPES = ("PathPrefix", "Exact", "RegularExpression")
STRING_MATCH_TYPES = ("Exact", "RegularExpression")
SUPPORTED_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror")
# every filter type Gateway API defines, with the field that carries its settings
FILTER_FIELDS = {"RequestHeaderModifier": "requestHeaderModifier",
                 "ResponseHeaderModifier": "responseHeaderModifier",
                 "RequestMirror": "requestMirror", "RequestRedirect": "requestRedirect",
                 "URLRewrite": "urlRewrite", "ExtensionRef": "extensionRef", "CORS": "cors",
                 "ExternalAuth": "externalAuth"}
DEFAULT_RETRY_ATTEMPTS = 2          # decision 1
MAX_RETRY_ATTEMPTS = 100
DEFAULT_WEIGHT = 1
MAX_WEIGHT = 1_000_000
FAULT_PREFIX = "fault.meshlane.io/"
RATELIMIT_PREFIX = "ratelimit.meshlane.io/"
DEFAULT_TRUST_DOMAIN = C.DEFAULT_TRUST_DOMAIN

# metadata the API server owns: accepted (so `kubectl get -o yaml` output applies) and dropped
META_SERVER_FIELDS = ("creationTimestamp", "resourceVersion", "uid", "generation", "managedFields",
                      "selfLink", "finalizers", "ownerReferences", "deletionTimestamp",
                      "deletionGracePeriodSeconds", "generateName")
META_FIELDS = ("name", "namespace", "labels", "annotations")

# `when` keys at the waypoint: enforced, and known to Istio but not enforceable here
L7_WHEN_ENFORCED = ("source.ip", "remote.ip", "source.namespace", "source.principal",
                    "destination.port", "source.serviceAccount")
L7_WHEN_HEADER = "request.headers["
L7_WHEN_UNENFORCED = ("request.auth.principal", "request.auth.audiences", "request.auth.presenter",
                      "source.trustDomain", "destination.ip", "connection.sni")
L7_WHEN_UNENFORCED_PREFIXES = ("request.auth.claims[", "experimental.envoy.filters.")
SOURCE_UNENFORCED = ("requestPrincipals", "notRequestPrincipals", "trustDomains", "notTrustDomains")

_SERVICE_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")             # DNS-1035 label
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")             # DNS-1123 label
_SECTION_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_HOSTNAME = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")                       # RFC 7230 token
_PATH_CHARS = re.compile(r"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|%[0-9a-fA-F]{2})+$")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")                          # tab is allowed
_GW_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")                 # GEP-2257
_DURATION = re.compile(r"^(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ns|us|µs|ms|s|m|h))+$")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNIT = {"ns": Fraction(1, 10**9), "us": Fraction(1, 10**6), "µs": Fraction(1, 10**6),
                  "ms": Fraction(1, 1000), "s": Fraction(1), "m": Fraction(60), "h": Fraction(3600)}
_DECIMAL = re.compile(r"^[0-9]{1,3}(\.[0-9]{1,6})?$")
_COUNT = re.compile(r"^[0-9]{1,9}$")
_METHOD = re.compile(r"^[A-Z][A-Z0-9._-]*$")


# --- plumbing ---------------------------------------------------------------------------------


class _Ctx:
    """Where errors and warnings come from: the file, the document prefix, the object."""

    def __init__(self, src: str, prefix: str, hint: str | None = None):
        self.src, self.prefix, self.hint = src, prefix, hint
        self.what = ""                  # "HTTPRoute demo/r" once the metadata is read
        self.warnings: list[str] = []

    def fail(self, path: str, why: str, hint: str | None = None) -> BadInputError:
        where = f"{self.prefix}{path}" if path else (self.prefix.rstrip(".") or "(document)")
        return BadInputError(f"{self.src}: {where}: {why}", hint=hint or self.hint)

    def warn(self, path: str, msg: str) -> None:
        who = f"{self.what}: " if self.what else ""
        at = f"{self.prefix}{path}: " if path else ""
        self.warnings.append(f"{self.src}: {who}{at}{msg}")


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _desc(v) -> str:
    return "nothing (null)" if v is None else f"{type(v).__name__} {_show(v)}"


def _fields(ctx: _Ctx, path: str, value, allowed: tuple[str, ...],
            unsupported: dict[str, str] | None = None) -> dict:
    """A mapping whose keys are all `allowed`; None is an empty mapping.  Keys in
    `unsupported` are Istio / Gateway API fields meshlane does not implement."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ctx.fail(path, f"expected a mapping, got {_desc(value)}")
    for k in value:
        sub = f"{path}.{k}" if path else str(k)
        if unsupported and k in unsupported:
            raise ctx.fail(sub, f"not supported by meshlane{unsupported[k]}")
        if k not in allowed:
            raise ctx.fail(sub, f"unknown field (allowed here: {', '.join(allowed)})")
    return value


def _list(ctx: _Ctx, path: str, value, *, max_items: int | None = None,
          required: bool = False) -> list:
    if value is None:
        if required:
            raise ctx.fail(path, "required: a non-empty list")
        return []
    if not isinstance(value, list):
        raise ctx.fail(path, f"expected a list, got {_desc(value)}")
    if required and not value:
        raise ctx.fail(path, "must not be empty")
    if max_items is not None and len(value) > max_items:
        raise ctx.fail(path, f"at most {max_items} entries (found {len(value)})")
    return value


def _str(ctx: _Ctx, path: str, value, *, max_len: int = 253, what: str = "a string") -> str:
    if value is None:
        raise ctx.fail(path, f"required: {what}")
    if not isinstance(value, str):
        raise ctx.fail(path, f"expected {what}, got {_desc(value)}")
    if value == "":
        raise ctx.fail(path, f"must not be empty (expected {what})")
    if len(value) > max_len:
        raise ctx.fail(path, f"too long ({len(value)} characters, at most {max_len})")
    return value


def _int(ctx: _Ctx, path: str, value, lo: int, hi: int, *, what: str = "an integer") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        extra = ""
        if isinstance(value, str) and value.strip().isdecimal():
            extra = f" (write {value.strip()} without quotes)"
        elif isinstance(value, float):
            extra = " (no fractions)"
        raise ctx.fail(path, f"expected {what} {lo}-{hi}, got {_desc(value)}{extra}")
    if not lo <= value <= hi:
        raise ctx.fail(path, f"{value} is out of range: expected {what} {lo}-{hi}")
    return value


def _port(ctx: _Ctx, path: str, value) -> int:
    return _int(ctx, path, value, 1, 65535, what="a port number")


def _name(ctx: _Ctx, path: str, value, regex: re.Pattern = authz.NAME_RE,
          rule: str = "lowercase letters, digits, '-' and '.'") -> str:
    if not isinstance(value, str) or not regex.fullmatch(value):
        raise ctx.fail(path, f"{_show(value)} is not a valid name ({rule}; required)")
    return value


def _service_name(ctx: _Ctx, path: str, value) -> str:
    return _name(ctx, path, value, _SERVICE_NAME,
                 "a Service name: lowercase letters, digits and '-', starting with a letter, "
                 "at most 63")


def _string_map(ctx: _Ctx, path: str, value, *, labels: bool) -> dict[str, str]:
    """metadata.labels / annotations or a selector: string keys (label-key syntax) to strings."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ctx.fail(path, f"expected a mapping of strings, got {_desc(value)}")
    out = {}
    for k, v in value.items():
        at = f"{path}[{k}]"          # label keys hold dots and slashes: Kubernetes' bracket form
        if not isinstance(k, str) or not authz.LABEL_KEY_RE.fullmatch(k):
            raise ctx.fail(at, f"{_show(k)} is not a valid key (an optional DNS prefix and '/', "
                               "then at most 63 letters, digits, '-', '_', '.')")
        if not isinstance(v, str):
            raise ctx.fail(at, f"values are strings: quote it (got {_desc(v)})")
        if labels and not authz.LABEL_VALUE_RE.fullmatch(v):
            raise ctx.fail(at, f"{_show(v)} is not a valid label value (at most 63 letters, "
                               "digits, '-', '_', '.', starting and ending alphanumeric)")
        out[k] = v
    return out


def _header_name(ctx: _Ctx, path: str, value, *, modifier: bool = False) -> str:
    name = _str(ctx, path, value, max_len=256, what="an HTTP header name")
    if name.startswith(":"):
        raise ctx.fail(path, f"{name!r}: pseudo-headers (':...') cannot be matched or changed here")
    if not _TOKEN.fullmatch(name):
        raise ctx.fail(path, f"{name!r} is not a valid HTTP header name (letters, digits and "
                             "!#$%&'*+-.^_`|~)")
    if modifier and name.lower() == "host":
        raise ctx.fail(path, "the Host header cannot be changed by a header modifier")
    return name


def _header_value(ctx: _Ctx, path: str, value, *, max_len: int = 4096) -> str:
    text = _str(ctx, path, value, max_len=max_len, what="a string value")
    if _CONTROL.search(text):
        raise ctx.fail(path, "control characters (newlines, NUL, ...) are not allowed in a value")
    return text


def _re2_problem(pattern: str) -> str | None:
    """A construct Python's `re` accepts but Envoy's RE2 does not (lookaround,
    backreferences, atomic groups, conditionals), or None."""
    i, in_class = 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            nxt = pattern[i + 1:i + 2]
            if not in_class and nxt in tuple("123456789"):
                return f"backreference \\{nxt}"
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
            if pattern[i + 1:i + 2] == "]":      # a leading ']' is literal
                i += 1
        elif ch == "(":
            for form, what in (("(?=", "lookahead"), ("(?!", "lookahead"), ("(?<=", "lookbehind"),
                               ("(?<!", "lookbehind"), ("(?P=", "backreference"),
                               ("(?>", "atomic group"), ("(?(", "conditional")):
                if pattern.startswith(form, i):
                    return f"{what} {form}"
        i += 1
    return None


def _regex(ctx: _Ctx, path: str, value, *, max_len: int = 1024) -> str:
    pattern = _str(ctx, path, value, max_len=max_len, what="a regular expression")
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        raise ctx.fail(path, f"{pattern!r} is not a valid regular expression: {exc}") from None
    problem = _re2_problem(pattern)
    if problem:
        raise ctx.fail(path, f"{pattern!r} uses a {problem}, which Envoy's RE2 regex engine "
                             "does not support")
    return pattern


def _cidr(ctx: _Ctx, path: str, value) -> str:
    """An IP or CIDR as istiod reads it (host bits masked), as a CIDR string."""
    text = _str(ctx, path, value, what="an IP address or CIDR")
    try:
        return str(authz.ip_network_of(text))
    except ValueError as exc:
        raise ctx.fail(path, f"bad IP address or CIDR {text!r}: {exc}") from None


# --- durations --------------------------------------------------------------------------------


def _duration(text, what: str) -> Fraction:
    if isinstance(text, bool) or not isinstance(text, str):
        raise BadInputError(f"{what}: expected a duration string such as \"500ms\", \"1.5s\" or "
                            f"\"1m30s\", got {_desc(text)}")
    if text == "0":
        return Fraction(0)
    if len(text) > 64 or not _DURATION.fullmatch(text):
        raise BadInputError(f"{what}: {_show(text)} is not a duration (a number and a unit, "
                            "repeated: \"500ms\", \"1.5s\", \"1m30s\", \"1h\"; units h, m, s, ms, "
                            "us, ns; no sign)")
    return sum((Fraction(num) * _DURATION_UNIT[unit] for num, unit in _DURATION_PART.findall(text)),
               Fraction(0))


def parse_duration(text, *, what: str) -> float:
    """Seconds in a duration written the way Go's time.ParseDuration reads it, which covers
    Gateway API (GEP-2257: "500ms", "1m30s") and Istio ("1.5s", "10s", "1h") forms.
    Negative durations are refused; "0" and "0s" are 0.  `what` starts the error message
    (the file and field path)."""
    return float(_duration(text, what))


def _gw_duration(ctx: _Ctx, path: str, value) -> float:
    """A Gateway API Duration (GEP-2257): 1-4 components of 1-5 digits with h, m, s or ms."""
    where = f"{ctx.src}: {ctx.prefix}{path}"
    if isinstance(value, str) and not _GW_DURATION.fullmatch(value):
        raise ctx.fail(path, f"{_show(value)} is not a Gateway API duration (GEP-2257: 1-4 parts "
                             "of an integer and h, m, s or ms, e.g. \"500ms\", \"10s\", \"1m30s\"; "
                             "no fractions)")
    return float(_duration(value, where))


def _istio_duration(ctx: _Ctx, path: str, value) -> float:
    """An Istio duration: at least 1ms, in whole milliseconds (decision 5)."""
    secs = _duration(value, f"{ctx.src}: {ctx.prefix}{path}")
    if secs < Fraction(1, 1000):
        raise ctx.fail(path, f"{value!r}: must be at least 1ms")
    if (secs * 1000).denominator != 1:
        raise ctx.fail(path, f"{value!r}: only whole milliseconds are supported")
    return float(secs)


# --- the object frame: apiVersion, kind, metadata --------------------------------------------


def _frame(ctx: _Ctx, obj, kind: str, api_versions: tuple[str, ...],
           name_check: Callable = _name) -> tuple[str, str, dict, dict, dict, dict]:
    """-> (namespace, name, labels, annotations, normalized metadata, spec mapping)."""
    if not isinstance(obj, dict):
        raise ctx.fail("", f"expected a mapping (a Kubernetes object), got {_desc(obj)}")
    _fields(ctx, "", obj, ("apiVersion", "kind", "metadata", "spec", "status"))
    if obj.get("kind") != kind:
        raise ctx.fail("kind", f"expected {kind}, got {_show(obj.get('kind'))}")
    if obj.get("apiVersion") not in api_versions:
        raise ctx.fail("apiVersion", f"{_show(obj.get('apiVersion'))} is not a {kind} version "
                                     f"meshlane reads (one of {', '.join(api_versions)})")
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        raise ctx.fail("metadata", f"required: a mapping with at least a name (got {_desc(meta)})")
    _fields(ctx, "metadata", meta, META_FIELDS + META_SERVER_FIELDS)
    name = name_check(ctx, "metadata.name", meta.get("name"))
    ns = meta.get("namespace")
    ns = "default" if ns is None or ns == "" else ns
    if not isinstance(ns, str) or not _DNS_LABEL.fullmatch(ns):
        raise ctx.fail("metadata.namespace", f"{_show(ns)} is not a valid namespace name "
                                             "(lowercase letters, digits and '-', at most 63)")
    labels = _string_map(ctx, "metadata.labels", meta.get("labels"), labels=True)
    annotations = _string_map(ctx, "metadata.annotations", meta.get("annotations"), labels=False)
    ctx.what = f"{kind} {ns}/{name}"
    norm = {"name": name, "namespace": ns, "labels": labels}
    if annotations:
        norm["annotations"] = annotations
    spec = obj.get("spec")
    if spec is None:
        raise ctx.fail("spec", "required")
    if not isinstance(spec, dict):
        raise ctx.fail("spec", f"expected a mapping, got {_desc(spec)}")
    return ns, name, labels, annotations, norm, spec


# --- Service ----------------------------------------------------------------------------------


class _ServiceInfo(NamedTuple):
    namespace: str
    name: str
    vip: ipaddress.IPv4Address | None
    ports: tuple[l7.ServicePort, ...]
    selector: tuple[tuple[str, str], ...]
    labels: tuple[tuple[str, str], ...]


SERVICE_SPEC = ("type", "clusterIP", "clusterIPs", "ports", "selector", "sessionAffinity",
                "ipFamilies", "ipFamilyPolicy", "internalTrafficPolicy", "publishNotReadyAddresses")
SERVICE_SPEC_UNSUPPORTED = {
    k: " (meshlane Services are ClusterIP VIPs inside the mesh)" for k in
    ("externalName", "externalIPs", "loadBalancerIP", "loadBalancerSourceRanges", "loadBalancerClass",
     "externalTrafficPolicy", "healthCheckNodePort", "allocateLoadBalancerNodePorts",
     "sessionAffinityConfig", "trafficDistribution")}
# fields accepted only with the value Kubernetes defaults them to (dropped from the stored object)
SERVICE_SPEC_DEFAULTS = {"sessionAffinity": "None", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                         "internalTrafficPolicy": "Cluster", "publishNotReadyAddresses": False}


def _service(ctx: _Ctx, obj) -> tuple[dict, _ServiceInfo]:
    ctx.hint = "see the Kubernetes Service reference; meshlane reads ClusterIP Services with numeric ports"
    ns, name, labels, _, meta, spec = _frame(ctx, obj, "Service", SERVICE_API, _service_name)
    _fields(ctx, "spec", spec, SERVICE_SPEC, SERVICE_SPEC_UNSUPPORTED)
    for k, want in SERVICE_SPEC_DEFAULTS.items():
        if k in spec and spec[k] is not None and spec[k] != want:
            raise ctx.fail(f"spec.{k}", f"only {want!r} is supported by meshlane (got {_show(spec[k])})")
    typ = spec.get("type")
    if typ not in (None, "ClusterIP"):
        raise ctx.fail("spec.type", f"{_show(typ)} is not supported: meshlane Services are ClusterIP",
                       hint="remove `type` (or write ClusterIP); the VIP is reachable from every "
                            "enrolled pod")
    vip = _cluster_ip(ctx, spec)
    raw_ports = _list(ctx, "spec.ports", spec.get("ports"), required=True)
    ports, norm_ports, names, numbers = [], [], {}, {}
    for i, raw in enumerate(raw_ports):
        sp, norm = _service_port(ctx, f"spec.ports[{i}]", raw)
        if sp.port in numbers:
            raise ctx.fail(f"spec.ports[{i}].port", f"port {sp.port} is already spec.ports[{numbers[sp.port]}]")
        numbers[sp.port] = i
        if sp.name:
            if sp.name in names:
                raise ctx.fail(f"spec.ports[{i}].name", f"name {sp.name!r} is already spec.ports[{names[sp.name]}]")
            names[sp.name] = i
        elif len(raw_ports) > 1:
            raise ctx.fail(f"spec.ports[{i}].name", "required when a Service has more than one port "
                                                    "(as in Kubernetes)")
        ports.append(sp)
        norm_ports.append(norm)
    selector = _string_map(ctx, "spec.selector", spec.get("selector"), labels=True)
    if not selector:
        ctx.warn("spec.selector", "no selector: no endpoints (the VIP will refuse connections)")
    norm_spec = {"type": "ClusterIP", "ports": norm_ports}
    if vip is not None:
        norm_spec["clusterIP"] = str(vip)
    if selector:
        norm_spec["selector"] = selector
    norm_obj = {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": norm_spec}
    return norm_obj, _ServiceInfo(ns, name, vip, tuple(ports), tuple(sorted(selector.items())),
                                  tuple(sorted(labels.items())))


def _cluster_ip(ctx: _Ctx, spec: dict) -> ipaddress.IPv4Address | None:
    raw = spec.get("clusterIP")
    ips = _list(ctx, "spec.clusterIPs", spec.get("clusterIPs"), max_items=1)
    for i, v in enumerate(ips):
        if raw in (None, ""):
            raw = v
        elif v != raw:
            raise ctx.fail(f"spec.clusterIPs[{i}]", f"must equal spec.clusterIP ({raw!r}), got {_show(v)}")
    if raw is None or raw == "":
        return None                      # the control plane allocates one
    path = "spec.clusterIP" if "clusterIP" in spec and spec["clusterIP"] not in (None, "") else "spec.clusterIPs[0]"
    if raw == "None":
        raise ctx.fail(path, "headless Services (clusterIP: None) are not supported by meshlane",
                       hint=f"remove clusterIP: the control plane allocates a VIP from {l7.SERVICE_CIDR}")
    if not isinstance(raw, str):
        raise ctx.fail(path, f"expected an IPv4 address string, got {_desc(raw)}")
    try:
        vip = ipaddress.IPv4Address(raw)
    except ValueError:
        raise ctx.fail(path, f"{raw!r} is not an IPv4 address") from None
    net = l7.SERVICE_CIDR
    if vip not in net or vip in (net.network_address, net.broadcast_address):
        raise ctx.fail(path, f"{vip} is outside the Service range {net} (or is its network or "
                             "broadcast address)",
                       hint="omit clusterIP and the control plane allocates one")
    return vip


def _service_port(ctx: _Ctx, p: str, raw) -> tuple[l7.ServicePort, dict]:
    sp = _fields(ctx, p, raw, ("name", "port", "targetPort", "protocol", "appProtocol"),
                 {"nodePort": " (meshlane Services are ClusterIP only)"})
    name = sp.get("name")
    if name is not None and name != "":
        name = _name(ctx, f"{p}.name", name, _DNS_LABEL, "lowercase letters, digits and '-', at most 63")
    else:
        name = ""
    port = _port(ctx, f"{p}.port", sp.get("port"))
    target = sp.get("targetPort")
    if target is None:
        target = port
    elif isinstance(target, str):
        raise ctx.fail(f"{p}.targetPort", f"{target!r}: meshlane needs a port number here, not a "
                                          "named container port",
                       hint="write the number the app listens on, e.g. targetPort: 8080")
    else:
        target = _port(ctx, f"{p}.targetPort", target)
    if target in MESH_PORTS:
        raise ctx.fail(f"{p}.targetPort" if "targetPort" in sp and sp["targetPort"] is not None else f"{p}.port",
                       f"{target} is a mesh port (15001 outbound, 15006 inbound plaintext, 15008 HBONE) "
                       "that the ztunnel owns inside every enrolled pod; an app cannot listen on it")
    proto = sp.get("protocol")
    if proto not in (None, "TCP"):
        raise ctx.fail(f"{p}.protocol", f"{_show(proto)} is not supported: meshlane carries TCP only")
    app = sp.get("appProtocol")
    if app is not None:
        app = _str(ctx, f"{p}.appProtocol", app, what="a protocol name such as http, http2 or tcp")
        if any(c.isspace() for c in app):
            raise ctx.fail(f"{p}.appProtocol", f"{app!r} must not contain spaces")
    norm = {"port": port, "targetPort": target, "protocol": "TCP"}
    if name:
        norm = {"name": name, **norm}
    if app is not None:
        norm["appProtocol"] = app
    return l7.ServicePort(port=port, target_port=target, name=name,
                          app_protocol=app.lower() if app is not None else None), norm


# --- Gateway (waypoint) --------------------------------------------------------------------------

GATEWAY_SPEC_UNSUPPORTED = {k: " (a waypoint has only its HBONE listener)" for k in
                            ("addresses", "infrastructure", "allowedListeners", "backendTLS", "tls",
                             "defaultScope")}


def _gateway(ctx: _Ctx, obj) -> tuple[dict, l7.Waypoint]:
    ctx.hint = ("a waypoint is {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, "
                "protocol: HBONE}]}; `meshlane waypoint apply` writes one")
    ns, name, labels, annotations, meta, spec = _frame(ctx, obj, "Gateway", l7.GATEWAY_API)
    _fields(ctx, "spec", spec, ("gatewayClassName", "listeners"), GATEWAY_SPEC_UNSUPPORTED)
    cls = spec.get("gatewayClassName")
    if cls != l7.WAYPOINT_CLASS:
        raise ctx.fail("spec.gatewayClassName",
                       f"{_show(cls)}: meshlane runs only waypoints (gatewayClassName: {l7.WAYPOINT_CLASS})",
                       hint="ingress gateways are not part of meshlane; for L7 in the mesh use "
                            "`meshlane waypoint apply -n NS`")
    listeners = _list(ctx, "spec.listeners", spec.get("listeners"), required=True, max_items=64)
    norm_listeners = []
    for i, raw in enumerate(listeners):
        p = f"spec.listeners[{i}]"
        li = _fields(ctx, p, raw, ("name", "port", "protocol", "allowedRoutes"),
                     {"hostname": " on a waypoint listener", "tls": " on a waypoint listener (HBONE is mTLS)"})
        lname = _name(ctx, f"{p}.name", li.get("name"), _SECTION_NAME, "lowercase letters, digits, '-', '.'")
        port = _port(ctx, f"{p}.port", li.get("port"))
        proto = _str(ctx, f"{p}.protocol", li.get("protocol"), what="a protocol")
        if port != C.PORT_HBONE or proto != "HBONE":
            raise ctx.fail(p, f"a waypoint has exactly one listener, {{name: mesh, port: {C.PORT_HBONE}, "
                              f"protocol: HBONE}}; found port {port} protocol {proto}")
        if norm_listeners:
            raise ctx.fail(p, f"a second HBONE listener; a waypoint has exactly one ({C.PORT_HBONE}/HBONE)")
        norm = {"name": lname, "port": port, "protocol": proto}
        if li.get("allowedRoutes") is not None:
            norm["allowedRoutes"] = _allowed_routes(ctx, f"{p}.allowedRoutes", li["allowedRoutes"])
        norm_listeners.append(norm)
    wp_for = labels.get(l7.LABEL_WAYPOINT_FOR, "service")
    if wp_for not in l7.WAYPOINT_FOR:
        raise ctx.fail(f"metadata.labels[{l7.LABEL_WAYPOINT_FOR}]",
                       f"{wp_for!r} is not one of {', '.join(l7.WAYPOINT_FOR)}")
    node = annotations.get(l7.ANNOTATION_NODE)
    if node is not None:
        _name(ctx, f"metadata.annotations[{l7.ANNOTATION_NODE}]", node, rule="a node name of the lab")
    norm_obj = {"apiVersion": obj["apiVersion"], "kind": "Gateway", "metadata": meta,
                "spec": {"gatewayClassName": cls, "listeners": norm_listeners}}
    return norm_obj, l7.Waypoint(namespace=ns, name=name, waypoint_for=wp_for, node=node)


def _allowed_routes(ctx: _Ctx, p: str, raw) -> dict:
    """Checked for shape and kept; it changes nothing (routes attach to Services)."""
    ar = _fields(ctx, p, raw, ("namespaces", "kinds"))
    nss = _fields(ctx, f"{p}.namespaces", ar.get("namespaces"), ("from", "selector"))
    frm = nss.get("from")
    if frm is not None and frm not in ("All", "Same", "Selector", "None"):
        raise ctx.fail(f"{p}.namespaces.from", f"{_show(frm)} is not one of All, Same, Selector, None")
    sel = _fields(ctx, f"{p}.namespaces.selector", nss.get("selector"), ("matchLabels", "matchExpressions"))
    _string_map(ctx, f"{p}.namespaces.selector.matchLabels", sel.get("matchLabels"), labels=True)
    _list(ctx, f"{p}.namespaces.selector.matchExpressions", sel.get("matchExpressions"))
    for i, k in enumerate(_list(ctx, f"{p}.kinds", ar.get("kinds"), max_items=8)):
        kk = _fields(ctx, f"{p}.kinds[{i}]", k, ("group", "kind"))
        _str(ctx, f"{p}.kinds[{i}].kind", kk.get("kind"), what="a kind")
        if kk.get("group") is not None and not isinstance(kk["group"], str):
            raise ctx.fail(f"{p}.kinds[{i}].group", f"expected a string, got {_desc(kk['group'])}")
    return raw


# --- HTTPRoute ----------------------------------------------------------------------------------

GAMMA_HINT = ("in ambient mode routes attach to Services (GAMMA): label the Service (or its namespace) "
              "istio.io/use-waypoint=<waypoint> and write parentRefs: [{group: \"\", kind: Service, "
              "name: <service>, port: <port>}]")


def _route(ctx: _Ctx, obj) -> tuple[dict, l7.HTTPRoute]:
    ctx.hint = "see the Gateway API HTTPRoute reference; meshlane attaches routes to Services (GAMMA)"
    ns, name, _, annotations, meta, spec = _frame(ctx, obj, "HTTPRoute", l7.GATEWAY_API)
    _fields(ctx, "spec", spec, ("parentRefs", "hostnames", "rules"))
    parents = _parent_refs(ctx, spec.get("parentRefs"), ns)
    hostnames = []
    for i, h in enumerate(_list(ctx, "spec.hostnames", spec.get("hostnames"), max_items=16)):
        h = _str(ctx, f"spec.hostnames[{i}]", h, what="a hostname")
        if not _HOSTNAME.fullmatch(h):
            raise ctx.fail(f"spec.hostnames[{i}]", f"{h!r} is not a hostname (lowercase DNS name, "
                                                   "optionally starting with '*.'; no IPs or ports)")
        hostnames.append(h)
    if hostnames:
        ctx.warn("spec.hostnames", "ignored: a route attached to a Service matches every request to it (GAMMA)")
    raw_rules = spec.get("rules")
    if raw_rules is None:
        raw_rules = [{}]                 # Gateway API's default: one rule matching every request
    raw_rules = _list(ctx, "spec.rules", raw_rules, max_items=16, required=True)
    rules, norm_rules, rule_names, total_matches = [], [], {}, 0
    for i, raw in enumerate(raw_rules):
        rule, norm = _route_rule(ctx, i, raw, ns)
        if "name" in norm:
            if norm["name"] in rule_names:
                raise ctx.fail(f"spec.rules[{i}].name", f"{norm['name']!r} is already "
                                                        f"spec.rules[{rule_names[norm['name']]}]")
            rule_names[norm["name"]] = i
        total_matches += len(rule.matches)
        rules.append(rule)
        norm_rules.append(norm)
    if total_matches > 128:
        raise ctx.fail("spec.rules", f"{total_matches} matches in all: a route has at most 128 (Gateway API)")
    fault, rate_limit = _route_annotations(ctx, annotations)
    norm_spec = {"parentRefs": [norm for _, norm in parents], "rules": norm_rules}
    if hostnames:
        norm_spec["hostnames"] = hostnames
    created = (obj.get("metadata") or {}).get("creationTimestamp")
    route = l7.HTTPRoute(namespace=ns, name=name, parents=tuple(p for p, _ in parents),
                         rules=tuple(rules), hostnames=tuple(hostnames), fault=fault,
                         rate_limit=rate_limit, created=created if isinstance(created, str) else "")
    return {"apiVersion": obj["apiVersion"], "kind": "HTTPRoute", "metadata": meta, "spec": norm_spec}, route


def _parent_refs(ctx: _Ctx, value, ns: str) -> list[tuple[l7.ParentRef, dict]]:
    out, seen = [], {}
    for i, raw in enumerate(_list(ctx, "spec.parentRefs", value, required=True, max_items=32)):
        p = f"spec.parentRefs[{i}]"
        r = _fields(ctx, p, raw, ("group", "kind", "namespace", "name", "sectionName", "port"))
        kind, group = r.get("kind"), r.get("group")
        if kind is None or kind == "Gateway":
            why = ("no kind means Gateway (Gateway API's default)" if kind is None else "kind Gateway")
            raise ctx.fail(f"{p}.kind", f"{why}: meshlane has no ingress gateways; in ambient mode an "
                                        "HTTPRoute attaches to a Service", hint=GAMMA_HINT)
        if kind != "Service":
            raise ctx.fail(f"{p}.kind", f"{_show(kind)}: only Service parents are supported", hint=GAMMA_HINT)
        if group is None:
            raise ctx.fail(f"{p}.group", "required for a Service parent: write group: \"\" (without it "
                                         f"Gateway API reads {GATEWAY_GROUP}/Service, which istiod ignores)",
                           hint=GAMMA_HINT)
        if group != "":
            raise ctx.fail(f"{p}.group", f"{_show(group)}: a Service is in the core group, written "
                                         "group: \"\"", hint=GAMMA_HINT)
        svc = _service_name(ctx, f"{p}.name", r.get("name"))
        if r.get("namespace") not in (None, ns):
            raise ctx.fail(f"{p}.namespace", f"{_show(r['namespace'])}: a route attaches to Services of its "
                                             f"own namespace ({ns}) only; consumer routes in another "
                                             "namespace are not supported by meshlane",
                           hint=f"create the HTTPRoute in namespace {r['namespace']}")
        if r.get("sectionName") is not None:
            raise ctx.fail(f"{p}.sectionName", "not supported for Service parents by meshlane; use `port` "
                                               "to attach to one port of the Service")
        port = None if r.get("port") is None else _port(ctx, f"{p}.port", r["port"])
        prev = seen.setdefault(svc, [])
        if port in prev or (prev and (port is None or None in prev)):
            raise ctx.fail(p, f"Service {svc} is already a parent (spec.parentRefs); a Service may appear "
                              "once without a port, or once per port")
        prev.append(port)
        norm = {"group": "", "kind": "Service", "name": svc}
        if r.get("namespace") is not None:
            norm["namespace"] = ns
        if port is not None:
            norm["port"] = port
        out.append((l7.ParentRef(service=svc, port=port), norm))
    return out


def _route_rule(ctx: _Ctx, i: int, raw, ns: str) -> tuple[l7.RouteRule, dict]:
    p = f"spec.rules[{i}]"
    r = _fields(ctx, p, raw, ("name", "matches", "filters", "backendRefs", "timeouts", "retry"),
                {"sessionPersistence": " (session persistence)"})
    norm: dict = {}
    if r.get("name") is not None:
        norm["name"] = _name(ctx, f"{p}.name", r["name"], _SECTION_NAME, "lowercase letters, digits, '-', '.'")
    matches, norm_matches = [], []
    for j, m in enumerate(_list(ctx, f"{p}.matches", r.get("matches"), max_items=64)):
        match, nm = _route_match(ctx, f"{p}.matches[{j}]", m)
        matches.append(match)
        norm_matches.append(nm)
    if not matches:                      # no matches: every request (PathPrefix /)
        matches, norm_matches = [l7.RouteMatch()], [{"path": {"type": "PathPrefix", "value": "/"}}]
    norm["matches"] = norm_matches
    req_mod, resp_mod, mirrors, norm_filters = _filters(ctx, p, r.get("filters"), ns)
    if norm_filters:
        norm["filters"] = norm_filters
    backends, norm_backends = [], []
    for k, b in enumerate(_list(ctx, f"{p}.backendRefs", r.get("backendRefs"), max_items=16)):
        be, nb = _backend_ref(ctx, f"{p}.backendRefs[{k}]", b, ns)
        backends.append(be)
        norm_backends.append(nb)
    norm["backendRefs"] = norm_backends
    if not backends:
        ctx.warn(f"{p}.backendRefs", "no backends: requests matching this rule get 500 (Gateway API)")
    elif not any(b.weight for b in backends):
        ctx.warn(f"{p}.backendRefs", "every weight is 0: requests matching this rule get 500 (Gateway API)")
    timeout = backend_timeout = None
    if r.get("timeouts") is not None:
        t = _fields(ctx, f"{p}.timeouts", r["timeouts"], ("request", "backendRequest"))
        if t.get("request") is not None:
            timeout = _gw_duration(ctx, f"{p}.timeouts.request", t["request"])
        if t.get("backendRequest") is not None:
            backend_timeout = _gw_duration(ctx, f"{p}.timeouts.backendRequest", t["backendRequest"])
        if timeout and backend_timeout and backend_timeout > timeout:
            raise ctx.fail(f"{p}.timeouts.backendRequest",
                           f"{t['backendRequest']} is longer than timeouts.request ({t['request']}); "
                           "each try must fit in the whole request")
        norm["timeouts"] = {k: v for k, v in t.items() if v is not None}
        timeout, backend_timeout = timeout or None, backend_timeout or None     # "0s": no timeout
    retry = None
    if r.get("retry") is not None:
        retry, norm["retry"] = _retry(ctx, f"{p}.retry", r["retry"])
    rule = l7.RouteRule(index=i, matches=tuple(matches), backends=tuple(backends), timeout_s=timeout,
                        backend_timeout_s=backend_timeout, retry=retry, request_headers=req_mod,
                        response_headers=resp_mod, mirrors=tuple(mirrors))
    return rule, norm


def _route_match(ctx: _Ctx, p: str, raw) -> tuple[l7.RouteMatch, dict]:
    m = _fields(ctx, p, raw, ("path", "headers", "queryParams", "method"))
    path = _fields(ctx, f"{p}.path", m.get("path"), ("type", "value"))
    ptype = path.get("type")
    ptype = "PathPrefix" if ptype is None else ptype
    if ptype not in PATH_TYPES:
        raise ctx.fail(f"{p}.path.type", f"{_show(ptype)} is not one of {', '.join(PATH_TYPES)}")
    value = path.get("value")
    value = "/" if value is None else value
    if ptype == "RegularExpression":
        value = _regex(ctx, f"{p}.path.value", value)
    else:
        value = _path_value(ctx, f"{p}.path.value", value, ptype)
    headers = _string_matches(ctx, f"{p}.headers", m.get("headers"), header=True)
    query = _string_matches(ctx, f"{p}.queryParams", m.get("queryParams"), header=False)
    method = m.get("method")
    if method is not None and method not in HTTP_METHODS:
        raise ctx.fail(f"{p}.method", f"{_show(method)} is not one of {', '.join(HTTP_METHODS)} "
                                      "(upper case)")
    norm: dict = {"path": {"type": ptype, "value": value}}
    if headers:
        norm["headers"] = [{"type": s.type, "name": s.name, "value": s.value} for s in headers]
    if query:
        norm["queryParams"] = [{"type": s.type, "name": s.name, "value": s.value} for s in query]
    if method is not None:
        norm["method"] = method
    return l7.RouteMatch(path_type=ptype, path=value, headers=tuple(headers), query=tuple(query),
                         method=method), norm


def _path_value(ctx: _Ctx, p: str, value, ptype: str) -> str:
    """Gateway API's rules for Exact and PathPrefix values."""
    text = _str(ctx, p, value, max_len=1024, what="a path")
    if not text.startswith("/"):
        raise ctx.fail(p, f"{text!r}: a {ptype} path must start with '/'")
    for bad in ("//", "/./", "/../", "%2f", "%2F", "#"):
        if bad in text:
            raise ctx.fail(p, f"{text!r}: a {ptype} path must not contain {bad!r}")
    if text.endswith(("/..", "/.")):
        raise ctx.fail(p, f"{text!r}: a {ptype} path must not end with '/.' or '/..'")
    if not _PATH_CHARS.fullmatch(text):
        raise ctx.fail(p, f"{text!r}: only URL path characters (letters, digits, -._~!$&'()*+,;=:@/ "
                          "and %XX escapes) are allowed")
    return text


def _string_matches(ctx: _Ctx, p: str, value, *, header: bool) -> list[l7.StringMatch]:
    out, seen = [], {}
    for i, raw in enumerate(_list(ctx, p, value, max_items=16)):
        at = f"{p}[{i}]"
        m = _fields(ctx, at, raw, ("type", "name", "value"))
        typ = m.get("type")
        typ = "Exact" if typ is None else typ
        if typ not in STRING_MATCH_TYPES:
            raise ctx.fail(f"{at}.type", f"{_show(typ)} is not one of {', '.join(STRING_MATCH_TYPES)}")
        name = _header_name(ctx, f"{at}.name", m.get("name"))
        key = name.lower() if header else name
        if key in seen:
            raise ctx.fail(f"{at}.name", f"{name!r} is already matched by {p}[{seen[key]}]")
        seen[key] = i
        max_len = 4096 if header else 1024
        if typ == "RegularExpression":
            val = _regex(ctx, f"{at}.value", m.get("value"), max_len=max_len)
        else:
            val = _header_value(ctx, f"{at}.value", m.get("value"), max_len=max_len)
        out.append(l7.StringMatch(type=typ, name=name, value=val))
    return out


def _backend_ref(ctx: _Ctx, p: str, raw, ns: str) -> tuple[l7.Backend, dict]:
    b = _fields(ctx, p, raw, ("group", "kind", "name", "namespace", "port", "weight", "filters"))
    svc, port, norm = _object_ref(ctx, p, b, ns)
    weight = b.get("weight")
    if weight is None:
        weight = DEFAULT_WEIGHT
    elif isinstance(weight, bool) or not isinstance(weight, int):
        raise ctx.fail(f"{p}.weight", f"weights must be integers 0-{MAX_WEIGHT}; got {_desc(weight)}"
                                      + (" (write it without quotes)" if isinstance(weight, str) else ""))
    elif not 0 <= weight <= MAX_WEIGHT:
        raise ctx.fail(f"{p}.weight", f"weights must be integers 0-{MAX_WEIGHT}; {weight} is out of range")
    if _list(ctx, f"{p}.filters", b.get("filters")):
        raise ctx.fail(f"{p}.filters", "per-backend filters are not supported by meshlane; put the filter "
                                       "on the rule (spec.rules[].filters)")
    norm["weight"] = weight
    return l7.Backend(service=svc, port=port, weight=weight), norm


def _object_ref(ctx: _Ctx, p: str, b: dict, ns: str) -> tuple[str, int | None, dict]:
    """A Gateway API BackendObjectReference to a Service of the route's namespace."""
    group, kind = b.get("group"), b.get("kind")
    if group not in (None, ""):
        raise ctx.fail(f"{p}.group", f"{_show(group)}: only Services (the core group, group: \"\") are "
                                     "backends in meshlane")
    if kind not in (None, "Service"):
        raise ctx.fail(f"{p}.kind", f"{_show(kind)}: only kind Service is supported as a backend")
    svc = _service_name(ctx, f"{p}.name", b.get("name"))
    if b.get("namespace") not in (None, ns):
        raise ctx.fail(f"{p}.namespace", f"{_show(b['namespace'])}: backends must be in the route's own "
                                         f"namespace ({ns}); cross-namespace references need a "
                                         "ReferenceGrant, which meshlane does not support")
    port = None if b.get("port") is None else _port(ctx, f"{p}.port", b["port"])
    if port is None:                     # decision 3
        ctx.warn(f"{p}.port", "no port: meshlane uses the port the request came in on, but Gateway API "
                              "requires a port for a Service reference (a Kubernetes cluster would "
                              "refuse this route)")
    norm: dict = {"group": "", "kind": "Service", "name": svc}
    if b.get("namespace") is not None:
        norm["namespace"] = ns
    if port is not None:
        norm["port"] = port
    return svc, port, norm


def _filters(ctx: _Ctx, p: str, value, ns: str):
    """-> (request HeaderMod, response HeaderMod, mirrors, normalized filters)."""
    req, resp, mirrors, norm, seen = l7.HeaderMod(), l7.HeaderMod(), [], [], {}
    for k, raw in enumerate(_list(ctx, f"{p}.filters", value, max_items=16)):
        fp = f"{p}.filters[{k}]"
        f = _fields(ctx, fp, raw, ("type",) + tuple(FILTER_FIELDS.values()))
        typ = f.get("type")
        if not isinstance(typ, str) or typ not in FILTER_FIELDS:
            raise ctx.fail(f"{fp}.type", f"{_show(typ)} is not a Gateway API filter type "
                                         f"(meshlane supports {', '.join(SUPPORTED_FILTERS)})")
        if typ not in SUPPORTED_FILTERS:
            raise ctx.fail(f"{fp}.type", f"filter type {typ} is not supported by meshlane (supported: "
                                         f"{', '.join(SUPPORTED_FILTERS)})")
        field = FILTER_FIELDS[typ]
        for other in f:
            if other not in ("type", field):
                raise ctx.fail(f"{fp}.{other}", f"does not go with type {typ} (which takes `{field}`)")
        if f.get(field) is None:
            raise ctx.fail(f"{fp}.{field}", f"required for type {typ}")
        if typ != "RequestMirror":
            if typ in seen:
                raise ctx.fail(f"{fp}.type", f"{typ} is already {p}.filters[{seen[typ]}]; it may appear once")
            seen[typ] = k
            mod = _header_mod(ctx, f"{fp}.{field}", f[field])
            if typ == "RequestHeaderModifier":
                req = mod
            else:
                resp = mod
        else:
            mirrors.append(_mirror(ctx, f"{fp}.{field}", f[field], ns))
        norm.append({"type": typ, field: f[field]})
    return req, resp, mirrors, norm


def _header_mod(ctx: _Ctx, p: str, raw) -> l7.HeaderMod:
    hm = _fields(ctx, p, raw, ("set", "add", "remove"))
    seen: dict[str, str] = {}

    def once(at: str, name: str) -> None:
        key = name.lower()
        if key in seen:
            raise ctx.fail(at, f"header {name!r} is already changed by {seen[key]}; one action per header")
        seen[key] = at

    pairs = {}
    for action in ("set", "add"):
        out = []
        for i, h in enumerate(_list(ctx, f"{p}.{action}", hm.get(action), max_items=16)):
            at = f"{p}.{action}[{i}]"
            h = _fields(ctx, at, h, ("name", "value"))
            name = _header_name(ctx, f"{at}.name", h.get("name"), modifier=True)
            once(f"{at}.name", name)
            out.append((name, _header_value(ctx, f"{at}.value", h.get("value"))))
        pairs[action] = tuple(out)
    remove = []
    for i, name in enumerate(_list(ctx, f"{p}.remove", hm.get("remove"), max_items=16)):
        name = _header_name(ctx, f"{p}.remove[{i}]", name, modifier=True)
        once(f"{p}.remove[{i}]", name)
        remove.append(name)
    return l7.HeaderMod(set=pairs["set"], add=pairs["add"], remove=tuple(remove))


def _mirror(ctx: _Ctx, p: str, raw, ns: str) -> l7.Mirror:
    mm = _fields(ctx, p, raw, ("backendRef", "percent", "fraction"))
    if mm.get("backendRef") is None:
        raise ctx.fail(f"{p}.backendRef", "required: the Service to mirror to")
    br = _fields(ctx, f"{p}.backendRef", mm["backendRef"], ("group", "kind", "name", "namespace", "port"))
    svc, port, _ = _object_ref(ctx, f"{p}.backendRef", br, ns)
    if mm.get("percent") is not None and mm.get("fraction") is not None:
        raise ctx.fail(p, "set percent or fraction, not both")
    percent = 100.0
    if mm.get("percent") is not None:
        percent = float(_int(ctx, f"{p}.percent", mm["percent"], 0, 100, what="a percentage"))
    elif mm.get("fraction") is not None:
        fr = _fields(ctx, f"{p}.fraction", mm["fraction"], ("numerator", "denominator"))
        num = _int(ctx, f"{p}.fraction.numerator", fr.get("numerator"), 0, 2**31 - 1)
        den = fr.get("denominator")
        den = 100 if den is None else _int(ctx, f"{p}.fraction.denominator", den, 1, 2**31 - 1)
        if num > den:
            raise ctx.fail(f"{p}.fraction", f"numerator {num} is larger than denominator {den}")
        percent = 100.0 * num / den
    return l7.Mirror(service=svc, port=port, percent=percent)


def _retry(ctx: _Ctx, p: str, raw) -> tuple[l7.Retry, dict]:
    rt = _fields(ctx, p, raw, ("codes", "attempts", "backoff"))
    codes = []
    for i, c in enumerate(_list(ctx, f"{p}.codes", rt.get("codes"), max_items=200)):
        c = _int(ctx, f"{p}.codes[{i}]", c, 400, 599, what="an HTTP status")
        if c in codes:
            raise ctx.fail(f"{p}.codes[{i}]", f"{c} is listed twice")
        codes.append(c)
    attempts = rt.get("attempts")
    attempts = DEFAULT_RETRY_ATTEMPTS if attempts is None else \
        _int(ctx, f"{p}.attempts", attempts, 0, MAX_RETRY_ATTEMPTS, what="a number of retries")
    backoff = None
    if rt.get("backoff") is not None:
        backoff = _gw_duration(ctx, f"{p}.backoff", rt["backoff"])
        if backoff < 0.001:
            raise ctx.fail(f"{p}.backoff", f"{rt['backoff']!r}: a backoff is at least 1ms (Envoy needs a "
                                           "positive base interval)")
    norm = {k: v for k, v in rt.items() if v is not None}
    return l7.Retry(attempts=attempts, codes=tuple(codes), backoff_s=backoff), norm


def _route_annotations(ctx: _Ctx, ann: dict) -> tuple[l7.Fault | None, l7.RateLimit | None]:
    """Fault injection and local rate limiting (meshlane annotations, see meshcore.l7)."""
    for k in ann:
        if k.startswith((FAULT_PREFIX, RATELIMIT_PREFIX)) and k not in l7.ROUTE_ANNOTATIONS:
            raise ctx.fail(f"metadata.annotations[{k}]", "unknown meshlane annotation (known: "
                                                         f"{', '.join(l7.ROUTE_ANNOTATIONS)})")

    def at(k: str) -> str:
        return f"metadata.annotations[{k}]"

    def percent(k: str) -> float:
        v = ann[k]
        if not _DECIMAL.fullmatch(v) or float(v) > 100:
            raise ctx.fail(at(k), f"{v!r} is not a percentage 0-100 (e.g. \"50\" or \"12.5\")")
        return float(v)

    def duration(k: str) -> float:
        secs = parse_duration(ann[k], what=f"{ctx.src}: {ctx.prefix}{at(k)}")
        if secs <= 0:
            raise ctx.fail(at(k), f"{ann[k]!r}: must be longer than 0")
        return secs

    fault = None
    abort = delay = None
    if l7.ANN_FAULT_ABORT in ann:
        v = ann[l7.ANN_FAULT_ABORT]
        if not _COUNT.fullmatch(v) or not 200 <= int(v) <= 599:
            raise ctx.fail(at(l7.ANN_FAULT_ABORT), f"{v!r} is not an HTTP status 200-599")
        abort = int(v)
    if l7.ANN_FAULT_DELAY in ann:
        delay = duration(l7.ANN_FAULT_DELAY)
    for pct, needs in ((l7.ANN_FAULT_ABORT_PCT, l7.ANN_FAULT_ABORT), (l7.ANN_FAULT_DELAY_PCT, l7.ANN_FAULT_DELAY)):
        if pct in ann and needs not in ann:
            raise ctx.fail(at(pct), f"needs {needs} next to it (a percentage of what?)")
    if abort is not None or delay is not None:
        fault = l7.Fault(abort_status=abort,
                         abort_percent=percent(l7.ANN_FAULT_ABORT_PCT) if l7.ANN_FAULT_ABORT_PCT in ann else 100.0,
                         delay_s=delay,
                         delay_percent=percent(l7.ANN_FAULT_DELAY_PCT) if l7.ANN_FAULT_DELAY_PCT in ann else 100.0)
    rate = None
    if l7.ANN_RATELIMIT_PER in ann and l7.ANN_RATELIMIT_REQUESTS not in ann:
        raise ctx.fail(at(l7.ANN_RATELIMIT_PER), f"needs {l7.ANN_RATELIMIT_REQUESTS} next to it")
    if l7.ANN_RATELIMIT_REQUESTS in ann:
        v = ann[l7.ANN_RATELIMIT_REQUESTS]
        if not _COUNT.fullmatch(v) or int(v) < 1:
            raise ctx.fail(at(l7.ANN_RATELIMIT_REQUESTS), f"{v!r} is not a positive whole number of requests")
        per = duration(l7.ANN_RATELIMIT_PER) if l7.ANN_RATELIMIT_PER in ann else 1.0
        rate = l7.RateLimit(requests=int(v), per_s=per)
    return fault, rate


# --- DestinationRule -------------------------------------------------------------------------------

_NOT_DR = " (meshlane's DestinationRule covers connectionPool and outlierDetection only)"
DR_SPEC_UNSUPPORTED = {k: _NOT_DR for k in ("subsets", "exportTo", "workloadSelector")}
DR_POLICY_UNSUPPORTED = {k: _NOT_DR for k in ("loadBalancer", "tls", "portLevelSettings", "tunnel",
                                              "proxyProtocol", "retryBudget")}
DR_TCP_UNSUPPORTED = {k: "" for k in ("tcpKeepalive", "maxConnectionDuration", "idleTimeout")}
DR_HTTP_UNSUPPORTED = {k: "" for k in ("idleTimeout", "h2UpgradePolicy", "useClientProtocol",
                                       "maxConcurrentStreams", "http2KeepAlive")}
DR_OUTLIER_UNSUPPORTED = {"minHealthPercent": "", "splitExternalLocalOriginErrors": "",
                          "consecutiveLocalOriginFailures": "",
                          "consecutiveErrors": " (deprecated in Istio; use consecutive5xxErrors)",
                          "outlierDetectionHttpErrorCodes": ""}
_MAX_U32 = 2**32 - 1


def _destination_rule(ctx: _Ctx, obj) -> tuple[dict, l7.DestinationRule]:
    ctx.hint = "see Istio's DestinationRule reference (meshlane: connectionPool and outlierDetection)"
    ns, name, _, _, meta, spec = _frame(ctx, obj, "DestinationRule", DESTINATION_RULE_API)
    _fields(ctx, "spec", spec, ("host", "trafficPolicy"), DR_SPEC_UNSUPPORTED)
    svc = _dr_host(ctx, spec.get("host"), ns)
    tp = _fields(ctx, "spec.trafficPolicy", spec.get("trafficPolicy"), ("connectionPool", "outlierDetection"),
                 DR_POLICY_UNSUPPORTED)
    limits: dict = {}
    if tp.get("connectionPool") is not None:
        cp_path = "spec.trafficPolicy.connectionPool"
        cp = _fields(ctx, cp_path, tp["connectionPool"], ("tcp", "http"))
        if cp.get("tcp") is None and cp.get("http") is None:
            raise ctx.fail(cp_path, "set tcp or http (an empty connection pool says nothing)")
        tcp = _fields(ctx, f"{cp_path}.tcp", cp.get("tcp"), ("maxConnections", "connectTimeout"),
                      DR_TCP_UNSUPPORTED)
        http = _fields(ctx, f"{cp_path}.http", cp.get("http"),
                       ("http1MaxPendingRequests", "http2MaxRequests", "maxRequestsPerConnection", "maxRetries"),
                       DR_HTTP_UNSUPPORTED)
        for sect, key, attr in ((tcp, "tcp.maxConnections", "max_connections"),
                                (http, "http.http1MaxPendingRequests", "max_pending_requests"),
                                (http, "http.http2MaxRequests", "max_requests"),
                                (http, "http.maxRetries", "max_retries"),
                                (http, "http.maxRequestsPerConnection", "max_requests_per_connection")):
            v = sect.get(key.split(".")[1])
            if v is not None:
                v = _int(ctx, f"{cp_path}.{key}", v, 0, 2**31 - 1)
                limits[attr] = v or None          # decision 5: 0 is unset
        if tcp.get("connectTimeout") is not None:
            _istio_duration(ctx, f"{cp_path}.tcp.connectTimeout", tcp["connectTimeout"])
            ctx.warn(f"{cp_path}.tcp.connectTimeout", "accepted but not applied yet (the waypoint uses its "
                                                      "default connect timeout)")
    outlier = None
    if tp.get("outlierDetection") is not None:
        op = "spec.trafficPolicy.outlierDetection"
        od = _fields(ctx, op, tp["outlierDetection"], ("consecutive5xxErrors", "consecutiveGatewayErrors",
                                                       "interval", "baseEjectionTime", "maxEjectionPercent"),
                     DR_OUTLIER_UNSUPPORTED)
        kw: dict = {}
        for key, attr in (("consecutive5xxErrors", "consecutive_5xx"),
                          ("consecutiveGatewayErrors", "consecutive_gateway_errors")):
            if od.get(key) is not None:
                kw[attr] = _int(ctx, f"{op}.{key}", od[key], 0, _MAX_U32)
        for key, attr in (("interval", "interval_s"), ("baseEjectionTime", "base_ejection_s")):
            if od.get(key) is not None:
                kw[attr] = _istio_duration(ctx, f"{op}.{key}", od[key])
        if od.get("maxEjectionPercent") is not None:
            pct = _int(ctx, f"{op}.maxEjectionPercent", od["maxEjectionPercent"], 0, 100, what="a percentage")
            if pct:                              # decision 5: 0 keeps Envoy's default (10)
                kw["max_ejection_percent"] = pct
        outlier = l7.Outlier(**kw)
    norm_spec = {"host": spec["host"]}
    if spec.get("trafficPolicy") is not None:
        norm_spec["trafficPolicy"] = _drop_nulls(spec["trafficPolicy"])
    norm_obj = {"apiVersion": obj["apiVersion"], "kind": "DestinationRule", "metadata": meta, "spec": norm_spec}
    return norm_obj, l7.DestinationRule(namespace=ns, name=name, service=svc, outlier=outlier, **limits)


def _drop_nulls(v):
    if isinstance(v, dict):
        return {k: _drop_nulls(x) for k, x in v.items() if x is not None}
    return v


def _dr_host(ctx: _Ctx, host, ns: str) -> str:
    text = _str(ctx, "spec.host", host, what="a Service host such as reviews or "
                                             f"reviews.{ns}.svc.cluster.local")
    parts = text.split(".")
    svc = parts[0]
    forms = {1: (), 2: (ns,), 3: (ns, "svc"), 5: (ns, "svc", "cluster", "local")}
    if "*" in text:
        raise ctx.fail("spec.host", f"{text!r}: wildcard hosts are not supported by meshlane; name one Service")
    if len(parts) in (2, 3, 5) and parts[1] != ns and tuple(parts[2:]) == forms[len(parts)][1:]:
        raise ctx.fail("spec.host", f"{text!r} names a Service in namespace {parts[1]}; a DestinationRule "
                                    f"applies to Services of its own namespace ({ns})",
                       hint=f"create the DestinationRule in namespace {parts[1]}")
    if len(parts) not in forms or tuple(parts[1:]) != forms[len(parts)] or not _SERVICE_NAME.fullmatch(svc):
        raise ctx.fail("spec.host", f"{text!r} is not a Service of this namespace: write <service> or "
                                    f"<service>.{ns}.svc.cluster.local")
    if len(parts) in (2, 3):                     # decision 6
        ctx.warn("spec.host", f"{text!r}: istiod reads a host with a dot as a full name, so in Istio this "
                              f"would not match Service {ns}/{svc}; write {svc} or {l7.service_host(svc, ns)}")
    return svc


# --- validate and the read-side conversions ----------------------------------------------------

_PARSERS = {"Service": _service, "Gateway": _gateway, "HTTPRoute": _route,
            "DestinationRule": _destination_rule}


def validate(obj, *, src: str, prefix: str = "") -> tuple[dict, list[str]]:
    """Validate one applied Service, Gateway, HTTPRoute or DestinationRule.

    Returns (the normalized object to store, warnings).  Raises BadInputError naming the
    field path for the first problem, including for any other kind."""
    ctx = _Ctx(src, prefix)
    if not isinstance(obj, dict):
        raise ctx.fail("", f"expected a mapping (a Kubernetes object), got {_desc(obj)}")
    kind = obj.get("kind")
    if not isinstance(kind, str) or kind not in _PARSERS:
        raise ctx.fail("kind", f"{_show(kind)} is not one of the L7 kinds ({', '.join(KINDS)})")
    norm, _ = _PARSERS[kind](ctx, obj)
    return norm, ctx.warnings


def _stored(kind: str, obj):
    ctx = _Ctx("store", "")
    if not isinstance(obj, dict) or obj.get("kind") != kind:
        raise ctx.fail("kind", f"expected a stored {kind}, got {_desc(obj.get('kind') if isinstance(obj, dict) else obj)}")
    return _PARSERS[kind](ctx, obj)[1]


def service_of(obj: dict) -> l7.Service:
    """The model of a stored Service (its spec.clusterIP must be set: the control plane
    allocates one at apply)."""
    info = _stored("Service", obj)
    if info.vip is None:
        raise BadInputError(f"store: Service {info.namespace}/{info.name}: spec.clusterIP: not set yet",
                            hint="Services get their VIP when applied through the control plane")
    return l7.Service(namespace=info.namespace, name=info.name, vip=info.vip, ports=info.ports,
                      selector=info.selector, labels=info.labels)


def waypoint_of(obj: dict) -> l7.Waypoint:
    """The model of a stored Gateway of class istio-waypoint."""
    return _stored("Gateway", obj)


def route_of(obj: dict) -> l7.HTTPRoute:
    """The model of a stored HTTPRoute; `created` is its metadata.creationTimestamp or ""."""
    return _stored("HTTPRoute", obj)


def destination_rule_of(obj: dict) -> l7.DestinationRule:
    return _stored("DestinationRule", obj)


# --- AuthorizationPolicy at the waypoint (targetRefs) ----------------------------------------------


def _target_refs(ctx: _Ctx, spec: dict) -> list[tuple[str, str]]:
    refs = []
    if spec.get("targetRef") is not None:
        refs.append(("spec.targetRef", spec["targetRef"]))
    refs += [(f"spec.targetRefs[{i}]", r) for i, r in enumerate(_list(ctx, "spec.targetRefs", spec.get("targetRefs")))]
    out = []
    for path, r in refs:
        r = _fields(ctx, path, r, ("group", "kind", "name", "namespace"))
        kind, group = r.get("kind"), r.get("group")
        if group is not None and not isinstance(group, str):
            raise ctx.fail(f"{path}.group", f"expected a string, got {_desc(group)}")
        if r.get("namespace") not in (None, ""):
            raise ctx.fail(f"{path}.namespace", "must not be set: a policy targets objects of its own "
                                                "namespace (cross-namespace targetRefs are refused by "
                                                "istiod too)")
        if kind == "Gateway":
            if group != GATEWAY_GROUP:
                raise ctx.fail(f"{path}.group", f"{_show(group)}: a Gateway target needs group: {GATEWAY_GROUP}")
        elif kind == "Service":
            if group not in (None, "", "core"):
                raise ctx.fail(f"{path}.group", f"{_show(group)}: a Service target is in the core group "
                                                "(group: \"\" or omitted)")
        else:
            raise ctx.fail(f"{path}.kind", f"{_show(kind)}: meshlane's waypoints enforce policies that "
                                           f"target a Gateway ({GATEWAY_GROUP}) or a Service",
                           hint="target the waypoint (kind: Gateway) or a Service that uses it")
        name = _name(ctx, f"{path}.name", r.get("name"))
        if (kind, name) not in out:
            out.append((kind, name))
    return out


def _principals_of_sas(ctx: _Ctx, path: str, values: list, ns: str, td: str) -> tuple[str, ...]:
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, str) or not v or "*" in v or v.count("/") > 1 \
                or v.startswith("/") or v.endswith("/"):
            raise ctx.fail(f"{path}[{i}]", f"expected 'serviceAccount' or 'namespace/serviceAccount' "
                                           f"without wildcards, found {_show(v)}")
        sa_ns, sep, sa = v.partition("/")
        out.append(f"{td}/ns/{sa_ns}/sa/{sa}" if sep else f"{td}/ns/{ns}/sa/{v}")
    return tuple(out)


def _strs(value) -> list:
    return value if isinstance(value, list) else []


def _check_methods(ctx: _Ctx, path: str, values: list) -> None:
    for i, v in enumerate(values):
        core = v[1:] if v.startswith("*") else v.removesuffix("*")
        if v != "*" and not _METHOD.fullmatch(core):
            raise ctx.fail(f"{path}[{i}]", f"{v!r} is not an HTTP method: methods match case-sensitively "
                                           "and are written in upper case (GET, POST, ...)")


def _check_paths(ctx: _Ctx, path: str, values: list) -> None:
    for i, v in enumerate(values):
        if not v.startswith(("/", "*")):
            raise ctx.fail(f"{path}[{i}]", f"{v!r}: a path starts with '/' (exact, or 'x*' for a prefix) or "
                                           "with '*' (a suffix, or '*' alone for any path)")
        if "{" in v or "}" in v:
            raise ctx.fail(f"{path}[{i}]", f"{v!r}: path templates ({{*}}, {{**}}) are not supported by meshlane")
        if _CONTROL.search(v) or " " in v:
            raise ctx.fail(f"{path}[{i}]", f"{v!r}: spaces and control characters cannot appear in a path")


def _l7_source(ctx: _Ctx, path: str, src: dict, ns: str, td: str) -> tuple[l7.L7Source, list[str]]:
    """-> (the entry without unenforceable fields, the paths of the fields left out)."""
    def vals(k: str) -> list:
        return _strs(src.get(k))
    ip = tuple(_cidr(ctx, f"{path}.{k}[{i}]", v) for k in ("ipBlocks", "remoteIpBlocks")
               for i, v in enumerate(vals(k)))
    not_ip = tuple(_cidr(ctx, f"{path}.{k}[{i}]", v) for k in ("notIpBlocks", "notRemoteIpBlocks")
                   for i, v in enumerate(vals(k)))
    entry = l7.L7Source(
        principals=tuple(vals("principals")) + _principals_of_sas(ctx, f"{path}.serviceAccounts",
                                                                  vals("serviceAccounts"), ns, td),
        not_principals=tuple(vals("notPrincipals")) + _principals_of_sas(ctx, f"{path}.notServiceAccounts",
                                                                         vals("notServiceAccounts"), ns, td),
        namespaces=tuple(vals("namespaces")), not_namespaces=tuple(vals("notNamespaces")),
        ip_blocks=ip, not_ip_blocks=not_ip)
    return entry, [f"{path}.{k}" for k in SOURCE_UNENFORCED if vals(k)]


def _l7_operation(ctx: _Ctx, path: str, op: dict) -> l7.L7Operation:
    def vals(k: str) -> list:
        return _strs(op.get(k))
    for k in ("methods", "notMethods"):
        _check_methods(ctx, f"{path}.{k}", vals(k))
    for k in ("paths", "notPaths"):
        _check_paths(ctx, f"{path}.{k}", vals(k))
    return l7.L7Operation(methods=tuple(vals("methods")), not_methods=tuple(vals("notMethods")),
                          paths=tuple(vals("paths")), not_paths=tuple(vals("notPaths")),
                          hosts=tuple(vals("hosts")), not_hosts=tuple(vals("notHosts")),
                          ports=tuple(int(p) for p in vals("ports")),
                          not_ports=tuple(int(p) for p in vals("notPorts")))


def _l7_condition(ctx: _Ctx, path: str, cond: dict, ns: str, td: str) -> l7.L7Condition | None:
    """None: a key the waypoint cannot enforce."""
    key = cond.get("key")
    values, not_values = _strs(cond.get("values")), _strs(cond.get("notValues"))
    if key in L7_WHEN_UNENFORCED or key.startswith(L7_WHEN_UNENFORCED_PREFIXES):
        return None
    if key.startswith(L7_WHEN_HEADER):
        _header_name(ctx, f"{path}.key", key[len(L7_WHEN_HEADER):-1])
    elif key in ("source.ip", "remote.ip"):
        values = [_cidr(ctx, f"{path}.values[{i}]", v) for i, v in enumerate(values)]
        not_values = [_cidr(ctx, f"{path}.notValues[{i}]", v) for i, v in enumerate(not_values)]
    elif key == "source.serviceAccount":
        key = "source.principal"
        values = _principals_of_sas(ctx, f"{path}.values", values, ns, td)
        not_values = _principals_of_sas(ctx, f"{path}.notValues", not_values, ns, td)
    elif key not in L7_WHEN_ENFORCED:
        raise ctx.fail(f"{path}.key", f"unknown attribute {key!r} (the waypoint supports "
                                      f"{', '.join(L7_WHEN_ENFORCED)} and request.headers[<name>])")
    return l7.L7Condition(key=key, values=tuple(values), not_values=tuple(not_values))


def _l7_policy(obj, *, src: str, prefix: str, td: str) -> tuple[l7.L7Policy | None, list[str]]:
    """The waypoint's reading of one policy and its warnings; (None, []) without targetRefs."""
    try:
        parsed = authz.parse(obj, src=src, prefix=prefix)   # shape, CIDRs, ports, `when` keys
    except (ValueError, TypeError, KeyError, AttributeError) as exc:   # authz lets a few through
        where = prefix.rstrip(".") or "(document)"
        raise BadInputError(f"{src}: {where}: not a valid AuthorizationPolicy "
                            f"({type(exc).__name__}: {exc})") from None
    obj = parsed.object
    meta, spec = obj["metadata"], obj.get("spec") or {}
    ns, name = meta.get("namespace") or "default", meta["name"]
    ctx = _Ctx(src, prefix, hint="see Istio's AuthorizationPolicy reference; at a waypoint target a "
                                 "Gateway or a Service")
    ctx.what = f"AuthorizationPolicy {ns}/{name}"
    targets = _target_refs(ctx, spec)
    if not targets:
        return None, []
    action = spec.get("action") or "ALLOW"
    rules: list[l7.L7Rule] = []
    for i, raw in enumerate(spec.get("rules") or []):
        rp = f"spec.rules[{i}]"
        raw = raw or {}
        unenforced: list[str] = []
        sources: list[l7.L7Source] | None = []
        for j, e in enumerate(raw.get("from") or []):
            entry, left_out = _l7_source(ctx, f"{rp}.from[{j}].source", e["source"], ns, td)
            unenforced += left_out
            if sources is not None and entry == l7.L7Source():
                sources = None          # an entry with nothing left matches any source (decision 7)
            elif sources is not None:
                sources.append(entry)
        operations = [_l7_operation(ctx, f"{rp}.to[{j}].operation", e["operation"])
                      for j, e in enumerate(raw.get("to") or [])]
        conditions = []
        for j, c in enumerate(raw.get("when") or []):
            cond = _l7_condition(ctx, f"{rp}.when[{j}]", c, ns, td)
            if cond is None:
                unenforced.append(f"{rp}.when[{j}] (key {c['key']})")
            else:
                conditions.append(cond)
        rule = l7.L7Rule(sources=tuple(sources or ()), operations=tuple(operations),
                         conditions=tuple(conditions))
        if unenforced:
            fields = ", ".join(prefix + f for f in unenforced)
            if action == "ALLOW":
                ctx.warn("", f"rule {i} dropped: the waypoint cannot enforce {fields} (no request "
                             "authentication or trust-domain checks in meshlane); the ALLOW is narrower "
                             "than written")
                continue
            if action == "DENY":
                ctx.warn("", f"rule {i}: the waypoint cannot enforce {fields}; ignored, so the DENY is "
                             "broader than written")
        rules.append(rule)
    dry_run = (meta.get("annotations") or {}).get(authz.DRY_RUN)
    if isinstance(dry_run, str) and authz.go_bool(dry_run):   # read as istiod does (ParseBool)
        ctx.warn("", "istio.io/dry-run is set: the waypoint does not enforce dry-run policies; ignored")
        return None, ctx.warnings
    if action in ("AUDIT", "CUSTOM"):
        ctx.warn("", f"action {action} is not supported by meshlane's waypoint; this policy is ignored"
                     + (" (requests are NOT sent to the external authorizer)" if action == "CUSTOM" else ""))
        return None, ctx.warnings
    return l7.L7Policy(namespace=ns, name=name, action=action, targets=tuple(targets),
                       rules=tuple(rules)), ctx.warnings


def check_l7_policy(obj: dict, *, src: str, prefix: str = "") -> list[str]:
    """Checks for an AuthorizationPolicy with targetRefs beyond authz.parse (which it also
    runs): targets are Gateways or Services, methods and paths are well formed, `when` keys
    are ones the waypoint knows.  Returns warnings for what the waypoint cannot enforce."""
    return _l7_policy(obj, src=src, prefix=prefix, td=DEFAULT_TRUST_DOMAIN)[1]


def l7_policy_of(obj: dict, *, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> l7.L7Policy | None:
    """The waypoint's model of a stored AuthorizationPolicy; None when it has no
    targetRefs, is a dry run, or its action is AUDIT or CUSTOM (decision 7 for the rest)."""
    return _l7_policy(obj, src="store", prefix="", td=trust_domain)[0]


# --- cross-object checks at apply ----------------------------------------------------------------


def _ident(o) -> tuple[str, str, str] | None:
    """(kind, namespace, name) of an object, or None when it has no usable identity."""
    if not isinstance(o, dict) or not isinstance(o.get("metadata"), dict):
        return None
    kind, meta = o.get("kind"), o["metadata"]
    ns, name = meta.get("namespace") or "default", meta.get("name")
    if not all(isinstance(x, str) for x in (kind, ns, name)):
        return None
    return kind, ns, name


class _World:
    """What `check_refs` needs from the objects the store will hold after the apply."""

    def __init__(self, objs: list):
        self.services: dict[tuple[str, str], _ServiceInfo | None] = {}   # None: exists, did not parse
        self.gateways: set[tuple[str, str]] = set()
        self.ns_labels: dict[str, dict] = {}
        self.routes: list[dict] = []
        for o in objs:
            ident = _ident(o)
            if ident is None:
                continue
            kind, ns, name = ident
            if kind == "Namespace":
                labels = o["metadata"].get("labels")
                ok = isinstance(labels, dict) and all(isinstance(v, str) for v in labels.values())
                self.ns_labels[name] = labels if ok else {}
            elif kind == "Service":
                try:
                    self.services[(ns, name)] = _service(_Ctx("store", ""), o)[1]
                except BadInputError:
                    self.services[(ns, name)] = None
            elif kind == "Gateway":
                self.gateways.add((ns, name))
            elif kind == "HTTPRoute":
                self.routes.append(o)

    def ports(self, ns: str, name: str) -> set[int] | None:
        info = self.services.get((ns, name))
        return None if info is None else {p.port for p in info.ports}


def _route_refs(world: _World, route: l7.HTTPRoute, mirror_filters: dict[int, tuple[int, ...]],
                fail: Callable[[str, str, str | None], None], warn: Callable[[str], None]) -> None:
    """Every problem of one route: errors go to `fail(path, why, hint)`, notes to `warn`.
    `mirror_filters[i]` are the indexes of rule i's RequestMirror filters (for paths)."""
    ns = route.namespace

    def missing(path: str, svc: str) -> None:
        fail(path, f"Service {ns}/{svc} does not exist",
             f"apply the Service first (or in the same file); see `meshlane get services -n {ns}`")

    parent_ports: list[set[int] | None] = []     # per parent, the ports requests arrive on
    for i, pr in enumerate(route.parents):
        path = f"spec.parentRefs[{i}]"
        if (ns, pr.service) not in world.services:
            missing(f"{path}.name", pr.service)
            continue
        have = world.ports(ns, pr.service)
        if pr.port is not None and have is not None and pr.port not in have:
            fail(f"{path}.port", f"Service {ns}/{pr.service} has no port {pr.port} (it has "
                                 f"{', '.join(map(str, sorted(have)))})", None)
            continue
        parent_ports.append({pr.port} if pr.port is not None else have)
        info = world.services[(ns, pr.service)]
        if info is not None:
            wp = l7.use_waypoint(dict(info.labels), ns, world.ns_labels.get(ns, {}))
            if wp is None:
                warn(f"{path}.name: Service {ns}/{pr.service} does not use a waypoint (label it or namespace "
                     f"{ns} {C.LABEL_USE_WAYPOINT}=<waypoint>), so this route has no effect yet")
            elif wp not in world.gateways:
                warn(f"{path}.name: Service {ns}/{pr.service} asks for waypoint {wp[0]}/{wp[1]}, which does "
                     "not exist yet (`meshlane waypoint apply`)")

    def backend(path: str, svc: str, port: int | None) -> None:
        if (ns, svc) not in world.services:
            missing(f"{path}.name", svc)
            return
        have = world.ports(ns, svc)
        if have is None:
            return
        if port is not None:
            if port not in have:
                fail(f"{path}.port", f"Service {ns}/{svc} has no port {port} (it has "
                                     f"{', '.join(map(str, sorted(have)))})", None)
            return
        needed = set().union(*(p for p in parent_ports if p is not None)) if parent_ports else set()
        lacking = sorted(needed - have)
        if lacking:
            fail(f"{path}.port", f"no port given, so requests keep the port they came in on, but Service "
                                 f"{ns}/{svc} has no port {', '.join(map(str, lacking))}",
                 "give the backend an explicit port")

    for i, rule in enumerate(route.rules):
        for j, b in enumerate(rule.backends):
            backend(f"spec.rules[{i}].backendRefs[{j}]", b.service, b.port)
        for k, m in zip(mirror_filters.get(i, ()), rule.mirrors):
            backend(f"spec.rules[{i}].filters[{k}].requestMirror.backendRef", m.service, m.port)


def check_refs(new: list[dict], world: list[dict], *, src: str) -> list[str]:
    """Cross-object checks at apply time.  `new` are the normalized objects being applied
    (in file order), `world` every object the store will hold after the apply.  Raises
    BadInputError for an HTTPRoute whose parents or backends are missing Services or ports
    those Services lack; returns warnings for DestinationRules and AuthorizationPolicies
    naming objects that do not exist, and for stored routes the apply breaks."""
    w = _World(world if isinstance(world, list) else [])
    new = new if isinstance(new, list) else []
    warnings: list[str] = []
    idents = [_ident(o) for o in new]
    new_keys = {k for k in idents if k is not None}
    new_services = {(ns, name) for kind, ns, name in new_keys if kind == "Service"}
    for i, (o, ident) in enumerate(zip(new, idents)):
        if ident is None:
            continue
        where = f"docs[{i}]: " if len(new) > 1 else ""
        kind, ns, name = ident
        label = f"{src}: {where}{kind} {ns}/{name}"
        if kind == "HTTPRoute":
            route, mirrors = _route_for_refs(o, f"docs[{i}]." if len(new) > 1 else "", src)

            def fail(path, why, hint, label=label):
                raise BadInputError(f"{label}: {path}: {why}", hint=hint)
            _route_refs(w, route, mirrors, fail, lambda msg, label=label: warnings.append(f"{label}: {msg}"))
        elif kind == "DestinationRule":
            spec = o.get("spec")
            host = spec.get("host") if isinstance(spec, dict) else None
            svc = host.split(".")[0] if isinstance(host, str) else None
            if svc and (ns, svc) not in w.services:
                warnings.append(f"{label}: spec.host: Service {ns}/{svc} does not exist (yet); the rule "
                                "applies once it does")
        elif kind == authz.KIND:
            try:
                spec = o.get("spec")
                targets = _target_refs(_Ctx(src, ""), spec if isinstance(spec, dict) else {})
            except BadInputError:
                continue
            for tkind, tname in targets:
                exists = (ns, tname) in (w.gateways if tkind == "Gateway" else w.services)
                if not exists:
                    warnings.append(f"{label}: targets {tkind} {ns}/{tname}, which does not exist (yet); "
                                    "the policy is enforced once it does")
    # routes already stored that this apply breaks (a Service lost a port, ...): warnings only
    for o in w.routes:
        _, ns, name = _ident(o)
        if ("HTTPRoute", ns, name) in new_keys:
            continue
        try:
            route, mirrors = _route_for_refs(o, "", src)
        except BadInputError:
            continue
        named = {p.service for p in route.parents} | {b.service for r in route.rules for b in r.backends} \
            | {m.service for r in route.rules for m in r.mirrors}
        if not any((ns, s) in new_services for s in named):
            continue
        label = f"{src}: HTTPRoute {ns}/{name} (stored)"
        _route_refs(w, route, mirrors, lambda path, why, hint, label=label: warnings.append(
            f"{label}: {path}: {why}; requests it routes there will fail"),
            lambda msg: None)
    return warnings


def _route_for_refs(obj: dict, prefix: str, src: str) -> tuple[l7.HTTPRoute, dict[int, tuple[int, ...]]]:
    """A route, and for each rule the indexes of its RequestMirror filters (the model keeps
    mirrors in filter order but not their positions, which error paths need)."""
    _, route = _route(_Ctx(src, prefix), obj)
    idx = {}
    for i, raw in enumerate(obj["spec"].get("rules") or []):
        filters = (raw or {}).get("filters") or []
        idx[i] = tuple(k for k, f in enumerate(filters) if f.get("type") == "RequestMirror")
    return route, idx
