#!/usr/bin/env bash
# Benchmark: deploy over HTTP against curl fetching the same bytes from the same
# server. A 2 GiB ext4 image (as bench/image.sh makes it, 1.2 GB of files) is captured
# into the store `fleetwave serve` serves; the agent then deploys it over the agent API
# with the token its iPXE script carries (fetch, decompress, check, write, read back
# and check again), and curl downloads the same compressed bytes as one file from the
# same server's /files/, and is timed until the file is on disk (`sync FILE`), as the
# deploy is (it fsyncs before its read-back). Rate = compressed bytes / wall time.
# The deploy writes the decompressed bytes (about 1.26 GB). Two paths, same run:
#   loopback: client and server in one namespace (CPU-bound: they share 2 cores);
#   lan:      client in its own namespace, every link shaped to 1 Gbit/s (tbf), as
#             on a real LAN.
# Usage: bench/deploy_http.sh [RUNS=2]   Needs root, curl, e2fsprogs, iproute2.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-2}
for t in curl mkfs.ext4 python3 tc; do
    command -v $t >/dev/null || { echo "bench/deploy_http.sh needs $t" >&2; exit 2; }
done
cargo build --release --quiet --bin fleetwave
FW=$PWD/target/release/fleetwave
P=fwdh WORK=$(mktemp -d /var/tmp/fleetwave-http.XXXXXX)
source bench/lab.sh    # removes the namespaces, the server in them, and WORK on exit
lab_host srv 10.80.0.1/24
lab_host cl 10.80.0.2/24
for dev in srvp clp; do tc -n ${P}lan qdisc replace dev $dev root tbf rate 1gbit burst 256k latency 50ms; done
for h in srv cl; do tc -n $P$h qdisc replace dev eth0 root tbf rate 1gbit burst 256k latency 50ms; done

mkdir -p "$WORK/src" "$WORK/files" "$WORK/state"
for i in $(seq -w 0 74); do head -c $((8 << 20)) /dev/urandom > "$WORK/src/r$i.bin"; done
for i in $(seq -w 0 74); do
    base64 -w 76 /dev/urandom | tr 'A-Z0-9+/' 'a-z         ' | head -c $((8 << 20)) > "$WORK/src/t$i.txt" || true
done
truncate -s 2G "$WORK/fs.img"
mkfs.ext4 -q -F -b 4096 -d "$WORK/src" "$WORK/fs.img"
rm -rf "$WORK/src"
"$FW" agent capture "$WORK/fs.img" --image bench --store "$WORK/store" --json > "$WORK/cap.json"
DIGEST=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['digest'])" "$WORK/cap.json")
# The same compressed bytes as one file, for curl.
cat "$WORK"/store/packs/*.pack > "$WORK/files/all.bin"
BYTES=$(stat -c %s "$WORK/files/all.bin")

cat > "$WORK/fleet.yaml" <<EOF
version: 1
sites:
  bench: {interface: eth0, server: 10.80.0.1, subnet: 10.80.0.0/24, dhcp: {mode: off}}
images:
  bench: {os: linux}
hosts:
  pc: {mac: "52:54:00:00:00:01", site: bench, image: bench}
EOF
cat > "$WORK/observed.json" <<EOF
{"images": {"bench": {"versions": [{"digest": "$DIGEST", "generation": 1, "disk_bytes": 2147483648, "stored_bytes": $BYTES}]}}}
EOF
ip netns exec ${P}srv "$FW" serve --fleet "$WORK/fleet.yaml" --state-dir "$WORK/state" \
    --ipxe-dir "$WORK/files" --files-dir "$WORK/files" --image-store "$WORK/store" \
    --http-port 18081 --tftp-port 16970 --log warn 2>"$WORK/serve.log" &
sleep 1

rate() { python3 -c "import sys; print(f'{int(sys.argv[1])/(float(sys.argv[3])-float(sys.argv[2]))/1e6:.0f}')" "$BYTES" "$1" "$2"; }
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $((BYTES / 1000000)) MB compressed"
echo "| path | run | curl (MB/s) | fleetwave agent deploy over HTTP, verified (MB/s) | ratio |"
echo "|---|---|---|---|---|"
for path in loopback lan; do
    case $path in
        loopback) NS=${P}srv URL=http://127.0.0.1:18081 ;;
        lan) NS=${P}cl URL=http://10.80.0.1:18081 ;;
    esac
    for run in $(seq "$RUNS"); do
        rm -f "$WORK/curl.out" "$WORK/target.img"
        t0=$(date +%s.%N)
        ip netns exec $NS curl -s -o "$WORK/curl.out" "$URL/files/all.bin"
        sync "$WORK/curl.out"    # on disk, as a deploy must be before it reports
        t1=$(date +%s.%N)
        cmp -s "$WORK/curl.out" "$WORK/files/all.bin" || { echo "curl's copy differs" >&2; exit 1; }
        rm -f "$WORK/curl.out"
        TOKEN=$(ip netns exec $NS curl -s "$URL/boot/52:54:00:00:00:01.ipxe" | tr ' ' '\n' | sed -n 's/^fleetwave.token=//p')
        : > "$WORK/target.img"
        t2=$(date +%s.%N)
        ip netns exec $NS "$FW" agent deploy "$DIGEST" "$WORK/target.img" --server "$URL" \
            --token "$TOKEN" --mac 52:54:00:00:00:01 >/dev/null
        t3=$(date +%s.%N)
        c=$(rate "$t0" "$t1"); f=$(rate "$t2" "$t3")
        echo "| $path | $run | $c | $f | $(python3 -c "print(f'{$f/$c:.2f}')") |"
    done
done
