"""`meshlane control`: the resource store, the CA and the API nodes talk to (istiod's role).

Owns: the persistent store (sqlite under the state dir: Kubernetes-shaped objects keyed
by kind/namespace/name with a revision), watches, node registration, and CSR signing
that is node-scoped: a node may only obtain identities of pods scheduled on it, proven
by the node token it received at registration.  Nodes never see the CA key.
Must not: touch the kernel or network namespaces.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

from meshcore import authz, l7, l7parse
from meshcore import constants as C
from meshcore.errors import BadInputError, MeshError, NotFoundError
from meshcore.identity import SpiffeId
from meshlane.ca import CertificateAuthority
from slowpath.control_client import MAX_LINE

log = logging.getLogger("meshlane.control")

CLUSTER_SCOPED = {"Namespace", "Node"}
L7_KINDS = ("Service", "Gateway", "HTTPRoute", "DestinationRule")
KNOWN_KINDS = {"Namespace", "Node", "Pod", "AuthorizationPolicy", *L7_KINDS}
APPLIED_KINDS = (authz.KIND, "Namespace", *L7_KINDS)


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

    def set_token(self, node: str, token: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO tokens VALUES (?, ?)",
                        (node, hashlib.sha256(token.encode()).hexdigest()))

    def check_token(self, node: str, token: str) -> bool:
        row = self.db.execute("SELECT digest FROM tokens WHERE node=?", (node,)).fetchone()
        return bool(row) and hmac.compare_digest(row[0], hashlib.sha256(token.encode()).hexdigest())


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
        self.store.db.execute("BEGIN")
        try:
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
            self.store.db.execute("COMMIT")
        except BaseException:
            self.store.db.execute("ROLLBACK")
            self.store.rev = self.store.db.execute("SELECT v FROM meta WHERE k='rev'").fetchone()[0]
            raise
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

    def op_register_node(self, name: str, spec: dict | None = None) -> dict:
        token = secrets.token_urlsafe(32)
        self.store.set_token(name, token)
        self.op_put({"kind": "Node", "metadata": {"name": name}, "spec": spec or {}})
        return {"token": token}

    def op_root(self) -> dict:
        return {"root": self.ca.root_pem.decode(), "trustDomain": self.trust_domain}

    def op_sign(self, node: str, token: str, namespace: str, pod: str, csr: str) -> dict:
        if not self.store.check_token(node, token):
            raise MeshError(f"node {node!r} presented a token the control plane did not issue",
                            hint="re-register the node (`meshlane lab up` does it)")
        obj = self.store.get("Pod", namespace, pod)
        if obj is None:
            raise NotFoundError(f"pod {namespace}/{pod} is not known to the control plane")
        scheduled = obj.get("spec", {}).get("nodeName")
        if scheduled != node:
            raise MeshError(f"node {node!r} asked for the identity of pod {namespace}/{pod}, "
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
