#!/usr/bin/env bash
# Installs what baton's tests need on a fresh Debian (bookworm) machine, then runs the whole suite.
# Run as root: it uses apt-get and creates TAP devices and network namespaces.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
setup_packages
setup_rust

echo "== building the test guest (x86_64-unknown-none)"
build_guest

echo "== building every binary (the integration tests start baton-vmm, batonctl, baton-blk, baton-net-tap)"
cargo build --workspace --release --bins

echo "== cargo test (unit, integration: real processes, sockets, QEMU, KVM)"
# A test that cannot run here fails, unless BATON_ALLOW_SKIP names its kind (kvm, root, net,
# qemu, systemd, odirect or all; see tests/src/harness.rs cannot_run). CI allows none.
if [[ -n ${CI:-} && -n ${BATON_ALLOW_SKIP:-} ]]; then
    echo "BATON_ALLOW_SKIP is set under CI: no skip is allowed there" >&2
    exit 1
fi
mkdir -p target
export BATON_SKIP_LOG=$PWD/target/skipped-tests.txt
rm -f "$BATON_SKIP_LOG"
log=target/test-output.txt
status=0
cargo test --workspace --release --no-fail-fast -- --test-threads=2 "$@" 2>&1 | tee "$log" || status=$?

echo "== fuzz smoke: every fuzz target over its seeds, findings replayed (./fuzz.sh --smoke)"
fuzz_status=0
./fuzz.sh --smoke || fuzz_status=$?

# The totals: passed counts tests that returned early because a skip was allowed.
read -r passed failed < <(awk '/^test result:/ { p += $4; f += $6 } END { print p + 0, f + 0 }' "$log")
skipped=0
[[ -f $BATON_SKIP_LOG ]] && skipped=$(wc -l <"$BATON_SKIP_LOG")
echo
echo "== summary: $((passed - skipped)) ran and passed, $skipped skipped, $failed failed"
if ((skipped)); then
    echo "skipped (allowed by BATON_ALLOW_SKIP=$BATON_ALLOW_SKIP):"
    sed 's/^/  /' "$BATON_SKIP_LOG"
fi
if ((status != 0 && failed == 0)); then
    echo "cargo test failed outside any test (a build error, or a test binary that crashed): see above"
fi
if ((fuzz_status != 0)); then
    echo "the fuzz smoke run failed (exit $fuzz_status): see above"
    ((status)) || status=$fuzz_status
fi
echo "tests: $((passed - skipped)) passed, $failed failed, $skipped skipped"
exit "$status"
