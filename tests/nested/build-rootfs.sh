#!/usr/bin/env bash
# tests/nested/build-rootfs.sh [COPY]: builds (once) a Debian bookworm root file system image for
# L2 of the nested KVM rig, and prints its path: the cached image, or with COPY a copy of it at
# COPY (sparse; a run writes to the image it boots, so give each run its own copy).
#
# The image: ${XDG_CACHE_HOME:-$HOME/.cache}/baton/nested/rootfs.ext4, 1 GiB (sparse), ext4,
# made with `mkfs.ext4 -d` from `mmdebstrap --variant=minbase --include=systemd-sysv,udev
# bookworm` plus baton-rig-done.service: a oneshot unit ordered after multi-user.target that
# prints on the console (/dev/ttyS0) "rootfs: multi-user.target reached ...", the failed units,
# the kernel's messages of level 0-4 as "dmesg: ..." (systemd's, in the kernel log too, as "rootfs: user
# space kmsg: ..."), "BATON-GUEST-EXIT <status>" (status 1 if a
# unit failed; L2's contract, tests/nested/build.sh) and then runs `systemctl poweroff`. It also
# writes /var/lib/baton-rig/done (the uptime) so that L1 can see the boot's writes in the image.
# Rebuilt only when this file changes (a stamp records its hash). Needs root (mmdebstrap's root
# mode, mkfs.ext4 -d keeps the owners), mmdebstrap and e2fsprogs (scripts/setup.sh installs them).
set -euo pipefail
out=${XDG_CACHE_HOME:-$HOME/.cache}/baton/nested
mkdir -p "$out"
image=$out/rootfs.ext4
die() { echo "build-rootfs.sh: $*" >&2; exit 1; }
exec 8>"$out/.rootfs.lock"
flock 8
stamp=$(sha256sum "$0" | cut -d' ' -f1)
if [[ ! -s $image || $(cat "$out/rootfs.stamp" 2>/dev/null) != "$stamp" ]]; then
    for p in mmdebstrap mkfs.ext4; do
        command -v $p >/dev/null || die "$p is not installed (scripts/setup.sh installs it)"
    done
    [[ $(id -u) == 0 ]] || die "building the image needs root (mmdebstrap, mkfs.ext4 -d with owners)"
    work=$(mktemp -d "$out/rootfs-work.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    start=$(date +%s)
    mmdebstrap --quiet --variant=minbase --include=systemd-sysv,udev bookworm "$work/root" >&2
    root=$work/root
    mkdir -p "$root/usr/local/sbin" "$root/etc/systemd/system/multi-user.target.wants"
    cat >"$root/usr/local/sbin/baton-rig-done" <<'EOS'
#!/bin/sh
# baton-rig-done.service: L2's report on the console, then a clean power-off.
exec >/dev/ttyS0 2>&1
up=$(cut -d' ' -f1 /proc/uptime)
echo "rootfs: multi-user.target reached at $up s of uptime ($(systemctl is-active multi-user.target))"
echo "rootfs: root is $(findmnt -no SOURCE,FSTYPE,OPTIONS /)"
echo "rootfs: systemd $(systemctl --version | head -1)"
failed=$(systemctl list-units --state=failed --no-legend --plain | wc -l)
systemctl list-units --state=failed --no-legend --plain | sed 's/^/rootfs: failed unit: /'
echo "rootfs: $failed failed units"
mkdir -p /var/lib/baton-rig
echo "$up" >/var/lib/baton-rig/done
sync
# The kernel's messages of level 0-4 (the contract's "dmesg: ..."); what user space (systemd)
# wrote to the kernel log at those levels is not the kernel complaining: shown apart.
dmesg -r -f kern | sed -n 's/^<[0-4]>/dmesg: /p'
dmesg -f user,daemon -l emerg,alert,crit,err,warn | sed 's/^/rootfs: user space kmsg: /'
status=0
[ "$failed" = 0 ] || status=1
echo "BATON-GUEST-EXIT $status"
echo "rootfs: systemctl poweroff"
systemctl --no-block poweroff
EOS
    chmod 755 "$root/usr/local/sbin/baton-rig-done"
    cat >"$root/etc/systemd/system/baton-rig-done.service" <<'EOS'
[Unit]
Description=baton rig: report on the console, power off
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/baton-rig-done

[Install]
WantedBy=multi-user.target
EOS
    ln -s ../baton-rig-done.service "$root/etc/systemd/system/multi-user.target.wants/"
    echo "/dev/vda / ext4 rw,errors=remount-ro 0 1" >"$root/etc/fstab"
    echo baton-l2 >"$root/etc/hostname"
    rm -f "$work/rootfs.ext4"
    mkfs.ext4 -q -F -L baton-root -d "$root" "$work/rootfs.ext4" 1G >&2
    mv "$work/rootfs.ext4" "$image"
    echo "$stamp" >"$out/rootfs.stamp"
    echo "build-rootfs.sh: $image ($(du -m "$image" | cut -f1) MiB allocated) in $(($(date +%s) - start)) s" >&2
fi
if [[ -n ${1:-} ]]; then
    cp --sparse=always "$image" "$1"
    echo "$1"
else
    echo "$image"
fi
