# Scenario vfio-nvme: L0's emulated NVMe controller (QEMU's nvme, 1b36:0010), bound to vfio-pci
# in L1, passed through to L2 with `baton-vmm --device path=...`. Needs L0 to have an IOMMU and
# the NVMe, and L1 to turn the IOMMU on (intremap=off is not enough: vfio_iommu_type1 refuses a
# platform without interrupt remapping):
#   tests/nested/run.sh --qemu -device --qemu intel-iommu,intremap=on \
#     --qemu -drive --qemu if=none,id=nv0,file=IMG,format=raw \
#     --qemu -device --qemu nvme,serial=baton,drive=nv0 --append intel_iommu=on vfio-nvme
# (cargo test --release -p baton-tests --test nested linux_uses_a_passed_through_nvme does that
# with a 64 MiB IMG and then checks the patterns in IMG on the host). Argument: how many BARs
# baton must map into the guest (default 0): with the MSI-X table in BAR0 (QEMU's default)
# BAR0 is trapped; with `nvme,...,msix-exclusive-bar=on` BAR0 is mapped and BAR4 (MSI-X)
# trapped: 1.
# - bad input first: a missing device, a device not bound to vfio-pci, the same device twice:
#   baton-vmm exits non-zero naming the device, and leaves no RAM file behind;
# - L2 Linux (nvme driver, MSI-X) finds /dev/nvme0n1, writes A = `seq 1 100000` at 64 KiB and
#   B = `seq 200001 300000` at 32 MiB with O_DIRECT and an fsync, drops its caches, reads both
#   back, and counts interrupts on its NVMe queues; vm.info lists the device with MSI-X on;
# - afterwards the device is still bound to vfio-pci and the RAM file is gone.
. /rig/lib.sh
mapped=${1:-0}

nvme_find || exit $FAILURES
dev=$NVME_DEV

# Bad input, while it is not bound to vfio-pci yet.
# bad NAME EXPECTED-TEXT DEVICE OPTIONS...: baton-vmm fails with EXPECTED-TEXT, naming DEVICE,
# and leaves no RAM file behind.
bad() {
    _n=$1 _want=$2 _dev=$3; shift 3
    baton-vmm --kernel "$L2_KERNEL" --memory size=64M --serial off --name "$_n" "$@" \
        </dev/null >/dev/null 2>"/tmp/$_n.err"
    _rc=$?
    echo "$_n: baton-vmm exited $_rc: $(cat "/tmp/$_n.err")"
    [ $_rc != 0 ] && grep -qF "$_dev" "/tmp/$_n.err" && grep -qF "$_want" "/tmp/$_n.err" &&
        ! ls /dev/shm/baton-*/"$_n.ram" 2>/dev/null
}
check "bad input: a device not bound to vfio-pci is refused, named" \
    bad bad-driver "not vfio-pci" "$dev" --device "path=$dev"

nvme_bind || exit $FAILURES

check "bad input: a missing device is refused, named" \
    bad bad-missing "no such PCI device" /sys/bus/pci/devices/0000:00:1f.7 \
        --device path=/sys/bus/pci/devices/0000:00:1f.7
check "bad input: the same device twice is refused, named" \
    bad bad-twice "given twice" "$dev" --device "path=$dev" --device "path=$dev"

cat >/tmp/l2.sh <<'L2'
set -e
for i in $(seq 1 300); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
[ -b /dev/nvme0n1 ] || { echo "no /dev/nvme0n1"; ls /sys/bus/pci/devices; exit 1; }
echo "nvme0n1: $(blockdev --getsize64 /dev/nvme0n1) bytes"
seq 1 100000 >/tmp/a
seq 200001 300000 >/tmp/b
dd if=/tmp/a of=/dev/nvme0n1 bs=4096 seek=16 oflag=direct conv=sync,fsync 2>/dev/null
dd if=/tmp/b of=/dev/nvme0n1 bs=4096 seek=8192 oflag=direct conv=sync,fsync 2>/dev/null
echo 3 >/proc/sys/vm/drop_caches
for p in "a 16" "b 8192"; do
    set -- $p
    size=$(wc -c </tmp/$1)
    want=$(md5sum </tmp/$1)
    got=$(dd if=/dev/nvme0n1 bs=4096 skip=$2 count=$(((size + 4095) / 4096)) iflag=direct 2>/dev/null |
        head -c "$size" | md5sum)
    echo "pattern $1: written $want, read back $got"
    [ "$want" = "$got" ]
done
grep nvme /proc/interrupts | sed 's/^/interrupts: /'
n=$(grep nvme /proc/interrupts | awk '{ s = 0; for (i = 2; i <= NF - 3; i++) s += $i; t += s } END { print t + 0 }')
echo "nvme interrupts: $n"
[ "$n" -gt 0 ]
sync
echo "flushed"
# L1 asks vm.info now, while the VM still runs.
sleep 5
L2

l2_start vfio-l2 /tmp/l2.sh --device "path=$dev" --api-socket /tmp/vfio.api
# Until L2 flushed, or baton-vmm stopped.
wait_for 300 sh -c "grep -q '^flushed' /tmp/vfio-l2.serial.0 || ! kill -0 $L2_PID 2>/dev/null"
if grep -q '^flushed' /tmp/vfio-l2.serial.0; then
    batonctl --api-socket /tmp/vfio.api info >/tmp/vfio.info 2>&1
    echo "vm.info: $(cat /tmp/vfio.info)"
    check "vm.info lists the passed-through device with MSI-X on" \
        grep -q '"msix_enabled": *true' /tmp/vfio.info
    check "vm.info: $mapped BAR(s) mapped into the guest, 1 trapped" \
        grep -q "\"mapped_bars\": *$mapped, *\"trapped_bars\": *1" /tmp/vfio.info
else
    check "L2 says it flushed" false
fi
l2_wait vfio-l2
check "baton-vmm exits 0" test $? = 0
check_l2 vfio-l2
check "L2 read both patterns back from the NVMe" grep -q "^flushed" /tmp/vfio-l2.console
check "the NVMe controller is still bound to vfio-pci" \
    test "$(basename "$(readlink "$dev/driver")")" = vfio-pci
check "no RAM file is left behind" sh -c '! ls /dev/shm/baton-*/vfio-l2.ram 2>/dev/null'
exit $FAILURES
