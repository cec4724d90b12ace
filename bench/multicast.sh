#!/usr/bin/env bash
# Benchmark: one 1 GiB disk image (ext4 holding 600 MB of files, half random, half
# text) sent by multicast to 1, 2 and 3 receivers, same image, same run, on a
# namespace bridge (server and receivers each in their own namespace), fleetwave
# against two peers:
#   Clonezilla SE's pipeline: its image is the partclone+zstd file (made once, as
#     Clonezilla's capture makes it); udp-sender sends that file and each receiver
#     runs `udp-receiver | zstd -d | partclone.restore` onto its disk;
#   raw udpcast: udp-sender of the disk file itself, udp-receiver onto the disk.
# In modes:
#   bare:   the bridge as it is (CPU-bound on this machine);
#   shaped: every link shaped to 1 Gbit/s (tbf), as on a real LAN; fleetwave's
#           figure is also its share of line rate while sending;
#   and in each mode, once per run, 3 receivers of which one loses 5% of what reaches
#   it, the group's datagrams and those sent to it alone (netem where the kernel has
#   it, else an nftables random-drop rule on all UDP): how much later the other two
#   finish than in a clean run of 3 just before.
# Wall time = from starting the sender to the last receiver exiting. fleetwave's
# receivers write, read back and verify; udp-receiver writes only.
# Each run starts after `sync`, so no run pays for the previous one's writeback.
# Where the receivers write (DISKS):
#   own:    each receiver its own block device, as each machine of a LAN has: a loop
#           device over a file in /dev/shm (this VM has one disk), zeroed before each run;
#   shared: sparse files on this machine's one disk, which all receivers then share.
# Usage: [MODES="bare shaped"] [DISKS="own shared"] bench/multicast.sh [RUNS=1]
# Needs root, udpcast, e2fsprogs, iproute2, nftables.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-1}
for t in udp-sender udp-receiver mkfs.ext4 tc nft python3 losetup partclone.ext4 partclone.restore zstd; do
    command -v $t >/dev/null || { echo "bench/multicast.sh needs $t (apt-get install udpcast e2fsprogs iproute2 nftables partclone zstd)" >&2; exit 2; }
done
cargo build --release --quiet --bin fleetwave
FW=$(realpath "${CARGO_TARGET_DIR:-target}")/release/fleetwave
P=fwmb WORK=$(mktemp -d /var/tmp/fleetwave-mcast.XXXXXX)
source bench/lab.sh
LOOPS=()
bench_cleanup() {
    for d in "${LOOPS[@]}"; do losetup -d "$d" 2>/dev/null || true; done
    rm -f /dev/shm/"$(basename "$WORK")".disk?
    lab_cleanup
}
trap bench_cleanup EXIT
lab_host srv 10.79.0.1/24
for r in 1 2 3; do lab_host r$r 10.79.0.1$r/24; done

echo "making the image (600 MB of files in a 1 GiB ext4)..." >&2
mkdir -p "$WORK/src"
python3 - "$WORK" <<'PY'
import os, random, sys
w = sys.argv[1]
rnd = random.Random(7)
words = ["".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9))) for _ in range(5000)]
for i in range(36):
    with open(f"{w}/src/r{i:02}.bin", "wb") as f: f.write(os.urandom(8 << 20))
for i in range(36):
    out = []
    n = 0
    while n < (8 << 20):
        line = " ".join(rnd.choice(words) for _ in range(12)) + "\n"
        out.append(line); n += len(line)
    with open(f"{w}/src/t{i:02}.txt", "w") as f: f.write("".join(out)[: 8 << 20])
PY
truncate -s 1G "$WORK/disk.img"
mkfs.ext4 -q -F -b 4096 -d "$WORK/src" "$WORK/disk.img"
rm -rf "$WORK/src"
"$FW" agent capture "$WORK/disk.img" --image bench --store "$WORK/store" >/dev/null
SIZE=$(stat -c %s "$WORK/disk.img")
# Clonezilla's image of the same disk: partclone's used blocks, zstd as Clonezilla runs it.
partclone.ext4 -c -q -s "$WORK/disk.img" -o - 2>/dev/null | zstd -q -T0 -3 > "$WORK/cz.pc.zst"
CZ_BYTES=$(stat -c %s "$WORK/cz.pc.zst")

