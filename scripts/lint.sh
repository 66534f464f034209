#!/usr/bin/env bash
# The gates CI runs before the tests: formatting, clippy with warnings denied and rustdoc with
# warnings denied, for the workspace and for the test guest (a workspace of its own).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
setup_rust
rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed | grep -q '^clippy' || rustup component add clippy

echo "== cargo fmt --check (workspace, test guest)"
cargo fmt --all --check
(cd tests/guest && cargo fmt --check)

echo "== cargo clippy -D warnings (workspace, test guest)"
cargo clippy --workspace --all-targets --release -- -D warnings
(cd tests/guest && cargo clippy --release -- -D warnings)

echo "== cargo doc, warnings denied (workspace, test guest)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --release --quiet
(cd tests/guest && RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --release --quiet)
