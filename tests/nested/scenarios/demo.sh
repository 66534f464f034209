# Scenario demo [UPDATES]: ./demo.sh's scenario with Linux as the guest (`./demo.sh --linux`,
# tests/nested/demo-linux.sh). L1 serves a 16 MiB image with baton-blk and a TAP with
# baton-net-tap, both dropping to uid 65534 (--user); L2 Linux (2 vCPUs) boots on baton-vmm
# (dropping to 65534 with a kvm group, --user) and runs lib.sh's load (verified O_DIRECT block
# writes with fsyncs, a clock watcher, pings to L1 every 0.2 s, a TCP stream to L1) while L1
# pings L2 every 0.2 s (the demo's echo stream: lost_packets... count its unanswered requests:
# all, during the live updates, after the baton-net-tap restart; not while tap0 is gone). Under that load L1
# swaps the VMM UPDATES times (default 3; each new VMM started as 65534:kvm), then SIGKILLs and restarts baton-blk, then baton-net-tap, once each; stops the load, verifies the
# image and the stream from L1. Prints checks as the other scenarios do and, last, one JSON line
# with ./demo.sh's fields where they make sense (plus "guest":"linux" and "timings"); a field
# not measured is null and a failure. Exits with the number of failed checks.
. /rig/lib.sh
updates=${1:-3}
name=demo
REASONS=
JSON=

now_ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }
step() { echo "== $*"; }
# dcheck TEXT COMMAND...: lib.sh's check, remembering the failed ones for "reason".
dcheck() {
    _before=$FAILURES
    check "$@"
    [ $FAILURES = $_before ] || REASONS="$REASONS${REASONS:+; }$1"
}
# field NAME VALUE: a JSON field (VALUE: JSON text); empty: null, and a failure.
field() {
    if [ -z "$2" ]; then
        JSON="$JSON,\"$1\":null"
        FAILURES=$((FAILURES + 1))
        REASONS="$REASONS${REASONS:+; }not measured: $1"
    else
        JSON="$JSON,\"$1\":$2"
    fi
}
bool() { if "$@" >&2; then echo true; else echo false; fi; } # what COMMAND prints: stderr
uid_of() { awk '/^Uid:/ { print $2 }' "/proc/$1/status" 2>/dev/null; }
UIDS=
note_uid() { UIDS="$UIDS $1=$(uid_of "$2")"; }
# L1's pings of L2, in segments (/tmp/l1ping.SEG.log, busybox ping's lines "... seq=N ttl=...
# [(DUP!)]"): tap0 goes away with a SIGKILLed baton-net-tap (busybox cannot make the multi-queue
# vnet_hdr TAP persistent), and busybox ping exits when it cannot send, so L1's pinger is
# stopped before that restart and started again (segment 2) once tap0 is back.
PSEG=0
l1ping_start() {
    PSEG=$((PSEG + 1))
    ping -i 0.2 10.0.2.2 >/tmp/l1ping.$PSEG.log 2>&1 &
    L1PING=$!
}
l1ping_stop() { kill -INT $L1PING; wait $L1PING; }
# ping_last [SEG]: the last seq answered in segment SEG (default: the current one; -1: none).
ping_last() {
    sed -n 's/.* seq=\([0-9]*\) .*/\1/p' /tmp/l1ping.${1:-$PSEG}.log | sort -n | tail -1 | grep . || echo -1
}
# pinged_beyond SEQ: an echo request after SEQ was answered.
pinged_beyond() { [ "$(ping_last)" -gt "$1" ]; }
# ping_lost SEG FROM TO: "SENT ANSWERED LOST DUPLICATES" for the echo requests of seq FROM+1 ..
# TO of segment SEG (all sent: TO was answered; FROM -1: from the first); nothing if unknown.
ping_lost() {
    [ -n "$2" ] && [ -n "$3" ] && [ "$3" -ge 0 ] || return 0
    awk -v a="$2" -v b="$3" '
        / seq=/ { s = $0; sub(/.* seq=/, "", s); sub(/ .*/, "", s); s += 0
                  if (s > a && s <= b) { if (seen[s]++) dup++; else got++ } }
        END { printf "%d %d %d %d\n", b - a, got, b - a - got, dup }' /tmp/l1ping.$1.log
}
# ping_sum: ping_lost over whole segments, added up.
ping_sum() {
    _k=1
    while [ $_k -le $PSEG ]; do
        ping_lost $_k -1 "$(ping_last $_k)"
        _k=$((_k + 1))
    done | awk 'NF == 4 { s += $1; g += $2; l += $3; d += $4; n++ } END { if (n) print s, g, l, d }'
}
# reconnects SOCKET: the current VMM's reconnect count of the device on SOCKET (vm.info).
reconnects() {
    batonctl --api-socket "$API" info | tr -d ' \n' |
        grep -o "{[^{}]*\"socket\":\"$1\"[^{}]*}" | grep -o '"reconnects":[0-9]*' | cut -d: -f2
}

