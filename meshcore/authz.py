"""L4 authorization: Istio AuthorizationPolicy as istiod + ztunnel enforce it (DESIGN.md §6).

One model, three users: `meshlane apply` validates with it, the ztunnel evaluates it per
connection (slowpath), and the node agent compiles it into kernel maps (fastpath).

Shape (the same as istiod hands to ztunnel): a `Policy` has rules; each Istio rule
becomes clauses (one for `to`, one for `from`, one per `when` entry); a clause is a
list of `Match` entries.  A rule matches iff every clause matches, a clause iff any of
its entries matches, and an entry whose L4 fields are all empty never matches.  L7
fields never reach the model: in an ALLOW a rule that names one is dropped whole, in a
DENY only the field is dropped (`parse` reports each as a warning).  Its scope is
istiod's too: any `spec.selector`, even `{}`, makes a workload-selector policy, and one
without a label map is in scope for no workload; `istio.io/dry-run` is read with Go's
strconv.ParseBool.

Pure: no I/O.  Errors are BadInputError naming the source, the field path and the reason.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Iterable

from meshcore import constants as C
from meshcore.errors import BadInputError
from meshcore.identity import SpiffeId

KIND = "AuthorizationPolicy"
API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")

IpNet = ipaddress.IPv4Network | ipaddress.IPv6Network

# --- string matching ------------------------------------------------------------------


@dataclass(frozen=True)
class StrMatch:
    """Istio's string forms: `*` present, `*x` suffix, `x*` prefix, otherwise exact."""
    kind: str    # exact | prefix | suffix | presence
    value: str = ""

    @classmethod
    def parse(cls, text: str) -> "StrMatch":
        if text == "*":
            return cls("presence")
        if text.startswith("*"):
            return cls("suffix", text[1:])
        if text.endswith("*"):
            return cls("prefix", text[:-1])
        return cls("exact", text)

    def matches(self, s: str) -> bool:
        if self.kind == "presence":
            return s != ""
        if self.kind == "prefix":
            return s.startswith(self.value)
        if self.kind == "suffix":
            return s.endswith(self.value)
        return s == self.value

    def __str__(self) -> str:
        return {"presence": "*", "prefix": f"{self.value}*", "suffix": f"*{self.value}"}.get(
            self.kind, self.value)


@dataclass(frozen=True)
class SaMatch:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


# --- connections ------------------------------------------------------------------------


@dataclass(frozen=True)
class Conn:
    """What a decision is about.  `src_identity` is None for a plaintext peer."""
    src_ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst_ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst_port: int
    src_identity: SpiffeId | None = None

    @property
    def principal(self) -> str | None:
        i = self.src_identity
        return None if i is None else f"{i.trust_domain}/ns/{i.namespace}/sa/{i.service_account}"


# --- the model --------------------------------------------------------------------------

_MATCH_FIELDS = ("principals", "not_principals", "namespaces", "not_namespaces",
                 "service_accounts", "not_service_accounts", "source_ips", "not_source_ips",
                 "destination_ips", "not_destination_ips", "ports", "not_ports")


