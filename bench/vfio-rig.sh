#!/usr/bin/env bash
# ./bench.sh vfio-rig: what a passed-through device adds to a live update's blackout, in the
# nested rig (tests/nested/: QEMU/TCG → L1 Linux with real KVM and VFIO → baton-vmm → L2 Linux).
# Two VMs that differ only by an NVMe controller passed through (scenarios/vfio-lu-bench.sh),
# each live-updated BATON_VFIO_SWAPS times (default 10): the median of the blackout and of each
# phase, with and without the device, one JSON line each, then one line with the VFIO phases.
# Everything runs under TCG (guest kernels emulated): RELATIVE figures only, never compare them
# with ./bench.sh live-update's. Needs what the rig needs (tests/nested/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
T=${CARGO_TARGET_DIR:-target}/release
if [[ ! -x $T/baton-vmm || ! -x $T/baton-blk || ! -x $T/baton-net-tap || ! -x $T/batonctl ]]; then
    cargo build --release --quiet -p baton-vmm -p baton-blk -p baton-net-tap -p baton-tools
fi
swaps=${BATON_VFIO_SWAPS:-10}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
truncate -s 64M "$dir/nvme.img"
out=$dir/console
BATON_RIG_TIMEOUT=${BATON_RIG_TIMEOUT:-1200} tests/nested/run.sh \
    --qemu -device --qemu intel-iommu,intremap=on \
    --qemu -drive --qemu "if=none,id=nv0,file=$dir/nvme.img,format=raw" \
    --qemu -device --qemu nvme,serial=baton,drive=nv0,msix-exclusive-bar=on \
    --append intel_iommu=on vfio-lu-bench "$swaps" >"$out" 2>"$dir/stderr" || {
    grep -E '^(ok|FAIL):' "$out" >&2 || true
    echo "bench/vfio-rig.sh: the rig run failed (log: $(tail -1 "$dir/stderr"))" >&2
    exit 1
}
python3 - "$out" "$swaps" <<'PY'
import json, statistics, sys
runs = {"with": [], "without": []}
for line in open(sys.argv[1], errors="replace"):
    line = line.strip().replace("\r", "")
    if line.startswith("bench: "):
        case, report = line[len("bench: "):].split(" ", 1)
        runs[case].append(json.loads(report))
med = {}
for case, reports in runs.items():
    if len(reports) != int(sys.argv[2]):
        sys.exit(f"bench/vfio-rig.sh: {len(reports)} reports for '{case}', expected {sys.argv[2]}")
    phases = {}
    for r in reports:
        for side in ("outgoing", "incoming"):
            for p in r[side]:
                phases.setdefault(p["name"], []).append(p["micros"])
    med[case] = {k: statistics.median(v) for k, v in phases.items()}
    print(json.dumps({
        "bench": "live-update-phases-rig", "device": f"{case} a passed-through NVMe",
        "unit": "us, median (TCG: relative only)", "swaps": len(reports),
        "blackout_us": statistics.median(r["blackout_us"] for r in reports),
        "phases": med[case]}))
vfio = {k: v for k, v in med["with"].items() if "vfio" in k}
print(json.dumps({"bench": "live-update-vfio-part-rig", "unit": "us, median (TCG: relative only)",
                  "vfio_phases": vfio}))
PY
