"""meshcore: the leaf package of meshlane.

Owns the constants (ports, marks, map names, exit codes), the resource and identity
models and the error tree.  It imports nothing else from meshlane; every other package
(fastpath, slowpath, cni_plugin, meshlane) imports from here.

Apart from pure models it holds two thin syscall wrappers, because both the node agent
and the ztunnel need them and those two must not import each other: `netns` (setns)
and `bpfsys` (libbpf's pin/link/map calls through ctypes); `abi` holds the ctypes
mirrors of the kernel structs.  No network I/O happens in this package.
"""
