# Scenario boot [N...]: boots L2 Linux with no device on baton-vmm, once for each vCPU count N
# (default: $L2_CPUS or 1). L2 prints nproc, the online CPUs, the ACPI tables and PCI devices
# it found and its uptime, then powers off (its /init prints its kernel's warnings and errors).
# Checks: baton-vmm exits 0, L2's script exits 0, L2's kernel complains about nothing, all N
# CPUs are online, Linux found baton's ACPI tables (MADT, FADT, DSDT, MCFG) and the PCI host
# bridge. Then one more boot whose script reboots: baton-vmm exits 0 (as the README says).
. /rig/lib.sh

cat >/tmp/l2.sh <<'L2'
echo "nproc: $(nproc)"
echo "online: $(cat /sys/devices/system/cpu/online)"
echo "acpi: $(ls /sys/firmware/acpi/tables | tr '\n' ' ')"
echo "pci: $(ls /sys/bus/pci/devices | tr '\n' ' ')"
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
    for t in APIC FACP DSDT MCFG; do
        check "$name: ACPI table $t seen by Linux" grep -q "^acpi: .*\b$t\b" "/tmp/$name.console"
    done
    check "$name: PCI host bridge seen by Linux" grep -q "^pci: .*0000:00:00.0" "/tmp/$name.console"
done

# A guest that reboots: baton-vmm exits 0 (it does not restart the guest).
cat >/tmp/reboot.sh <<'L2'
echo "rebooting"
reboot -f
L2
l2_boot reboot /tmp/reboot.sh --cpus 1
check "reboot: baton-vmm exits 0" test $? = 0
check "reboot: L2 restarted its system" grep -q "reboot: Restarting system" /tmp/reboot.console
exit $FAILURES
