#!/usr/bin/env bash
# tests/nested/demo-linux.sh [UPDATES]: `./demo.sh --linux`: the demo's scenario with Linux as
# the guest, in the nested KVM rig (scenarios/demo.sh: baton-blk and baton-net-tap as uid 65534,
# L2 Linux with 2 vCPUs under verified disk writes, pings and a TCP stream, UPDATES live updates
# (default 3), each back-end SIGKILLed and restarted once, the image verified from L1).
# Prints the scenario's steps and checks (the whole console is in the log named on stderr) and,
# last, one JSON object: the demo's fields that make sense here, "guest":"linux", "timings"
# (TCG: not comparable), "rig_wall_s". A field not measured is null and "ok" false; the exit
# status is 1 when any check failed.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
log=${BATON_RIG_LOG:-$(mktemp "${TMPDIR:-/tmp}/baton-demo-linux.XXXXXX.log")}
start=$(date +%s)
echo "== the demo with Linux as the guest, in the nested KVM rig (everything under TCG: correctness, not timings)"
BATON_RIG_LOG=$log bash "$here/run.sh" demo "${1:-3}" |
    tr -d '\r' | grep --line-buffered -E '^(== |   |ok: |FAIL: |demo: L2 complains: )'
status=${PIPESTATUS[0]}
wall=$(($(date +%s) - start))
json=$(tr -d '\r' <"$log" | grep '^{"guest":"linux"' | tail -1)
if [[ -z $json ]]; then
    json=$(printf '{"guest":"linux","ok":false,"reason":"the rig gave no result (run.sh exited %s; log %s)"' "$status" "$log")
    for f in guest_ready boot_ms guest_test_passed io_errors disk_writes_verified \
        disk_blocks_verified_host pings_sent pings_answered lost_packets duplicate_packets \
        lost_packets_during_live_updates lost_packets_at_net_restart \
        tcp_stream_bytes tcp_stream_intact live_updates blackout_ms_p50 blackout_ms_p99 \
        blackout_ms_max backend_restarts unprivileged; do
        json="$json,\"$f\":null"
    done
    json="$json}"
fi
echo "== console log: $log; rig wall time ${wall} s"
echo "${json%\}},\"rig_wall_s\":$wall}"
[[ $status == 0 && $json == *'"ok":true'* ]] || exit 1
