"""The `meshlane` command line (click).

Machine output on stdout (`-o short|json|yaml` on listings), progress and warnings on
stderr, one-line errors `meshlane: <what> (<what to check>)` with sysexits-style codes:
64 usage, 65 bad input, 66 not found, 69 agent unavailable, 77 needs root.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import click
import yaml

from meshcore import constants as C
from meshcore import netns
from meshcore.errors import (BadInputError, MeshError, NeedsRootError, NotFoundError,
                             UnavailableError, UsageError)

OUTPUT = click.option("-o", "--output", type=click.Choice(["short", "json", "yaml"]), default="short",
                      show_default=True, help="output format")
LAB = click.option("--lab", envvar="MESHLANE_LAB", default="ml", show_default=True,
                   help="lab name (namespaces are <lab>-<node>, <lab>-<pod>)")


def emit(data, output: str, table=None) -> None:
    if output == "json":
        click.echo(json.dumps(data, indent=2))
    elif output == "yaml":
        click.echo(yaml.safe_dump(data, sort_keys=False), nl=False)
    elif table is not None:
        rows = table(data)
        if rows:
            widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
            for r in rows:
                click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    else:
        click.echo(data)


def _logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise NeedsRootError(f"{what} needs root", hint="run with sudo")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """meshlane: a sidecar-less service mesh data plane (BPF fast path, Python ztunnel)."""


# --- daemons --------------------------------------------------------------------------

@cli.command()
@click.option("--state-dir", required=True, type=click.Path(file_okay=False))
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False))
@click.option("--cacerts", type=click.Path(file_okay=False), default=None,
              help="plug-in CA directory (root-cert.pem, cert-chain.pem, ca-cert.pem, ca-key.pem)")
@click.option("--trust-domain", default=C.DEFAULT_TRUST_DOMAIN, show_default=True)
def control(state_dir, socket_path, cacerts, trust_domain) -> None:
    """Run the control plane (store + CA)."""
    from meshlane.control import ControlPlane
    _logging()
    cp = ControlPlane(state_dir=Path(state_dir), socket_path=Path(socket_path),
                      cacerts=Path(cacerts) if cacerts else None, trust_domain=trust_domain)
    asyncio.run(cp.serve())


@cli.command()
@click.option("--name", required=True, help="node name (as pods' spec.nodeName)")
@click.option("--pin-name", default=None, help="pin directory name (default: the node name)")
@click.option("--control", "control_socket", required=True)
@click.option("--zds", required=True, help="unix socket to hand pods to the ztunnel")
@click.option("--node-netns", default=None)
@click.option("--fastpath/--no-fastpath", default=True, show_default=True,
              help="node-wide switch of the same-node kernel fast path (sockmap splice)")
def node(name, pin_name, control_socket, zds, node_netns, fastpath) -> None:
    """Run the node agent (BPF programs, enrolment)."""
    from meshlane.node import NodeAgent
    _need_root("the node agent")
    _logging()
    agent = NodeAgent(node=name, pin_name=pin_name or name, control_socket=control_socket,
                      zds_socket=zds, node_netns=node_netns, fastpath=fastpath)
    asyncio.run(agent.run())


@cli.command()
@click.option("--node", "node_name", required=True)
@click.option("--control", "control_socket", required=True)
@click.option("--zds", required=True)
@click.option("--token-file", required=True, type=click.Path(dir_okay=False))
@click.option("--maps-dir", required=True, help="the node's pinned maps directory")
@click.option("--node-netns", default=None, help="netns for 15000/15021 (default: our own)")
@click.option("--trust-domain", default=C.DEFAULT_TRUST_DOMAIN, show_default=True)
def ztunnel(node_name, control_socket, zds, token_file, maps_dir, node_netns, trust_domain) -> None:
    """Run the ztunnel (mTLS + HBONE) for one node."""
    from slowpath.ztunnel import Ztunnel
    _need_root("the ztunnel")
    _logging()
    try:
        token = Path(token_file).read_text().strip()
    except OSError as exc:
        raise NotFoundError(f"cannot read the node token {token_file}: {exc.strerror}") from None
    zt = Ztunnel(node=node_name, control_socket=control_socket, zds_socket=zds, token=token,
                 maps_dir=maps_dir, node_netns=node_netns, trust_domain=trust_domain)
    try:
        import uvloop  # optional
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(zt.run())


# --- lab ------------------------------------------------------------------------------

@cli.group()
def lab() -> None:
    """Build, inspect and tear down the netns lab."""


@lab.command("up")
@LAB
@click.option("--topology", type=click.Path(dir_okay=False), default=None,
              help="topology YAML (default: node1/node2 with client-1, server-1, server-2, legacy-2)")
@click.option("--cacerts", type=click.Path(file_okay=False), default=None,
              help="plug-in CA in Istio's cacerts layout (default: a self-signed root)")
def lab_up(lab, topology, cacerts) -> None:
    from meshlane import lab as labmod
    state = labmod.up(lab, topology, cacerts=cacerts)
    labmod.progress(f"lab {lab!r} is up in {state['ready_seconds']} s "
                    f"({len(state['nodes'])} nodes, {len(state['pods'])} pods); "
                    f"tear it down with `meshlane lab down`")


@lab.command("down")
@LAB
def lab_down(lab) -> None:
    from meshlane import lab as labmod
    labmod.down(lab)


@lab.command("status")
@LAB
@OUTPUT
def lab_status(lab, output) -> None:
    from meshlane import lab as labmod
    st = labmod.status(lab)
    if not st["controlPlane"]:  # else every pod would just read "not enrolled"
        labmod.progress(f"warning: the control plane of lab {lab!r} is not reachable "
                        f"({labmod.LabPaths(lab).control_socket}); enrolment is unknown")
    emit(st, output, table=lambda s: [("POD", "NODE", "NAMESPACE", "SERVICEACCOUNT", "IP", "ENROLLED")] +
         [(p["name"], p["node"], p["namespace"], p["serviceAccount"], p["ip"], str(p["enrolled"]).lower())
          for p in s["pods"]])


@lab.command("exec", context_settings={"ignore_unknown_options": True})
@LAB
@click.argument("pod")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def lab_exec(lab, pod, cmd) -> None:
    """Run CMD inside POD's network namespace: meshlane lab exec client-1 -- curl ..."""
    from meshlane import lab as labmod
    p = labmod.resolve_pod(lab, pod)
    try:
        os.execvp("ip", ["ip", "netns", "exec", p["netns"], *cmd])
    except OSError as exc:
        raise MeshError(f"cannot run {cmd[0]!r} in {p['netns']}: {exc.strerror}") from None


