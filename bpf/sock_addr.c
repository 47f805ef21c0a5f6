/* cgroup/connect4 and cgroup/getpeername4: redirection of enrolled pods' connects.
 *
 * Attached to the cgroup-v2 root by each node agent; acts only on sockets whose netns
 * cookie is in this node's mesh_pods, so several node agents can share one kernel.
 *
 * Precedence in mesh_connect4 (first match wins):
 *   1. not TCP, or netns not enrolled on this node           -> untouched
 *   2. socket carries the ztunnel mark (mark & MASK == 0x539) -> untouched (ztunnel's own)
 *   3. destination is loopback or the pod's own IP            -> untouched
 *   4. a policy entry for (this pod, destination ip, port or any port) says DENY
 *                                 -> connect() fails with ECONNREFUSED, no packet is sent
 *   5. the entry says FAST (destination enrolled on this node, allowed for certain, both
 *      pods on the fast path)     -> destination unchanged; the socket cookie goes to
 *      mesh_sk_fast so sockops can approve the flow once its port is bound
 *   6. otherwise remember the dialled address by socket cookie and rewrite the
 *      destination to 127.0.0.1:15001 (the pod's ztunnel outbound listener); an ALLOW
 *      entry is only counted: the destination's ztunnel checks the peer certificate again
 */
#include "meshlane_abi.h"

#define MESH_LOOPBACK_NET 0x7f000000u   /* 127.0.0.0/8, host order */
#define MESH_ECONNREFUSED 111

/* bcc 0.26 does not declare bpf_set_retval (cgroup programs, kernel >= 5.18). */
#define mesh_set_retval(v) ((long (*)(int))BPF_FUNC_set_retval)(v)

/* The verdict of the source-side policy entries for a connect, or NULL (no policy). */
static __always_inline struct mesh_verdict *mesh_policy_out(__u32 pod_id, __u32 ip, __u16 port)
{
	struct mesh_pol_out_key key = {};
	key.src_pod = pod_id;
	key.dst_ip = ip;
	key.dst_port = port;
	struct mesh_verdict *v = mesh_pol_out.lookup(&key);
	if (v)
		return v;
	key.dst_port = 0;
	return mesh_pol_out.lookup(&key);
}

int mesh_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM)
		return 1;
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct mesh_pod_info *pod = mesh_pods.lookup(&netns);
	if (!pod || !(pod->flags & MESH_POD_F_ENROLLED))
		return 1;

	struct bpf_sock *sk = ctx->sk;
	if (sk && (sk->mark & MESH_MARK_MASK) == MESH_MARK_ZTUNNEL) {
		mesh_count(MESH_CNT_CONNECT_ZTUNNEL_SKIP);
		return 1;
	}
	__u32 dst = ctx->user_ip4;
	if ((bpf_ntohl(dst) & 0xff000000u) == MESH_LOOPBACK_NET || dst == pod->ip) {
		mesh_count(MESH_CNT_CONNECT_LOCAL_SKIP);
		return 1;
	}

	struct mesh_verdict *verdict = mesh_policy_out(pod->pod_id, dst, bpf_ntohs((__u16)ctx->user_port));
	if (verdict) {
		mesh_count_rule(verdict->rule);
		if (verdict->action == MESH_VERDICT_DENY) {
			mesh_count(MESH_CNT_POLICY_OUT_DENY);
			mesh_set_retval(-MESH_ECONNREFUSED);
			return 0;
		}
		if (verdict->action == MESH_VERDICT_FAST) {
			__u64 fcookie = mesh_socket_cookie(ctx);
			__u32 rule = verdict->rule;
			mesh_sk_fast.update(&fcookie, &rule);
			mesh_count(MESH_CNT_CONNECT_FAST);
			return 1;
		}
		mesh_count(MESH_CNT_POLICY_OUT_ALLOW);
	}

	__u64 cookie = mesh_socket_cookie(ctx);
	struct mesh_dst orig = {};
	orig.ip = dst;
	orig.port = (__u16)ctx->user_port;
	mesh_sk_dst.update(&cookie, &orig);

	ctx->user_ip4 = bpf_htonl(0x7f000001u);
	ctx->user_port = bpf_htons(MESH_PORT_OUTBOUND);
	mesh_count(MESH_CNT_CONNECT_REDIRECTED);
	return 1;
}

/* The app asked who it is connected to: show the address it dialled, not 15001. */
int mesh_getpeer4(struct bpf_sock_addr *ctx)
{
	if (ctx->user_ip4 != bpf_htonl(0x7f000001u) ||
	    ctx->user_port != bpf_htons(MESH_PORT_OUTBOUND))
		return 1;
	__u64 cookie = mesh_socket_cookie(ctx);
	struct mesh_dst *orig = mesh_sk_dst.lookup(&cookie);
	if (!orig)
		return 1;
	ctx->user_ip4 = orig->ip;
	ctx->user_port = orig->port;
	mesh_count(MESH_CNT_GETPEER_RESTORED);
	return 1;
}
