#!/usr/bin/env bash
# Benchmark: capture and deploy of one 2 GiB ext4 filesystem image holding 1.2 GB of
# files (half random, half text) and 200 MB of deleted files, fleetwave against
# partclone + zstd, same file, same machine, same run. Page cache dropped before each
# timed step. Prints wall time and stored size.
#   capture: fleetwave agent capture   vs  partclone.ext4 -c -s IMG -o - | zstd -T0 -3
#   deploy:  fleetwave agent deploy    vs  zstd -d -c | partclone.restore -C -s - -O TARGET
# fleetwave's deploy includes its read-back verification; partclone's does not verify.
# Usage: [LEVELS="0 3"] [FW=fleetwave binary] bench/image.sh [RUNS=1]   LEVELS: fleetwave's --level values to
# run (default 0, fleetwave's own setting). Needs root (drop caches), partclone, zstd, e2fsprogs.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-1}
for t in partclone.ext4 partclone.restore zstd mkfs.ext4 debugfs python3; do
    command -v $t >/dev/null || { echo "bench/image.sh needs $t (apt-get install partclone zstd e2fsprogs)" >&2; exit 2; }
done
WORK=$(mktemp -d /var/tmp/fleetwave-image.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
if [ -z "${FW:-}" ]; then
    cargo build --release --quiet --bin fleetwave
    FW=$PWD/target/release/fleetwave
fi

echo "making the filesystem (1.2 GB of files, 200 MB more deleted)..." >&2
mkdir -p "$WORK/src"
python3 - "$WORK/src" <<'PY'
import os, random, sys
d = sys.argv[1]
rnd = random.Random(7)
words = ["".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9))) for _ in range(5000)]
open(os.path.join(d, "..", "words"), "w").write("\n".join(words) + "\n")
for i in range(75):                      # 600 MB of random data
    with open(f"{d}/r{i:03}.bin", "wb") as f: f.write(os.urandom(8 << 20))
for i in range(25):                      # 200 MB to delete afterwards
    with open(f"{d}/gone{i:02}.bin", "wb") as f: f.write(os.urandom(8 << 20))
PY
# 600 MB of text: words drawn at random, 12 to a line, a fresh draw for every file (no
# file or passage repeats, so neither tool gains from long-range repetition).
for i in $(seq -w 0 74); do
    shuf -r -n 1500000 "$WORK/words" | paste -d ' ' - - - - - - - - - - - - \
        | head -c $((8 << 20)) > "$WORK/src/t$i.txt" || true  # head closes the pipe early
done
truncate -s 2G "$WORK/fs.img"
mkfs.ext4 -q -F -b 4096 -d "$WORK/src" "$WORK/fs.img"
for i in $(seq -w 0 24); do debugfs -w -R "rm gone$i.bin" "$WORK/fs.img" >/dev/null 2>&1; done
rm -rf "$WORK/src"
e2fsck -fn "$WORK/fs.img" >/dev/null

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2])-float(sys.argv[1]):.1f}')" "$1" "$2"; }

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); 2 GiB ext4, $(df -h "$WORK" | tail -1 | awk '{print $1}')"
echo "| fleetwave --level | run | fleetwave capture | fleetwave stored | partclone+zstd capture | partclone+zstd stored | fleetwave deploy (+verify) | partclone restore |"
echo "|---|---|---|---|---|---|---|---|"
for level in ${LEVELS:-0}; do
for run in $(seq "$RUNS"); do
    rm -rf "$WORK/store" "$WORK/pc.zst" "$WORK/t1.img" "$WORK/t2.img"
    drop; t0=$(date +%s.%N)
    "$FW" agent capture "$WORK/fs.img" --image bench --store "$WORK/store" --level "$level" --json > "$WORK/cap.json"
    t1=$(date +%s.%N)
    fw_stored=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['stored_bytes'])" "$WORK/cap.json")
    drop; t2=$(date +%s.%N)
    partclone.ext4 -c -s "$WORK/fs.img" -o - 2>/dev/null | zstd -q -T0 -3 > "$WORK/pc.zst"
    t3=$(date +%s.%N)
    pc_stored=$(stat -c %s "$WORK/pc.zst")
    : > "$WORK/t1.img"
    drop; t4=$(date +%s.%N)
    "$FW" agent deploy bench "$WORK/t1.img" --store "$WORK/store" > /dev/null
    t5=$(date +%s.%N)
    truncate -s 2G "$WORK/t2.img"
    drop; t6=$(date +%s.%N)
    zstd -q -d -c "$WORK/pc.zst" | partclone.restore -C -s - -O "$WORK/t2.img" >/dev/null 2>&1
    t7=$(date +%s.%N)
    e2fsck -fn "$WORK/t1.img" >/dev/null || echo "fleetwave's deploy is not clean" >&2
    e2fsck -fn "$WORK/t2.img" >/dev/null || echo "partclone's restore is not clean" >&2
    echo "| $level | $run | $(secs "$t0" "$t1") s | $(python3 -c "print(f'{$fw_stored/1e6:.1f}')") MB | $(secs "$t2" "$t3") s | $(python3 -c "print(f'{$pc_stored/1e6:.1f}')") MB | $(secs "$t4" "$t5") s | $(secs "$t6" "$t7") s |"
done
done