# --- enrolment ------------------------------------------------------------------------

def _control(lab: str) -> str:
    from meshlane import lab as labmod
    labmod.load_state(lab)
    return str(labmod.LabPaths(lab).control_socket)


def _pod_obj(sock: str, ns: str, name: str) -> dict | None:
    from slowpath.control_client import call, ControlError
    try:
        return call(sock, "get", kind="Pod", namespace=ns, name=name)["objects"][0]
    except (NotFoundError, ControlError):
        return None


def _wait_enrolled(sock: str, ns: str, name: str, want: bool, timeout: float = 30) -> None:
    from meshlane.lab import wait_for
    wait_for(f"pod {ns}/{name} to be {'enrolled' if want else 'unenrolled'}",
             lambda: (lambda o: (o is None and not want) or
                      (o is not None and bool((o.get("status") or {}).get("enrolled")) == want))(
                 _pod_obj(sock, ns, name)), timeout)


def _netns_ip(ref: str) -> str:
    try:
        with netns.entered(ref):
            res = subprocess.run(["ip", "-4", "-j", "addr", "show", "dev", "eth0", "scope", "global"],
                                 capture_output=True, text=True)
    except OSError as exc:  # e.g. a path that is not a netns file: setns gives EINVAL
        raise BadInputError(f"{ref} is not a network namespace ({exc.strerror or exc})") from None
    # the node agent puts the pod's egress program on eth0 (fastpath.pod), so a netns
    # without it can never be enrolled: refuse now instead of timing out later
    if res.returncode != 0:
        raise BadInputError(f"network namespace {ref} has no interface eth0",
                            hint="the pod's interface must be called eth0")
    addrs = [a["local"] for link in json.loads(res.stdout or "[]") for a in link.get("addr_info", [])]
    if not addrs:
        raise BadInputError(f"network namespace {ref} has no global IPv4 address on eth0",
                            hint="configure the pod's interface before attaching it")
    return addrs[0]


def _resolve_target(lab: str, pod: str, namespace: str | None):
    """-> (control socket, namespace, name, lab pod or None, netns path or None)"""
    from meshlane import lab as labmod
    sock = _control(lab)
    state = labmod.load_state(lab)
    for p in state["pods"]:
        if p["name"] == pod and (namespace is None or namespace == p["namespace"]):
            return sock, p["namespace"], p["name"], p, p["netns"]
    if "/" in pod or (netns.NETNS_RUN_DIR / pod).exists():
        path = str(netns.resolve(pod))
        name = (f"pid-{pod.split('/')[2]}" if pod.startswith("/proc/") else Path(pod).name)
        if namespace is None:
            # the namespace it was attached in, so `detach NETNS` finds it without -n
            from slowpath.control_client import call
            namespace = next((o["metadata"]["namespace"] for o in call(sock, "get", kind="Pod")["objects"]
                              if o["metadata"]["name"] == name and (o.get("spec") or {}).get("netns") == path),
                             "default")
        return sock, namespace, name, None, path
    raise NotFoundError(f"no pod {pod!r}: not a pod of lab {lab!r}, a netns under /run/netns, "
                        "or a /proc/PID/ns/net path",
                        hint=f"lab pods: {', '.join(p['name'] for p in state['pods'])}")


@cli.command()
@LAB
@click.argument("pod")
@click.option("-n", "--namespace", default=None, help="namespace of the pod (netns pods: default 'default')")
@click.option("--service-account", default="default", show_default=True,
              help="identity for a pod that is not in the lab")
