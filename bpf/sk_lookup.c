/* sk_lookup, attached to each enrolled pod's netns: steer inbound SYNs to the ztunnel.
 *
 * Precedence (first match wins):
 *   1. not TCP                                         -> normal lookup
 *   2. destination in 127.0.0.0/8 (the pod's own loopback: 15001, local apps) -> normal lookup
 *   3. the ztunnel's own connection to the app (listed in mesh_inb_pass), or a same-node
 *      fast-path flow approved at the client's connect() (in mesh_fast) -> normal lookup
 *   4. destination port 15008  -> the pod's HBONE listener (if the ztunnel has one);
 *                                  authorization needs the peer certificate: the ztunnel's
 *   5. any other port: plaintext.  A policy entry for (pod ip, port or any port, source
 *      prefix) saying DENY refuses it (the client gets an RST at once); otherwise
 *                              -> the pod's plaintext listener 15006; if the ztunnel has
 *                                  no listener registered, refuse (fail closed: no
 *                                  plaintext reaches an enrolled app behind the mesh's back)
 */
#include "meshlane_abi.h"

int mesh_sk_lookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP || ctx->family != 2 /* AF_INET */)
		return SK_PASS;
	if ((bpf_ntohl(ctx->local_ip4) & 0xff000000u) == 0x7f000000u)
		return SK_PASS;
	struct mesh_pass_key pass = {};
	pass.remote_ip = ctx->remote_ip4;
	pass.local_ip = ctx->local_ip4;
	pass.remote_port = (__u16)ctx->remote_port;
	if (mesh_inb_pass.lookup(&pass))
		return SK_PASS;
	if (mesh_fast_flow_of(ctx->remote_ip4, ctx->local_ip4, bpf_ntohs((__u16)ctx->remote_port),
			      (__u16)ctx->local_port)) {
		mesh_count(MESH_CNT_FAST_SYN_PASSED);
		return SK_PASS;
	}

	struct mesh_listen_key key = {};
	key.ip = ctx->local_ip4;
	key.kind = ctx->local_port == MESH_PORT_HBONE ? MESH_LISTENER_HBONE : MESH_LISTENER_PLAIN;
	if (key.kind == MESH_LISTENER_PLAIN) {
		struct mesh_pol_in_key pk = {};
		pk.prefixlen = 96;
		pk.dst_ip = ctx->local_ip4;
		pk.dst_port = bpf_htonl(ctx->local_port);
		pk.src_ip = ctx->remote_ip4;
		struct mesh_verdict *v = mesh_pol_in.lookup(&pk);
		if (!v) {
			pk.dst_port = 0;
			v = mesh_pol_in.lookup(&pk);
		}
		if (v) {
			mesh_count_rule(v->rule);
			if (v->action == MESH_VERDICT_DENY) {
				mesh_count(MESH_CNT_POLICY_IN_DENY);
				return SK_DROP;
			}
			mesh_count(MESH_CNT_POLICY_IN_ALLOW);
		}
	}
	struct bpf_sock *sk = mesh_listen.lookup(&key);
	if (!sk) {
		if (key.kind == MESH_LISTENER_HBONE)
			return SK_PASS;
		mesh_count(MESH_CNT_LOOKUP_NO_LISTENER);
		return SK_DROP;
	}
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return SK_PASS;
	mesh_count(key.kind == MESH_LISTENER_HBONE ? MESH_CNT_LOOKUP_HBONE : MESH_CNT_LOOKUP_PLAIN);
	return SK_PASS;
}
