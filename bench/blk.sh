#!/usr/bin/env bash
# bench/blk.sh: baton-blk against qemu-storage-daemon's vhost-user-blk export, both driven by the
# same host-side driver (baton-vu-bench) in the same run, on two media:
#   tmpfs  an image in /dev/shm (page cache only);
#   disk   an image on the machine's real disk (the file system under $BATON_BENCH_DISK_DIR,
#          default /var/tmp), opened with O_DIRECT by both (baton-blk --direct, cache.direct=on).
# The peer runs as its documentation advises for speed: an iothread for the export
# (`--object iothread` + `iothread=` on the export; QEMU 10.0 exports take one iothread, so one
# serves every queue — a list per queue arrived after 10.0), and each aio mode the medium allows
# is tried on the headline case (4 KiB random read, QD 32, 1 queue); the better one is used for
# every case of that medium and printed in each line ("peer_config").
# Each number: a 1 s warm-up, then the median of 3 runs of BATON_BENCH_SECONDS (default 5).
# BATON_BENCH_MEDIA="disk" (or "tmpfs") runs one medium only.
# One JSON line per case:
#   {"bench":"blk-randread-4k","medium":"tmpfs","unit":"IOPS","ours":N,"peer":"qemu-storage-daemon",
#    "peer_value":N,"ratio":N,"qd":32,"queues":1,"ours_config":"...","peer_config":"..."}
# (ratio > 1 = baton better), then idle RSS; on the disk, the medium's own ceiling for the
# headline case (fio, io_uring, O_DIRECT: "device_ceiling"). Called by ./bench.sh (which builds
# in release).
set -euo pipefail
cd "$(dirname "$0")/.."
T=${CARGO_TARGET_DIR:-target}/release
BLK=$T/baton-blk
BENCH=$T/baton-vu-bench
if [[ ! -x $BLK || ! -x $BENCH ]]; then
    cargo build --release --quiet -p baton-blk -p baton-tools --bin baton-blk --bin baton-vu-bench
fi
command -v qemu-storage-daemon >/dev/null || { echo "bench/blk.sh: qemu-storage-daemon is not installed" >&2; exit 1; }
command -v fio >/dev/null || { echo "bench/blk.sh: fio is not installed (./bench.sh installs it)" >&2; exit 1; }
SECS=${BATON_BENCH_SECONDS:-5}
SIZE_MB=${BATON_BENCH_IMAGE_MB:-256}
DISK_DIR=${BATON_BENCH_DISK_DIR:-/var/tmp}
QSD_VERSION=$(qemu-storage-daemon --version | sed -n '1s/.*version \([0-9.]*\).*/\1/p')

shm=$(mktemp -d /dev/shm/baton-blk-bench.XXXXXX)
disk=$(mktemp -d "$DISK_DIR/baton-blk-bench.XXXXXX")
pids=()
stop_all() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pids=()
}
cleanup() {
    stop_all
    rm -rf "$shm" "$disk"
}
trap cleanup EXIT

wait_socket() { # PATH PID
    for _ in $(seq 1 500); do
        [[ -S $1 ]] && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.01
    done
    return 1
}

field() { sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p"; }

# measure SOCKET OP BS QD QUEUES -> "iops mbps", each the median of 3 runs after a warm-up.
measure() {
    "$BENCH" blk --socket "$1" --op "$2" --bs "$3" --qd "$4" --queues "$5" --seconds 1 >/dev/null
    local out runs=()
    for _ in 1 2 3; do
        out=$("$BENCH" blk --socket "$1" --op "$2" --bs "$3" --qd "$4" --queues "$5" --seconds "$SECS")
        runs+=("$(field iops <<<"$out") $(field mbps <<<"$out")")
    done
    printf '%s\n' "${runs[@]}" | sort -n -k1 | sed -n 2p
}

# start_ours MEDIUM IMAGE and start_peer MEDIUM IMAGE AIO DIRECT set SOCK and PID.
start_ours() {
    SOCK=$shm/ours-$1.sock
    local extra=()
    [[ $1 == disk ]] && extra=(--direct)
    RUST_LOG=warn "$BLK" --socket "$SOCK" --image "$2" --queues 2 "${extra[@]}" >/dev/null &
    PID=$!
    pids+=("$PID")
    wait_socket "$SOCK" "$PID" || { echo "bench/blk.sh: baton-blk did not start" >&2; exit 1; }
}
start_peer() {
    SOCK=$shm/peer-$1-$3.sock
    qemu-storage-daemon --object iothread,id=iot0 \
        --blockdev "driver=file,node-name=f0,filename=$2,aio=$3,cache.direct=$4" \
        --export "type=vhost-user-blk,id=e0,node-name=f0,iothread=iot0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=2" \
        >/dev/null 2>"$shm/peer.err" &
    PID=$!
    pids+=("$PID")
    wait_socket "$SOCK" "$PID"
}

emit() { # name medium unit ours peer qd queues ours_config peer_config
    awk -v n="$1" -v m="$2" -v u="$3" -v o="$4" -v p="$5" -v qd="$6" -v q="$7" -v oc="$8" -v pc="$9" 'BEGIN {
        r = (p > 0) ? o / p : 0;
        printf "{\"bench\":\"%s\",\"medium\":\"%s\",\"unit\":\"%s\",\"ours\":%s,\"peer\":\"qemu-storage-daemon\",\"peer_value\":%s,\"ratio\":%.3f,\"qd\":%d,\"queues\":%d,\"ours_config\":\"%s\",\"peer_config\":\"%s\"}\n", n, m, u, o, p, r, qd, q, oc, pc }'
}

