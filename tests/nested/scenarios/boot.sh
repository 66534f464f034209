# Scenario boot [N...]: boots L2 Linux with no device on baton-vmm, once for each vCPU count N
# (default: $L2_CPUS or 1). L2 prints nproc, the online CPUs and its uptime, then powers off
# (its /init prints its kernel's warnings and errors). Checks: baton-vmm exits 0, L2's script
# exits 0, L2's kernel complains about nothing, all N CPUs are online.
. /rig/lib.sh

cat >/tmp/l2.sh <<'L2'
echo "nproc: $(nproc)"
echo "online: $(cat /sys/devices/system/cpu/online)"
echo "uptime: $(cut -d' ' -f1 /proc/uptime)"
L2

[ $# -gt 0 ] || set -- "${L2_CPUS:-1}"
for n in "$@"; do
    name=boot-$n
    l2_boot "$name" /tmp/l2.sh --cpus "$n"
    check "$name: baton-vmm exits 0" test $? = 0
    check_l2 "$name"
    online=0-$((n - 1))
    [ "$n" = 1 ] && online=0
    check "$name: nproc is $n" grep -qx "nproc: $n" "/tmp/$name.console"
    check "$name: CPUs $online online" grep -qx "online: $online" "/tmp/$name.console"
done
exit $FAILURES
