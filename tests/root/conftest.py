"""Root-tier fixtures: a lab network of our own, torn down even when a test fails."""
from __future__ import annotations

import os
import uuid

import pytest

from meshlane import labnet, topology


def unique_lab(prefix: str = "mlt") -> str:
    # netns names are global: a name of our own so a user's lab can run beside us
    return f"{prefix}{os.getpid() % 10000}{uuid.uuid4().hex[:4]}"


@pytest.fixture
def lab_network():
    """The default topology's network only (no daemons): namespaces, bridges, veths."""
    lab = unique_lab()
    topo = topology.load(None)
    try:
        pods = {p.name: p for p in labnet.build(lab, topo)}
        yield lab, topo, pods
    finally:
        labnet.teardown(lab, labnet.lab_netns(lab))