# Unprivileged: uid 65534 (nobody) for the back-ends and the VMMs, /dev/kvm through group 36.
mkdir -p /etc
echo 'root:x:0:0:root:/:/bin/sh' >/etc/passwd
echo 'nobody:x:65534:65534:nobody:/:/bin/sh' >>/etc/passwd
printf 'root:x:0:\nkvm:x:36:nobody\nnogroup:x:65534:\n' >/etc/group
chgrp 36 /dev/kvm && chmod 660 /dev/kvm

step "starting baton-blk (16 MiB image) and baton-net-tap (tap0), both as uid 65534"
dd if=/dev/zero of=/tmp/disk.img bs=1M count=16 2>/dev/null
blk_start blk0 /tmp/disk.img --user 65534 || exit 1
net_start net0 tap0 --user 65534 || exit 1
load_l1_start 1
load_l2_script /tmp/l2.sh 1

step "booting Linux on baton-vmm: 2 vCPUs, $L2_MEMORY, one disk, one NIC (as 65534:36)"
API=/tmp/$name.api.0
t0=$(now_ms)
l2_start $name /tmp/l2.sh --cpus 2 --api-socket $API --user 65534:36 --allow-uid 0 \
    --disk socket=/tmp/blk0.sock --net socket=/tmp/net0.sock,mac=52:54:00:12:34:56
ready=false boot_ms=
if load_running $name; then
    ready=true
    boot_ms=$(($(now_ms) - t0))
    echo "   L2's load runs ${boot_ms} ms (L1 uptime) after baton-vmm was started"
fi
field guest_ready $ready
field boot_ms "$boot_ms"
dcheck "L2 boots and its load starts" $ready
if [ $ready = false ]; then
    kill $L2_PID
    l2_wait $name
