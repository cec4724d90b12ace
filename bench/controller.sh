#!/usr/bin/env bash
# The controller under load: commit-to-armed latency (webhook and polling), and N
# simulated agents (the real agent library, deploying onto sparse files) converging
# through one `fleetwave serve` wave by wave. Usage: bench/controller.sh [HOSTS] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTS=${1:-10000}
THREADS=${2:-8}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release --locked --quiet --bin fleetwave --example swarm
WORK=$(mktemp -d /var/tmp/fleetwave-swarm.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
"$CARGO_TARGET_DIR/release/examples/swarm" --bin "$CARGO_TARGET_DIR/release/fleetwave" \
    --hosts "$HOSTS" --threads "$THREADS" --work "$WORK/run"
