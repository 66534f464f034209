# Scenario live-update [SWAPS]: L2 Linux (2 vCPUs) on baton-vmm with a baton-blk disk and a
# baton-net-tap NIC runs the load of lib.sh (verified 4 KiB block writes with fsyncs, a clock
# watcher, pings, a TCP stream to L1) while L1 moves it to a new baton-vmm SWAPS times
# (default 10: `baton-vmm --incoming`, `batonctl live-update`), then once more to a new VMM
# that is SIGKILLed mid-swap (after it has taken the back-ends over, before the commit;
# BATON_LIVE_UPDATE_FAIL=hang-before-ready holds it there): the old VMM must roll back and keep
# the guest and its load going. Checks: each swap succeeds and the old VMM exits 0, the load
# goes on after each swap and after the rollback, L2's writer saw no error, its clocks never
# went back, its kernel complains about nothing, the image holds every block's last write, the
# TCP stream arrived whole.
. /rig/lib.sh
swaps=${1:-10}
name=lu

dd if=/dev/zero of=/tmp/disk.img bs=1M count=16 2>/dev/null
blk_start blk0 /tmp/disk.img || exit 1
net_start net0 tap0 || exit 1
load_l1_start 1
load_l2_script /tmp/l2.sh 1
l2_start $name /tmp/l2.sh --cpus 2 --api-socket /tmp/$name.api.0 \
    --disk socket=/tmp/blk0.sock --net socket=/tmp/net0.sock,mac=52:54:00:12:34:56
if ! load_running $name; then
    check "L2's load starts" false
    kill $L2_PID
    l2_wait $name
    exit $FAILURES
fi
check "the TCP stream from L2 flows" stream_grows 60

cur=0
for n in $(seq 1 "$swaps"); do
    t0=$(cut -d' ' -f1 /proc/uptime)
    lu_swap $name $n $cur
    t1=$(cut -d' ' -f1 /proc/uptime)
    blackout=$(sed -n 's/.*"blackout_us":\([0-9.]*\).*/\1/p' /tmp/$name.report.$n)
    echo "swap $n: batonctl exited $LU_RC after $t0 -> $t1 s of L1 uptime; blackout ${blackout:-?} us"
    [ $LU_RC = 0 ] || sed 's/^/  report: /' /tmp/$name.report.$n
    check "swap $n: batonctl live-update exits 0" test $LU_RC = 0
    check "swap $n: the old VMM exits 0" test "$LU_OLD_RC" = 0
    [ $LU_RC = 0 ] && cur=$n
    check "swap $n: the TCP stream goes on" stream_grows 60
    check "swap $n: the writer goes on" writer_grows /tmp/$name.serial.$cur 60
done

# The rollback: the new VMM is killed once it has taken the back-ends over.
connected() { grep -c 'front-end connected' /tmp/blk0.log; }
before=$(connected)
BATON_LIVE_UPDATE_FAIL=hang-before-ready BATON_LOG=info baton-vmm --incoming /tmp/$name.in.rb \
    --serial stdio --api-socket /tmp/$name.api.rb </dev/null >/tmp/$name.serial.rb 2>/tmp/$name.log.rb &
rb_pid=$!
wait_for 30 test -S /tmp/$name.in.rb
timeout 120 batonctl --api-socket /tmp/$name.api.$cur live-update --timeout-ms 60000 \
    /tmp/$name.in.rb >/tmp/$name.report.rb 2>&1 &
ctl=$!
check "rollback: the new VMM takes baton-blk over" \
    wait_for 60 sh -c "[ \$(grep -c 'front-end connected' /tmp/blk0.log) -gt $before ]"
kill -KILL $rb_pid
echo "rollback: new VMM SIGKILLed"
wait $ctl
rc=$?
sed 's/^/rollback: batonctl: /' /tmp/$name.report.rb
sed 's/^/rollback: new baton-vmm: /' /tmp/$name.log.rb
check "rollback: batonctl live-update fails" test $rc != 0
check "rollback: the old VMM says it rolled back" grep -q 'rolled back' /tmp/$name.report.rb
check "rollback: the old VMM still runs" kill -0 "$(cat /tmp/$name.pid)"
check "rollback: the old VMM's VM is running" sh -c \
    "batonctl --api-socket /tmp/$name.api.$cur info | grep -q '\"running\"'"
check "rollback: the TCP stream goes on" stream_grows 60
check "rollback: the writer goes on" writer_grows /tmp/$name.serial.$cur 60
batonctl --api-socket /tmp/$name.api.$cur info | sed 's/^/rollback: info: /'

check "L2 is told to stop" load_stop
l2_wait $name
check "the last VMM exits 0" test $? = 0
check_l2 $name
load_checks $name
wait $LOAD_NC
check "L1's end of the TCP stream sees it end" test $? = 0
exec 5>&-
check "the TCP stream arrived whole, in order" load_verify_stream $name
service_stop net0
service_stop blk0
check "baton-blk exits 0 on SIGTERM" test $? = 0
check "the image holds every block's last write" load_verify_image /tmp/disk.img $name
exit $FAILURES
