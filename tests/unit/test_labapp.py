"""The lab pod app: the paths L7 tests lean on (`plan`), and one real process on loopback."""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from meshlane.labapp import FlakyCounter, plan


def _plan(path: str, *, pod: str = "web-1", headers: dict | None = None, counts=None, flaky=None):
    return plan(path, flaky or FlakyCounter(), pod=pod, counts=counts if counts is not None else FlakyCounter(),
                headers=headers)


def test_plain_paths_answer_200_without_counting():
    counts = FlakyCounter()
    assert _plan("/", counts=counts) == (200, 0.0, {})
    assert _plan("/anything/else?x=1", counts=counts) == (200, 0.0, {})
    assert counts.seen("anything") == (0, [])


def test_existing_paths_keep_their_meaning():
    assert _plan("/status/418")[0] == 418
    assert _plan("/status/99")[0] == 400
    assert _plan("/delay/250")[:2] == (200, 0.25)
    assert _plan("/x?delay_ms=20")[:2] == (200, 0.02)
    flaky = FlakyCounter()
    assert [_plan("/flaky/k/2", flaky=flaky)[0] for _ in range(3)] == [503, 503, 200]
    # the old two-argument call still works
    assert plan("/status/503", FlakyCounter()) == (503, 0.0, {})


def test_fail_on_fails_only_on_the_named_pod():
    assert _plan("/fail-on/web-1", pod="web-1")[0] == 503
    assert _plan("/fail-on/web-1", pod="web-2")[0] == 200
    assert _plan("/fail-on/web-1/extra", pod="web-1")[0] == 200    # not the /fail-on/<pod> shape
    assert plan("/fail-on/web-1", FlakyCounter())[0] == 200         # no pod name: never matches
    # delay_ms still applies
    assert _plan("/fail-on/a?delay_ms=5", pod="a")[:2] == (503, 0.005)


def test_count_by_path_and_by_header_then_seen():
    counts = FlakyCounter()
    assert _plan("/count/k1", counts=counts, headers={"host": "h1"})[2] == {"count": 1}
    assert _plan("/count/k1", counts=counts, headers={"host": "h2"})[2] == {"count": 2}
    # a header counts any request, and the request keeps its meaning
    status, _, extra = _plan("/status/503", counts=counts, headers={"x-count": "k1", "host": "h1"})
    assert (status, extra) == (503, {"count": 3})
    # the path wins over the header
    assert _plan("/count/k2", counts=counts, headers={"x-count": "k1"})[2] == {"count": 1}
    # /seen reports and does not count, not even with an x-count header
    status, _, extra = _plan("/seen/k1", counts=counts, headers={"x-count": "k1"})
    assert (status, extra) == (200, {"seen": 3, "hosts": ["h1", "h2"]})
    assert _plan("/seen/k2", counts=counts)[2] == {"seen": 1, "hosts": [""]}
    assert _plan("/seen/nothing", counts=counts)[2] == {"seen": 0, "hosts": []}
    # keys of /count and /flaky are separate stores
    flaky = FlakyCounter()
    assert _plan("/flaky/k1/0", flaky=flaky, counts=counts)[2] == {"attempt": 1}


def test_counter_is_thread_safe():
    counts = FlakyCounter()

    def hit():
        for _ in range(500):
            counts.next("k", "h")
    threads = [threading.Thread(target=hit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts.seen("k") == (4000, ["h"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "meshlane.labapp", "--name", "unit-pod", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(proc.stderr.read().decode() if proc.poll() is not None else "no listener")
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _get(port: int, path: str, headers: dict | None = None) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(resp.read())
    finally:
        conn.close()


def test_the_app_process_counts_and_fails_on_its_own_name(app):
    status, headers, body = _get(app, "/fail-on/unit-pod", {"X-Count": "m"})
    assert status == 503 and headers["x-pod"] == "unit-pod" and body["count"] == 1
    assert _get(app, "/fail-on/other-pod")[0] == 200
    status, _, body = _get(app, "/count/m", {"Host": "svc-shadow"})
    assert status == 200 and body["count"] == 2 and body["pod"] == "unit-pod"
    status, _, body = _get(app, "/seen/m")
    assert status == 200 and body["seen"] == 2
    assert body["hosts"] == sorted({f"127.0.0.1:{app}", "svc-shadow"})
