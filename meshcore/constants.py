"""Numbers shared by the kernel programs, the node agent, the ztunnel and the CLI.

Defined once here; `fastpath.abi` generates `bpf/include/meshlane_consts.h` from this
module, so the C side never carries a hand-copied value.
"""
from __future__ import annotations

# --- ports (Istio ambient's numbers) -----------------------------------------------
PORT_OUTBOUND = 15001        # in-pod: redirected app connections (original dst in map)
PORT_INBOUND_PLAIN = 15006   # in-pod: plaintext arriving at an enrolled pod
PORT_HBONE = 15008           # in-pod: mTLS + HTTP/2 CONNECT tunnels
PORT_ADMIN = 15000           # ztunnel admin (loopback of the node)
PORT_STATS = 15020           # prometheus metrics
PORT_READY = 15021           # /healthz/ready
# What the ztunnel serves inside every enrolled pod.  Never a destination: a CONNECT or
# plaintext connection to one of these would be proxied back into the ztunnel (a loop).
POD_LISTENER_PORTS = (PORT_OUTBOUND, PORT_INBOUND_PLAIN, PORT_HBONE)

# --- socket marks --------------------------------------------------------------------
# Every socket the ztunnel opens carries MARK_ZTUNNEL in its low 12 bits, so connect4 and
# the in-pod TC egress program let it through.  Sockets the ztunnel opens *to the app*
# inside the destination pod additionally carry MARK_INBOUND_BIT: with
# net.ipv4.tcp_fwmark_accept=1 the app's accepted socket inherits the mark, and a policy
# route sends the app's replies (addressed to the spoofed client IP) back over lo to the
# ztunnel's transparent socket instead of out of eth0.
MARK_ZTUNNEL = 0x539
MARK_MASK = 0xFFF
MARK_INBOUND_BIT = 0x1000
MARK_INBOUND = MARK_ZTUNNEL | MARK_INBOUND_BIT
INBOUND_ROUTE_TABLE = 0x539  # per-pod policy routing table for the marked replies
INBOUND_RULE_PRIORITY = 1539

# --- identity ------------------------------------------------------------------------
DEFAULT_TRUST_DOMAIN = "cluster.local"
ROOT_NAMESPACE = "istio-system"
CERT_TTL_SECONDS = 24 * 3600

# --- labels -------------------------------------------------------------------------
LABEL_DATAPLANE_MODE = "istio.io/dataplane-mode"
DATAPLANE_AMBIENT = "ambient"
DATAPLANE_NONE = "none"

# --- HBONE / HTTP/2 (ztunnel's settings, DESIGN.md §4) ------------------------------
H2_STREAM_WINDOW = 4 * 1024 * 1024
H2_CONNECTION_WINDOW = 16 * 1024 * 1024
H2_MAX_FRAME_SIZE = 1024 * 1024
H2_SERVER_MAX_CONCURRENT_STREAMS = 200
H2_PING_INTERVAL_S = 10.0
H2_PING_TIMEOUT_S = 20.0
POOL_MAX_STREAMS_PER_CONN = 100
HBONE_OPEN_ATTEMPTS = 3      # a CONNECT the peer did not process (REFUSED_STREAM) is retried
POOL_IDLE_TIMEOUT_S = 300.0

# --- exit codes (sysexits) -----------------------------------------------------------
EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

# --- BPF pin layout -----------------------------------------------------------------
BPFFS = "/sys/fs/bpf"
PIN_ROOT = "/sys/fs/bpf/meshlane"   # /<node>/{maps,progs,links}/...
CGROUP2_CANDIDATES = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")

# --- kernel ABI ------------------------------------------------------------------------
# Bumped whenever a map key/leaf layout changes; the loader refuses to reuse pinned maps
# of another version (it names the pin directory to remove).
ABI_VERSION = 3

