"""SpiffeId: the two spellings, round trips, and a refusal for every malformed shape."""
from __future__ import annotations

import pytest

from meshcore import constants as C
from meshcore.errors import BadInputError
from meshcore.identity import SpiffeId, validate_trust_domain


@pytest.mark.parametrize("uri", [
    "spiffe://cluster.local/ns/default/sa/default",
    "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage",
    "spiffe://example.org/ns/a/sa/b",
    "spiffe://td_with-under.score/ns/n0/sa/svc.account.dotted",
    "spiffe://x/ns/" + "a" * 63 + "/sa/s",
])
def test_parse_format_round_trip(uri):
    sid = SpiffeId.parse(uri)
    assert sid.uri == uri
    assert str(sid) == uri
    assert SpiffeId.parse(sid.uri) == sid
    assert sid.principal == uri.removeprefix("spiffe://")


def test_fields_and_principal():
    sid = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")
    assert (sid.trust_domain, sid.namespace, sid.service_account) == (
        "cluster.local", "shop", "cart")
    assert sid.principal == "cluster.local/ns/shop/sa/cart"


def test_default_trust_domain_and_value_semantics():
    sid = SpiffeId(namespace="shop", service_account="cart")
    assert sid.trust_domain == C.DEFAULT_TRUST_DOMAIN
    assert sid.uri == f"spiffe://{C.DEFAULT_TRUST_DOMAIN}/ns/shop/sa/cart"
    assert sid == SpiffeId.parse(sid.uri)
    assert len({sid, SpiffeId.parse(sid.uri)}) == 1
    with pytest.raises(AttributeError):
        sid.namespace = "other"  # frozen


def test_keyword_only():
    with pytest.raises(TypeError):
        SpiffeId("cluster.local", "shop", "cart")  # type: ignore[misc]


# (uri, fragment the message must contain)
BAD = [
    ("", "does not start with 'spiffe://'"),
    ("http://cluster.local/ns/a/sa/b", "does not start with 'spiffe://'"),
    ("cluster.local/ns/a/sa/b", "does not start with 'spiffe://'"),
    ("SPIFFE://cluster.local/ns/a/sa/b", "scheme must be lowercase"),
    ("spiffe:///ns/a/sa/b", "trust domain is empty"),
    ("spiffe://", "trust domain is empty"),
    ("spiffe://Cluster.Local/ns/a/sa/b", "trust domain 'Cluster.Local'"),
    ("spiffe://cluster.local:8443/ns/a/sa/b", "port"),
    ("spiffe://user@cluster.local/ns/a/sa/b", "user"),
    ("spiffe://cluster.local", "no workload path"),
    ("spiffe://cluster.local/", "no workload path"),
    ("spiffe://cluster.local/ns/a", "is not /ns/<namespace>/sa/<service-account>"),
    ("spiffe://cluster.local/ns/a/sa/b/", "is not /ns/<namespace>/sa/<service-account>"),
    ("spiffe://cluster.local/ns/a/sa/b/extra", "is not /ns/<namespace>/sa/<service-account>"),
    ("spiffe://cluster.local/namespace/a/sa/b", "is not /ns/<namespace>/sa/<service-account>"),
    ("spiffe://cluster.local/sa/b/ns/a", "is not /ns/<namespace>/sa/<service-account>"),
    ("spiffe://cluster.local//ns/a/sa/b", "is not /ns/<namespace>/sa/<service-account>"),
    ("spiffe://cluster.local/ns//sa/b", "namespace is empty"),
    ("spiffe://cluster.local/ns/a/sa/", "service account is empty"),
    ("spiffe://cluster.local/ns/Default/sa/b", "namespace 'Default' is not a DNS label"),
    ("spiffe://cluster.local/ns/-a/sa/b", "namespace '-a' is not a DNS label"),
    ("spiffe://cluster.local/ns/a.b/sa/c", "namespace 'a.b' is not a DNS label"),
    ("spiffe://cluster.local/ns/" + "a" * 64 + "/sa/b", "is not a DNS label"),
    ("spiffe://cluster.local/ns/a/sa/B", "service account 'B' is not a DNS subdomain"),
    ("spiffe://cluster.local/ns/a/sa/b..c", "service account 'b..c' is not a DNS subdomain"),
    ("spiffe://cluster.local/ns/a/sa/b_c", "service account 'b_c' is not a DNS subdomain"),
    ("spiffe://cluster.local/ns/a/sa/./", "is not /ns/<namespace>/sa/<service-account>"),
    ("spiffe://cluster.local/ns/a/sa/b?x=1", "query"),
    ("spiffe://cluster.local/ns/a/sa/b#frag", "fragment"),
    ("spiffe://cluster.local/ns/a%2Fb/sa/c", "percent-escape"),
    ("spiffe://cluster.local/ns/a/sa/" + "b" * 2100, "limit is 2048"),
]


@pytest.mark.parametrize("uri,fragment", BAD)
def test_bad_uris_rejected_with_reason(uri, fragment):
    with pytest.raises(BadInputError) as info:
        SpiffeId.parse(uri)
    assert fragment in str(info.value)
    assert info.value.exit_code == C.EX_DATAERR


def test_non_string_rejected():
    with pytest.raises(BadInputError, match="must be a string"):
        SpiffeId.parse(b"spiffe://cluster.local/ns/a/sa/b")  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(trust_domain="", namespace="a", service_account="b"), "trust domain is empty"),
    (dict(namespace="A", service_account="b"), "namespace 'A'"),
    (dict(namespace="a", service_account="b/c"), "service account 'b/c'"),
])
def test_construction_validates(kwargs, fragment):
    with pytest.raises(BadInputError) as info:
        SpiffeId(**kwargs)
    assert fragment in str(info.value)


def test_validate_trust_domain():
    assert validate_trust_domain("mesh.example.com") == "mesh.example.com"
    with pytest.raises(BadInputError, match="may only contain"):
        validate_trust_domain("Mesh.Example")
