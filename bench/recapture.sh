#!/usr/bin/env bash
# Benchmark: what a recapture moves after an edit, against the bytes that changed, and
# what the store holds against partclone + zstd (Clonezilla's image), same filesystem,
# same run. The filesystem holds 190 files of 4 KiB to 16 MiB (median 730 KB; half
# random, half word text); each round rewrites 10 of them with new content of the same
# kind and size through the mounted filesystem, unmounts it and captures it again into
# the same store. SMALL=1: 2,000 files of median 16 KB instead, 100 rewritten a round.
# A last round captures while the filesystem is still mounted (needs_recovery set), as a
# power cut would leave it.
#   moved:   the new chunks' bytes (what crosses to the server), raw and compressed
#   stored:  the version's chunks as stored (frames in packs), and the whole store on
#            disk (`du`: packs, their indexes, manifests, records), all versions so far
#   peer:    partclone.FS -c | zstd -3 of the same filesystem: a whole image each time
# Usage: [FS="ext4 ntfs"] [SMALL=1] [FW=fleetwave binary] bench/recapture.sh [ROUNDS=5]
# Needs root (mount), e2fsprogs, ntfs-3g, partclone, zstd, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
for t in partclone.ext4 partclone.ntfs zstd mkfs.ext4 mkntfs ntfs-3g python3; do
    command -v $t >/dev/null || { echo "bench/recapture.sh needs $t (apt-get install partclone zstd e2fsprogs ntfs-3g)" >&2; exit 2; }
done
WORK=$(mktemp -d /var/tmp/fleetwave-recapture.XXXXXX)
cleanup() { umount "$WORK/mnt" 2>/dev/null || true; rm -rf "$WORK"; }
# umount returns before a loop device's autoclear and an ntfs-3g daemon have written
# everything to the image file: wait for both, or the capture reads the old bytes.
unmnt() {
    umount "$WORK/mnt"
    while losetup -j "$1" | grep -q . || pgrep -f "ntfs-3g $1" >/dev/null; do sleep 0.1; done
    sync
}
trap cleanup EXIT
if [ -z "${FW:-}" ]; then
    cargo build --release --quiet --bin fleetwave
    FW=$PWD/target/release/fleetwave
fi
mkdir -p "$WORK/mnt"

# The files, and the rewrite of 10 of them: python3 so sizes and content are seeded.
cat > "$WORK/files.py" <<'PY'
import os, random, sys
mode, d, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
small = os.environ.get("SMALL") == "1"
count, change, median = (2000, 100, 9.7) if small else (190, 10, 13.5)
rnd = random.Random(seed)
words = ["".join(random.Random(w).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(2 + w % 8)) for w in range(5000)]
def text(n):
    out, size = [], 0
    while size < n:
        line = " ".join(rnd.choice(words) for _ in range(12)) + "\n"
        out.append(line); size += len(line)
    return "".join(out)[:n].encode()
def body(i, n):
    return os.urandom(n) if i % 2 else text(n)
if mode == "make":
    sizes = random.Random(7)
    for i in range(count):
        n = max(4096, min(int(sizes.lognormvariate(median, 1.2)), 16 << 20))
        open(f"{d}/f{i:03}", "wb").write(body(i, n))
else:  # rewrite 10, print the bytes changed
    total = 0
    for i in rnd.sample(range(count), change):
        p = f"{d}/f{i:03}"
        n = os.path.getsize(p)
        open(p, "wb").write(body(i, n))
        total += n
    print(total)
PY
mkdir -p "$WORK/src"
python3 "$WORK/files.py" make "$WORK/src" 0
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }
mib() { python3 -c "import sys; print(f'{int(sys.argv[1])/2**20:.2f}')" "$1"; }

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); 1 GiB filesystem, $(du -sm "$WORK/src" | cut -f1) MiB in $(ls "$WORK/src" | wc -l) files"
for fs in ${FS:-ext4 ntfs}; do
    img=$WORK/$fs.img store=$WORK/store-$fs
    rm -rf "$store" "$img"
    truncate -s 1G "$img"
    if [ "$fs" = ext4 ]; then
        mkfs.ext4 -q -F -b 4096 -d "$WORK/src" "$img"
        mnt() { mount -o loop "$img" "$WORK/mnt"; }
    else
        mkntfs -q -F -f "$img" >/dev/null
        mnt() { ntfs-3g "$img" "$WORK/mnt"; }
        mnt; cp "$WORK/src"/* "$WORK/mnt"/; unmnt "$img"
    fi
    echo
    echo "### $fs"
    echo "| round | changed | fleetwave moved | × changed | moved, compressed | fleetwave version stored | store on disk (du), all versions | partclone+zstd image (moved each time) |"
    echo "|---|---|---|---|---|---|---|---|"
    "$FW" agent capture "$img" --image b --store "$store" --json > "$WORK/c.json"
    pc=$(partclone.$fs -c -s "$img" -o - 2>/dev/null | zstd -q -T0 -3 | wc -c)
    du_store() { du -sB1 "$store" | cut -f1; }
    echo "| capture | | $(mib "$(field "$WORK/c.json" new_data_bytes)") MiB | | $(mib "$(field "$WORK/c.json" new_stored_bytes)") MiB | $(mib "$(field "$WORK/c.json" stored_bytes)") MiB | $(mib "$(du_store)") MiB | $(mib "$pc") MiB |"
    for round in $(seq "$ROUNDS") mounted; do
        mnt
        changed=$(python3 "$WORK/files.py" rewrite "$WORK/mnt" "$((100 + ${round/mounted/99}))")
        if [ "$round" = mounted ]; then
            sync
            cp --sparse=always "$img" "$WORK/snap.img"
            unmnt "$img"
            src=$WORK/snap.img
        else
            unmnt "$img"
            src=$img
        fi
        "$FW" agent capture "$src" --image b --store "$store" --json > "$WORK/c.json"
        pc=$(partclone.$fs -c -s "$img" -o - 2>/dev/null | zstd -q -T0 -3 | wc -c)
        moved=$(field "$WORK/c.json" new_data_bytes)
        echo "| $round | $(mib "$changed") MiB | $(mib "$moved") MiB | $(python3 -c "import sys; print(f'{int(sys.argv[1])/int(sys.argv[2]):.2f}')" "$moved" "$changed") | $(mib "$(field "$WORK/c.json" new_stored_bytes)") MiB | $(mib "$(field "$WORK/c.json" stored_bytes)") MiB | $(mib "$(du_store)") MiB | $(mib "$pc") MiB |"
    done
done
