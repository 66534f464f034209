# Scenario restart [ROUNDS]: L2 Linux (2 vCPUs) with a baton-blk disk and a baton-net-tap NIC
# runs the load of lib.sh (verified 4 KiB block writes with fsyncs, a clock watcher, pings to
# L1) while L1, ROUNDS times (default 3), SIGKILLs baton-blk and starts it again on the same
# socket, then the same with baton-net-tap (which creates tap0 again: L1 gives it its address
# and MAC again, tap_up). Checks: baton-vmm reconnects each back-end (vm.info: reconnect count, connected),
# the writer and the pings go on after each restart, L2's writer saw no I/O error and read
# every block back, its kernel complains about nothing, the image holds every block's last
# write.
. /rig/lib.sh
rounds=${1:-3}
name=rs

dd if=/dev/zero of=/tmp/disk.img bs=1M count=16 2>/dev/null
blk_start blk0 /tmp/disk.img || exit 1
net_start net0 tap0 || exit 1
load_l1_start 0
load_l2_script /tmp/l2.sh 0
l2_start $name /tmp/l2.sh --cpus 2 --api-socket /tmp/$name.api \
    --disk socket=/tmp/blk0.sock --net socket=/tmp/net0.sock,mac=52:54:00:12:34:56
if ! load_running $name; then
    check "L2's load starts" false
    kill $L2_PID
    l2_wait $name
    exit $FAILURES
fi

# echo_requests: ICMP echo requests L1 has received so far.
echo_requests() {
    awk '/^Icmp:/ { if (h) { for (i = 1; i <= NF; i++) if (n[i] == "InEchos") print $i } else { h = 1; for (i = 1; i <= NF; i++) n[i] = $i } }' /proc/net/snmp
}
pings_above() { [ "$(echo_requests)" -gt "$1" ]; }
# pings_grow SECONDS: L1 receives an echo request within SECONDS.
pings_grow() { wait_for "$1" pings_above "$(echo_requests)"; }

check "L2's pings reach L1" pings_grow 60
for i in $(seq 1 "$rounds"); do
    # A random moment of the writer's loop.
    sleep "0.$(($(od -An -N1 -tu1 /dev/urandom) % 10))"
    kill_service blk0
    echo "round $i: baton-blk SIGKILLed"
    blk_start blk0 /tmp/disk.img
    check "round $i: baton-vmm reconnects baton-blk" wait_for 60 device_is /tmp/$name.api /tmp/blk0.sock $i
    check "round $i: L2's writer goes on" writer_grows /tmp/$name.serial.0 60
    kill_service net0
    echo "round $i: baton-net-tap SIGKILLed"
    net_start net0 tap0
    tap_up
    check "round $i: baton-vmm reconnects baton-net-tap" wait_for 60 device_is /tmp/$name.api /tmp/net0.sock $i
    check "round $i: L2's pings reach L1 again" pings_grow 60
done
check "L2 is told to stop" load_stop
l2_wait $name
check "baton-vmm exits 0" test $? = 0
check_l2 $name
load_checks $name
grep '^ping: ' /tmp/$name.console
service_stop net0
service_stop blk0
check "baton-blk exits 0 on SIGTERM" test $? = 0
sed 's/^/blk0 (before): /' /tmp/blk0.all.log
sed 's/^/net0 (before): /' /tmp/net0.all.log
check "the image holds every block's last write" load_verify_image /tmp/disk.img $name
exit $FAILURES
