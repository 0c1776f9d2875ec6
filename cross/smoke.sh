#!/usr/bin/env bash
# Runs a cross-compiled fieldgate image under qemu-user on this machine and checks that it
# really works: --version, --help, check-config on every shipped config, bad-config exit 64
# (tests/cli.rs), and a real run (tests/smoke.rs): start, accept local MQTT publishes, persist
# them, stop cleanly on SIGTERM, restart with the queue intact, deliver to a TLS cloud broker.
#
#   cross/build.sh --setup aarch64 && cross/smoke.sh aarch64
#
# The test harness itself is built for the host; only the gateway binary is emulated.
set -euo pipefail
cd "$(dirname "$0")/.."
t="${1:?usage: cross/smoke.sh aarch64|armv7|aarch64-musl}"
eval "$(cross/build.sh --env "$t" | sed 's/^/export /; s/=\(.*\)$/="\1"/')"
[ -x "$FIELDGATE_TEST_BIN" ] || { echo "no $FIELDGATE_TEST_BIN; run cross/build.sh $t first" >&2; exit 66; }
echo "== $t: $FIELDGATE_TEST_RUNNER $FIELDGATE_TEST_BIN"
$FIELDGATE_TEST_RUNNER "$FIELDGATE_TEST_BIN" --version
file -b "$FIELDGATE_TEST_BIN" 2>/dev/null || true
cargo test --locked --test cli --test smoke -- --test-threads 1
echo "== $t: smoke run passed under qemu"
