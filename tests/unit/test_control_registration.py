"""Node registration and bootstrap tokens against a real control plane: its `serve()` on a
unix socket in a temp dir, driven through slowpath.control_client and the CLI, no mocks.

Each way of becoming a node that issue 12 (item 8) names is tried: registering with no,
a malformed, an unknown, a wrong-secret, an expired or a used bootstrap token; taking
over an existing node with an unbound token, a token bound to another node, a wrong or
another node's node token; replaying a registration; signing another node's pods.  Every
refusal answers EX_NOPERM (77) and changes nothing: no Node object, the node tokens as
they were, the bootstrap token still unused.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from meshcore import constants as C
from meshcore.identity import SpiffeId
from meshlane.cli import main
from meshlane.control import BOOTSTRAP_TOKEN_RE, ControlPlane
from slowpath import certs
from slowpath.control_client import ControlError, call

ROOT = Path(__file__).resolve().parents[2]


class Control:
    """A ControlPlane serving on a unix socket, in a thread with its own event loop (the
    store's sqlite connection stays in the thread that opened it)."""

    def __init__(self, tmp_path: Path):
        self.state = tmp_path / "state"
        self.sock = str(tmp_path / "control.sock")
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._task: asyncio.Task | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self._ready.wait(30), "the control plane did not start"
        if self._failed:
            raise self._failed

    def _run(self) -> None:
        async def main():
            try:
                cp = ControlPlane(state_dir=self.state, socket_path=Path(self.sock))
            except BaseException as exc:
                self._failed = exc
                self._ready.set()
                return
            ready = asyncio.Event()
            self._task = asyncio.ensure_future(cp.serve(ready))
            await ready.wait()
            self._ready.set()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.loop.run_until_complete(main())

    def stop(self) -> None:
        if self._task is not None:
            self.loop.call_soon_threadsafe(self._task.cancel)
        self.thread.join(10)
        self.loop.close()

    def __call__(self, op: str, **args) -> dict:
        return call(self.sock, op, **args)

    # --- reading state back -------------------------------------------------------
    def node_digests(self) -> dict[str, str]:
        """The stored node-token digests, read by a connection of our own (WAL)."""
        db = sqlite3.connect(str(self.state / "store.db"))
        try:
            return dict(db.execute("SELECT node, digest FROM tokens"))
        finally:
            db.close()

    def node(self, name: str) -> dict | None:
        try:
            return self("get", kind="Node", name=name)["objects"][0]
        except ControlError as exc:
            assert exc.exit_code == C.EX_NOINPUT, exc
            return None

    def token(self, id: str) -> dict:
        return next(t for t in self("list_tokens")["tokens"] if t["id"] == id)

    def create(self, **args) -> str:
        return self("create_token", **args)["token"]

    def register(self, name: str, **args) -> str:
        return self("register_node", name=name, **args)["token"]

    def sign(self, node: str, token: str, pod: str) -> dict:
        sa = POD_SA[pod]
        csr = certs.make_csr(certs.generate_key(), SpiffeId(namespace="demo", service_account=sa)).decode()
        return self("sign", node=node, token=token, namespace="demo", pod=pod, csr=csr)


POD_SA = {"pod-a": "sa-a", "pod-b": "sa-b"}


@pytest.fixture
def ctl(tmp_path):
    c = Control(tmp_path)
    for pod, node in (("pod-a", "node-a"), ("pod-b", "node-b")):
        c("put", object={"kind": "Pod", "metadata": {"name": pod, "namespace": "demo"},
                         "spec": {"nodeName": node, "serviceAccountName": POD_SA[pod]}, "status": {}})
    yield c
    c.stop()


def refused(ctl: Control, op: str, match: str, **args) -> str:
    with pytest.raises(ControlError) as e:
        ctl(op, **args)
    assert e.value.exit_code == C.EX_NOPERM, (e.value.exit_code, str(e.value))
    assert re.search(match, str(e.value)), str(e.value)
    return str(e.value)


def id_of(token: str) -> str:
    return token.split(".")[0]


# --- happy paths ------------------------------------------------------------------------

def test_a_node_joins_with_a_bound_token_and_signs_its_own_pods(ctl):
    ans = ctl("create_token", node="node-a", description="rack 3")
    boot = ans["token"]
    assert BOOTSTRAP_TOKEN_RE.match(boot), boot
    assert ans["id"] == id_of(boot) and ans["node"] == "node-a" and ans["status"] == "valid"
    assert 24 * 3600 - 60 <= ans["ttlSeconds"] <= 24 * 3600          # kubeadm's default TTL
    reg = ctl("register_node", name="node-a", bootstrap_token=boot, spec={"podCIDR": "10.244.1.0/24"})
    assert reg["result"] == "registered" and reg["node"] == "node-a"
    assert ctl.node("node-a")["spec"] == {"podCIDR": "10.244.1.0/24"}
    assert ctl.sign("node-a", reg["token"], "pod-a")["spiffe"] == "spiffe://cluster.local/ns/demo/sa/sa-a"
    used = ctl.token(id_of(boot))
    assert used["status"] == "used" and used["usedBy"] == "node-a" and used["description"] == "rack 3"


def test_an_unbound_token_registers_a_new_node(ctl):
    token = ctl.register("node-b", bootstrap_token=ctl.create())
    assert ctl.sign("node-b", token, "pod-b")["spiffe"].endswith("/sa/sa-b")


# --- registering without a valid bootstrap token ------------------------------------------

def test_registering_without_a_token_is_refused_and_changes_nothing(ctl):
    msg = refused(ctl, "register_node", r"needs a bootstrap token", name="node-a", spec={"x": 1})
    assert "meshlane token create --node node-a" in msg
    assert ctl.node("node-a") is None and ctl.node_digests() == {}


@pytest.mark.parametrize("bad, why", [
    ("", "malformed"),
    ("not-a-token", "malformed"),
    ("ABCDEF.0123456789ABCDEF", "malformed"),
    ("abcdef.0123456789abcdef", "unknown bootstrap token 'abcdef' or wrong secret"),
    ("WRONG_SECRET", "unknown bootstrap token '[a-z0-9]{6}' or wrong secret"),
    ("NODE_TOKEN", "malformed"),     # another node's node token is no bootstrap token
])
def test_registering_with_a_bad_token_is_refused_and_changes_nothing(ctl, bad, why):
    good = ctl.create(node="node-a")
    node_b = ctl.register("node-b", bootstrap_token=ctl.create())
    before = ctl.node_digests()
    bad = {"WRONG_SECRET": id_of(good) + ".0123456789abcdef", "NODE_TOKEN": node_b}.get(bad, bad)
    msg = refused(ctl, "register_node", why, name="node-a", bootstrap_token=bad)
    assert "meshlane token create --node node-a" in msg
    assert node_b not in msg and ".0123456789abcdef" not in msg     # no secret is echoed back
    assert ctl.node("node-a") is None and ctl.node_digests() == before
    assert ctl.token(id_of(good))["status"] == "valid"            # the real token is untouched
    ctl.register("node-a", bootstrap_token=good)


def test_an_expired_token_is_refused(ctl):
    boot = ctl.create(node="node-a", ttl_seconds=0.2)
    time.sleep(0.4)
    refused(ctl, "register_node", r"bootstrap token '[a-z0-9]{6}' expired at", name="node-a",
            bootstrap_token=boot)
    assert ctl.node("node-a") is None and ctl.node_digests() == {}
    assert ctl.token(id_of(boot))["status"] == "expired"


def test_a_token_is_single_use_and_a_replayed_registration_is_refused(ctl):
    boot = ctl.create()
    first = ctl.register("node-a", bootstrap_token=boot)
    after = ctl.node_digests()
    # the very same request again (a replay), and the token for another name
    refused(ctl, "register_node", r"already used \(by node 'node-a' at .*single use",
            name="node-a", bootstrap_token=boot)
    refused(ctl, "register_node", r"already used", name="node-b", bootstrap_token=boot)
    assert ctl.node_digests() == after and ctl.node("node-b") is None
    assert ctl.sign("node-a", first, "pod-a")     # the node's token still works


# --- taking over an existing node ---------------------------------------------------------

def test_an_existing_node_cannot_be_taken_over(ctl):
    a0 = ctl.register("node-a", bootstrap_token=ctl.create(node="node-a"), spec={"podCIDR": "10.244.1.0/24"})
    b0 = ctl.register("node-b", bootstrap_token=ctl.create(node="node-b"))
    before = ctl.node_digests()
    unbound, for_b = ctl.create(), ctl.create(node="node-b")
    evil = {"spec": {"podCIDR": "10.66.0.0/16"}}
    refused(ctl, "register_node", r"node 'node-a' is already registered, and an unbound bootstrap token "
            r"only registers a new node", name="node-a", bootstrap_token=unbound, **evil)
    refused(ctl, "register_node", r"bound to node 'node-b'", name="node-a", bootstrap_token=for_b, **evil)
    refused(ctl, "register_node", r"node token does not match", name="node-a", node_token="guess", **evil)
    refused(ctl, "register_node", r"node token does not match", name="node-a", node_token=b0, **evil)
    refused(ctl, "register_node", r"needs a bootstrap token or the node's current token", name="node-a", **evil)
    # nothing changed: same tokens, same spec, a0 still signs, the tokens still unused
    assert ctl.node_digests() == before
    assert ctl.node("node-a")["spec"] == {"podCIDR": "10.244.1.0/24"}
    assert ctl.sign("node-a", a0, "pod-a")
    assert ctl.token(id_of(unbound))["status"] == ctl.token(id_of(for_b))["status"] == "valid"
    ctl.register("node-c", bootstrap_token=unbound)   # what an unbound token is for


def test_a_node_token_proves_nothing_for_a_name_never_registered(ctl):
    a0 = ctl.register("node-a", bootstrap_token=ctl.create())
    refused(ctl, "register_node", r"node 'node-b' is not registered", name="node-b", node_token=a0)
    assert ctl.node("node-b") is None and set(ctl.node_digests()) == {"node-a"}


def test_a_node_object_without_a_token_still_counts_as_existing(ctl):
    """A Node put by an operator has no credential to prove, but is no free name either."""
    ctl("put", object={"kind": "Node", "metadata": {"name": "node-a"}, "spec": {"podCIDR": "10.244.1.0/24"}})
    refused(ctl, "register_node", r"already registered", name="node-a", bootstrap_token=ctl.create())
    assert ctl.node_digests() == {}
    ctl.register("node-a", bootstrap_token=ctl.create(node="node-a"))


def test_re_registering_with_the_node_token_rotates_it(ctl):
    a0 = ctl.register("node-a", bootstrap_token=ctl.create())
    reg = ctl("register_node", name="node-a", node_token=a0)
    a1 = reg["token"]
    assert reg["result"] == "re-registered" and a1 != a0
    refused(ctl, "sign", r"not its current node token.*rotated", node="node-a", token=a0, pod="pod-a",
            namespace="demo", csr="-")
    assert ctl.sign("node-a", a1, "pod-a")
    # replaying the re-registration with the old token: refused, a1 stays the token
    before = ctl.node_digests()
    refused(ctl, "register_node", r"node token does not match", name="node-a", node_token=a0)
    assert ctl.node_digests() == before and ctl.sign("node-a", a1, "pod-a")


def test_an_operator_re_provisions_a_node_with_a_token_bound_to_it(ctl):
    a0 = ctl.register("node-a", bootstrap_token=ctl.create(node="node-a"), spec={"podCIDR": "10.244.1.0/24"})
    reg = ctl("register_node", name="node-a", bootstrap_token=ctl.create(node="node-a"),
              spec={"podCIDR": "10.244.9.0/24"})
    assert reg["result"] == "re-registered"
    refused(ctl, "sign", r"not its current node token", node="node-a", token=a0, pod="pod-a",
            namespace="demo", csr="-")
    assert ctl.sign("node-a", reg["token"], "pod-a")
    assert ctl.node("node-a")["spec"] == {"podCIDR": "10.244.9.0/24"}


def test_a_node_token_signs_only_for_its_own_node_and_pods(ctl):
    a0 = ctl.register("node-a", bootstrap_token=ctl.create())
    ctl.register("node-b", bootstrap_token=ctl.create())
    with pytest.raises(ControlError) as e:      # A's token, claiming to be B
        ctl.sign("node-b", a0, "pod-b")
    assert e.value.exit_code == C.EX_NOPERM and "not its current node token" in str(e.value)
    with pytest.raises(ControlError) as e:      # A's token, as A, for B's pod
        ctl.sign("node-a", a0, "pod-b")
    assert e.value.exit_code == C.EX_NOPERM and "scheduled on 'node-b'" in str(e.value)


# --- storage, deletion, input checks ------------------------------------------------------

def test_secrets_are_stored_hashed(ctl):
    boot = ctl.create(node="node-a")
    spare = ctl.create()
    node_token = ctl.register("node-a", bootstrap_token=boot)
    stored = b"".join(p.read_bytes() for p in ctl.state.glob("store.db*"))
    for secret in (boot.split(".")[1], spare.split(".")[1], node_token):
        assert secret.encode() not in stored
    assert id_of(spare).encode() in stored      # the id is not secret


def test_a_deleted_token_registers_nothing(ctl):
    by_id, whole = ctl.create(), ctl.create()
    assert ctl("delete_token", id=id_of(by_id))["id"] == id_of(by_id)
    assert ctl("delete_token", id=whole)["id"] == id_of(whole)     # the whole token works too
    assert ctl("list_tokens")["tokens"] == []
    for t in (by_id, whole):
        refused(ctl, "register_node", r"unknown bootstrap token", name="node-a", bootstrap_token=t)
    with pytest.raises(ControlError) as e:
        ctl("delete_token", id=id_of(by_id))
    assert e.value.exit_code == C.EX_NOINPUT


@pytest.mark.parametrize("args", [{"ttl_seconds": 0}, {"ttl_seconds": -5}, {"ttl_seconds": "1h"},
                                  {"ttl_seconds": True}, {"ttl_seconds": 1e300}, {"ttl_seconds": 31 * 86400},
                                  {"node": "Node_A"}, {"node": ""}, {"node": 7}])
def test_bad_token_requests_are_refused(ctl, args):
    with pytest.raises(ControlError) as e:
        ctl("create_token", **args)
    assert e.value.exit_code == C.EX_DATAERR
    assert ctl("list_tokens")["tokens"] == []


def test_a_refused_registration_does_not_consume_the_token(ctl):
    boot = ctl.create()
    with pytest.raises(ControlError) as e:
        ctl("register_node", name="Bad_Name", bootstrap_token=boot)
    assert e.value.exit_code == C.EX_DATAERR
    with pytest.raises(ControlError) as e:
        ctl("register_node", name="node-a", bootstrap_token=boot, node_token="x")
    assert e.value.exit_code == C.EX_USAGE
    assert ctl.token(id_of(boot))["status"] == "valid" and ctl.node_digests() == {}


# --- the lab joins nodes as an operator would ---------------------------------------------

def test_the_lab_joins_each_node_with_a_token_bound_to_it(ctl, tmp_path):
    from meshlane.lab import join_node
    nd = tmp_path / "nodes" / "node-a"
    join_node(ctl.sock, "node-a", nd, spec={"podCIDR": "10.244.1.0/24"}, description="lab t up")
    first = (nd / "token").read_text()
    assert stat.S_IMODE((nd / "token").stat().st_mode) == 0o600
    assert stat.S_IMODE(nd.stat().st_mode) == 0o700
    assert ctl.sign("node-a", first, "pod-a")
    [t] = ctl("list_tokens")["tokens"]
    assert t["node"] == "node-a" and t["status"] == "used" and t["description"] == "lab t up"
    assert t["ttlSeconds"] <= 300
    # joining the same name again is a re-provisioning: the old node token stops working
    join_node(ctl.sock, "node-a", nd, spec={"podCIDR": "10.244.1.0/24"})
    second = (nd / "token").read_text()
    assert second != first and ctl.sign("node-a", second, "pod-a")
    refused(ctl, "sign", r"not its current node token", node="node-a", token=first, pod="pod-a",
            namespace="demo", csr="-")


# --- the CLI -----------------------------------------------------------------------------

def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_token_create_list_delete(ctl, capsys):
    rc, out, err = run_cli(capsys, "token", "create", "--control", ctl.sock, "--node", "node-a", "--ttl", "1h")
    boot = out.strip()
    assert rc == 0 and BOOTSTRAP_TOKEN_RE.match(boot), (out, err)   # stdout: the token alone
    assert "registers node node-a only" in err
    ctl.register("node-a", bootstrap_token=boot)

    rc, out, _ = run_cli(capsys, "token", "create", "--control", ctl.sock, "--ttl", "30m",
                         "--description", "spare", "-o", "json")
    spare = json.loads(out)
    assert rc == 0 and spare["node"] is None and 29 * 60 <= spare["ttlSeconds"] <= 30 * 60
    assert BOOTSTRAP_TOKEN_RE.match(spare["token"]) and spare["id"] == id_of(spare["token"])

    rc, out, _ = run_cli(capsys, "token", "list", "--control", ctl.sock)
    lines = out.splitlines()
    assert rc == 0 and lines[0].split() == ["ID", "NODE", "TTL", "EXPIRES", "STATUS", "DESCRIPTION"]
    assert re.search(rf"^{id_of(boot)}\s+node-a\s+<invalid>\s+\S+\s+used by node-a", out, re.M), out
    assert re.search(rf"^{spare['id']}\s+<any new node>\s+(29m\d+s|30m0s)\s+\S+\s+valid\s+spare", out, re.M), out
    assert boot.split(".")[1] not in out and spare["token"] not in out      # never shown again

    rc, out, _ = run_cli(capsys, "token", "list", "--control", ctl.sock, "-o", "json")
    assert rc == 0 and [t["id"] for t in json.loads(out)] == [id_of(boot), spare["id"]]

    rc, out, _ = run_cli(capsys, "token", "delete", "--control", ctl.sock, spare["id"])
    assert rc == 0 and out.strip() == f"bootstrap token '{spare['id']}' deleted"
    refused(ctl, "register_node", "unknown bootstrap token", name="node-b", bootstrap_token=spare["token"])

    rc, _, err = run_cli(capsys, "token", "delete", "--control", ctl.sock, "zzzzzz")
    assert rc == C.EX_NOINPUT and err.startswith("meshlane: bootstrap token 'zzzzzz' not found"), err


@pytest.mark.parametrize("args, code, msg", [
    (("--ttl", "0"), C.EX_USAGE, "must be more than 0"),
    (("--ttl", "soon"), C.EX_USAGE, "is not a duration"),
    (("--node", "Bad_Name"), C.EX_DATAERR, "not a valid node name"),
])
def test_cli_token_create_refuses_bad_input(ctl, capsys, args, code, msg):
    rc, out, err = run_cli(capsys, "token", "create", "--control", ctl.sock, *args)
    assert rc == code and msg in err and out == "", (rc, out, err)
    assert ctl("list_tokens")["tokens"] == []


def test_cli_in_a_process_of_its_own(ctl):
    """The installed entry point, the control socket from MESHLANE_CONTROL."""
    env = {**os.environ, "MESHLANE_CONTROL": ctl.sock}
    res = subprocess.run([sys.executable, "-m", "meshlane.cli", "token", "create", "--node", "node-a",
                          "-o", "json"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    ctl.register("node-a", bootstrap_token=json.loads(res.stdout)["token"])
    res = subprocess.run([sys.executable, "-m", "meshlane.cli", "token", "delete", "nope00"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert res.returncode == C.EX_NOINPUT and "not found" in res.stderr