@click.option("--node", "node_name", default=None, help="node of a pod that is not in the lab")
def attach(lab, pod, namespace, service_account, node_name) -> None:
    """Enrol POD in the mesh (a lab pod, a netns name, or /proc/PID/ns/net)."""
    from slowpath.control_client import call
    _need_root("attach")
    sock, ns, name, labpod, path = _resolve_target(lab, pod, namespace)
    obj = _pod_obj(sock, ns, name)
    if obj and (obj.get("status") or {}).get("enrolled"):
        click.echo(f"pod {ns}/{name} is already attached", err=True)
        return
    from meshlane import lab as labmod
    t0 = time.monotonic()
    prev = ((obj or {}).get("metadata") or {}).get("labels", {}).get(C.LABEL_DATAPLANE_MODE)
    if labpod is None:
        nodes = labmod.load_state(lab)["nodes"]
        node_name = node_name or nodes[0]["name"]
        if node_name not in {n["name"] for n in nodes}:
            raise UsageError(f"--node {node_name!r} is not a node of lab {lab!r}")
        call(sock, "put", object={"kind": "Pod", "metadata": {"name": name, "namespace": ns,
             "labels": {C.LABEL_DATAPLANE_MODE: C.DATAPLANE_AMBIENT}},
             "spec": {"nodeName": node_name, "serviceAccountName": service_account, "netns": path},
             "status": {"podIP": _netns_ip(path), "enrolled": False}})
    else:
        call(sock, "label", kind="Pod", namespace=ns, name=name,
             set={C.LABEL_DATAPLANE_MODE: C.DATAPLANE_AMBIENT}, remove=[], overwrite=True)
    try:
        _wait_enrolled(sock, ns, name, True)
    except MeshError as exc:
        # undo our request, so a pod the node agent could not enrol is not left behind
        # half-attached (in the store, seen by the ztunnels, but not in the kernel)
        try:
            if labpod is None:
                call(sock, "delete", kind="Pod", namespace=ns, name=name)
            else:
                call(sock, "label", kind="Pod", namespace=ns, name=name,
                     set={} if prev is None else {C.LABEL_DATAPLANE_MODE: prev},
                     remove=[C.LABEL_DATAPLANE_MODE] if prev is None else [], overwrite=True)
        except MeshError:
            pass
        node_of = labpod["node"] if labpod else node_name
        raise UnavailableError(f"attaching {ns}/{name} failed and was rolled back: {exc.message}",
                               hint=f"see {labmod.LabPaths(lab).run / 'logs' / f'node-{node_of}.log'}") from None
    click.echo(f"attached {ns}/{name} in {(time.monotonic() - t0) * 1000:.0f} ms", err=True)


@cli.command()
@LAB
@click.argument("pod")
@click.option("-n", "--namespace", default=None)
def detach(lab, pod, namespace) -> None:
    """Take POD out of the mesh; its traffic is plain TCP again."""
    from slowpath.control_client import call
    _need_root("detach")
    sock, ns, name, labpod, path = _resolve_target(lab, pod, namespace)
    obj = _pod_obj(sock, ns, name)
    if obj is None or not (obj.get("status") or {}).get("enrolled"):
        raise UsageError(f"pod {ns}/{name} is not attached", hint="see `meshlane lab status`")
    # label it out first and wait for the node agent to report it unenrolled (kernel
    # state and ztunnel listeners gone); only then forget a pod that is not the lab's
    call(sock, "label", kind="Pod", namespace=ns, name=name,
         set={C.LABEL_DATAPLANE_MODE: C.DATAPLANE_NONE}, remove=[], overwrite=True)
    _wait_enrolled(sock, ns, name, False)
    if labpod is None:
        call(sock, "delete", kind="Pod", namespace=ns, name=name)
    click.echo(f"detached {ns}/{name}", err=True)


def _parse_labels(items: tuple[str, ...]) -> tuple[dict, list]:
    sets, removes = {}, []
    for it in items:
        if it.endswith("-") and "=" not in it:
            removes.append(it[:-1])
        elif "=" in it:
            k, v = it.split("=", 1)
            if not k:
                raise UsageError(f"label {it!r} has an empty key")
            sets[k] = v
        else:
            raise UsageError(f"label {it!r} is neither key=value nor key-")
    return sets, removes


@cli.command()
@LAB
@click.argument("kind", type=click.Choice(["namespace", "ns", "pod", "service", "svc"]))
@click.argument("name")
@click.argument("labels", nargs=-1, required=True)
@click.option("-n", "--namespace", default="default", help="namespace of a pod or service")
@click.option("--overwrite", is_flag=True, help="replace an existing value")
def label(lab, kind, name, labels, namespace, overwrite) -> None:
    """Set (key=value) or remove (key-) labels, kubectl style.

    `meshlane label namespace demo istio.io/use-waypoint=waypoint` sends the namespace's
    Service traffic through that waypoint; on a Service it does so for that Service only
    (`istio.io/use-waypoint=none` on a Service opts it out of its namespace's)."""
    from slowpath.control_client import call
    sets, removes = _parse_labels(labels)  # a usage error first, whether the lab is up or not
    sock = _control(lab)
    k = {"namespace": "Namespace", "ns": "Namespace", "pod": "Pod"}.get(kind, "Service")
    args = {"namespace": namespace} if k != "Namespace" else {}
    # an unknown namespace or pod is NotFound (66), as kubectl answers; nothing is created
    call(sock, "label", kind=k, name=name, set=sets, remove=removes, overwrite=overwrite, **args)
    click.echo(f"{k.lower()}/{name} labeled", err=True)


# --- resources ------------------------------------------------------------------------

FILES = click.option("-f", "--filename", "files", multiple=True,
                     help="YAML file with one or more documents (- for stdin); repeatable")


@cli.command()
@LAB
@FILES
def apply(lab, files) -> None:
    """Create or update resources from YAML files: AuthorizationPolicy, Namespace, Service,
    Gateway (waypoints), HTTPRoute, DestinationRule.

    Every document of every file is validated before anything changes (fields, and what
    routes refer to): one bad field and nothing is applied.  Fields that do nothing
    where the policy applies are reported as warnings."""
    from meshlane import resources
    from slowpath.control_client import call
    if not files:
        raise UsageError("apply needs -f FILE")
    loaded = [resources.read_docs(f) for f in files]  # YAML problems before anything else
    sock = _control(lab)
    for name, docs in loaded:
        call(sock, "apply", objects=docs, src=name, dry_run=True)
    for name, docs in loaded:
        ans = call(sock, "apply", objects=docs, src=name)
        for w in ans["warnings"]:
            click.echo(f"Warning: {w}", err=True)
        for r in ans["results"]:
            click.echo(f"{resources.describe(r['kind'], r['name'])} {r['result']}")


def _labels_text(o: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in (o["metadata"].get("labels") or {}).items()) or "<none>"


