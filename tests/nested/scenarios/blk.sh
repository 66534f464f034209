# Scenario blk: L1 creates a disk image and serves it with baton-blk; L2 Linux writes a pattern
# to /dev/vda with dd (at a 64 KiB offset), drops its caches, reads it back and compares; after
# baton-vmm has exited and baton-blk has stopped, L1 checks the pattern in the image itself.
. /rig/lib.sh

# The pattern: `seq 1 100000` (588895 bytes), the same on both sides.
cat >/tmp/l2.sh <<'L2'
set -e
[ -b /dev/vda ] || { echo "no block device /dev/vda"; ls -l /dev/vda; exit 1; }
echo "vda: $(blockdev --getsize64 /dev/vda) bytes"
seq 1 100000 >/tmp/pattern
size=$(wc -c </tmp/pattern)
dd if=/tmp/pattern of=/dev/vda bs=4096 seek=16 conv=fsync 2>/dev/null
echo 3 >/proc/sys/vm/drop_caches
blockdev --flushbufs /dev/vda
want=$(md5sum </tmp/pattern)
got=$(dd if=/dev/vda bs=4096 skip=16 count=$(((size + 4095) / 4096)) 2>/dev/null | head -c "$size" | md5sum)
echo "written: $want"
echo "read back: $got"
[ "$want" = "$got" ]
dmesg -r | sed -n 's/^<[0-4]>/dmesg: /p'
L2

dd if=/dev/zero of=/tmp/disk.img bs=1M count=64 2>/dev/null
blk_start blk0 /tmp/disk.img || exit 1
l2_boot blk-l2 /tmp/l2.sh --cpus "${L2_CPUS:-1}" --disk socket=/tmp/blk0.sock
check "baton-vmm exits 0" test $? = 0
check "L2's script exits 0 (pattern read back in L2)" test "$(l2_guest_status blk-l2)" = 0
service_stop blk0
check "baton-blk exits 0 on SIGTERM" test $? = 0
want=$(seq 1 100000 | md5sum)
got=$(dd if=/tmp/disk.img bs=4096 skip=16 2>/dev/null | head -c 588895 | md5sum)
echo "image: $got (want $want)"
check "the pattern is in the image" test "$want" = "$got"
exit $FAILURES
