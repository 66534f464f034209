# Shared set-up for test.sh, demo.sh and bench.sh. Source it; every step is idempotent.

# Debian packages the tests and benchmarks use. QEMU 10 comes from bookworm-backports
# (qemu-storage-daemon is in qemu-system-common).
setup_packages() {
    # The Linux guests (tests/linux-guest, tests/nested) download Debian's kernel packages:
    # apt must know them even when every tool below is installed already.
    if ! apt-cache show linux-image-amd64 linux-image-cloud-amd64 >/dev/null 2>&1; then
        echo "== apt-get update (the package lists do not know Debian's kernel packages)"
        apt-get update -qq
    fi
    local need=()
    command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
    command -v qemu-storage-daemon >/dev/null || need+=(qemu-system-common)
    command -v iasl >/dev/null || need+=(acpica-tools)
    [[ -x /bin/busybox ]] || need+=(busybox-static)
    command -v cpio >/dev/null || need+=(cpio)
    command -v ip >/dev/null || need+=(iproute2)
    command -v curl >/dev/null || need+=(curl)
    command -v gzip >/dev/null || need+=(gzip)
    command -v xz >/dev/null || need+=(xz-utils)      # the nested rig (tests/nested/build.sh)
    command -v objcopy >/dev/null || need+=(binutils) # the rig: modules' .modinfo, strip
    command -v mmdebstrap >/dev/null || need+=(mmdebstrap) # the rig's Debian root file system
    command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)  # (tests/nested/build-rootfs.sh)
    # tests/slowfs.py, the slow disk of the GET_VRING_BASE_INFLIGHT tests (blk_suspend.rs)
    /usr/bin/python3 -c 'import fusepy' 2>/dev/null || need+=(python3-fusepy)
    command -v fusermount >/dev/null || need+=(fuse3)
    ((${#need[@]})) || return 0
    echo "== installing Debian packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if . /etc/os-release && [[ ${VERSION_CODENAME:-} == bookworm ]] &&
        ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo 'deb http://deb.debian.org/debian bookworm-backports main' >/etc/apt/sources.list.d/bookworm-backports.list
    fi
    apt-get update -qq
    local bp=()
    grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/ && bp=(-t bookworm-backports)
    apt-get install -y -qq "${bp[@]}" qemu-system-x86 qemu-system-common qemu-utils >/dev/null
    apt-get install -y -qq acpica-tools busybox-static cpio iproute2 curl gzip xz-utils binutils \
        mmdebstrap e2fsprogs python3-fusepy fuse3 >/dev/null
}

# What only the benchmarks need: DPDK's testpmd, the net benchmark's peer (in dpdk-dev).
setup_bench_packages() {
    command -v dpdk-testpmd >/dev/null && command -v fio >/dev/null && return 0
    echo "== installing Debian packages: dpdk-dev fio"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dpdk-dev fio >/dev/null
}

setup_rust() {
    rustup target list --installed | grep -qx x86_64-unknown-none ||
        rustup target add x86_64-unknown-none
}

# The freestanding test guest; tests find it at this path (or at $BATON_TEST_GUEST).
GUEST=tests/guest/target/x86_64-unknown-none/release/baton-test-guest
build_guest() {
    (cd tests/guest && cargo build --release --quiet)
}
