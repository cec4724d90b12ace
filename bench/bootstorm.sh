#!/usr/bin/env bash
# Benchmark: a boot storm. N simulated PXE clients (examples/bootstorm.rs) start at
# once; each does DHCP, a TFTP read of undionly.kpxe (Debian's ipxe package) and an
# HTTP GET of its iPXE script. Against fleetwave serve, then against what a FOG-style
# setup would use: dnsmasq (DHCP + its TFTP) with a static HTTP server for the scripts
# (python3 -m http.server). Same namespaces, same client, same run.
# Usage: bench/bootstorm.sh [CLIENTS=500] [RUNS=3]
# Needs root, ipxe, dnsmasq-base.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-500}
RUNS=${2:-3}
for t in dnsmasq ip python3; do
    command -v $t >/dev/null || { echo "bench/bootstorm.sh needs $t" >&2; exit 2; }
done
[ -f /usr/lib/ipxe/undionly.kpxe ] || { echo "bench/bootstorm.sh needs the ipxe package" >&2; exit 2; }
P=fws$$
WORK=$(mktemp -d /var/tmp/fleetwave-storm.XXXXXX)
source bench/lab.sh
lab_host srv 172.28.0.1/16
lab_host cli 172.28.0.250/16

cargo build --release --quiet --bin fleetwave --example bootstorm
FW=$PWD/target/release/fleetwave
STORM=$PWD/target/release/examples/bootstorm

# The fleet knows every simulated client (MACs 02:fb:RUN:..), half of them due for a
# deploy, so the scripts come from a real plan.
mac() { printf '02:fb:%02x:%02x:%02x:%02x' "$1" $(($2 >> 16 & 255)) $(($2 >> 8 & 255)) $(($2 & 255)); }
{
    cat <<EOF
version: 1
sites:
  lab:
    interface: eth0
    server: 172.28.0.1
    subnet: 172.28.0.0/16
    dhcp: {mode: authoritative, pool: 172.28.1.1-172.28.9.254, router: 172.28.0.1, lease: 1h}
images:
  win10: {os: windows}
hosts:
EOF
    for run in $(seq 1 "$RUNS"); do
        for i in $(seq 0 $((N - 1))); do
            img=""; [ $((i % 2)) = 0 ] && img=", image: win10"
            echo "  pc-$run-$i: {mac: \"$(mac "$run" "$i")\", site: lab$img}"
        done
    done
} > "$WORK/fleet.yaml"
D=blake3:$(printf '1%.0s' $(seq 64))
echo "{\"images\": {\"win10\": {\"versions\": [{\"digest\": \"$D\", \"generation\": 1, \"disk_bytes\": 1000000000, \"stored_bytes\": 400000000}]}}}" > "$WORK/observed.json"
mkdir -p "$WORK/state" "$WORK/files" "$WORK/www/boot"

storm() { ip netns exec ${P}cli "$STORM" --clients "$N" --server 172.28.0.1 --http-port "$1" --run "$2"; }

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "$N clients at once, each DHCP + TFTP undionly.kpxe ($(stat -c %s /usr/lib/ipxe/undionly.kpxe) bytes) + HTTP script"
echo "== fleetwave serve"
ip netns exec ${P}srv "$FW" serve --fleet "$WORK/fleet.yaml" \
    --state-dir "$WORK/state" --files-dir "$WORK/files" --http-port 8080 --image-store "$WORK/images" --log warn \
    >"$WORK/fw.log" 2>&1 &
FWPID=$!
sleep 1.5
for run in $(seq 1 "$RUNS"); do storm 8080 "$run"; done
kill "$FWPID"; wait "$FWPID" 2>/dev/null || true

echo "== dnsmasq (DHCP + TFTP) + python3 http.server"
# The same scripts, written out as static files.
for run in $(seq 1 "$RUNS"); do
    for i in $(seq 0 $((N - 1))); do
        printf '#!ipxe\nsanboot --no-describe --drive 0x80\n' > "$WORK/www/boot/$(mac "$run" "$i").ipxe"
    done
done
rm -rf "$WORK/state"; mkdir -p "$WORK/state"
ip netns exec ${P}srv dnsmasq --no-daemon --port=0 --interface=eth0 --dhcp-authoritative \
    --no-ping --quiet-dhcp --dhcp-range=172.28.1.1,172.28.9.254,255.255.0.0,1h --dhcp-lease-max=5000 \
    --dhcp-leasefile="$WORK/state/dnsmasq.leases" --dhcp-boot=undionly.kpxe,,172.28.0.1 \
    --enable-tftp --tftp-root=/usr/lib/ipxe --tftp-max=1000 >"$WORK/dnsmasq.log" 2>&1 &
DPID=$!
(cd "$WORK/www" && exec ip netns exec ${P}srv python3 -m http.server 8081 --bind 172.28.0.1 >/dev/null 2>&1) &
HPID=$!
sleep 1.5
for run in $(seq 1 "$RUNS"); do storm 8081 "$run"; done
kill "$DPID" "$HPID" 2>/dev/null || true
