#!/usr/bin/env bash
# Benchmark: TFTP read throughput, fleetwave against tftpd-hpa, same file, same client
# (atftp), same machine, on loopback. One 64 MiB file at each block size; MiB/s is the
# median of RUNS fetches. tftpd-hpa has no windowsize: both are compared at window 1,
# and fleetwave's window 16 is shown beside them.
# Usage: bench/tftp.sh [RUNS=3]   Needs root (tftpd-hpa), atftp and tftpd-hpa installed.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
for t in atftp in.tftpd; do command -v $t >/dev/null || { echo "bench/tftp.sh needs $t (apt-get install atftp tftpd-hpa)" >&2; exit 2; }; done
WORK=$(mktemp -d /tmp/fleetwave-tftp.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
mkdir -p "$WORK/root"
head -c $((64 << 20)) /dev/urandom > "$WORK/root/file.bin"
chmod -R a+rX "$WORK"

cargo build --release --quiet --example tftpd
target/release/examples/tftpd 127.0.0.1:16969 "$WORK/root" >/dev/null 2>&1 & PIDS+=($!)
in.tftpd --foreground --address 127.0.0.1:16970 --user root --secure "$WORK/root" & PIDS+=($!)
sleep 0.5

# Median MiB/s of fetching the file from PORT with the given atftp options.
rate() {
    local port=$1; shift
    local rates=()
    for _ in $(seq "$RUNS"); do
        rm -f "$WORK/out"
        local t0 t1
        t0=$(date +%s.%N)
        atftp "$@" -g -r file.bin -l "$WORK/out" 127.0.0.1 "$port" >/dev/null 2>&1 || true
        t1=$(date +%s.%N)
        if cmp -s "$WORK/out" "$WORK/root/file.bin"; then
            rates+=("$(python3 -c "print(64/($t1-$t0))")")
        else
            rates+=("0")
        fi
    done
    python3 -c "import statistics,sys; print(f'{statistics.median(map(float, sys.argv[1:])):.1f}')" "${rates[@]}"
}

echo "| block size | tftpd-hpa (MiB/s) | fleetwave (MiB/s) | fleetwave, windowsize 16 (MiB/s) |"
echo "|---|---|---|---|"
for b in 512 1432 8192 65464; do
    h=$(rate 16970 --option "blksize $b")
    f=$(rate 16969 --option "blksize $b")
    w=$(rate 16969 --option "blksize $b" --option "windowsize 16")
    echo "| $b | $h | $f | $w |"
done
echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); file 64 MiB; client atftp $(atftp --version 2>&1 | head -1 | awk '{print $1}'); loopback; 0 MiB/s marks a fetch that did not arrive intact"
