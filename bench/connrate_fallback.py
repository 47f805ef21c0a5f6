"""connrate in Python: the same protocol and output as bench/connrate.c, used only when
no C compiler is present.  In the no-mesh scenarios the interpreter itself can be the
limit (the report names which tool ran), so the C build is preferred.

    python connrate_fallback.py server PORT
    python connrate_fallback.py client IP PORT SECONDS
"""
from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time


def serve(port: int) -> int:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(4096)
    while True:
        c, _ = ls.accept()
        with c:
            c.settimeout(2)
            try:
                b = c.recv(1)
                if b:
                    c.sendall(b)
            except OSError:
                pass


def client(ip: str, port: int, seconds: float) -> int:
    lat: list[float] = []
    errors, first_error = 0, ""
    tv = struct.pack("ll", 2, 0)
    start = time.monotonic()
    end = start + seconds
    while (t := time.monotonic()) < end:
        stage = "socket"
        try:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
                stage = "connect"
                s.connect((ip, port))
                stage = "write"
                s.sendall(b"x")
                stage = "read"
                if s.recv(1) != b"x":
                    raise OSError("short read")
                stage = "eof"
                if s.recv(1) != b"":
                    raise OSError("no EOF")
            lat.append(time.monotonic() - t)
        except OSError as exc:
            if not errors:
                first_error = f"{stage}: {exc.strerror or exc}"
            errors += 1
            time.sleep(0.001)
    took = time.monotonic() - start
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p / 100 * (len(lat) - 1) + 0.5))] * 1e6 if lat else 0.0
    print(json.dumps({"tool": "python", "ok": len(lat), "errors": errors, "seconds": round(took, 3),
                      "rate": round(len(lat) / took, 1),
                      "lat_us": {"p50": pct(50), "p90": pct(90), "p99": pct(99)},
                      "first_error": first_error}))
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "server":
        return serve(int(argv[1]))
    if len(argv) == 4 and argv[0] == "client":
        return client(argv[1], int(argv[2]), float(argv[3]))
    print("usage: connrate_fallback.py server PORT | client IP PORT SECONDS", file=sys.stderr)
    return 64


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        os._exit(130)
