# Scenario blk: L1 serves a 64 MiB image with baton-blk, 2 queues; L2 Linux (2 vCPUs) sees
# /dev/vda with 2 hardware queues and:
# - writes two patterns at once, one from each CPU (taskset), with O_DIRECT and an fsync
#   (a flush): A = `seq 1 100000` at 64 KiB, B = `seq 200001 300000` at 4 MiB;
# - drops its caches and reads both back (O_DIRECT);
# - fills 1 MiB at 8 MiB with a pattern, discards it (blkdiscard) and reads zeros back;
# - flushes (`sync`) and says so; L1 then finds both patterns in the image while L2 still runs.
# After baton-vmm and baton-blk have exited, L1 checks the image again: A, B, the discarded
# range all zeros (and that it is a hole: the file's allocated size shrank).
. /rig/lib.sh

cat >/tmp/l2.sh <<'L2'
set -e
[ -b /dev/vda ] || { echo "no block device /dev/vda"; exit 1; }
echo "vda: $(blockdev --getsize64 /dev/vda) bytes"
echo "hardware queues: $(ls /sys/block/vda/mq | wc -l)"
echo "write cache: $(cat /sys/block/vda/queue/write_cache)"
echo "discard: granularity $(cat /sys/block/vda/queue/discard_granularity) max $(cat /sys/block/vda/queue/discard_max_bytes)"
seq 1 100000 >/tmp/a
seq 200001 300000 >/tmp/b
# One writer per CPU: blk-mq maps each CPU to its own queue.
taskset -c 0 dd if=/tmp/a of=/dev/vda bs=4096 seek=16 oflag=direct conv=sync,fsync 2>/dev/null &
pa=$!
taskset -c 1 dd if=/tmp/b of=/dev/vda bs=4096 seek=1024 oflag=direct conv=sync,fsync 2>/dev/null &
pb=$!
wait $pa || { echo "writer A failed"; exit 1; }
wait $pb || { echo "writer B failed"; exit 1; }
echo 3 >/proc/sys/vm/drop_caches
for p in "a 16" "b 1024"; do
    set -- $p
    size=$(wc -c </tmp/$1)
    want=$(md5sum </tmp/$1)
    got=$(dd if=/dev/vda bs=4096 skip=$2 count=$(((size + 4095) / 4096)) iflag=direct 2>/dev/null |
        head -c "$size" | md5sum)
    echo "pattern $1: written $want, read back $got"
    [ "$want" = "$got" ]
done
grep -E 'virtio[0-9]+-req' /proc/interrupts | sed 's/^/interrupts: /'
for q in 0 1; do
    n=$(grep -E "virtio[0-9]+-req\.$q\$" /proc/interrupts | awk '{ s = 0; for (i = 2; i <= NF - 3; i++) s += $i; print s }')
    echo "queue $q: $n interrupts"
    [ "${n:-0}" -gt 0 ]
done
# Discard: 1 MiB at 8 MiB, written first so that zeros mean the discard reached the image.
yes baton | head -c 1048576 >/tmp/c
dd if=/tmp/c of=/dev/vda bs=65536 seek=128 oflag=direct conv=fsync 2>/dev/null
blkdiscard -o 8388608 -l 1048576 /dev/vda
echo 3 >/proc/sys/vm/drop_caches
zeros=$(head -c 1048576 /dev/zero | md5sum)
got=$(dd if=/dev/vda bs=65536 skip=128 count=16 iflag=direct 2>/dev/null | md5sum)
echo "discarded range: $got (zeros: $zeros)"
[ "$got" = "$zeros" ]
sync
echo "flushed"
# L1 checks the image now, while the VM still runs.
sleep 5
L2

dd if=/dev/zero of=/tmp/disk.img bs=1M count=64 2>/dev/null
blk_start blk0 /tmp/disk.img --queues 2 || exit 1
l2_start blk-l2 /tmp/l2.sh --cpus 2 --disk socket=/tmp/blk0.sock,queues=2

# pattern_in_image WHAT FILE-OF-LINES BLOCK: the image holds the lines at 4 KiB block BLOCK.
pattern_in_image() {
    _size=$(wc -c <"$2")
    _want=$(md5sum <"$2")
    _got=$(dd if=/tmp/disk.img bs=4096 skip="$3" 2>/dev/null | head -c "$_size" | md5sum)
    echo "image, $1: $_got (want $_want)"
    [ "$_want" = "$_got" ]
}
seq 1 100000 >/tmp/a
seq 200001 300000 >/tmp/b
if wait_for 240 grep -q '^flushed' /tmp/blk-l2.serial.0; then
    check "after L2's flush, before it exits: pattern A is in the image" pattern_in_image A /tmp/a 16
    check "after L2's flush, before it exits: pattern B is in the image" pattern_in_image B /tmp/b 1024
else
    check "L2 says it flushed" false
fi
l2_wait blk-l2
check "baton-vmm exits 0" test $? = 0
check_l2 blk-l2
check "L2 has 2 hardware queues on vda" grep -qx "hardware queues: 2" /tmp/blk-l2.console
check "L2 read both patterns back" grep -q "^flushed" /tmp/blk-l2.console
service_stop blk0
check "baton-blk exits 0 on SIGTERM" test $? = 0
check "image after exit: pattern A" pattern_in_image A /tmp/a 16
check "image after exit: pattern B" pattern_in_image B /tmp/b 1024
zeros=$(head -c 1048576 /dev/zero | md5sum)
got=$(dd if=/tmp/disk.img bs=65536 skip=128 count=16 2>/dev/null | md5sum)
echo "image, discarded range: $got (zeros: $zeros)"
check "image after exit: the discarded 1 MiB reads as zeros" test "$got" = "$zeros"
# 64 MiB written by dd in L1, then ~1.3 MiB of patterns; the discard punched 1 MiB out.
echo "image: $(du -k /tmp/disk.img | cut -f1) KiB allocated of 65536"
check "image after exit: the discarded range is a hole" test "$(du -k /tmp/disk.img | cut -f1)" -le 64512
exit $FAILURES
