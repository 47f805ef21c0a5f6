/* sockops (cgroup-v2 root, every TCP socket of the machine): two jobs.
 *
 * 1. Original destination for the ztunnel.  connect4 keyed the dialled address by socket
 *    cookie; the ztunnel only sees the accepted side of 127.0.0.1:15001, whose peer port
 *    is the client's ephemeral port.  At TCP_CONNECT_CB that port is bound, so the entry
 *    is re-keyed by (netns cookie, port), which the ztunnel computes from the pod's netns
 *    and its accepted socket.
 * 2. Same-node fast path.  connect4 left a FAST connect direct and noted its cookie in
 *    mesh_sk_fast; at TCP_CONNECT_CB (port bound, SYN not yet sent) the flow is approved
 *    in mesh_fast under the client's 4-tuple.  ACTIVE_ESTABLISHED (client) and
 *    PASSIVE_ESTABLISHED (the server's new socket) put each end of an approved flow into
 *    mesh_fast_sk, where sk_msg splices them.  STATE_CB drops the flow when either end
 *    closes (the kernel takes closed sockets out of the sockhash itself).
 */
#include "meshlane_abi.h"

#define MESH_TCP_CLOSE 7   /* BPF_TCP_CLOSE */

/* The socket's own 4-tuple, as mesh_fast and mesh_fast_sk key it. */
static __always_inline struct mesh_fast_key mesh_sockops_key(struct bpf_sock_ops *skops)
{
	struct mesh_fast_key key = {};
	key.local_ip = skops->local_ip4;
	key.remote_ip = skops->remote_ip4;
	key.local_port = (__u16)skops->local_port;                 /* host order */
	key.remote_port = (__u16)bpf_ntohl(skops->remote_port);   /* be16 in the upper half */
	return key;
}

static __always_inline void mesh_sockops_connect(struct bpf_sock_ops *skops)
{
	__u64 cookie = mesh_socket_cookie(skops);
	struct mesh_dst *orig = mesh_sk_dst.lookup(&cookie);
	if (orig) {
		struct mesh_orig_key key = {};
		key.netns = bpf_get_netns_cookie(skops);
		key.port = (__u16)skops->local_port;   /* host order in sockops */
		struct mesh_dst val = *orig;
		mesh_orig_dst.update(&key, &val);
		mesh_count(MESH_CNT_ORIG_DST_PUBLISHED);
		return;
	}
	__u32 *rule = mesh_sk_fast.lookup(&cookie);
	if (!rule)
		return;
	struct mesh_fast_key key = mesh_sockops_key(skops);
	struct mesh_fast_flow flow = {};
	flow.rule = *rule;
	__u64 netns = bpf_get_netns_cookie(skops);
	struct mesh_pod_info *pod = mesh_pods.lookup(&netns);
	if (pod)
		flow.src_pod = pod->pod_id;
	mesh_fast.update(&key, &flow);
	mesh_sk_fast.delete(&cookie);
	/* the flow entry must go when this socket closes, even if it never connects */
	bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void mesh_sockops_established(struct bpf_sock_ops *skops, int client)
{
	struct mesh_fast_key own = mesh_sockops_key(skops);
	struct mesh_fast_flow *flow = client
		? mesh_fast_flow_of(own.local_ip, own.remote_ip, own.local_port, own.remote_port)
		: mesh_fast_flow_of(own.remote_ip, own.local_ip, own.remote_port, own.local_port);
	if (!flow)
		return;
	if (!client)
		bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
	/* bcc rewrites map calls only as whole statements */
	long err = mesh_fast_sk.sock_hash_update(skops, &own, BPF_NOEXIST);
	if (err)
		return;
	if (client)
		flow->client_in = 1;
	else
		flow->server_in = 1;
	mesh_count(MESH_CNT_FAST_SPLICED);
}

static __always_inline void mesh_sockops_closed(struct bpf_sock_ops *skops)
{
	struct mesh_fast_key key = mesh_sockops_key(skops);
	if (mesh_fast.delete(&key) == 0)
		return;
	/* the server end: its flow is keyed by the client's 4-tuple */
	struct mesh_fast_key rev = {};
	rev.local_ip = key.remote_ip;
	rev.remote_ip = key.local_ip;
	rev.local_port = key.remote_port;
	rev.remote_port = key.local_port;
	mesh_fast.delete(&rev);
}

/* IPv4, or IPv4 on a dual-stack socket (::ffff:a.b.c.d; servers often listen on ::):
 * the *_ip4 fields hold the addresses either way. */
static __always_inline int mesh_sockops_v4(struct bpf_sock_ops *skops)
{
	if (skops->family == 2 /* AF_INET */)
		return 1;
	return skops->family == 10 /* AF_INET6 */ && skops->remote_ip6[0] == 0 &&
	       skops->remote_ip6[1] == 0 && skops->remote_ip6[2] == bpf_htonl(0xffff);
}

int mesh_sockops(struct bpf_sock_ops *skops)
{
	if (!mesh_sockops_v4(skops))
		return 1;
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		if (skops->family == 2)   /* connect4 only sees AF_INET connects */
			mesh_sockops_connect(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		mesh_sockops_established(skops, 1);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		mesh_sockops_established(skops, 0);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == MESH_TCP_CLOSE)
			mesh_sockops_closed(skops);
		break;
	}
	return 1;
}
