#!/bin/sh
# Runs the test guest's device tests on every platform available here and prints one line
# per run: PASS/FAIL, platform, command line, and the guest's JSON result.
#
#   tests/guest/device-tests.sh [qemu] [qemu-tap] [qemu-vhost] [vmm] [vmm-qsd] [vmm-net]
#   [vmm-io]   (default: all)
#
# - qemu:       QEMU TCG with QEMU's own virtio-blk-pci and virtio-net-pci (user-mode net:
#               the guest pings the slirp gateway 10.0.2.2; UDP echo through a hostfwd on
#               127.0.0.1).
# - qemu-tap:   QEMU TCG, virtio-net-pci on a TAP that QEMU creates inside a network
#               namespace created here (10.213.1.1/24 host side, guest 10.213.1.2): the host
#               pings the guest and sends it UDP; the guest pings the host.
# - qemu-vhost: QEMU TCG + vhost-user-blk-pci on baton-blk.
# - vmm:        baton-vmm + baton-blk (4 queues).
# - vmm-qsd:    baton-vmm + qemu-storage-daemon's vhost-user-blk export.
# - vmm-net:    baton-vmm + baton-net-tap, TAP in a network namespace created here
#               (10.213.0.1/24 host side, guest 10.213.0.2; needs root and `ip netns`).
# - vmm-io:     baton-vmm + baton-blk + baton-net-tap: `io-cont` (blk-cont and net-cont at
#               once) on 2 vCPUs (split) and on 1 vCPU (interleaved, stopped by `q`), with a
#               UDP stream from the namespace (10.213.2.1/24 host side, guest 10.213.2.2);
#               a run passes only if both `writes` and `udp_echoed` advanced.
#
# Binaries: BATON_VMM, BATON_BLK, BATON_NET_TAP (default: target/release/ of the
# repository). Build first: `cargo build --release -p baton-vmm -p baton-blk -p
# baton-net-tap` and `cd tests/guest && cargo build --release`.
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
guest=$root/tests/guest/target/x86_64-unknown-none/release/baton-test-guest
vmm=${BATON_VMM:-$root/target/release/baton-vmm}
blk=${BATON_BLK:-$root/target/release/baton-blk}
nettap=${BATON_NET_TAP:-$root/target/release/baton-net-tap}
work=$(mktemp -d /tmp/baton-guest-dev.XXXXXX)
ns=batong$$
nsq=batogq$$
pids=""
fails=0

cleanup() {
    for p in $pids; do kill "$p" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
    ip netns del "$nsq" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

# check PLATFORM CMDLINE OUTPUT_FILE
check() {
    line=$(grep '^{"test"' "$3" | tail -1)
    case $line in
        *'"result":"pass"'*) echo "PASS $1 [$2] $line" ;;
        *) echo "FAIL $1 [$2] ${line:-(no result line; last output: $(tail -2 "$3" | tr '\n' ' '))}"
           fails=$((fails + 1)) ;;
    esac
}

wait_socket() {
    for _ in $(seq 50); do [ -S "$1" ] && return 0; sleep 0.1; done
    echo "socket $1 did not appear"; return 1
}

qemu_base="qemu-system-x86_64 -accel tcg -M pc -m 256 -nodefaults -display none -serial stdio -monitor none -no-reboot -kernel $guest"

run_qemu() {
    truncate -s 64M "$work/q.img"
    for t in "test=blk queues=4" "test=blk queues=4 mode=irq" "test=blk-lat mode=poll n=500" \
             "test=blk-lat mode=irq n=500" "test=blk-cont seconds=3 queues=2"; do
        timeout 120 $qemu_base -append "$t" -drive file="$work/q.img",if=none,id=d0,format=raw \
            -device virtio-blk-pci,drive=d0,disable-legacy=on,num-queues=4,serial=QEMUBLK \
            </dev/null >"$work/out" 2>&1
        check qemu-tcg "$t" "$work/out"
    done
    t="test=net ip=10.0.2.15/24 peer=10.0.2.2 seconds=6"
    timeout 60 $qemu_base -append "$t" \
        -netdev user,id=n0,hostfwd=udp:127.0.0.1:15557-10.0.2.15:7 \
        -device virtio-net-pci,netdev=n0,disable-legacy=on </dev/null >"$work/out" 2>&1 &
    qpid=$!
    sleep 3
    python3 - <<'EOF'
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
ok = 0
for i in range(50):
    m = b"seq %d" % i
    s.sendto(m, ("127.0.0.1", 15557))
    try:
        ok += s.recvfrom(2000)[0] == m
    except OSError:
        pass
print("host: udp echo %d of 50" % ok)
EOF
    wait $qpid
    check qemu-tcg "$t" "$work/out"
}

