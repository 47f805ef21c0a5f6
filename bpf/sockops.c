/* sockops: publish the original destination for the ztunnel before the SYN leaves.
 *
 * connect4 keyed the dialled address by socket cookie; the ztunnel only sees the
 * accepted side of 127.0.0.1:15001, whose peer port is the client's ephemeral port.  At
 * TCP_CONNECT_CB that port is bound, so the entry is re-keyed by (netns cookie, port),
 * which the ztunnel can compute from the pod's netns and its accepted socket.
 */
#include "meshlane_abi.h"

int mesh_sockops(struct bpf_sock_ops *skops)
{
	if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB || skops->family != 2 /* AF_INET */)
		return 1;
	__u64 cookie = mesh_socket_cookie(skops);
	struct mesh_dst *orig = mesh_sk_dst.lookup(&cookie);
	if (!orig)
		return 1;
	struct mesh_orig_key key = {};
	key.netns = bpf_get_netns_cookie(skops);
	key.port = (__u16)skops->local_port;   /* host order in sockops */
	struct mesh_dst val = *orig;
	mesh_orig_dst.update(&key, &val);
	mesh_count(MESH_CNT_ORIG_DST_PUBLISHED);
	return 1;
}
