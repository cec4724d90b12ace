#!/usr/bin/env bash
# Benchmark: one 1 GiB disk image (ext4 holding 600 MB of files, half random, half
# text) sent by multicast to 1, 2 and 3 receivers, fleetwave against udpcast
# (udp-sender/udp-receiver, what Clonezilla SE runs), same image, same run, on a
# namespace bridge (server and receivers each in their own namespace):
#   bare:   the bridge as it is (CPU-bound on this machine);
#   shaped: every link shaped to 1 Gbit/s (tbf), as on a real LAN; fleetwave's
#           figure is also its share of line rate while sending;
#   lossy:  3 receivers, one of them losing 5% of what reaches it (netem where the
#           kernel has it, else an nftables random-drop rule): how much later the
#           other two finish than with 3 clean receivers.
# Wall time = from starting the sender to the last receiver exiting. fleetwave's
# receivers write, read back and verify; udp-receiver writes only.
# Each run starts after `sync`, so no run pays for the previous one's writeback.
# Usage: [MODES="bare shaped"] bench/multicast.sh [RUNS=1]
# Needs root, udpcast, e2fsprogs, iproute2, nftables.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-1}
for t in udp-sender udp-receiver mkfs.ext4 tc nft python3; do
    command -v $t >/dev/null || { echo "bench/multicast.sh needs $t (apt-get install udpcast e2fsprogs iproute2 nftables)" >&2; exit 2; }
done
cargo build --release --quiet --bin fleetwave
FW=$PWD/target/release/fleetwave
P=fwmb WORK=$(mktemp -d /var/tmp/fleetwave-mcast.XXXXXX)
source bench/lab.sh
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

now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2])-float(sys.argv[1]):.2f}')" "$1" "$2"; }
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1])/float(sys.argv[2]):.2f}')" "$1" "$2"; }

# fleetwave N [RATE] [LOSSY]: wall seconds to N receivers; sender report in $WORK/send.json
fleetwave() {
    local n=$1 rate=${2:-0} pids=() t0 t1
    for r in $(seq "$n"); do rm -f "$WORK/fw$r.img" "$WORK/fw$r.img.fleetwave-deploy"; touch "$WORK/fw$r.img"; done
    sync
    t0=$(now)
    ip netns exec ${P}srv "$FW" multicast send bench --store "$WORK/store" --group 239.79.0.1:9000 \
        --bind 10.79.0.1 --min-receivers "$n" --max-wait 60s --max-rate "$rate" --json > "$WORK/send.json" &
    local sp=$!
    for r in $(seq "$n"); do
        ( ip netns exec ${P}r$r "$FW" agent deploy bench "$WORK/fw$r.img" --store "$WORK/store" \
            --multicast 239.79.0.1:9000 --json > "$WORK/recv$r.json"; now > "$WORK/done$r" ) &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    t1=$(now)
    wait $sp || true
    secs "$t0" "$t1"
}

udpcast() {
    local n=$1 pids=() t0 t1
    for r in $(seq "$n"); do rm -f "$WORK/uc$r.img"; done
    sync
    t0=$(now)
    ip netns exec ${P}srv udp-sender --interface eth0 --portbase 9100 --nokbd --min-receivers "$n" \
        --max-wait 60 --mcast-data-address 239.79.0.2 --file "$WORK/disk.img" 2>/dev/null &
    local sp=$!
    for r in $(seq "$n"); do
        ip netns exec ${P}r$r udp-receiver --interface eth0 --portbase 9100 --nokbd \
            --file "$WORK/uc$r.img" 2>/dev/null &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    t1=$(now)
    wait $sp || true
    secs "$t0" "$t1"
}

# A fleetwave receiver that reported success with another image stops the benchmark;
# an incomplete udpcast copy (it drops receivers that fall behind) is noted in the row.
check() {
    local note=""
    for r in $(seq "$1"); do
        cmp -s "$WORK/disk.img" "$WORK/fw$r.img" || { echo "fleetwave receiver $r: image differs" >&2; exit 1; }
        [ -f "$WORK/uc$r.img" ] || continue
        cmp -s "$WORK/disk.img" "$WORK/uc$r.img" || note="$note; udpcast receiver $r: copy incomplete"
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
    tc -n ${P}lan qdisc replace dev r3p root netem loss 5% 2>/dev/null && return
    ip netns exec ${P}r3 nft add table inet fwloss
    ip netns exec ${P}r3 nft add chain inet fwloss in '{ type filter hook prerouting priority -300; }'
    ip netns exec ${P}r3 nft add rule inet fwloss in udp dport 9000 numgen random mod 100 '<' 5 drop
}
lossy_off() {
    tc -n ${P}lan qdisc del dev r3p root 2>/dev/null || true
    ip netns exec ${P}r3 nft delete table inet fwloss 2>/dev/null || true
}
field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d[sys.argv[2]])" "$WORK/send.json" "$1"; }
share() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(f\"{d['wire_bytes']*8/d['pass_secs']/1e9*100:.1f}%\")" "$WORK/send.json"; }

stored=$(du -sb "$WORK/store/chunks" | cut -f1)
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); image 1 GiB, fleetwave sends $((stored / 1000000)) MB of compressed chunks, udpcast the 1,074 MB file"
for mode in ${MODES:-bare shaped}; do
    [ $mode = shaped ] && shape
    rate=0; [ $mode = shaped ] && rate=1Gbit
    echo
    echo "## $mode"
    echo "| run | receivers | fleetwave s | udpcast s | fleetwave/udpcast | fleetwave wire rate while sending |"
    echo "|---|---|---|---|---|---|"
    for run in $(seq "$RUNS"); do
        for n in 1 2 3; do
            f=$(fleetwave "$n" "$rate"); u=$(udpcast "$n"); note=$(check "$n")
            echo "| $run | $n | $f | $u | $(ratio "$f" "$u") | $(share) of 1 Gbit/s, $(field repair_datagrams) repairs$note |"
        done
    done
    unshape
done

echo
echo "## lossy (bare bridge, receiver 3 loses 5%)"
echo "| run | clean: 3 receivers s | one lossy: others s | lossy one s | slowdown of the others |"
echo "|---|---|---|---|---|"
for run in $(seq "$RUNS"); do
    t0=$(now); fleetwave 3 0 >/dev/null
    clean=$(python3 -c "import sys; print(f'{max(float(open(x).read()) for x in sys.argv[2:]) - float(sys.argv[1]):.2f}')" "$t0" "$WORK"/done{1,2,3})
    lossy_on
    t0=$(now); fleetwave 3 0 >/dev/null
    others=$(python3 -c "import sys; print(f'{max(float(open(x).read()) for x in sys.argv[2:]) - float(sys.argv[1]):.2f}')" "$t0" "$WORK"/done{1,2})
    lossy=$(secs "$t0" "$(cat "$WORK/done3")")
    lossy_off
    rm -f "$WORK"/uc?.img
    check 3 >/dev/null
    echo "| $run | $clean | $others | $lossy | $(python3 -c "import sys; print(f'{(float(sys.argv[1])/float(sys.argv[2])-1)*100:+.1f}%')" "$others" "$clean") |"
done
