# Scenario net: L1 serves a TAP (tap0, 10.0.2.1/24) with baton-net-tap, 2 queue pairs; L2
# Linux (2 vCPUs) sees eth0 with 2 RX and 2 TX queues, brings it up as 10.0.2.2/24, pings L1,
# sends L1 4 MiB of random data over TCP (busybox nc; L1 listens) and receives 4 MiB from
# L1; both sides compare MD5s. Checks: baton-vmm exits 0, L2 complains about nothing, the
# data arrive intact both ways, baton-net-tap stops cleanly on SIGTERM.
. /rig/lib.sh

cat >/tmp/l2.sh <<'L2'
set -e
echo "eth0 queues: $(ls /sys/class/net/eth0/queues | tr '\n' ' ')"
ip addr add 10.0.2.2/24 dev eth0
ip link set eth0 up
ping -c 3 -W 10 10.0.2.1
head -c 4194304 /dev/urandom >/tmp/up.bin
echo "up-md5: $(md5sum </tmp/up.bin | cut -d' ' -f1)"
# busybox nc stops at the end of its input: upload from a file, download with an input that
# stays open (a FIFO held by fd 3) until the peer closes.
taskset -c 1 nc 10.0.2.1 5001 </tmp/up.bin
mkfifo /tmp/hold
taskset -c 0 nc 10.0.2.1 5002 </tmp/hold >/tmp/down.bin &
pid=$!
exec 3>/tmp/hold
wait $pid
exec 3>&-
echo "down-md5: $(md5sum </tmp/down.bin | cut -d' ' -f1) ($(wc -c </tmp/down.bin) bytes)"
grep -E 'virtio[0-9]+-(input|output)' /proc/interrupts | sed 's/^/interrupts: /'
L2

net_start net0 tap0 --queues 2 || exit 1
ip addr add 10.0.2.1/24 dev tap0
ip link set tap0 up
# L1's two listeners: one receives the upload (its input held open by fd 4), one serves
# the download.
head -c 4194304 /dev/urandom >/tmp/down.bin
mkfifo /tmp/hold
nc -l -p 5001 </tmp/hold >/tmp/up.bin &
up_pid=$!
exec 4>/tmp/hold
nc -l -p 5002 </tmp/down.bin &
down_pid=$!
l2_boot net-l2 /tmp/l2.sh --cpus 2 --net socket=/tmp/net0.sock,mac=52:54:00:12:34:56,queues=2
check "baton-vmm exits 0" test $? = 0
check_l2 net-l2
check "L2's eth0 has 2 RX and 2 TX queues" \
    grep -qx "eth0 queues: rx-0 rx-1 tx-0 tx-1 " /tmp/net-l2.console
check "L2 pinged L1 through the TAP" grep -q "3 packets transmitted, 3 packets received" /tmp/net-l2.console
kill $up_pid $down_pid 2>/dev/null
exec 4>&-
up_want=$(sed -n 's/^up-md5: //p' /tmp/net-l2.console)
up_got=$(md5sum </tmp/up.bin | cut -d' ' -f1)
echo "upload: L2 sent $up_want, L1 received $up_got ($(wc -c </tmp/up.bin) bytes)"
check "TCP L2 -> L1: 4 MiB arrive intact" test "$up_want" = "$up_got"
down_want=$(md5sum </tmp/down.bin | cut -d' ' -f1)
down_got=$(sed -n 's/^down-md5: \([0-9a-f]*\).*/\1/p' /tmp/net-l2.console)
echo "download: L1 sent $down_want, L2 received $down_got"
check "TCP L1 -> L2: 4 MiB arrive intact" test "$down_want" = "$down_got"
service_stop net0
check "baton-net-tap exits 0 on SIGTERM" test $? = 0
exit $FAILURES
