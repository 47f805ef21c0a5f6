"""Entering network namespaces: the one OS primitive every meshlane package needs.

Python 3.11 has no os.setns, so this calls libc's setns(2) through ctypes.  setns
changes the namespace of the *calling thread* only; `entered()` switches the current
thread in and always back, so sockets and netlink handles created inside belong to the
pod while the rest of the process stays where it was.  No network I/O happens here.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import threading
from pathlib import Path

from meshcore.errors import NeedsRootError, NotFoundError

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71
NETNS_RUN_DIR = Path("/run/netns")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        if err == errno.EPERM:
            raise NeedsRootError("setns(CLONE_NEWNET) was refused", hint="run as root")
        raise OSError(err, f"setns: {os.strerror(err)}")


def resolve(ref: str | os.PathLike) -> Path:
    """A netns reference -> a path that can be opened: a name under /run/netns, or
    any path to a netns file such as /proc/PID/ns/net."""
    text = os.fspath(ref)
    path = Path(text) if "/" in text else NETNS_RUN_DIR / text
    if not path.exists():
        raise NotFoundError(f"network namespace {text!r} not found at {path}",
                            hint="list them with `ip netns list` or check the PID")
    return path


def open_netns(ref: str | os.PathLike) -> int:
    """Open a netns file and return its fd (O_RDONLY | O_CLOEXEC); caller closes it."""
    return os.open(resolve(ref), os.O_RDONLY | os.O_CLOEXEC)


_home = threading.local()


def _home_fd() -> int:
    """An fd of the netns this thread was in when it first entered another one.

    Cached per thread: the ztunnel enters pod namespaces on every connection it opens,
    and reopening /proc/thread-self/ns/net each time would cost a path walk per connect.
    """
    fd = getattr(_home, "fd", None)
    if fd is None:
        fd = _home.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    return fd


@contextlib.contextmanager
def entered(target: str | os.PathLike | int):
    """Run the body with the current thread inside `target` (a name, a path or an fd),
    then return to the thread's home netns.  Do not nest: the body runs in `target`."""
    home = _home_fd()
    fd = target if isinstance(target, int) else open_netns(target)
    try:
        _setns(fd)
        try:
            yield
        finally:
            _setns(home)
    finally:
        if not isinstance(target, int):
            os.close(fd)


def cookie_of(target: str | os.PathLike | int) -> int:
    """The kernel's netns cookie (what bpf_get_netns_cookie returns) for a netns."""
    with entered(target):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    return int.from_bytes(raw, "little")


def inode_of(target: str | os.PathLike | int) -> int:
    if isinstance(target, int):
        return os.fstat(target).st_ino
    return os.stat(resolve(target)).st_ino


def current_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino
