"""The lab's pod application: an HTTP server (8080, or each --port) that answers with the peer it saw.

Runs inside a pod's netns (started by `meshlane lab up`).  GET / returns JSON
{"pod": name, "peer": "ip:port", "local": "ip:port"}; anything POSTed is echoed back
in "body" (so tests can look for their payload on the wire).
"""
from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, action="append", help="repeatable (default 8080)")
    args = ap.parse_args()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, body: str = "") -> None:
            peer = self.client_address
            local = self.connection.getsockname()
            data = json.dumps({"pod": args.name, "peer": f"{peer[0]}:{peer[1]}",
                               "local": f"{local[0]}:{local[1]}", "path": self.path,
                               "body": body}).encode() + b"\n"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._answer()

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            self._answer(self.rfile.read(n).decode(errors="replace"))

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