# Map names (<= 15 chars, the kernel's BPF_OBJ_NAME_LEN - 1).
MAP_PODS = "mesh_pods"          # netns cookie -> enrolled pod
MAP_SK_DST = "mesh_sk_dst"      # socket cookie -> original destination (connect4 -> sockops, getpeername)
MAP_ORIG_DST = "mesh_orig_dst"  # (netns cookie, client port) -> original destination (for the ztunnel)
MAP_LISTENERS = "mesh_listen"   # sockhash (pod ip, kind) -> ztunnel listener (sk_lookup)
MAP_INB_PASS = "mesh_inb_pass"  # ztunnel -> app connections sk_lookup must not steer
MAP_VETH = "mesh_veth"          # host-side veth ifindex -> pod ip (anti-spoofing)
MAP_COUNTERS = "mesh_counters"  # per-cpu u64 per counter id below
MAP_POL_OUT = "mesh_pol_out"    # (src pod, dst ip, dst port) -> verdict, decided at connect()
MAP_POL_IN = "mesh_pol_in"      # LPM (dst pod ip, dst port, src ip/len) -> verdict for plaintext SYNs
MAP_RULE_CNT = "mesh_rule_cnt"  # per-cpu hits per compiled rule id
MAP_SK_FAST = "mesh_sk_fast"    # socket cookie -> rule id: connect4 chose the fast path (for sockops)
MAP_FAST = "mesh_fast"          # approved same-node flow (client's 4-tuple) -> splice state
MAP_FAST_SK = "mesh_fast_sk"    # sockhash: a fast-path socket's own 4-tuple -> socket (sk_msg splices)

# Kernel policy verdicts (mesh_verdict.action) and the rule ids that are not a user's rule.
VERDICT_ALLOW = 1
VERDICT_DENY = 2
VERDICT_FAST = 3           # allowed for certain (same node, both identities known): direct + spliced
RULE_NO_ALLOW_MATCH = 1    # denied: ALLOW policies are in scope and none matched
RULE_NO_ALLOW_POLICY = 2   # allowed: only DENY policies in scope and none matched
RULE_NO_POLICY = 3         # fast path: no policy applies to the destination at all
RULE_ID_FIRST = 16         # ids of users' rules start here (crc32 of "ns/name#index")

LISTENER_HBONE = 0
LISTENER_PLAIN = 1

POD_F_ENROLLED = 0x1

# Same-node fast path (mesh_fast values).  FAST_DIR_* is the state of one direction of a
# flow: its first send either found the peer socket in the sockhash (SPLICED: every later
# send is redirected too) or did not (TCP: it stays on TCP, since redirecting after bytes
# went by TCP could overtake them).
FAST_DIR_UNDECIDED = 0
FAST_DIR_SPLICED = 1
FAST_DIR_TCP = 2
ANNOTATION_FASTPATH = "meshlane.io/fastpath"   # "false": this pod opts out of the splice
LABEL_USE_WAYPOINT = "istio.io/use-waypoint"   # L7 through a waypoint: never the fast path

# Counter ids: one name each, in this order.  Shared by the C programs (generated header)
# and `meshlane bpf counters`; a new counter goes at the end.
COUNTERS = (
    "connect_redirected",     # connect4 rewrote an app connect to 15001
    "connect_ztunnel_skip",   # connect4 saw the ztunnel's mark and left it alone
    "connect_local_skip",     # loopback or own-pod destination, left alone
    "orig_dst_published",     # sockops stored the original destination for the ztunnel
    "getpeer_restored",       # getpeername4 showed the dialled address
    "lookup_hbone",           # sk_lookup steered a SYN to the HBONE listener
    "lookup_plain",           # sk_lookup steered a plaintext SYN to 15006
    "lookup_no_listener",     # enrolled pod, ztunnel listener missing: refused (fail closed)
    "egress_syn_dropped",     # in-pod TC egress dropped a SYN that was not the ztunnel's
    "spoof_dropped",          # host-veth TC ingress dropped a packet with a foreign source IP
    "policy_out_allow",       # connect4: a policy entry allowed the connect (still via the ztunnel)
    "policy_out_deny",        # connect4: a policy entry denied the connect (ECONNREFUSED, no packet)
    "policy_in_allow",        # sk_lookup: plaintext SYN allowed by a policy entry (to 15006)
    "policy_in_deny",         # sk_lookup: plaintext SYN denied by a policy entry (RST)
    "connect_fast",           # connect4: same-node allowed connect left direct (fast path)
    "fast_syn_passed",        # sk_lookup: an approved fast-path SYN went straight to the app
    "fast_spliced",           # sockops: a fast-path socket put into the sockhash
    "fast_msg_redirected",    # sk_msg: a send redirected to the peer socket (bypassed TCP)
    "fast_bytes_redirected",  # sk_msg: payload bytes of those sends
    "fast_tcp_fallback",      # sk_msg: a direction's first send found no peer; it stays on TCP
)
