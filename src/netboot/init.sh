#!/bin/sh
# /init of fleetwave's netboot initramfs (made by `fleetwave netboot build`).
# PID 1: it must never exit (the kernel would panic), so every path ends in
# reboot or poweroff. Failures are reported to the server before anything else.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
/bin/busybox mkdir -p /proc /sys /dev /run /tmp /var/log
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
LOG=/run/fleetwave.log
# The agent's own failure reports carry this log's tail.
export FLEETWAVE_NETBOOT_LOG="$LOG"
# Everything from here on goes to the console and to $LOG (whose tail a failure report carries).
mkfifo /run/console.fifo
tee -a "$LOG" </run/console.fifo &
exec >/run/console.fifo 2>&1

say() { echo "fleetwave-init: $*"; }
up() { cut -d' ' -f1 /proc/uptime; }
# The value of fleetwave.$1= on the kernel command line.
arg() {
    for w in $(cat /proc/cmdline); do
        case "$w" in "fleetwave.$1="*) echo "${w#*=}"; return ;; esac
    done
}
MAC=$(arg mac | tr 'A-F-' 'a-f:')
AFTER=$(arg after)
DEBUG=$(arg debug)
KVER=$(uname -r)
FAILED=

# Report a failure to the server (with the log's tail), then remember it.
fail() {
    FAILED=$*
    say "FAILED: $*"
    fleetwave agent fail --reason "$*" --log "$LOG"
    rc=$?
    if [ "$rc" -ge 126 ]; then
        case "$(arg server)" in
            https://*)
                # busybox wget cannot check the certificate's pin: the token stays here.
                say "the agent cannot run and the server is HTTPS: the failure is not reported"
                return ;;
        esac
        # The agent binary itself could not run: a short report by busybox wget.
        safe=$(echo "$*" | tr -cd 'A-Za-z0-9 ._:/=-')
        wget -q -O /dev/null \
            --header "Authorization: Bearer $(arg token)" \
            --header "X-Fleetwave-Mac: $MAC" \
            --header "Content-Type: application/json" \
            --post-data "{\"ok\":false,\"digest\":null,\"message\":\"netboot: $safe (agent unusable, exit $rc)\"}" \
            "$(arg server)/api/v1/result" || say "could not report the failure to the server"
    fi
}

# Wait up to $1 tenths of a second for `$2` to succeed.
wait_for() {
    n=0
    while [ "$n" -lt "$1" ]; do
        eval "$2" && return 0
        sleep 0.1
        n=$((n + 1))
    done
    return 1
}

nic_with_mac() {
    for d in /sys/class/net/*; do
        [ "$(cat "$d/address" 2>/dev/null)" = "$MAC" ] && { NIC=${d##*/}; return 0; }
    done
    return 1
}

has_disk() { ls /sys/block 2>/dev/null | grep -qE '^(sd|nvme|vd|mmcblk|hd)'; }

# What the server says to do once the task has ended ("after" in the task it
# authorizes; fetching it does not spend the token). Empty when it cannot be asked.
# Asked through the agent, which checks fleetwave.pin= before the token is sent.
server_after() {
    fleetwave agent after 2>/dev/null
}

main() {
    say "started at $(up) s, kernel $KVER, agent $(fleetwave --version 2>&1)"
    loaded=0
    for m in $(cat /etc/fleetwave/modules); do
        # A module can refuse this machine (e.g. a CPU feature): the others still load.
        if insmod "/lib/modules/$KVER/$m" 2>/tmp/insmod.err; then
            loaded=$((loaded + 1))
        else
            grep -q 'File exists' /tmp/insmod.err || say "module $m: $(cat /tmp/insmod.err)"
        fi
    done
    say "$loaded modules loaded at $(up) s"
    [ -n "$MAC" ] || { fail "fleetwave.mac= is missing from the kernel command line"; return; }
    NIC=
    wait_for 150 nic_with_mac || {
        fail "no network interface has MAC $MAC (found: $(cat /sys/class/net/*/address | tr '\n' ' ')); its driver may be missing from the netboot build"
        return
    }
    ip link set lo up
    ip link set "$NIC" up
    say "NIC $NIC ($MAC), asking for an address by DHCP"
    udhcpc -i "$NIC" -f -q -n -t 10 -T 2 -s /etc/fleetwave/udhcpc.script -V fleetwave-agent || {
        fail "no DHCP lease on $NIC"
        return
    }
    wait_for 100 has_disk || say "no disk found yet (a registration needs none)"
    told=$(server_after)
    [ -n "$told" ] && AFTER=$told
    say "after the task: ${AFTER:-reboot}"
    say "running the agent at $(up) s"
    fleetwave agent run
    rc=$?
    if [ "$rc" -ne 0 ]; then
        fail "fleetwave agent run exited with $rc"
        return
    fi
    say "agent finished: ok at $(up) s"
}

main
sync
if [ -n "$FAILED" ] && [ "$DEBUG" = 1 ]; then
    say "fleetwave.debug=1: a shell on the console; exit it to continue"
    setsid cttyhack sh </dev/console >/dev/console 2>&1
fi
[ -n "$FAILED" ] && say "task failed: $FAILED"
case "$AFTER" in
    poweroff) say "powering off" ; exec >/dev/console 2>&1; sync; poweroff -f ;;
    *) say "rebooting" ; exec >/dev/console 2>&1; sync; reboot -f ;;
esac
# Not reached unless the firmware refuses to reset: never let PID 1 end.
while :; do sleep 3600; done