def _programmed(o: dict) -> str:
    for c in (o.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Programmed":
            return c.get("status", "Unknown")
    return "Unknown"


L7_TABLES = {
    "Service": lambda os_: [("NAMESPACE", "NAME", "VIP", "PORTS", "LABELS")] + [
        (o["metadata"].get("namespace", ""), o["metadata"]["name"], o["spec"].get("clusterIP", ""),
         ",".join(f"{p['port']}/{p.get('targetPort', p['port'])}" for p in o["spec"].get("ports", [])),
         _labels_text(o)) for o in os_],
    "Gateway": lambda os_: [("NAMESPACE", "NAME", "CLASS", "ADDRESS", "PROGRAMMED")] + [
        (o["metadata"].get("namespace", ""), o["metadata"]["name"], o["spec"].get("gatewayClassName", ""),
         ",".join(a.get("value", "") for a in (o.get("status") or {}).get("addresses") or []) or "<pending>",
         _programmed(o)) for o in os_],
    "HTTPRoute": lambda os_: [("NAMESPACE", "NAME", "PARENTS", "RULES")] + [
        (o["metadata"].get("namespace", ""), o["metadata"]["name"],
         ",".join(f"{r.get('kind', 'Service')}/{r['name']}" + (f":{r['port']}" if r.get("port") else "")
                  for r in o["spec"].get("parentRefs", [])), str(len(o["spec"].get("rules") or [{}])))
        for o in os_],
    "DestinationRule": lambda os_: [("NAMESPACE", "NAME", "HOST")] + [
        (o["metadata"].get("namespace", ""), o["metadata"]["name"], o["spec"].get("host", "")) for o in os_],
}


def _policy_row(o: dict) -> tuple:
    spec = o.get("spec") or {}
    meta = o["metadata"]
    if spec.get("targetRef") or spec.get("targetRefs"):
        scope = "targetRefs (waypoint)"
    elif (spec.get("selector") or {}).get("matchLabels"):
        scope = ",".join(f"{k}={v}" for k, v in spec["selector"]["matchLabels"].items())
    else:
        scope = "mesh-wide" if meta.get("namespace") == C.ROOT_NAMESPACE else "namespace"
    rules = spec.get("rules")
    return (meta.get("namespace", ""), meta["name"], spec.get("action", "ALLOW"), scope,
            "none" if rules is None else str(len(rules)))


@cli.command()
@LAB
@click.argument("resource")
@click.argument("name", required=False)
@click.option("-n", "--namespace", default=None, help="only this namespace (default: every namespace)")
@OUTPUT
def get(lab, resource, name, namespace, output) -> None:
    """List resources: authorizationpolicies (ap), namespaces (ns), pods, services (svc),
    gateways (gtw), httproutes, destinationrules (dr)."""
    from meshlane import resources
    from slowpath.control_client import call
    kind = resources.KIND_NAMES.get(resource.lower())
    if kind is None:
        raise UsageError(f"unknown resource type {resource!r}",
                         hint=f"one of {', '.join(sorted(resources.KIND_NAMES))}")
    sock = _control(lab)
    args = {"kind": kind}
    if namespace is not None and kind != "Namespace":
        args["namespace"] = namespace
    if name is not None:
        args["name"] = name
        if kind != "Namespace":
            args["namespace"] = namespace or "default"
    objs = call(sock, "get", **args)["objects"]
    if output == "short" and not objs:
        click.echo(f"No {resource} found" + (f" in namespace {namespace}" if namespace else ""), err=True)
        return
    data = objs if name is None or output == "short" else objs[0]
    if kind == "AuthorizationPolicy":
        table = lambda os_: [("NAMESPACE", "NAME", "ACTION", "SCOPE", "RULES")] + [_policy_row(o) for o in os_]
    elif kind in L7_TABLES:
        table = L7_TABLES[kind]
    elif kind == "Namespace":
        table = lambda os_: [("NAME", "LABELS")] + [(o["metadata"]["name"], ",".join(
            f"{k}={v}" for k, v in (o["metadata"].get("labels") or {}).items()) or "<none>") for o in os_]
    else:
        table = lambda os_: [("NAMESPACE", "NAME", "NODE", "IP", "ENROLLED")] + [
            (o["metadata"].get("namespace", ""), o["metadata"]["name"], o.get("spec", {}).get("nodeName", ""),
             (o.get("status") or {}).get("podIP", ""), str(bool((o.get("status") or {}).get("enrolled"))).lower())
            for o in os_]
    emit(data, output, table=table)


@cli.command()
@LAB
@click.argument("resource", required=False)
@click.argument("name", required=False)
@FILES
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("--ignore-not-found", is_flag=True, help="delete what exists, without an error for the rest")
def delete(lab, resource, name, files, namespace, ignore_not_found) -> None:
    """Delete resources named in YAML files (-f) or by type and name."""
    from meshlane import resources
    from slowpath.control_client import call
    if files and (resource or name):
        raise UsageError("give either -f FILE or RESOURCE NAME, not both")
    if files:
        objs = []
        for f in files:
            src, docs = resources.read_docs(f)
            for i, d in enumerate(docs):
                if not isinstance(d, dict) or not isinstance((d.get("metadata") or {}).get("name"), str):
                    raise BadInputError(f"{src}: docs[{i}].metadata.name: required to delete an object")
                objs.append(d)
    elif resource and name:
        kind = resources.KIND_NAMES.get(resource.lower())
        if kind is None:
            raise UsageError(f"unknown resource type {resource!r}")
        objs = [{"kind": kind, "metadata": {"name": name, "namespace": namespace}}]
    else:
        raise UsageError("delete needs -f FILE, or RESOURCE NAME")
    ans = call(_control(lab), "delete_objects", objects=objs, ignore_not_found=ignore_not_found)
    for r in ans["results"]:
        click.echo(f"{resources.describe(r['kind'], r['name'])} {r['result']}")


# --- bootstrap tokens -------------------------------------------------------------------

CONTROL = click.option("--control", "control_socket", envvar="MESHLANE_CONTROL", default=None,
                       type=click.Path(dir_okay=False),
                       help="control plane socket (default: the one of --lab)")


@cli.group()
def token() -> None:
    """Bootstrap tokens: how a node joins (kubeadm token style).

    An operator creates a token and gives it to the node out of band; the node registers
    with it once and gets its node token.  Tokens are `<id>.<secret>`, single use, always
    expire, and are stored hashed.  An unbound token registers a new node name only; one
    created with --node NAME registers NAME, also to re-provision an existing node.
    Today whoever can open the control plane's root-only socket is an operator."""


def _token_socket(lab: str, control_socket: str | None) -> str:
    return control_socket or _control(lab)


@token.command("create")
@LAB
@CONTROL
@click.option("--node", "node_name", default=None,
              help="bind the token to this node name (it may then also re-provision that node)")
@click.option("--ttl", default="24h", show_default=True, help="lifetime: 30m, 1h, 24h, ...")
@click.option("--description", default="", help="a note shown by `token list`")
@OUTPUT
def token_create(lab, control_socket, node_name, ttl, description, output) -> None:
    """Create a bootstrap token and print it (the secret is shown only here)."""
    from meshcore.l7parse import parse_duration
    from slowpath.control_client import call
    try:
        seconds = parse_duration(ttl, what="--ttl")
    except BadInputError as exc:
        raise UsageError(exc.message) from None
    if seconds <= 0:
        raise UsageError(f"--ttl {ttl}: must be more than 0 (bootstrap tokens always expire)")
    ans = call(_token_socket(lab, control_socket), "create_token", node=node_name, ttl_seconds=seconds,
               description=description)
    ans.pop("ok", None)
    if output == "short":
        click.echo(ans["token"])
        click.echo(f"bootstrap token {ans['id']} expires {ans['expires']}; "
                   + (f"registers node {node_name} only" if node_name else "registers one new node"),
                   err=True)
    else:
        emit(ans, output)


@token.command("list")
@LAB
@CONTROL
@OUTPUT
def token_list(lab, control_socket, output) -> None:
    """List bootstrap tokens (ids and state; secrets are not stored)."""
    from slowpath.control_client import call
    tokens = call(_token_socket(lab, control_socket), "list_tokens")["tokens"]
    if output == "short" and not tokens:
        click.echo("No bootstrap tokens found", err=True)
        return

    def ttl(t: dict) -> str:
        if t["status"] != "valid":
            return "<invalid>"
        s = t["ttlSeconds"]
        return f"{s // 3600}h{s % 3600 // 60}m" if s >= 3600 else f"{s // 60}m{s % 60}s"
    emit(tokens, output, table=lambda ts: [("ID", "NODE", "TTL", "EXPIRES", "STATUS", "DESCRIPTION")] + [
        (t["id"], t["node"] or "<any new node>", ttl(t), t["expires"],
         f"used by {t['usedBy']}" if t["status"] == "used" else t["status"], t["description"])
        for t in ts])


@token.command("delete")
@LAB
@CONTROL
@click.argument("ids", nargs=-1, required=True)
def token_delete(lab, control_socket, ids) -> None:
    """Delete bootstrap tokens by id (or whole token): they can no longer register a node."""
    from slowpath.control_client import call
    sock = _token_socket(lab, control_socket)
    for i in ids:
        ans = call(sock, "delete_token", id=i)
        click.echo(f"bootstrap token {ans['id']!r} deleted")


# --- waypoints --------------------------------------------------------------------------

@cli.command(hidden=True)
@LAB
def waypointd(lab) -> None:
    """Run the lab's waypoint controller (started by `lab up`)."""
    from meshlane import waypointd as wpd
    _need_root("the waypoint controller")
    _logging()
    wpd.run(lab)


@cli.group()
def waypoint() -> None:
    """Waypoints: per-namespace Envoys for L7 (istioctl waypoint style)."""


def _gateway_obj(namespace: str, name: str, waypoint_for: str, node: str | None) -> dict:
    from meshcore import l7
    meta = {"name": name, "namespace": namespace, "labels": {l7.LABEL_WAYPOINT_FOR: waypoint_for}}
    if node:
        meta["annotations"] = {l7.ANNOTATION_NODE: node}
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": meta,
            "spec": {"gatewayClassName": l7.WAYPOINT_CLASS,
                     "listeners": [{"name": "mesh", "port": C.PORT_HBONE, "protocol": "HBONE"}]}}


