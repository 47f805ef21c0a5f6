/* sk_msg on mesh_fast_sk: splice same-node fast-path sockets.
 *
 * Every send of a socket in the sockhash comes here first.  For an approved flow the
 * payload is put straight on the peer socket's receive queue (BPF_F_INGRESS): no TCP
 * segments, no veth, no bridge.  Ordering rule: a direction may go from redirect to TCP
 * (the receiver reads its redirected queue before its TCP queue) but never from TCP to
 * redirect (redirected bytes could overtake bytes still in flight).  So each direction
 * decides at its first send: peer socket in the sockhash -> spliced for good, otherwise
 * TCP for good.  No flow (unspliced by the node agent, or closed) -> TCP.
 * A failed redirect must not return SK_DROP (that would drop the app's data): every path
 * returns SK_PASS, which with a redirect target set means "redirect".
 */
#include "meshlane_abi.h"

int mesh_fast_msg(struct sk_msg_md *msg)
{
	struct mesh_fast_key peer = {};
	peer.local_ip = msg->remote_ip4;
	peer.remote_ip = msg->local_ip4;
	peer.local_port = (__u16)bpf_ntohl(msg->remote_port);   /* be16 in the upper half */
	peer.remote_port = (__u16)msg->local_port;
	int dir = 0;   /* client -> server */
	struct mesh_fast_flow *flow = mesh_fast_flow_of(peer.remote_ip, peer.local_ip,
							peer.remote_port, peer.local_port);
	if (!flow) {
		dir = 1;   /* we are the server end: the flow is keyed by the peer's 4-tuple */
		flow = mesh_fast.lookup(&peer);
	}
	if (!flow)
		return SK_PASS;
	__u8 state = dir ? flow->dir[1] : flow->dir[0];
	if (state == MESH_FAST_DIR_TCP)
		return SK_PASS;
	long verdict = mesh_fast_sk.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
	if (verdict != SK_PASS) {
		if (state == MESH_FAST_DIR_UNDECIDED) {
			if (dir)
				flow->dir[1] = MESH_FAST_DIR_TCP;
			else
				flow->dir[0] = MESH_FAST_DIR_TCP;
			mesh_count(MESH_CNT_FAST_TCP_FALLBACK);
		}
		return SK_PASS;
	}
	if (dir) {
		flow->dir[1] = MESH_FAST_DIR_SPLICED;
		flow->bytes[1] += msg->size;
	} else {
		flow->dir[0] = MESH_FAST_DIR_SPLICED;
		flow->bytes[0] += msg->size;
	}
	mesh_count(MESH_CNT_FAST_MSG_REDIRECTED);
	mesh_count_n(MESH_CNT_FAST_BYTES_REDIRECTED, msg->size);
	return SK_PASS;
}