else
    note_uid baton-vmm "$L2_PID"
    note_uid baton-blk "$(cat /tmp/blk0.pid)"
    note_uid baton-net-tap "$(cat /tmp/net0.pid)"
    dcheck "the TCP stream from L2 flows" stream_grows 60
    # The echo stream of the demo: L1 pings L2 every 0.2 s (L2's own pings to L1 go on too).
    l1ping_start
    dcheck "L2 answers L1's pings" wait_for 30 pinged_beyond -1
    lu_from=$(ping_last)

    blackouts=
    done_updates=0
    cur=0
    for n in $(seq 1 "$updates"); do
        old_pid=$(cat /tmp/$name.pid)
        # A new VMM as 65534:36 (busybox su: the user's groups from /etc/group).
        su -s /bin/sh nobody -c "exec baton-vmm --incoming /tmp/$name.in.$n --serial stdio \
            --api-socket /tmp/$name.api.$n --allow-uid 0" \
            </dev/null >/tmp/$name.serial.$n 2>/tmp/$name.log.$n &
        new_pid=$!
        wait_for 30 test -S /tmp/$name.in.$n
        timeout 120 batonctl --api-socket /tmp/$name.api.$cur live-update /tmp/$name.in.$n \
            >/tmp/$name.report.$n 2>&1
        rc=$?
        blackout=$(sed -n 's/.*"blackout_us":\([0-9.]*\).*/\1/p' /tmp/$name.report.$n)
        [ $rc = 0 ] || sed 's/^/  report: /' /tmp/$name.report.$n
        dcheck "live update $n: batonctl live-update exits 0" test $rc = 0
        wait $old_pid
        code=$?
        echo "== live update $n: old baton-vmm (pid $old_pid) exited $code; blackout ${blackout:-?} us; new pid $new_pid"
        dcheck "live update $n: the old baton-vmm exits 0" test $code = 0
        [ $rc = 0 ] || break
        echo $new_pid >/tmp/$name.pid
        note_uid "baton-vmm-$n" "$new_pid"
        cur=$n
        API=/tmp/$name.api.$n
        done_updates=$n
        [ -z "$blackout" ] || blackouts="$blackouts $blackout"
        dcheck "live update $n: the TCP stream goes on" stream_grows 60
        dcheck "live update $n: the writer goes on" writer_grows /tmp/$name.serial.$n 60
    done
    field live_updates $done_updates
    dcheck "$updates live updates went through" test $done_updates = "$updates"
    lu_to=$(ping_last)
    # Nearest rank, as baton_tests::boot::percentile, in ms.
    pct() {
        echo $blackouts | tr ' ' '\n' | sort -n | awk -v p=$1 '
            { v[NR] = $1 } END { if (NR == 0) exit; for (i = 1; i <= NR; i++) if (i >= p / 100 * NR) break;
            if (i > NR) i = NR; printf "%.2f\n", v[i] / 1000 }'
    }
    field blackout_ms_p50 "$(pct 50)"
    field blackout_ms_p99 "$(pct 99)"
    field blackout_ms_max "$(pct 100)"

    step "restarting baton-blk (SIGKILL, then start again on the same socket)"
    kill_service blk0
    blk_start blk0 /tmp/disk.img --user 65534
    dcheck "baton-vmm reconnects baton-blk" wait_for 60 device_is "$API" /tmp/blk0.sock 1
    note_uid baton-blk-restarted "$(cat /tmp/blk0.pid)" # once it serves: privileges dropped
    dcheck "L2's writer goes on after the baton-blk restart" writer_grows /tmp/$name.serial.$cur 60
    l1ping_stop
    step "restarting baton-net-tap (SIGKILL, then start again: it creates tap0 again)"
    kill_service net0
    net_start net0 tap0 --user 65534
    tap_up
    l1ping_start
    dcheck "baton-vmm reconnects baton-net-tap" wait_for 60 device_is "$API" /tmp/net0.sock 1
    note_uid baton-net-tap-restarted "$(cat /tmp/net0.pid)"
    dcheck "the TCP stream goes on after the baton-net-tap restart" stream_grows 60
    dcheck "L2 answers L1's pings after the baton-net-tap restart" \
        wait_for 30 pinged_beyond -1
    net_to=$(ping_last)
    r_blk=$(reconnects /tmp/blk0.sock) r_net=$(reconnects /tmp/net0.sock)
    echo "   vm.info reconnects: disk ${r_blk:-?}, NIC ${r_net:-?}"
    restarts=
    [ -z "$r_blk" ] || [ -z "$r_net" ] || restarts=$((r_blk + r_net))
    field backend_restarts "$restarts"
    dcheck "each device reconnected exactly once" test "$r_blk,$r_net" = 1,1

    echo "   running as (uid):$UIDS"
    unpriv=true
    for u in $UIDS; do
        case ${u#*=} in '' | 0) unpriv=false ;; esac
    done
    field unprivileged $unpriv
    dcheck "no VMM or back-end ran as root" $unpriv

    step "stopping: L1's pings, L2's load, then Linux (L2's script ends, it powers off)"
    l1ping_stop
    dcheck "L2 is told to stop" load_stop
    l2_wait $name
    dcheck "the last baton-vmm exits 0" test $? = 0
fi

writer=$(sed -n 's/^writer: \([0-9]*\) writes, \([0-9]*\) write errors, \([0-9]*\) verify errors$/\1 \2 \3/p' \
    /tmp/$name.console | tail -1)
set -- $writer
guest_status=$(l2_guest_status $name)
field guest_test_passed "$(bool test "$guest_status" = 0)"
dcheck "L2's script exits 0" test "$guest_status" = 0
dcheck "L2's kernel logs no warning, error or call trace" l2_kernel_clean $name
field io_errors "$([ $# = 3 ] && echo $(($2 + $3)))"
field disk_writes_verified "$([ $# = 3 ] && echo $(($1 - $3)))"
dcheck "L2's writer had no write error and no verify error" test "${2:-x},${3:-x}" = 0,0
dcheck "L2's clocks never went back" sh -c "! grep 'went back' /tmp/$name.console"
# busybox ping: "N packets transmitted, M packets received[, D duplicates], P% packet loss"
echo "   L2 -> L1 $(grep '^ping: .*packets transmitted' /tmp/$name.console | tail -1)"
for k in $(seq 1 $PSEG); do echo "   L1 -> L2 ping ($k): $(grep 'packets transmitted' /tmp/l1ping.$k.log)"; done
# SENT ANSWERED LOST DUPLICATES, over each segment's seqs 0 .. its last answered one.
set -- $(ping_sum)
field pings_sent "${1:-}"
field pings_answered "${2:-}"
field lost_packets "${3:-}"
field duplicate_packets "${4:-}"
set -- $(ping_lost 1 "${lu_from:-}" "${lu_to:-}")
field lost_packets_during_live_updates "${3:-}"
# From the restart of the pinger (tap0 back) until L2 answers: what the restart cost L2's NIC.
set -- $(ping_lost 2 -1 "${net_to:-}")
field lost_packets_at_net_restart "${3:-}"
if [ -n "${LOAD_NC:-}" ]; then
    wait $LOAD_NC
    dcheck "L1's end of the TCP stream sees it end" test $? = 0
    exec 5>&-
fi
intact=$(bool load_verify_stream $name)
dcheck "the TCP stream arrived whole, in order" $intact
field tcp_stream_bytes "$([ $intact = true ] && file_size /tmp/stream.bin)"
field tcp_stream_intact $intact
service_stop net0
service_stop blk0
dcheck "baton-blk exits 0 on SIGTERM" test $? = 0
step "verifying the disk image from L1"
blocks=
if load_verify_image /tmp/disk.img $name; then
    blocks=$(($(wc -c </tmp/expected.img) / 4096))
fi
field disk_blocks_verified_host "$blocks"
dcheck "the image holds every block's last write" test -n "$blocks"

ok=false
[ $FAILURES = 0 ] && ok=true
reason=null
[ $ok = true ] || reason="\"$(echo "$REASONS" | sed 's/["\\]/\\&/g')\""
echo "{\"guest\":\"linux\",\"ok\":$ok,\"reason\":$reason$JSON,\"timings\":\"TCG nested rig (QEMU/TCG L0, KVM on emulated SVM in L1): boot_ms and blackouts are not comparable to ./demo.sh or hardware\"}"
exit $FAILURES
