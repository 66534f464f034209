# ./bench.sh boot: exec of baton-vmm → guest ready line, median of 10, vs QEMU -accel kvm.
target/release/baton-boot-bench 10