def _wait_programmed(sock: str, namespace: str, name: str, timeout: float) -> dict:
    from slowpath.control_client import call
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        obj = call(sock, "get", kind="Gateway", namespace=namespace, name=name)["objects"][0]
        for c in (obj.get("status") or {}).get("conditions") or []:
            if c.get("type") == "Programmed":
                last = c
                if c.get("status") == "True":
                    return obj
        time.sleep(0.2)
    why = f" (last: {last.get('reason')}: {last.get('message')})" if last else ""
    raise UnavailableError(f"waypoint {namespace}/{name} not programmed after {timeout:.0f}s{why}",
                           hint="see `meshlane waypoint status` and the lab's logs/waypointd.log")


@waypoint.command("apply")
@LAB
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("--name", default="waypoint", show_default=True)
@click.option("--for", "waypoint_for", type=click.Choice(["service", "workload", "all", "none"]),
              default="service", show_default=True, help="which traffic the waypoint takes")
@click.option("--enroll-namespace", is_flag=True,
              help="also label the namespace istio.io/use-waypoint=<name>")
@click.option("--node", "node_name", default=None, help="lab node to run it on (default: the first)")
@click.option("--wait/--no-wait", default=True, show_default=True, help="wait until Envoy runs it")
@click.option("--timeout", default=60.0, show_default=True)
def waypoint_apply(lab, namespace, name, waypoint_for, enroll_namespace, node_name, wait, timeout) -> None:
    """Create or update a waypoint (a Gateway of class istio-waypoint)."""
    from slowpath.control_client import call
    sock = _control(lab)
    ans = call(sock, "apply", objects=[_gateway_obj(namespace, name, waypoint_for, node_name)],
               src="waypoint apply")
    for w in ans["warnings"]:
        click.echo(f"Warning: {w}", err=True)
    click.echo(f"waypoint {namespace}/{name} {ans['results'][0]['result']}", err=True)
    if enroll_namespace:
        call(sock, "label", kind="Namespace", name=namespace,
             set={C.LABEL_USE_WAYPOINT: name}, remove=[], overwrite=True)
        click.echo(f"namespace {namespace} labeled with \"{C.LABEL_USE_WAYPOINT}={name}\"", err=True)
    if wait:
        obj = _wait_programmed(sock, namespace, name, timeout)
        info = (obj.get("status") or {}).get("meshlane") or {}
        click.echo(f"waypoint {namespace}/{name} programmed: pod {info.get('pod')} on "
                   f"{info.get('node')} at {info.get('ip')}", err=True)


