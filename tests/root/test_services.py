"""Services without a waypoint, in a real lab: connect() to a VIP reaches an endpoint the
client's ztunnel picked (port -> targetPort), over HBONE, and a port the Service does not
have is refused.  The waypoint tier builds on this (test_waypoint.py)."""
from __future__ import annotations

import collections
import json

import pytest

from tests.root.meshtest import http_call, ml, ok, running_lab, wait_record

pytestmark = pytest.mark.root

TOPOLOGY = """
nodes: [node1, node2]
namespaces:
  demo: {labels: {"istio.io/dataplane-mode": ambient}}
pods:
  - {name: client-1, node: node1, namespace: demo, serviceAccount: client, app: none}
  - {name: echo-v1, node: node1, namespace: demo, serviceAccount: echo, app: http,
     labels: {app: echo, version: v1}}
  - {name: echo-v2, node: node2, namespace: demo, serviceAccount: echo, app: http,
     labels: {app: echo, version: v2}}
services:
  - {name: echo, namespace: demo, ports: [{name: http, port: 80, targetPort: 8080}], selector: {app: echo}}
"""


def test_vip_is_load_balanced_to_endpoints_by_the_ztunnel(tmp_path):
    topo = tmp_path / "topology.yaml"
    topo.write_text(TOPOLOGY)
    with running_lab("svc", str(topo)) as (name, pods):
        svc = json.loads(ok(ml("get", "services", "echo", "-n", "demo", "-o", "json", lab=name)).stdout)
        vip = svc["spec"]["clusterIP"]
        assert vip.startswith("10.96.")
        client = pods["client-1"]["netns"]
        seen = collections.Counter()
        for _ in range(40):
            status, headers, body = http_call(client, vip, 80)
            assert status == 200, body
            seen[json.loads(body)["pod"]] += 1
        assert set(seen) == {"echo-v1", "echo-v2"}, seen
        rec = wait_record(name, "node1", lambda r: r.get("service") == "demo/echo"
                          and r.get("direction") == "outbound" and r.get("status") == 200)
        assert rec["protocol"] == "HBONE" and rec["dst"].endswith(":8080"), rec
        # the endpoint's ztunnel saw the client's identity, as for any pod-to-pod tunnel
        wait_record(name, "node2", lambda r: r.get("direction") == "inbound"
                    and r.get("dst_workload") == "demo/echo-v2"
                    and r.get("src_identity") == "spiffe://cluster.local/ns/demo/sa/client")
        with pytest.raises(OSError):   # not a port of the Service: the ztunnel resets it
            http_call(client, vip, 81, timeout=5)
