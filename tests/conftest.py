"""Shared test setup: the root tier's gate.

Tests marked `root` need root, network namespaces, bpffs and bcc.  On a developer's
machine without root they skip with the reason; under CI (CI=true) they must never
skip silently, so a missing prerequisite fails them instead.
"""
from __future__ import annotations

import os

import pytest


def root_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.isdir("/run/netns") and not os.access("/run", os.W_OK):
        return "cannot create network namespaces"
    try:
        import bcc  # noqa: F401
    except Exception as exc:  # pragma: no cover
        return f"bcc not importable: {exc}"
    return None


def pytest_collection_modifyitems(config, items):
    problem = root_problem()
    if problem is None:
        return
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    for item in items:
        if "root" in item.keywords:
            if in_ci:
                item.fixturenames.insert(0, "_root_required_in_ci")
            else:
                item.add_marker(pytest.mark.skip(reason=f"root tier: {problem}"))


@pytest.fixture
def _root_required_in_ci():
    pytest.fail(f"root tier cannot run here ({root_problem()}) but CI=true: refusing to skip")
