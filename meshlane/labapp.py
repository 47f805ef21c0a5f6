"""The lab's pod application: an HTTP server (8080, or each --port) that answers with the peer it saw.

Runs inside a pod's netns (started by `meshlane lab up`).  Every request, whatever its
method (GET, POST, PUT, DELETE, PATCH, OPTIONS, ...), is answered with JSON

    {"pod": name, "peer": "ip:port", "local": "ip:port", "method": "GET",
     "path": "/x?y=1", "headers": {"host": "...", ...}, "body": "..."}

where "body" is the request body echoed back (so tests can look for their payload on the
wire) and "headers" the request headers, names lower-cased (repeated headers joined with
", ").  HEAD gets the same status and headers without a body; OPTIONS also carries
`Allow`.  Every response carries `x-pod: <name>` (which backend answered, as seen through
a waypoint).

For L7 tests (retries, timeouts, fault injection, routing):

* `/status/<code>`          answers with status <code> (200-599; 204 and 304 without a body);
* `/delay/<ms>`             sleeps <ms> milliseconds, then answers 200;
* `?delay_ms=<ms>`          on any path: sleeps first, then answers as the path says;
* `/flaky/<key>/<n>`        answers 503 to the first <n> requests with that <key> (counted
                            per app process, thread-safe), then 200; the JSON carries
                            "attempt" (1-based), so a test can see how many tries it took;
* `/fail-on/<pod>`          answers 503 when <pod> is this app's own --name, else 200 (one
                            backend of a Service fails, its peers serve: outlier detection).

Request counting (mirroring tests: ask a backend directly what reached it):

* `/count/<key>`, or a header `x-count: <key>` on any request, counts the request under
  <key> (per app process, thread-safe; the path wins when both are given); the JSON
  carries "count" (this request's number, 1-based);
* `/seen/<key>`             answers 200 with "seen" (how many requests <key> has counted)
                            and "hosts" (the distinct Host headers of those requests,
                            sorted), without counting itself.

Anything else answers 200.  A malformed number in one of these paths answers 400.
"""
from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MAX_DELAY_MS = 600_000
NO_BODY = {204, 304}
ALLOW = "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE"


class FlakyCounter:
    """How many requests each key has seen (thread-safe); for /count also their Hosts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        self._hosts: dict[str, set[str]] = {}

    def next(self, key: str, host: str | None = None) -> int:
        with self._lock:
            self._seen[key] = self._seen.get(key, 0) + 1
            if host is not None:
                self._hosts.setdefault(key, set()).add(host)
            return self._seen[key]

    def seen(self, key: str) -> tuple[int, list[str]]:
        with self._lock:
            return self._seen.get(key, 0), sorted(self._hosts.get(key, ()))


def plan(path: str, flaky: FlakyCounter, *, pod: str = "", counts: FlakyCounter | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, float, dict]:
    """(status, delay in seconds, extra JSON fields) for a request path; `pod` is this
    app's name (/fail-on), `counts` the /count and /seen store, `headers` the request's
    (lower-cased names) for x-count and the Host recorded with a count."""
    url = urlsplit(path)
    parts = [p for p in url.path.split("/") if p]
    headers = headers or {}
    extra: dict = {}
    status, delay_ms = 200, 0.0
    if counts is not None:
        if len(parts) == 2 and parts[0] == "seen":
            extra["seen"], extra["hosts"] = counts.seen(parts[1])
        else:
            key = parts[1] if len(parts) == 2 and parts[0] == "count" else headers.get("x-count")
            if key:
                extra["count"] = counts.next(key, headers.get("host", ""))
    try:
        q = parse_qs(url.query).get("delay_ms")
        if q:
            delay_ms = float(q[-1])
        if len(parts) == 2 and parts[0] == "fail-on":
            status = 503 if parts[1] == pod else 200
        elif len(parts) == 2 and parts[0] == "status":
            status = int(parts[1])
            if not 200 <= status <= 599:
                raise ValueError(f"status {status} out of range")
        elif len(parts) == 2 and parts[0] == "delay":
            delay_ms = float(parts[1])
        elif len(parts) == 3 and parts[0] == "flaky":
            n = int(parts[2])
            attempt = flaky.next(parts[1])
            extra["attempt"] = attempt
            status = 503 if attempt <= n else 200
        if not 0 <= delay_ms <= MAX_DELAY_MS:
            raise ValueError(f"delay {delay_ms}ms out of range")
    except ValueError as exc:
        return 400, 0.0, {"error": str(exc)}
    return status, delay_ms / 1000.0, extra


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, action="append", help="repeatable (default 8080)")
    args = ap.parse_args()
    flaky, counts = FlakyCounter(), FlakyCounter()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            super().setup()
            # headers and body leave in two writes: without NODELAY, Nagle + the peer's
            # delayed ACK stall every keep-alive response by ~40 ms
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def _read_body(self) -> bytes:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                data = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass    # trailers
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n > 0 else b""

        def _answer(self) -> None:
            body = self._read_body().decode(errors="replace")
            headers: dict[str, str] = {}
            for k, v in self.headers.items():
                k = k.lower()
                headers[k] = f"{headers[k]}, {v}" if k in headers else v
            status, delay, extra = plan(self.path, flaky, pod=args.name, counts=counts, headers=headers)
            if delay:
                time.sleep(delay)
            peer = self.client_address
            local = self.connection.getsockname()
            data = json.dumps({"pod": args.name, "peer": f"{peer[0]}:{peer[1]}",
                               "local": f"{local[0]}:{local[1]}", "method": self.command,
                               "path": self.path, "headers": headers, "body": body,
                               "status": status, **extra}).encode() + b"\n"
            if status in NO_BODY:
                data = b""
            self.send_response(status)
            self.send_header("x-pod", args.name)
            if self.command == "OPTIONS":
                self.send_header("Allow", ALLOW)
            if status not in NO_BODY:
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = _answer

        def do_HEAD(self):
            self._answer()

        def log_message(self, *a):
            pass

    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    servers = [ThreadingHTTPServer(("0.0.0.0", port), Handler) for port in args.port or [8080]]
    for srv in servers[1:]:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    servers[0].serve_forever()


if __name__ == "__main__":
    main()
