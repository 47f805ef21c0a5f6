/* meshlane kernel/user ABI: every struct that crosses the boundary, and every map.
 *
 * Rules: explicit padding, no bitfields, byte order of each field in a comment, a size
 * assert per struct.  fastpath/abi.py mirrors each struct with ctypes and
 * tests/unit/test_abi.py checks the mirrors against what clang laid out here.
 * Maps are pinned under MESH_PIN_DIR (set by the loader: /sys/fs/bpf/meshlane/<node>/maps)
 * so enrolled pods keep working while the node agent restarts.
 */
#ifndef MESHLANE_ABI_H
#define MESHLANE_ABI_H

#include "meshlane_consts.h"

#ifndef MESH_PIN_DIR
#error "MESH_PIN_DIR must be defined by the loader"
#endif

#define MESH_PIN(name) MESH_PIN_DIR "/" #name

/* mesh_pods: netns cookie (host u64) -> enrolled pod */
struct mesh_pod_info {
	__u32 ip;      /* be: the pod's IPv4 address */
	__u32 flags;   /* host: MESH_POD_F_* */
	__u32 pod_id;  /* host: node-local pod number */
	__u32 pad;
};
_Static_assert(sizeof(struct mesh_pod_info) == 16, "mesh_pod_info");

/* mesh_sk_dst: socket cookie (host u64) -> original destination;
 * mesh_orig_dst: (netns cookie, client port) -> original destination */
struct mesh_dst {
	__u32 ip;    /* be */
	__u16 port;  /* be */
	__u16 pad;
};
_Static_assert(sizeof(struct mesh_dst) == 8, "mesh_dst");

struct mesh_orig_key {
	__u64 netns;  /* host: netns cookie of the client pod */
	__u16 port;   /* host: client's ephemeral port (its connection to 127.0.0.1:15001) */
	__u16 pad;
	__u32 pad2;
};
_Static_assert(sizeof(struct mesh_orig_key) == 16, "mesh_orig_key");

/* mesh_listen (sockhash): (pod ip, listener kind) -> ztunnel listening socket */
struct mesh_listen_key {
	__u32 ip;    /* be: the pod's IPv4 address */
	__u32 kind;  /* host: MESH_LISTENER_* */
};
_Static_assert(sizeof(struct mesh_listen_key) == 8, "mesh_listen_key");

/* mesh_inb_pass: connections the ztunnel itself opens to the app inside the pod (with
 * the client's address as source, over lo).  sk_lookup cannot see socket marks and the
 * kernel reports eth0 as their ingress device, so the ztunnel names each one here for
 * the duration of its connect(). */
struct mesh_pass_key {
	__u32 remote_ip;    /* be: the (spoofed) client address */
	__u32 local_ip;     /* be: the pod's address */
	__u16 remote_port;  /* be */
	__u16 pad;
	__u32 pad2;
};
_Static_assert(sizeof(struct mesh_pass_key) == 16, "mesh_pass_key");

/* mesh_veth: host-side veth ifindex (host u32) -> the only source IP allowed from it */
struct mesh_veth_info {
	__u32 pod_ip;  /* be */
	__u32 pod_id;  /* host */
};
_Static_assert(sizeof(struct mesh_veth_info) == 8, "mesh_veth_info");

/* L4 authorization, compiled by the node agent (fastpath/policy.py) from the policies in
 * scope for each destination.  mesh_verdict.rule names the deciding rule for counting
 * (MESH_RULE_* below, or a user's rule id).
 *
 * mesh_pol_out: decided at connect() in an enrolled source pod, keyed by the source pod
 * and the destination pod's IP and port; port 0 holds the verdict for every port without
 * an entry of its own.  No entry: no policy applies, the ztunnel decides. */