@dataclass(frozen=True)
class Match:
    """One entry of a clause: every non-empty field must match."""
    principals: tuple[StrMatch, ...] = ()
    not_principals: tuple[StrMatch, ...] = ()
    namespaces: tuple[StrMatch, ...] = ()
    not_namespaces: tuple[StrMatch, ...] = ()
    service_accounts: tuple[SaMatch, ...] = ()
    not_service_accounts: tuple[SaMatch, ...] = ()
    source_ips: tuple[IpNet, ...] = ()
    not_source_ips: tuple[IpNet, ...] = ()
    destination_ips: tuple[IpNet, ...] = ()
    not_destination_ips: tuple[IpNet, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()

    def empty(self) -> bool:
        return not any(getattr(self, f) for f in _MATCH_FIELDS)

    @staticmethod
    def _field(pos: tuple, neg: tuple, pred) -> bool:
        return (not pos or any(pred(v) for v in pos)) and not any(pred(v) for v in neg)

    def matches(self, c: Conn) -> bool:
        ident = c.src_identity
        principal = c.principal
        ns = ident.namespace if ident else ""
        # a plaintext peer has no principal: every principal comparison is false (ztunnel
        # compares against the SPIFFE URI, which a plaintext peer does not have)
        return (self._field(self.destination_ips, self.not_destination_ips, lambda n: c.dst_ip in n)
                and self._field(self.source_ips, self.not_source_ips, lambda n: c.src_ip in n)
                and self._field(self.ports, self.not_ports, lambda p: p == c.dst_port)
                and self._field(self.service_accounts, self.not_service_accounts,
                                lambda s: ident is not None and s.namespace == ident.namespace
                                and s.name == ident.service_account)
                and self._field(self.principals, self.not_principals,
                                lambda m: principal is not None and m.matches(principal))
                and self._field(self.namespaces, self.not_namespaces, lambda m: m.matches(ns)))

    def to_json(self) -> dict:
        out = {}
        for f in _MATCH_FIELDS:
            vals = getattr(self, f)
            if vals:
                out[_camel(f)] = [v if isinstance(v, int) else str(v) for v in vals]
        return out


@dataclass(frozen=True)
class Rule:
    index: int                          # position in spec.rules (for counters and messages)
    clauses: tuple[tuple[Match, ...], ...]

    def matches(self, c: Conn) -> bool:
        return all(any(not m.empty() and m.matches(c) for m in clause) if clause else True
                   for clause in self.clauses)


SCOPES = ("Global", "Namespace", "WorkloadSelector")


@dataclass(frozen=True)
class Policy:
    """Scope and selector as istiod hands them to ztunnel: `spec.selector` present (even
    `{}`) -> WorkloadSelector, else Global in the root namespace and Namespace elsewhere.
    A WorkloadSelector policy applies to the workloads its label map selects: `selector`
    holds `matchLabels` sorted, `()` for `matchLabels: {}` (selects every workload) and
    None when there is no label map at all (`selector: {}`: attached to no workload)."""
    namespace: str
    name: str
    action: str                         # ALLOW | DENY (AUDIT / CUSTOM never reach the model)
    scope: str                          # one of SCOPES
    selector: tuple[tuple[str, str], ...] | None
    rules: tuple[Rule, ...]
    root_namespace: str = C.ROOT_NAMESPACE

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"scope {self.scope!r} is not one of {', '.join(SCOPES)}")
        if self.scope != "WorkloadSelector" and self.selector is not None:
            raise ValueError(f"a {self.scope} policy has no selector")
        if self.scope == "Global" and self.namespace != self.root_namespace:
            raise ValueError(f"only a policy in {self.root_namespace} is Global")

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def attached_to_nothing(self) -> bool:
        """A selector without a label map: in scope for no workload (istiod only attaches
        workload-selector policies that have one)."""
        return self.scope == "WorkloadSelector" and self.selector is None

    def applies_to(self, namespace: str, labels: dict) -> bool:
        """Whether this policy is in scope for a destination workload."""
        if self.namespace != self.root_namespace and self.namespace != namespace:
            return False
        if self.scope != "WorkloadSelector":
            return True
        if self.selector is None:
            return False
        return all(labels.get(k) == v for k, v in self.selector)

    def first_match(self, c: Conn) -> Rule | None:
        for r in self.rules:
            if r.matches(c):
                return r
        return None

    def to_json(self) -> dict:
        return {"name": self.name, "namespace": self.namespace, "scope": self.scope,
                "action": self.action, "selector": dict(self.selector) if self.selector is not None else None,
                "rules": [{"index": r.index, "clauses": [[m.to_json() for m in cl] for cl in r.clauses]}
                          for r in self.rules]}


