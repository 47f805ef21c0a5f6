"""CPU seconds and peak RSS of the mesh processes during a measurement, from /proc.

CPU = utime + stime (fields 14 and 15 of /proc/PID/stat, all threads, in clock ticks)
after minus before.  Peak RSS = the largest VmRSS seen by a sampler thread reading
/proc/PID/status about ten times a second (the kernel's VmHWM would be the peak of the
process's whole life, not of this measurement).  A process that is gone reads as None.

Must not: start, stop or signal any process.
"""
from __future__ import annotations

import os
import threading
from typing import Self

CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_INTERVAL_S = 0.1


def cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is field 3 (state); utime/stime are fields 14/15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class Watch:
    """with Watch({"ztunnel-node1": pid, ...}) as w: ...; then w.result() ->
    {name: {"cpu_s": float | None, "peak_rss_bytes": int | None}}."""

    def __init__(self, pids: dict[str, int]):
        self.pids = dict(pids)
        self.peak: dict[str, int | None] = {n: None for n in self.pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-rss", daemon=True)

    def _sample_once(self) -> None:
        for name, pid in self.pids.items():
            rss = rss_bytes(pid)
            if rss is not None and (self.peak[name] is None or rss > self.peak[name]):
                self.peak[name] = rss

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self._sample_once()

    def __enter__(self) -> Self:
        self.cpu0 = {n: cpu_seconds(p) for n, p in self.pids.items()}
        self._sample_once()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample_once()
        self.cpu1 = {n: cpu_seconds(p) for n, p in self.pids.items()}

    def result(self) -> dict[str, dict]:
        out = {}
        for n in self.pids:
            a, b = self.cpu0.get(n), self.cpu1.get(n)
            out[n] = {"cpu_s": round(b - a, 3) if a is not None and b is not None else None,
                      "peak_rss_bytes": self.peak[n]}
        return out
