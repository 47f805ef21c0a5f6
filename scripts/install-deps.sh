#!/bin/sh
# Install what meshlane needs on Debian bookworm, idempotently:
#   Debian packages (bcc, kernel headers, iproute2, capture and load tools),
#   the kernel-headers link bcc compiles against, bpffs, and the venv in .venv
#   (on /usr/bin/python3, because Debian's bcc is built for it).
set -eu
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "install-deps: needs root (apt-get, /lib/modules, bpffs)" >&2
    exit 77
fi

PKGS="python3-bpfcc python3-venv linux-headers-amd64 libbpf1 iproute2 tcpdump iperf3 curl sockperf gcc libc6-dev"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "install-deps: installing Debian packages:$missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    if [ ! -f /var/lib/apt/periodic/meshlane-updated ]; then
        apt-get update -q
        mkdir -p /var/lib/apt/periodic && touch /var/lib/apt/periodic/meshlane-updated
    fi
    apt-get install -y -q --no-install-recommends $missing >&2
fi

# bcc needs headers at /lib/modules/$(uname -r)/build; this kernel ships none, and
# Debian's 6.1 headers work for network programs (stable UAPI only).
KREL="$(uname -r)"
if [ ! -e "/lib/modules/$KREL/build/include" ]; then
    arch_dir="$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -1)"
    common_dir="$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -1)"
    mkdir -p "/lib/modules/$KREL"
    ln -sfn "$arch_dir" "/lib/modules/$KREL/build"
    ln -sfn "$common_dir" "/lib/modules/$KREL/source"
    echo "install-deps: linked $arch_dir as kernel headers for $KREL" >&2
fi

if ! awk '$2 == "/sys/fs/bpf" && $3 == "bpf" {found=1} END {exit !found}' /proc/mounts; then
    mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf
fi

if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv .venv
fi
site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
[ -e "$site/bcc" ] || ln -s /usr/lib/python3/dist-packages/bcc "$site/bcc"
stamp=.venv/.meshlane-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test,envoy]' >&2
    touch "$stamp"
fi
.venv/bin/python -c "import bcc, h2, pyroute2, cryptography, click" \
    || { echo "install-deps: the venv is incomplete" >&2; exit 70; }