struct mesh_pol_out_key {
	__u32 src_pod;   /* host: pod_id of the source pod (mesh_pod_info.pod_id) */
	__u32 dst_ip;    /* be */
	__u16 dst_port;  /* host; 0 = any other port */
	__u16 pad;
};
_Static_assert(sizeof(struct mesh_pol_out_key) == 12, "mesh_pol_out_key");

struct mesh_verdict {
	__u32 rule;      /* host: rule id */
	__u8 action;     /* MESH_VERDICT_* */
	__u8 pad[3];
};
_Static_assert(sizeof(struct mesh_verdict) == 8, "mesh_verdict");

/* mesh_pol_in: plaintext SYNs into an enrolled pod (no identity: decidable from the
 * source address and the port alone).  LPM trie: the destination and port are always
 * matched in full, the source by prefix. */
struct mesh_pol_in_key {
	__u32 prefixlen; /* host: 64 + source prefix length */
	__u32 dst_ip;    /* be: the pod's address */
	__u32 dst_port;  /* be (32-bit); 0 = any other port */
	__u32 src_ip;    /* be */
};
_Static_assert(sizeof(struct mesh_pol_in_key) == 16, "mesh_pol_in_key");

/* Same-node fast path (DESIGN.md §1): a connect between two enrolled pods of this node
 * that policy allows for certain (mesh_pol_out says MESH_VERDICT_FAST) stays direct, and
 * both sockets go into mesh_fast_sk so sk_msg hands payload socket to socket.
 *
 * mesh_sk_fast: socket cookie -> rule id, from connect4 to sockops (the client port is
 * only bound at TCP_CONNECT_CB).
 * mesh_fast: the approved flow, keyed by the client socket's own 4-tuple.  It lets the
 * SYN out of the client pod (TC egress) and into the server's app (sk_lookup), tells the
 * ESTABLISHED callbacks to splice, and holds the state of each direction.  The node agent
 * deletes an entry to unsplice a flow (policy change, opt-out, detach): sk_msg then
 * passes every later send to TCP.  Sockets are never deleted from mesh_fast_sk by hand:
 * the kernel discards data redirected to a socket that its app has not read yet when the
 * socket leaves the sockhash, so they leave it when they close. */
struct mesh_fast_key {
	__u32 local_ip;     /* be */
	__u32 remote_ip;    /* be */
	__u16 local_port;   /* host */
	__u16 remote_port;  /* host */
};
_Static_assert(sizeof(struct mesh_fast_key) == 12, "mesh_fast_key");

struct mesh_fast_flow {
	__u32 rule;       /* host: the rule that allowed it (MESH_RULE_* or a user's rule id) */
	__u32 src_pod;    /* host: pod_id of the client pod */
	__u8 client_in;   /* 1: the client socket is in mesh_fast_sk */
	__u8 server_in;   /* 1: the server socket is in mesh_fast_sk */
	__u8 dir[2];      /* MESH_FAST_DIR_*: [0] client->server, [1] server->client; each
	                   * written only by that direction's sender, under its socket lock */
	__u32 pad;
	__u64 bytes[2];   /* host: payload redirected per direction */
};
_Static_assert(sizeof(struct mesh_fast_flow) == 32, "mesh_fast_flow");

BPF_TABLE_PINNED("hash", __u64, struct mesh_pod_info, mesh_pods, 4096, MESH_PIN(mesh_pods));
BPF_TABLE_PINNED("lru_hash", __u64, struct mesh_dst, mesh_sk_dst, 65536, MESH_PIN(mesh_sk_dst));
BPF_TABLE_PINNED("lru_hash", struct mesh_orig_key, struct mesh_dst, mesh_orig_dst, 65536,
		 MESH_PIN(mesh_orig_dst));
BPF_TABLE_PINNED("lru_hash", struct mesh_pass_key, __u32, mesh_inb_pass, 65536,
		 MESH_PIN(mesh_inb_pass));
