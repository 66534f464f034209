# tests/nested/lib.sh: helpers for rig scenarios, sourced in L1 (busybox sh) as /rig/lib.sh.
#
# L1 has /dev/kvm, baton's binaries on PATH (/rig/bin), the L2 kernel and initramfs in /rig/l2/,
# the files run.sh was given with --file in /rig/files/, and a tmpfs on /tmp and /dev/shm.
#   l2_boot NAME SCRIPT [baton-vmm options...]   boot L2 running SCRIPT (a file), wait for it
#   l2_start NAME SCRIPT [baton-vmm options...]  the same in the background (l2_wait ends it)
#   l2_wait NAME                                  wait for it, print its console and logs
#   l2_guest_status NAME                          what L2's script exited with
#   l2_kernel_clean NAME                          L2's kernel logged no warning, error, trace
#   check_l2 NAME                                 the checks every L2 run gets
#   blk_start NAME IMAGE [baton-blk options...]   serve IMAGE on /tmp/NAME.sock
#   net_start NAME TAP [baton-net-tap options...] serve TAP on /tmp/NAME.sock
#   service_stop NAME                             SIGTERM a back-end, wait for it
#   check CONDITION-TEXT COMMAND...               run COMMAND, print ok/FAIL, count failures
#   device_is API SOCKET N                        the device is connected after N reconnects
#   kill_service NAME                             SIGKILL a back-end, keep its log
#   lu_swap NAME N FROM                           live update NAME to a new VMM (N) from FROM
#   nvme_find / nvme_bind                         L0's NVMe controller ($NVME_DEV) / bound to
#                                                 vfio-pci
# Everything a helper starts logs to /tmp/NAME.log; L2's console is /tmp/NAME.console.

L2_KERNEL=/rig/l2/kernel
L2_INITRAMFS=/rig/l2/initramfs.gz
L2_MEMORY=${L2_MEMORY:-512M}
L2_TIMEOUT=${L2_TIMEOUT:-300}
FAILURES=0
export NO_COLOR=1 # baton's logs without colours, in the console log

# Polls until COMMAND succeeds; fails after SECONDS.
wait_for() {
    _deadline=$(($(date +%s) + $1)); shift
    until "$@"; do
        [ "$(date +%s)" -lt $_deadline ] || return 1
        sleep 0.1
    done
}

# l2_initramfs SCRIPT OUT: OUT is the L2 initramfs with SCRIPT as /baton/script.sh (a cpio of
# its own, uncompressed, in front of the compressed image: the kernel unpacks both), which the
# L2 /init runs. No length limit, unlike the kernel command line (2 KiB).
l2_initramfs() {
    rm -rf /tmp/.l2pack
    mkdir -p /tmp/.l2pack/baton
    cp "$1" /tmp/.l2pack/baton/script.sh
    (cd /tmp/.l2pack && find baton | cpio -o -H newc 2>/dev/null) >"$2"
    cat "$L2_INITRAMFS" >>"$2"
    rm -rf /tmp/.l2pack
}

# l2_start NAME SCRIPT [baton-vmm options...]: boots L2 (the L2 kernel, the L2 initramfs with
# SCRIPT, which its /init runs) on baton-vmm in the background; its pid in /tmp/NAME.pid
# ($L2_PID), its serial (stdout) in /tmp/NAME.serial.0, its stderr in /tmp/NAME.log.0. A VMM
# that takes the VM over in a live update writes /tmp/NAME.serial.N and /tmp/NAME.log.N (N =
# 1, 2, ...): l2_wait puts them together in that order.
l2_start() {
    _name=$1 _script=$2; shift 2
    l2_initramfs "$_script" "/tmp/$_name.initramfs"
    echo "$_name: baton-vmm $* (kernel $(cat /rig/l2/kernel-name))"
    rm -f "/tmp/$_name".serial.* "/tmp/$_name".log.*
    baton-vmm --kernel "$L2_KERNEL" --initramfs "/tmp/$_name.initramfs" \
        --memory "size=$L2_MEMORY" --serial stdio --name "$_name" \
        --cmdline "console=ttyS0 quiet panic=-1 ${L2_APPEND:-}" "$@" \
        </dev/null >"/tmp/$_name.serial.0" 2>"/tmp/$_name.log.0" &
    L2_PID=$!
    echo $L2_PID >"/tmp/$_name.pid"
}

