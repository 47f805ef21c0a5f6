/* The program set one node agent compiles: one translation unit, so all programs
 * share the maps declared in include/meshlane_abi.h. */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include <net/sock.h>
#include "sock_addr.c"
#include "sockops.c"
#include "sk_msg.c"
#include "sk_lookup.c"
#include "tc.c"
