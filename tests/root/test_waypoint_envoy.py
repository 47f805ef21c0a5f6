"""slowpath.waypoint_envoy against a real Envoy 1.40 in network namespaces of our own.

Topology (netns `wpe<pid><rand>-*`, one bridge, /24 of 10.250.0.0):

    cli (10.250.0.2)  HBONE *client* Envoy: one plain listener per (Service VIP:port,
                      client identity), each tunnelling to the waypoint with that
                      :authority and expecting the waypoint's identity
    wp  (10.250.0.3)  the waypoint: bootstrap() + render()/secrets() files, run with its
                      directory as working directory (as meshlane's waypointd does)
    v1  (10.250.0.11) HBONE *server* Envoy (identity echo-v1) + apps: HTTP :8080 "echo-v1",
                      plain HTTP :8082 "plain" (a non-HBONE endpoint), TCP echo :9090
    v2  (10.250.0.12) HBONE server Envoy (identity echo-v2) + apps :8080 "echo-v2", :8081 "other"

The backend HBONE servers accept only the waypoint's exact URI SAN, so a 200 through
them proves the waypoint originated HBONE with its own certificate.  Apps answer JSON
{"pod", "method", "path", "headers"}; `/flaky/<key>/<n>` answers 503 to the first n
requests of a key, `/delay/<ms>` sleeps first.  Every netns and process is ours and is
removed/stopped (by PID) in the fixture's finally.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import http.client
import ipaddress
import json
import os
import random
import re
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshcore import l7, netns
from slowpath import envoy_hbone as eh
from slowpath import waypoint_envoy as we
from tests.envoy_util import EnvoyProcess, envoy_binary, requires_envoy, validate
from tests.root import meshtest

pytestmark = [pytest.mark.root, requires_envoy()]

TD = "cluster.local"
WP_ID = f"spiffe://{TD}/ns/demo/sa/waypoint"
CLIENT_ID = f"spiffe://{TD}/ns/demo/sa/client"
CLIENT2_ID = f"spiffe://{TD}/ns/demo/sa/client2"
V1_ID = f"spiffe://{TD}/ns/demo/sa/echo-v1"
V2_ID = f"spiffe://{TD}/ns/demo/sa/echo-v2"
IPS = {"cli": "10.250.0.2", "wp": "10.250.0.3", "v1": "10.250.0.11", "v2": "10.250.0.12"}
VIPS = {"echo": "10.96.0.10", "echo-v1": "10.96.0.11", "echo-v2": "10.96.0.12", "other": "10.96.0.13",
        "raw": "10.96.0.14", "plain": "10.96.0.15"}
NOWHERE = "10.96.0.99:80"    # a VIP the waypoint does not serve
TIMEOUT = 5.0


# --- PKI ---------------------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlane-test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ku(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class Leaf:
    cert_pem: str
    key_pem: str
    cert: str = ""      # files, for the HBONE client/server Envoys
    key: str = ""


class Pki:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        now = datetime.datetime.now(datetime.UTC)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = (x509.CertificateBuilder().subject_name(_name("wpe root")).issuer_name(_name("wpe root"))
                   .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(hours=2))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(_ku(True), critical=True)
                   .sign(self.ca_key, hashes.SHA256()))
        self.root_pem = _pem(self.ca)
        self.root = str(directory / "root.pem")
        Path(self.root).write_text(self.root_pem)

    def leaf(self, spiffe: str, stem: str) -> Leaf:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(self.ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(hours=1))
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]),
                               critical=True)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(_ku(False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.ca_key, hashes.SHA256()))
        leaf = Leaf(_pem(cert), key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()).decode())
        leaf.cert, leaf.key = str(self.dir / f"{stem}.pem"), str(self.dir / f"{stem}-key.pem")
        Path(leaf.cert).write_text(leaf.cert_pem)
        Path(leaf.key).write_text(leaf.key_pem)
        return leaf


# --- the model --------------------------------------------------------------------------------------


def _svc(name: str, port: int, target: int, pname: str = "http") -> l7.Service:
    return l7.Service(namespace="demo", name=name, vip=ipaddress.IPv4Address(VIPS[name]),
                      ports=(l7.ServicePort(port=port, target_port=target, name=pname),),
                      selector=(("app", name),))


SERVICES = (_svc("echo", 80, 8080), _svc("echo-v1", 80, 8080), _svc("echo-v2", 80, 8080),
            _svc("other", 80, 8081), _svc("raw", 9000, 9090, "tcp-echo"), _svc("plain", 80, 8082))
EP_V1 = l7.Endpoint(pod="demo/v1", ip=IPS["v1"], identity=V1_ID)
EP_V2 = l7.Endpoint(pod="demo/v2", ip=IPS["v2"], identity=V2_ID)
ENDPOINTS = (("demo/echo", (EP_V1, EP_V2)), ("demo/echo-v1", (EP_V1,)), ("demo/echo-v2", (EP_V2,)),
             ("demo/other", (EP_V2,)), ("demo/raw", (EP_V1,)),
             ("demo/plain", (l7.Endpoint(pod="demo/v1", ip=IPS["v1"], identity=V1_ID, hbone=False),)))
WAYPOINT = l7.Waypoint(namespace="demo", name="waypoint")
EP_V1B = l7.Endpoint(pod="demo/v1b", ip="10.250.0.21", identity=V1_ID)     # a second pod of v1's identity


def view(routes=(), policies=(), drs=(), workloads=()) -> l7.WaypointView:
    return l7.WaypointView(waypoint=WAYPOINT, services=SERVICES, all_services=SERVICES, endpoints=ENDPOINTS,
                           routes=tuple(routes), policies=tuple(policies), destination_rules=tuple(drs),
                           workloads=tuple(workloads))


def route(name: str, parent: str, rules, created: str = "1", **kw) -> l7.HTTPRoute:
    return l7.HTTPRoute(namespace="demo", name=name, parents=(l7.ParentRef(service=parent, port=80),),
                        rules=tuple(rules), created=created, **kw)


ANY_PATH = (l7.RouteMatch(),)


def rule(index: int = 0, *backends: tuple[str, int], matches=ANY_PATH, **kw) -> l7.RouteRule:
    return l7.RouteRule(index=index, matches=tuple(matches),
                        backends=tuple(l7.Backend(service=s, port=80, weight=w) for s, w in backends), **kw)


def weighted(v1: int, v2: int) -> l7.HTTPRoute:
    return route("echo", "echo", [rule(0, ("echo-v1", v1), ("echo-v2", v2))])


def prefix(path: str) -> tuple[l7.RouteMatch, ...]:
    return (l7.RouteMatch(path_type="PathPrefix", path=path),)


# --- backends --------------------------------------------------------------------------------------


class App:
    """An HTTP/1.1 app inside a netns answering with its own name (see module doc)."""

    def __init__(self, ns: str, port: int, name: str) -> None:
        self.name = name
        self.requests: list[dict] = []
        self.flaky: collections.Counter = collections.Counter()
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True    # headers and body are two writes: no 40 ms stall

            def log_message(self, *args) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                rec = {"pod": app.name, "method": self.command, "path": self.path,
                       "headers": {k.lower(): v for k, v in self.headers.items()}}
                app.requests.append(rec)
                status = 200
                parts = self.path.split("?")[0].split("/")
                if len(parts) == 4 and parts[1] == "flaky":
                    app.flaky[parts[2]] += 1
                    status = 503 if app.flaky[parts[2]] <= int(parts[3]) else 200
                elif len(parts) == 3 and parts[1] == "delay":
                    time.sleep(int(parts[2]) / 1000)
                body = json.dumps(rec).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

        with netns.entered(ns):
            self.server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TcpEcho:
    def __init__(self, ns: str, port: int) -> None:
        with netns.entered(ns):
            self.sock = socket.create_server(("0.0.0.0", port))
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


# --- the waypoint Envoy ------------------------------------------------------------------------------


class WaypointEnvoy(EnvoyProcess):
    """The waypoint: `envoy -c <dir>/envoy.yaml` inside its netns with `dir` as working
    directory (relative paths of render() resolve there), stopped by PID."""

    def __init__(self, directory: Path, ns: str) -> None:
        super().__init__("", name="waypoint", netns=ns)
        self.dir = directory
        self.config = directory / "config"
        self.access_log = directory / "access.log"

    def write(self, files: dict[str, dict], order=None) -> None:
        """Write each file to a temp name, then rename it onto its path (what Envoy watches)."""
        for rel in order or sorted(files):
            path = self.config / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(we.to_yaml(files[rel]))
            os.rename(tmp, path)

    def start(self, timeout: float = 20.0) -> WaypointEnvoy:
        self.tmp = tempfile.mkdtemp(prefix="envoy-waypoint-")
        admin_path = Path(self.tmp, "admin-address")
        argv = ["ip", "netns", "exec", self.netns, envoy_binary(), "-c", str(self.dir / "envoy.yaml"),
                "--disable-hot-restart", "--base-id", str(random.randint(1000, 2**20)),
                "--concurrency", "2", "--admin-address-path", str(admin_path), "--log-level", "info",
                "--drain-time-s", "2", "--file-flush-interval-msec", "100"]
        with open(Path(self.tmp, "envoy.log"), "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.dir)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"waypoint envoy exited with {self.proc.returncode}\n{self.log_tail()}")
                if self.admin is None and admin_path.exists() and (text := admin_path.read_text().strip()):
                    host, _, port = text.rpartition(":")
                    self.admin = (host, int(port))
                if self.admin is not None and self._ready():
                    return self
                time.sleep(0.05)
            raise RuntimeError(f"waypoint envoy not ready after {timeout}s\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def xds(self) -> dict:
        status, text = self.http_get("/stats?format=json&filter=(version_text|update_rejected|update_failure"
                                     "|listener_modified|listener_removed|total_listeners_draining)$")
        assert status == 200, text
        return {s["name"]: s.get("value") for s in json.loads(text)["stats"] if "name" in s}

    def wait_taken(self, files: dict[str, dict], timeout: float = 10.0) -> None:
        """Until Envoy runs the version of every file (stats `<scope>.version_text`)."""
        want = {}
        for rel, content in files.items():
            if rel == "cds.yaml":
                want[rel] = (re.compile(r"cluster_manager\.cds\.version_text"), content["version_info"])
            elif rel == "lds.yaml":
                want[rel] = (re.compile(r"listener_manager\.lds\.version_text"), content["version_info"])
            elif rel.startswith("rds/"):
                name = re.escape(content["resources"][0]["name"])
                want[rel] = (re.compile(rf"http\..+\.rds\.{name}\.version_text"), content["version_info"])
            elif rel.startswith("sds/"):
                name = re.escape(content["resources"][0]["name"])
                want[rel] = (re.compile(rf"sds\.{name}\.version_text"), content["version_info"])
        deadline = time.monotonic() + timeout
        while True:
            stats = self.xds()
            missing = [rel for rel, (pat, ver) in want.items()
                       if not any(pat.fullmatch(k) and v == ver for k, v in stats.items())]
            rejected = {k: v for k, v in stats.items() if k.endswith(("update_rejected", "update_failure")) and v}
            assert not rejected, f"Envoy rejected a file: {rejected}\n{self.log_tail()}"
            if not missing:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"Envoy did not take {missing} in {timeout}s\n{self.log_tail()}")
            time.sleep(0.05)

    def push(self, v: l7.WaypointView) -> dict[str, dict]:
        """The update order a controller should use: clusters first (and wait), then the
        route configs and listeners.  Returns the files."""
        files = we.render(v, access_log=str(self.access_log))
        self.write({"cds.yaml": files["cds.yaml"]})
        self.wait_taken({"cds.yaml": files["cds.yaml"]})
        rest = {k: c for k, c in files.items() if k != "cds.yaml"}
        self.write(rest, order=[*sorted(k for k in rest if k.startswith("rds/")), "lds.yaml"])
        self.wait_taken(rest)
        return files


# --- the client side ---------------------------------------------------------------------------------


def client_envoy_bootstrap(pki: Pki, leaves: dict[str, Leaf], targets: dict[str, tuple[str, str]]) -> dict:
    """One HBONE client Envoy with a listener `c-<key>` per target (authority, client leaf
    name): envoy_hbone client bootstraps merged, names made unique."""
    merged: dict = {"listeners": [], "clusters": []}
    boot = None
    for key, (authority, who) in targets.items():
        leaf = leaves[who]
        boot = eh.hbone_client_bootstrap(
            listen=("127.0.0.1", 0), target_hbone=(IPS["wp"], 15008), target_authority=authority,
            cert_file=leaf.cert, key_file=leaf.key, root_file=pki.root, expected_peer_spiffe=WP_ID,
            admin_port=0, stat_prefix=f"c-{key}")
        (lst,), (cl,) = boot["static_resources"]["listeners"], boot["static_resources"]["clusters"]
        lst["name"] = f"c-{key}"
        lst["filter_chains"][0]["filters"][0]["typed_config"]["cluster"] = f"u-{key}"
        cl["name"] = cl["load_assignment"]["cluster_name"] = f"u-{key}"
        merged["listeners"].append(lst)
        merged["clusters"].append(cl)
    assert boot is not None
    return {**boot, "static_resources": merged}


def http_call(port: int, method: str = "GET", path: str = "/", headers: dict | None = None,
              timeout: float = TIMEOUT) -> tuple[int, dict, bytes]:
    """One request on a new connection from inside the client netns to 127.0.0.1:port."""
    return meshtest.http_call(LAB["cli"], "127.0.0.1", port, method, path, headers=headers,
                              timeout=timeout)


def tcp_echo(port: int, payload: bytes) -> bytes:
    """Send payload to 127.0.0.1:port in the client netns, read it back (b"" when closed)."""
    with netns.entered(LAB["cli"]):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    got = b""
    with s:
        s.settimeout(TIMEOUT)
        s.connect(("127.0.0.1", port))
        try:
            s.sendall(payload)
            while len(got) < len(payload):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
    return got


LAB: dict[str, str] = {}    # role -> netns name (set by the fixture)


@dataclass
class World:
    pki: Pki
    leaves: dict[str, Leaf]
    wp: WaypointEnvoy
    client: EnvoyProcess
    servers: dict[str, EnvoyProcess]
    apps: dict[str, App]
    ports: dict[str, int]

    def get(self, key: str, path: str = "/", method: str = "GET", headers: dict | None = None):
        return http_call(self.ports[key], method, path, headers)

    def pod(self, key: str, path: str = "/", **kw) -> str:
        status, _, body = self.get(key, path, **kw)
        assert status == 200, (status, body[:300], self.wp.log_tail(10))
        return json.loads(body)["pod"]

    def access_log(self) -> list[dict]:
        try:
            lines = self.wp.access_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(x) for x in lines if x.strip()]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    prefix = f"wpe{os.getpid() % 10000}{uuid.uuid4().hex[:4]}"
    made: list[str] = []
    stoppable: list = []
    tmp = tmp_path_factory.mktemp("wpe")
    try:
        bridge = f"{prefix}-br"
        _ip("netns", "add", bridge)
        made.append(bridge)
        _ip("-n", bridge, "link", "set", "lo", "up")
        _ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge, "link", "set", "br0", "up")
        for i, (role, addr) in enumerate(IPS.items()):
            ns = f"{prefix}-{role}"
            _ip("netns", "add", ns)
            made.append(ns)
            LAB[role] = ns
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"v{i}", "netns", bridge)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", bridge, "link", "set", f"v{i}", "master", "br0", "up")

        pki = Pki(tmp)
        leaves = {"wp": pki.leaf(WP_ID, "wp"), "client": pki.leaf(CLIENT_ID, "client"),
                  "client2": pki.leaf(CLIENT2_ID, "client2"), "v1": pki.leaf(V1_ID, "v1"),
                  "v2": pki.leaf(V2_ID, "v2")}

        apps = {}
        for name, role, port in (("echo-v1", "v1", 8080), ("plain", "v1", 8082), ("echo-v2", "v2", 8080),
                                 ("other", "v2", 8081)):
            apps[name] = App(LAB[role], port, name)
            stoppable.append(apps[name])
        stoppable.append(TcpEcho(LAB["v1"], 9090))

        servers = {}
        for role in ("v1", "v2"):
            boot = eh.hbone_server_bootstrap(listen=(IPS[role], 15008), cert_file=leaves[role].cert,
                                             key_file=leaves[role].key, root_file=pki.root, forward_to=None,
                                             admin_port=0)
            # accept only the waypoint: a 200 through this server proves whose certificate it saw
            tls = boot["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]["typed_config"]
            tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] = [
                {"san_type": "URI", "matcher": {"exact": WP_ID}}]
            servers[role] = EnvoyProcess(boot, name=f"hbone-server-{role}", netns=LAB[role], log_level="warning")
            stoppable.append(servers[role])
            servers[role].start()

        wdir = tmp / "waypoint"
        wdir.mkdir()
        wp = WaypointEnvoy(wdir, LAB["wp"])
        (wdir / "envoy.yaml").write_text(we.to_yaml(we.bootstrap(
            node_id="waypoint~10.250.0.3~waypoint.demo~demo.svc.cluster.local", config_dir=str(wp.config))))
        wp.write(we.secrets(cert_chain_pem=leaves["wp"].cert_pem, key_pem=leaves["wp"].key_pem,
                            root_pem=pki.root_pem))
        files = we.render(view(), access_log=str(wp.access_log))
        wp.write(files)
        stoppable.append(wp)
        wp.start()
        wp.wait_taken(files)

        targets = {name: (f"{VIPS[name]}:{port}", "client") for name, port in
                   (("echo", 80), ("echo-v1", 80), ("echo-v2", 80), ("other", 80), ("raw", 9000), ("plain", 80))}
        targets["other-client2"] = (f"{VIPS['other']}:80", "client2")
        targets["nowhere"] = (NOWHERE, "client")
        # addressed to pods, not to Services (a waypoint for workloads)
        for key, addr in (("pod-v1", f"{IPS['v1']}:8080"), ("pod-plain", f"{IPS['v1']}:8082"),
                          ("pod-v2", f"{IPS['v2']}:8080"), ("pod-raw", f"{IPS['v1']}:9090")):
            targets[key] = (addr, "client")
        client = EnvoyProcess(client_envoy_bootstrap(pki, leaves, targets), name="hbone-client",
                              netns=LAB["cli"], log_level="warning")
        stoppable.append(client)
        client.start()
        ports = {key: client.listener_port(f"c-{key}") for key in targets}
        yield World(pki, leaves, wp, client, servers, apps, ports)
    finally:
        for thing in reversed(stoppable):
            try:
                thing.stop() if isinstance(thing, EnvoyProcess) else thing.close()
            except Exception as exc:  # noqa: BLE001 - teardown goes on whatever failed
                print(f"teardown: stopping {thing!r}: {exc!r}")
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        LAB.clear()


# --- pure checks (no Envoy) -------------------------------------------------------------------------


def full_view() -> l7.WaypointView:
    """A view using every feature the renderer knows."""
    grpc = l7.Service(namespace="demo", name="grpc", vip=ipaddress.IPv4Address("10.96.0.20"),
                      ports=(l7.ServicePort(port=80, target_port=8080, name="grpc-web", app_protocol="grpc"),
                             l7.ServicePort(port=5432, target_port=5432, name="tcp-db")),
                      selector=(("app", "grpc"),))
    matches = (l7.RouteMatch(path_type="PathPrefix", path="/a/b/"),
               l7.RouteMatch(path_type="Exact", path="/x", method="POST",
                             headers=(l7.StringMatch(type="Exact", name="X-A", value="y"),
                                      l7.StringMatch(type="RegularExpression", name="x-b", value="[0-9]+")),
                             query=(l7.StringMatch(type="Exact", name="q", value="n"),
                                    l7.StringMatch(type="RegularExpression", name="r", value="a.*"))),
               l7.RouteMatch(path_type="RegularExpression", path="/re/[a-z]+"))
    full_rule = rule(0, ("echo-v1", 90), ("echo-v2", 10), ("echo-v2", 0), matches=matches, timeout_s=1.5,
                     backend_timeout_s=0.5, retry=l7.Retry(attempts=3, codes=(502, 503), backoff_s=0.025),
                     request_headers=l7.HeaderMod(set=(("x-set", "on"),), add=(("x-add", "1"),), remove=("X-Rm",)),
                     response_headers=l7.HeaderMod(set=(("x-r", "y"),), add=(("x-ra", "2"),), remove=("server",)),
                     mirrors=(l7.Mirror(service="other", port=None, percent=12.5),
                              l7.Mirror(service="plain", port=80)))
    routes = [
        route("full", "echo", [full_rule, rule(1, matches=prefix("/none")), rule(2, ("gone", 1), matches=prefix("/gone")),
                               rule(3, ("echo-v1", 0), matches=prefix("/zero")),
                               rule(4, ("grpc", 1), matches=prefix("/grpc"), backend_timeout_s=0.2)],
              fault=l7.Fault(abort_status=418, abort_percent=33.3, delay_s=0.1, delay_percent=5),
              rate_limit=l7.RateLimit(requests=7, per_s=60)),
        l7.HTTPRoute(namespace="demo", name="any-port", parents=(l7.ParentRef(service="grpc"),),
                     rules=(rule(0, ("grpc", 1)),), fault=l7.Fault(delay_s=2)),
    ]
    src = l7.L7Source(principals=("cluster.local/ns/demo/sa/client", "cluster.local/ns/x*", "*/sa/n", "*"),
                      not_principals=("cluster.local/ns/demo/sa/evil",), namespaces=("demo", "de*", "*mo", "*"),
                      not_namespaces=("kube-system",), ip_blocks=("10.0.0.0/8", "fd00::/8"),
                      not_ip_blocks=("10.1.2.3/32",))
    op = l7.L7Operation(methods=("GET", "P*"), not_methods=("TRACE",), paths=("/a", "/b*", "*.js", "*"),
                        not_paths=("/admin",), hosts=("Echo.demo", "*.svc.cluster.local", "echo*", "*"),
                        not_hosts=("evil.example",), ports=(80,), not_ports=(81,))
    conds = (l7.L7Condition(key="request.headers[X-Token]", values=("abc", "y", "*"), not_values=("bad*",)),
             l7.L7Condition(key="source.ip", values=("10.250.0.0/24",)),
             l7.L7Condition(key="remote.ip", not_values=("192.0.2.1/32",)),
             l7.L7Condition(key="source.namespace", values=("demo",), not_values=("n",)),
             l7.L7Condition(key="source.principal", values=("cluster.local/ns/demo/sa/client",)),
             l7.L7Condition(key="destination.port", values=("80",), not_values=("81",)))
    policies = [
        l7.L7Policy(namespace="demo", name="gw-allow", action="ALLOW", targets=(("Gateway", "waypoint"),),
                    rules=(l7.L7Rule(sources=(src, l7.L7Source(namespaces=("other",))), operations=(op,),
                                     conditions=conds), l7.L7Rule())),
        l7.L7Policy(namespace="demo", name="deny", action="DENY", targets=(("Service", "echo"), ("Service", "grpc")),
                    rules=(l7.L7Rule(operations=(l7.L7Operation(methods=("DELETE",)),)),
                           l7.L7Rule(sources=(l7.L7Source(ip_blocks=("192.0.2.0/24",)),), conditions=conds))),
        l7.L7Policy(namespace="demo", name="nothing", action="ALLOW", targets=(("Service", "other"),), rules=()),
    ]
    drs = [l7.DestinationRule(namespace="demo", name="dr", service="echo-v1", max_connections=10,
                              max_pending_requests=5, max_requests=20, max_retries=3, max_requests_per_connection=1,
                              outlier=l7.Outlier(consecutive_5xx=3, consecutive_gateway_errors=2, interval_s=1.5,
                                                 base_ejection_s=5, max_ejection_percent=50)),
           l7.DestinationRule(namespace="demo", name="dr2", service="echo-v2",
                              outlier=l7.Outlier(consecutive_5xx=0))]
    base = view(routes, policies, drs)
    return l7.WaypointView(waypoint=WAYPOINT, services=(*SERVICES, grpc), all_services=(*SERVICES, grpc),
                           endpoints=(*ENDPOINTS, ("demo/grpc", (EP_V1, EP_V2))), routes=base.routes,
                           policies=base.policies, destination_rules=base.destination_rules)


def static_bootstrap(files: dict[str, dict], secret_files: dict[str, dict], config_dir: str) -> dict:
    """Every rendered resource as static resources of one bootstrap (validate mode ignores
    dynamic_resources): listeners with their RDS route configs inlined, clusters, secrets."""
    def strip(r: dict) -> dict:
        return {k: v for k, v in r.items() if k != "@type"}
    routes = {r["name"]: strip(r) for rel, f in files.items() if rel.startswith("rds/") for r in f["resources"]}
    used = set()

    def inline(o):
        if isinstance(o, dict):
            if "rds" in o:
                name = o.pop("rds")["route_config_name"]
                o["route_config"] = routes[name]
                used.add(name)
            for v in o.values():
                inline(v)
        elif isinstance(o, list):
            for v in o:
                inline(v)
    listeners = [strip(r) for r in files["lds.yaml"]["resources"]]
    inline(listeners)
    assert used == set(routes), "every route config is named by a listener"
    boot = we.bootstrap(node_id="validate", config_dir=config_dir)
    del boot["dynamic_resources"]
    boot["static_resources"] = {
        "listeners": listeners,
        "clusters": [strip(r) for r in files["cds.yaml"]["resources"]],
        "secrets": [strip(r) for f in secret_files.values() for r in f["resources"]],
    }
    return boot


def test_every_rendered_resource_passes_envoy_validate(tmp_path):
    pki = Pki(tmp_path)
    leaf = pki.leaf(WP_ID, "wp")
    config = tmp_path / "config"
    # pod-addressed traffic too (HTTP inspector, the IP matcher's pod ranges, encap clusters)
    full = dataclasses.replace(full_view(), workloads=(EP_V1, EP_V2, EP_V1B))
    files = we.render(full, access_log=str(tmp_path / "access.log"), config_dir=str(config))
    sec = we.secrets(cert_chain_pem=leaf.cert_pem, key_pem=leaf.key_pem, root_pem=pki.root_pem)
    # Envoy refuses a path_config_source naming a file that does not exist (yet)
    (config / "sds").mkdir(parents=True)
    for rel, content in sec.items():
        (config / rel).write_text(we.to_yaml(content))
    boot = static_bootstrap(files, sec, str(config))
    text = we.to_yaml(boot)
    rc, out = validate(text)
    assert rc == 0 and "OK" in out, out[-3000:]
    # the bootstrap itself, and validation is real: a bad regex in a route is refused
    for rel in ("cds.yaml", "lds.yaml"):
        (config / rel).write_text(we.to_yaml(files[rel]))
    rc, out = validate(we.to_yaml(we.bootstrap(node_id="n", config_dir=str(config))))
    assert rc == 0, out[-2000:]
    # a waypoint that serves nothing yet (Envoy refuses a listener without any chain)
    empty = l7.WaypointView(waypoint=WAYPOINT)
    rc, out = validate(we.to_yaml(static_bootstrap(we.render(empty, access_log="/dev/null", config_dir=str(config)),
                                                   sec, str(config))))
    assert rc == 0, out[-2000:]
    bad = we.render(view([route("bad", "echo", [rule(0, ("echo-v1", 1), matches=(
        l7.RouteMatch(path_type="RegularExpression", path="/[unclosed"),))])]), access_log="/dev/null",
        config_dir=str(config))
    rc, out = validate(we.to_yaml(static_bootstrap(bad, sec, str(config))))
    assert rc != 0, out[-2000:]


def test_rendered_shape():
    v = full_view()
    files = we.render(v, access_log="/var/log/a.log")
    assert list(files)[:2] == ["cds.yaml", "lds.yaml"]
    for rel, f in files.items():
        assert set(f) == {"version_info", "resources"}
        assert len(f["version_info"]) == 64
        assert all("@type" in r for r in f["resources"]), rel
    assert files == we.render(v, access_log="/var/log/a.log"), "deterministic"
    rds = {f["resources"][0]["name"]: (rel, f["resources"][0]) for rel, f in files.items() if rel.startswith("rds/")}
    rc_echo = "inbound-vip|80|http|echo.demo.svc.cluster.local"
    assert re.fullmatch(r"rds/inbound-vip_80_http_echo\.demo\.svc\.cluster\.local-[0-9a-f]{8}\.yaml", rds[rc_echo][0])
    assert all(re.fullmatch(r"rds/[A-Za-z0-9._-]+\.yaml", rel) for rel, _ in rds.values())

    listeners = {x["name"]: x for x in files["lds.yaml"]["resources"]}
    assert set(listeners) == {"connect_terminate", "main_internal",
                              f"connect_originate|{V1_ID[9:]}", f"connect_originate|{V2_ID[9:]}"}
    chains = {c["name"]: c for c in listeners["main_internal"]["filter_chains"]}
    assert all("filter_chain_match" not in c for c in chains.values())
    tree = listeners["main_internal"]["filter_chain_matcher"]["matcher_tree"]
    by_ip = {r["ranges"][0]["address_prefix"]: r for r in tree["custom_match"]["typed_config"]["range_matchers"]}
    port_map = by_ip["10.96.0.10"]["on_match"]["matcher"]["matcher_tree"]["exact_match_map"]["map"]
    assert port_map == {"80": {"action": {"name": rc_echo, "typed_config": {
        "@type": "type.googleapis.com/google.protobuf.StringValue", "value": rc_echo}}}}
    assert set(by_ip) == {"10.96.0.10", "10.96.0.11", "10.96.0.12", "10.96.0.13", "10.96.0.14", "10.96.0.15",
                          "10.96.0.20"}
    assert [f["name"] for f in listeners["main_internal"]["listener_filters"]] == [
        "envoy.filters.listener.original_dst"], "no HTTP inspector without pod-addressed traffic"
    hcm = chains[rc_echo]["filters"][0]["typed_config"]
    assert [f["name"] for f in hcm["http_filters"]] == [
        "meshlane.rbac.deny", "meshlane.rbac.allow", "envoy.filters.http.fault",
        "envoy.filters.http.local_ratelimit", "envoy.filters.http.router"]
    assert hcm["rds"]["config_source"]["path_config_source"]["path"] == "config/" + rds[rc_echo][0]
    assert "inbound-vip|5432|tcp|grpc.demo.svc.cluster.local" in chains
    # the listener does not depend on routes or policies: only RDS does
    bare = we.render(view(), access_log="/var/log/a.log")
    bare_chain = next(c for c in next(x for x in bare["lds.yaml"]["resources"] if x["name"] == "main_internal")[
        "filter_chains"] if c["name"] == rc_echo)
    assert bare_chain == chains[rc_echo]
    no_delete = l7.L7Policy(namespace="demo", name="d", action="DENY", targets=(("Service", "echo-v1"),),
                            rules=(l7.L7Rule(operations=(l7.L7Operation(methods=("DELETE",)),)),))
    assert we.render(view(policies=[no_delete]), access_log="/l")["lds.yaml"] == \
        we.render(view([weighted(1, 2)]), access_log="/l")["lds.yaml"]

    vh = rds[rc_echo][1]["virtual_hosts"][0]
    names = [r["name"] for r in vh["routes"]]
    # Exact first, then prefixes by length (/none, /zero, /gone, /grpc are 5 long: rule order;
    # /a/b/ counts as /a/b), then the regex
    assert names == ["demo.full.0.1", "demo.full.1.0", "demo.full.2.0", "demo.full.3.0", "demo.full.4.0",
                     "demo.full.0.0", "demo.full.0.2"], names
    by = {r["name"]: r for r in vh["routes"]}
    assert by["demo.full.0.0"]["match"] == {"path_separated_prefix": "/a/b"}
    m = by["demo.full.0.1"]["match"]
    assert m["path"] == "/x" and {"name": ":method", "string_match": {"exact": "POST"}} in m["headers"]
    assert {"name": "x-a", "string_match": {"exact": "y"}} in m["headers"]
    assert m["query_parameters"][1] == {"name": "r", "string_match": {"safe_regex": {"regex": "a.*"}}}
    act = by["demo.full.0.0"]["route"]
    assert act["weighted_clusters"]["clusters"] == [
        {"name": "outbound|80||echo-v1.demo.svc.cluster.local", "weight": 90},
        {"name": "outbound|80||echo-v2.demo.svc.cluster.local", "weight": 10}]
    assert act["timeout"] == "1.5s" and act["retry_policy"]["per_try_timeout"] == "0.5s"
    assert act["retry_policy"]["retry_on"] == "connect-failure,refused-stream,reset,retriable-status-codes"
    assert act["retry_policy"]["num_retries"] == 3 and act["retry_policy"]["retriable_status_codes"] == [502, 503]
    assert act["request_mirror_policies"] == [
        {"cluster": "outbound|80||other.demo.svc.cluster.local",
         "runtime_fraction": {"default_value": {"numerator": 125000, "denominator": "MILLION"}}},
        {"cluster": "outbound|80||plain.demo.svc.cluster.local"}]
    assert by["demo.full.0.0"]["request_headers_to_add"] == [
        {"header": {"key": "x-set", "value": "on"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
        {"header": {"key": "x-add", "value": "1"}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}]
    assert by["demo.full.0.0"]["request_headers_to_remove"] == ["x-rm"]
    assert by["demo.full.1.0"]["direct_response"] == {"status": 500}      # no backends
    assert by["demo.full.3.0"]["direct_response"] == {"status": 500}      # all weights 0
    gone = by["demo.full.2.0"]["route"]
    assert gone["weighted_clusters"]["clusters"][0]["name"] == "outbound|80||gone.demo.svc.cluster.local"
    assert gone["cluster_not_found_response_code"] == "INTERNAL_SERVER_ERROR"
    # backendRequest without request timeout nor retry: also the route timeout
    assert by["demo.full.4.0"]["route"]["timeout"] == "0.2s"
    pf = by["demo.full.0.0"]["typed_per_filter_config"]
    assert pf["envoy.filters.http.fault"]["abort"] == {
        "http_status": 418, "percentage": {"numerator": 333000, "denominator": "MILLION"}}
    assert pf["envoy.filters.http.local_ratelimit"]["token_bucket"] == {
        "max_tokens": 7, "tokens_per_fill": 7, "fill_interval": "60s"}
    # RBAC: both filters configured per virtual host; one Envoy policy per Istio rule
    rb = vh["typed_per_filter_config"]
    assert rb["meshlane.rbac.deny"]["rbac"]["rules"]["action"] == "DENY"
    assert sorted(rb["meshlane.rbac.deny"]["rbac"]["rules"]["policies"]) == [
        "ns[demo]-policy[deny]-rule[0]", "ns[demo]-policy[deny]-rule[1]"]
    assert sorted(rb["meshlane.rbac.allow"]["rbac"]["rules"]["policies"]) == [
        "ns[demo]-policy[gw-allow]-rule[0]", "ns[demo]-policy[gw-allow]-rule[1]"]
    # "nothing" (ALLOW, no rules) on other: an ALLOW with no policy = deny all; the
    # Gateway-wide ALLOW still applies there too
    other = rds["inbound-vip|80|http|other.demo.svc.cluster.local"][1]["virtual_hosts"][0]
    assert sorted(other["typed_per_filter_config"]["meshlane.rbac.allow"]["rbac"]["rules"]["policies"]) == [
        "ns[demo]-policy[gw-allow]-rule[0]", "ns[demo]-policy[gw-allow]-rule[1]"]
    assert "meshlane.rbac.deny" not in other["typed_per_filter_config"]
    # default route (no HTTPRoute): the Service itself, default retries, no timeout
    plain = rds["inbound-vip|80|http|plain.demo.svc.cluster.local"][1]["virtual_hosts"][0]["routes"]
    assert plain[0]["route"]["cluster"] == "outbound|80||plain.demo.svc.cluster.local"
    assert plain[0]["route"]["timeout"] == "0s"
    assert plain[0]["route"]["retry_policy"]["retry_on"] == "connect-failure,refused-stream,reset"
    assert plain[0]["route"]["retry_policy"]["num_retries"] == 2

    clusters = {c["name"]: c for c in files["cds.yaml"]["resources"]}
    v1 = clusters["outbound|80||echo-v1.demo.svc.cluster.local"]
    assert v1["circuit_breakers"]["thresholds"][0] == {
        "max_connections": 10, "max_pending_requests": 5, "max_requests": 20, "max_retries": 3}
    assert v1["outlier_detection"]["consecutive_5xx"] == 3
    assert v1["outlier_detection"]["consecutive_gateway_failure"] == 2
    opts = v1["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert opts["common_http_protocol_options"]["max_requests_per_connection"] == 1
    (ep,) = v1["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert ep["endpoint"]["address"] == {"envoy_internal_address": {
        "server_listener_name": f"connect_originate|{V1_ID[9:]}", "endpoint_id": "10.250.0.11:8080"}}
    assert ep["metadata"]["filter_metadata"]["envoy.filters.listener.original_dst"] == {"local": "10.250.0.11:8080"}
    (plain_ep,) = clusters["outbound|80||plain.demo.svc.cluster.local"]["load_assignment"]["endpoints"][0][
        "lb_endpoints"]
    assert plain_ep == {"endpoint": {"address": {"socket_address": {"address": "10.250.0.11", "port_value": 8082}}}}
    grpc_opts = clusters["outbound|80||grpc.demo.svc.cluster.local"]["typed_extension_protocol_options"]
    assert "http2_protocol_options" in grpc_opts["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"][
        "explicit_http_config"]
    orig = clusters[f"connect_originate|{V2_ID[9:]}"]
    assert orig["type"] == "ORIGINAL_DST" and orig["original_dst_lb_config"] == {"upstream_port_override": 15008}
    tls = orig["transport_socket"]["typed_config"]
    assert "sni" not in tls
    assert tls["common_tls_context"]["combined_validation_context"]["default_validation_context"][
        "match_typed_subject_alt_names"] == [{"san_type": "URI", "matcher": {"exact": V2_ID}}]
    assert "outbound|80||echo.demo.svc.cluster.local" not in clusters   # nothing routes to it
    # secrets
    sec = we.secrets(cert_chain_pem="-----BEGIN CERTIFICATE-----\n", key_pem="-----BEGIN KEY", root_pem="-----BEGIN R")
    assert sorted(sec) == ["sds/roots.yaml", "sds/workload.yaml"]
    assert sec["sds/workload.yaml"]["resources"][0]["name"] == "workload"
    # YAML that yaml-cpp reads back as strings
    text = we.to_yaml({"a": "y", "b": "N", "c": "on", "d": "x", "e": "", "f": "two\nlines"})
    assert text == 'a: "y"\nb: "N"\nc: "on"\nd: x\ne: ""\nf: |-\n  two\n  lines\n'


def test_route_precedence_follows_gateway_api():
    r_new = route("b-new", "echo", [rule(0, ("echo-v1", 1), matches=prefix("/p"))], created="20")
    r_old = route("z-old", "echo", [rule(0, ("echo-v2", 1), matches=prefix("/p")),
                                    rule(1, ("echo-v2", 1), matches=(
                                        l7.RouteMatch(path_type="PathPrefix", path="/p", method="GET"),))],
                  created="3")
    r_same = route("a-same", "echo", [rule(0, ("echo-v1", 1), matches=(
        l7.RouteMatch(path_type="PathPrefix", path="/p",
                      headers=(l7.StringMatch(type="Exact", name="h", value="1"),)),
        l7.RouteMatch(path_type="PathPrefix", path="/p",
                      query=(l7.StringMatch(type="Exact", name="q", value="1"),))))], created="20")
    files = we.render(view([r_new, r_old, r_same]), access_log="/dev/null")
    rc = next(f["resources"][0] for rel, f in files.items() if rel.startswith("rds/inbound-vip_80_http_echo."))
    assert [r["name"] for r in rc["virtual_hosts"][0]["routes"]] == [
        "demo.z-old.1.0",      # method
        "demo.a-same.0.0",     # a header match
        "demo.a-same.0.1",     # a query match
        "demo.z-old.0.0",      # oldest route
        "demo.b-new.0.0",
    ]


# --- real Envoy ---------------------------------------------------------------------------------------


def test_weighted_split_90_10_through_the_waypoint(world):
    world.wp.push(view([weighted(90, 10)]))
    seen = collections.Counter(world.pod("echo") for _ in range(400))
    share = seen["echo-v1"] / 400
    assert 0.85 <= share <= 0.95, seen


def test_backend_sees_the_waypoint_identity_and_the_client(world):
    world.wp.push(view())
    n = len(world.apps["echo-v2"].requests)
    status, _, body = world.get("echo-v2", "/who", headers={"x-request-id": "req-who-1"})
    assert status == 200, body
    rec = world.apps["echo-v2"].requests[n]
    assert rec["path"] == "/who"
    # the client's address survived the internal hop (original_dst restored it)
    assert rec["headers"]["x-forwarded-for"] == IPS["cli"], rec["headers"]
    # the backend's HBONE server accepts only WP_ID: it saw the waypoint's certificate
    s = world.servers["v2"].stats()
    assert s["listener.hbone_server.ssl.handshake"] >= 1
    assert s.get("listener.hbone_server.ssl.fail_verify_san", 0) == 0
    # the waypoint verified the client (its access log names the peer) and logs one JSON line
    deadline = time.monotonic() + 3
    while not (line := [x for x in world.access_log() if x.get("x_request_id") == "req-who-1"]):
        assert time.monotonic() < deadline, world.access_log()[-3:]
        time.sleep(0.1)
    (line,) = line
    assert line["peer_principal"] == CLIENT_ID
    assert line["response_code"] == 200 and line["method"] == "GET" and line["path"] == "/who"
    assert line["downstream_remote_address"].startswith(IPS["cli"] + ":")
    assert line["downstream_local_address"] == f"{VIPS['echo-v2']}:80"
    assert line["upstream_cluster"] == "outbound|80||echo-v2.demo.svc.cluster.local"
    assert line["route_name"] == "default"
    # a non-HBONE endpoint is reached in plaintext, a TCP port is proxied as bytes
    assert world.pod("plain") == "plain"
    assert tcp_echo(world.ports["raw"], b"bytes through the waypoint") == b"bytes through the waypoint"
    # a destination the waypoint does not serve: the tunnel is closed, nothing answers
    with pytest.raises((OSError, http.client.HTTPException)):
        world.get("nowhere", "/")


def test_path_match_routes_to_a_second_service(world):
    world.wp.push(view([route("echo", "echo", [rule(0, ("other", 1), matches=prefix("/other/")),
                                               rule(1, ("echo-v1", 1))])]))
    assert all(world.pod("echo", "/other/x") == "other" for _ in range(5))
    assert world.pod("echo", "/other") == "other"
    assert world.pod("echo", "/other?q=1") == "other"
    assert world.pod("echo", "/otherwise") == "echo-v1"    # path elements, not characters
    assert world.pod("echo", "/") == "echo-v1"


def test_retry_turns_503_then_200_into_200(world):
    flaky = rule(0, ("echo-v1", 1), matches=prefix("/flaky"))
    world.wp.push(view([route("flaky", "echo-v1", [flaky])]))
    tag = uuid.uuid4().hex[:6]
    assert world.get("echo-v1", f"/flaky/{tag}a/1")[0] == 503          # no retry policy: the 503 shows
    world.wp.push(view([route("flaky", "echo-v1", [l7.RouteRule(
        index=0, matches=prefix("/flaky"), backends=(l7.Backend(service="echo-v1", port=80),),
        retry=l7.Retry(attempts=2, codes=(503,), backoff_s=0.01))])]))
    assert world.get("echo-v1", f"/flaky/{tag}b/1")[0] == 200
    assert world.get("echo-v1", f"/flaky/{tag}c/2")[0] == 200
    assert world.get("echo-v1", f"/flaky/{tag}d/3")[0] == 503          # 3 failures > 2 retries
    assert world.apps["echo-v1"].flaky[f"{tag}d"] == 3


def test_request_timeout_gives_504(world):
    world.wp.push(view([route("slow", "echo-v1", [rule(0, ("echo-v1", 1), matches=prefix("/delay"),
                                                       timeout_s=0.5)])]))
    t0 = time.monotonic()
    status, _, _ = world.get("echo-v1", "/delay/2000")
    took = time.monotonic() - t0
    assert status == 504 and took < 1.5, (status, took)
    assert world.get("echo-v1", "/delay/10")[0] == 200


def test_fault_abort_and_local_rate_limit(world):
    world.wp.push(view([route("other", "other", [rule(0, ("other", 1))], fault=l7.Fault(abort_status=418))]))
    assert [world.get("other")[0] for _ in range(5)] == [418] * 5
    world.wp.push(view([route("other", "other", [rule(0, ("other", 1))],
                              rate_limit=l7.RateLimit(requests=5, per_s=3600))]))
    answers = [world.get("other") for _ in range(7)]
    assert [a[0] for a in answers] == [200] * 5 + [429] * 2, [a[0] for a in answers]
    assert answers[-1][1].get("x-meshlane-ratelimited") == "true"
    world.wp.push(view())
    assert world.get("other")[0] == 200


def test_l7_authorization(world):
    deny_delete = l7.L7Policy(namespace="demo", name="no-delete", action="DENY", targets=(("Service", "echo-v1"),),
                              rules=(l7.L7Rule(operations=(l7.L7Operation(methods=("DELETE",)),)),))
    deny_header = l7.L7Policy(namespace="demo", name="blocked", action="DENY", targets=(("Gateway", "waypoint"),),
                              rules=(l7.L7Rule(conditions=(l7.L7Condition(key="request.headers[x-block]",
                                                                          values=("yes",)),)),))
    only_client = l7.L7Policy(namespace="demo", name="only-client", action="ALLOW", targets=(("Service", "other"),),
                              rules=(l7.L7Rule(sources=(l7.L7Source(principals=(CLIENT_ID.removeprefix("spiffe://"),),
                                                                    namespaces=("demo",)),)),))
    deny_ip = l7.L7Policy(namespace="demo", name="ip", action="DENY", targets=(("Service", "echo-v2"),),
                          rules=(l7.L7Rule(sources=(l7.L7Source(ip_blocks=(f"{IPS['cli']}/32",)),),
                                           operations=(l7.L7Operation(paths=("/ipdeny*",)),)),))
    world.wp.push(view(policies=[deny_delete, deny_header, only_client, deny_ip]))
    # the client's address (restored on the internal hop) and the path prefix
    assert world.get("echo-v2", "/ipdeny/x")[0] == 403
    assert world.get("echo-v2", "/ipdeny/x?a=b")[0] == 403
    status, _, body = world.get("echo-v1", "/x", method="DELETE")
    assert (status, body) == (403, b"RBAC: access denied")
    for m in ("GET", "POST", "PUT"):
        assert world.get("echo-v1", "/x", method=m)[0] == 200, m
    assert world.get("echo-v2", "/x", method="DELETE")[0] == 200          # another Service
    assert world.get("echo-v2", "/", headers={"x-block": "yes"})[0] == 403  # Gateway-wide
    assert world.get("echo-v2", "/", headers={"x-block": "no"})[0] == 200
    assert world.get("other")[0] == 200
    assert world.get("other-client2")[0] == 403                            # another principal
    # an ALLOW with no rules allows nothing
    world.wp.push(view(policies=[l7.L7Policy(namespace="demo", name="none", action="ALLOW",
                                             targets=(("Service", "other"),), rules=())]))
    assert world.get("other")[0] == 403
    assert world.get("echo-v1")[0] == 200
    # a TCP port: network RBAC on the peer principal (filter state of the connection)
    for who, expect in ((CLIENT_ID, b""), (CLIENT2_ID, b"tcp")):
        world.wp.push(view(policies=[l7.L7Policy(
            namespace="demo", name="tcp", action="DENY", targets=(("Service", "raw"),),
            rules=(l7.L7Rule(sources=(l7.L7Source(principals=(who.removeprefix("spiffe://"),)),)),))]))
        assert tcp_echo(world.ports["raw"], b"tcp") == expect, who
    world.wp.push(view())
    assert world.get("other-client2")[0] == 200


def test_route_update_while_requests_flow_drops_nothing(world):
    files = world.wp.push(view([weighted(50, 50)]))
    pid = world.wp.proc.pid
    before = world.wp.xds()

    def update(v1: int, v2: int) -> None:
        new = world.wp.push(view([weighted(v1, v2)]))
        # a weight change is an RDS update only: same listeners, same clusters
        assert new["lds.yaml"] == files["lds.yaml"] and new["cds.yaml"] == files["cds.yaml"]
    results = meshtest.while_requests_flow(
        lambda: world.get("echo")[0],
        [lambda v1=v1, v2=v2: update(v1, v2) for v1, v2 in ((0, 100), (100, 0), (50, 50), (0, 100))],
        workers=3, pause=0.5)
    bad = [r for r in results if r[1] != 200]
    assert len(results) > 50 and not bad, (len(results), bad[:5])
    after = world.wp.xds()
    assert world.wp.proc.pid == pid and world.wp.proc.poll() is None
    for k in ("listener_manager.listener_modified", "listener_manager.listener_removed"):
        assert after.get(k, 0) == before.get(k, 0), k
    # the last update (all to v2) took effect
    assert all(world.pod("echo") == "echo-v2" for _ in range(20))


def test_certificate_rotation_is_a_rename(world):
    world.wp.push(view())
    leaf = world.pki.leaf(WP_ID, "wp-rotated")
    sec = we.secrets(cert_chain_pem=leaf.cert_pem, key_pem=leaf.key_pem, root_pem=world.pki.root_pem)
    world.wp.write(sec)
    world.wp.wait_taken(sec)
    # new HBONE connections from the client are served with the new certificate
    status, text = world.wp.http_get("/certs")
    assert status == 200 and json.loads(text)["certificates"], text[:300]
    serials = {int(c["serial_number"], 16) for e in json.loads(text)["certificates"] for c in e.get("cert_chain", [])}
    new_serial = x509.load_pem_x509_certificate(leaf.cert_pem.encode()).serial_number
    assert new_serial in serials, (new_serial, serials)
    assert world.pod("echo-v1") == "echo-v1"



def test_listener_change_keeps_connections_of_other_services(world):
    """A new Service is a new filter chain of main_internal: Envoy updates the listener in
    place and connections on the unchanged chains are neither closed nor drained."""
    world.wp.push(view())
    with netns.entered(LAB["cli"]):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn = http.client.HTTPConnection("127.0.0.1", world.ports["echo-v1"], timeout=TIMEOUT)
    try:
        s.settimeout(TIMEOUT)
        s.connect(("127.0.0.1", world.ports["echo-v1"]))
        conn.sock = s
        conn.request("GET", "/before")
        first = conn.getresponse()
        assert first.status == 200 and first.read()
        before = world.wp.stats()
        extra = l7.Service(namespace="demo", name="extra", vip=ipaddress.IPv4Address("10.96.0.16"),
                           ports=(l7.ServicePort(port=80, target_port=8080),), selector=(("app", "extra"),))
        more = l7.WaypointView(waypoint=WAYPOINT, services=(*SERVICES, extra), all_services=(*SERVICES, extra),
                               endpoints=(*ENDPOINTS, ("demo/extra", (EP_V1,))))
        files = world.wp.push(more)
        assert files["lds.yaml"] != we.render(view(), access_log=str(world.wp.access_log))["lds.yaml"]
        time.sleep(2.5)     # longer than the waypoint's --drain-time-s
        conn.request("GET", "/after")
        second = conn.getresponse()
        assert second.status == 200 and json.loads(second.read())["path"] == "/after"
        assert (second.getheader("connection") or "").lower() != "close"
        after = world.wp.stats()
        assert after["listener_manager.listener_in_place_updated"] > before.get(
            "listener_manager.listener_in_place_updated", 0)
    finally:
        conn.close()
        s.close()
        world.wp.push(view())



def test_pod_addressed_shape():
    v = dataclasses.replace(view(), workloads=(EP_V2, EP_V1, EP_V1B))
    files = we.render(v, access_log="/l")
    main = next(x for x in files["lds.yaml"]["resources"] if x["name"] == "main_internal")
    v1_http, v1_tcp = (f"inbound-pod|{k}|{V1_ID[9:]}" for k in ("http", "tcp"))
    chains = {c["name"]: c for c in main["filter_chains"]}
    assert {v1_http, v1_tcp, f"inbound-pod|http|{V2_ID[9:]}", f"inbound-pod|tcp|{V2_ID[9:]}"} <= set(chains)
    ranges = main["filter_chain_matcher"]["matcher_tree"]["custom_match"]["typed_config"]["range_matchers"]
    v1 = next(r for r in ranges if r["ranges"][0]["address_prefix"] == IPS["v1"])
    assert [r["address_prefix"] for r in v1["ranges"]] == [IPS["v1"], EP_V1B.ip]   # one pair of chains per identity
    assert v1["on_match"]["matcher"]["on_no_match"]["action"]["name"] == v1_tcp
    assert set(v1["on_match"]["matcher"]["matcher_tree"]["exact_match_map"]["map"]) == {"'http/1.1'", "'h2c'"}
    inspector = main["listener_filters"][1]
    assert inspector["name"] == "envoy.filters.listener.http_inspector"
    # the raw Service's port is TCP only: no waiting there for a server-first protocol
    assert inspector["filter_disabled"] == {"destination_port_range": {"start": 9000, "end": 9001}}
    assert main["continue_on_listener_filters_timeout"] is True
    assert [f["name"] for f in chains[v1_tcp]["filters"]] == ["envoy.filters.network.set_filter_state",
                                                               "envoy.filters.network.tcp_proxy"]
    assert chains[v1_tcp]["filters"][1]["typed_config"]["cluster"] == f"encap|{V1_ID[9:]}"
    clusters = {c["name"]: c for c in files["cds.yaml"]["resources"]}
    encap = clusters[f"encap|{V1_ID[9:]}"]
    assert encap["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "envoy_internal_address": {"server_listener_name": f"connect_originate|{V1_ID[9:]}"}}
    rc = files[we.rds_file(v1_http)]["resources"][0]
    assert rc["virtual_hosts"][0]["routes"][0]["route"]["cluster"] == f"encap|{V1_ID[9:]}"
    # policies: the Gateway's apply to pod-addressed traffic, a Service's do not
    gw = l7.L7Policy(namespace="demo", name="gw", action="DENY", targets=(("Gateway", "waypoint"),),
                     rules=(l7.L7Rule(operations=(l7.L7Operation(methods=("DELETE",)),)),))
    svc = dataclasses.replace(gw, name="svc", targets=(("Service", "echo-v1"),))
    got = we.render(dataclasses.replace(v, policies=(gw, svc)), access_log="/l")[we.rds_file(v1_http)]
    vh = got["resources"][0]["virtual_hosts"][0]
    assert list(vh["typed_per_filter_config"]["meshlane.rbac.deny"]["rbac"]["rules"]["policies"]) == [
        "ns[demo]-policy[gw]-rule[0]"]
    # a pod IP that is also a VIP, or listed twice, gets no second chain
    twice = dataclasses.replace(v, workloads=(EP_V1, EP_V1, l7.Endpoint(pod="demo/x", ip=VIPS["echo"],
                                                                     identity=CLIENT_ID)))
    main = next(x for x in we.render(twice, access_log="/l")["lds.yaml"]["resources"] if x["name"] == "main_internal")
    assert f"inbound-pod|http|{CLIENT_ID[9:]}" not in {c["name"] for c in main["filter_chains"]}


def test_pod_addressed_traffic_through_the_waypoint(world):
    """A waypoint for workloads: HTTP to a pod IP (any port) passes the HTTP filters and the
    Gateway's policies and reaches that very pod and port, over HBONE to its identity; other
    bytes go through as TCP."""
    world.wp.push(view(workloads=(EP_V1, EP_V2)))
    before = len(world.access_log())
    # two ports of one pod (one identity, one encap cluster) and another pod, interleaved on
    # new connections each time: each request reaches the port it was sent to
    for _ in range(3):
        for key, pod in (("pod-v1", "echo-v1"), ("pod-plain", "plain"), ("pod-v2", "echo-v2")):
            assert world.pod(key, "/direct") == pod, key
    # not HTTP: the HTTP inspector gives up and the bytes are proxied as they are
    assert tcp_echo(world.ports["pod-raw"], b"raw bytes") == b"raw bytes"
    deadline = time.monotonic() + 5       # a TCP line is written when the connection closes
    while True:
        logged = world.access_log()[before:]
        if len(logged) == 10 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert {e["upstream_cluster"] for e in logged} == {f"encap|{V1_ID[9:]}", f"encap|{V2_ID[9:]}"}, logged
    assert sorted(str(e.get("route_name")) for e in logged) == ["None"] + ["direct"] * 9, logged
    assert world.pod("echo-v1") == "echo-v1"                              # Services beside it

    # the Gateway's policies apply; with an HTTP-only DENY rule in scope, Istio's TCP
    # semantics deny the TCP connection outright
    deny = l7.L7Policy(namespace="demo", name="gw", action="DENY", targets=(("Gateway", "waypoint"),),
                       rules=(l7.L7Rule(operations=(l7.L7Operation(methods=("DELETE",)),)),))
    world.wp.push(view(policies=[deny], workloads=(EP_V1, EP_V2)))
    assert world.get("pod-v1", "/x", method="DELETE")[0] == 403
    assert world.get("pod-v2", "/x", method="PUT")[0] == 200
    assert tcp_echo(world.ports["pod-raw"], b"raw bytes") == b""

    # without the workloads in the view, a pod IP is not served: the stream just ends
    world.wp.push(view())
    with pytest.raises((OSError, http.client.HTTPException)):
        world.get("pod-v1", "/")


def test_h2c_client_through_the_waypoint(world):
    """The inner listener's codec is AUTO: HTTP/2 with prior knowledge works too (the
    backend, declared plain `http`, is spoken to in HTTP/1.1)."""
    world.wp.push(view())
    with netns.entered(LAB["cli"]):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.settimeout(TIMEOUT)
        s.connect(("127.0.0.1", world.ports["echo-v2"]))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "echo-v2.demo"),
                              (":path", "/h2c")], end_stream=True)
        s.sendall(conn.data_to_send())
        status, body, ended = None, b"", False
        while not ended:
            data = s.recv(65536)
            assert data, "connection closed before the response ended"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = dict(ev.headers)[b":status"]
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    ended = True
            s.sendall(conn.data_to_send())
    assert status == b"200", (status, body[:200])
    assert json.loads(body)["path"] == "/h2c" and json.loads(body)["pod"] == "echo-v2"