# l2_console NAME: L2's console so far (every VMM's serial in order, CRs removed) in
# /tmp/NAME.console.
l2_console() {
    _n=0
    : >"/tmp/$1.console"
    while [ -f "/tmp/$1.serial.$_n" ]; do
        tr -d '\r' <"/tmp/$1.serial.$_n" >>"/tmp/$1.console"
        _n=$((_n + 1))
    done
}

# l2_wait NAME: waits for the VMM l2_start started, or the last one that took the VM over
# (its pid in /tmp/NAME.pid), killing it after $L2_TIMEOUT s; prints L2's console prefixed
# with "NAME| " and each VMM's stderr prefixed with "NAME: baton-vmm[N]: ". Returns the VMM's
# status.
l2_wait() {
    _name=$1
    _pid=$(cat "/tmp/$_name.pid")
    ( sleep "$L2_TIMEOUT"; kill -KILL "$_pid" 2>/dev/null ) &
    _watchdog=$!
    wait "$_pid"
    _status=$?
    kill "$_watchdog" 2>/dev/null
    l2_console "$_name"
    sed "s/^/$_name| /" "/tmp/$_name.console"
    _n=0
    while [ -f "/tmp/$_name.log.$_n" ]; do
        sed "s/^/$_name: baton-vmm[$_n]: /" "/tmp/$_name.log.$_n"
        _n=$((_n + 1))
    done
    echo "$_name: baton-vmm exited $_status"
    return $_status
}

# l2_boot NAME SCRIPT [baton-vmm options...]: l2_start, then l2_wait. Returns the VMM's status.
l2_boot() {
    l2_start "$@"
    l2_wait "$1"
}

# l2_guest_status NAME: the status L2's script exited with ("BATON-GUEST-EXIT N"), or "none".
l2_guest_status() {
    _s=$(sed -n 's/^BATON-GUEST-EXIT \([0-9]*\)$/\1/p' "/tmp/$1.console" | tail -1)
    echo "${_s:-none}"
}

# What counts as Linux complaining on L2's console: a kernel message of level 0-4 (the L2
# /init prints them as "dmesg: ..." after the script; with `quiet` the console shows those
# of level 0-3 as they happen), an oops or warning, an I/O error.
L2_COMPLAINT='^dmesg: |Call Trace|(^|[^A-Za-z])BUG[: ]|WARNING:|Oops|I/O error|blk_update_request|end_request|hung_task|soft lockup|rcu.*stall'

# Tolerated, but printed ("NAME: L2 tolerated: ..."): timing symptoms of running under TCG
# (and of a VM pause such as a live update's blackout), not errors. `hrtimer: interrupt took N
# ns` (printed once per boot, level 4) is the kernel noticing that its timer interrupt ran
# long: the vCPU thread was descheduled in L1, or the VM paused, in the middle of it.
L2_TOLERATED='hrtimer: interrupt took [0-9]+ ns'

# l2_kernel_clean NAME: true if L2's console has no complaint; prints them otherwise, as
# "NAME: L2 complains: ...".
l2_kernel_clean() {
    grep -E "$L2_COMPLAINT" "/tmp/$1.console" | grep -E "$L2_TOLERATED" | sed "s/^/$1: L2 tolerated: /"
    if grep -E "$L2_COMPLAINT" "/tmp/$1.console" | grep -vE "$L2_TOLERATED" >/tmp/.complaints; then
        sed "s/^/$1: L2 complains: /" /tmp/.complaints
        return 1
    fi
    grep -q '^BATON-GUEST-EXIT ' "/tmp/$1.console" || {
        echo "$1: L2 did not finish its script (no BATON-GUEST-EXIT): its kernel log is not known"
        return 1
    }
}

