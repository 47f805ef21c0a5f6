"""libbpf through ctypes: the bpf(2) calls bcc lacks (pin, get, links, raw map access).

Lives in meshcore beside netns.py because both halves need it: the node agent pins and
attaches, the ztunnel reads the original destination and registers its listeners.

bcc loads programs and creates maps; everything that must outlive the process (pins,
links) or that bcc does not wrap (sockhash updates, tcx and sk_lookup links) goes
through these few functions.  Errors become MeshErrors that name the object involved.
"""
from __future__ import annotations

import ctypes
import errno
import os

from meshcore.errors import ConfigError, MeshError, NeedsRootError

# enum bpf_attach_type values used here (uapi/linux/bpf.h; SK_LOOKUP and tcx are missing
# from bcc's enum)
ATTACH_CGROUP_SOCK_OPS = 3
ATTACH_SK_MSG_VERDICT = 7
ATTACH_CGROUP_INET4_CONNECT = 10
ATTACH_CGROUP_INET4_GETPEERNAME = 29
ATTACH_SK_LOOKUP = 36
ATTACH_TCX_INGRESS = 46
ATTACH_TCX_EGRESS = 47
PROG_TYPE_SK_LOOKUP = 30
PROG_TYPE_SK_MSG = 16

BPF_ANY = 0
BPF_NOEXIST = 1

try:
    _lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
except OSError as exc:  # pragma: no cover - install problem
    raise ConfigError(f"cannot load libbpf.so.1: {exc}", hint="install Debian's libbpf1") from exc

_lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
_lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
_lib.bpf_link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_lib.bpf_link_update.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_lib.bpf_link_detach.argtypes = [ctypes.c_int]
for _name in ("bpf_map_update_elem", "bpf_map_lookup_elem"):
    getattr(_lib, _name).argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + (
        [ctypes.c_uint64] if _name == "bpf_map_update_elem" else [])
_lib.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
_lib.bpf_map_get_next_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


class BpfError(MeshError):
    """A bpf(2) call failed; `errno` keeps the kernel's answer."""

    def __init__(self, what: str, err: int, *, hint: str | None = None):
        super().__init__(f"{what}: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})",
                         hint=hint)
        self.errno = err


def _check(ret: int, what: str, hint: str | None = None) -> int:
    if ret < 0:
        err = -ret if ret != -1 else ctypes.get_errno()
        if err == errno.EPERM:
            raise NeedsRootError(f"{what}: operation not permitted", hint="run as root")
        raise BpfError(what, err, hint=hint)
    return ret


def obj_pin(fd: int, path: str) -> None:
    _check(_lib.bpf_obj_pin(fd, path.encode()), f"pinning fd {fd} at {path}",
           "is bpffs mounted at /sys/fs/bpf?")


def obj_get(path: str) -> int:
    return _check(_lib.bpf_obj_get(path.encode()), f"opening pinned object {path}")


def link_create(prog_fd: int, target: int, attach_type: int, what: str) -> int:
    return _check(_lib.bpf_link_create(prog_fd, target, attach_type, None),
                  f"attaching {what}")


def link_update(link_fd: int, prog_fd: int, what: str) -> None:
    _check(_lib.bpf_link_update(link_fd, prog_fd, None), f"updating link {what}")


def link_detach(link_fd: int, what: str) -> None:
    _check(_lib.bpf_link_detach(link_fd), f"detaching link {what}")


def map_update(fd: int, key: ctypes.Structure | ctypes._SimpleCData,
               value: ctypes.Structure | ctypes._SimpleCData, what: str, flags: int = BPF_ANY) -> None:
    _check(_lib.bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), flags),
           f"updating {what}")


def map_lookup(fd: int, key, value) -> bool:
    ret = _lib.bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
    if ret < 0:
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            return False
        _check(ret, "map lookup")
    return True


def map_delete(fd: int, key) -> bool:
    ret = _lib.bpf_map_delete_elem(fd, ctypes.byref(key))
    if ret < 0:
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            return False
        _check(ret, "map delete")
    return True


def map_keys(fd: int, key_type):
    """Iterate over a map's keys (a snapshot; entries may change meanwhile)."""
    prev = None
    while True:
        nxt = key_type()
        ret = _lib.bpf_map_get_next_key(fd, ctypes.byref(prev) if prev is not None else None,
                                        ctypes.byref(nxt))
        if ret < 0:
            return
        yield nxt
        prev = nxt
