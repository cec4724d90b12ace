#!/bin/sh
# udhcpc's hook in the netboot initramfs: configure the lease, nothing else.
case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound | renew)
        ip addr flush dev "$interface"
        # brd +: without a broadcast address some receivers send to 0.0.0.0.
        ip addr add "$ip/${mask:-24}" brd + dev "$interface"
        for r in $router; do
            ip route add default via "$r" dev "$interface" && break
        done
        if [ -n "$dns" ]; then
            : >/etc/resolv.conf
            for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
        fi
        echo "fleetwave-init: lease $ip/${mask:-24} on $interface from $serverid"
        ;;
esac
exit 0