@waypoint.command("list")
@LAB
@click.option("-n", "--namespace", default=None, help="only this namespace (default: every namespace)")
@OUTPUT
def waypoint_list(lab, namespace, output) -> None:
    """List waypoints."""
    from meshcore import l7
    from slowpath.control_client import call
    args = {"namespace": namespace} if namespace else {}
    objs = [o for o in call(_control(lab), "get", kind="Gateway", **args)["objects"]
            if (o.get("spec") or {}).get("gatewayClassName") == l7.WAYPOINT_CLASS]
    if output == "short" and not objs:
        click.echo("No waypoints found" + (f" in namespace {namespace}" if namespace else ""), err=True)
        return
    emit(objs, output, table=lambda os_: [("NAMESPACE", "NAME", "FOR", "NODE", "ADDRESS", "PROGRAMMED")] + [
        (o["metadata"]["namespace"], o["metadata"]["name"],
         (o["metadata"].get("labels") or {}).get(l7.LABEL_WAYPOINT_FOR, "service"),
         ((o.get("status") or {}).get("meshlane") or {}).get("node", ""),
         ((o.get("status") or {}).get("meshlane") or {}).get("ip", "<pending>"), _programmed(o))
        for o in os_])


def _waypoint_admin(info: dict, path: str) -> str:
    from meshlane.waypointd import admin_get   # Envoy's admin answers chunked: it decodes that
    try:
        code, body = admin_get(info["netns"], path, timeout=5, port=int(info.get("adminPort", 15000)))
    except (OSError, KeyError) as exc:
        raise UnavailableError(f"the waypoint's Envoy admin is not reachable: {exc}",
                               hint="is the waypoint running? see `meshlane waypoint list`") from None
    if code != 200:
        raise UnavailableError(f"the waypoint's Envoy admin answered {code} for {path}")
    return body


@waypoint.command("status")
@LAB
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("--name", default="waypoint", show_default=True)
@click.option("--log-lines", default=10, show_default=True, help="access log lines to show")
@OUTPUT
def waypoint_status(lab, namespace, name, log_lines, output) -> None:
    """A waypoint's pod, identity, config version, HTTP statistics (from Envoy's admin
    on 127.0.0.1:15000 inside its pod) and last access log lines (JSON)."""
    from slowpath.control_client import call
    from slowpath.envoy_hbone import parse_stats
    obj = call(_control(lab), "get", kind="Gateway", namespace=namespace, name=name)["objects"][0]
    st = obj.get("status") or {}
    info = st.get("meshlane") or {}
    data = {"name": name, "namespace": namespace, "conditions": st.get("conditions") or [], **info}
    if info.get("netns"):
        stats = parse_stats(_waypoint_admin(info, "/stats?filter=%5Ehttp%5C."))
        data["httpStats"] = {k: v for k, v in sorted(stats.items())
                             if k.startswith("http.") and (".downstream_rq_" in k or ".rbac." in k
                                                           or "ratelimit" in k or ".fault." in k)
                             and v}
    access = Path(info["accessLog"]) if info.get("accessLog") else None
    lines = access.read_text(errors="replace").splitlines()[-log_lines:] if access and access.exists() else []
    data["accessLog"] = [json.loads(x) if x.startswith("{") else x for x in lines]
    if output != "short":
        emit(data, output)
        return
    for c in data["conditions"]:
        click.echo(f"{c.get('type')}: {c.get('status')} {c.get('reason', '')} {c.get('message', '')}".rstrip())
    for k in ("pod", "node", "ip", "identity", "envoyPid", "adminPort", "configVersion", "accessLog"):
        if k in info:
            click.echo(f"{k}: {info[k]}")
    if data.get("httpStats"):
        click.echo("HTTP statistics:")
        for k, v in data["httpStats"].items():
            click.echo(f"  {k}: {v}")
    if lines:
        click.echo(f"last {len(lines)} requests:")
        for x in lines:
            click.echo(f"  {x}")


