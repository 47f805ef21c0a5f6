"""Workload identity: the SPIFFE ID carried as the only URI SAN of a leaf (DESIGN.md §5).

Owns the `SpiffeId` value type, its two spellings and its validation.  Pure: no I/O, no
certificates (those live in `slowpath.certs` and `meshlane.ca`).

    spiffe://cluster.local/ns/default/sa/bookinfo   .uri        (the SAN, what TLS sees)
             cluster.local/ns/default/sa/bookinfo   .principal  (Istio's policy spelling)

Names follow Kubernetes: a namespace is a DNS label (RFC 1123, at most 63 characters);
a service account is a DNS subdomain (dot-separated labels, at most 253 characters).
The trust domain follows the SPIFFE spec: lowercase letters, digits, '.', '-' and '_'.
Anything else (upper case, ports, queries, percent-escapes, extra path segments) is
refused rather than normalised, so two spellings can never name one identity.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from meshcore import constants as C
from meshcore.errors import BadInputError

SCHEME = "spiffe://"
MAX_URI_LEN = 2048  # SPIFFE spec: URIs longer than this are not SPIFFE IDs

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_HINT = "expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"


def _check_label(value: str, what: str, where: str) -> None:
    if not value:
        raise BadInputError(f"{where}: {what} is empty", hint=_HINT)
    if not _DNS_LABEL.fullmatch(value):
        raise BadInputError(
            f"{where}: {what} {value!r} is not a DNS label "
            "(lowercase letters, digits and '-', starting and ending with a letter or "
            "digit, at most 63 characters)")


def _check_namespace(value: str, where: str) -> None:
    _check_label(value, "namespace", where)


def _check_service_account(value: str, where: str) -> None:
    if not value:
        raise BadInputError(f"{where}: service account is empty", hint=_HINT)
    if len(value) > 253 or not all(_DNS_LABEL.fullmatch(p) for p in value.split(".")):
        raise BadInputError(
            f"{where}: service account {value!r} is not a DNS subdomain "
            "(dot-separated labels of lowercase letters, digits and '-', at most 253 "
            "characters)")


def _check_trust_domain(value: str, where: str) -> None:
    if not value:
        raise BadInputError(f"{where}: trust domain is empty", hint=_HINT)
    if len(value) > 255 or not _TRUST_DOMAIN.fullmatch(value):
        raise BadInputError(
            f"{where}: trust domain {value!r} may only contain lowercase letters, digits, "
            "'.', '-' and '_' (no port, user or upper case)")


def validate_trust_domain(trust_domain: str) -> str:
    """Return `trust_domain` if it is a valid SPIFFE trust domain, else BadInputError."""
    _check_trust_domain(trust_domain, "trust domain setting")
    return trust_domain


@dataclass(frozen=True, kw_only=True)
class SpiffeId:
    """A workload identity.  Validated on construction; compare and hash by value."""

    trust_domain: str = C.DEFAULT_TRUST_DOMAIN
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        where = "SPIFFE ID"
        _check_trust_domain(self.trust_domain, where)
        _check_namespace(self.namespace, where)
        _check_service_account(self.service_account, where)

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.principal}"

    @property
    def principal(self) -> str:
        """Istio's principal form (AuthorizationPolicy `principals`): the URI without scheme."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse exactly `spiffe://<td>/ns/<ns>/sa/<sa>`; BadInputError names what is wrong."""
        if not isinstance(uri, str):
            raise BadInputError(f"SPIFFE ID must be a string, got {type(uri).__name__}")
        where = f"SPIFFE ID {uri!r}"
        if len(uri) > MAX_URI_LEN:
            raise BadInputError(f"SPIFFE ID is {len(uri)} characters long; "
                                f"the limit is {MAX_URI_LEN}")
        if not uri.startswith(SCHEME):
            if uri.lower().startswith(SCHEME):
                raise BadInputError(f"{where}: scheme must be lowercase 'spiffe://'")
            raise BadInputError(f"{where}: does not start with 'spiffe://'", hint=_HINT)
        for char, name in (("?", "query"), ("#", "fragment"), ("%", "percent-escape")):
            if char in uri:
                raise BadInputError(f"{where}: a SPIFFE ID has no {name} ({char!r})")
        rest = uri[len(SCHEME):]
        trust_domain, slash, path = rest.partition("/")
        if "@" in trust_domain:
            raise BadInputError(f"{where}: trust domain must not carry a user ('@')")
        if ":" in trust_domain:
            raise BadInputError(f"{where}: trust domain must not carry a port (':')")
        _check_trust_domain(trust_domain, where)
        if not slash or not path:
            raise BadInputError(f"{where}: has no workload path after the trust domain",
                                hint=_HINT)
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise BadInputError(f"{where}: path '/{path}' is not /ns/<namespace>/sa/"
                                "<service-account>", hint=_HINT)
        _check_namespace(parts[1], where)
        _check_service_account(parts[3], where)
        return cls(trust_domain=trust_domain, namespace=parts[1], service_account=parts[3])