start_baton_blk() {
    truncate -s 64M "$work/b.img"
    "$blk" --socket "$work/b.sock" --image "$work/b.img" --queues 4 --serial BATONBLK \
        >"$work/blk.log" 2>&1 &
    pids="$pids $!"
    wait_socket "$work/b.sock"
}

run_qemu_vhost() {
    [ -S "$work/b.sock" ] || start_baton_blk
    for t in "test=blk queues=4" "test=blk-lat mode=poll n=300" "test=blk-lat mode=irq n=300" \
             "test=blk-cont seconds=3 queues=2"; do
        timeout 120 $qemu_base -append "$t" \
            -object memory-backend-memfd,id=mem,size=256M,share=on -machine memory-backend=mem \
            -chardev socket,id=c0,path="$work/b.sock" -device vhost-user-blk-pci,chardev=c0,num-queues=4 \
            </dev/null >"$work/out" 2>&1
        check qemu-tcg+baton-blk "$t" "$work/out"
    done
}

run_vmm_disk() {
    name=$1 sock=$2 queues=$3
    for t in "test=blk queues=$queues" "test=blk queues=$queues mode=irq" \
             "test=blk-lat mode=poll n=2000" "test=blk-lat mode=irq n=2000" \
             "test=blk-cont seconds=3 queues=$queues" "test=virtio-bad"; do
        timeout 60 "$vmm" --kernel "$guest" --cmdline "$t" --disk socket="$sock",queues="$queues" \
            </dev/null >"$work/out" 2>&1
        check "$name" "$t" "$work/out"
    done
}

run_vmm() {
    [ -S "$work/b.sock" ] || start_baton_blk
    run_vmm_disk baton-vmm+baton-blk "$work/b.sock" 4
}

run_vmm_qsd() {
    truncate -s 64M "$work/qsd.img"
    qemu-storage-daemon --blockdev driver=file,node-name=f0,filename="$work/qsd.img" \
        --export type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path="$work/qsd.sock",writable=on,num-queues=2 \
        >"$work/qsd.log" 2>&1 &
    pids="$pids $!"
    wait_socket "$work/qsd.sock" && run_vmm_disk baton-vmm+qemu-storage-daemon "$work/qsd.sock" 2
}

host_probe() {
    ip netns exec "$1" python3 - "$2" <<'EOF'
import socket, struct, sys
dst = sys.argv[1]
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); r.settimeout(1)
p = struct.pack("!BBHHH", 8, 0, 0, 0x4242, 1) + b"x" * 32
p = p[:2] + struct.pack("!H", csum(p)) + p[4:]
r.sendto(p, (dst, 0))
try:
    d = r.recvfrom(2000)[0]; print("host: ping reply type", d[(d[0] & 15) * 4])
except OSError:
    print("host: no ping reply")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
ok = 0
for i in range(200):
    m = b"seq %08d" % i + b"p" * 64
    s.sendto(m, (dst, 7))
    try:
        ok += s.recvfrom(2000)[0] == m
    except OSError:
        pass
print("host: udp echo %d of 200" % ok)
EOF
}

run_qemu_tap() {
    ip netns add "$nsq" || return
    ip netns exec "$nsq" ip link set lo up
    t="test=net ip=10.213.1.2/24 peer=10.213.1.1 seconds=8"
    ip netns exec "$nsq" timeout 60 $qemu_base -append "$t" \
        -netdev tap,id=n0,ifname=batq0,script=no,downscript=no \
        -device virtio-net-pci,netdev=n0,disable-legacy=on </dev/null >"$work/out" 2>&1 &
    qpid=$!
    for _ in $(seq 50); do ip netns exec "$nsq" ip link show batq0 >/dev/null 2>&1 && break; sleep 0.1; done
    ip netns exec "$nsq" ip addr add 10.213.1.1/24 dev batq0
    ip netns exec "$nsq" ip link set batq0 up
    sleep 2
    host_probe "$nsq" 10.213.1.2
    wait $qpid
    check qemu-tcg+tap "$t" "$work/out"
}