@waypoint.command("delete")
@LAB
@click.argument("names", nargs=-1)
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("--all", "all_", is_flag=True, help="every waypoint of the namespace")
@click.option("--wait/--no-wait", default=True, show_default=True, help="wait until its pod is gone")
def waypoint_delete(lab, names, namespace, all_, wait) -> None:
    """Delete waypoints (default: the one named `waypoint`).  Its pod, Envoy and files go too."""
    from meshcore import l7
    from slowpath.control_client import call
    sock = _control(lab)
    if all_:
        names = tuple(o["metadata"]["name"] for o in call(sock, "get", kind="Gateway", namespace=namespace)["objects"]
                      if (o.get("spec") or {}).get("gatewayClassName") == l7.WAYPOINT_CLASS)
    names = names or ("waypoint",)
    ans = call(sock, "delete_objects", objects=[{"kind": "Gateway", "metadata": {"name": n, "namespace": namespace}}
                                               for n in names])
    for r in ans["results"]:
        click.echo(f"waypoint {namespace}/{r['name']} {r['result']}", err=True)
    if wait:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = [o for o in call(sock, "get", kind="Pod", namespace=namespace)["objects"]
                    if (o["metadata"].get("labels") or {}).get(l7.LABEL_GATEWAY_NAME) in names]
            if not left:
                return
            time.sleep(0.2)
        raise UnavailableError(f"the pods of waypoint(s) {', '.join(names)} are still there after 30s",
                               hint="see the lab's logs/waypointd.log")


# --- inspection -----------------------------------------------------------------------

@cli.group()
def zc() -> None:
    """ztunnel configuration (istioctl ztunnel-config style)."""


def _zt_dump(lab: str, node_name: str | None, path: str = "/config_dump"):
    from meshlane import lab as labmod
    state = labmod.load_state(lab)
    nodes = {n["name"]: n for n in state["nodes"]}
    node_name = node_name or next(iter(nodes))
    if node_name not in nodes:
        raise UsageError(f"no node {node_name!r} in lab {lab!r}")
    try:
        code, body = labmod.http_get_in_netns(nodes[node_name]["netns"], C.PORT_ADMIN, path)
    except OSError as exc:
        from meshcore.errors import UnavailableError
        raise UnavailableError(f"ztunnel admin on {node_name} (127.0.0.1:{C.PORT_ADMIN} in "
                               f"{nodes[node_name]['netns']}) not reachable: {exc}") from None
    return json.loads(body)


@zc.command("workloads")
@LAB
@click.option("--node", "node_name", default=None, help="whose ztunnel to ask (default: first node)")
@OUTPUT
def zc_workloads(lab, node_name, output) -> None:
    dump = _zt_dump(lab, node_name)
    emit(dump["workloads"], output, table=lambda ws: [("NAMESPACE", "POD NAME", "ADDRESS", "NODE",
                                                       "PROTOCOL", "IDENTITY")] +
         [(w["namespace"], w["name"], w["ip"], w["node"], w["protocol"], w["identity"]) for w in ws])


@zc.command("connections")
@LAB
@click.option("--node", "node_name", default=None, help="whose connections (default: first node)")
@click.option("--recent", is_flag=True, help="closed connections (the ztunnel's access records) instead")
@OUTPUT
def zc_connections(lab, node_name, recent, output) -> None:
    """Open connections of a node's pods and the path each takes: FAST (same node,
    spliced in the kernel, never seen by the ztunnel), HBONE (mTLS tunnel), TCP
    (plaintext into an enrolled pod) or PASSTHROUGH (to a destination outside the mesh)."""
    from meshlane import lab as labmod
    state = labmod.load_state(lab)
    node_name = node_name or state["nodes"][0]["name"]
    dump = _zt_dump(lab, node_name, "/connections")
    if recent:
        emit(dump["recent"], output, table=lambda rs: [("DIRECTION", "PROTOCOL", "SRC", "SRC IDENTITY", "DST",
                                                        "STATUS")] +
             [(r.get("direction"), r.get("protocol"), r.get("src"), r.get("src_identity") or "-",
               r.get("dst"), r.get("status", r.get("error", "ok"))) for r in rs])
        return
    rows = [dict(r, state="open") for r in dump["open"]]
    rows += _fast_connections(lab, node_name)
    emit(rows, output, table=lambda rs: [("PROTOCOL", "DIRECTION", "SRC", "SRC IDENTITY", "DST", "DST IDENTITY",
                                          "STATE")] +
         [(r.get("protocol"), r.get("direction"), r.get("src"), r.get("src_identity") or "-", r.get("dst"),
           r.get("dst_identity") or "-", r.get("state")) for r in rs])


def _fast_connections(lab: str, node_name: str) -> list[dict]:
    """The node's same-node fast-path flows, read from its pinned mesh_fast map."""
    from fastpath import fast
    from fastpath.loader import NodeDatapath
    from meshlane import lab as labmod
    _need_root("reading BPF maps")
    flows = fast.read_pinned(NodeDatapath(labmod.LabPaths(lab).pin_name(node_name)).maps_dir)
    ident = {w["ip"]: w for w in _zt_dump(lab, node_name)["workloads"]}
    rows = []
    for f in flows:
        src, dst = ident.get(f.client[0], {}), ident.get(f.server[0], {})
        rows.append({"protocol": "FAST", "direction": "local",
                     "src": f"{src.get('namespace', '?')}/{src.get('name', '?')} {f.client[0]}:{f.client[1]}",
                     "src_identity": src.get("identity"), "dst": f"{f.server[0]}:{f.server[1]}",
                     "dst_identity": dst.get("identity"),
                     "state": "spliced" if f.spliced else "direct (not spliced)", "flow": f.to_json()})
    return rows