# check_l2 NAME: the checks of every L2 run: its script exited 0 and its kernel did not
# complain (no warning, error, call trace or I/O error on its console or in its dmesg).
check_l2() {
    check "$1: L2's script exits 0" test "$(l2_guest_status "$1")" = 0
    check "$1: L2's kernel logs no warning, error or call trace" l2_kernel_clean "$1"
}

# blk_start NAME IMAGE [options...]: baton-blk serving IMAGE on /tmp/NAME.sock, in the
# background; returns once the socket is there.
blk_start() {
    _name=$1 _image=$2; shift 2
    baton-blk --socket "/tmp/$_name.sock" --image "$_image" "$@" >"/tmp/$_name.log" 2>&1 &
    echo $! >"/tmp/$_name.pid"
    wait_for 30 test -S "/tmp/$_name.sock" || { cat "/tmp/$_name.log"; return 1; }
}

# net_start NAME TAP [options...]: baton-net-tap serving (creating) TAP on /tmp/NAME.sock.
net_start() {
    _name=$1 _tap=$2; shift 2
    baton-net-tap --socket "/tmp/$_name.sock" --tap "$_tap" "$@" >"/tmp/$_name.log" 2>&1 &
    echo $! >"/tmp/$_name.pid"
    # The socket of a SIGKILLed predecessor may still be there, and so may its TAP for a
    # moment (the kernel releases a killed process's io_uring, which holds its TAP queue, from
    # a worker, after the process is gone): wait for this one's own word that it serves.
    wait_for 30 grep -q "serving tap=" "/tmp/$_name.log" || { cat "/tmp/$_name.log"; return 1; }
    wait_for 30 test -S "/tmp/$_name.sock" || { cat "/tmp/$_name.log"; return 1; }
    wait_for 30 test -e "/sys/class/net/$_tap" || { cat "/tmp/$_name.log"; return 1; }
}

# service_stop NAME: SIGTERM a back-end started above and wait for it; prints its log.
service_stop() {
    _pid=$(cat "/tmp/$1.pid")
    kill -TERM "$_pid" 2>/dev/null
    wait "$_pid"
    _status=$?
    sed "s/^/$1: /" "/tmp/$1.log"
    echo "$1: exited $_status"
    return $_status
}

# check TEXT COMMAND...: runs COMMAND; prints "ok: TEXT" or "FAIL: TEXT" and counts failures
# (a scenario ends with `exit $FAILURES`); returns COMMAND's success.
check() {
    _text=$1; shift
    if "$@"; then
        echo "ok: $_text"
    else
        echo "FAIL: $_text"
        FAILURES=$((FAILURES + 1))
        return 1
    fi
}

# --- The load scenarios (live-update, restart): L2 under disk and network load ---------------
# L2 (eth0 10.0.2.2/24, L1 at 10.0.2.1 on tap0) runs, until L1 says stop (a line on TCP port
# 6000 of L2: load_stop):
# - a writer: numbered 4 KiB blocks ("blk B seq N", right-aligned, newline-terminated; block
#   B = 16 + N mod 1024) written with O_DIRECT and an fsync each, each read back (O_DIRECT) and
#   compared; reports "writer: N writes, W write errors, V verify errors";
# - a clock watcher: /proc/uptime and `date +%s` every 0.1 s, neither may go back; reports
#   "clock: S samples, longest gap G cs" (and "clock: ... went back ..." lines);
# - pings to L1 every 0.2 s; reports busybox ping's statistics;
# - with LOAD_STREAM=1, a TCP stream to L1's port 5003: `seq` in chunks of 1000 numbers every
#   0.1 s (chunk C: C*1000+1 .. C*1000+1000); reports "stream: C chunks, nc exited S".
# It exits 0 if no write, verify, clock or stream error happened.
LOAD_BLOCKS=1024

