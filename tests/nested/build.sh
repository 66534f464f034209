#!/usr/bin/env bash
# tests/nested/build.sh [OUTDIR]: builds the nested KVM rig's kernel and initramfs images
# (see tests/nested/README.md).
#
# OUTDIR defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/baton/nested/. Produces there:
# - vmlinuz           Debian's generic kernel (the package linux-image-amd64 depends on), as
#                     shipped (bzImage); boots L1 under QEMU, and L2 once baton-vmm boots bzImages;
# - vmlinux           the same kernel's ELF, extracted from the bzImage (xz payload): PVH-bootable,
#                     what baton-vmm boots today;
# - l1-initramfs.gz   L1: busybox-static, the modules L1 needs (kvm, kvm-amd, tun, virtio, ext4,
#                     vfio...) in dependency order, and an /init that runs /rig/scenario.sh;
# - l2-initramfs.gz   L2: busybox-static, virtio and ext4 modules, and an /init with the contract
#                     of tests/linux-guest/build.sh (below);
# - kernel-release    the kernel's release (`6.1.0-NN-amd64`).
# Idempotent and cached: does nothing when the outputs exist for this very build.sh and the
# same kernel package (a stamp file records both). The .deb stays cached in OUTDIR/deb/.
#
# L1 contract (run.sh appends a cpio with /rig/scenario.sh, /rig/lib.sh, /rig/bin/*, ...):
# - /init loads the modules, mounts proc, sysfs, devtmpfs on /dev, tmpfs on /dev/shm and /tmp;
# - runs `sh /rig/scenario.sh ARGS` in /rig, ARGS from /rig/args (one per line), with PATH
#   including /rig/bin; the scenario's output goes to the console (ttyS0);
# - prints "BATON-RIG-EXIT <status>" and powers off (`poweroff -f`).
# L2 contract (as tests/linux-guest): /init loads the virtio modules, mounts proc, sysfs,
# devtmpfs on /dev, tmpfs on /tmp; runs /baton/script.sh (lib.sh's l2_boot puts it in a cpio of its
# own in front of the initramfs) or else the shell script passed base64-encoded on the kernel
# command line as `baton.script=BASE64`; if the script exits 0 having written a mount point to
# /tmp/switch-root, moves /dev, /proc, /sys there and `switch_root`s to its /sbin/init (the
# system there prints the lines below: build-rootfs.sh); otherwise prints its kernel's messages of level 0-4 (warning
# and worse; `dmesg -r`) as "dmesg: ...", then "BATON-GUEST-EXIT <status>"; `poweroff -f`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/baton/nested}
mkdir -p "$out"
out=$(cd "$out" && pwd)
exec 9>"$out/.lock"
flock 9

die() { echo "build.sh: $*" >&2; exit 1; }
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
    sed -n 's/.*Depends: \(linux-image-[0-9][^ ]*\)/\1/p' | head -1)
if [[ -z $pkg ]]; then
    # Offline and apt does not know the package: use the cached one if there is exactly one.
    pkg=$(cd "$out/deb" 2>/dev/null && ls linux-image-*.deb 2>/dev/null | sed 's/_.*//' | sort -u)
    [[ $(wc -w <<<"$pkg") == 1 ]] || die "apt-cache does not know linux-image-amd64 (apt-get update?)"
fi
stamp="$pkg $(sha256sum "$0" | cut -d' ' -f1)"
if [[ -s $out/vmlinuz && -s $out/vmlinux && -s $out/l1-initramfs.gz && -s $out/l2-initramfs.gz &&
    $(cat "$out/stamp" 2>/dev/null) == "$stamp" ]]; then
    exit 0
fi
busybox=$(command -v busybox || true)
[[ -x /bin/busybox ]] && busybox=/bin/busybox
[[ -n $busybox ]] || die "busybox-static is not installed"
for p in cpio xz objcopy gzip; do
    command -v $p >/dev/null || die "$p is not installed (scripts/setup.sh installs it)"
done

mkdir -p "$out/deb"
deb=$(ls "$out/deb/${pkg}"_*.deb 2>/dev/null | tail -1 || true)
if [[ -z $deb ]]; then
    (cd "$out/deb" && apt-get download "$pkg" >/dev/null 2>&1) || die "apt-get download $pkg failed"
    deb=$(ls "$out/deb/${pkg}"_*.deb | tail -1)
fi
work=$(mktemp -d "$out/work.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"
dpkg-deb -x "$deb" root
release=$(ls root/lib/modules)
moddir=root/lib/modules/$release

# Module name (dashes as underscores) -> file, for every module of the package.
declare -A file
while read -r f; do
    n=$(basename "$f"); n=${n%%.ko*}; file[${n//-/_}]=$f
done < <(find "$moddir" -name '*.ko*')

modinfo_depends() { # the depends= field of a module's .modinfo section
    local f=${file[$1]} tmp=$work/mod.ko
    case $f in
        *.ko.xz) xz -dc "$f" >"$tmp" ;;
        *.ko.zst) zstd -qdc "$f" >"$tmp" ;;
        *) cp "$f" "$tmp" ;;
    esac
    objcopy -O binary --only-section=.modinfo "$tmp" "$tmp.info"
    tr '\0' '\n' <"$tmp.info" | sed -n 's/^depends=//p' | tr ',' ' ' | tr '-' '_'
}

