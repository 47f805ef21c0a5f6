"""Compile, pin and attach one node's BPF program set.

One `NodeDatapath` per node agent.  `load()` compiles bpf/meshlane.c once with bcc
(0.35-1.1 s), creates or reuses the node's pinned maps under
/sys/fs/bpf/meshlane/<node>/maps, and attaches the cgroup programs to the cgroup-v2 root
through pinned BPF links.  If the links already exist (agent restart or upgrade) they are
switched to the new programs with BPF_LINK_UPDATE, so no connect() ever runs unhooked.
Per-pod attachments live in fastpath.pod and only take map updates and link creation
(tens of ms), never a compile.

Must not: talk to the control plane or the ztunnel, or touch another node's pins.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from meshcore import constants as C
from meshcore.errors import ConfigError, NeedsRootError
from fastpath import abi
from fastpath import fast
from meshcore import bpfsys as libbpf

BPF_SRC = abi.REPO_BPF_DIR / "meshlane.c"

# program name -> (bcc prog type, expected attach type)
PROGRAMS = {
    "mesh_connect4": (18, libbpf.ATTACH_CGROUP_INET4_CONNECT),
    "mesh_getpeer4": (18, libbpf.ATTACH_CGROUP_INET4_GETPEERNAME),
    "mesh_sockops": (13, libbpf.ATTACH_CGROUP_SOCK_OPS),
    "mesh_fast_msg": (libbpf.PROG_TYPE_SK_MSG, libbpf.ATTACH_SK_MSG_VERDICT),
    "mesh_sk_lookup": (libbpf.PROG_TYPE_SK_LOOKUP, libbpf.ATTACH_SK_LOOKUP),
    "mesh_pod_egress": (3, libbpf.ATTACH_TCX_EGRESS),
    "mesh_veth_ingress": (3, libbpf.ATTACH_TCX_INGRESS),
}
CGROUP_PROGRAMS = ("mesh_connect4", "mesh_getpeer4", "mesh_sockops")
MAPS = ("mesh_pods", "mesh_sk_dst", "mesh_orig_dst", "mesh_listen", "mesh_inb_pass", "mesh_veth",
        "mesh_counters", C.MAP_POL_OUT, C.MAP_POL_IN, C.MAP_RULE_CNT, C.MAP_SK_FAST, C.MAP_FAST,
        C.MAP_FAST_SK)


def ensure_bpffs() -> None:
    """Mount bpffs at /sys/fs/bpf if it is not mounted (it is not by default here)."""
    if os.geteuid() != 0:
        raise NeedsRootError("loading BPF programs needs root", hint="run with sudo")
    with open("/proc/mounts") as f:
        if any(line.split()[1] == C.BPFFS and line.split()[2] == "bpf" for line in f):
            return
    os.makedirs(C.BPFFS, exist_ok=True)
    res = subprocess.run(["mount", "-t", "bpf", "bpf", C.BPFFS], capture_output=True, text=True)
    if res.returncode != 0:
        raise ConfigError(f"cannot mount bpffs at {C.BPFFS}: {res.stderr.strip()}",
                          hint="mount it by hand: mount -t bpf bpf /sys/fs/bpf")


def cgroup2_root() -> str:
    with open("/proc/mounts") as f:
        mounts = {line.split()[1]: line.split()[2] for line in f}
    for cand in C.CGROUP2_CANDIDATES:
        if mounts.get(cand) == "cgroup2":
            return cand
    raise ConfigError("no cgroup v2 hierarchy mounted",
                      hint=f"looked at {', '.join(C.CGROUP2_CANDIDATES)}")


def check_kernel_headers() -> None:
    build = Path(f"/lib/modules/{os.uname().release}/build")
    if not (build / "include").exists():
        raise ConfigError(f"bcc needs kernel headers at {build}",
                          hint="run `make deps` (links Debian's linux-headers-amd64 there)")


def program_text() -> str:
    """bpf/meshlane.c with its local `#include "..."` lines expanded, each file once.

    bcc only turns functions of the main file into programs and only rewrites map
    calls (`map.lookup(...)`) written in it; expanding the includes keeps the C one file
    per hook family and one header for the ABI.
    """
    seen: set[Path] = set()

    def expand(path: Path) -> list[str]:
        if path in seen:
            return []
        seen.add(path)
        out = []
        for line in path.read_text().splitlines():
            m = re.match(r'#include "([A-Za-z_]+\.[ch])"', line)
            if not m:
                out.append(line)
                continue
            for d in (path.parent, abi.REPO_BPF_DIR / "include", abi.REPO_BPF_DIR):
                if (d / m.group(1)).exists():
                    out.extend(expand((d / m.group(1)).resolve()))
                    break
            else:
                out.append(line)
        return out

    return "\n".join(expand(BPF_SRC.resolve())) + "\n"


def pin_dir(node: str) -> Path:
    return Path(C.PIN_ROOT) / node


@dataclass
class NodeDatapath:
    node: str
    bpf: object | None = None
    prog_fds: dict[str, int] = field(default_factory=dict)
    map_fds: dict[str, int] = field(default_factory=dict)
    compile_seconds: float = 0.0

    @property
    def root(self) -> Path:
        return pin_dir(self.node)

    @property
    def maps_dir(self) -> Path:
        return self.root / "maps"

    @property
    def links_dir(self) -> Path:
        return self.root / "links"

    @property
    def pods_dir(self) -> Path:
        return self.root / "pods"

    def _check_abi(self) -> None:
        marker = self.root / "abi"
        ver = f"abi-v{C.ABI_VERSION}"
        if marker.exists():
            found = [p.name for p in marker.iterdir()]
            if found and found != [ver]:
                raise ConfigError(
                    f"pinned maps under {self.root} have layout {found[0]}, this build needs {ver}",
                    hint=f"stop the node agent and run `meshlane bpf unpin --node {self.node}`")
        (marker / ver).mkdir(parents=True, exist_ok=True)

    def load(self) -> None:
        ensure_bpffs()
        check_kernel_headers()
        from bcc import BPF  # imported late: needs root and headers, and is slow

        for d in (self.maps_dir, self.links_dir, self.pods_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._check_abi()
        t0 = time.monotonic()
        cflags = [f'-DMESH_PIN_DIR="{self.maps_dir}"', f"-I{abi.REPO_BPF_DIR / 'include'}",
                  f"-I{abi.REPO_BPF_DIR}", "-Wno-macro-redefined"]
        try:
            self.bpf = BPF(text=program_text().encode(), cflags=cflags)
            for name, (ptype, atype) in PROGRAMS.items():
                fn = self.bpf.load_func(name.encode(), ptype, attach_type=atype)
                self.prog_fds[name] = fn.fd
        except Exception as exc:
            raise ConfigError(f"compiling/loading {BPF_SRC} failed: {exc}",
                              hint="see the verifier log above; is the kernel >= 6.6?") from exc
        self.compile_seconds = time.monotonic() - t0
        for name in MAPS:
            self.map_fds[name] = libbpf.obj_get(str(self.maps_dir / name))
        cg_fd = os.open(cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in CGROUP_PROGRAMS:
                self._link(name, cg_fd, "the cgroup-v2 root")
        finally:
            os.close(cg_fd)
        # the splice program hangs off the sockhash itself
        self._link("mesh_fast_msg", self.map_fds[C.MAP_FAST_SK], C.MAP_FAST_SK)

    def _link(self, name: str, target_fd: int, target: str) -> None:
        """Attach program `name` through a pinned link, or switch an existing link (agent
        restart or upgrade) to this build's program without a moment unhooked."""
        pin = self.links_dir / name
        prog = self.prog_fds[name]
        if pin.exists():
            link = libbpf.obj_get(str(pin))
            try:
                libbpf.link_update(link, prog, f"{pin}")
            finally:
                os.close(link)
            return
        link = libbpf.link_create(prog, target_fd, PROGRAMS[name][1], f"{name} to {target}")
        try:
            libbpf.obj_pin(link, str(pin))
        finally:
            os.close(link)

    def close(self) -> None:
        """Drop this process's handles; pinned maps and links stay (the kernel part lives on)."""
        for fd in list(self.map_fds.values()):
            os.close(fd)
        self.map_fds.clear()
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
        self.prog_fds.clear()

    # --- maps ----------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        fd = self.map_fds["mesh_counters"] if self.map_fds else libbpf.obj_get(str(self.maps_dir / "mesh_counters"))
        out = {}
        try:
            for i, name in enumerate(C.COUNTERS):
                out[name] = percpu_sum(fd, ctypes.c_uint32(i))
        finally:
            if not self.map_fds:
                os.close(fd)
        return out


