# ./bench.sh boot: exec of baton-vmm → guest ready line, median of 10, vs QEMU booting the same
# guest (PVH -kernel) as -M microvm (qboot) and -M pc (SeaBIOS), each with -accel kvm and tcg.
target/release/baton-boot-bench 10