BPF_TABLE_PINNED("hash", __u32, struct mesh_veth_info, mesh_veth, 4096, MESH_PIN(mesh_veth));
BPF_TABLE_PINNED("percpu_array", __u32, __u64, mesh_counters, MESH_CNT_MAX, MESH_PIN(mesh_counters));
BPF_TABLE_PINNED("hash", struct mesh_pol_out_key, struct mesh_verdict, mesh_pol_out, 262144,
		 MESH_PIN(mesh_pol_out));
BPF_TABLE_PINNED("lpm_trie", struct mesh_pol_in_key, struct mesh_verdict, mesh_pol_in, 65536,
		 MESH_PIN(mesh_pol_in), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("percpu_hash", __u32, __u64, mesh_rule_cnt, 16384, MESH_PIN(mesh_rule_cnt));
BPF_TABLE_PINNED("lru_hash", __u64, __u32, mesh_sk_fast, 65536, MESH_PIN(mesh_sk_fast));
BPF_TABLE_PINNED("lru_hash", struct mesh_fast_key, struct mesh_fast_flow, mesh_fast, 65536,
		 MESH_PIN(mesh_fast));

/* bcc has no pinned sockhash macro; this is BPF_SOCKHASH's table layout with the pin
 * path in the section name, which bcc's loader understands for every map type. */
struct mesh_listen_table_t {
	struct mesh_listen_key key;
	int leaf;
	struct bpf_sock *(*lookup)(struct mesh_listen_key *);
	int (*update)(struct mesh_listen_key *, int *);
	int (*delete)(struct mesh_listen_key *);
	int (*sock_hash_update)(void *, void *, u64);
	int (*msg_redirect_hash)(void *, void *, u64);
	int (*sk_redirect_hash)(void *, void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/sockhash:" MESH_PIN(mesh_listen))))
struct mesh_listen_table_t mesh_listen = { .max_entries = 8192 };
BPF_ANNOTATE_KV_PAIR(mesh_listen, struct mesh_listen_key, int);

struct mesh_fast_sk_table_t {
	struct mesh_fast_key key;
	int leaf;
	struct bpf_sock *(*lookup)(struct mesh_fast_key *);
	int (*update)(struct mesh_fast_key *, int *);
	int (*delete)(struct mesh_fast_key *);
	int (*sock_hash_update)(void *, void *, u64);
	int (*msg_redirect_hash)(void *, void *, u64);
	int (*sk_redirect_hash)(void *, void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/sockhash:" MESH_PIN(mesh_fast_sk))))
struct mesh_fast_sk_table_t mesh_fast_sk = { .max_entries = 65536 };
BPF_ANNOTATE_KV_PAIR(mesh_fast_sk, struct mesh_fast_key, int);

/* bcc declares bpf_get_socket_cookie as returning u32; the helper returns a u64. */
#define mesh_socket_cookie(ctx) ((__u64 (*)(void *))BPF_FUNC_get_socket_cookie)(ctx)

static __always_inline void mesh_count_n(__u32 id, __u64 n)
{
	__u64 *v = mesh_counters.lookup(&id);
	if (v)
		*v += n;
}

static __always_inline void mesh_count(__u32 id)
{
	mesh_count_n(id, 1);
}

/* The approved fast-path flow of a client 4-tuple, or NULL. */
static __always_inline struct mesh_fast_flow *mesh_fast_flow_of(__u32 client_ip, __u32 server_ip,
								__u16 client_port, __u16 server_port)
{
	struct mesh_fast_key key = {};
	key.local_ip = client_ip;
	key.remote_ip = server_ip;
	key.local_port = client_port;
	key.remote_port = server_port;
	return mesh_fast.lookup(&key);
}

/* Count one decision of a compiled rule (per-rule hits; ids come from the compiler). */
static __always_inline void mesh_count_rule(__u32 rule)
{
	__u64 *v = mesh_rule_cnt.lookup(&rule);
	if (v) {
		*v += 1;
	} else {
		__u64 one = 1;
		mesh_rule_cnt.update(&rule, &one);
	}
}

#endif
