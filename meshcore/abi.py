"""The kernel/user ABI: ctypes mirrors of bpf/include/meshlane_abi.h.

Every struct here quotes its C definition; tests/unit/test_abi.py compares the sizes and
field offsets with what bcc derives from clang, so the two cannot drift apart silently.
Byte order is noted per field: "be" fields hold network order and are converted at the
edges of this module, nowhere else.
"""
from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct


def ip_to_be32(ip: ipaddress.IPv4Address | str) -> int:
    """An IPv4 address as the u32 the kernel stores (network order in memory)."""
    return struct.unpack("=I", ipaddress.IPv4Address(ip).packed)[0]


def be32_to_ip(value: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(struct.pack("=I", value))


class PodInfo(ctypes.Structure):
    """struct mesh_pod_info { __u32 ip; /* be */ __u32 flags; __u32 pod_id; __u32 pad; };"""
    _fields_ = [("ip", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("pod_id", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class Dst(ctypes.Structure):
    """struct mesh_dst { __u32 ip; /* be */ __u16 port; /* be */ __u16 pad; };"""
    _fields_ = [("ip", ctypes.c_uint32), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]

    def endpoint(self) -> tuple[ipaddress.IPv4Address, int]:
        return be32_to_ip(self.ip), socket.ntohs(self.port)


class OrigKey(ctypes.Structure):
    """struct mesh_orig_key { __u64 netns; __u16 port; /* host */ __u16 pad; __u32 pad2; };"""
    _fields_ = [("netns", ctypes.c_uint64), ("port", ctypes.c_uint16),
                ("pad", ctypes.c_uint16), ("pad2", ctypes.c_uint32)]


class ListenKey(ctypes.Structure):
    """struct mesh_listen_key { __u32 ip; /* be */ __u32 kind; /* LISTENER_* */ };"""
    _fields_ = [("ip", ctypes.c_uint32), ("kind", ctypes.c_uint32)]


class PassKey(ctypes.Structure):
    """struct mesh_pass_key { __u32 remote_ip; /* be */ __u32 local_ip; /* be */
                              __u16 remote_port; /* be */ __u16 pad; __u32 pad2; };"""
    _fields_ = [("remote_ip", ctypes.c_uint32), ("local_ip", ctypes.c_uint32),
                ("remote_port", ctypes.c_uint16), ("pad", ctypes.c_uint16),
                ("pad2", ctypes.c_uint32)]


class VethInfo(ctypes.Structure):
    """struct mesh_veth_info { __u32 pod_ip; /* be */ __u32 pod_id; };"""
    _fields_ = [("pod_ip", ctypes.c_uint32), ("pod_id", ctypes.c_uint32)]


class PolOutKey(ctypes.Structure):
    """struct mesh_pol_out_key { __u32 src_pod; __u32 dst_ip; /* be */ __u16 dst_port; /* host */
                                 __u16 pad; };"""
    _fields_ = [("src_pod", ctypes.c_uint32), ("dst_ip", ctypes.c_uint32),
                ("dst_port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class Verdict(ctypes.Structure):
    """struct mesh_verdict { __u32 rule; __u8 action; __u8 pad[3]; };"""
    _fields_ = [("rule", ctypes.c_uint32), ("action", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class PolInKey(ctypes.Structure):
    """struct mesh_pol_in_key { __u32 prefixlen; __u32 dst_ip; /* be */ __u32 dst_port; /* be */
                                __u32 src_ip; /* be */ };  (LPM trie key)"""
    _fields_ = [("prefixlen", ctypes.c_uint32), ("dst_ip", ctypes.c_uint32),
                ("dst_port", ctypes.c_uint32), ("src_ip", ctypes.c_uint32)]


class FastKey(ctypes.Structure):
    """struct mesh_fast_key { __u32 local_ip; __u32 remote_ip; /* be */ __u16 local_port;
                              __u16 remote_port; /* host */ };  (a socket's own 4-tuple)"""
    _fields_ = [("local_ip", ctypes.c_uint32), ("remote_ip", ctypes.c_uint32),
                ("local_port", ctypes.c_uint16), ("remote_port", ctypes.c_uint16)]

    def endpoints(self) -> tuple[tuple[str, int], tuple[str, int]]:
        return ((str(be32_to_ip(self.local_ip)), self.local_port),
                (str(be32_to_ip(self.remote_ip)), self.remote_port))


class FastFlow(ctypes.Structure):
    """struct mesh_fast_flow { __u32 rule; __u32 src_pod; __u8 client_in; __u8 server_in;
                               __u8 dir[2]; __u32 pad; __u64 bytes[2]; };"""
    _fields_ = [("rule", ctypes.c_uint32), ("src_pod", ctypes.c_uint32),
                ("client_in", ctypes.c_uint8), ("server_in", ctypes.c_uint8),
                ("dir", ctypes.c_uint8 * 2), ("pad", ctypes.c_uint32),
                ("bytes", ctypes.c_uint64 * 2)]


ABI_STRUCTS = {
    "mesh_pod_info": PodInfo,
    "mesh_dst": Dst,
    "mesh_orig_key": OrigKey,
    "mesh_listen_key": ListenKey,
    "mesh_pass_key": PassKey,
    "mesh_veth_info": VethInfo,
    "mesh_pol_out_key": PolOutKey,
    "mesh_verdict": Verdict,
    "mesh_pol_in_key": PolInKey,
    "mesh_fast_key": FastKey,
    "mesh_fast_flow": FastFlow,
}


