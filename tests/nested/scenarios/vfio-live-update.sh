# Scenario vfio-live-update [SWAPS]: L2 Linux (2 vCPUs) with L0's NVMe controller passed
# through (vfio-pci in L1, `baton-vmm --device`) and a baton-net-tap NIC runs lib.sh's load with
# its writer on /dev/nvme0n1 (verified 4 KiB O_DIRECT writes with fsyncs, a clock watcher,
# pings) while L1 moves it to a new baton-vmm SWAPS times (default 10). The device's fds move
# over the cpr channel; its DMA mappings and MSI-X vectors are never torn down
# (vmm/src/vfio/handover.rs). Then two rollbacks with the device: a new VMM that exits once it
# has received the fds and the state (BATON_LIVE_UPDATE_FAIL=exit-after-state), and one that
# is SIGKILLed after it has taken the DMA mappings and the vectors over (hang-before-ready):
# the old VMM takes them back and the guest goes on.
# Checks: every swap succeeds and the old VMM exits 0, the writer goes on after each swap and
# each rollback, no write or verify error, no nvme timeout, abort or reset in L2's log, L2's
# kernel complains about nothing, the device is still bound to vfio-pci at the end. The data
# are checked on the host afterwards (tests/tests/nested.rs): "writer: N writes" tells what
# each block must hold.
# Needs the same L0 options as vfio-nvme (an IOMMU, the NVMe, intel_iommu=on).
. /rig/lib.sh
swaps=${1:-10}
name=vlu

nvme_find || exit $FAILURES
nvme_bind || exit $FAILURES
net_start net0 tap0 || exit 1
load_l1_start 0
load_l2_script /tmp/l2.sh 0 /dev/nvme0n1
l2_start $name /tmp/l2.sh --cpus 2 --api-socket /tmp/$name.api.0 --device "path=$NVME_DEV" \
    --net socket=/tmp/net0.sock,mac=52:54:00:12:34:56
if ! load_running $name; then
    check "L2's load starts" false
    kill $L2_PID
    l2_wait $name
    exit $FAILURES
fi
check "the writer runs on the NVMe" writer_grows /tmp/$name.serial.0 120

cur=0
for n in $(seq 1 "$swaps"); do
    lu_swap $name $n $cur
    echo "swap $n: $(tr -d '\n' </tmp/$name.report.$n | cut -c1-600)"
    check "swap $n: batonctl live-update exits 0" test $LU_RC = 0
    check "swap $n: the old VMM exits 0" test "$LU_OLD_RC" = 0
    if [ $LU_RC != 0 ] || [ "$LU_OLD_RC" != 0 ]; then
        # Stop here: later swaps would only repeat the failure.
        load_stop
        l2_wait $name
        exit $FAILURES
    fi
    cur=$n
    check "swap $n: the writer goes on" writer_grows /tmp/$name.serial.$n 60
done
batonctl --api-socket /tmp/$name.api.$cur info >/tmp/$name.info 2>&1
echo "after the swaps: vm.info: $(tr -d '\n ' </tmp/$name.info)"
check "the last VMM lists the device with MSI-X on" grep -q '"msix_enabled": *true' /tmp/$name.info

# rollback WHY FAIL: a live update to a new VMM with BATON_LIVE_UPDATE_FAIL=FAIL; with FAIL =
# hang-before-ready the new VMM is SIGKILLed once it has restored the state (it has claimed the
# DMA mappings and the vectors by then).
rollback() {
    _why=$1 _fail=$2
    BATON_LIVE_UPDATE_FAIL=$_fail BATON_LOG=info baton-vmm --incoming /tmp/$name.in.$_why \
        --serial stdio --api-socket /tmp/$name.api.$_why </dev/null \
        >/tmp/$name.serial.$_why 2>/tmp/$name.log.$_why &
    _new=$!
    wait_for 30 test -S /tmp/$name.in.$_why
    timeout 120 batonctl --api-socket /tmp/$name.api.$cur live-update --timeout-ms 60000 \
        /tmp/$name.in.$_why >/tmp/$name.report.$_why 2>&1 &
    _ctl=$!
    if [ "$_fail" = hang-before-ready ]; then
        check "rollback $_why: the new VMM restores the device" \
            wait_for 60 grep -q 'ready for the switch' /tmp/$name.log.$_why
        # The switch itself: after "ready for the switch" the state arrives and is restored.
        sleep 3
        kill -KILL $_new
        echo "rollback $_why: new VMM SIGKILLed"
    fi
    wait $_ctl
    _rc=$?
    wait $_new 2>/dev/null
    sed "s/^/rollback $_why: batonctl: /" /tmp/$name.report.$_why
    grep -i 'vfio\|rolling\|fail' /tmp/$name.log.$_why | sed "s/^/rollback $_why: new baton-vmm: /"
    check "rollback $_why: batonctl live-update fails" test $_rc != 0
    check "rollback $_why: the old VMM says it rolled back" grep -q 'rolled back' \
        /tmp/$name.report.$_why
    check "rollback $_why: the old VMM's VM is running" sh -c \
        "batonctl --api-socket /tmp/$name.api.$cur info | grep -q '\"running\"'"
    check "rollback $_why: the writer goes on" writer_grows /tmp/$name.serial.$cur 60
}
rollback fds exit-after-state
rollback switch hang-before-ready
n=$((swaps + 1))
lu_swap $name $n $cur
check "after the rollbacks: a live update succeeds" test $LU_RC = 0
check "after the rollbacks: the old VMM exits 0" test "$LU_OLD_RC" = 0
check "after the rollbacks: the writer goes on" writer_grows /tmp/$name.serial.$n 60

check "L2 is told to stop" load_stop
l2_wait $name
check "the last VMM exits 0" test $? = 0
check_l2 $name
load_checks $name
check "no nvme timeout, abort or reset in L2's log" \
    sh -c "! grep -i 'nvme.*\\(timeout\\|abort\\|reset\\)' /tmp/$name.console"
sed -n 's/^\(writer: [0-9]* writes,.*\)/image: \1/p' /tmp/$name.console
service_stop net0
check "the NVMe controller is still bound to vfio-pci" \
    test "$(basename "$(readlink "$NVME_DEV/driver")")" = vfio-pci
exit $FAILURES