def percpu_sum(fd: int, key) -> int:
    """The sum over CPUs of a per-CPU u64 map entry (0 if the key is absent)."""
    vals = (ctypes.c_uint64 * max(_possible_cpus(), os.cpu_count() or 1))()
    return int(sum(vals)) if libbpf.map_lookup(fd, key, vals) else 0


def _possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    total = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        total += (int(hi) if hi else int(lo)) - int(lo) + 1
    return total


def unpin_node(node: str) -> list[str]:
    """Remove every pin of a node (maps, cgroup links, per-pod links): the programs
    detach once no process holds them.  Returns what was removed."""
    root = pin_dir(node)
    if not root.exists():
        return []
    fast_pin = root / "maps" / C.MAP_FAST
    if fast_pin.exists():
        # unsplice first: the sockhash outlives its pin while spliced sockets hold it
        fd = libbpf.obj_get(str(fast_pin))
        try:
            fast.unsplice_all(fd)
        finally:
            os.close(fd)
    removed = [str(p) for p in sorted(root.rglob("*"))]
    shutil.rmtree(root)  # bpffs supports unlink/rmdir of pins and directories
    parent = root.parent
    try:
        parent.rmdir()
    except OSError:
        pass
    return removed


def dump_state(node: str) -> dict:
    root = pin_dir(node)
    return {"pin_dir": str(root), "pins": sorted(str(p.relative_to(root)) for p in root.rglob("*"))
            if root.exists() else []}


if __name__ == "__main__":  # manual smoke: python -m fastpath.loader NODE
    import sys
    dp = NodeDatapath(sys.argv[1])
    dp.load()
    print(json.dumps({"compile_s": dp.compile_seconds, **dump_state(dp.node)}, indent=1))
    dp.close()
