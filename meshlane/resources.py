"""Reading the YAML files users hand to `meshlane apply -f` / `delete -f`.

Parses (never validates: the control plane does that, once, for every client) and turns
YAML problems into one-line errors naming the file, line and column.
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from meshcore.errors import BadInputError, NotFoundError

# what `get` accepts, kubectl style -> stored kind
KIND_NAMES = {"authorizationpolicies": "AuthorizationPolicy", "authorizationpolicy": "AuthorizationPolicy",
              "ap": "AuthorizationPolicy", "namespaces": "Namespace", "namespace": "Namespace",
              "ns": "Namespace", "pods": "Pod", "pod": "Pod",
              "services": "Service", "service": "Service", "svc": "Service",
              "gateways": "Gateway", "gateway": "Gateway", "gtw": "Gateway",
              "httproutes": "HTTPRoute", "httproute": "HTTPRoute",
              "destinationrules": "DestinationRule", "destinationrule": "DestinationRule", "dr": "DestinationRule"}
API_GROUPS = {"AuthorizationPolicy": "security.istio.io", "Namespace": "", "Pod": "", "Service": "",
              "Gateway": "gateway.networking.k8s.io", "HTTPRoute": "gateway.networking.k8s.io",
              "DestinationRule": "networking.istio.io"}


def read_docs(path: str) -> tuple[str, list]:
    """-> (display name, the non-empty YAML documents of the file, in order)."""
    if path == "-":
        text, name = sys.stdin.read(), "<stdin>"
    else:
        p = Path(path)
        if not p.is_file():
            raise NotFoundError(f"{path}: no such file")
        try:
            text, name = p.read_text(), path
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInputError(f"{path}: cannot read: {exc}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise BadInputError(f"{name}: not valid YAML at {where}: {getattr(exc, 'problem', None) or exc}",
                            hint="check the indentation and quoting there") from None
    if not docs:
        raise BadInputError(f"{name}: no objects in the file")
    return name, docs


def describe(kind: str, name: str) -> str:
    group = API_GROUPS.get(kind, "")
    return f"{kind.lower()}{'.' + group if group else ''}/{name}"
