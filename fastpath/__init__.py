"""fastpath: the kernel half of meshlane.

Owns the BPF loader (compile with bcc, pin, attach through libbpf links), the ctypes
mirrors of the kernel ABI, map facades and per-pod attach/detach.  It must not speak to
the control plane or the ztunnel; the node agent (meshlane.node) composes it.
"""
