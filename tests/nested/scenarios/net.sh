# Scenario net: L1 serves a TAP (tap0, 10.0.2.1/24) with baton-net-tap; L2 Linux brings eth0 up
# as 10.0.2.2/24 and pings L1 through it. Checks: baton-vmm exits 0, the pings are answered,
# baton-net-tap stops cleanly on SIGTERM.
. /rig/lib.sh

cat >/tmp/l2.sh <<'L2'
set -e
ip addr add 10.0.2.2/24 dev eth0
ip link set eth0 up
ping -c 3 -W 10 10.0.2.1
dmesg -r | sed -n 's/^<[0-4]>/dmesg: /p'
L2

net_start net0 tap0 || exit 1
ip addr add 10.0.2.1/24 dev tap0
ip link set tap0 up
l2_boot net-l2 /tmp/l2.sh --cpus "${L2_CPUS:-1}" --net socket=/tmp/net0.sock,mac=52:54:00:12:34:56
check "baton-vmm exits 0" test $? = 0
check "L2 pinged L1 through the TAP" test "$(l2_guest_status net-l2)" = 0
service_stop net0
check "baton-net-tap exits 0 on SIGTERM" test $? = 0
exit $FAILURES