@dataclass(frozen=True)
class Decision:
    allow: bool
    reason: str        # deny-rule | allow-rule | no-allow-policy | no-allow-match
    policy: str | None = None   # ns/name of the deciding policy
    rule: int | None = None     # index of the deciding rule in that policy

    def __str__(self) -> str:
        verdict = "allow" if self.allow else "deny"
        return f"{verdict} ({self.reason}{f' {self.policy} rule {self.rule}' if self.policy else ''})"


def in_scope(policies: Iterable[Policy], namespace: str, labels: dict) -> list[Policy]:
    return [p for p in policies if p.applies_to(namespace, labels)]


def evaluate(policies: Iterable[Policy], c: Conn) -> Decision:
    """The verdict for a connection, given the policies in scope for its destination.

    The verdict does not depend on the order; which policy is reported as deciding is
    the first in `policies` (policies_from_objects sorts them by namespace/name)."""
    pols = list(policies)
    for p in pols:
        if p.action == "DENY":
            r = p.first_match(c)
            if r is not None:
                return Decision(False, "deny-rule", p.key, r.index)
    allows = [p for p in pols if p.action == "ALLOW"]
    if not allows:
        return Decision(True, "no-allow-policy")
    for p in allows:
        r = p.first_match(c)
        if r is not None:
            return Decision(True, "allow-rule", p.key, r.index)
    return Decision(False, "no-allow-match")


# --- parsing and validation -------------------------------------------------------------

L4_WHEN_KEYS = ("source.ip", "source.namespace", "source.principal", "destination.ip",
                "destination.port")
# keys Istio knows but only HTTP filters evaluate (exact names, then bracketed prefixes)
L7_WHEN_KEYS = ("remote.ip", "source.serviceAccount", "source.trustDomain", "request.auth.principal",
                "request.auth.audiences", "request.auth.presenter", "connection.sni")
L7_WHEN_PREFIXES = ("request.headers[", "request.auth.claims[", "experimental.envoy.filters.")
SOURCE_L4 = ("principals", "notPrincipals", "namespaces", "notNamespaces", "serviceAccounts",
             "notServiceAccounts", "ipBlocks", "notIpBlocks")
SOURCE_L7 = ("requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks")
# istiod does not hand these to ztunnel at all (nor flag them as HTTP): the field is
# dropped and the rule kept; an entry left empty never matches.
SOURCE_IGNORED = ("trustDomains", "notTrustDomains")
OPERATION_L4 = ("ports", "notPorts")
OPERATION_L7 = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
SPEC_FIELDS = ("selector", "targetRef", "targetRefs", "action", "provider", "rules")
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
# Kubernetes label keys (optional DNS prefix) and values
LABEL_KEY_RE = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


@dataclass
class Parsed:
    """A validated policy: `policy` is None when it does nothing at L4 (targetRefs,
    AUDIT, CUSTOM, dry run); `warnings` name every field dropped or ignored at L4, and a
    selector that attaches the policy to no workload."""
    object: dict
    policy: Policy | None
    warnings: list[str] = field(default_factory=list)


class _Ctx:
    def __init__(self, src: str, prefix: str):
        self.src, self.prefix = src, prefix

    def fail(self, path: str, why: str) -> BadInputError:
        where = f"{self.prefix}{path}" if path else (self.prefix.rstrip(".") or "(document)")
        return BadInputError(f"{self.src}: {where}: {why}",
                             hint="see Istio's AuthorizationPolicy reference for the field")


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(w.capitalize() for w in rest)


