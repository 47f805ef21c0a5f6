"""Workload certificates: CSR to a real control plane over its unix socket, node-scoped
signing, and renewal at half-life (short TTL so it happens during the test)."""
from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from meshlane.control import ControlPlane
from meshcore.identity import SpiffeId
from slowpath.ztunnel import LocalPod, Ztunnel


def test_ztunnel_renews_at_half_life(tmp_path):
    async def main():
        sock = tmp_path / "control.sock"
        cp = ControlPlane(state_dir=tmp_path / "state", socket_path=sock, cert_ttl=timedelta(seconds=3))
        ready = asyncio.Event()
        server = asyncio.create_task(cp.serve(ready))
        await ready.wait()
        boot = cp.op_create_token(node="node1")["token"]   # as an operator, then the node joins
        token = cp.op_register_node("node1", bootstrap_token=boot)["token"]
        cp.op_put({"kind": "Pod", "metadata": {"name": "client-1", "namespace": "demo"},
                   "spec": {"nodeName": "node1", "serviceAccountName": "client"},
                   "status": {"podIP": "10.244.1.10"}})
        zt = Ztunnel(node="node1", control_socket=str(sock), zds_socket=str(tmp_path / "zds"),
                     token=token, maps_dir=str(tmp_path))
        zt.loop = asyncio.get_running_loop()
        pod = LocalPod(uid="demo/client-1", name="client-1", namespace="demo", service_account="client",
                       ip="10.244.1.10", netns_fd=-1, cookie=0,
                       spiffe=SpiffeId(namespace="demo", service_account="client"))
        zt.pods[pod.uid] = pod
        await zt._issue_cert(pod)
        first = pod.cert
        assert first.spiffe.uri == "spiffe://cluster.local/ns/demo/sa/client"
        assert 2.5 <= first.ttl.total_seconds() <= 64  # notBefore is backdated by a minute
        # a cert whose half-life is in the past is renewed after the 1 s minimum delay
        for _ in range(40):
            await asyncio.sleep(0.1)
            if pod.cert is not first:
                break
        assert pod.cert is not first, "certificate was not renewed"
        assert pod.cert.not_after > first.not_after
        pod.renew_handle.cancel()

        # the node may not ask for a pod that is scheduled elsewhere
        cp.op_put({"kind": "Pod", "metadata": {"name": "other", "namespace": "demo"},
                   "spec": {"nodeName": "node2", "serviceAccountName": "x"}, "status": {}})
        stranger = LocalPod(uid="demo/other", name="other", namespace="demo", service_account="x",
                            ip="10.244.2.9", netns_fd=-1, cookie=0,
                            spiffe=SpiffeId(namespace="demo", service_account="x"))
        with pytest.raises(Exception, match="scheduled on 'node2'"):
            await zt._issue_cert(stranger)
        server.cancel()
    asyncio.run(main())
