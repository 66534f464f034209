# Scenario vfio-lu-bench [SWAPS]: the live-update phases of two VMs that differ only by a
# passed-through device, for bench/vfio-rig.sh. Both: L2 Linux (2 vCPUs), a baton-blk disk with
# lib.sh's writer on it, a baton-net-tap NIC; the first also has L0's NVMe (vfio-pci, `--device`;
# its nvme driver loaded, MSI-X on, idle). Each is live-updated SWAPS times (default 10); every
# swap's report (batonctl live-update's JSON: blackout and phases) is printed as one line
# "bench: with|without JSON". Under TCG: relative figures only. Needs the NVMe rig options of
# vfio-nvme.
. /rig/lib.sh
swaps=${1:-10}

nvme_find || exit $FAILURES
nvme_bind || exit $FAILURES
dd if=/dev/zero of=/tmp/disk.img bs=1M count=16 2>/dev/null
blk_start blk0 /tmp/disk.img || exit 1
net_start net0 tap0 || exit 1
load_l1_start 0
load_l2_script /tmp/l2.sh 0 /dev/vda
for case in with without; do
    name=b$case
    extra=
    [ $case = with ] && extra="--device path=$NVME_DEV"
    # shellcheck disable=SC2086 # $extra is two words or none
    l2_start $name /tmp/l2.sh --cpus 2 --api-socket /tmp/$name.api.0 $extra \
        --disk socket=/tmp/blk0.sock --net socket=/tmp/net0.sock,mac=52:54:00:12:34:56
    check "$case: L2's load starts" load_running $name || { kill $L2_PID; l2_wait $name; exit $FAILURES; }
    cur=0
    for n in $(seq 1 "$swaps"); do
        lu_swap $name $n $cur
        check "$case: swap $n succeeds" test $LU_RC = 0 || {
            sed "s/^/old VMM: /" /tmp/$name.log.$cur; sed "s/^/new VMM: /" /tmp/$name.log.$n
            load_stop; l2_wait $name; exit $FAILURES
        }
        cur=$n
        echo "bench: $case $(tr -d '\n' </tmp/$name.report.$n)"
        writer_grows /tmp/$name.serial.$n 60
    done
    check "$case: L2 is told to stop" load_stop
    l2_wait $name
    check "$case: the last VMM exits 0" test $? = 0
    load_checks $name
done
service_stop net0
service_stop blk0
exit $FAILURES