run_vmm_net() {
    ip netns add "$ns" || return
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" "$nettap" --socket "$work/n.sock" --tap batg0 --queues 2 >"$work/tap.log" 2>&1 &
    pids="$pids $!"
    wait_socket "$work/n.sock" || return
    ip netns exec "$ns" ip addr add 10.213.0.1/24 dev batg0
    ip netns exec "$ns" ip link set batg0 up
    for q in 1 2; do
        t="test=net ip=10.213.0.2/24 peer=10.213.0.1 seconds=5 queues=$q"
        timeout 60 "$vmm" --kernel "$guest" --cmdline "$t" --net socket="$work/n.sock",queues=2 \
            </dev/null >"$work/out" 2>&1 &
        vpid=$!
        sleep 1.5
        host_probe "$ns" 10.213.0.2
        wait $vpid
        check baton-vmm+baton-net-tap "$t" "$work/out"
    done
    t="test=net-cont ip=10.213.0.2/24"
    (sleep 4; printf q; sleep 3) | timeout 60 "$vmm" --kernel "$guest" --cmdline "$t" \
        --net socket="$work/n.sock" >"$work/out" 2>&1 &
    vpid=$!
    sleep 1.5
    ip netns exec "$ns" python3 -c '
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
ok = sum(1 for i in range(300) if (s.sendto(b"n%d" % i, ("10.213.0.2", 7)), s.recvfrom(100)[0])[1] == b"n%d" % i)
print("host: net-cont echo %d of 300" % ok)'
    wait $vpid
    check baton-vmm+baton-net-tap "$t (stopped by q)" "$work/out"
}

# io_check PLATFORM CMDLINE OUTPUT_FILE: like check, and both workloads must have advanced.
io_check() {
    if grep '^{"test"' "$3" | tail -1 | grep -q '"writes":0,\|"udp_echoed":0,'; then
        echo "FAIL $1 [$2] a workload made no progress: $(grep '^{"test"' "$3" | tail -1)"
        fails=$((fails + 1))
    else
        check "$1" "$2" "$3"
    fi
}

run_vmm_io() {
    [ -S "$work/b.sock" ] || start_baton_blk
    nsi=${ns}i
    ip netns add "$nsi" || return
    ip netns exec "$nsi" ip link set lo up
    ip netns exec "$nsi" "$nettap" --socket "$work/ni.sock" --tap batio0 >"$work/tapi.log" 2>&1 &
    pids="$pids $!"
    wait_socket "$work/ni.sock" || return
    ip netns exec "$nsi" ip addr add 10.213.2.1/24 dev batio0
    ip netns exec "$nsi" ip link set batio0 up
    for run in "2|test=io-cont ip=10.213.2.2/24 seconds=6|" "1|test=io-cont ip=10.213.2.2/24 seconds=0 depth=8|q"; do
        cpus=${run%%|*}; rest=${run#*|}; t=${rest%|*}; q=${rest##*|}
        (sleep 5; [ -n "$q" ] && printf q; sleep 2) | timeout 60 "$vmm" --kernel "$guest" --cpus "$cpus" \
            --cmdline "$t" --disk socket="$work/b.sock",queues=4 --net socket="$work/ni.sock" >"$work/out" 2>&1 &
        vpid=$!
        sleep 1.5
        ip netns exec "$nsi" python3 -c '
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
ok = n = 0; end = time.time() + 3
while time.time() < end:
    m = b"io%d" % n; n += 1; s.sendto(m, ("10.213.2.2", 7))
    try: ok += s.recvfrom(100)[0] == m
    except OSError: pass
print("host: io-cont echo %d of %d" % (ok, n))'
        wait $vpid
        io_check "baton-vmm+baton-blk+baton-net-tap cpus=$cpus" "$t${q:+ (stopped by q)}" "$work/out"
    done
    ip netns del "$nsi"
}

[ $# -eq 0 ] && set -- qemu qemu-tap qemu-vhost vmm vmm-qsd vmm-net vmm-io
for what in "$@"; do
    case $what in
        qemu) run_qemu ;;
        qemu-tap) run_qemu_tap ;;
        qemu-vhost) run_qemu_vhost ;;
        vmm) run_vmm ;;
        vmm-qsd) run_vmm_qsd ;;
        vmm-net) run_vmm_net ;;
        vmm-io) run_vmm_io ;;
        *) echo "unknown: $what"; exit 2 ;;
    esac
done
echo "failures: $fails"
[ $fails -eq 0 ]
