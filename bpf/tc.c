/* TC (tcx) programs on the two ends of a pod's veth.
 *
 * mesh_pod_egress, on the pod's own eth0 (egress): fail closed.  A TCP SYN (without ACK)
 * leaving an enrolled pod must come from a ztunnel socket (mark & MASK == 0x539) or be a
 * same-node fast-path flow that connect4 and sockops approved (in mesh_fast); anything
 * else slipped past connect4 (raw sockets, a ztunnel outage) and is dropped.
 *
 * mesh_veth_ingress, on the node-side veth (ingress = packets coming out of the pod):
 * anti-spoofing.  An IPv4 packet whose source is not the pod's own address is dropped.
 */
#include "meshlane_abi.h"
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/pkt_cls.h>

/* The IPv4 header of an Ethernet frame, or NULL (not IPv4, or truncated). */
static __always_inline struct iphdr *mesh_ipv4(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return NULL;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return NULL;
	return ip;
}

int mesh_pod_egress(struct __sk_buff *skb)
{
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = mesh_ipv4(skb);
	if (!ip || ip->protocol != IPPROTO_TCP)
		return TC_ACT_OK;
	struct tcphdr *tcp = (void *)ip + ip->ihl * 4;
	if ((void *)(tcp + 1) > data_end)
		return TC_ACT_OK;
	if (!tcp->syn || tcp->ack)
		return TC_ACT_OK;
	if ((skb->mark & MESH_MARK_MASK) == MESH_MARK_ZTUNNEL)
		return TC_ACT_OK;
	if (mesh_fast_flow_of(ip->saddr, ip->daddr, bpf_ntohs(tcp->source), bpf_ntohs(tcp->dest)))
		return TC_ACT_OK;
	mesh_count(MESH_CNT_EGRESS_SYN_DROPPED);
	return TC_ACT_SHOT;
}

int mesh_veth_ingress(struct __sk_buff *skb)
{
	struct iphdr *ip = mesh_ipv4(skb);
	if (!ip)
		return TC_ACT_OK;
	__u32 ifindex = skb->ingress_ifindex;
	struct mesh_veth_info *veth = mesh_veth.lookup(&ifindex);
	if (!veth || ip->saddr == veth->pod_ip)
		return TC_ACT_OK;
	mesh_count(MESH_CNT_SPOOF_DROPPED);
	return TC_ACT_SHOT;
}