def _mapping(ctx: _Ctx, path: str, value, allowed: Iterable[str]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ctx.fail(path, f"expected a mapping, got {type(value).__name__}")
    allowed = tuple(allowed)
    for k in value:
        if k not in allowed:
            raise ctx.fail(f"{path}.{k}" if path else str(k),
                           f"unknown field (allowed here: {', '.join(allowed)})")
    return value


def _strings(ctx: _Ctx, path: str, value) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ctx.fail(path, f"expected a list of strings, got {type(value).__name__}")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise ctx.fail(f"{path}[{i}]", f"expected a string, got {type(v).__name__} {v!r}"
                           + (" (quote port numbers: \"8080\")" if isinstance(v, int) else ""))
        if v == "":
            raise ctx.fail(f"{path}[{i}]", "empty value not allowed")
    return value


def ip_network_of(text: str) -> IpNet:
    """An IP (as a /32 or /128) or a CIDR as istiod reads it: host bits masked.
    ValueError names what is wrong."""
    if "/" in text:
        addr, _, plen = text.partition("/")
        ip = ipaddress.ip_address(addr)
        if not plen.isdigit() or int(plen) > ip.max_prefixlen:
            raise ValueError(f"prefix length {plen!r} out of range 0-{ip.max_prefixlen}")
        return ipaddress.ip_network(text, strict=False)
    return ipaddress.ip_network(ipaddress.ip_address(text))


def _cidrs(ctx: _Ctx, path: str, values: list[str]) -> tuple[IpNet, ...]:
    out = []
    for i, v in enumerate(values):
        try:
            out.append(ip_network_of(v))
        except ValueError as exc:
            kind = "CIDR" if "/" in v else "IP address"
            raise ctx.fail(f"{path}[{i}]", f"bad {kind} {v!r}: {exc}") from None
    return tuple(out)


def _ports(ctx: _Ctx, path: str, values: list[str]) -> tuple[int, ...]:
    out = []
    for i, v in enumerate(values):
        if not v.isdigit() or int(v) > 65535:
            raise ctx.fail(f"{path}[{i}]", f"bad port {v!r}: expected a number 0-65535")
        out.append(int(v))
    return tuple(out)


def _service_accounts(ctx: _Ctx, path: str, values: list[str], policy_ns: str) -> tuple[SaMatch, ...]:
    out = []
    for i, v in enumerate(values):
        if "*" in v:
            raise ctx.fail(f"{path}[{i}]", f"wildcard not allowed in service accounts ({v!r})")
        if v.count("/") > 1 or v.startswith("/") or v.endswith("/"):
            raise ctx.fail(f"{path}[{i}]",
                           f"expected 'serviceAccount' or 'namespace/serviceAccount', found {v!r}")
        ns, sep, sa = v.partition("/")
        out.append(SaMatch(ns, sa) if sep else SaMatch(policy_ns, v))
    return tuple(out)


def _selector(ctx: _Ctx, spec: dict) -> tuple[bool, tuple[tuple[str, str], ...] | None]:
    """-> (whether there is a selector, its matchLabels sorted or None without a label map).

    `selector: null` is no selector (the API server drops nulls, jsonpb skips them); an
    empty `matchLabels: {}` is a label map that selects everything, while `selector: {}`
    or `matchLabels: null` has none (istiod reads them as nil and attaches nothing)."""
    if spec.get("selector") is None:
        return False, None
    sel = _mapping(ctx, "spec.selector", spec["selector"], ("matchLabels",))
    labels = sel.get("matchLabels")
    if labels is None:
        return True, None
    if not isinstance(labels, dict):
        raise ctx.fail("spec.selector.matchLabels", "expected a mapping of labels")
    for k, v in labels.items():
        if not isinstance(k, str) or not LABEL_KEY_RE.match(k):
            raise ctx.fail(f"spec.selector.matchLabels.{k}", "not a valid label key")
        if not isinstance(v, str) or not LABEL_VALUE_RE.match(v):
            raise ctx.fail(f"spec.selector.matchLabels.{k}",
                           f"label value {v!r} is not a valid label value (quote numbers)")
    return True, tuple(sorted(labels.items()))


def _source(ctx: _Ctx, path: str, raw, policy_ns: str) -> tuple[Match, list[str], list[str]]:
    fields = SOURCE_L4 + SOURCE_L7 + SOURCE_IGNORED
    src = _mapping(ctx, path, raw, fields)
    if not any(src.get(k) for k in fields):
        raise ctx.fail(path, "`from.source` must not be empty")
    vals = {k: _strings(ctx, f"{path}.{k}", src.get(k)) for k in fields}
    if (vals["serviceAccounts"] or vals["notServiceAccounts"]) and (
            vals["principals"] or vals["notPrincipals"] or vals["namespaces"] or vals["notNamespaces"]):
        raise ctx.fail(path, "cannot set serviceAccounts with namespaces or principals")
    for k in ("remoteIpBlocks", "notRemoteIpBlocks"):
        _cidrs(ctx, f"{path}.{k}", vals[k])  # validated even though L4 drops them
    m = Match(principals=tuple(map(StrMatch.parse, vals["principals"])),
              not_principals=tuple(map(StrMatch.parse, vals["notPrincipals"])),
              namespaces=tuple(map(StrMatch.parse, vals["namespaces"])),
              not_namespaces=tuple(map(StrMatch.parse, vals["notNamespaces"])),
              service_accounts=_service_accounts(ctx, f"{path}.serviceAccounts",
                                                 vals["serviceAccounts"], policy_ns),
              not_service_accounts=_service_accounts(ctx, f"{path}.notServiceAccounts",
                                                     vals["notServiceAccounts"], policy_ns),
              source_ips=_cidrs(ctx, f"{path}.ipBlocks", vals["ipBlocks"]),
              not_source_ips=_cidrs(ctx, f"{path}.notIpBlocks", vals["notIpBlocks"]))
    return (m, [f"{path}.{k}" for k in SOURCE_L7 if vals[k]],
            [f"{path}.{k}" for k in SOURCE_IGNORED if vals[k]])


def _operation(ctx: _Ctx, path: str, raw) -> tuple[Match, list[str], list[str]]:
    op = _mapping(ctx, path, raw, OPERATION_L4 + OPERATION_L7)
    if not any(op.get(k) for k in OPERATION_L4 + OPERATION_L7):
        raise ctx.fail(path, "`to.operation` must not be empty")
    vals = {k: _strings(ctx, f"{path}.{k}", op.get(k)) for k in OPERATION_L4 + OPERATION_L7}
    m = Match(ports=_ports(ctx, f"{path}.ports", vals["ports"]),
              not_ports=_ports(ctx, f"{path}.notPorts", vals["notPorts"]))
    return m, [f"{path}.{k}" for k in OPERATION_L7 if vals[k]], []


def _when(ctx: _Ctx, path: str, raw) -> tuple[Match, list[str]]:
    cond = _mapping(ctx, path, raw, ("key", "values", "notValues"))
    key = cond.get("key")
    if not isinstance(key, str) or not key:
        raise ctx.fail(f"{path}.key", "`key` must be a non-empty string")
    values = _strings(ctx, f"{path}.values", cond.get("values"))
    not_values = _strings(ctx, f"{path}.notValues", cond.get("notValues"))
    if not values and not not_values:
        raise ctx.fail(path, f"at least one of `values` or `notValues` must be set for key {key}")
    if key not in L4_WHEN_KEYS:
        if key == "destination.namespace":
            raise ctx.fail(f"{path}.key", "destination.namespace is replaced by metadata.namespace")
        if key.startswith("destination.labels["):
            raise ctx.fail(f"{path}.key", f"{key} is replaced by the workload selector")
        bracketed = key.startswith(L7_WHEN_PREFIXES[:2]) and key.endswith("]") and \
            key.index("[") < len(key) - 2
        if key not in L7_WHEN_KEYS and not bracketed and not key.startswith(L7_WHEN_PREFIXES[2]):
            raise ctx.fail(f"{path}.key", f"unknown attribute {key!r} (L4 keys: {', '.join(L4_WHEN_KEYS)})")
        return Match(), [f"{path} (key {key})"]
    if key in ("source.ip", "destination.ip"):
        pos, neg = _cidrs(ctx, f"{path}.values", values), _cidrs(ctx, f"{path}.notValues", not_values)
        kw = {"source.ip": ("source_ips", "not_source_ips"),
              "destination.ip": ("destination_ips", "not_destination_ips")}[key]
    elif key == "destination.port":
        pos, neg = _ports(ctx, f"{path}.values", values), _ports(ctx, f"{path}.notValues", not_values)
        kw = ("ports", "not_ports")
    else:
        pos, neg = tuple(map(StrMatch.parse, values)), tuple(map(StrMatch.parse, not_values))
        kw = {"source.namespace": ("namespaces", "not_namespaces"),
              "source.principal": ("principals", "not_principals")}[key]
    return Match(**{kw[0]: pos, kw[1]: neg}), []


def _rule(ctx: _Ctx, i: int, raw, policy_ns: str):
    """-> (clauses, L7 field paths, ignored field paths)"""
    path = f"spec.rules[{i}]"
    rule = _mapping(ctx, path, raw, ("from", "to", "when"))
    clauses, l7, ignored = [], [], []
    for key, parse in (("to", lambda p, e: _operation(ctx, f"{p}.operation",
                                                      _mapping(ctx, p, e, ("operation",)).get("operation"))),
                       ("from", lambda p, e: _source(ctx, f"{p}.source",
                                                     _mapping(ctx, p, e, ("source",)).get("source"),
                                                     policy_ns))):
        if key not in rule or rule[key] is None:
            continue
        entries = rule[key]
        if not isinstance(entries, list) or not entries:
            raise ctx.fail(f"{path}.{key}", f"`{key}` must be a non-empty list")
        clause = []
        for j, e in enumerate(entries):
            sub = "operation" if key == "to" else "source"
            if not isinstance(e, dict) or e.get(sub) is None:
                raise ctx.fail(f"{path}.{key}[{j}]", f"`{key}.{sub}` must not be empty")
            m, dropped, skipped = parse(f"{path}.{key}[{j}]", e)
            clause.append(m)
            l7 += dropped
            ignored += skipped
        clauses.append(tuple(clause))
    when = rule.get("when")
    if when is not None:
        if not isinstance(when, list):
            raise ctx.fail(f"{path}.when", "expected a list of conditions")
        for j, c in enumerate(when):
            m, dropped = _when(ctx, f"{path}.when[{j}]", c)
            clauses.append((m,))
            l7 += dropped
    return tuple(clauses), l7, ignored


DRY_RUN = "istio.io/dry-run"
# the only spellings Go's strconv.ParseBool accepts (no trimming, no yes/no, no on/off)
GO_TRUE = ("1", "t", "T", "TRUE", "true", "True")
GO_FALSE = ("0", "f", "F", "FALSE", "false", "False")


def go_bool(text: str) -> bool | None:
    """`text` as Go's strconv.ParseBool reads it; None where ParseBool fails."""
    return True if text in GO_TRUE else False if text in GO_FALSE else None


def _dry_run(ctx: _Ctx, annotations: dict, action: str, admission: bool) -> tuple[bool, str | None]:
    """-> (is the policy a dry run, a warning).  Two istiod readers of the annotation:
    the admission webhook refuses a value ParseBool rejects (also "") and the annotation
    on AUDIT or CUSTOM; the ambient controller (`admission=False`, for stored objects)
    reads such a value as false, so the policy is enforced."""
    if DRY_RUN not in annotations:
        return False, None
    path, raw = f"metadata.annotations[{DRY_RUN}]", annotations[DRY_RUN]
    value = go_bool(raw) if isinstance(raw, str) else None
    if admission:
        if action not in ("ALLOW", "DENY"):
            raise ctx.fail(path, f"the annotation is only for ALLOW and DENY, found action {action}")
        if value is None:
            raise ctx.fail(path, f"invalid value {raw!r}: istiod reads it with Go's strconv.ParseBool, "
                                 f"which accepts only {', '.join(GO_TRUE)} and {', '.join(GO_FALSE)}")
    if value is None and raw != "":
        return False, (f"{ctx.prefix}{path} {raw!r} is not a boolean to istiod's ambient controller; "
                       "read as false, so the policy is enforced")
    return bool(value), None


def parse(obj, *, src: str = "<input>", prefix: str = "",
          root_namespace: str = C.ROOT_NAMESPACE, admission: bool = True) -> Parsed:
    """Validate one AuthorizationPolicy object and convert it for L4.

    `prefix` goes before every field path (e.g. "docs[1]." for the second document of a
    file).  Raises BadInputError on the first problem.  `admission=False` reads an object
    already stored the way istiod's controller does where its webhook is stricter (only
    the dry-run annotation differs)."""
    ctx = _Ctx(src, prefix)
    if not isinstance(obj, dict):
        raise ctx.fail("", f"expected a mapping (a Kubernetes object), got {type(obj).__name__}")
    _mapping(ctx, "", obj, ("apiVersion", "kind", "metadata", "spec", "status"))
    if obj.get("kind") != KIND:
        raise ctx.fail("kind", f"expected {KIND}, got {obj.get('kind')!r}")
    if obj.get("apiVersion") not in API_VERSIONS:
        raise ctx.fail("apiVersion", f"{obj.get('apiVersion')!r} is not one of {', '.join(API_VERSIONS)}")
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        raise ctx.fail("metadata", "required, with at least a name")
    name = meta.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ctx.fail("metadata.name", f"{name!r} is not a valid name (lowercase letters, digits, "
                                        "'-', '.'; required)")
    ns = meta.get("namespace") or "default"
    if not isinstance(ns, str) or not NAME_RE.match(ns) or "." in ns:
        raise ctx.fail("metadata.namespace", f"{ns!r} is not a valid namespace name")
    for k in ("labels", "annotations"):
        if meta.get(k) is not None and not isinstance(meta[k], dict):
            raise ctx.fail(f"metadata.{k}", "expected a mapping")
    annotations = meta.get("annotations") or {}
    for k, v in annotations.items() if admission else ():
        if not isinstance(v, str):  # Kubernetes refuses them: annotations are map[string]string
            raise ctx.fail(f"metadata.annotations[{k}]", f"annotation values are strings, got "
                           f"{type(v).__name__} {v!r} (quote it)")
    spec = _mapping(ctx, "spec", obj.get("spec") or {}, SPEC_FIELDS)
    action = spec.get("action", "ALLOW")
    if action not in ACTIONS:
        raise ctx.fail("spec.action", f"unsupported action {action!r} (one of {', '.join(ACTIONS)})")
    dry_run, dry_run_warning = _dry_run(ctx, annotations, action, admission)
    has_selector, selector = _selector(ctx, spec)
    has_targets = bool(spec.get("targetRef") or spec.get("targetRefs"))
    if has_targets and has_selector:
        raise ctx.fail("spec", "only one of selector, targetRef or targetRefs may be set")
    for k in ("targetRef", "targetRefs"):
        refs = spec.get(k)
        if refs is None:
            continue
        refs = [refs] if k == "targetRef" else refs
        if not isinstance(refs, list):
            raise ctx.fail(f"spec.{k}", "expected a list of references")
        for j, r in enumerate(refs):
            at = f"spec.{k}" + (f"[{j}]" if k == "targetRefs" else "")
            r = _mapping(ctx, at, r, ("group", "kind", "name", "namespace"))
            if not isinstance(r.get("kind"), str) or not isinstance(r.get("name"), str):
                raise ctx.fail(at, "a reference needs kind and name")
    provider = spec.get("provider")
    if provider is not None:
        provider = _mapping(ctx, "spec.provider", provider, ("name",))
        if action != "CUSTOM":
            raise ctx.fail("spec.provider", f"`provider` is only for the CUSTOM action, found {action}")
    raw_rules = spec.get("rules")
    if raw_rules is not None and not isinstance(raw_rules, list):
        raise ctx.fail("spec.rules", "expected a list of rules")
    if action == "DENY" and raw_rules is None:
        raise ctx.fail("spec.rules", "DENY without `rules` would never match; add `rules: [{}]` "
                                     "to deny everything in scope")
    if action == "CUSTOM" and (provider is None or not provider.get("name")):
        raise ctx.fail("spec.provider" if provider is None else "spec.provider.name",
                       "CUSTOM needs a provider with a name")
    warnings: list[str] = []
    label = f"{src}: AuthorizationPolicy {ns}/{name}"
    rules: list[Rule] = []
    for i, raw in enumerate(raw_rules or []):
        clauses, l7, ignored = _rule(ctx, i, raw, ns)
        if ignored:
            warnings.append(f"{label}: rule {i}: {', '.join(prefix + f for f in ignored)} not enforced "
                            "at L4 (istiod does not pass trust domains to ztunnel); ignored")
        if not l7:
            rules.append(Rule(i, clauses))
            continue
        fields = ", ".join(f"{prefix}{f}" for f in l7)
        if action == "ALLOW":
            warnings.append(f"{label}: rule {i} dropped at L4 (it uses HTTP fields: {fields}); "
                            "the ALLOW is narrower than written - use a waypoint for L7")
            continue
        rules.append(Rule(i, clauses))
        if action == "DENY":
            if all(any(not m.empty() for m in cl) for cl in clauses if cl):
                warnings.append(f"{label}: rule {i}: HTTP fields ignored at L4 ({fields}); "
                                "the DENY is broader than written")
            else:
                warnings.append(f"{label}: rule {i}: HTTP fields ignored at L4 ({fields}); "
                                "nothing L4 is left, so this rule denies nothing")
    if dry_run_warning:
        warnings.append(f"{label}: {dry_run_warning}")
    if dry_run:
        warnings.append(f"{label}: {prefix}metadata.annotations[{DRY_RUN}] is {annotations[DRY_RUN]!r}: "
                        "dry-run policies are not enforced at L4 (istiod sends them to ztunnel only "
                        "with AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY on, and ztunnel then only "
                        "logs their matches); ignored")
        return Parsed(obj, None, warnings)
    if has_targets:
        warnings.append(f"{label}: has targetRefs, so it is for waypoints (L7) and ignored at L4")
        return Parsed(obj, None, warnings)
    if action in ("AUDIT", "CUSTOM"):
        warnings.append(f"{label}: action {action} is not enforced at L4; ignored")
        return Parsed(obj, None, warnings)
    where = ("every namespace (the policy is in the root namespace)" if ns == root_namespace
             else f"namespace {ns}")
    if has_selector and selector is None:
        warnings.append(f"{label}: {prefix}spec.selector has no matchLabels, so istiod attaches the "
                        "policy to no workload and it has no effect; remove `selector` to apply it to "
                        f"{where}, or select workloads with matchLabels")
    elif selector == ():
        warnings.append(f"{label}: {prefix}spec.selector.matchLabels is empty: it selects every "
                        f"workload in {where}")
    scope = ("WorkloadSelector" if has_selector else
             "Global" if ns == root_namespace else "Namespace")
    return Parsed(obj, Policy(namespace=ns, name=name, action=action, scope=scope, selector=selector,
                              rules=tuple(rules), root_namespace=root_namespace), warnings)


def policies_from_objects(objs: Iterable[dict], root_namespace: str = C.ROOT_NAMESPACE) -> list[Policy]:
    """Stored objects (already validated by apply) -> the L4 policies they carry."""
    out = []
    for o in objs:
        p = parse(o, src="store", root_namespace=root_namespace, admission=False).policy
        if p is not None:
            out.append(p)
    return sorted(out, key=lambda p: (p.namespace, p.name))
