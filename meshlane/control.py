"""`meshlane control`: the resource store, the CA and the API nodes talk to (istiod's role).

Owns: the persistent store (sqlite under the state dir: Kubernetes-shaped objects keyed
by kind/namespace/name with a revision), watches, bootstrap tokens, node registration,
and CSR signing that is node-scoped: a node may only obtain identities of pods scheduled
on it, proven by the node token it received at registration.  Nodes never see the CA key.
Must not: touch the kernel or network namespaces.

Who may do what.  Today the API is JSON lines on a root-only (0600) unix socket, and that
socket is the admin boundary: whoever can open it is an operator, so the operator
operations (apply, put, delete, create_token/list_tokens/delete_token) check nothing
more.  Two operations authenticate their caller on top of that, because they hand out or
use a node's credential and must keep working unchanged when the API moves to TCP+TLS
(admins with client certificates; nodes without one until they have joined):

1. `register_node` needs either a bootstrap token (below) or, for a node that is already
   registered, that node's current node token.  It answers a fresh node token.
2. `sign` needs the node token of the node whose pod's identity is asked for.

Bootstrap tokens (kubeadm's format and rules):

1. Format `<id>.<secret>`, 6 and 16 characters of [a-z0-9] (`abcdef.0123456789abcdef`);
   the id is public (listed, deleted by), the secret is not.  Created by an operator
   (`meshlane token create [--node NAME] [--ttl 24h]`) and given to the node out of band.
2. Stored hashed (SHA-256 of the whole token), compared in constant time; the secret is
   never stored, logged or shown again.
3. Every token expires (`--ttl`, default 24 h) and is single use: a successful
   registration consumes it, so a replayed request is refused.
4. Unbound tokens register a new node name only.  A token created with `--node NAME`
   registers only NAME, and may also re-register NAME when it already exists (an operator
   re-provisioning a node whose token is lost).
5. An existing node (one with a node token or a Node object) re-registers with its current
   node token (proof it is that node) or a token bound to it; the node token is rotated
   and the old one stops working for `sign` at once.
6. A refused registration changes nothing: no Node object, no node token, the bootstrap
   token unconsumed.  Refusals are `PermissionDeniedError` (exit 77, EX_NOPERM) and say
   what was wrong and what to do next.

This fits the TLS step: the node token becomes a node certificate obtained once with a
bootstrap token and renewed by the node itself (re-registration with proof, rule 5).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
import string
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

from meshcore import authz, l7, l7parse
from meshcore import constants as C
from meshcore.errors import BadInputError, MeshError, NotFoundError, PermissionDeniedError, UsageError
from meshcore.identity import SpiffeId
from meshlane.ca import CertificateAuthority
from slowpath.control_client import MAX_LINE

log = logging.getLogger("meshlane.control")

CLUSTER_SCOPED = {"Namespace", "Node"}
L7_KINDS = ("Service", "Gateway", "HTTPRoute", "DestinationRule")
KNOWN_KINDS = {"Namespace", "Node", "Pod", "AuthorizationPolicy", *L7_KINDS}
APPLIED_KINDS = (authz.KIND, "Namespace", *L7_KINDS)

# Node names as Kubernetes' (a DNS-1123 subdomain): they end up in file names and messages.
NODE_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
BOOTSTRAP_TOKEN_RE = re.compile(r"^([a-z0-9]{6})\.([a-z0-9]{16})$")   # kubeadm's
BOOTSTRAP_ALPHABET = string.ascii_lowercase + string.digits
BOOTSTRAP_TTL_DEFAULT = timedelta(hours=24)                          # kubeadm's default
BOOTSTRAP_TTL_MAX = timedelta(days=30)   # a join credential that lives longer is a standing one
BOOTSTRAP_KEEP_AFTER_EXPIRY = timedelta(days=1)   # then forgotten (kubeadm's tokencleaner)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_node_name(name) -> str:
    if not isinstance(name, str) or not NODE_NAME_RE.match(name):
        raise BadInputError(f"{name!r} is not a valid node name (lowercase letters, digits, '-' "
                            "and '.', starting and ending with a letter or digit, at most 253)")
    return name


def key_of(obj: dict) -> tuple[str, str, str]:
    kind = obj.get("kind")
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if kind not in KNOWN_KINDS:
        raise BadInputError(f"unknown kind {kind!r} (known: {', '.join(sorted(KNOWN_KINDS))})")
    if not isinstance(name, str) or not name:
        raise BadInputError(f"{kind}: metadata.name is required")
    ns = "" if kind in CLUSTER_SCOPED else (meta.get("namespace") or "default")
    return kind, ns, name


class Store:
    def __init__(self, path: Path):
        self.db = sqlite3.connect(str(path), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS objects (kind TEXT, namespace TEXT, name TEXT,"
                        " body TEXT, rev INTEGER, PRIMARY KEY (kind, namespace, name))")
        self.db.execute("CREATE TABLE IF NOT EXISTS tokens (node TEXT PRIMARY KEY, digest TEXT)")
        # kubeadm-style bootstrap tokens: digest of the whole token, never the secret itself
        self.db.execute("CREATE TABLE IF NOT EXISTS bootstrap_tokens (id TEXT PRIMARY KEY,"
                        " digest TEXT NOT NULL, node TEXT, description TEXT NOT NULL DEFAULT '',"
                        " created REAL NOT NULL, expires REAL NOT NULL, used_at REAL, used_by TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER)")
        row = self.db.execute("SELECT v FROM meta WHERE k='rev'").fetchone()
        self.rev = row[0] if row else 0

    def _bump(self) -> int:
        self.rev += 1
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('rev', ?)", (self.rev,))
        return self.rev

    def put(self, obj: dict) -> dict:
        kind, ns, name = key_of(obj)
        obj = json.loads(json.dumps(obj))
        obj.setdefault("metadata", {})
        if ns:
            obj["metadata"]["namespace"] = ns
        obj["metadata"]["resourceVersion"] = str(self._bump())
        self.db.execute("INSERT OR REPLACE INTO objects VALUES (?,?,?,?,?)",
                        (kind, ns, name, json.dumps(obj), self.rev))
        return obj

    def get(self, kind: str, ns: str, name: str) -> dict | None:
        row = self.db.execute("SELECT body FROM objects WHERE kind=? AND namespace=? AND name=?",
                              (kind, ns, name)).fetchone()
        return json.loads(row[0]) if row else None

    def list(self, kind: str | None = None, ns: str | None = None) -> list[dict]:
        q, args = "SELECT body FROM objects WHERE 1=1", []
        if kind:
            q += " AND kind=?"
            args.append(kind)
        if ns is not None:
            q += " AND namespace=?"
            args.append(ns)
        return [json.loads(r[0]) for r in self.db.execute(q + " ORDER BY kind, namespace, name", args)]

    def delete(self, kind: str, ns: str, name: str) -> dict | None:
        obj = self.get(kind, ns, name)
        if obj is not None:
            self.db.execute("DELETE FROM objects WHERE kind=? AND namespace=? AND name=?",
                            (kind, ns, name))
            self._bump()
        return obj

    @contextmanager
    def transaction(self):
        """All or nothing: on an exception every write is rolled back, the revision too."""
        self.db.execute("BEGIN")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            row = self.db.execute("SELECT v FROM meta WHERE k='rev'").fetchone()
            self.rev = row[0] if row else 0
            raise

    # --- node tokens (the credential `sign` checks) --------------------------------
    def set_token(self, node: str, token: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO tokens VALUES (?, ?)", (node, _digest(token)))

    def has_token(self, node: str) -> bool:
        return self.db.execute("SELECT 1 FROM tokens WHERE node=?", (node,)).fetchone() is not None

    def check_token(self, node: str, token) -> bool:
        """Whether `token` is the node's current token (compared in constant time; which
        nodes have one is no secret, Node objects are listed)."""
        row = self.db.execute("SELECT digest FROM tokens WHERE node=?", (node,)).fetchone()
        return (row is not None and isinstance(token, str)
                and hmac.compare_digest(row[0], _digest(token)))

    # --- bootstrap tokens --------------------------------------------------------------
    def add_bootstrap(self, id: str, token: str, *, node: str | None, description: str,
                      created: float, expires: float) -> None:
        self.db.execute("INSERT INTO bootstrap_tokens (id, digest, node, description, created, expires)"
                        " VALUES (?,?,?,?,?,?)", (id, _digest(token), node, description, created, expires))

    def get_bootstrap(self, id: str) -> dict | None:
        cur = self.db.execute("SELECT * FROM bootstrap_tokens WHERE id=?", (id,))
        row = cur.fetchone()
        return dict(zip([d[0] for d in cur.description], row)) if row else None

    def list_bootstrap(self) -> list[dict]:
        cur = self.db.execute("SELECT * FROM bootstrap_tokens ORDER BY created, id")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    def delete_bootstrap(self, id: str) -> bool:
        return self.db.execute("DELETE FROM bootstrap_tokens WHERE id=?", (id,)).rowcount == 1

    def consume_bootstrap(self, id: str, *, by: str, at: float) -> bool:
        """Mark a token used, once: False when it was used meanwhile (never twice)."""
        return self.db.execute("UPDATE bootstrap_tokens SET used_at=?, used_by=? WHERE id=? AND used_at IS NULL",
                               (at, by, id)).rowcount == 1

    def prune_bootstrap(self, before: float) -> None:
        self.db.execute("DELETE FROM bootstrap_tokens WHERE expires < ?", (before,))


def _same(old: dict, new: dict) -> bool:
    """Whether applying `new` over `old` changes nothing a user wrote."""
    def strip(o: dict) -> dict:
        meta = {k: v for k, v in (o.get("metadata") or {}).items()
                if k not in ("resourceVersion", "creationTimestamp")}
        return {**{k: v for k, v in o.items() if k != "status"}, "metadata": meta}
    return strip(old) == strip(new)


class ControlPlane:
    def __init__(self, *, state_dir: Path, socket_path: Path, cacerts: Path | None = None,
                 trust_domain: str = C.DEFAULT_TRUST_DOMAIN, cert_ttl: timedelta | None = None):
        self.state_dir = state_dir
        self.socket_path = socket_path
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = Store(state_dir / "store.db")
        if cacerts is not None:
            self.ca = CertificateAuthority.from_cacerts_dir(cacerts, trust_domain=trust_domain)
        else:
            self.ca = CertificateAuthority.load_or_create(state_dir / "ca", trust_domain=trust_domain)
        self.trust_domain = trust_domain
        self.cert_ttl = cert_ttl or timedelta(seconds=C.CERT_TTL_SECONDS)
        self.watchers: list[tuple[set[str], asyncio.Queue]] = []

    def _notify(self, event: str, obj: dict) -> None:
        for kinds, q in self.watchers:
            if obj.get("kind") in kinds:
                q.put_nowait({"event": event, "object": obj, "rev": self.store.rev})

    # --- operations --------------------------------------------------------------
    def op_put(self, object: dict) -> dict:
        obj = self.store.put(object)
        self._notify("put", obj)
        return {"object": obj, "rev": self.store.rev}

    def _validate(self, obj, *, src: str, prefix: str) -> tuple[dict, list[str]]:
        """Server-side validation of one applied object -> (object to store, warnings)."""
        if isinstance(obj, dict) and obj.get("kind") == authz.KIND:
            parsed = authz.parse(obj, src=src, prefix=prefix)
            warnings = parsed.warnings
            spec = parsed.object.get("spec") or {}
            if spec.get("targetRef") or spec.get("targetRefs"):
                # for waypoints: the L4 warnings say "ignored at L4"; these say what L7 does
                warnings = l7parse.check_l7_policy(parsed.object, src=src, prefix=prefix)
            return parsed.object, warnings
        if isinstance(obj, dict) and obj.get("kind") in L7_KINDS:
            return l7parse.validate(obj, src=src, prefix=prefix)
        if isinstance(obj, dict) and obj.get("kind") == "Namespace":
            meta = obj.get("metadata")
            if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
                raise BadInputError(f"{src}: {prefix}metadata.name: required")
            labels = meta.get("labels") or {}
            if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
                raise BadInputError(f"{src}: {prefix}metadata.labels: expected a mapping of strings")
            if obj.get("apiVersion") not in (None, "v1"):
                raise BadInputError(f"{src}: {prefix}apiVersion: Namespace is v1")
            return {"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": meta["name"], "labels": labels}}, []
        if not isinstance(obj, dict):
            raise BadInputError(f"{src}: {prefix.rstrip('.') or '(document)'}: expected a mapping "
                                f"(a Kubernetes object), got {type(obj).__name__}")
        kind = obj.get("kind")
        raise BadInputError(f"{src}: {prefix}kind: {kind!r} cannot be applied "
                            f"(meshlane applies {', '.join(APPLIED_KINDS)})")

    def op_apply(self, objects: list, src: str = "<input>", dry_run: bool = False) -> dict:
        """Validate every object first, then store them all in one transaction: a bad
        document leaves everything already applied as it was."""
        if not isinstance(objects, list) or not objects:
            raise BadInputError(f"{src}: no objects to apply")
        checked, warnings = [], []
        for i, obj in enumerate(objects):
            body, warn = self._validate(obj, src=src, prefix=f"docs[{i}]." if len(objects) > 1 else "")
            checked.append(body)
            warnings += warn
        keys = [key_of(o) for o in checked]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise BadInputError(f"{src}: {dup[0]} {dup[1]}/{dup[2]} appears twice")
        checked = self._server_fields(checked, keys, src)
        world = {key_of(o): o for o in self.store.list()}
        world.update(zip(keys, checked))
        warnings += l7parse.check_refs(checked, list(world.values()), src=src)
        if dry_run:
            return {"results": [], "warnings": warnings, "rev": self.store.rev}
        results, stored = [], []
        with self.store.transaction():
            for obj, (kind, ns, name) in zip(checked, keys):
                if ns:
                    obj = {**obj, "metadata": {**obj["metadata"], "namespace": ns}}
                old = self.store.get(kind, ns, name)
                if old is not None and _same(old, obj):
                    results.append({"kind": kind, "namespace": ns, "name": name, "result": "unchanged"})
                    continue
                if kind == "Namespace" and old is not None:  # apply replaces labels only
                    merged = dict(old)
                    merged["metadata"] = {**old["metadata"], "labels": obj["metadata"]["labels"]}
                    obj = merged
                stored.append(self.store.put(obj))
                results.append({"kind": kind, "namespace": ns, "name": name,
                                "result": "configured" if old is not None else "created"})
        for obj in stored:
            self._notify("put", obj)
        return {"results": results, "warnings": warnings, "rev": self.store.rev}

    def _server_fields(self, objs: list[dict], keys: list[tuple], src: str) -> list[dict]:
        """Fields the server owns: creationTimestamp (kept across updates; routes tie-break
        on it) and a Service's VIP (allocated from l7.SERVICE_CIDR unless given, and
        immutable once set, as Kubernetes' clusterIP)."""
        taken = {}
        for o in self.store.list("Service"):
            ip = (o.get("spec") or {}).get("clusterIP")
            if ip:
                taken[ip] = key_of(o)
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        out = []
        for obj, key in zip(objs, keys):
            old = self.store.get(*key)
            meta = dict(obj["metadata"])
            meta["creationTimestamp"] = (old or {}).get("metadata", {}).get("creationTimestamp", now)
            obj = {**obj, "metadata": meta}
            if key[0] == "Service":
                spec = dict(obj["spec"])
                had = ((old or {}).get("spec") or {}).get("clusterIP")
                want = spec.get("clusterIP")
                where = f"{src}: Service {key[1]}/{key[2]}: spec.clusterIP"
                if had and want and want != had:
                    raise BadInputError(f"{where}: field is immutable (it is {had})",
                                        hint="delete the Service first to change its VIP")
                ip = want or had or self._free_vip(taken)
                if taken.get(ip, key) != key:
                    owner = taken[ip]
                    raise BadInputError(f"{where}: {ip} is already the VIP of Service {owner[1]}/{owner[2]}")
                taken[ip] = key
                spec["clusterIP"] = ip
                obj["spec"] = spec
            out.append(obj)
        return out

    @staticmethod
    def _free_vip(taken: dict) -> str:
        for ip in l7.SERVICE_CIDR.hosts():
            if int(ip) - int(l7.SERVICE_CIDR.network_address) < 10:
                continue   # .0.1-.0.9 stay free, as Kubernetes keeps the first for the API
            if str(ip) not in taken:
                return str(ip)
        raise BadInputError(f"no free Service VIP left in {l7.SERVICE_CIDR}")

    def op_delete_objects(self, objects: list, ignore_not_found: bool = False) -> dict:
        """Delete several objects (as `delete -f`): all exist, or nothing is deleted."""
        keys = []
        for i, obj in enumerate(objects if isinstance(objects, list) else []):
            if not isinstance(obj, dict):
                raise BadInputError(f"docs[{i}]: expected a Kubernetes object")
            keys.append(key_of(obj))
        missing = [k for k in keys if self.store.get(*k) is None]
        if missing and not ignore_not_found:
            k = missing[0]
            raise NotFoundError(f"{k[0]} {k[1] + '/' if k[1] else ''}{k[2]} not found; nothing deleted",
                                hint="pass --ignore-not-found to delete the others")
        results = []
        for k in keys:
            obj = self.store.delete(*k)
            if obj is not None:
                self._notify("delete", obj)
            results.append({"kind": k[0], "namespace": k[1], "name": k[2],
                            "result": "deleted" if obj is not None else "not found"})
        return {"results": results, "rev": self.store.rev}

    def op_get(self, kind: str, namespace: str | None = None, name: str | None = None) -> dict:
        if name is not None:
            ns = "" if kind in CLUSTER_SCOPED else (namespace or "default")
            obj = self.store.get(kind, ns, name)
            if obj is None:
                raise NotFoundError(f"{kind} {ns + '/' if ns else ''}{name} not found")
            return {"objects": [obj], "rev": self.store.rev}
        return {"objects": self.store.list(kind, namespace), "rev": self.store.rev}

    def op_delete(self, kind: str, name: str, namespace: str | None = None) -> dict:
        ns = "" if kind in CLUSTER_SCOPED else (namespace or "default")
        obj = self.store.delete(kind, ns, name)
        if obj is None:
            raise NotFoundError(f"{kind} {ns + '/' if ns else ''}{name} not found")
        self._notify("delete", obj)
        return {"object": obj}

    def op_label(self, kind: str, name: str, set: dict, remove: list, overwrite: bool = False,
                 namespace: str | None = None) -> dict:
        ns = "" if kind in CLUSTER_SCOPED else (namespace or "default")
        obj = self.store.get(kind, ns, name)
        if obj is None:
            raise NotFoundError(f"{kind} {ns + '/' if ns else ''}{name} not found")
        labels = obj["metadata"].setdefault("labels", {})
        for k, v in set.items():
            if k in labels and labels[k] != v and not overwrite:
                raise BadInputError(f"{kind} {name} already has label {k}={labels[k]}",
                                    hint="pass --overwrite to replace it")
            labels[k] = v
        for k in remove:
            labels.pop(k, None)
        return self.op_put(obj)

    def op_set_status(self, kind: str, name: str, status: dict, namespace: str | None = None) -> dict:
        ns = "" if kind in CLUSTER_SCOPED else (namespace or "default")
        obj = self.store.get(kind, ns, name)
        if obj is None:
            raise NotFoundError(f"{kind} {ns + '/' if ns else ''}{name} not found")
        obj.setdefault("status", {}).update(status)
        return self.op_put(obj)

    # --- bootstrap tokens and node registration (rules in the module docstring) ---------
    def op_create_token(self, node: str | None = None, ttl_seconds: float | None = None,
                        description: str = "") -> dict:
        """An operator operation (today: whoever opens the root-only socket).  The answer
        is the only place the secret ever appears."""
        if node is not None:
            _check_node_name(node)
        ttl = BOOTSTRAP_TTL_DEFAULT.total_seconds() if ttl_seconds is None else ttl_seconds
        top = BOOTSTRAP_TTL_MAX.total_seconds()
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= top:
            raise BadInputError(f"bootstrap token TTL {ttl_seconds!r}: expected a number of seconds above 0 "
                                f"and at most {top:.0f} ({BOOTSTRAP_TTL_MAX.days} days)",
                                hint="bootstrap tokens always expire; create one when the node is about to join")
        if not isinstance(description, str) or len(description) > 256:
            raise BadInputError("bootstrap token description: expected a string of at most 256 characters")
        now = time.time()
        self.store.prune_bootstrap(now - BOOTSTRAP_KEEP_AFTER_EXPIRY.total_seconds())
        while True:
            id = "".join(secrets.choice(BOOTSTRAP_ALPHABET) for _ in range(6))
            if self.store.get_bootstrap(id) is None:
                break
        token = f"{id}." + "".join(secrets.choice(BOOTSTRAP_ALPHABET) for _ in range(16))
        self.store.add_bootstrap(id, token, node=node, description=description, created=now,
                                 expires=now + ttl)
        log.info("bootstrap token %s created (%s, expires %s)", id,
                 f"bound to node {node}" if node else "any new node", _iso(now + ttl))
        return {"token": token, **self._token_view(self.store.get_bootstrap(id), now)}

    @staticmethod
    def _token_view(row: dict, now: float) -> dict:
        status = "used" if row["used_at"] is not None else "expired" if row["expires"] <= now else "valid"
        return {"id": row["id"], "node": row["node"], "description": row["description"],
                "created": _iso(row["created"]), "expires": _iso(row["expires"]),
                "ttlSeconds": max(0, round(row["expires"] - now)), "status": status,
                "usedBy": row["used_by"], "usedAt": _iso(row["used_at"]) if row["used_at"] else None}

    def op_list_tokens(self) -> dict:
        """An operator operation.  Ids and state only: secrets are not stored."""
        now = time.time()
        return {"tokens": [self._token_view(r, now) for r in self.store.list_bootstrap()]}

    def op_delete_token(self, id: str) -> dict:
        """An operator operation; `id` is the token's id or the whole token."""
        m = BOOTSTRAP_TOKEN_RE.match(id) if isinstance(id, str) else None
        tid = m.group(1) if m else id
        if not isinstance(tid, str) or not self.store.delete_bootstrap(tid):
            raise NotFoundError(f"bootstrap token {tid!r} not found", hint="see `meshlane token list`")
        log.info("bootstrap token %s deleted", tid)
        return {"id": tid}

    def _bootstrap_ok(self, name: str, token, registered: bool, now: float) -> dict:
        """The bootstrap token row if `token` may register `name` now, else a refusal
        saying why and what to do (rules 1-4 of the module docstring)."""
        create = f"create one with `meshlane token create --node {name}`"
        m = BOOTSTRAP_TOKEN_RE.match(token) if isinstance(token, str) else None
        if m is None:
            raise PermissionDeniedError(f"registering node {name!r}: the bootstrap token is malformed "
                                        "(expected <6 chars>.<16 chars> of [a-z0-9])", hint=create)
        row = self.store.get_bootstrap(m.group(1))
        # the secret is checked before anything about the token is told, in constant time,
        # against a dummy digest when the id is unknown
        if not hmac.compare_digest(row["digest"] if row else _digest(""), _digest(token)) or row is None:
            raise PermissionDeniedError(f"registering node {name!r}: unknown bootstrap token "
                                        f"{m.group(1)!r} or wrong secret", hint=create)
        if row["used_at"] is not None:
            raise PermissionDeniedError(f"registering node {name!r}: bootstrap token {row['id']!r} was "
                                        f"already used (by node {row['used_by']!r} at {_iso(row['used_at'])}); "
                                        "tokens are single use", hint=create)
        if row["expires"] <= now:
            raise PermissionDeniedError(f"registering node {name!r}: bootstrap token {row['id']!r} "
                                        f"expired at {_iso(row['expires'])}", hint=create)
        if row["node"] is not None and row["node"] != name:
            raise PermissionDeniedError(f"registering node {name!r}: bootstrap token {row['id']!r} is "
                                        f"bound to node {row['node']!r}", hint=create)
        if row["node"] is None and registered:
            raise PermissionDeniedError(
                f"node {name!r} is already registered, and an unbound bootstrap token only registers "
                "a new node", hint=f"re-register with the node's current token, or {create}")
        return row

    def op_register_node(self, name: str, spec: dict | None = None, bootstrap_token: str | None = None,
                         node_token: str | None = None) -> dict:
        """Join a node (or re-register it) and answer its new node token, the credential
        `sign` checks.  Proof, exactly one of:
          bootstrap_token: unused, unexpired, and bound to `name` or unbound with `name`
                           new (it is consumed);
          node_token:      the current token of `name`, already registered (it is rotated).
        A refusal changes nothing."""
        _check_node_name(name)
        if spec is not None and not isinstance(spec, dict):
            raise BadInputError(f"registering node {name!r}: spec must be a mapping")
        if bootstrap_token is not None and node_token is not None:
            raise UsageError(f"registering node {name!r}: give a bootstrap token or the node's "
                             "current token, not both")
        registered = self.store.has_token(name) or self.store.get("Node", "", name) is not None
        now = time.time()
        if bootstrap_token is None and node_token is None:
            raise PermissionDeniedError(
                f"registering node {name!r} needs a bootstrap token" +
                (" or the node's current token" if registered else ""),
                hint=f"create one with `meshlane token create --node {name}` and give it to the node")
        row = None
        if bootstrap_token is not None:
            row = self._bootstrap_ok(name, bootstrap_token, registered, now)
        elif not self.store.check_token(name, node_token):
            raise PermissionDeniedError(
                f"re-registering node {name!r}: the node token does not match its current one"
                if registered else f"node {name!r} is not registered, so no node token can prove it",
                hint=f"an operator can re-provision it: `meshlane token create --node {name}`")
        token = secrets.token_urlsafe(32)
        with self.store.transaction():
            if row is not None and not self.store.consume_bootstrap(row["id"], by=name, at=now):
                raise PermissionDeniedError(f"registering node {name!r}: bootstrap token {row['id']!r} "
                                            "was used meanwhile; tokens are single use")
            self.store.set_token(name, token)   # replaces (so revokes) the previous one
            old = self.store.get("Node", "", name)
            obj = self.store.put({"kind": "Node", "metadata": {**((old or {}).get("metadata") or {}),
                                                                "name": name},
                                  "spec": spec if spec is not None else (old or {}).get("spec") or {}})
        self._notify("put", obj)
        how = (f"bootstrap token {row['id']}" if row is not None else "its node token")
        log.info("node %s %s with %s", name, "re-registered" if registered else "registered", how)
        return {"token": token, "node": name, "result": "re-registered" if registered else "registered"}

    def op_root(self) -> dict:
        return {"root": self.ca.root_pem.decode(), "trustDomain": self.trust_domain}

    def op_sign(self, node: str, token: str, namespace: str, pod: str, csr: str) -> dict:
        if not isinstance(node, str) or not self.store.check_token(node, token):
            raise PermissionDeniedError(
                f"node {node!r} presented a token that is not its current node token (never issued, "
                "or rotated by a later registration)",
                hint=f"re-register the node with its current token, or with a bootstrap token "
                     f"from `meshlane token create --node {node}`")
        obj = self.store.get("Pod", namespace, pod)
        if obj is None:
            raise NotFoundError(f"pod {namespace}/{pod} is not known to the control plane")
        scheduled = obj.get("spec", {}).get("nodeName")
        if scheduled != node:
            raise PermissionDeniedError(f"node {node!r} asked for the identity of pod {namespace}/{pod}, "
                                        f"which is scheduled on {scheduled!r}: refused (node-scoped CA)")
        spiffe = SpiffeId(trust_domain=self.trust_domain, namespace=namespace,
                          service_account=obj.get("spec", {}).get("serviceAccountName", "default"))
        cert = self.ca.sign_csr(csr.encode(), expected=spiffe, ttl=self.cert_ttl)
        log.info("signed %s for node %s (pod %s/%s)", spiffe.uri, node, namespace, pod)
        return {"cert": cert.decode(), "chain": self.ca.chain_pem.decode(),
                "root": self.ca.root_pem.decode(), "spiffe": spiffe.uri}

    # --- server ------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                try:
                    req = json.loads(line)
                    op = req.pop("op")
                except (ValueError, KeyError, AttributeError):
                    writer.write(json.dumps({"ok": False, "error": "request is not JSON with an 'op'",
                                             "code": C.EX_DATAERR}).encode() + b"\n")
                    await writer.drain()
                    continue
                if op == "watch":
                    await self._serve_watch(set(req.get("kinds") or KNOWN_KINDS), writer)
                    return
                fn = getattr(self, f"op_{op}", None)
                try:
                    if fn is None:
                        raise BadInputError(f"unknown operation {op!r}")
                    answer = {"ok": True, **fn(**req)}
                except MeshError as exc:
                    if isinstance(exc, PermissionDeniedError):   # an audit trail of refusals
                        log.warning("refused %s: %s", op, exc.message)
                    answer = {"ok": False, "error": str(exc), "code": exc.exit_code}
                except TypeError as exc:
                    answer = {"ok": False, "error": f"bad arguments for {op!r}: {exc}",
                              "code": C.EX_USAGE}
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def _serve_watch(self, kinds: set[str], writer: asyncio.StreamWriter) -> None:
        q: asyncio.Queue = asyncio.Queue()
        entry = (kinds, q)
        self.watchers.append(entry)
        try:
            snap = [o for o in self.store.list() if o["kind"] in kinds]
            writer.write(json.dumps({"event": "snapshot", "objects": snap,
                                     "rev": self.store.rev}).encode() + b"\n")
            await writer.drain()
            while True:
                ev = await q.get()
                writer.write(json.dumps(ev).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.watchers.remove(entry)

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        if self.socket_path.exists():
            self.socket_path.unlink()
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o077)
        try:
            server = await asyncio.start_unix_server(self.handle, path=str(self.socket_path),
                                                     limit=MAX_LINE)
        finally:
            os.umask(old)
        log.info("control plane listening on %s (trust domain %s)", self.socket_path, self.trust_domain)
        if ready:
            ready.set()
        async with server:
            await server.serve_forever()
