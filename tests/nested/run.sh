#!/usr/bin/env bash
# tests/nested/run.sh [--file PATH | --disk IMAGE]... SCENARIO [ARG...]: runs tests/nested/scenarios/SCENARIO.sh
# (or SCENARIO itself, given as a path to a .sh file) in L1 of the nested KVM rig (QEMU/TCG → L1 Linux with a real /dev/kvm → baton-vmm → L2) and
# exits with the scenario's status.
#
# Builds the rig (cached: build.sh), then boots L0 with the L1 kernel and the L1 initramfs plus a
# per-run cpio: /rig/scenario.sh, /rig/lib.sh, /rig/args (ARGs, one a line), /rig/bin/ (baton-vmm,
# baton-blk, baton-net-tap, batonctl, with their shared libraries), /rig/l2/ (the L2 kernel and
# initramfs) and /rig/files/ (each --file); each --disk IMAGE is a raw virtio disk of L1 (/dev/vda,
# /dev/vdb, ... in order; written in place: give a copy). The console goes to stdout and to a log whose path is
# printed on stderr at the start and the end.
#
# Environment:
#   BATON_BIN_DIR       where baton's binaries are (default: target/release of this checkout)
#   BATON_L2_KERNEL     the L2 kernel: vmlinuz (the bzImage as Debian ships it, default) or
#                       vmlinux (the PVH ELF extracted from it)
#   BATON_RIG_TIMEOUT   wall-time limit of the L0 run in seconds (default 600): a hang fails
#   BATON_RIG_LOG       the console log's path (default: a new file under $TMPDIR)
#   BATON_RIG_QEMU_ARGS more QEMU options (e.g. "-device intel-iommu -device edu")
#   BATON_RIG_APPEND    more L1 kernel command line (e.g. intel_iommu=on)
# Options --qemu ARG (one more QEMU argument, repeatable) and --append TEXT (more L1 kernel
# command line) do the same from the command line (scenarios/vfio-nvme.sh shows a use).
# Exit status: the scenario's, or 124 if the limit was reached, 125 if the rig did not finish.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
files=()
disks=()
qemu_extra=()
append_extra=
while [[ ${1:-} == --file || ${1:-} == --disk || ${1:-} == --qemu || ${1:-} == --append ]]; do
    case $1 in
    --file) files+=("${2:?--file needs a path}") ;;
    --disk) disks+=("${2:?--disk needs a path}") ;;
    --qemu) qemu_extra+=("${2:?--qemu needs an argument}") ;;
    --append) append_extra+=" ${2:?--append needs text}" ;;
    esac
    shift 2
done
scenario=${1:?usage: run.sh [--file PATH | --disk IMAGE]... SCENARIO [ARG...]}
shift
script=$here/scenarios/$scenario.sh
if [[ $scenario == */* || $scenario == *.sh ]]; then # a scenario file of one's own
    script=$scenario
    scenario=$(basename "$scenario" .sh)
fi
[[ -f $script ]] || { echo "run.sh: no scenario $script" >&2; exit 2; }
bindir=${BATON_BIN_DIR:-$here/../../target/release}
l2_kernel=${BATON_L2_KERNEL:-vmlinuz}
command -v qemu-system-x86_64 >/dev/null || { echo "run.sh: qemu-system-x86_64 is not installed" >&2; exit 2; }

cache=${XDG_CACHE_HOME:-$HOME/.cache}/baton/nested
bash "$here/build.sh" "$cache"

stage=$(mktemp -d "${TMPDIR:-/tmp}/baton-nested-stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
rig=$stage/tree/rig
mkdir -p "$rig/bin" "$rig/l2" "$rig/files"
cp "$script" "$rig/scenario.sh"
cp "$here/lib.sh" "$rig/lib.sh"
echo "$scenario" >"$rig/name"
printf '%s\n' "$@" >"$rig/args"
[[ $# -gt 0 ]] || : >"$rig/args"
for f in ${files[@]+"${files[@]}"}; do cp "$f" "$rig/files/"; done
cp "$cache/$l2_kernel" "$rig/l2/kernel"
echo "$l2_kernel" >"$rig/l2/kernel-name"
cp "$cache/l2-initramfs.gz" "$rig/l2/initramfs.gz"
for b in baton-vmm baton-blk baton-net-tap batonctl; do
    [[ -x $bindir/$b ]] || { echo "run.sh: $bindir/$b is missing (cargo build --release)" >&2; exit 2; }
    strip -o "$rig/bin/$b" "$bindir/$b" 2>/dev/null || cp "$bindir/$b" "$rig/bin/$b"
    # Shared libraries (libc, libm, libgcc_s, ...) and the dynamic loader, at their own paths.
    for lib in $(ldd "$bindir/$b" | grep -o '/[^ ]*'); do
        mkdir -p "$stage/tree$(dirname "$lib")"
        cp -L "$lib" "$stage/tree$lib"
    done
done
(cd "$stage/tree" && find . | cpio -o -H newc 2>/dev/null) >"$stage/rig.cpio"
# Concatenated cpio archives make one initramfs: this run's files (uncompressed, so the
# cached compressed L1 image starts on a 4-byte boundary after them), then the L1 image.
cat "$stage/rig.cpio" "$cache/l1-initramfs.gz" >"$stage/initramfs"

# Each --disk: a raw virtio disk of L1 (/dev/vda, /dev/vdb, ... in order), written in place.
disk_args=()
for i in "${!disks[@]}"; do
    [[ -f ${disks[$i]} ]] || { echo "run.sh: no disk image ${disks[$i]}" >&2; exit 2; }
    disk_args+=(-drive "file=${disks[$i]},format=raw,if=none,id=disk$i,cache=unsafe"
        -device "virtio-blk-pci,drive=disk$i")
done
log=${BATON_RIG_LOG:-$(mktemp "${TMPDIR:-/tmp}/baton-nested-$scenario.XXXXXX.log")}
limit=${BATON_RIG_TIMEOUT:-600}
echo "run.sh: $scenario $* (L2 kernel $l2_kernel); console log: $log" >&2
start=$(date +%s)
set +e
# shellcheck disable=SC2086 # BATON_RIG_QEMU_ARGS is a list of options
timeout -k 5 "$limit" qemu-system-x86_64 -accel tcg -M q35 -cpu max -smp 1 -m 3G \
    -nographic -monitor none -serial stdio -no-reboot -nic none ${BATON_RIG_QEMU_ARGS:-} \
    ${disk_args[@]+"${disk_args[@]}"} ${qemu_extra[@]+"${qemu_extra[@]}"} \
    -kernel "$cache/vmlinuz" -initrd "$stage/initramfs" \
    -append "console=ttyS0 panic=-1 quiet ${BATON_RIG_APPEND:-}$append_extra" </dev/null 2>&1 | tee "$log"
qemu=${PIPESTATUS[0]}
set -e
status=$(tr -d '\r' <"$log" | sed -n 's/^BATON-RIG-EXIT \([0-9]*\)$/\1/p' | tail -1)
if [[ -z $status ]]; then
    if [[ $qemu == 124 ]]; then
        echo "run.sh: $scenario: no result within ${limit}s (BATON_RIG_TIMEOUT)" >&2
        status=124
    else
        echo "run.sh: $scenario: the rig stopped without a result (QEMU exited $qemu)" >&2
        status=125
    fi
fi
echo "run.sh: $scenario exited $status after $(($(date +%s) - start)) s; console log: $log" >&2
exit "$status"
