# Scenario rootfs: L2 Linux boots a Debian bookworm root file system (systemd) from a baton-blk
# disk and powers itself off. Run with the image as L1's /dev/vda (written in place: a copy):
#   tests/nested/run.sh --disk "$(tests/nested/build-rootfs.sh /tmp/rootfs.ext4)" rootfs
# L1 serves /dev/vda with baton-blk as L2's /dev/vda (root=/dev/vda); L2's initramfs mounts it
# and switch_roots to systemd (build.sh's /tmp/switch-root); the image's baton-rig-done.service,
# ordered after multi-user.target, prints its report and `systemctl poweroff`s (build-rootfs.sh).
# Checks: baton-vmm exits 0, the console shows systemd reaching multi-user.target and no failed
# unit, L2's kernel complains about nothing, L2 powered off through systemd (poweroff.target,
# then the kernel's "reboot: Power down"), and the file system was left clean: the journal needs no recovery (the ext4
# superblock's needs_recovery flag is clear, its state valid), and L1 mounts it without a
# recovery and finds what the boot wrote (/var/lib/baton-rig/done).
. /rig/lib.sh
name=rootfs

if [ ! -b /dev/vda ]; then
    check "L1 has the root file system image as /dev/vda (run.sh --disk IMAGE)" false
    exit $FAILURES
fi
echo "rootfs: L1's /dev/vda: $(blockdev --getsize64 /dev/vda) bytes"

cat >/tmp/l2.sh <<'L2'
mkdir -p /newroot
mount -t ext4 -o rw /dev/vda /newroot || { echo "rootfs: cannot mount /dev/vda"; exit 1; }
# /sbin/init is an absolute symbolic link (to /lib/systemd/systemd): test it inside.
chroot /newroot test -x /sbin/init || { echo "rootfs: no /sbin/init on /dev/vda"; exit 1; }
echo "rootfs: /dev/vda mounted, switch_root to /sbin/init"
echo /newroot >/tmp/switch-root
L2

blk_start blk0 /dev/vda || exit 1
L2_APPEND="root=/dev/vda rw systemd.show_status=1" \
    l2_boot $name /tmp/l2.sh --disk socket=/tmp/blk0.sock
check "baton-vmm exits 0" test $? = 0
check_l2 $name
check "systemd reached multi-user.target" grep -q 'Reached target.*Multi-User System' /tmp/$name.console
check "the unit after multi-user.target ran" grep -q '^rootfs: multi-user.target reached at' /tmp/$name.console
check "no systemd unit failed" grep -qx 'rootfs: 0 failed units' /tmp/$name.console
check "L2 powered off through systemd (poweroff.target, then the kernel's power-off)" sh -c \
    "grep -q 'Reached target.*System Power Off' /tmp/$name.console && grep -q 'reboot: Power down' /tmp/$name.console"
service_stop blk0
check "baton-blk exits 0 on SIGTERM" test $? = 0

# The ext4 superblock (at 1024): s_state (0x3a, 16 bits: 1 valid, 2 errors) and the low byte
# of s_feature_incompat (0x60: 0x4 = needs_recovery, set while mounted read-write).
sb_u16() { dd if=/dev/vda bs=1024 skip=1 count=1 iflag=direct 2>/dev/null | od -An -tu2 -j "$1" -N 2 | tr -d ' '; }
sb_u8() { dd if=/dev/vda bs=1024 skip=1 count=1 iflag=direct 2>/dev/null | od -An -tu1 -j "$1" -N 1 | tr -d ' '; }
state=$(sb_u16 58)
incompat=$(sb_u8 96)
echo "rootfs: superblock: state $state, incompat low byte $incompat"
check "the file system's journal needs no recovery (clean unmount)" test $((incompat & 4)) = 0
check "the file system's state is valid, without errors" test "$state" = 1
mkdir -p /mnt
dmesg -c >/dev/null
if mount -t ext4 -o ro /dev/vda /mnt; then
    dmesg | grep 'EXT4-fs' | sed 's/^/rootfs: L1 mount: /'
    check "L1 mounts it without a journal recovery" sh -c "! dmesg | grep -qiE 'EXT4-fs.*(recover|orphan|error|warning)'"
    check "the boot's writes are in the image (/var/lib/baton-rig/done)" test -s /mnt/var/lib/baton-rig/done
    echo "rootfs: /var/lib/baton-rig/done: $(cat /mnt/var/lib/baton-rig/done 2>/dev/null)"
    umount /mnt
else
    check "L1 mounts the file system" false
fi
exit $FAILURES
