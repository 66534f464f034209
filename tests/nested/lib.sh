# tests/nested/lib.sh: helpers for rig scenarios, sourced in L1 (busybox sh) as /rig/lib.sh.
#
# L1 has /dev/kvm, baton's binaries on PATH (/rig/bin), the L2 kernel and initramfs in /rig/l2/,
# the files run.sh was given with --file in /rig/files/, and a tmpfs on /tmp and /dev/shm.
#   l2_boot NAME SCRIPT [baton-vmm options...]   boot L2 running SCRIPT (a file), wait for it
#   l2_guest_status NAME                          what L2's script exited with
#   blk_start NAME IMAGE [baton-blk options...]   serve IMAGE on /tmp/NAME.sock
#   net_start NAME TAP [baton-net-tap options...] serve TAP on /tmp/NAME.sock
#   service_stop NAME                             SIGTERM a back-end, wait for it
#   check CONDITION-TEXT COMMAND...               run COMMAND, print ok/FAIL, count failures
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

# l2_boot NAME SCRIPT [baton-vmm options...]: boots L2 (the L2 kernel and initramfs) on baton-vmm
# with SCRIPT passed base64 on the command line (`baton.script=`, the L2 initramfs runs it), and
# waits for the VMM to exit (killed after $L2_TIMEOUT s). L2's console (baton-vmm's serial on its
# stdout, CRs removed) goes to /tmp/NAME.console, printed prefixed with "NAME| "; baton-vmm's
# stderr to /tmp/NAME.log, printed prefixed with "NAME: baton-vmm: ". Returns baton-vmm's status.
l2_boot() {
    _name=$1 _script=$2; shift 2
    _b64=$(base64 "$_script" | tr -d '\n')
    echo "$_name: baton-vmm $* (kernel $(cat /rig/l2/kernel-name))"
    timeout -s KILL "$L2_TIMEOUT" baton-vmm --kernel "$L2_KERNEL" --initramfs "$L2_INITRAMFS" \
        --memory "size=$L2_MEMORY" --serial stdio --name "$_name" \
        --cmdline "console=ttyS0 quiet panic=-1 baton.script=$_b64" "$@" \
        </dev/null >"/tmp/$_name.serial" 2>"/tmp/$_name.log"
    _status=$?
    tr -d '\r' <"/tmp/$_name.serial" >"/tmp/$_name.console"
    sed "s/^/$_name| /" "/tmp/$_name.console"
    sed "s/^/$_name: baton-vmm: /" "/tmp/$_name.log"
    echo "$_name: baton-vmm exited $_status"
    return $_status
}

# l2_guest_status NAME: the status L2's script exited with ("BATON-GUEST-EXIT N"), or "none".
l2_guest_status() {
    _s=$(sed -n 's/^BATON-GUEST-EXIT \([0-9]*\)$/\1/p' "/tmp/$1.console" | tail -1)
    echo "${_s:-none}"
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
    wait_for 30 test -S "/tmp/$_name.sock" || { cat "/tmp/$_name.log"; return 1; }
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
# (a scenario ends with `exit $FAILURES`).
check() {
    _text=$1; shift
    if "$@"; then
        echo "ok: $_text"
    else
        echo "FAIL: $_text"
        FAILURES=$((FAILURES + 1))
    fi
}
