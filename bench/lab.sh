# Sourced by the benchmarks: a test LAN of network namespaces. Namespace ${P}lan holds
# bridge br0; each host ${P}NAME has an eth0 on it. No default route anywhere.
# Needs P (a prefix) and WORK set; removes everything, and WORK, on exit.

lab_cleanup() {
    for ns in $(ip netns list | awk '{print $1}' | grep "^${P}"); do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap lab_cleanup EXIT

ip netns add "${P}lan"; ip -n "${P}lan" link set lo up
ip -n "${P}lan" link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0
ip -n "${P}lan" link set br0 up

# lab_host NAME ADDRESS/LEN
lab_host() {
    ip netns add "$P$1"; ip -n "$P$1" link set lo up
    ip -n "${P}lan" link add "$1p" type veth peer name eth0 netns "$P$1"
    ip -n "${P}lan" link set "$1p" master br0 up
    ip -n "$P$1" addr add "$2" brd + dev eth0; ip -n "$P$1" link set eth0 up
}