# Dependencies first (depth-first), each module once: the order /init loads them in.
order=()
declare -A seen
add_module() {
    local m=${1//-/_} d
    [[ -n ${seen[$m]:-} ]] && return 0
    seen[$m]=1
    [[ -n ${file[$m]:-} ]] || die "module $m not found in $pkg"
    for d in $(modinfo_depends "$m"); do add_module "$d"; done
    order+=("$m")
}

# Writes initramfs DIR with busybox and the modules of "$@" (plus their dependencies); sets
# $modules to the load order.
make_tree() {
    local dir=$1 m; shift
    order=(); seen=()
    for m in "$@"; do add_module "$m"; done
    mkdir -p "$dir"/{bin,dev,proc,sys,tmp,lib/modules}
    cp "$busybox" "$dir/bin/busybox"
    for m in "${order[@]}"; do
        case ${file[$m]} in
            *.ko.xz) xz -dc "${file[$m]}" >"$dir/lib/modules/$m.ko" ;;
            *.ko.zst) zstd -qdc "${file[$m]}" >"$dir/lib/modules/$m.ko" ;;
            *) cp "${file[$m]}" "$dir/lib/modules/$m.ko" ;;
        esac
    done
    modules="${order[*]}"
}

# The start of both /init scripts: busybox, file systems, modules (in dependency order; one
# that fails to load is reported, not fatal: e.g. ccp with no device still loads, kvm-intel
# would not).
init_head() {
    cat <<EOS
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null || mount -t tmpfs dev /dev
mkdir -p /dev/shm
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
for m in $1; do
    insmod /lib/modules/\$m.ko || echo "init: insmod \$m failed"
done
mdev -s
EOS
}

# L1: KVM (AMD: kvm-amd needs kvm and ccp; kvm needs irqbypass), TAP, the virtio disks and NICs
# L0 may give, ext4 for them, and VFIO for the passthrough tests.
l1_mods="kvm_amd tun virtio_pci virtio_blk virtio_net ext4 crc32c_generic
    vfio vfio_iommu_type1 vfio_virqfd vfio_pci_core vfio_pci"
make_tree l1 $l1_mods
{
    init_head "$modules"
    cat <<'EOS'
[ -e /dev/kvm ] || echo "init: no /dev/kvm (is L0's CPU -cpu max?)"
cd /rig
export PATH=/rig/bin:/bin
set --
if [ -f /rig/args ]; then
    while IFS= read -r a; do set -- "$@" "$a"; done </rig/args
fi
echo "init: scenario $(cat /rig/name 2>/dev/null) $*"
sh /rig/scenario.sh "$@"
status=$?
echo "init: L1 kernel warnings and errors:"
dmesg -r | sed -n 's/^<[0-4]>/  l1-dmesg| /p'
echo "BATON-RIG-EXIT $status"
sync
poweroff -f
EOS
} >l1/init

# L2: virtio (disk and NIC from baton's back-ends), ext4 for a root file system on the disk.
# nvme (and nvme_core) for a device passed through with VFIO (scenarios/vfio-nvme.sh).
l2_mods="virtio_pci virtio_blk virtio_net ext4 crc32c_generic nvme"
make_tree l2 $l2_mods
{
    init_head "$modules"
    cat <<'EOS'
if [ -f /baton/script.sh ]; then
    cp /baton/script.sh /tmp/script.sh
else
    s=$(sed -n 's/.*baton\.script=\([^ ]*\).*/\1/p' /proc/cmdline)
    echo "$s" | base64 -d >/tmp/script.sh
fi
sh /tmp/script.sh
status=$?
# A script that mounted a root file system and wrote its mount point to /tmp/switch-root
# hands L2 over to that system's /sbin/init (which then owns the contract's last lines).
if [ $status = 0 ] && [ -s /tmp/switch-root ]; then
    r=$(cat /tmp/switch-root)
    umount /tmp
    for d in dev proc sys; do mount --move /$d $r/$d; done
    exec switch_root $r /sbin/init
fi
dmesg -r | sed -n 's/^<[0-4]>/dmesg: /p'
echo "BATON-GUEST-EXIT $status"
sync
poweroff -f
EOS
} >l2/init
chmod +x l1/init l2/init
(cd l1 && find . | cpio -o -H newc 2>/dev/null | gzip -6) >"$out/l1-initramfs.gz.tmp"
(cd l2 && find . | cpio -o -H newc 2>/dev/null | gzip -6) >"$out/l2-initramfs.gz.tmp"

# The PVH ELF: the bzImage's payload is the xz-compressed vmlinux (CONFIG_KERNEL_XZ=y).
bz=root/boot/vmlinuz-$release
off=$(LC_ALL=C grep -obUaP '\xFD\x37\x7A\x58\x5A\x00' "$bz" | head -1 | cut -d: -f1)
[[ -n $off ]] || die "no xz payload in $bz"
tail -c +$((off + 1)) "$bz" | xz -dc --single-stream >"$out/vmlinux.tmp" 2>/dev/null || true
[[ $(head -c 4 "$out/vmlinux.tmp" | od -An -tx1 | tr -d ' ') == 7f454c46 ]] ||
    die "the xz payload of $bz is not an ELF"
cp "$bz" "$out/vmlinuz.tmp"
for f in vmlinuz vmlinux l1-initramfs.gz l2-initramfs.gz; do mv "$out/$f.tmp" "$out/$f"; done
echo "$release" >"$out/kernel-release"
echo "$stamp" >"$out/stamp"
echo "build.sh: rig in $out (kernel $pkg; L1 modules: $(ls l1/lib/modules | wc -l))" >&2
