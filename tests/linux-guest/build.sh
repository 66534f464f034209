#!/usr/bin/env bash
# tests/linux-guest/build.sh OUTDIR: builds a tiny Linux guest for back-end tests under QEMU.
#
# Produces OUTDIR/vmlinuz (Debian's cloud kernel) and OUTDIR/initramfs.gz (busybox-static).
# Idempotent and cached: does nothing when both files exist.
#
# Guest contract (used by the blk and net tests):
# - /init loads the virtio modules (virtio_ring, virtio, virtio_pci_modern_dev,
#   virtio_pci_legacy_dev, virtio_pci, virtio_blk, failover, net_failover, virtio_net), retrying
#   the list until nothing new loads; mounts proc, sysfs, tmpfs on /tmp and on /dev, runs
#   `mdev -s` (the kernel has no devtmpfs);
# - runs the shell script passed base64-encoded on the kernel command line as
#   `baton.script=BASE64`, its output going to the console (ttyS0);
# - prints "BATON-GUEST-EXIT <status>" and powers off (`poweroff -f`).
# Boot with: -kernel OUTDIR/vmlinuz -initrd OUTDIR/initramfs.gz
#            -append "console=ttyS0 quiet panic=-1 baton.script=$(base64 -w0 script.sh)"
set -euo pipefail
out=${1:?usage: build.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [[ -s $out/vmlinuz && -s $out/initramfs.gz ]]; then
    exit 0
fi
busybox=$(command -v busybox || true)
[[ -x /bin/busybox ]] && busybox=/bin/busybox
[[ -n $busybox ]] || { echo "build.sh: busybox-static is not installed" >&2; exit 1; }
command -v cpio >/dev/null || { echo "build.sh: cpio is not installed" >&2; exit 1; }

work=$(mktemp -d "$out/work.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"
pkg=$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/.*Depends: \(linux-image-[0-9][^ ]*\)/\1/p' | head -1)
[[ -n $pkg ]] || { echo "build.sh: apt-cache does not know linux-image-cloud-amd64 (apt-get update?)" >&2; exit 1; }
apt-get download "$pkg" >/dev/null
dpkg-deb -x ./*.deb root

mods="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk failover net_failover virtio_net"
mkdir -p initrd/bin initrd/dev initrd/proc initrd/sys initrd/tmp initrd/lib/modules
cp "$busybox" initrd/bin/busybox
for m in $mods; do
    f=$(find root/lib/modules -name "$m.ko*" | head -1)
    [[ -n $f ]] || { echo "build.sh: module $m not found in $pkg" >&2; exit 1; }
    case $f in
        *.ko.xz) xz -dc "$f" >"initrd/lib/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$f" >"initrd/lib/modules/$m.ko" ;;
        *.ko.gz) gzip -dc "$f" >"initrd/lib/modules/$m.ko" ;;
        *) cp "$f" "initrd/lib/modules/$m.ko" ;;
    esac
done
cat >initrd/init <<EOS
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs tmpfs /dev
mount -t tmpfs tmpfs /tmp
# No modules.dep: retry the list until a pass loads nothing new.
loaded=""
while :; do
    progress=0
    for m in $mods; do
        case " \$loaded " in *" \$m "*) continue ;; esac
        if insmod /lib/modules/\$m.ko 2>/dev/null; then loaded="\$loaded \$m"; progress=1; fi
    done
    [ \$progress = 1 ] || break
done
mdev -s
s=\$(sed -n 's/.*baton\.script=\([^ ]*\).*/\1/p' /proc/cmdline)
echo "\$s" | base64 -d >/tmp/script.sh
sh /tmp/script.sh
echo "BATON-GUEST-EXIT \$?"
sync
poweroff -f
EOS
chmod +x initrd/init
(cd initrd && find . | cpio -o -H newc 2>/dev/null | gzip -9) >"$out/initramfs.gz.tmp"
cp root/boot/vmlinuz-* "$out/vmlinuz.tmp"
mv "$out/initramfs.gz.tmp" "$out/initramfs.gz"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "build.sh: guest in $out (kernel $pkg)"
