#!/usr/bin/env bash
# Idempotent set-up of a Debian 12 machine for bpfproxy: apt packages, kernel headers
# that BCC can compile against, and the virtualenv at .venv. Run as root (make install).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="$repo/.venv"
stamp="$venv/.bpfproxy-installed"

apt_packages=(
    python3-bpfcc libbpfcc libbpf1   # BCC from the distribution (not the unrelated PyPI "bcc")
    linux-headers-amd64              # headers BCC compiles against (see ensure_kernel_headers)
    python3-venv python3-dev gcc make
    iproute2 iptables nftables util-linux procps
    bpftool                          # tests check with it that cleanup leaves nothing
)

log() { printf 'install: %s\n' "$*" >&2; }

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        log "must run as root (BPF, network namespaces and apt need it)"; exit 1
    fi
}

ensure_apt_packages() {
    local missing=()
    for p in "${apt_packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# BCC looks for headers under /lib/modules/$(uname -r)/{build,source}. When the running
# kernel has no headers package (as on machines with a custom 6.x kernel) point those at
# the newest Debian linux-headers tree: "build" at the -amd64 tree (generated headers,
# .config) and "source" at the -common tree. BCC_KERNEL_SOURCE alone is not enough
# because it disables BCC's split build/source lookup. The programs use only UAPI types,
# so an older header version compiles correct code for the running kernel.
ensure_kernel_headers() {
    local kdir="/lib/modules/$(uname -r)"
    if [ -f "$kdir/build/include/linux/kconfig.h" ] || [ -f "$kdir/source/include/linux/kconfig.h" ] \
        || [ -e /sys/kernel/kheaders.tar.xz ]; then
        return 0
    fi
    local build common
    # The running kernel's own package if it exists, else the newest plain -amd64 flavour
    # (not -cloud-amd64 or -rt-amd64, whose -common tree has another name).
    build="/usr/src/linux-headers-$(uname -r)"
    [ -d "$build" ] || build="$(ls -d /usr/src/linux-headers-*[0-9]-amd64 2>/dev/null \
        | sort -V | tail -n1)"
    if [ -z "$build" ]; then
        log "no /usr/src/linux-headers-*-amd64 tree found"; exit 1
    fi
    common="${build%-amd64}-common"
    if [ ! -f "$common/include/linux/kconfig.h" ]; then
        log "$common has no include/linux/kconfig.h"; exit 1
    fi
    log "kernel $(uname -r) has no headers: linking $kdir to $(basename "$build")"
    mkdir -p "$kdir"
    ln -sfn "$build" "$kdir/build"
    ln -sfn "$common" "$kdir/source"
}

ensure_venv() {
    # The system Python, not whatever python3 is first on PATH: python3-bpfcc is
    # installed for it, and the venv sees it through --system-site-packages.
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import bcc' 2>/dev/null; then
        log "virtualenv at $venv"
        rm -rf "$venv"
        /usr/bin/python3 -m venv --system-site-packages "$venv"
    fi
    if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
        log "pip install -e .[dev]"
        "$venv/bin/pip" install -q --upgrade pip
        "$venv/bin/pip" install -q -e "$repo[dev]"
    fi
}

ensure_bpffs() {
    grep -q ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf
}

need_root
ensure_apt_packages
ensure_kernel_headers
ensure_venv
ensure_bpffs
"$venv/bin/python" -m agent.api.codegen
touch "$stamp"   # make's record that this script ran to the end
