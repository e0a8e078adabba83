#!/bin/sh
# Gives BCC kernel headers at /lib/modules/$(uname -r)/build, then runs bpfproxy with the
# container's arguments. The host's headers win (the DaemonSet mounts its /lib/modules at
# /host/lib/modules and its /usr/src at /usr/src, where the host's links point); a host
# without them (a kind node, a minimal OS) gets the image's Debian headers.
set -eu
release="$(uname -r)"
kdir="/lib/modules/$release"
host="/host/lib/modules/$release"
has_headers() { [ -f "$1/build/include/linux/kconfig.h" ] || [ -f "$1/source/include/linux/kconfig.h" ]; }
if ! has_headers "$kdir"; then
    mkdir -p "$kdir"
    if has_headers "$host"; then
        for tree in build source; do
            [ -e "$host/$tree" ] && ln -sfn "$host/$tree" "$kdir/$tree"
        done
        echo "bpfproxy-entrypoint: kernel headers of the host ($release)" >&2
    else
        ln -sfn /opt/bpfproxy/kernel-headers "$kdir/build"
        echo "bpfproxy-entrypoint: no host headers for $release; using the image's" >&2
    fi
fi
exec bpfproxy "$@"