# load_l2_script FILE STREAM [DISK]: writes L2's script (STREAM: 1 for the TCP stream, 0
# without; DISK: the block device the writer writes, /dev/vda by default).
load_l2_script() {
    echo "LOAD_STREAM=$2 LOAD_BLOCKS=$LOAD_BLOCKS LOAD_DISK=${3:-/dev/vda}" >"$1"
    cat >>"$1" <<'L2'
for i in $(seq 1 300); do [ -b $LOAD_DISK ] && break; sleep 0.1; done
ip addr add 10.0.2.2/24 dev eth0
ip link set eth0 up
ping -c 1 -W 30 10.0.2.1 >/dev/null || echo "load: no answer from L1 before the start"
mkfifo /tmp/hold
nc -l -p 6000 </tmp/hold >/tmp/stop &
exec 3>/tmp/hold
running() { [ ! -s /tmp/stop ]; }
(
    u=$(cut -d' ' -f1 /proc/uptime)
    prev=$((${u%.*} * 100 + 1${u#*.} - 100)) prevd=$(date +%s) n=0 gap=0
    while running; do
        u=$(cut -d' ' -f1 /proc/uptime)
        c=$((${u%.*} * 100 + 1${u#*.} - 100)) d=$(date +%s)
        [ $c -ge $prev ] || echo "clock: uptime went back from $prev to $c cs"
        [ $d -ge $prevd ] || echo "clock: date went back from $prevd to $d s"
        [ $((c - prev)) -le $gap ] || gap=$((c - prev))
        prev=$c prevd=$d n=$((n + 1))
        sleep 0.1
    done
    echo "clock: $n samples, longest gap $gap cs"
) &
clock=$!
(
    n=0 werr=0 verr=0
    while running; do
        b=$((16 + n % LOAD_BLOCKS))
        printf '%4095s\n' "blk $b seq $n" >/tmp/blk
        if ! dd if=/tmp/blk of=$LOAD_DISK bs=4096 seek=$b count=1 oflag=direct conv=notrunc,fsync \
            2>/tmp/dd.err; then
            werr=$((werr + 1))
            echo "writer: writing block $b (seq $n) failed: $(cat /tmp/dd.err)"
        fi
        if ! dd if=$LOAD_DISK bs=4096 skip=$b count=1 iflag=direct 2>/dev/null | cmp -s - /tmp/blk; then
            verr=$((verr + 1))
            echo "writer: block $b (seq $n) reads back wrong"
        fi
        n=$((n + 1))
        [ $((n % 20)) != 0 ] || echo "writer: $n so far"
    done
    echo "writer: $n writes, $werr write errors, $verr verify errors"
    [ $werr = 0 ] && [ $verr = 0 ]
) &
writer=$!
ping -i 0.2 10.0.2.1 >/tmp/ping.log 2>&1 &
pinger=$!
if [ "$LOAD_STREAM" = 1 ]; then
    (
        (
            i=0
            while running; do
                seq $((i * 1000 + 1)) $((i * 1000 + 1000))
                i=$((i + 1))
                sleep 0.1
            done
            echo $i >/tmp/chunks
        ) | nc 10.0.2.1 5003
        s=$?
        echo "stream: $(cat /tmp/chunks) chunks, nc exited $s"
    ) &
    stream=$!
fi
echo "load: running"
while running; do sleep 0.2; done
echo "load: stopping"
status=0
wait $writer || status=1
wait $clock
kill -INT $pinger
wait $pinger
sed -n 's/^\(.*packets transmitted.*\)/ping: \1/p' /tmp/ping.log
if [ "$LOAD_STREAM" = 1 ]; then
    wait $stream
fi
sync
exit $status
L2
}

# tap_up: gives tap0 (created by baton-net-tap) L1's address and a fixed MAC: a TAP that
# baton-net-tap creates again after a restart then looks the same to L2 (its ARP entry stays
# right, as with a persistent TAP).
tap_up() {
    ip link set tap0 address 02:00:0a:00:02:01
    ip addr add 10.0.2.1/24 dev tap0
    ip link set tap0 up
}

# load_l1_start STREAM: L1's side, once baton-net-tap has created tap0: its address, and with
# STREAM=1 the listener that keeps the TCP stream in /tmp/stream.bin (pid in $LOAD_NC).
load_l1_start() {
    tap_up
    if [ "$1" = 1 ]; then
        mkfifo /tmp/stream.hold
        nc -l -p 5003 </tmp/stream.hold >/tmp/stream.bin &
        LOAD_NC=$!
        exec 5>/tmp/stream.hold
    fi
}

# load_running NAME: waits until L2 NAME says its load runs.
load_running() {
    wait_for 240 grep -q '^load: running' "/tmp/$1.serial.0"
}

# load_stop: tells L2 to stop (retried: L2's listener may be busy starting).
load_stop() {
    for _i in 1 2 3 4 5 6 7 8 9 10; do
        echo stop | timeout 10 nc 10.0.2.2 6000 && return 0
        sleep 1
    done
    return 1
}

# file_size FILE
file_size() { stat -c %s "$1" 2>/dev/null || echo 0; }

# stream_grows SECONDS: the TCP stream from L2 grows within SECONDS.
stream_grows() {
    _from=$(file_size /tmp/stream.bin)
    wait_for "$1" sh -c "[ \$(stat -c %s /tmp/stream.bin) -gt $_from ]"
}

# writer_grows NAME SECONDS: L2's writer reports progress within SECONDS (a new "writer: N so
# far" line on the console of the VMM that runs it now, its serial file $2).
writer_grows() {
    _from=$(grep -c '^writer: .* so far' "$1")
    wait_for "$2" sh -c "[ \$(grep -c '^writer: .* so far' '$1') -gt $_from ]"
}

# load_verify_image IMAGE NAME: every block L2's writer wrote (its count from NAME's console)
# holds the last number written to it.
load_verify_image() {
    _n=$(sed -n 's/^writer: \([0-9]*\) writes,.*/\1/p' "/tmp/$2.console")
    [ -n "$_n" ] && [ "$_n" -gt 0 ] || { echo "no writer count on the console"; return 1; }
    _m=$_n
    [ "$_m" -le $LOAD_BLOCKS ] || _m=$LOAD_BLOCKS
    _i=0
    while [ $_i -lt $_m ]; do
        printf '%4095s\n' "blk $((16 + _i)) seq $((_i + LOAD_BLOCKS * ((_n - 1 - _i) / LOAD_BLOCKS)))"
        _i=$((_i + 1))
    done >/tmp/expected.img
    _want=$(md5sum </tmp/expected.img)
    _got=$(dd if="$1" bs=4096 skip=16 count=$_m 2>/dev/null | md5sum)
    echo "image: $_m blocks after $_n writes: $_got (want $_want)"
    [ "$_want" = "$_got" ]
}

# load_verify_stream NAME: /tmp/stream.bin is exactly the chunks L2 sent.
load_verify_stream() {
    _c=$(sed -n 's/^stream: \([0-9]*\) chunks, nc exited 0$/\1/p' "/tmp/$1.console")
    [ -n "$_c" ] || { echo "L2's stream did not end well: $(grep '^stream:' "/tmp/$1.console")"; return 1; }
    _want=$(seq 1 $((_c * 1000)) | md5sum)
    _got=$(md5sum </tmp/stream.bin)
    echo "stream: $_c chunks, $(file_size /tmp/stream.bin) bytes: $_got (want $_want)"
    [ "$_want" = "$_got" ]
}

# load_checks NAME: the checks of a load run on L2's console.
load_checks() {
    check "$1: L2's writer had no write error and no verify error" \
        grep -q '^writer: [0-9]* writes, 0 write errors, 0 verify errors' "/tmp/$1.console"
    check "$1: L2's clocks never went back" sh -c "! grep 'went back' /tmp/$1.console"
    check "$1: L2's clock watcher ran to the end" grep -q '^clock: [0-9]* samples' "/tmp/$1.console"
}

# device_is API SOCKET N: vm.info (through the API socket API) shows the device on SOCKET
# connected after N reconnects.
device_is() {
    batonctl --api-socket "$1" info | tr -d ' \n' |
        grep -o "{[^{}]*\"socket\":\"$2\"[^{}]*}" >/tmp/device.json || return 1
    grep -q '"backend":"connected"' /tmp/device.json && grep -q "\"reconnects\":$3[,}]" /tmp/device.json
}

# kill_service NAME: SIGKILLs a back-end started by blk_start or net_start; keeps its log.
kill_service() {
    _pid=$(cat /tmp/$1.pid)
    kill -KILL "$_pid"
    wait "$_pid"
    cat /tmp/$1.log >>/tmp/$1.all.log
    echo "--- SIGKILLed" >>/tmp/$1.all.log
}

# lu_swap NAME N FROM: a live update of VM NAME from the VMM whose API is /tmp/NAME.api.FROM
# to a new one (`baton-vmm --incoming /tmp/NAME.in.N`, its serial /tmp/NAME.serial.N, its log
# /tmp/NAME.log.N, its API /tmp/NAME.api.N); batonctl's report in /tmp/NAME.report.N. Sets
# LU_RC (batonctl's status) and LU_OLD_RC (the old VMM's exit status once it is gone). On
# success /tmp/NAME.pid names the new VMM; on failure the new VMM is killed and the old one
# (which rolled back) stays.
lu_swap() {
    _name=$1 _n=$2 _from=$3
    _old=$(cat "/tmp/$_name.pid")
    baton-vmm --incoming "/tmp/$_name.in.$_n" --serial stdio --api-socket "/tmp/$_name.api.$_n" \
        </dev/null >"/tmp/$_name.serial.$_n" 2>"/tmp/$_name.log.$_n" &
    _new=$!
    wait_for 30 test -S "/tmp/$_name.in.$_n"
    timeout 120 batonctl --api-socket "/tmp/$_name.api.$_from" live-update "/tmp/$_name.in.$_n" \
        >"/tmp/$_name.report.$_n" 2>&1
    LU_RC=$? LU_OLD_RC=
    if [ $LU_RC = 0 ]; then
        wait "$_old"
        LU_OLD_RC=$?
        echo $_new >"/tmp/$_name.pid"
    else
        kill -KILL $_new 2>/dev/null
        wait $_new 2>/dev/null
    fi
}

# nvme_find: $NVME_DEV is the sysfs path of the NVMe controller L0 gave L1 (QEMU's nvme,
# 1b36:0010), with an IOMMU group; fails (a check) otherwise.
nvme_find() {
    NVME_DEV=
    for _d in /sys/bus/pci/devices/*; do
        if [ "$(cat "$_d/vendor")" = 0x1b36 ] && [ "$(cat "$_d/device")" = 0x0010 ]; then
            NVME_DEV=$_d
        fi
    done
    check "L0 gave L1 an NVMe controller" test -n "$NVME_DEV" || return 1
    echo "nvme: $NVME_DEV, driver $(basename "$(readlink "$NVME_DEV/driver" 2>/dev/null)" 2>/dev/null), IOMMU group $(basename "$(readlink "$NVME_DEV/iommu_group" 2>/dev/null)" 2>/dev/null)"
    check "the NVMe controller has an IOMMU group (intel_iommu=on)" test -e "$NVME_DEV/iommu_group"
}

# nvme_bind: binds $NVME_DEV to vfio-pci and waits for its /dev/vfio/GROUP.
nvme_bind() {
    _bdf=$(basename "$NVME_DEV")
    echo vfio-pci >"$NVME_DEV/driver_override"
    [ -e "$NVME_DEV/driver" ] && echo "$_bdf" >"$NVME_DEV/driver/unbind"
    echo "$_bdf" >/sys/bus/pci/drivers_probe
    _group=$(basename "$(readlink "$NVME_DEV/iommu_group")")
    check "the NVMe controller is bound to vfio-pci" \
        test "$(basename "$(readlink "$NVME_DEV/driver")")" = vfio-pci || return 1
    check "/dev/vfio/$_group appears" wait_for 10 test -e "/dev/vfio/$_group"
}