@zc.command("policies")
@LAB
@click.option("--node", "node_name", default=None, help="one node (default: every node)")
@OUTPUT
def zc_policies(lab, node_name, output) -> None:
    """The L4 policies each node's ztunnel enforces (after dropping L7 fields)."""
    from meshlane import lab as labmod
    names = [n["name"] for n in labmod.load_state(lab)["nodes"]] if node_name is None else [node_name]
    out = {n: _zt_dump(lab, n) for n in names}
    data = {n: {"policyRevision": d.get("policyRevision"), "policies": d.get("policies", [])}
            for n, d in out.items()}
    emit(data, output, table=lambda d: [("NODE", "NAMESPACE", "NAME", "SCOPE", "ACTION", "RULES")] +
         [(n, p["namespace"], p["name"], p["scope"] + (f" {p['selector']}" if p["selector"] else ""),
           p["action"], len(p["rules"])) for n, v in d.items() for p in v["policies"]])


@cli.group()
def bpf() -> None:
    """Kernel state of a node."""


@bpf.command("counters")
@LAB
@click.option("--node", "node_name", default=None)
@OUTPUT
def bpf_counters(lab, node_name, output) -> None:
    from fastpath.loader import NodeDatapath
    from meshlane import lab as labmod
    _need_root("reading BPF maps")
    state = labmod.load_state(lab)
    names = [n["name"] for n in state["nodes"]] if node_name is None else [node_name]
    if node_name is not None and node_name not in {n["name"] for n in state["nodes"]}:
        raise UsageError(f"no node {node_name!r} in lab {lab!r}")
    out = {n: NodeDatapath(labmod.LabPaths(lab).pin_name(n)).counters() for n in names}
    emit(out, output, table=lambda d: [("NODE", "COUNTER", "VALUE")] +
         [(n, k, v) for n, cs in d.items() for k, v in cs.items()])


@bpf.group("policy")
def bpf_policy() -> None:
    """Compiled L4 policy entries in the kernel."""


@bpf_policy.command("get")
@LAB
@click.argument("pod")
@click.option("-n", "--namespace", default=None)
@OUTPUT
def bpf_policy_get(lab, pod, namespace, output) -> None:
    """Show POD's kernel policy entries (decided at its connect() and at SYN time for
    plaintext into it), decoded, with the hits of each rule."""
    from fastpath import policy as fpolicy
    from fastpath.loader import NodeDatapath
    from fastpath.pod import pod_key, pod_number
    from meshcore import authz
    from meshcore import bpfsys as libbpf
    from meshlane import lab as labmod
    from slowpath.control_client import call
    _need_root("reading BPF maps")
    sock, ns, name, labpod, _ = _resolve_target(lab, pod, namespace)
    obj = _pod_obj(sock, ns, name)
    if obj is None:
        raise NotFoundError(f"pod {ns}/{name} is not known to the control plane")
    node_name = obj["spec"]["nodeName"]
    ip = (obj.get("status") or {}).get("podIP")
    dp = NodeDatapath(labmod.LabPaths(lab).pin_name(node_name))
    fds = {m: libbpf.obj_get(str(dp.maps_dir / m)) for m in (C.MAP_POL_OUT, C.MAP_POL_IN, C.MAP_RULE_CNT)}
    try:
        pid = pod_number(pod_key(ns, name))
        outs = {k: v for k, v in fpolicy.read_out(fds[C.MAP_POL_OUT]).items() if k[0] == pid}
        ins = {k: v for k, v in fpolicy.read_in(fds[C.MAP_POL_IN]).items() if k[0] == ip}
        policies = authz.policies_from_objects(call(sock, "get", kind=authz.KIND)["objects"])
        names = fpolicy.rule_names(policies)
        hits = fpolicy.rule_hits(fds[C.MAP_RULE_CNT], {v[1] for v in list(outs.values()) + list(ins.values())})
    finally:
        for fd in fds.values():
            os.close(fd)
    by_ip = {(o.get("status") or {}).get("podIP"): f"{o['metadata']['namespace']}/{o['metadata']['name']}"
             for o in call(sock, "get", kind="Pod")["objects"]}
    verdict = {C.VERDICT_ALLOW: "ALLOW", C.VERDICT_DENY: "DENY", C.VERDICT_FAST: "FAST"}

    def row(peer, workload, port, e):
        return {"peer": peer, "workload": workload, "port": port or "*", "verdict": verdict.get(e[0], e[0]),
                "rule": e[1], "ruleName": names.get(e[1], "(unknown: policy changed since)"),
                "ruleHits": hits.get(e[1], 0)}
    data = {"pod": f"{ns}/{name}", "node": node_name, "ip": ip, "podId": pid,
            "connect": [row(k[1], by_ip.get(k[1]), k[2], v) for k, v in sorted(outs.items())],
            "plaintextIn": [row(str(k[2]), None, k[1], v) for k, v in
                            sorted(ins.items(), key=lambda kv: (kv[0][1], kv[0][2]))],
            "counters": {k: v for k, v in dp.counters().items() if k.startswith("policy_")}}
    emit(data, output, table=lambda d: [("DIRECTION", "PEER", "PORT", "VERDICT", "RULE", "HITS")] +
         [("out", f"{r['peer']} ({r['workload']})" if r["workload"] else r["peer"], r["port"], r["verdict"],
           r["ruleName"], r["ruleHits"]) for r in d["connect"]] +
         [("in-plaintext", r["peer"], r["port"], r["verdict"], r["ruleName"], r["ruleHits"])
          for r in d["plaintextIn"]] +
         [("node", k, "", "", "", v) for k, v in d["counters"].items()])


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="meshlane", standalone_mode=False)
        return 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("meshlane: aborted", err=True)
        return 130
    except click.UsageError as exc:
        click.echo(f"meshlane: {exc.format_message()}", err=True)
        return C.EX_USAGE
    except MeshError as exc:
        click.echo(f"meshlane: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