# targets DISKS: the receivers' targets, fleetwave's in FT[r], udpcast's in UT[r].
FT=() UT=()
targets() {
    if [ "$1" = own ]; then
        if [ ${#LOOPS[@]} = 0 ]; then
            for r in 1 2 3; do
                # /dev/shm is RAM: its backing files live beside, not under, WORK.
                local f=/dev/shm/$(basename "$WORK").disk$r
                dd if=/dev/zero of="$f" bs=4M count=$((SIZE >> 22)) status=none
                LOOPS[$r]=$(losetup --find --show "$f")
            done
        fi
        for r in 1 2 3; do FT[$r]=${LOOPS[$r]}; UT[$r]=${LOOPS[$r]}; done
    else
        for r in 1 2 3; do FT[$r]=$WORK/fw$r.img; UT[$r]=$WORK/uc$r.img; done
    fi
}
# clear N fw|uc: empty the targets, so that no run is checked against an earlier one's copy.
clear() {
    local t
    for r in $(seq "$1"); do
        if [ "$2" = fw ]; then t=${FT[$r]}; else t=${UT[$r]}; fi
        case $t in
            /dev/*) dd if=/dev/zero of="$t" bs=4M count=$((SIZE >> 22)) oflag=direct status=none ;;
            *) rm -f "$t" "$t.fleetwave-deploy"; [ "$2" = uc ] || touch "$t" ;;
        esac
    done
}

now() { date +%s.%N; }
# CPU seconds all cores spent busy so far (user, nice, system, irq, softirq, steal).
busy() { awk -v hz="$(getconf CLK_TCK)" '/^cpu /{print ($2+$3+$4+$7+$8+$9)/hz}' /proc/stat; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2])-float(sys.argv[1]):.2f}')" "$1" "$2"; }
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1])/float(sys.argv[2]):.2f}')" "$1" "$2"; }

# fleetwave N [RATE] [LOSSY]: wall seconds to N receivers; sender report in $WORK/send.json
fleetwave() {
    local n=$1 rate=${2:-0} pids=() t0 t1
    clear "$n" fw
    sync
    busy0=$(busy)
    t0=$(now)
    echo "$t0" > "$WORK/t0"
    ip netns exec ${P}srv "$FW" multicast send bench --store "$WORK/store" --group 239.79.0.1:9000 \
        --bind 10.79.0.1 --min-receivers "$n" --max-wait 60s --max-rate "$rate" --json > "$WORK/send.json" &
    local sp=$!
    for r in $(seq "$n"); do
        ( ip netns exec ${P}r$r "$FW" agent deploy bench "${FT[$r]}" --store "$WORK/store" \
            --multicast 239.79.0.1:9000 --json > "$WORK/recv$r.json"; now > "$WORK/done$r" ) &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    t1=$(now)
    busy1=$(busy)
    wait $sp || true
    python3 -c "import sys; print(f'{(float(sys.argv[2])-float(sys.argv[1]))/(float(sys.argv[4])-float(sys.argv[3]))/$(nproc)*100:.0f}%')" "$busy0" "$busy1" "$t0" "$t1" > "$WORK/cpu"
    secs "$t0" "$t1"
}

udpcast() {
    local n=$1 pids=() t0 t1
    clear "$n" uc
    sync
    t0=$(now)
    ip netns exec ${P}srv udp-sender --interface eth0 --portbase 9100 --nokbd --min-receivers "$n" \
        --max-wait 60 --mcast-data-address 239.79.0.2 --file "$WORK/disk.img" 2>/dev/null &
    local sp=$!
    for r in $(seq "$n"); do
        ip netns exec ${P}r$r udp-receiver --interface eth0 --portbase 9100 --nokbd \
            --file "${UT[$r]}" 2>/dev/null &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    t1=$(now)
    wait $sp || true
    secs "$t0" "$t1"
}

# clonezilla N: Clonezilla SE's multicast restore: udp-sender of its partclone+zstd
# image, each receiver `udp-receiver | zstd -d | partclone.restore` onto its target.
clonezilla() {
    local n=$1 pids=() t0 t1
    clear "$n" uc
    for r in $(seq "$n"); do case ${UT[$r]} in /dev/*) ;; *) truncate -s "$SIZE" "${UT[$r]}" ;; esac; done
    sync
    t0=$(now)
    ip netns exec ${P}srv udp-sender --interface eth0 --portbase 9200 --nokbd --min-receivers "$n" \
        --max-wait 60 --mcast-data-address 239.79.0.3 --file "$WORK/cz.pc.zst" 2>/dev/null &
    local sp=$!
    for r in $(seq "$n"); do
        ip netns exec ${P}r$r sh -c "udp-receiver --interface eth0 --portbase 9200 --nokbd 2>/dev/null \
            | zstd -q -d -c | partclone.restore -q -C -s - -O '${UT[$r]}' >/dev/null 2>&1" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    t1=$(now)
    wait $sp || true
    secs "$t0" "$t1"
}

# A fleetwave receiver that reported success with another image stops the benchmark;
# an incomplete udpcast copy (it drops receivers that fall behind) is noted in the row.
check_fw() {
    for r in $(seq "$1"); do
        cmp -s -n "$SIZE" "$WORK/disk.img" "${FT[$r]}" || { echo "fleetwave receiver $r: image differs" >&2; exit 1; }
    done
}
check_uc() {
    local note=""
    for r in $(seq "$1"); do
        cmp -s -n "$SIZE" "$WORK/disk.img" "${UT[$r]}" || note="$note; udpcast receiver $r: copy incomplete"
    done
    echo "$note"
}

shape() {
    for dev in r1p r2p r3p srvp; do tc -n ${P}lan qdisc replace dev $dev root tbf rate 1gbit burst 256k latency 50ms; done
    tc -n ${P}srv qdisc replace dev eth0 root tbf rate 1gbit burst 256k latency 50ms
}
unshape() {
    for dev in r1p r2p r3p srvp; do tc -n ${P}lan qdisc del dev $dev root 2>/dev/null || true; done
    tc -n ${P}srv qdisc del dev eth0 root 2>/dev/null || true
}
lossy_on() {
    local rate=""; [ "$mode" = shaped ] && rate="rate 1gbit"
    tc -n ${P}lan qdisc replace dev r3p root netem loss 5% $rate 2>/dev/null && return
    ip netns exec ${P}r3 nft add table inet fwloss
    ip netns exec ${P}r3 nft add chain inet fwloss in '{ type filter hook prerouting priority -300; }'
    ip netns exec ${P}r3 nft add rule inet fwloss in meta l4proto udp numgen random mod 100 '<' 5 drop
}
lossy_off() {
    tc -n ${P}lan qdisc del dev r3p root 2>/dev/null || true
    ip netns exec ${P}r3 nft delete table inet fwloss 2>/dev/null || true
    if [ "$mode" = shaped ]; then shape; fi
}
field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d[sys.argv[2]])" "$WORK/send.json" "$1"; }
share() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(f\"{d['wire_bytes']*8/d['pass_secs']/1e9*100:.1f}%\")" "$WORK/send.json"; }

stored=$(du -sb "$WORK/store/chunks" | cut -f1)
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); image 1 GiB, fleetwave sends $((stored / 1000000)) MB of compressed chunks, Clonezilla SE its $((CZ_BYTES / 1000000)) MB partclone+zstd image, raw udpcast the 1,074 MB file"
# lossy RATE: one clean run of 3 receivers, then one with receiver 3 losing 5%; a row.
lossy() {
    local t0 clean others lossy
    # From the sender's start, as in the table: not the clearing of the targets before.
    fleetwave 3 "$1" >/dev/null; t0=$(cat "$WORK/t0")
    clean=$(python3 -c "import sys; print(f'{max(float(open(x).read()) for x in sys.argv[2:]) - float(sys.argv[1]):.2f}')" "$t0" "$WORK"/done{1,2,3})
    lossy_on
    fleetwave 3 "$1" >/dev/null; t0=$(cat "$WORK/t0")
    others=$(python3 -c "import sys; print(f'{max(float(open(x).read()) for x in sys.argv[2:]) - float(sys.argv[1]):.2f}')" "$t0" "$WORK"/done{1,2})
    lossy=$(secs "$t0" "$(cat "$WORK/done3")")
    lossy_off
    check_fw 3
    echo "| $clean | $others | $lossy | $(python3 -c "import sys; print(f'{(float(sys.argv[1])/float(sys.argv[2])-1)*100:+.1f}%')" "$others" "$clean") | $(field repair_datagrams) ($(field repairs_unicast) to the lossy one alone) |"
}

for disks in ${DISKS:-own shared}; do
targets "$disks"
for mode in ${MODES:-bare shaped}; do
    [ $mode = shaped ] && shape
    rate=0; [ $mode = shaped ] && rate=1Gbit
    echo
    echo "## $mode, $disks disks"
    echo "| run | receivers | fleetwave s | Clonezilla SE s | fleetwave/Clonezilla | raw udpcast s | fleetwave/udpcast | fleetwave wire rate while sending; the machine's CPU while it ran |"
    echo "|---|---|---|---|---|---|---|---|"
    rows=()
    for run in $(seq "$RUNS"); do
        for n in 1 2 3; do
            f=$(fleetwave "$n" "$rate"); check_fw "$n"
            c=$(clonezilla "$n"); cnote=$(check_uc "$n" | sed 's/udpcast/Clonezilla/g')
            u=$(udpcast "$n"); note=$(check_uc "$n")
            echo "| $run | $n | $f | $c | $(ratio "$f" "$c") | $u | $(ratio "$f" "$u") | $(share) of 1 Gbit/s, $(field repair_datagrams) repairs; CPU $(cat "$WORK/cpu") busy$cnote$note |"
        done
        rows+=("$(lossy "$rate")")
    done
    echo
    echo "3 receivers, one of them losing 5% ($mode, $disks disks):"
    echo "| clean: 3 receivers s | one lossy: the others s | the lossy one s | slowdown of the others | repair datagrams |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
    unshape
done
done
