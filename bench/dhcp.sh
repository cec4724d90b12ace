#!/usr/bin/env bash
# Benchmark: DHCP exchanges per second, fleetwave against Kea (kea-dhcp4, memfile
# leases persisted) and dnsmasq, each in turn in the same network namespaces, driven by
# the same perfdhcp acting as a relay (giaddr 10.77.1.1) into a /16 pool.
# For each server and each asked rate: 4-way exchanges/s achieved and the drop ratio.
# perfdhcp waits 1 s (-W) after the test period for replies still in flight: without
# it, every exchange answered in the last milliseconds counts as a drop.
# Usage: bench/dhcp.sh [SECONDS=10] [RATES="1000 2000 4000 5000 6000 8000"]
# Needs root, perfdhcp (kea-admin), kea-dhcp4-server and dnsmasq-base.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
RATES=${2:-"1000 2000 4000 5000 6000 8000"}
for t in perfdhcp kea-dhcp4 dnsmasq ip; do
    command -v $t >/dev/null || { echo "bench/dhcp.sh needs $t (apt-get install kea-admin kea-dhcp4-server dnsmasq-base iproute2)" >&2; exit 2; }
done
P=fwb$$
WORK=$(mktemp -d /var/tmp/fleetwave-dhcp.XXXXXX)
# lan: bridge; srv: 172.28.0.1; relay: perfdhcp as relay agent 10.77.1.1.
source bench/lab.sh
[ -n "${KEEP:-}" ] && trap - EXIT
lab_host srv 172.28.0.1/24
lab_host relay 10.77.1.1/24
ip -n ${P}srv route add 10.77.1.0/24 dev eth0
ip -n ${P}relay route add 172.28.0.0/24 dev eth0

cargo build --release --quiet
FW=$PWD/target/release/fleetwave
cat > "$WORK/fleet.yaml" <<EOF
version: 1
sites:
  lab:
    interface: eth0
    server: 172.28.0.1
    subnet: 172.28.0.0/24
    dhcp: {mode: authoritative, pool: 172.28.0.100-172.28.0.199, router: 172.28.0.1, lease: 1h}
  remote:
    interface: eth0
    relayed: true
    server: 172.28.0.1
    subnet: 10.77.0.0/16
    dhcp: {mode: authoritative, pool: 10.77.1.10-10.77.254.250, router: 10.77.1.1, lease: 1h}
hosts: {}
EOF
cat > "$WORK/kea.json" <<EOF
{"Dhcp4": {
  "interfaces-config": {"interfaces": ["eth0"], "dhcp-socket-type": "raw"},
  "lease-database": {"type": "memfile", "persist": true, "name": "$WORK/kea-leases.csv", "lfc-interval": 0},
  "valid-lifetime": 3600,
  "subnet4": [
    {"id": 1, "subnet": "172.28.0.0/24", "pools": [{"pool": "172.28.0.100 - 172.28.0.199"}]},
    {"id": 2, "subnet": "10.77.0.0/16", "pools": [{"pool": "10.77.1.10 - 10.77.254.250"}],
     "option-data": [{"name": "routers", "data": "10.77.1.1"}]}
  ],
  "loggers": [{"name": "kea-dhcp4", "severity": "WARN", "output_options": [{"output": "$WORK/kea.log"}]}]
}}
EOF

start() {
    rm -rf "$WORK/state" "$WORK/kea-leases.csv"* "$WORK/dnsmasq.leases"; mkdir -p "$WORK/state"
    case $1 in
    fleetwave)
        ip netns exec ${P}srv "$FW" serve --fleet "$WORK/fleet.yaml" --state-dir "$WORK/state" \
            --ipxe-dir "$WORK" --files-dir "$WORK" --http-port 18080 --tftp-port 16969 --image-store "$WORK/images" \
            --log warn >"$WORK/fw.log" 2>&1 & ;;
    kea)
        KEA_PIDFILE_DIR=$WORK KEA_LOCKFILE_DIR=$WORK \
            ip netns exec ${P}srv kea-dhcp4 -c "$WORK/kea.json" >"$WORK/kea.out" 2>&1 & ;;
    dnsmasq)
        touch "$WORK/dnsmasq.leases"
        ip netns exec ${P}srv dnsmasq --no-daemon --port=0 --interface=eth0 --dhcp-authoritative --no-ping --quiet-dhcp \
            --dhcp-range=172.28.0.100,172.28.0.199,1h --dhcp-range=10.77.1.10,10.77.254.250,255.255.0.0,1h \
            --dhcp-lease-max=70000 --dhcp-leasefile="$WORK/dnsmasq.leases" \
            >"$WORK/dnsmasq.log" 2>&1 & ;;
    esac
    SERVER=$!
    sleep 1.5
}

stop() { kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; }

# Achieved exchanges/s and drop % for one rate (a fresh server each time).
measure() {
    local out
    out=$(ip netns exec ${P}relay perfdhcp -4 -l eth0 -r "$2" -R 60000 -p "$SECS" -W 1000000 172.28.0.1 2>&1 || true)
    [ -n "${VERBOSE:-}" ] && echo "$out" | grep -E "Statistics|sent|received|drops|orphans|rejected|non unique" >&2
    python3 - "$out" "$SECS" <<'PY'
import re, sys
t, secs = sys.argv[1], float(sys.argv[2])
sent = [int(x) for x in re.findall(r"sent packets: (\d+)", t)]
received = [int(x) for x in re.findall(r"received packets: (\d+)", t)]
drops = [int(x) for x in re.findall(r"drops: (\d+)", t)]
s, d = sum(sent), sum(drops)
# Completed 4-way exchanges (ACKs received) over the sending period; perfdhcp's own
# rate also counts the -W wait.
acks = received[1] if len(received) > 1 else 0
print(f"{acks / secs:.0f} | {100.0 * d / s if s else 100:.2f}%")
PY
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "perfdhcp as relay, -R 60000 clients, $SECS s per rate; exchanges/s | drops"
SERVERS=${SERVERS:-fleetwave kea dnsmasq}
printf "| asked/s |"; for s in $SERVERS; do printf " %s |" "$s"; done; echo
printf "|---|"; for s in $SERVERS; do printf -- "---|"; done; echo
for r in $RATES; do
    printf "| %s |" "$r"
    for s in $SERVERS; do
        start $s
        printf " %s |" "$(measure $s "$r")"
        stop
    done
    echo
done
# Every lease fleetwave acknowledged is in its store (the last run's).
start fleetwave
ip netns exec ${P}relay perfdhcp -4 -l eth0 -r 1000 -R 60000 -p 3 172.28.0.1 >/dev/null 2>&1 || true
stop
echo "fleetwave leases persisted after a 3 s run at 1000/s: $(python3 -c "
import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from leases').fetchone()[0])" "$WORK/state/state.db")"