rss() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }

for medium in ${BATON_BENCH_MEDIA:-tmpfs disk}; do
    if [[ $medium == tmpfs ]]; then
        dir=$shm
        aios=("io_uring off" "threads off" "native on")
        ours_config="baton-blk --queues 2 (io_uring engine)"
    else
        dir=$disk
        aios=("native on" "io_uring on")
        ours_config="baton-blk --queues 2 --direct (io_uring engine)"
    fi
    # Two images with the same random contents (reads are of real data, not holes), made the
    # same way: how a file was written changes how fast it reads (on this tmpfs a `cp` of a
    # file written by `dd bs=1M` reads 128 KiB blocks ~25 % faster than the original, whichever
    # back-end serves it), so both are copies of a third.
    dd if=/dev/urandom of="$dir/seed.img" bs=1M count="$SIZE_MB" status=none conv=fsync
    cp "$dir/seed.img" "$dir/ours.img"
    cp "$dir/seed.img" "$dir/peer.img"
    rm "$dir/seed.img"
    sync

    # The peer's best aio mode for this medium, on the headline case.
    best_aio="" best_iops=0
    for a in "${aios[@]}"; do
        read -r aio direct <<<"$a"
        if ! start_peer "$medium" "$dir/peer.img" "$aio" "$direct"; then
            echo "bench/blk.sh: qemu-storage-daemon $QSD_VERSION refuses aio=$aio,cache.direct=$direct on $medium: $(head -c 200 "$shm/peer.err")" >&2
            stop_all
            continue
        fi
        read -r iops _ < <(measure "$SOCK" randread 4096 32 1)
        echo "bench/blk.sh: $medium, qemu-storage-daemon aio=$aio,cache.direct=$direct: $iops IOPS (randread 4k QD 32, 1 queue)" >&2
        stop_all
        if awk -v a="$iops" -v b="$best_iops" 'BEGIN { exit !(a > b) }'; then
            best_iops=$iops
            best_aio=$a
        fi
    done
    [[ -n $best_aio ]] || { echo "bench/blk.sh: no qemu-storage-daemon configuration ran on $medium" >&2; exit 1; }
    read -r aio direct <<<"$best_aio"
    peer_config="qemu-storage-daemon $QSD_VERSION, --object iothread,id=iot0, export iothread=iot0,num-queues=2, blockdev aio=$aio,cache.direct=$direct"

    start_ours "$medium" "$dir/ours.img"
    ours=$SOCK ours_pid=$PID
    start_peer "$medium" "$dir/peer.img" "$aio" "$direct" || { echo "bench/blk.sh: qemu-storage-daemon did not start again" >&2; exit 1; }
    peer=$SOCK peer_pid=$PID
    cases=("randread 4096 32 1" "randread 4096 1 1" "randwrite 4096 32 1" "randread 4096 32 2")
    for c in "${cases[@]}"; do
        read -r op bs qd queues <<<"$c"
        read -r o_iops _ < <(measure "$ours" "$op" "$bs" "$qd" "$queues")
        read -r p_iops _ < <(measure "$peer" "$op" "$bs" "$qd" "$queues")
        emit "blk-$op-4k" "$medium" IOPS "$o_iops" "$p_iops" "$qd" "$queues" "$ours_config" "$peer_config"
    done
    read -r _ o_mbps < <(measure "$ours" read 131072 8 1)
    read -r _ p_mbps < <(measure "$peer" read 131072 8 1)
    emit "blk-seqread-128k" "$medium" MB/s "$o_mbps" "$p_mbps" 8 1 "$ours_config" "$peer_config"

    # Idle RSS after the runs (no front-end connected); lower is better, so ratio = peer / ours.
    o_rss=$(rss "$ours_pid")
    p_rss=$(rss "$peer_pid")
    awk -v m="$medium" -v o="$o_rss" -v p="$p_rss" 'BEGIN {
        printf "{\"bench\":\"blk-idle-rss\",\"medium\":\"%s\",\"unit\":\"MiB\",\"ours\":%s,\"peer\":\"qemu-storage-daemon\",\"peer_value\":%s,\"ratio\":%.3f,\"goal\":\"<= 10 MiB\"}\n", m, o, p, (o > 0) ? p / o : 0 }'
    stop_all
    if [[ $medium == disk ]]; then
        # What the medium itself gives the headline case, with no vhost-user in between: fio
        # with io_uring, O_DIRECT, one job, QD 32 on the same image (median of 3). Neither
        # back-end can beat it; with the peer near it, no back-end can be 1.3x faster here.
        fio_runs=()
        for _ in 1 2 3; do
            fio_runs+=("$(fio --name=ceiling --filename="$dir/ours.img" --ioengine=io_uring --direct=1 \
                --rw=randread --bs=4k --iodepth=32 --numjobs=1 --time_based --runtime="$SECS" \
                --output-format=json | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))')")
        done
        ceiling=$(printf '%s\n' "${fio_runs[@]}" | sort -n | sed -n 2p)
        printf '{"bench":"blk-randread-4k","medium":"disk","unit":"IOPS","device_ceiling":%s,"qd":32,"queues":1,"config":"fio %s, ioengine=io_uring, direct=1, randread 4k, iodepth=32, numjobs=1 (no vhost-user)"}\n' \
            "$ceiling" "$(fio --version)"
    fi
    rm -f "$dir/ours.img" "$dir/peer.img"
done
